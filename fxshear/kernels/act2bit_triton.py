"""Triton kernels for the 2-bit activation codes (ReGELU2 / ReSiLU2).

The forward reads ``x`` once and writes both the exact activation and the packed codes, so
the codes cost no extra pass over ``x``.  The backward reads ``grad`` and the packed codes
and never touches ``x``.  Both must agree with :mod:`fxshear.kernels.act2bit_reference` bit
for bit on the codes and the backward; that is what the tests check.

Every program owns ``BLOCK_BYTES`` packed bytes, i.e. a ``[4, BLOCK_BYTES]`` tile of elements
in the planar layout of :func:`~fxshear.kernels.act2bit_reference.pack_codes`: with
``B = num_bytes``, element ``plane * B + byte`` sits in bits ``2 * plane`` of ``byte``.  Each
plane of the tile is one contiguous run, so global memory access stays coalesced on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxshear.kernels.infra.numbers import fp32
from fxshear.kernels.infra.triton_helpers import SUPPORTED_DTYPES, cast_fp32_to, check_packed, grid_1d
from fxshear.kernels.act2bit_reference import (
    CODES_PER_BYTE,
    GELU_APPROXIMATIONS,
    KINDS,
    STEPS,
    packed_numel,
)

# 1024 bytes = 4096 elements per program: few programs (which also keeps TRITON_INTERPRET
# runs fast) and 16 elements per thread with 8 warps on a GPU.
BLOCK_BYTES = 1024
NUM_WARPS = 8

# Globals read inside @triton.jit functions must be constexpr.
SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(v):
    """1 / (1 + exp(-v)): exp overflows to inf for very negative v, which gives exactly 0."""
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _act2bit_forward_kernel(
    x_ptr,
    y_ptr,
    packed_ptr,
    numel,
    num_bytes,
    c1,
    c2,
    c3,
    KIND: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    """y = activation(x) in x's dtype, and packed[b] = sum_j code(x[j * num_bytes + b]) << 2j.

    ``c1..c3`` are already rounded to fp32 on the host, so ``x > c`` is the same fp32
    comparison that ``x.float() > c`` is in torch.
    """
    byte_idx = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    plane = tl.arange(0, 4)
    elem_idx = plane[:, None].to(tl.int64) * num_bytes + byte_idx[None, :]
    in_bounds = (elem_idx < numel) & (byte_idx[None, :] < num_bytes)

    x = tl.load(x_ptr + elem_idx, mask=in_bounds, other=0.0).to(tl.float32)

    if KIND == "gelu":
        if APPROX_TANH:
            # 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u): same function, no cancellation
            # in 1 + tanh(u) for negative x, and no tanh (absent from the interpreter).
            u = SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x)
            y = x * _sigmoid(2.0 * u)
        else:
            y = 0.5 * x * (1.0 + tl.erf(x * SQRT_HALF))
    else:  # silu
        y = x * _sigmoid(x)
    tl.store(y_ptr + elem_idx, cast_fp32_to(y, y_ptr.dtype.element_ty), mask=in_bounds)

    code = (x > c1).to(tl.int32) + (x > c2).to(tl.int32) + (x > c3).to(tl.int32)
    code = tl.where(in_bounds, code, 0)  # pad codes (top plane of the last bytes) stay zero
    # The planes occupy disjoint bits, so their sum is their bitwise OR.
    packed = tl.sum(code << (2 * plane[:, None]), axis=0)
    tl.store(packed_ptr + byte_idx, packed.to(tl.uint8), mask=byte_idx < num_bytes)


@triton.jit
def _act2bit_backward_kernel(
    grad_ptr,
    packed_ptr,
    dx_ptr,
    numel,
    num_bytes,
    level1,
    level2,
    level3,
    BLOCK_BYTES: tl.constexpr,
):
    """dx[e] = grad[e] * level[code(e)], multiplied in fp32, stored in grad's dtype.

    Code 0 multiplies by 0.0 rather than writing a literal zero, so signed zeros and NaN
    gradients come out exactly as in the reference.
    """
    byte_idx = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    plane = tl.arange(0, 4)
    elem_idx = plane[:, None].to(tl.int64) * num_bytes + byte_idx[None, :]
    in_bounds = (elem_idx < numel) & (byte_idx[None, :] < num_bytes)

    packed = tl.load(packed_ptr + byte_idx, mask=byte_idx < num_bytes, other=0).to(tl.int32)
    code = (packed[None, :] >> (2 * plane[:, None])) & 3
    level = tl.where(code == 3, level3, 0.0)
    level = tl.where(code == 2, level2, level)
    level = tl.where(code == 1, level1, level)

    grad = tl.load(grad_ptr + elem_idx, mask=in_bounds, other=0.0).to(tl.float32)
    dx = grad * level
    tl.store(dx_ptr + elem_idx, cast_fp32_to(dx, dx_ptr.dtype.element_ty), mask=in_bounds)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown activation kind {kind!r}; expected one of {KINDS}")


def _check_float_tensor(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, got {t.dtype}")


def _grid(num_bytes: int) -> tuple[int]:
    return grid_1d(num_bytes, BLOCK_BYTES)


def act2bit_forward_triton(
    x: torch.Tensor, kind: str, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(activation(x), packed codes)`` from one pass over ``x``.

    ``y`` is laid out like ``torch.empty_like(x)``; the codes follow ``x``'s logical
    (row-major) element order, as :func:`encode_reference` does, whatever ``x``'s strides.
    """
    _check_kind(kind)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(
            f"unknown GELU approximation {approximate!r}; expected one of {GELU_APPROXIMATIONS}"
        )
    _check_float_tensor(x, "x")

    numel = x.numel()
    num_bytes = packed_numel(numel)
    y = torch.empty_like(x)
    packed = torch.empty(num_bytes, dtype=torch.uint8, device=x.device)
    if numel == 0:
        return y, packed

    x_contiguous = x.contiguous()
    # The kernel writes in logical order, so it can only write straight into a contiguous y.
    y_out = y if y.is_contiguous() else torch.empty_like(x_contiguous)
    c1, c2, c3 = (fp32(c) for c in STEPS[kind].thresholds)
    _act2bit_forward_kernel[_grid(num_bytes)](
        x_contiguous,
        y_out,
        packed,
        numel,
        num_bytes,
        c1,
        c2,
        c3,
        KIND=kind,
        APPROX_TANH=approximate == "tanh",
        BLOCK_BYTES=BLOCK_BYTES,
        num_warps=NUM_WARPS,
    )
    if y_out is not y:
        y.copy_(y_out)
    return y, packed


def act2bit_backward_triton(grad: torch.Tensor, packed: torch.Tensor, kind: str) -> torch.Tensor:
    """Return ``grad * level[code]`` laid out like ``torch.empty_like(grad)``.

    ``packed`` holds the codes of ``grad``'s elements in logical (row-major) order, as
    written by :func:`act2bit_forward_triton`.
    """
    _check_kind(kind)
    _check_float_tensor(grad, "grad")
    numel = grad.numel()
    num_bytes = packed_numel(numel)
    check_packed(packed, grad, num_bytes, f"{CODES_PER_BYTE} codes per byte")

    dx = torch.empty_like(grad)
    if numel == 0:
        return dx

    grad_contiguous = grad.contiguous()
    dx_out = dx if dx.is_contiguous() else torch.empty_like(grad_contiguous)
    _, level1, level2, level3 = (fp32(level) for level in STEPS[kind].levels)
    _act2bit_backward_kernel[_grid(num_bytes)](
        grad_contiguous,
        packed.contiguous(),
        dx_out,
        numel,
        num_bytes,
        level1,
        level2,
        level3,
        BLOCK_BYTES=BLOCK_BYTES,
        num_warps=NUM_WARPS,
    )
    if dx_out is not dx:
        dx.copy_(dx_out)
    return dx
