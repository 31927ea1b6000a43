"""Triton kernels for Back Razor pruning (CUDA path of ``fxshear::prune_pack`` / ``pruned_weight_grad``).

(a) ``_prune_pack_kernel``, one program per sample: finds the k-th largest magnitude by bisection
    on the magnitudes' fp32 bit patterns (non-negative floats order like their bits), then one
    ordered sweep writes the kept values (in row-major order) and the 1-bit mask, ties at the
    threshold kept in index order, exactly as the torch reference.
(b) ``_pruned_weight_grad_kernel``: ``dW = gᵀ · x̂`` tile by tile, each ``x̂`` tile decoded in
    registers from the bits and the values.  A kept element's slot in ``values`` is the number
    of kept elements before it: a per-byte running count (int32, one per 8 elements, built in
    the wrapper and freed after) plus the popcount of the lower bits of its own byte.  No dense
    copy of the input is ever written.
(c) ``_unprune_kernel``: the dense copy, for the pruned attention matmuls and softmax whose
    backward is a batched matmul or a softmax gradient (no packed-operand kernel of their own).

Both are tested on CPU tensors under ``TRITON_INTERPRET=1`` against the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .infra.bits import packed_numel
from .infra.triton_helpers import SUPPORTED_DTYPES
from .prune_reference import keep_count, samples_and_size

INF_KEY = 0x7F800000  # the fp32 bits of +inf; NaN magnitudes are clamped to it


@triton.jit
def _magnitude_key(x):
    """|x| as fp32 bits (int32), NaN as +inf: orders like the magnitudes."""
    key = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)
    return tl.minimum(key, 0x7F800000)


@triton.jit
def _prune_pack_kernel(x_ptr, values_ptr, bits_ptr, n, k, num_bytes,
                       BLOCK_BYTES: tl.constexpr, BISECTION_STEPS: tl.constexpr):
    sample = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + sample * n
    byte_offs = tl.arange(0, BLOCK_BYTES)
    lane = tl.arange(0, 8)

    # 1. threshold: the largest key t with count(key >= t) >= k
    low = tl.zeros((), dtype=tl.int32)
    high = tl.full((), 0x7F800001, dtype=tl.int32)
    for _ in range(BISECTION_STEPS):
        middle = low + (high - low) // 2
        count = tl.zeros((), dtype=tl.int32)
        for start in range(0, n, BLOCK_BYTES * 8):
            elems = start + byte_offs[:, None] * 8 + lane[None, :]
            valid = elems < n
            key = _magnitude_key(tl.load(x_row + elems, mask=valid, other=0.0))
            count += tl.sum(tl.sum(tl.where(valid & (key >= middle), 1, 0), axis=1), axis=0)
        take = count >= k
        low = tl.where(take, middle, low)
        high = tl.where(take, high, middle)
    threshold = low
    above_total = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, BLOCK_BYTES * 8):
        elems = start + byte_offs[:, None] * 8 + lane[None, :]
        valid = elems < n
        key = _magnitude_key(tl.load(x_row + elems, mask=valid, other=0.0))
        above_total += tl.sum(tl.sum(tl.where(valid & (key > threshold), 1, 0), axis=1), axis=0)
    ties_needed = k - above_total

    # 2. one ordered sweep: mask bits, kept values at their rank
    ties_seen = tl.zeros((), dtype=tl.int32)
    kept_seen = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, BLOCK_BYTES * 8):
        elems = start + byte_offs[:, None] * 8 + lane[None, :]
        valid = elems < n
        x = tl.load(x_row + elems, mask=valid, other=0.0)
        key = _magnitude_key(x)
        tied = tl.where(valid & (key == threshold), 1, 0)
        tie_rank = ties_seen + _inclusive_rank(tied)
        keep = tl.where(valid & ((key > threshold) | ((tied == 1) & (tie_rank <= ties_needed))), 1, 0)
        rank = kept_seen + _inclusive_rank(keep) - 1
        tl.store(values_ptr + sample * k + rank, x, mask=keep == 1)
        packed = tl.sum(keep << lane[None, :], axis=1)  # disjoint bits: the sum is the OR
        byte_idx = start // 8 + byte_offs
        tl.store(bits_ptr + sample * num_bytes + byte_idx, packed.to(tl.uint8), mask=byte_idx < num_bytes)
        ties_seen += tl.sum(tl.sum(tied, axis=1), axis=0)
        kept_seen += tl.sum(tl.sum(keep, axis=1), axis=0)


@triton.jit
def _inclusive_rank(flags):
    """Row-major inclusive prefix count of a ``[bytes, 8]`` tile of 0/1 int32 flags."""
    per_byte = tl.sum(flags, axis=1)
    before_byte = tl.cumsum(per_byte, axis=0) - per_byte
    return before_byte[:, None] + tl.cumsum(flags, axis=1)


@triton.jit
def _popcount_byte(b):
    b = b - ((b >> 1) & 0x55)
    b = (b & 0x33) + ((b >> 2) & 0x33)
    return (b + (b >> 4)) & 0x0F


@triton.jit
def _pruned_weight_grad_kernel(
    grad_ptr, values_ptr, bits_ptr, offsets_ptr, dw_ptr,
    rows, out_features, in_features, rows_per_sample, k, num_bytes,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_valid = offs_r < rows
        g = tl.load(grad_ptr + offs_r[None, :].to(tl.int64) * out_features + offs_o[:, None],
                    mask=r_valid[None, :] & (offs_o[:, None] < out_features), other=0.0)
        sample = (offs_r // rows_per_sample).to(tl.int64)
        elem = (offs_r % rows_per_sample).to(tl.int64)[:, None] * in_features + offs_i[None, :]
        valid = r_valid[:, None] & (offs_i[None, :] < in_features)
        byte_idx = sample[:, None] * num_bytes + (elem >> 3)
        byte = tl.load(bits_ptr + byte_idx, mask=valid, other=0).to(tl.int32)
        bit = (elem & 7).to(tl.int32)
        kept = ((byte >> bit) & 1) == 1
        rank = tl.load(offsets_ptr + byte_idx, mask=valid, other=0) + _popcount_byte(byte & ((1 << bit) - 1))
        x = tl.load(values_ptr + sample[:, None] * k + rank, mask=valid & kept, other=0.0)
        if INTERPRETED:
            acc += tl.dot(g.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(g, x.to(g.dtype), input_precision=DOT_PRECISION)
    tl.store(dw_ptr + offs_o[:, None] * in_features + offs_i[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=(offs_o[:, None] < out_features) & (offs_i[None, :] < in_features))


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, got {t.dtype}")


def prune_pack_triton(x: torch.Tensor, keep_ratio: float, *, block_bytes: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``prune_pack``'s ``(values, bits)``, equal to the torch reference."""
    _check_dtype("x", x)
    samples, n = samples_and_size(x)
    k = keep_count(n, keep_ratio)
    num_bytes = packed_numel(n)
    values = x.new_empty((samples, k))
    bits = x.new_empty((samples, num_bytes), dtype=torch.uint8)
    if samples == 0 or n == 0:
        return values, bits
    _prune_pack_kernel[(samples,)](x.contiguous(), values, bits, n, k, num_bytes,
                                   BLOCK_BYTES=block_bytes, BISECTION_STEPS=31)
    return values, bits


_BYTE_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int32)


def kept_before_each_byte(bits: torch.Tensor) -> torch.Tensor:
    """int32 ``[samples, bytes]``: kept elements of the sample before each byte (exclusive)."""
    counts = _BYTE_POPCOUNT.to(bits.device)[bits.long()]
    return (counts.cumsum(dim=1, dtype=torch.int32) - counts).contiguous()


def pruned_weight_grad_triton(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, in_features: int,
                              *, block_o: int = 32, block_i: int = 32, block_r: int = 32) -> torch.Tensor:
    """``gradᵀ · x̂`` from the packed input: ``[out_features, in_features]`` in grad's dtype."""
    _check_dtype("grad", grad)
    out_features = grad.shape[-1]
    grad_rows = grad.reshape(-1, out_features).contiguous()
    rows = grad_rows.shape[0]
    samples, num_bytes = bits.shape
    rows_per_sample = rows // samples
    dw = grad.new_empty((out_features, in_features))
    if rows == 0 or out_features == 0 or in_features == 0:
        return dw.zero_()
    offsets = kept_before_each_byte(bits)
    grid = (triton.cdiv(out_features, block_o), triton.cdiv(in_features, block_i))
    _pruned_weight_grad_kernel[grid](
        grad_rows, values.contiguous(), bits.contiguous(), offsets, dw,
        rows, out_features, in_features, rows_per_sample, values.shape[1], num_bytes,
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_R=block_r,
        # fp32 as torch's default matmul (no TF32); on CPU the kernels only run interpreted.
        DOT_PRECISION="ieee" if grad.dtype == torch.float32 else "tf32", INTERPRETED=grad.device.type == "cpu",
    )
    return dw


@triton.jit
def _unprune_kernel(values_ptr, bits_ptr, offsets_ptr, dense_ptr, n, k, num_bytes, BLOCK_BYTES: tl.constexpr):
    """One program per (sample, block of bytes): each element is its kept value or zero."""
    sample = tl.program_id(0).to(tl.int64)
    byte_idx = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lane = tl.arange(0, 8)
    byte_valid = byte_idx < num_bytes
    byte = tl.load(bits_ptr + sample * num_bytes + byte_idx, mask=byte_valid, other=0).to(tl.int32)
    before = tl.load(offsets_ptr + sample * num_bytes + byte_idx, mask=byte_valid, other=0)
    elems = byte_idx[:, None].to(tl.int64) * 8 + lane[None, :]
    valid = byte_valid[:, None] & (elems < n)
    kept = valid & (((byte[:, None] >> lane[None, :]) & 1) == 1)
    rank = before[:, None] + _popcount_byte(byte[:, None] & ((1 << lane[None, :]) - 1))
    x = tl.load(values_ptr + sample * k + rank, mask=kept, other=0.0)
    tl.store(dense_ptr + sample * n + elems, x, mask=valid)


def unprune_triton(values: torch.Tensor, bits: torch.Tensor, n: int, *, block_bytes: int = 256) -> torch.Tensor:
    """The dense ``[samples, n]`` copy of a pruned pack, equal to ``prune.unprune_reference``."""
    _check_dtype("values", values)
    samples, num_bytes = bits.shape
    dense = values.new_empty((samples, n))
    if samples == 0 or n == 0:
        return dense
    offsets = kept_before_each_byte(bits)
    grid = (samples, triton.cdiv(num_bytes, block_bytes))
    _unprune_kernel[grid](values.contiguous(), bits.contiguous(), offsets, dense, n, values.shape[1], num_bytes,
                          BLOCK_BYTES=block_bytes)
    return dense
