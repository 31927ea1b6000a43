"""``fxshear::attention``: eager/"math" attention that saves no probabilities for backward.

Why: Hugging Face's eager attention (BERT, GPT-2, LLaMA, ViT) traces to
``matmul(q, kᵀ) · scale [+ mask] → softmax → [cast] → [dropout] → matmul(·, v)`` and autograd
then keeps the ``[batch, heads, q, k]`` probabilities (and, with dropout, the dropped-out
probabilities and a byte-per-element mask) alive until backward.  This op keeps only q, k, v
(saved anyway for the matmul gradients), the fp32 row log-sum-exp and a 1-bit dropout mask,
and rebuilds the probabilities in backward.

Ops:
    attention_dropout_draw(q, k, dropout_p, impl) -> bits
    attention(q, k, v, mask, bits, scale, dropout_p, impl) -> (out, lse)
    attention_backward(grad_out, q, k, v, mask, lse, bits, scale, dropout_p, impl) -> (dq, dk, dv)

The random draw is its own op, as for plain dropout (``dropout_bits``): ``attention`` itself is
deterministic, so under a memory budget the partitioner may recompute it in the backward from
q, k, v and the bits; only the draw is pinned to the forward.

Semantics (the torch path is the reference; the Triton kernels are tested against it):

* q ``[B, H, Sq, D]``, k ``[B, H, Sk, D]``, v ``[B, H, Sk, Dv]`` (or 3-D ``[N, S, D]``), any
  strides, one float dtype.  ``mask`` is an additive float mask (any float dtype) broadcastable
  to ``[B, H, Sq, Sk]``, or None; it never gets a gradient.
* Scores ``S = (q kᵀ) · scale + mask`` and the softmax are computed in fp32; the probabilities
  are cast to q's dtype before dropout and the ·v matmul.  For fp32 models this is exactly the
  eager pattern (bit for bit when the model multiplies by the scale); for half precision it
  mirrors LLaMA's ``softmax(dtype=float32).to(q.dtype)``.
* Dropout (``dropout_p > 0``): ``attention_dropout_draw`` makes the aten calls eager
  ``F.dropout`` makes on this device (``native_dropout`` on CUDA, ``bernoulli_`` noise on CPU;
  see ``dropout_bits``) for a probabilities tensor of the eager shape and dtype, so the global
  RNG is consumed exactly as eager consumes it and the masks are the same.  ``bits`` is that
  mask, 1 bit per element, little-endian: element ``i`` of the contiguous ``[B, H, Sq, Sk]``
  sits in bit ``i % 8`` of byte ``i // 8`` (1 = kept).  ``attention`` applies it to the
  probabilities as eager dropout does (``dropout_apply``), so the outputs are eager's too.
  With ``dropout_p == 0`` ``bits`` is None.
* ``lse = logsumexp(S, -1)`` in fp32, ``[B, H, Sq]``.  It is what the Triton backward rebuilds
  the probabilities from.  The torch backward recomputes ``softmax(S)`` instead: that is the
  forward's probabilities bit for bit, and it keeps rows whose mask is all ``finfo.min``
  uniform, as eager is (``finfo.min + log(Sk)`` rounds back to ``finfo.min`` in fp32, so
  ``exp(S - lse)`` alone would give 1 instead of ``1/Sk`` there; the Triton backward
  renormalises each row for the same reason).  Rows of all ``-inf`` give NaN, as in eager.

``impl`` is "auto" (Triton on CUDA when importable and the shapes are supported), "torch" or
"triton"; it is an argument, not global state, so it is part of the traced graph.

After partitioning, CPU calls of ``attention`` and ``attention_backward`` are lowered to the
same aten math (see :mod:`.lowering`) so Inductor fuses it.  The draw stays an opaque kernel:
an RNG call inlined into the graph would be re-seeded by Inductor and break the eager-equal
masks.
"""

from __future__ import annotations

import torch

from .infra.bits import BITS_PER_BYTE, pack_bits, packed_numel  # noqa: F401  (re-exported)
from .infra.bits import unpack_bits as unpack_flat
from .infra.dispatch import use_triton
from .dropout_bits import apply_math, check_rng, draw_mask, fast_draw, fast_mask, lowers_fast_draw
from .infra.lowering import register_cpu_lowering
from .attention_reference import TRITON_DTYPES, TRITON_MAX_HEAD_DIM, dropout_scale  # noqa: F401  (re-exported)



# ---------------------------------------------------------------------------------------------
# 1-bit mask packing
# ---------------------------------------------------------------------------------------------


packed_bits_numel = packed_numel


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The flags of :func:`pack_bits` as a bool tensor of ``shape`` (traceable aten math)."""
    numel = 1
    for size in shape:
        numel = numel * size
    return unpack_flat(bits, numel).view(shape)


# ---------------------------------------------------------------------------------------------
# Argument checks and shapes
# ---------------------------------------------------------------------------------------------


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> None:
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [batch, heads, q_len, head_dim] (or 3-D), got shape {tuple(q.shape)}")
    if k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"q, k and v must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            f"q, k and v must share their batch dimensions, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v sequence lengths differ: {k.shape[-2]} vs {v.shape[-2]}")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or (mask is not None and mask.device != q.device):
        raise ValueError("q, k, v and mask must be on one device")
    if mask is not None:
        if not mask.dtype.is_floating_point:
            raise ValueError(f"mask must be an additive float mask, got {mask.dtype}")
        scores_shape = (*q.shape[:-1], k.shape[-2])
        try:
            broadcasts = mask.dim() <= len(scores_shape) and (
                tuple(torch.broadcast_shapes(mask.shape, scores_shape)) == tuple(scores_shape)
            )
        except RuntimeError:
            broadcasts = False
        if not broadcasts:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the scores {tuple(scores_shape)}"
            )
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")


def _scores_numel(q: torch.Tensor, k: torch.Tensor) -> int:
    numel = k.shape[-2]
    for size in q.shape[:-1]:
        numel = numel * size
    return numel


def _check_bits(q: torch.Tensor, k: torch.Tensor, bits: torch.Tensor | None, dropout_p: float) -> None:
    if dropout_p == 0:
        if bits is not None:
            raise ValueError("bits must be None when dropout_p == 0")
        return
    num_bytes = packed_bits_numel(_scores_numel(q, k))
    if bits is None or bits.dtype != torch.uint8 or bits.dim() != 1 or bits.shape[0] != num_bytes:
        got = "None" if bits is None else f"{bits.dtype} {tuple(bits.shape)}"
        raise ValueError(f"bits must be uint8[{num_bytes}] (from attention_dropout_draw), got {got}")


def _triton_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.dtype in TRITON_DTYPES
        and q.shape[-1] <= TRITON_MAX_HEAD_DIM
        and v.shape[-1] <= TRITON_MAX_HEAD_DIM
    )


def _use_triton(q: torch.Tensor, v: torch.Tensor, impl: str) -> bool:
    if not use_triton(q, impl, "attention_triton"):
        return False
    if _triton_supported(q, v):
        return True
    if impl == "triton":
        raise ValueError(
            f"the Triton attention kernels take fp32/fp16/bf16 and head dims <= {TRITON_MAX_HEAD_DIM}, "
            f"got {q.dtype}, head dims {q.shape[-1]} and {v.shape[-1]}"
        )
    return False


# ---------------------------------------------------------------------------------------------
# The torch reference (also what the CPU lowering inlines)
# ---------------------------------------------------------------------------------------------


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``(q kᵀ) · scale + mask`` in fp32: the same ops as the eager pattern for fp32 inputs."""
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask.float()
    return scores


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward as traceable aten math (no RNG: the dropout mask is ``bits``)."""
    scores = attention_scores(q, k, mask, scale)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    lse = torch.logsumexp(scores, dim=-1)
    if dropout_p > 0:
        probs = apply_math(probs, bits, dropout_p)
    out = torch.matmul(probs, v).contiguous()
    return out, lse.contiguous()


def attention_backward_reference(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward as traceable aten math (no RNG, no data-dependent shapes).

    Mirrors eager autograd of the pattern: the dropout mask is applied as eager dropout applies
    it (forward and gradient alike, ``dropout_apply``), and the softmax gradient is taken in fp32.
    ``lse`` is not needed here (see the module docstring): ``softmax(S)`` is recomputed.
    """
    del lse
    dtype = q.dtype
    scores = attention_scores(q, k, mask, scale)
    probs = torch.softmax(scores, dim=-1)  # fp32, the forward's probabilities exactly
    probs_cast = probs.to(dtype)
    grad_out = grad_out.to(dtype)
    dropped = apply_math(probs_cast, bits, dropout_p) if dropout_p > 0 else probs_cast
    dv = torch.matmul(dropped.transpose(-2, -1), grad_out)
    grad_probs = torch.matmul(grad_out, v.transpose(-2, -1))
    if dropout_p > 0:
        grad_probs = apply_math(grad_probs, bits, dropout_p)
    grad_probs = grad_probs.float()
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
    grad_raw = (grad_scores * scale).to(dtype)
    dq = torch.matmul(grad_raw, k)
    dk = torch.matmul(grad_raw.transpose(-2, -1), q)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def scores_shape(q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
    """``[*batch, Sq, Sk]``: the shape of the probabilities a dropout mask covers."""
    return (*q.shape[:-1], k.shape[-2])


@torch.library.custom_op(
    "fxshear::attention_dropout_draw", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def attention_dropout_draw(q: torch.Tensor, k: torch.Tensor, dropout_p: float, impl: str,
                           rng: str = "eager", after: torch.Tensor | None = None) -> torch.Tensor:
    """The mask eager dropout of the attention probabilities of q and k would draw now, packed.

    Eager's probabilities are a fresh contiguous tensor in q's dtype, so the draw is made on a
    scratch tensor of that shape and dtype.  Tagged ``nondeterministic_seeded`` so that it is
    never recomputed (see ``graph/partitioner.py: pin_ops``); ``after`` (the previous draw's
    bits, unread) keeps draws distinct and in order (see ``dropout_draw``).
    ``rng="fast"``: any mask with keep probability ``1 - p`` (see ``dropout_draw``).
    """
    if not 0.0 < dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in (0, 1] to draw a mask, got {dropout_p}")
    check_rng(rng)
    if rng == "fast":
        return fast_draw(q, dropout_p, scores_shape(q, k))
    noise = torch.empty(scores_shape(q, k), dtype=q.dtype, device=q.device)
    return draw_mask(noise, dropout_p, impl)


@attention_dropout_draw.register_fake
def _attention_dropout_draw_fake(q: torch.Tensor, k: torch.Tensor, dropout_p: float, impl: str,
                                 rng: str = "eager", after: torch.Tensor | None = None) -> torch.Tensor:
    return q.new_empty((packed_bits_numel(_scores_numel(q, k)),), dtype=torch.uint8)


@register_cpu_lowering(torch.ops.fxshear.attention_dropout_draw.default, when=lowers_fast_draw(4), uses_rng=True)
def _lower_fast_attention_draw(q: torch.Tensor, k: torch.Tensor, dropout_p: float, impl: str,
                               rng: str = "eager", after: torch.Tensor | None = None) -> torch.Tensor:
    return fast_mask(q, dropout_p, scores_shape(q, k))


@torch.library.custom_op("fxshear::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and fp32 row log-sum-exp (see module doc); dropout with the mask ``bits``.

    Deterministic: with the same bits, a recompute gives the same output.
    """
    _check(q, k, v, mask, dropout_p)
    _check_bits(q, k, bits, dropout_p)
    if _use_triton(q, v, impl):
        from .attention_triton import attention_forward_triton

        return attention_forward_triton(q, k, v, mask, bits, scale, dropout_p)
    return attention_reference(q, k, v, mask, bits, scale, dropout_p)


@attention.register_fake
def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v, mask, dropout_p)
    _check_bits(q, k, bits, dropout_p)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


def _check_lse(q: torch.Tensor, lse: torch.Tensor) -> None:
    if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"lse must be fp32 of shape {tuple(q.shape[:-1])}, got {lse.dtype} {tuple(lse.shape)}")


@torch.library.custom_op("fxshear::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k and v, the probabilities rebuilt from q, k, mask (lse) and the bits."""
    _check(q, k, v, mask, dropout_p)
    _check_lse(q, lse)
    _check_bits(q, k, bits, dropout_p)
    if _use_triton(q, v, impl):
        from .attention_triton import attention_backward_triton

        return attention_backward_triton(grad_out, q, k, v, mask, lse, bits, scale, dropout_p)
    return attention_backward_reference(grad_out, q, k, v, mask, lse, bits, scale, dropout_p)


@attention_backward.register_fake
def _attention_backward_fake(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, v, mask, dropout_p)
    _check_lse(q, lse)
    _check_bits(q, k, bits, dropout_p)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    q, k, v, mask, bits, scale, dropout_p, impl = inputs
    _, lse = output
    if mask is not None and mask.requires_grad:
        raise ValueError("fxshear::attention does not differentiate its additive mask; detach it")
    ctx.save_for_backward(q, k, v, mask, lse, bits)
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.impl = impl
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):  # noqa: ANN001, ANN202
    q, k, v, mask, lse, bits = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out, q, k, v, mask, lse, bits, ctx.scale, ctx.dropout_p, ctx.impl)
    return dq, dk, dv, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def recompute_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask) [dropout] @ v`` keeping no probabilities for backward."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bits = attention_dropout_draw(q, k, float(dropout_p), impl) if dropout_p > 0 else None
    return attention(q, k, v, mask, bits, float(scale), float(dropout_p), impl)[0]


# ---------------------------------------------------------------------------------------------
# CPU lowering (after partitioning)
# ---------------------------------------------------------------------------------------------


@register_cpu_lowering(torch.ops.fxshear.attention.default)
def _lower_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aten math, Inductor-fused (the mask is an input: nothing random is inlined)."""
    return attention_reference(q, k, v, mask, bits, scale, dropout_p)


@register_cpu_lowering(torch.ops.fxshear.attention_backward.default)
def _lower_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    bits: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward_reference(grad_out, q, k, v, mask, lse, bits, scale, dropout_p)
