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

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter. This must be set before anything
    # imports triton (torch.library and Inductor may, while other test modules are collected):
    # triton's own library functions (tl.sum...) are only interpreted if it is set at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
