"""Training-mode dropout that keeps its mask as 1 bit per element, drawn apart from applied.

Why custom ops: eager dropout saves a dense mask (CPU: the scaled noise tensor in the input's
dtype; CUDA: a bool mask), 8 to 32 bits per element.  Which elements were kept is all the
backward needs, so the mask is packed 8 to a byte and the gradient is rebuilt from the bits.

Why two ops: the draw is random and must run once, in the forward, in eager's order (it is
pinned there, see ``graph/partitioner.py``); the application is deterministic, so under a
memory budget the partitioner may recompute the dropout's output in the backward from its
input and the bits instead of saving it.

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
    dropout_draw(x, p, impl) -> bits             the mask F.dropout(x, p) would draw, uint8[ceil(numel / 8)]
    dropout_apply(x, bits, p, impl) -> y         y = x * mask / (1 - p) as eager computes it; also
                                                 the gradient (the op is its own adjoint)
    dropout_bits(x, p, impl) -> (y, bits)        the two together (a Python function)

Bit order: element ``i`` (row-major logical order) is bit ``i % 8`` of byte ``i // 8``; 1 means
kept; the pad bits of the last byte are 0.

Only ``dropout_apply`` has a CPU lowering: the draw uses random numbers, and Inductor would
re-seed them and change the masks.
"""

from __future__ import annotations

import math
import struct

import torch

from ..options import DROPOUT_RNG_CHOICES
from . import rng_native
from .infra.bits import BITS_PER_BYTE, pack_bits, pack_bits_now, packed_numel, unpack_bits  # noqa: F401  (re-exported)
from .infra.dispatch import IMPLS, triton_switch  # noqa: F401  (IMPLS re-exported)
from .infra.lowering import register_cpu_lowering

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


def _laid_out_like(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t``'s values with ``torch.empty_like(like)``'s strides (what the fake kernels promise)."""
    out = torch.empty_like(like)
    if out.stride() == t.stride() and t.data_ptr() != like.data_ptr():
        return t
    return out.copy_(t)


_use_triton = triton_switch("dropout_bits_triton")


def _check_bits(bits: torch.Tensor, numel: int) -> None:
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != packed_numel(numel):
        raise ValueError(
            f"bits must be a 1-D uint8 tensor of {packed_numel(numel)} bytes for {numel} elements, "
            f"got {bits.dtype} with shape {tuple(bits.shape)}"
        )


def draw_mask(noise: torch.Tensor, p: float, impl: str) -> torch.Tensor:
    """The packed mask eager ``F.dropout`` draws for a tensor laid out like ``noise``.

    ``noise`` stands for the dropout input: only its shape, dtype, device and strides matter
    (its values are ignored).  Eager's draw depends on nothing else, so the
    generator moves exactly as eager's does.  p == 0, p == 1 and empty tensors draw nothing.
    """
    _check_p(p)
    if fused_path(noise, p):
        _, keep = torch.ops.aten.native_dropout.default(noise, p, True)
        if _use_triton(noise, impl):
            from .dropout_bits_triton import pack_bits_triton

            return pack_bits_triton(keep)
        return pack_bits(keep)
    if p == 0.0 or noise.numel() == 0:
        return pack_bits_now(torch.ones(noise.shape, dtype=torch.bool, device=noise.device))
    if p == 1.0:
        return pack_bits_now(torch.zeros(noise.shape, dtype=torch.bool, device=noise.device))
    # A bool scratch with the noise tensor's strides draws the same flags from the same generator
    # state as eager's float noise (one uniform double per element, in the same order; the MKL
    # path draws ints and converts), and skips writing 4 bytes per element and a comparison.
    keep = torch.empty_like(noise, dtype=torch.bool).bernoulli_(1.0 - p)
    return pack_bits_now(keep)


# nondeterministic_seeded: the compiler must not recompute a draw (a new mask); see
# graph/partitioner.py: pin_ops.  The tag does not stop AOTAutograd's CSE from merging two draws
# with equal arguments (its list of random ops is aten's), nor a scheduler from swapping two
# independent ones: ``after``, the previous draw's bits, makes every draw distinct and ordered
# (passes/draw_order.py threads it through a graph).
@torch.library.custom_op("fxshear::dropout_draw", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_draw(x: torch.Tensor, p: float, impl: str, rng: str = "eager",
                 after: torch.Tensor | None = None) -> torch.Tensor:
    """The mask ``F.dropout(x, p, training=True)`` would draw now, packed 8 per byte.

    Only x's shape, dtype, device and strides matter.  Drawing is split from applying
    (:func:`dropout_apply`) so that the draw alone has to run in the forward: a compiler may
    recompute the dropout's output in the backward from x and these bits.

    ``rng="fast"`` promises no particular stream, only a mask with keep probability ``1 - p``:
    on CPU a vectorized C Philox kernel (:mod:`.rng_native`, ~0.8 ns per element; without a C
    compiler the compiler's own fused random numbers, see :func:`fast_mask`), where eager's CPU
    draw is a serial Mersenne-Twister loop (about 11 ns per element).
    ``after`` is read by nobody: it only orders this draw after the one that made it.
    """
    check_rng(rng)
    if rng == "fast":
        return fast_draw(x, p)
    return draw_mask(torch.empty_like(x), p, impl)


@dropout_draw.register_fake
def _dropout_draw_fake(x: torch.Tensor, p: float, impl: str, rng: str = "eager",
                       after: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((packed_numel(x.numel()),), dtype=torch.uint8)


RNG_CHOICES = DROPOUT_RNG_CHOICES


def check_rng(rng: str) -> None:
    if rng not in RNG_CHOICES:
        raise ValueError(f"rng must be one of {RNG_CHOICES}, got {rng!r}")


def fast_mask(like: torch.Tensor, p: float, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A packed keep-mask with keep probability ``1 - p`` from ``torch.rand`` (traceable)."""
    _check_p(p)
    size = like.shape if shape is None else shape
    keep = torch.rand(size, dtype=torch.float32, device=like.device) < (1.0 - p)
    return pack_bits(keep)


def fast_draw(like: torch.Tensor, p: float, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The body of a ``rng="fast"`` draw: the C Philox kernel on CPU (:mod:`.rng_native`), else
    :func:`fast_mask`."""
    _check_p(p)
    if rng_native.usable(like.device) and type(like) is torch.Tensor:
        return rng_native.bernoulli_bits(math.prod(like.shape if shape is None else shape), 1.0 - p)
    return fast_mask(like, p, shape)


def lowers_fast_draw(rng_position: int):  # noqa: ANN201 - a `when` predicate
    """A lowering condition: inline a draw as Inductor's ``rand`` only where it is ``rng="fast"``
    and the C kernel, which is faster, would not run it (the node then stays an opaque call)."""

    def when(args: tuple, kwargs: dict) -> bool:
        rng = kwargs.get("rng", args[rng_position] if len(args) > rng_position else "eager")
        like = getattr(args[0], "meta", {}).get("val")
        return rng == "fast" and (like is None or not rng_native.usable(like.device))

    return when


@register_cpu_lowering(torch.ops.fxshear.dropout_draw.default, when=lowers_fast_draw(3), uses_rng=True)
def _lower_fast_draw(x: torch.Tensor, p: float, impl: str, rng: str = "eager",
                     after: torch.Tensor | None = None) -> torch.Tensor:
    return fast_mask(x, p)


@torch.library.custom_op("fxshear::dropout_apply", mutates_args=())
def dropout_apply(x: torch.Tensor, bits: torch.Tensor, p: float, impl: str) -> torch.Tensor:
    """Dropout with a given mask: eager's output for that mask, ``x * mask / (1 - p)`` bit for bit.

    It is also eager's gradient of dropout (the same product with the incoming gradient), so the
    op is its own adjoint and its backward is a second call.  Deterministic: no RNG.
    """
    _check_p(p)
    _check_bits(bits, x.numel())
    if _use_triton(x, impl) and fused_path(x, p):
        from .dropout_bits_triton import dropout_backward_triton

        return _laid_out_like(x, dropout_backward_triton(x, bits, p))
    return _laid_out_like(x, apply_math(x, bits, p))


@dropout_apply.register_fake
def _dropout_apply_fake(x: torch.Tensor, bits: torch.Tensor, p: float, impl: str) -> torch.Tensor:
    _check_bits(bits, x.numel())
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    _, bits, p, impl = inputs
    ctx.save_for_backward(bits)
    ctx.p = p
    ctx.impl = impl


def _backward(ctx, grad_y: torch.Tensor):  # noqa: ANN001, ANN202
    (bits,) = ctx.saved_tensors
    return dropout_apply(grad_y, bits, ctx.p, ctx.impl), None, None, None


dropout_apply.register_autograd(_backward, setup_context=_setup_context)


def dropout_bits(x: torch.Tensor, p: float, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode dropout: ``(y, bits)``, eager-equal y and mask, the mask packed 8 per byte.

    Autograd keeps only the bits for backward.
    """
    bits = dropout_draw(x, p, impl)
    return dropout_apply(x, bits, p, impl), bits


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, impl: str = "auto") -> torch.Tensor:
    """``F.dropout`` whose backward keeps 1 bit per element; identity when not training."""
    if not training:
        return x
    return dropout_bits(x, p, impl)[0]


def apply_math(x: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout_apply`` as traceable aten math, equal to eager bit for bit on every device.

    The fused (CUDA) path is ``native_dropout_backward``, which computes ``mask * x * scale`` in
    fp32 exactly as ``native_dropout``'s forward does.  Elsewhere ``noise_value`` is eager's noise
    as a constant, so ``x * noise`` is the same fp32 (or fp64) product rounded once to ``x``'s
    dtype whether it runs eagerly or fused by Inductor.
    """
    _check_p(p)
    if fused_path(x, p):
        keep = unpack_bits(bits, x.numel()).view(x.shape)
        return torch.ops.aten.native_dropout_backward.default(x, keep, native_scale(p))
    if p == 0.0:
        return x.clone()
    if p == 1.0:
        return x * 0.0
    keep = unpack_bits(bits, x.numel()).view(x.shape)
    # where() rather than keep * noise: a noise of inf (fp16, p > 1 - 2**-16) times 0 would be NaN.
    return torch.where(keep, x * noise_value(p, x.dtype), x * 0.0)


@register_cpu_lowering(torch.ops.fxshear.dropout_apply.default)
def _lower_apply(x: torch.Tensor, bits: torch.Tensor, p: float, impl: str) -> torch.Tensor:
    return apply_math(x, bits, p)
