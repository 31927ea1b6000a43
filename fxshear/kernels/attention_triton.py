"""Triton kernels for ``fxshear::attention``: flash-style forward, probability-free backward.

Forward (one program per ``BLOCK_M`` query rows of one (batch, head)): online softmax over
``BLOCK_N`` key blocks, writes the output and the fp32 row log-sum-exp; the ``[q, k]``
probabilities never reach global memory.  With dropout the kept/dropped flags come from a
precomputed 1-bit mask, drawn by ``fxshear::attention_dropout_draw`` with ``aten.native_dropout``
(so the RNG is used exactly as eager dropout uses it).

Backward, without the output (it is not saved) and without the probabilities:

1. ``_attn_bwd_dq_kernel`` (query-major): a first sweep over the keys rebuilds
   ``p = exp(S - lse)`` and gives, per row, ``1 / sum(p)`` and
   ``delta = sum(P * dP)`` (what FlashAttention gets from ``rowsum(dO * O)``); the
   renormalisation keeps rows whose mask is all ``finfo.min`` uniform, where
   ``lse = finfo.min + log(Sk)`` has rounded back to ``finfo.min``.  A second sweep
   accumulates ``dq``.  Both row statistics go to a small fp32 scratch buffer.
2. ``_attn_bwd_dkdv_kernel`` (key-major): for its key block, a sweep over the queries
   accumulates ``dv = Pdᵀ dO`` and ``dk = dSᵀ q · scale``.

Deterministic: no atomics.  Dots run in the inputs' dtype with fp32 accumulation (``ieee`` for
fp32 inputs, as torch's default matmul on GPUs); the softmax and its gradient are fp32.

Layout: q, k, v, grad_out, mask are read through their strides (HF's
``view(B, S, H, D).transpose(1, 2)`` needs no copy; a broadcast mask has stride 0).  The outputs
are contiguous, as the torch path's.  Head dims up to 128, padded to a power of two >= 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxshear.kernels.infra.triton_helpers import cast_fp32_to
from fxshear.kernels.attention_reference import TRITON_DTYPES, TRITON_MAX_HEAD_DIM, dropout_scale
from fxshear.kernels.infra.bits import packed_numel as packed_bits_numel

NUM_WARPS = 4


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """``a @ b`` with fp32 accumulation.  Interpreted: exact upcast to fp32 first, because the
    Triton interpreter multiplies bf16 operands as their raw uint16 bits."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even: natively on a GPU; by hand in the
    interpreter, which truncates fp32 -> bf16."""
    if INTERPRETED:
        return cast_fp32_to(x, dtype)
    else:
        return x.to(dtype)


@triton.jit
def _scores_block(
    q, k, mask_base, smm, smn, offs_m, offs_n, valid, scale,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """``(q kᵀ) · scale + mask`` for one [BLOCK_M, BLOCK_N] tile, in fp32."""
    s = _dot(q, tl.trans(k), DOT_PRECISION, INTERPRETED) * scale
    if HAS_MASK:
        bias = tl.load(mask_base + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=valid, other=0.0)
        s = s + bias.to(tl.float32)
    return s


@triton.jit
def _scores_block_t(
    q_t, k, mask_base, smm, smn, offs_m, offs_n, valid_t, scale,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """The same tile transposed, ``[BLOCK_N, BLOCK_M]``, from ``q`` loaded transposed: the dk/dv
    kernel works on transposed tiles so that no computed tile is transposed (for fp32 on a GPU
    ``tl.trans`` of an FMA-dot result made ptxas put the kernel's tiles on the stack)."""
    s_t = _dot(k, q_t, DOT_PRECISION, INTERPRETED) * scale
    if HAS_MASK:
        bias = tl.load(mask_base + offs_n[:, None] * smn + offs_m[None, :] * smm, mask=valid_t, other=0.0)
        s_t = s_t + bias.to(tl.float32)
    return s_t


@triton.jit
def _keep_block_t(bits_ptr, row_base, offs_m, offs_n, SK, valid_t):
    """:func:`_keep_block` for the transposed ``[BLOCK_N, BLOCK_M]`` tile."""
    e = (row_base + offs_m[None, :].to(tl.int64)) * SK + offs_n[:, None]
    byte = tl.load(bits_ptr + (e >> 3), mask=valid_t, other=0).to(tl.int32)
    return ((byte >> (e & 7).to(tl.int32)) & 1) != 0


@triton.jit
def _keep_block(bits_ptr, row_base, offs_m, offs_n, SK, valid):
    """Kept flags of a tile: element ((bh * Sq + m) * Sk + n) sits in bit e % 8 of byte e // 8."""
    e = (row_base + offs_m[:, None].to(tl.int64)) * SK + offs_n[None, :]
    byte = tl.load(bits_ptr + (e >> 3), mask=valid, other=0).to(tl.int32)
    return ((byte >> (e & 7).to(tl.int32)) & 1) != 0


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK, BITS, OUT, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sob, soh, som, sod,
    H, SQ, SK, HEAD_D, HEAD_DV,
    scale, drop_scale,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < SQ
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    mask_base = MASK + b * smb + h * smh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, SK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        valid = m_ok[:, None] & n_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        s = _scores_block(q, k, mask_base, smm, smn, offs_m, offs_n, valid, scale, HAS_MASK, DOT_PRECISION, INTERPRETED)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only -inf, subtract 0 instead: exp(-inf - -inf) would be NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _keep_block(BITS, pid_bh * SQ, offs_m, offs_n, SK, valid)
            p = p * tl.where(keep, drop_scale, 0.0)
        acc = acc * alpha[:, None] + _dot(_cast(p, V.dtype.element_ty, INTERPRETED), v, DOT_PRECISION, INTERPRETED)
        m_i = m_new

    out = acc / l_i[:, None]  # a row of all -inf: 0 / 0 = NaN, as eager softmax gives
    lse = m_i + tl.log(l_i)
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             _cast(out, OUT.dtype.element_ty, INTERPRETED), mask=m_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + pid_bh * SQ + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, MASK, BITS, LSE, DO, DQ, RINV, DELTA,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, SQ, SK, HEAD_D, HEAD_DV,
    scale, drop_scale,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < SQ
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + pid_bh * SQ + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    mask_base = MASK + b * smb + h * smh

    # Sweep 1: row sums of exp(S - lse) (1 up to rounding) and of p * dP.
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_dot = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, SK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        valid = m_ok[:, None] & n_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        s = _scores_block(q, k, mask_base, smm, smn, offs_m, offs_n, valid, scale, HAS_MASK, DOT_PRECISION, INTERPRETED)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, INTERPRETED)
        if HAS_DROPOUT:
            keep = _keep_block(BITS, pid_bh * SQ, offs_m, offs_n, SK, valid)
            dp = dp * tl.where(keep, drop_scale, 0.0)
        row_sum += tl.sum(p, 1)
        row_dot += tl.sum(p * dp, 1)
    rinv = tl.where(m_ok, 1.0 / row_sum, 0.0)
    delta = row_dot * rinv
    tl.store(RINV + pid_bh * SQ + offs_m, rinv, mask=m_ok)
    tl.store(DELTA + pid_bh * SQ + offs_m, delta, mask=m_ok)

    # Sweep 2: dq = (P * (dP - delta)) k · scale.
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, SK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        valid = m_ok[:, None] & n_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        s = _scores_block(q, k, mask_base, smm, smn, offs_m, offs_n, valid, scale, HAS_MASK, DOT_PRECISION, INTERPRETED)
        p = tl.where(valid, tl.exp(s - lse[:, None]) * rinv[:, None], 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, INTERPRETED)
        if HAS_DROPOUT:
            keep = _keep_block(BITS, pid_bh * SQ, offs_m, offs_n, SK, valid)
            dp = dp * tl.where(keep, drop_scale, 0.0)
        ds = p * (dp - delta[:, None]) * scale
        dq += _dot(_cast(ds, K.dtype.element_ty, INTERPRETED), k, DOT_PRECISION, INTERPRETED)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             _cast(dq, DQ.dtype.element_ty, INTERPRETED), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, MASK, BITS, LSE, DO, RINV, DELTA, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    H, SQ, SK, HEAD_D, HEAD_DV,
    scale, drop_scale,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < SK
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    mask_base = MASK + b * smb + h * smh
    row_base = pid_bh * SQ

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start_m in range(0, SQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < SQ
        valid_t = n_ok[:, None] & m_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        q_t = tl.load(q_base + offs_d[:, None] * sqd + offs_m[None, :] * sqm,
                      mask=d_ok[:, None] & m_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                     mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
        do_t = tl.load(do_base + offs_dv[:, None] * sdod + offs_m[None, :] * sdom,
                       mask=dv_ok[:, None] & m_ok[None, :], other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
        rinv = tl.load(RINV + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        # Transposed tiles [BLOCK_N, BLOCK_M]: Pᵀ, dPᵀ and dSᵀ come out of the dots ready for
        # dv += Pdᵀ dO and dk += dSᵀ q.
        s_t = _scores_block_t(q_t, k, mask_base, smm, smn, offs_m, offs_n, valid_t, scale,
                              HAS_MASK, DOT_PRECISION, INTERPRETED)
        # Padding rows and columns must be exact zeros (not NaN) before they meet the dots.
        p_t = tl.where(valid_t, tl.exp(s_t - lse[None, :]) * rinv[None, :], 0.0)
        dp_t = _dot(v, do_t, DOT_PRECISION, INTERPRETED)
        if HAS_DROPOUT:
            keep_t = _keep_block_t(BITS, row_base, offs_m, offs_n, SK, valid_t)
            # Multiplied, not selected: NaN probabilities stay NaN where dropped, as in eager.
            multiplier = tl.where(keep_t, drop_scale, 0.0)
            pd_t = p_t * multiplier
            dp_t = dp_t * multiplier
        else:
            pd_t = p_t
        dv += _dot(_cast(pd_t, DO.dtype.element_ty, INTERPRETED), do, DOT_PRECISION, INTERPRETED)
        ds_t = p_t * (dp_t - delta[None, :]) * scale
        dk += _dot(_cast(ds_t, Q.dtype.element_ty, INTERPRETED), q, DOT_PRECISION, INTERPRETED)
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             _cast(dk, DK.dtype.element_ty, INTERPRETED), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             _cast(dv, DV.dtype.element_ty, INTERPRETED), mask=n_ok[:, None] & dv_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


def _head_block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


#: (BLOCK_M, BLOCK_N, num_warps) per kernel, by input precision and head block: the largest
#: tiles that neither sm_80 nor sm_90 spills registers on with mask and dropout on, found by
#: compiling for both without a GPU (``python -m fxshear.kernels.aot --all``, table in
#: benchmarks/results/gpu/aot_compile.md).  fp32 multiplies with FMAs (ieee), so its tiles
#: live in registers and must be smaller than the 16-bit ones, which use tensor cores.
TILES: dict[tuple[str, int], dict[str, tuple[int, int, int]]] = {
    ("fp32", 32): {"fwd": (32, 32, 8), "dq": (32, 32, 8), "dkdv": (32, 16, 4)},
    ("fp32", 64): {"fwd": (32, 32, 8), "dq": (32, 16, 4), "dkdv": (32, 16, 4)},
    ("fp32", 128): {"fwd": (16, 16, 4), "dq": (16, 16, 4), "dkdv": (32, 16, 4)},
    ("16-bit", 32): {"fwd": (64, 64, 8), "dq": (64, 64, 8), "dkdv": (32, 32, 4)},
    ("16-bit", 64): {"fwd": (32, 64, 4), "dq": (32, 64, 4), "dkdv": (64, 32, 4)},
    ("16-bit", 128): {"fwd": (32, 32, 4), "dq": (64, 32, 4), "dkdv": (32, 32, 4)},
}


def _config(q: torch.Tensor, v: torch.Tensor, kernel: str, block_m: int | None, block_n: int | None) -> dict:
    """Launch constexprs of ``kernel`` ("fwd", "dq" or "dkdv"); ``block_m``/``block_n``
    override the tiles (tests use small ones to exercise the loops)."""
    block_d, block_dv = _head_block(q.shape[-1]), _head_block(v.shape[-1])
    precision = "fp32" if q.dtype == torch.float32 else "16-bit"
    tile_m, tile_n, num_warps = TILES[(precision, max(32, block_d, block_dv))][kernel]
    return dict(
        BLOCK_M=block_m or tile_m,
        BLOCK_N=block_n or tile_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # On CPU the kernels can only run under TRITON_INTERPRET.
        INTERPRETED=q.device.type == "cpu",
        num_warps=num_warps if block_m is None and block_n is None else NUM_WARPS,
    )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q must be one of {TRITON_DTYPES}, got {q.dtype}")
    if q.shape[-1] > TRITON_MAX_HEAD_DIM or v.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {TRITON_MAX_HEAD_DIM}, got {q.shape[-1]} and {v.shape[-1]}")
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError("q, k and v must all be 3-D or 4-D")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The mask broadcast to the 4-D scores (stride 0 where it broadcasts), or q and zero strides."""
    if mask is None:
        return q, (0, 0, 0, 0)
    scores_shape = (*q.shape[:-1], k.shape[-2])
    mask4 = _as_4d(mask.expand(scores_shape))
    return mask4, tuple(mask4.stride())


def _drop_scale(dropout_p: float, dtype: torch.dtype) -> float:
    """``1 / (1 - p)`` rounded to the inputs' dtype, as eager's ``mask.to(dtype) * scale`` is."""
    return torch.tensor(dropout_scale(dropout_p), dtype=dtype).item()


def attention_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, lse)`` as :func:`fxshear.kernels.attention.attention` does.

    ``bits`` is the packed dropout mask of ``attention_dropout_draw`` (None without dropout).
    ``block_m``/``block_n`` override the tile sizes (the tests use small ones).
    """
    _check_inputs(q, k, v)
    scores_shape = (*q.shape[:-1], k.shape[-2])
    numel = 1
    for size in scores_shape:
        numel *= size
    if dropout_p > 0 and (bits is None or bits.dtype != torch.uint8 or bits.numel() != packed_bits_numel(numel)):
        got = "None" if bits is None else f"{bits.dtype}[{bits.numel()}]"
        raise ValueError(f"bits must be uint8[{packed_bits_numel(numel)}], got {got}")

    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    if numel == 0 or out.numel() == 0:
        out.zero_()  # no keys: eager's probs @ v is an empty sum
        lse.fill_(float("-inf"))
        return out, lse

    q4, k4, v4, out4 = _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(out)
    batch, heads, sq, _ = q4.shape
    sk = k4.shape[2]
    mask4, mask_strides = _mask_args(mask, q, k)
    cfg = _config(q, v, "fwd", block_m, block_n)
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), batch * heads)
    _attn_fwd_kernel[grid](
        q4, k4, v4, mask4, bits if dropout_p > 0 else q4, out4, lse,
        *q4.stride(), *k4.stride(), *v4.stride(), *mask_strides, *out4.stride(),
        heads, sq, sk, q.shape[-1], v.shape[-1],
        float(scale), _drop_scale(dropout_p, q.dtype),
        HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0,
        **cfg,
    )
    return out, lse


def attention_backward_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dq, dk, dv)`` (contiguous, in the inputs' dtype) from q, k, v, mask, lse, bits."""
    _check_inputs(q, k, v)
    scores_shape = (*q.shape[:-1], k.shape[-2])
    numel = 1
    for size in scores_shape:
        numel *= size
    if dropout_p > 0 and (bits is None or bits.dtype != torch.uint8 or bits.numel() != packed_bits_numel(numel)):
        got = "None" if bits is None else f"{bits.dtype}[{bits.numel()}]"
        raise ValueError(f"bits must be uint8[{packed_bits_numel(numel)}], got {got}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"lse must be fp32 {tuple(q.shape[:-1])}, got {lse.dtype} {tuple(lse.shape)}")
    grad_out = grad_out.to(q.dtype)

    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if numel == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv

    q4, k4, v4, do4 = _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(grad_out)
    dq4, dk4, dv4 = _as_4d(dq), _as_4d(dk), _as_4d(dv)
    lse = lse.contiguous()
    batch, heads, sq, _ = q4.shape
    sk = k4.shape[2]
    mask4, mask_strides = _mask_args(mask, q, k)
    bits_arg = bits if dropout_p > 0 else q4
    rinv = torch.empty(batch * heads * sq, dtype=torch.float32, device=q.device)
    delta = torch.empty_like(rinv)
    flags = dict(HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0)
    sizes = (heads, sq, sk, q.shape[-1], v.shape[-1], float(scale), _drop_scale(dropout_p, q.dtype))

    cfg = _config(q, v, "dq", block_m, block_n)
    _attn_bwd_dq_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), batch * heads)](
        q4, k4, v4, mask4, bits_arg, lse, do4, dq4, rinv, delta,
        *q4.stride(), *k4.stride(), *v4.stride(), *mask_strides, *do4.stride(), *dq4.stride(),
        *sizes, **flags, **cfg,
    )
    cfg = _config(q, v, "dkdv", block_m, block_n)
    _attn_bwd_dkdv_kernel[(triton.cdiv(sk, cfg["BLOCK_N"]), batch * heads)](
        q4, k4, v4, mask4, bits_arg, lse, do4, rinv, delta, dk4, dv4,
        *q4.stride(), *k4.stride(), *v4.stride(), *mask_strides, *do4.stride(), *dk4.stride(),
        *dv4.stride(),
        *sizes, **flags, **cfg,
    )
    return dq, dk, dv
