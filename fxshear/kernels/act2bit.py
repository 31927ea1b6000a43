"""``fxshear::act2bit``: exact GELU/SiLU forward that keeps only a 2-bit code for backward.

Why a custom op: AOTAutograd decomposes ``gelu`` and its backward into pointwise soup and the
min-cut partitioner then saves whatever it likes.  An opaque op with its own autograd formula
survives tracing, and Inductor's partitioner keeps its uint8 output saved instead of the dense
pre-activation (docs/design.md §2).

Ops:
    act2bit(x, kind, approximate, impl) -> (y, codes)      y exact, codes uint8[ceil(numel/4)]
    act2bit_backward(grad, codes, kind, impl) -> dx        dx = grad * level[code]

``impl`` is "auto" (Triton on CUDA when importable), "torch" or "triton".  It is an argument,
not global state, so it is part of the traced graph and of every cache key.
"""

from __future__ import annotations

import torch

from ..options import check_activation
from .act2bit_reference import (
    activation_reference,
    backward_reference,
    encode_reference,
    packed_numel,
)
from .infra.dispatch import IMPLS, triton_switch  # noqa: F401  (IMPLS re-exported)



_use_triton = triton_switch("act2bit_triton")


_check = check_activation


@torch.library.custom_op("fxshear::act2bit", mutates_args=())
def act2bit(x: torch.Tensor, kind: str, approximate: str, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact activation plus its packed 2-bit step codes."""
    _check(kind, approximate)
    if _use_triton(x, impl):
        from .act2bit_triton import act2bit_forward_triton

        return act2bit_forward_triton(x, kind, approximate)
    y = torch.empty_like(x)
    y.copy_(activation_reference(x, kind, approximate))
    return y, encode_reference(x, kind)


@act2bit.register_fake
def _act2bit_fake(x: torch.Tensor, kind: str, approximate: str, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty((packed_numel(x.numel()),), dtype=torch.uint8)


@torch.library.custom_op("fxshear::act2bit_backward", mutates_args=())
def act2bit_backward(grad: torch.Tensor, codes: torch.Tensor, kind: str, impl: str) -> torch.Tensor:
    """``grad * level[code]``: the derivative of the published 4-level step function."""
    _check(kind, "none")
    if _use_triton(grad, impl):
        from .act2bit_triton import act2bit_backward_triton

        return act2bit_backward_triton(grad, codes, kind)
    out = torch.empty_like(grad)
    out.copy_(backward_reference(grad.contiguous(), codes, kind).view(grad.shape))
    return out


@act2bit_backward.register_fake
def _act2bit_backward_fake(grad: torch.Tensor, codes: torch.Tensor, kind: str, impl: str) -> torch.Tensor:
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    _, kind, _, impl = inputs
    _, codes = output
    ctx.save_for_backward(codes)
    ctx.kind = kind
    ctx.impl = impl
    ctx.mark_non_differentiable(codes)


def _backward(ctx, grad_y: torch.Tensor, grad_codes: torch.Tensor | None):  # noqa: ANN001, ANN202
    (codes,) = ctx.saved_tensors
    return act2bit_backward(grad_y, codes, ctx.kind, ctx.impl), None, None, None


act2bit.register_autograd(_backward, setup_context=_setup_context)


def gelu2(x: torch.Tensor, approximate: str = "none", impl: str = "auto") -> torch.Tensor:
    """GELU whose backward keeps 2 bits per element (ReGELU2)."""
    return act2bit(x, "gelu", approximate, impl)[0]


def silu2(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """SiLU whose backward keeps 2 bits per element (ReSiLU2)."""
    return act2bit(x, "silu", "none", impl)[0]
