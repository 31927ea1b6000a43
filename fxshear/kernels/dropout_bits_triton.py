"""Triton kernels for the 1-bit dropout masks (CUDA path of ``fxshear::dropout_draw`` and ``dropout_apply``).

The mask itself is drawn by ``native_dropout`` on the device, so the kept elements and the
generator's state are eager's; the kernels only pack the bool mask 8 to a byte and rebuild the
gradient from the packed bits.  The backward equals CUDA's ``native_dropout_backward``
(``(float)mask * grad * scale`` in fp32, rounded once) bit for bit, and on CPU tensors under
TRITON_INTERPRET=1 it equals the CPU ``native_dropout_backward``, which is what the tests check.

Every program owns ``BLOCK_BYTES`` packed bytes, a ``[BLOCK_BYTES, 8]`` tile of consecutive
elements: element ``8 * byte + lane`` is bit ``lane`` of ``byte``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxshear.kernels.infra.numbers import fp32 as _fp32
from fxshear.kernels.infra.triton_helpers import SUPPORTED_DTYPES, cast_fp32_to, check_packed, grid_1d
from fxshear.kernels.infra.bits import BITS_PER_BYTE, packed_numel

# 512 bytes = 4096 elements per program, 16 elements per thread with 8 warps on a GPU.
BLOCK_BYTES = 512
NUM_WARPS = 8


@triton.jit
def _pack_bits_kernel(mask_ptr, packed_ptr, numel, num_bytes, BLOCK_BYTES: tl.constexpr):
    """packed[b] = sum_j mask[8b + j] << j; pad lanes of the last byte are 0."""
    byte_idx = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lane = tl.arange(0, 8)
    elem_idx = byte_idx[:, None] * 8 + lane[None, :]
    keep = tl.load(mask_ptr + elem_idx, mask=elem_idx < numel, other=0).to(tl.int32)
    keep = tl.where(keep != 0, 1, 0)
    # Disjoint bits: the sum is the bitwise OR.
    packed = tl.sum(keep << lane[None, :], axis=1)
    tl.store(packed_ptr + byte_idx, packed.to(tl.uint8), mask=byte_idx < num_bytes)


@triton.jit
def _dropout_backward_kernel(
    grad_ptr, packed_ptr, dx_ptr, numel, num_bytes, scale, BLOCK_BYTES: tl.constexpr
):
    """dx = mask * grad * scale in fp32 (``masked_scale``'s order), stored in grad's dtype.

    Dropped elements multiply by 0.0 rather than storing a literal zero, so signed zeros and
    NaN gradients come out as in eager.
    """
    byte_idx = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lane = tl.arange(0, 8)
    elem_idx = byte_idx[:, None] * 8 + lane[None, :]
    in_bounds = elem_idx < numel

    packed = tl.load(packed_ptr + byte_idx, mask=byte_idx < num_bytes, other=0).to(tl.int32)
    keep = ((packed[:, None] >> lane[None, :]) & 1).to(tl.float32)
    grad = tl.load(grad_ptr + elem_idx, mask=in_bounds, other=0.0).to(tl.float32)
    dx = keep * grad * scale
    tl.store(dx_ptr + elem_idx, cast_fp32_to(dx, dx_ptr.dtype.element_ty), mask=in_bounds)


def _grid(num_bytes: int) -> tuple[int]:
    return grid_1d(num_bytes, BLOCK_BYTES)


def pack_bits_triton(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask 8 to a byte in logical (row-major) order, whatever its strides."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    numel = mask.numel()
    num_bytes = packed_numel(numel)
    packed = torch.empty(num_bytes, dtype=torch.uint8, device=mask.device)
    if numel == 0:
        return packed
    # bool and uint8 share a layout; the uint8 view keeps the pointer type simple.
    flat = mask.contiguous().view(torch.uint8).reshape(-1)
    _pack_bits_kernel[_grid(num_bytes)](flat, packed, numel, num_bytes, BLOCK_BYTES=BLOCK_BYTES,
                                        num_warps=NUM_WARPS)
    return packed


def dropout_backward_triton(grad: torch.Tensor, packed: torch.Tensor, p: float) -> torch.Tensor:
    """``native_dropout_backward(grad, mask, 1 / (1 - p))`` from the packed mask, for 0 < p < 1.

    The result is laid out like ``torch.empty_like(grad)``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"the Triton dropout backward needs 0 < p < 1, got {p}")
    if grad.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"grad must be one of {SUPPORTED_DTYPES}, got {grad.dtype}")
    numel = grad.numel()
    num_bytes = packed_numel(numel)
    check_packed(packed, grad, num_bytes, f"{BITS_PER_BYTE} bits per byte")

    dx = torch.empty_like(grad)
    if numel == 0:
        return dx
    grad_contiguous = grad.contiguous()
    dx_out = dx if dx.is_contiguous() else torch.empty_like(grad_contiguous)
    _dropout_backward_kernel[_grid(num_bytes)](
        grad_contiguous, packed.contiguous(), dx_out, numel, num_bytes, _fp32(1.0 / (1.0 - p)),
        BLOCK_BYTES=BLOCK_BYTES, num_warps=NUM_WARPS,
    )
    if dx_out is not dx:
        dx.copy_(dx_out)
    return dx
