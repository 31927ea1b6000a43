"""Test helpers: eager references for fxshear's approximations, gradient comparison."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch

from fxshear.kernels.act2bit import gelu2, silu2


class _Approx(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def with_2bit_activations(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose GELU/SiLU use fxshear's 2-bit backward, run eagerly.

    This is the documented approximation fxshear's balanced preset must reproduce exactly.
    """
    from transformers import activations

    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        replacement: torch.nn.Module | None = None
        if isinstance(module, torch.nn.GELU):
            replacement = _Approx(lambda x, a=module.approximate: gelu2(x, a))
        elif isinstance(module, (torch.nn.SiLU, getattr(activations, "SiLUActivation", torch.nn.SiLU))):
            replacement = _Approx(silu2)
        elif isinstance(module, activations.GELUActivation):
            replacement = _Approx(gelu2)
        elif isinstance(module, activations.NewGELUActivation):  # gelu_new: the tanh formula
            replacement = _Approx(lambda x: gelu2(x, "tanh"))
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            parent = ref.get_submodule(parent_name) if parent_name else ref
            setattr(parent, child, replacement)
    return ref


def opaque_fxshear_ops(graph: torch.fx.Graph) -> list[object]:
    """fxshear ops left in a graph after lowering, other than the CPU bit unpack.

    ``fxshear::unpack_flags`` stays opaque on purpose (Inductor vectorizes its consumers only
    when the flags arrive dense; see ``fxshear/kernels/infra/bits.py``)."""
    unpack = torch.ops.fxshear.unpack_flags.default
    return [n.target for n in graph.nodes
            if n.op == "call_function" and "fxshear" in str(n.target) and n.target is not unpack]


def fxshear_ops_in_code(code: str) -> set[str]:
    """Names of the fxshear ops generated code calls, the CPU bit unpack left out."""
    import re

    return set(re.findall(r"torch\.ops\.fxshear\.(\w+)", code)) - {"unpack_flags"}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                       rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def gradient_fidelity(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine of the whole gradient vector, and the smallest per-parameter cosine.

    Parameters whose exact gradient is rounding noise (below 1e-6 of the largest norm, e.g.
    attention key biases, whose true gradient is zero by softmax's shift invariance) are left
    out of the minimum: their cosine carries no information.
    """
    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()

    largest = max(g.norm().item() for g in expected.values())
    per_param = [cos(actual[n], expected[n]) for n in expected if expected[n].norm().item() > 1e-6 * largest]
    whole = cos(torch.cat([actual[n].flatten() for n in expected]), torch.cat([expected[n].flatten() for n in expected]))
    return {"global_cosine": whole, "min_param_cosine": min(per_param)}


def assert_grads_close_in_norm(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                               rel: float = 1e-4, floor: float = 1e-6) -> None:
    """Per parameter, ``|a - b| / |b| <= rel``.

    Why not elementwise: a step-function backward under a compiler that rounds the forward
    differently flips the code of the rare element sitting on a threshold; that moves a few
    elements by one step, which only a norm-wise bound describes honestly.
    """
    assert actual.keys() == expected.keys()
    # A parameter whose true gradient is zero (attention key biases) holds only rounding noise:
    # measure its error against the model's gradient scale instead of its own.
    floor = floor * max(g.double().norm().item() for g in expected.values())
    for name in expected:
        diff = (actual[name].double() - expected[name].double()).norm().item()
        scale = max(expected[name].double().norm().item(), floor, 1e-30)
        assert diff / scale <= rel, f"{name}: relative gradient error {diff / scale:.2e} > {rel:.0e}"


def _true_activation(x: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    """The function itself, in float64."""
    x = x.double()
    if kind == "silu":
        return x * torch.sigmoid(x)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * torch.special.erfc(-x / math.sqrt(2.0))


def _eager_activation(x: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate=approximate) if kind == "gelu" else torch.nn.functional.silu(x)


@functools.cache
def eager_forward_error(kind: str, approximate: str, dtype: torch.dtype) -> float:
    """Largest |eager f(x) - f(x)| over x in [-12, 12]: eager's own forward error on this CPU.

    Why: fxshear's forward *is* eager's (bit for bit), and its exact inversion reads that output,
    so tests comparing against eager must allow for how accurate eager is here.  That depends on
    the build's vectorized kernels: the fp32 erf GELU is within ~1.5e-7 on AVX2 builds but
    1.2e-6 on AVX512 ones (2026-12 measurement, torch 2.13 CPU).
    """
    x = torch.linspace(-12.0, 12.0, 200_001).to(dtype)
    eager = _eager_activation(x, kind, approximate)
    return float((eager.double() - _true_activation(x, kind, approximate)).abs().max())


@functools.cache
def eager_nan_at_inf(kind: str, approximate: str, dtype: torch.dtype) -> bool:
    """Whether eager's vectorized kernel returns NaN for f(+inf) (AVX512 builds' erf GELU does,
    the scalar path returns +inf): a forward NaN there is then eager's, not fxshear's."""
    x = torch.full((64,), math.inf, dtype=dtype)
    eager = _eager_activation(x, kind, approximate)
    return bool(eager.isnan().any())


#: Where the Triton kernel tests run (CPU tensors under TRITON_INTERPRET=1 without CUDA), and in which dtypes.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
