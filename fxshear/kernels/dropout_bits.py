"""``fxshear::dropout_bits``: training-mode dropout that keeps its mask as 1 bit per element.

Why a custom op: eager dropout saves a dense mask (CPU: the scaled noise tensor in the input's
dtype; CUDA: a bool mask), 8 to 32 bits per element.  Which elements were kept is all the
backward needs, so this op packs it 8 to a byte and its backward rebuilds the gradient from
the bits.

Eager equality.  The op reproduces eager ``torch.nn.functional.dropout(x, p, training=True)``
exactly (output, mask, gradient, and how much of the global generator it consumes), by running
the same aten calls eager runs.  Eager itself takes two paths (``at::dropout``):

* the fused path (``is_fused_kernel_acceptable``: CUDA/XPU/lazy/privateuse1 tensors, 0 < p < 1,
  numel > 0) calls ``native_dropout``, whose backward is ``native_dropout_backward``
  (``grad * mask * scale``, ``scale = 1 / (1 - p)`` as a double);
* everywhere else, CPU included, ``_dropout``: ``noise = empty_like(x).bernoulli_(1 - p)``,
  ``noise.div_(1 - p)``, ``y = x * noise``; its gradient is ``grad * noise``.  p == 0 (or an
  empty x) returns x untouched and draws nothing; p == 1 returns ``x * 0`` and draws nothing.

On CPU the two paths draw the same mask from the same generator state, but their outputs can
differ in the last bit (fp32, p = 0.123: ``x * fl(1 / fl(1 - p))`` against
``x * fl(1 / (1 - p))``), so the CPU path runs ``_dropout``'s sequence, not ``native_dropout``.

Ops:
    dropout_bits(x, p, impl) -> (y, bits)              bits uint8[ceil(numel / 8)]
    dropout_bits_backward(grad, bits, p, impl) -> dx   dx = grad * mask / (1 - p), as eager

Bit order: element ``i`` (row-major logical order) is bit ``i % 8`` of byte ``i // 8``; 1 means
kept; the pad bits of the last byte are 0.

Only the backward has a CPU lowering: the forward draws random numbers, and Inductor would
re-seed them and change the masks.
"""

from __future__ import annotations

import struct

import torch

from .bits import BITS_PER_BYTE, pack_bits, packed_numel, unpack_bits  # noqa: F401  (re-exported)
from .dispatch import IMPLS, use_triton  # noqa: F401  (IMPLS re-exported)
from .lowering import register_cpu_lowering

def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def fused_path(t: torch.Tensor, p: float) -> bool:
    """Whether eager ``F.dropout`` runs ``native_dropout`` for ``t`` (``is_fused_kernel_acceptable``)."""
    return t.device.type in ("cuda", "xpu", "lazy", "privateuseone") and 0.0 < p < 1.0 and t.numel() > 0


def native_scale(p: float) -> float:
    """The double ``native_dropout_backward`` is called with by eager autograd."""
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _round_fp32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _round_fp16(value: float) -> float:
    try:
        return struct.unpack("<e", struct.pack("<e", value))[0]
    except OverflowError:
        return float("inf")


def _round_bf16(value: float) -> float:
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # to nearest even
    return struct.unpack("<f", struct.pack("<I", rounded & 0xFFFFFFFF))[0]


def noise_value(p: float, dtype: torch.dtype) -> float:
    """The value of a kept element of eager's CPU noise tensor, ``fl(1 / (1 - p))`` in ``dtype``.

    Computed in Python so that traced code can use it as a constant: ``ones.div_(1 - p)`` runs in
    the op math type (fp32 for fp16/bf16), dividing by ``1 - p`` rounded to it, and the quotient
    is then rounded to ``dtype``.  (A double quotient of two floats rounded to fp32 is the
    correctly rounded fp32 quotient.)
    """
    if dtype == torch.float64:
        return 1.0 / (1.0 - p)
    quotient = _round_fp32(1.0 / _round_fp32(1.0 - p))
    if dtype == torch.float16:
        return _round_fp16(quotient)
    if dtype == torch.bfloat16:
        return _round_bf16(quotient)
    return quotient


def dropout_reference(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, keep_mask)`` drawn exactly as eager ``F.dropout(x, p, training=True)`` draws them."""
    _check_p(p)
    if fused_path(x, p):
        return torch.ops.aten.native_dropout.default(x, p, True)
    if p == 0.0 or x.numel() == 0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    if p == 1.0:
        return x * x.new_zeros(()), torch.zeros_like(x, dtype=torch.bool)
    noise = torch.empty_like(x)
    noise.bernoulli_(1.0 - p)
    noise.div_(1.0 - p)
    return x * noise, noise != 0


def dropout_backward_reference(grad: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Eager's gradient of ``F.dropout`` from the bool keep mask (shaped like ``grad``)."""
    _check_p(p)
    if fused_path(grad, p):
        return torch.ops.aten.native_dropout_backward.default(grad, keep, native_scale(p))
    if p == 0.0 or grad.numel() == 0:
        return grad.clone()
    if p == 1.0:
        return grad * grad.new_zeros(())
    noise = keep.to(grad.dtype)
    noise.div_(1.0 - p)  # rebuilds eager's noise tensor bit for bit
    return grad * noise


def _laid_out_like(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t``'s values with ``torch.empty_like(like)``'s strides (what the fake kernels promise)."""
    out = torch.empty_like(like)
    if out.stride() == t.stride() and t.data_ptr() != like.data_ptr():
        return t
    return out.copy_(t)


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    return use_triton(t, impl, "dropout_bits_triton")


def _check_bits(bits: torch.Tensor, numel: int) -> None:
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != packed_numel(numel):
        raise ValueError(
            f"bits must be a 1-D uint8 tensor of {packed_numel(numel)} bytes for {numel} elements, "
            f"got {bits.dtype} with shape {tuple(bits.shape)}"
        )


# nondeterministic_seeded: the compiler must neither merge two calls nor move one across another
# random op, or the draws would leave eager's order.
@torch.library.custom_op("fxshear::dropout_bits", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_bits(x: torch.Tensor, p: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode dropout: ``(y, bits)``, eager-equal y and mask, the mask packed 8 per byte."""
    _check_p(p)
    if _use_triton(x, impl) and fused_path(x, p):
        from .dropout_bits_triton import pack_bits_triton

        y, keep = torch.ops.aten.native_dropout.default(x, p, True)
        return _laid_out_like(x, y), pack_bits_triton(keep)
    y, keep = dropout_reference(x, p)
    return _laid_out_like(x, y), pack_bits(keep)


@dropout_bits.register_fake
def _dropout_bits_fake(x: torch.Tensor, p: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty((packed_numel(x.numel()),), dtype=torch.uint8)


@torch.library.custom_op("fxshear::dropout_bits_backward", mutates_args=())
def dropout_bits_backward(grad: torch.Tensor, bits: torch.Tensor, p: float, impl: str) -> torch.Tensor:
    """Eager's dropout gradient, ``grad * mask / (1 - p)``, from the packed mask."""
    _check_p(p)
    _check_bits(bits, grad.numel())
    if _use_triton(grad, impl) and fused_path(grad, p):
        from .dropout_bits_triton import dropout_backward_triton

        return _laid_out_like(grad, dropout_backward_triton(grad, bits, p))
    keep = unpack_bits(bits, grad.numel()).view(grad.shape)
    return _laid_out_like(grad, dropout_backward_reference(grad, keep, p))


@dropout_bits_backward.register_fake
def _dropout_bits_backward_fake(grad: torch.Tensor, bits: torch.Tensor, p: float, impl: str) -> torch.Tensor:
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    _, p, impl = inputs
    _, bits = output
    ctx.save_for_backward(bits)
    ctx.p = p
    ctx.impl = impl
    ctx.mark_non_differentiable(bits)


def _backward(ctx, grad_y: torch.Tensor, grad_bits: torch.Tensor | None):  # noqa: ANN001, ANN202
    (bits,) = ctx.saved_tensors
    return dropout_bits_backward(grad_y, bits, ctx.p, ctx.impl), None, None


dropout_bits.register_autograd(_backward, setup_context=_setup_context)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, impl: str = "auto") -> torch.Tensor:
    """``F.dropout`` whose backward keeps 1 bit per element; identity when not training."""
    if not training:
        return x
    return dropout_bits(x, p, impl)[0]


def fused_backward(grad: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """The CPU backward as traceable aten math, equal to the op bit for bit (eagerly evaluated).

    ``noise_value`` is eager's noise as a constant, so ``grad * noise`` is the same fp32 (or fp64)
    product rounded once to ``grad``'s dtype whether it runs eagerly or fused by Inductor.
    """
    if p == 0.0:
        return grad.clone()
    if p == 1.0:
        return grad * 0.0
    keep = unpack_bits(bits, grad.numel()).view(grad.shape)
    # where() rather than keep * noise: a noise of inf (fp16, p > 1 - 2**-16) times 0 would be NaN.
    return torch.where(keep, grad * noise_value(p, grad.dtype), grad * 0.0)


@register_cpu_lowering(torch.ops.fxshear.dropout_bits_backward.default)
def _lower_backward(grad: torch.Tensor, bits: torch.Tensor, p: float, impl: str) -> torch.Tensor:
    return fused_backward(grad, bits, p)
