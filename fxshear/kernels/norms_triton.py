"""Triton kernels for ``fxshear::normalize`` and its backward (CUDA path).

Each program owns ``ROWS`` rows and walks their last dim in ``BLOCK_N``-wide column tiles.
When a row fits one tile (``ONE_TILE``) it is read once and kept in registers; longer rows are
read twice by the forward (layer: three times; the variance is taken around the mean, not as
E[x^2] - mean^2) and twice by the backward.  Everything is computed in fp32; ``z`` and ``dx``
are rounded once to the input's dtype.  Reductions run in another order than torch's, so the
results agree with :mod:`fxshear.kernels.norms`'s reference to float tolerance, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxshear.kernels.infra.triton_helpers import SUPPORTED_DTYPES, cast_fp32_to
from fxshear.kernels.norms_reference import NORM_KINDS, rstd_shape

# Column tile cap: one row of up to 4096 elements stays in registers (16 per thread, 8 warps).
MAX_BLOCK_N = 4096
# Elements per program tile when rows are short: small rows are batched ROWS to a program.
TILE_ELEMENTS = 4096
MAX_ROWS = 64


@triton.jit
def _normalize_forward_kernel(
    x_ptr, z_ptr, rstd_ptr, M, N, eps,
    IS_RMS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    row_start = rows[:, None] * N
    if ONE_TILE:
        in_bounds = row_ok[:, None] & (cols[None, :] < N)
        x = tl.load(x_ptr + row_start + cols[None, :], mask=in_bounds, other=0.0).to(tl.float32)
        if IS_RMS:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
            z = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / N
            centered = tl.where(in_bounds, x - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / N + eps)
            z = centered * rstd[:, None]
        tl.store(z_ptr + row_start + cols[None, :], cast_fp32_to(z, z_ptr.dtype.element_ty), mask=in_bounds)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            in_bounds = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(x_ptr + row_start + c[None, :], mask=in_bounds, other=0.0).to(tl.float32)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
        if IS_RMS:
            mean = tl.zeros([ROWS], dtype=tl.float32)
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
        else:
            mean = tl.sum(acc, axis=1) / N
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                in_bounds = row_ok[:, None] & (c[None, :] < N)
                x = tl.load(x_ptr + row_start + c[None, :], mask=in_bounds, other=0.0).to(tl.float32)
                centered = tl.where(in_bounds, x - mean[:, None], 0.0)
                acc += centered * centered
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            in_bounds = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(x_ptr + row_start + c[None, :], mask=in_bounds, other=0.0).to(tl.float32)
            z = (x - mean[:, None]) * rstd[:, None]
            tl.store(z_ptr + row_start + c[None, :], cast_fp32_to(z, z_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _normalize_backward_kernel(
    g_ptr, z_ptr, rstd_ptr, dx_ptr, M, N,
    IS_RMS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    row_start = rows[:, None] * N
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if ONE_TILE:
        in_bounds = row_ok[:, None] & (cols[None, :] < N)
        g = tl.load(g_ptr + row_start + cols[None, :], mask=in_bounds, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row_start + cols[None, :], mask=in_bounds, other=0.0).to(tl.float32)
        mean_gz = tl.sum(g * z, axis=1) / N
        inner = g - z * mean_gz[:, None]
        if not IS_RMS:
            inner -= (tl.sum(g, axis=1) / N)[:, None]
        dx = rstd[:, None] * inner
        tl.store(dx_ptr + row_start + cols[None, :], cast_fp32_to(dx, dx_ptr.dtype.element_ty), mask=in_bounds)
    else:
        acc_g = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        acc_gz = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            in_bounds = row_ok[:, None] & (c[None, :] < N)
            g = tl.load(g_ptr + row_start + c[None, :], mask=in_bounds, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + row_start + c[None, :], mask=in_bounds, other=0.0).to(tl.float32)
            acc_g += g
            acc_gz += g * z
        mean_gz = tl.sum(acc_gz, axis=1) / N
        if IS_RMS:
            mean_g = tl.zeros([ROWS], dtype=tl.float32)
        else:
            mean_g = tl.sum(acc_g, axis=1) / N
        for start in range(0, N, BLOCK_N):
            c = start + cols
            in_bounds = row_ok[:, None] & (c[None, :] < N)
            g = tl.load(g_ptr + row_start + c[None, :], mask=in_bounds, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + row_start + c[None, :], mask=in_bounds, other=0.0).to(tl.float32)
            dx = rstd[:, None] * (g - mean_g[:, None] - z * mean_gz[:, None])
            tl.store(dx_ptr + row_start + c[None, :], cast_fp32_to(dx, dx_ptr.dtype.element_ty), mask=in_bounds)


def _launch_config(M: int, N: int, max_block_n: int) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK_N, ONE_TILE, num_warps) for M rows of N elements."""
    block_n = min(triton.next_power_of_2(N), triton.next_power_of_2(max_block_n))
    rows = max(1, min(TILE_ELEMENTS // block_n, MAX_ROWS, triton.next_power_of_2(M)))
    tile = rows * block_n
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    return rows, block_n, block_n >= N, num_warps


def _check(kind: str, t: torch.Tensor, name: str) -> None:
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name} needs at least one dimension")


def normalize_forward_triton(
    x: torch.Tensor, kind: str, eps: float, *, max_block_n: int = MAX_BLOCK_N
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, rstd)`` over the last dim, both contiguous; ``max_block_n`` caps the column tile."""
    _check(kind, x, "x")
    z = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(rstd_shape(x), dtype=torch.float32, device=x.device)
    N = x.shape[-1]
    M = x.numel() // N if N else 0
    if x.numel() == 0:
        if M:  # rows of zero elements: the mean of nothing, as torch computes it
            rstd.copy_(torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))
        return z, rstd
    rows, block_n, one_tile, num_warps = _launch_config(M, N, max_block_n)
    _normalize_forward_kernel[(triton.cdiv(M, rows),)](
        x.contiguous(), z, rstd, M, N, eps,
        IS_RMS=kind == "rms", ROWS=rows, BLOCK_N=block_n, ONE_TILE=one_tile, num_warps=num_warps,
    )
    return z, rstd


def normalize_backward_triton(
    grad_z: torch.Tensor, z: torch.Tensor, rstd: torch.Tensor, kind: str, *, max_block_n: int = MAX_BLOCK_N
) -> torch.Tensor:
    """``dx`` (contiguous, z's dtype) from ``grad_z`` and the saved ``z`` and ``rstd``."""
    _check(kind, z, "z")
    _check(kind, grad_z, "grad_z")
    if grad_z.shape != z.shape or rstd.shape != rstd_shape(z):
        raise ValueError(
            f"grad_z {tuple(grad_z.shape)}, z {tuple(z.shape)} and rstd {tuple(rstd.shape)} do not match"
        )
    dx = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    if z.numel() == 0:
        return dx
    N = z.shape[-1]
    M = z.numel() // N
    rows, block_n, one_tile, num_warps = _launch_config(M, N, max_block_n)
    _normalize_backward_kernel[(triton.cdiv(M, rows),)](
        grad_z.contiguous(), z.contiguous(), rstd.float().contiguous(), dx, M, N,
        IS_RMS=kind == "rms", ROWS=rows, BLOCK_N=block_n, ONE_TILE=one_tile, num_warps=num_warps,
    )
    return dx
