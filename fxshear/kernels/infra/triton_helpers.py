"""Triton helpers the op families' kernels share; imported only by the ``*_triton`` twins."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numbers import FLOAT_DTYPES

#: The dtypes every fxshear Triton kernel takes.
SUPPORTED_DTYPES = FLOAT_DTYPES


@triton.jit
def cast_fp32_to(v, dtype: tl.constexpr):
    """Cast fp32 ``v`` to ``dtype`` rounding to nearest even, as torch does.

    bf16 is rounded by hand: the Triton interpreter truncates fp32 -> bf16 casts, while
    GPUs round to nearest even.  The integer rounding below is exactly the GPU (and torch)
    result, so one code path is bit-exact in both places and can be tested on CPU.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)  # keep NaN a NaN, not inf
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


def grid_1d(size: int, block: int) -> tuple[int]:
    """One program per ``block`` of ``size`` (bytes or elements)."""
    return (triton.cdiv(size, block),)


def check_packed(packed: torch.Tensor, grad: torch.Tensor, num_bytes: int, per_byte: str) -> None:
    """A backward kernel's packed input: uint8, ``num_bytes`` long, on the gradient's device."""
    if packed.dtype != torch.uint8 or packed.numel() != num_bytes:
        raise ValueError(
            f"packed must be uint8 with {num_bytes} elements ({per_byte} for "
            f"{grad.numel()} gradients), got {packed.dtype} with {packed.numel()}"
        )
    if packed.device != grad.device:
        raise ValueError(f"packed is on {packed.device} but grad is on {grad.device}")
