"""Pruned saved activations (Back Razor): a Linear's forward is dense, its saved input is sparse.

Why: a Linear saves its whole input ``x`` for one purpose, the weight gradient ``gᵀ x``.  Keeping
only the largest ``keep_ratio`` of each sample's entries (per-sample magnitude top-k) cuts that
saved tensor several-fold; the input gradient ``g W`` does not read ``x`` and stays exact.

Storage (static shapes, so nothing recompiles and ``dynamic=True`` works): a sample is one index
of x's first dim (a 1-D x is one sample), ``n`` its element count and ``k = keep_count(n, ratio)``.

* ``values`` ``[samples, k]`` in x's dtype: the kept entries of each sample in row-major order;
* ``bits`` ``uint8[samples, ceil(n / 8)]``: which entries were kept, element ``j`` of a sample in
  bit ``j % 8`` of byte ``j // 8`` (the layout of :mod:`.bits`, one padded row per sample).

Exactly ``k`` entries are kept per sample: those whose magnitude is above the k-th largest, then
ties at it in index order.  A NaN counts as the largest magnitude (its value is kept as NaN).

Ops:
    prune_pack(x, keep_ratio, impl) -> (values, bits)
    pruned_linear(x, values, bits, weight, bias, impl) -> F.linear(x, weight, bias)
        its backward reads (values, bits, weight), never x
    pruned_weight_grad(grad, values, bits, in_features, impl) -> gradᵀ · unpruned(x)

``impl`` as everywhere in fxshear: "auto" (Triton on CUDA when usable), "torch", "triton".  On
CPU, "auto" runs the C kernels of :mod:`.prune_native` (fp32/fp16/bf16, when they build), which
give the reference's results bit for bit in a fraction of its passes; otherwise (``impl="torch"``,
other dtypes, no compiler) ``prune_pack`` and ``pruned_weight_grad`` are lowered after
partitioning to the aten math below (see :mod:`.lowering`) so Inductor fuses them.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from . import prune_native
from .infra.bits import BITS_PER_BYTE, pack_bits, packed_numel, unpack_bits
from .infra.dispatch import triton_switch
from .infra.lowering import register_cpu_lowering
from .prune_reference import check_keep_ratio, keep_count, samples_and_size


def _check_packed(values: torch.Tensor, bits: torch.Tensor, samples: int, n: int) -> None:
    if values.dim() != 2 or values.shape[0] != samples or values.shape[1] > n:
        raise ValueError(f"values must be [samples={samples}, k<={n}], got {tuple(values.shape)}")
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (samples, packed_numel(n)):
        raise ValueError(f"bits must be uint8[{samples}, {packed_numel(n)}], got {bits.dtype} {tuple(bits.shape)}")


_use_triton = triton_switch("prune_triton")


# ---------------------------------------------------------------------------------------------
# Reference math (CPU path and CPU lowering)
# ---------------------------------------------------------------------------------------------


def keep_mask(rows: torch.Tensor, k: int) -> torch.Tensor:
    """bool ``[samples, n]``: exactly ``k`` entries of each row, by magnitude, ties in index order."""
    n = rows.shape[1]
    if k >= n:
        return torch.ones_like(rows, dtype=torch.bool)
    magnitude = rows.abs()
    magnitude = torch.where(magnitude.isnan(), torch.full_like(magnitude, float("inf")), magnitude)
    # The k-th largest magnitude.  topk over kthvalue: the same value, ~25% faster on CPU.
    threshold = magnitude.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = magnitude > threshold
    tied = magnitude == threshold
    still_needed = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (_running_count(tied) <= still_needed))


def _running_count(mask: torch.Tensor) -> torch.Tensor:
    """Inclusive running count of a bool ``[samples, n]`` along rows, as int32.

    int32 suffices (a row of a pruned tensor is far below 2**31 entries) and the CPU scan is
    3-4x faster than cumsum's default int64 (1.3 vs 4.7 ms on 3M entries, 2-core Xeon).
    """
    return mask.to(torch.int32).cumsum(dim=1, dtype=torch.int32)  # the cast fuses into mask's kernel


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """``uint8[samples, ceil(n / 8)]``: each row of a bool mask packed on its own."""
    samples, n = mask.shape
    pad = packed_numel(n) * BITS_PER_BYTE - n
    if pad:
        mask = F.pad(mask, (0, pad))
    return pack_bits(mask).view(samples, packed_numel(n))


def unpack_rows(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The bool ``[samples, n]`` mask of :func:`pack_rows`."""
    samples, num_bytes = bits.shape
    return unpack_bits(bits, samples * num_bytes * BITS_PER_BYTE).view(samples, -1)[:, :n]


def prune_pack_reference(x: torch.Tensor, keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, bits)`` of the module docstring, as traceable aten math with static shapes."""
    samples, n = samples_and_size(x)
    k = keep_count(n, keep_ratio)
    rows = x.reshape(samples, n)
    mask = keep_mask(rows, k)
    # Each kept entry goes to its rank among the kept ones; dropped entries to a spare slot k.
    slot = torch.where(mask, _running_count(mask) - 1, k).long()
    values = rows.new_zeros((samples, k + 1)).scatter(1, slot, rows)[:, :k]
    return values.contiguous(), pack_rows(mask)


def unprune_reference(values: torch.Tensor, bits: torch.Tensor, n: int) -> torch.Tensor:
    """Dense ``[samples, n]``: the kept values in place, zeros elsewhere."""
    mask = unpack_rows(bits, n)
    k = values.shape[1]
    if k == 0:
        return values.new_zeros(mask.shape)
    rank = (_running_count(mask) - 1).clamp(0, k - 1).long()
    return torch.where(mask, values.gather(1, rank), values.new_zeros(()))


def pruned_weight_grad_reference(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor,
                                 in_features: int, unprune=unprune_reference) -> torch.Tensor:  # noqa: ANN001
    """``gradᵀ · x̂`` with x̂ the unpruned input, rows flattened: ``[out_features, in_features]``.

    ``unprune(values, bits, n)`` reads the pack back dense (the native kernel on CPU)."""
    out_features = grad.shape[-1]
    grad_rows = grad.reshape(-1, out_features)
    n = grad_rows.shape[0] * in_features // bits.shape[0]
    dense = unprune(values, bits, n).reshape(-1, in_features)
    return grad_rows.t().matmul(dense)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fxshear::prune_pack", mutates_args=())
def prune_pack(x: torch.Tensor, keep_ratio: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top-``keep_ratio`` of x by magnitude: ``(values [samples, k], bits)``."""
    check_keep_ratio(keep_ratio)
    if _use_triton(x, impl):
        from .prune_triton import prune_pack_triton

        return prune_pack_triton(x, keep_ratio)
    if prune_native.usable_for(x, impl):
        samples, n = samples_and_size(x)
        return prune_native.prune_pack(x.reshape(samples, n), keep_count(n, keep_ratio))
    return prune_pack_reference(x, keep_ratio)


@prune_pack.register_fake
def _prune_pack_fake(x: torch.Tensor, keep_ratio: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_keep_ratio(keep_ratio)
    samples, n = samples_and_size(x)
    k = keep_count(n, keep_ratio)
    return x.new_empty((samples, k)), x.new_empty((samples, packed_numel(n)), dtype=torch.uint8)


def _prune_pack_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    ctx.mark_non_differentiable(*output)


def _prune_pack_backward(ctx, grad_values: torch.Tensor | None, grad_bits: torch.Tensor | None):  # noqa: ANN001, ANN202
    # The pruned copy only feeds weight gradients; no gradient flows back through it to x.
    return None, None, None


prune_pack.register_autograd(_prune_pack_backward, setup_context=_prune_pack_setup_context)


@torch.library.custom_op("fxshear::pruned_weight_grad", mutates_args=())
def pruned_weight_grad(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, in_features: int,
                       impl: str) -> torch.Tensor:
    """A Linear's weight gradient from its pruned saved input (no dense copy on the Triton path)."""
    rows = grad.reshape(-1, grad.shape[-1]).shape[0]
    samples = bits.shape[0]
    if samples == 0 or (rows * in_features) % samples:
        raise ValueError(f"{rows} rows of {in_features} features do not split into {samples} samples")
    _check_packed(values, bits, samples, rows * in_features // samples)
    if _use_triton(grad, impl):
        from .prune_triton import pruned_weight_grad_triton

        return pruned_weight_grad_triton(grad, values, bits, in_features)
    if prune_native.usable_for(values, impl):
        return pruned_weight_grad_reference(grad, values, bits, in_features, prune_native.unprune)
    return pruned_weight_grad_reference(grad, values, bits, in_features)


@pruned_weight_grad.register_fake
def _pruned_weight_grad_fake(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, in_features: int,
                             impl: str) -> torch.Tensor:
    return grad.new_empty((grad.shape[-1], in_features))


@torch.library.custom_op("fxshear::pruned_linear", mutates_args=())
def pruned_linear(x: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, impl: str) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; its backward reads ``(values, bits)`` = prune_pack(x), not x.

    The caller guarantees that ``values`` and ``bits`` come from ``prune_pack`` of this ``x``.
    """
    _check_packed(values, bits, *samples_and_size(x))
    return F.linear(x, weight, bias)


@pruned_linear.register_fake
def _pruned_linear_fake(x: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, impl: str) -> torch.Tensor:
    _check_packed(values, bits, *samples_and_size(x))
    return F.linear(x, weight, bias)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    x, values, bits, weight, bias, impl = inputs
    ctx.save_for_backward(values, bits, weight)  # not x: that is the point
    ctx.in_features = x.shape[-1]
    ctx.has_bias = bias is not None
    ctx.impl = impl


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    values, bits, weight = ctx.saved_tensors
    need_x, _, _, need_weight, need_bias, _ = ctx.needs_input_grad
    grad_x = grad.matmul(weight) if need_x else None
    grad_weight = (pruned_weight_grad(grad, values, bits, ctx.in_features, ctx.impl).to(weight.dtype)
                   if need_weight else None)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias and ctx.has_bias else None
    return grad_x, None, None, grad_weight, grad_bias, None


pruned_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# CPU lowering (after partitioning)
# ---------------------------------------------------------------------------------------------


def runs_torch_math(tensor_position: int, impl_position: int):  # noqa: ANN201 - a `when` predicate
    """A lowering condition: inline the op only where it would not run the native C kernel.

    The C kernel is faster than anything Inductor makes of the reference math, so a node whose
    tensor at ``tensor_position`` it takes stays an (opaque) op call.
    """

    def when(args: tuple, kwargs: dict) -> bool:
        tensor = args[tensor_position].meta.get("val")
        impl = args[impl_position] if len(args) > impl_position else kwargs.get("impl", "auto")
        return tensor is None or not prune_native.usable(tensor.device, tensor.dtype, impl)

    return when


@register_cpu_lowering(torch.ops.fxshear.prune_pack.default, when=runs_torch_math(0, 2))
def _lower_prune_pack(x: torch.Tensor, keep_ratio: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return prune_pack_reference(x, keep_ratio)


@register_cpu_lowering(torch.ops.fxshear.pruned_weight_grad.default, when=runs_torch_math(1, 4))
def _lower_pruned_weight_grad(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, in_features: int,
                              impl: str) -> torch.Tensor:
    return pruned_weight_grad_reference(grad, values, bits, in_features)
