"""Shared test set-up: an isolated Inductor cache per session and small helpers."""

from __future__ import annotations

import os
import tempfile

# One cache directory per test session: warm within the session, never stale from old runs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fxshear-test-inductor-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per test process (make test runs one per core): not four threads on two cores.
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter. This must be set before anything
    # imports triton (torch.library and Inductor may, while other test modules are collected):
    # triton's own library functions (tl.sum...) are only interpreted if it is set at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_interpreter_problem() -> str | None:
    """Why Triton kernels cannot run under this interpreter, or None when they can.

    Triton 3.6's interpreter (torch 2.11's pin) turns a runtime loop bound into a 1-element numpy
    array and calls ``int()`` on it, which numpy 2.4 rejects; every kernel with such a loop then
    fails inside the interpreter, not in fxshear.  Probed, not guessed from version numbers.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def probe(out, n, BLOCK: tl.constexpr):  # noqa: ANN001, ANN202
        acc = tl.zeros([BLOCK], tl.float32)
        for _ in range(0, n, BLOCK):
            acc += 1.0
        tl.store(out + tl.arange(0, BLOCK), acc)

    out = torch.zeros(4)
    try:
        probe[(1,)](out, 8, BLOCK=4)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the reason
        return (f"the Triton {triton.__version__} interpreter cannot run a loop with a runtime bound "
                f"under numpy {numpy.__version__} ({type(exc).__name__}: {exc}); "
                "install numpy<2.4 or a newer triton to run these tests")
    return None if torch.equal(out, torch.full((4,), 2.0)) else "the Triton interpreter miscomputes a probe kernel"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the Triton kernel tests, with the reason, where the interpreter itself is broken."""
    triton_items = [item for item in items if item.path.name.startswith("test_triton_")]
    if not triton_items:
        return
    reason = _triton_interpreter_problem()
    if reason is not None:
        for item in triton_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, so recompile limits and cached frames never leak."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def toy_mlp(seed: int = 0, act: str = "gelu") -> torch.nn.Module:
    """LayerNorm -> Linear -> GELU/SiLU -> Linear: the smallest graph with every pattern in it."""
    torch.manual_seed(seed)
    activation = torch.nn.GELU() if act == "gelu" else torch.nn.SiLU()
    return torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 96), activation,
                               torch.nn.Linear(96, 32))
