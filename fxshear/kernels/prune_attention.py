"""Pruned saved tensors inside attention (Back Razor's opt-in targets): matmul operands, softmax output.

Why: where attention is not rebuilt in the backward (``attention_recompute=False``), eager
attention keeps ``q``, ``kᵀ``, the softmax output and the dropped-out probabilities dense for
its backward.  Back Razor prunes those saved copies too: the forward stays dense, and the
backward uses the per-sample top-``keep_ratio`` copy (approximate gradients, like a pruned
Linear's weight gradient; here the *input* gradients are approximate as well).

Storage is :mod:`.prune`'s (``values [samples, k]`` + ``bits``), a sample being one index of
the tensor's first dim.

Ops:
    pruned_matmul(a, b, a_values, a_bits, b_values, b_bits, impl) -> torch.matmul(a, b)
        batched, no broadcasting; its backward reads the packs, never a or b.  ``a``'s pack is
        needed only when ``b`` wants a gradient and vice versa (None otherwise).
    pruned_softmax(x, dim, keep_ratio, impl) -> (softmax(x, dim), values, bits)
        the packs are of the output, which the softmax backward reads in its place.
    grad_times_pruned_t(grad, values, bits, k, impl) -> grad @ b̂ᵀ, b̂ [..., k, n]  (backward only)
    pruned_t_times_grad(grad, values, bits, k, impl) -> âᵀ @ grad, â [..., m, k]  (backward only)
        (sizes as one int each, not a shape list: the CPU lowering traces them as SymInts)
    pruned_softmax_backward(grad, values, bits, dim, impl) -> softmax's dx  (backward only)

On CPU all are lowered to aten math after partitioning (:mod:`.lowering`); on CUDA the pack is
``prune_pack``'s Triton kernel and the dense read-back in the backward ops the Triton unprune
kernel, followed by cuBLAS batched matmuls.
"""

from __future__ import annotations

import torch

from . import prune_native
from .infra.dispatch import use_triton
from .infra.lowering import register_cpu_lowering
from .prune import (
    _check_packed,
    _prune_pack_fake,
    check_keep_ratio,
    prune_pack,
    prune_pack_reference,
    runs_torch_math,
    samples_and_size,
    unprune_reference,
)


def _per_sample(shape: list[int]) -> int:
    """Elements per sample of a tensor of ``shape`` (a sample is one index of the first dim)."""
    n = 1
    for size in shape[1:]:
        n = n * size
    return n


def _dense(values: torch.Tensor, bits: torch.Tensor, shape: list[int], impl: str) -> torch.Tensor:
    """The pruned tensor read back dense (kept values in place, zeros elsewhere), in ``shape``."""
    n = _per_sample(shape)
    if use_triton(values, impl, "prune_triton"):
        from .prune_triton import unprune_triton

        return unprune_triton(values, bits, n).view(shape)
    if prune_native.usable_for(values, impl):
        return prune_native.unprune(values, bits, n).view(shape)
    return unprune_reference(values, bits, n).view(shape)


def _check_shape_pack(values: torch.Tensor, bits: torch.Tensor, shape: list[int]) -> None:
    _check_packed(values, bits, shape[0], _per_sample(shape))


# The backward ops take the incoming gradient, so the min-cut cannot move the dense read-back
# into the forward and save it in place of the pack (it depends on forward values only).


def _right_shape(grad: torch.Tensor, k: int) -> list[int]:
    """The right operand's shape ``[..., k, n]`` from ``grad = dL/d(a @ b)``: ``[..., m, n]``."""
    return [*grad.shape[:-2], k, grad.shape[-1]]


def _left_shape(grad: torch.Tensor, k: int) -> list[int]:
    """The left operand's shape ``[..., m, k]`` from ``grad = dL/d(a @ b)``: ``[..., m, n]``."""
    return [*grad.shape[:-2], grad.shape[-2], k]


def _grad_times_pruned_t_math(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, k: int,
                              impl: str) -> torch.Tensor:
    return grad.matmul(_dense(values, bits, _right_shape(grad, k), impl).transpose(-1, -2))


def _pruned_t_times_grad_math(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, k: int,
                              impl: str) -> torch.Tensor:
    return _dense(values, bits, _left_shape(grad, k), impl).transpose(-1, -2).matmul(grad)


def _pruned_softmax_backward_math(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, dim: int,
                                  impl: str) -> torch.Tensor:
    return torch._softmax_backward_data(grad, _dense(values, bits, list(grad.shape), impl), dim, grad.dtype)


@torch.library.custom_op("fxshear::grad_times_pruned_t", mutates_args=())
def grad_times_pruned_t(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, k: int,
                        impl: str) -> torch.Tensor:
    """``grad @ b̂ᵀ``, b̂ the pruned ``[..., k, n]`` right operand: the left operand's gradient."""
    _check_shape_pack(values, bits, _right_shape(grad, k))
    return _grad_times_pruned_t_math(grad, values, bits, k, impl)


@grad_times_pruned_t.register_fake
def _grad_times_pruned_t_fake(grad, values, bits, k, impl):  # noqa: ANN001, ANN202
    return grad.new_empty((*grad.shape[:-1], k))


@torch.library.custom_op("fxshear::pruned_t_times_grad", mutates_args=())
def pruned_t_times_grad(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, k: int,
                        impl: str) -> torch.Tensor:
    """``âᵀ @ grad``, â the pruned ``[..., m, k]`` left operand: the right operand's gradient."""
    _check_shape_pack(values, bits, _left_shape(grad, k))
    return _pruned_t_times_grad_math(grad, values, bits, k, impl)


@pruned_t_times_grad.register_fake
def _pruned_t_times_grad_fake(grad, values, bits, k, impl):  # noqa: ANN001, ANN202
    return grad.new_empty((*grad.shape[:-2], k, grad.shape[-1]))


@torch.library.custom_op("fxshear::pruned_softmax_backward", mutates_args=())
def pruned_softmax_backward(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, dim: int,
                            impl: str) -> torch.Tensor:
    """Softmax's input gradient with the pruned output ŷ in place of y: ``ŷ ⊙ (g − Σ g ŷ)``."""
    _check_shape_pack(values, bits, list(grad.shape))
    return _pruned_softmax_backward_math(grad, values, bits, dim, impl)


@pruned_softmax_backward.register_fake
def _pruned_softmax_backward_fake(grad, values, bits, dim, impl):  # noqa: ANN001, ANN202
    return torch.empty_like(grad)


def _on_torch_path(math):  # noqa: ANN001, ANN202
    """A CPU lowering: the op's math with ``impl="torch"`` and no shape checks (they would guard)."""

    def lowered(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, size: int, impl: str) -> torch.Tensor:
        return math(grad, values, bits, size, "torch")

    return lowered


# Where the native C kernels take the call (fp32/fp16/bf16 with impl="auto"), the op stays opaque.
register_cpu_lowering(torch.ops.fxshear.grad_times_pruned_t.default, when=runs_torch_math(1, 4))(
    _on_torch_path(_grad_times_pruned_t_math))
register_cpu_lowering(torch.ops.fxshear.pruned_t_times_grad.default, when=runs_torch_math(1, 4))(
    _on_torch_path(_pruned_t_times_grad_math))
register_cpu_lowering(torch.ops.fxshear.pruned_softmax_backward.default, when=runs_torch_math(1, 4))(
    _on_torch_path(_pruned_softmax_backward_math))


def check_batched_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    """``pruned_matmul`` takes batched matmuls without broadcasting: [..., m, k] @ [..., k, n]."""
    if a.dim() < 3 or a.dim() != b.dim() or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"pruned_matmul needs [..., m, k] @ [..., k, n] with equal batch dims, "
                         f"got {tuple(a.shape)} @ {tuple(b.shape)}")


def _check_pack(name: str, x: torch.Tensor, values: torch.Tensor | None, bits: torch.Tensor | None) -> None:
    if (values is None) != (bits is None):
        raise ValueError(f"{name}_values and {name}_bits must both be given or both be None")
    if values is not None:
        _check_packed(values, bits, *samples_and_size(x))


@torch.library.custom_op("fxshear::pruned_matmul", mutates_args=())
def pruned_matmul(a: torch.Tensor, b: torch.Tensor, a_values: torch.Tensor | None, a_bits: torch.Tensor | None,
                  b_values: torch.Tensor | None, b_bits: torch.Tensor | None, impl: str) -> torch.Tensor:
    """``torch.matmul(a, b)``; the backward reads the packs of ``a`` and ``b``, not the operands."""
    check_batched_operands(a, b)
    _check_pack("a", a, a_values, a_bits)
    _check_pack("b", b, b_values, b_bits)
    return torch.matmul(a, b)


@pruned_matmul.register_fake
def _pruned_matmul_fake(a, b, a_values, a_bits, b_values, b_bits, impl):  # noqa: ANN001, ANN202
    check_batched_operands(a, b)
    return torch.matmul(a, b)


def _matmul_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    a, b, a_values, a_bits, b_values, b_bits, impl = inputs
    ctx.save_for_backward(a_values, a_bits, b_values, b_bits)  # not a, b: that is the point
    ctx.a_shape, ctx.b_shape, ctx.impl = list(a.shape), list(b.shape), impl


def _matmul_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    a_values, a_bits, b_values, b_bits = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    grad_a = grad_b = None
    if need_a:
        if b_values is None:
            raise RuntimeError("pruned_matmul: a needs a gradient but b's pack was not given")
        grad_a = torch.ops.fxshear.grad_times_pruned_t(grad, b_values, b_bits, ctx.b_shape[-2], ctx.impl)
    if need_b:
        if a_values is None:
            raise RuntimeError("pruned_matmul: b needs a gradient but a's pack was not given")
        grad_b = torch.ops.fxshear.pruned_t_times_grad(grad, a_values, a_bits, ctx.a_shape[-1], ctx.impl)
    return grad_a, grad_b, None, None, None, None, None


pruned_matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


@torch.library.custom_op("fxshear::pruned_softmax", mutates_args=())
def pruned_softmax(x: torch.Tensor, dim: int, keep_ratio: float,
                   impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(softmax(x, dim), values, bits)``: the output and its per-sample pruned pack."""
    check_keep_ratio(keep_ratio)
    y = torch.softmax(x, dim)
    values, bits = prune_pack(y, keep_ratio, impl)
    return y, values, bits


@pruned_softmax.register_fake
def _pruned_softmax_fake(x: torch.Tensor, dim: int, keep_ratio: float, impl: str):  # noqa: ANN202
    return (torch.empty_like(x), *_prune_pack_fake(x, keep_ratio, impl))


def _softmax_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    x, dim, _, impl = inputs
    _, values, bits = output
    ctx.mark_non_differentiable(values, bits)
    ctx.save_for_backward(values, bits)  # not the dense output
    ctx.dim, ctx.impl = dim, impl


def _softmax_backward(ctx, grad_y: torch.Tensor, grad_values, grad_bits):  # noqa: ANN001, ANN202
    values, bits = ctx.saved_tensors
    return torch.ops.fxshear.pruned_softmax_backward(grad_y, values, bits, ctx.dim, ctx.impl), None, None, None


pruned_softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup_context)


@register_cpu_lowering(torch.ops.fxshear.pruned_softmax.default, when=runs_torch_math(0, 3))
def _lower_pruned_softmax(x: torch.Tensor, dim: int, keep_ratio: float,
                          impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = torch.softmax(x, dim)
    return (y, *prune_pack_reference(y, keep_ratio))


register_cpu_lowering(torch.ops.fxshear.pruned_matmul.default)(
    lambda a, b, a_values, a_bits, b_values, b_bits, impl: torch.matmul(a, b))
