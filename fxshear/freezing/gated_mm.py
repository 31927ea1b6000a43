"""``fxshear::gated_mm``: a weight-gradient matmul that is skipped when its weight is frozen.

Why: per-step freezing (Sheared Backprop) changes which weights get a gradient every few steps.
Compiling one graph per freeze mask costs a full Inductor compile per mask (15-20 s for MiniLM
on two CPU cores, as long as 20 training steps), so fxshear compiles the all-gradients graph
once and puts each weight gradient's matmul behind this op.  At run time the freeze dispatcher
hands a frozen weight to the compiled graph *detached* (``requires_grad=False``); the op sees
that and returns zeros instead of multiplying, and autograd discards the gradient of an input
that does not require one, so the weight's ``.grad`` stays ``None``.

Ops:
    gated_mm(a [m, k], b [k, n], weight) -> a @ b, or zeros [m, n] when ``weight`` is frozen.
    gated_pruned_weight_grad(grad, values, bits, in_features, impl, weight)
        -> fxshear::pruned_weight_grad(...), or zeros when ``weight`` is frozen.
    gated_dropout_input_weight_grad(grad, z, gamma, beta, bits, p, impl, weight)
        -> fxshear::dropout_input_weight_grad(...) (a norm-fed Linear behind a dropout), or zeros.

``weight`` is only read for its ``requires_grad`` flag: it is the parameter whose gradient
this matmul produces, as the compiled forward received it.  It is never lowered to aten math:
the branch must stay a run-time decision.
"""

from __future__ import annotations

import torch

#: The matmul behind the gate (a name of its own so tests can count the calls that ran).
_matmul = torch.mm


@torch.library.custom_op("fxshear::gated_mm", mutates_args=())
def gated_mm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``a @ b``, or zeros when ``weight`` does not require a gradient (it is frozen this step)."""
    if not weight.requires_grad:
        return a.new_zeros(a.shape[0], b.shape[1])
    return _matmul(a, b)


@gated_mm.register_fake
def _gated_mm_fake(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    a, b, weight = inputs
    ctx.save_for_backward(a, b)
    ctx.open = weight.requires_grad


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    # Only reached when a gradient graph is itself differentiated (double backward): the
    # derivative of what the forward returned, a matmul or a constant.
    a, b = ctx.saved_tensors
    if not ctx.open:
        return None, None, None
    grad_a = grad.mm(b.t()) if ctx.needs_input_grad[0] else None
    grad_b = a.t().mm(grad) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


gated_mm.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fxshear::gated_pruned_weight_grad", mutates_args=())
def gated_pruned_weight_grad(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, in_features: int,
                             impl: str, weight: torch.Tensor) -> torch.Tensor:
    """A pruned Linear's weight gradient (``fxshear::pruned_weight_grad``), or zeros when frozen."""
    if not weight.requires_grad:
        return grad.new_zeros(grad.shape[-1], in_features)
    return torch.ops.fxshear.pruned_weight_grad(grad, values, bits, in_features, impl)


@gated_pruned_weight_grad.register_fake
def _gated_pruned_weight_grad_fake(grad: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, in_features: int,
                                   impl: str, weight: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(grad.shape[-1], in_features)


@torch.library.custom_op("fxshear::gated_dropout_input_weight_grad", mutates_args=())
def gated_dropout_input_weight_grad(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None,
                                    beta: torch.Tensor | None, bits: torch.Tensor, p: float, impl: str,
                                    weight: torch.Tensor) -> torch.Tensor:
    """The weight gradient of a Linear behind a dropout of a norm's output, or zeros when frozen."""
    if not weight.requires_grad:
        return grad.new_zeros(grad.shape[-1], z.shape[-1], dtype=torch.promote_types(grad.dtype, z.dtype))
    return torch.ops.fxshear.dropout_input_weight_grad(grad, z, gamma, beta, bits, p, impl)


@gated_dropout_input_weight_grad.register_fake
def _gated_dropout_input_weight_grad_fake(grad, z, gamma, beta, bits, p, impl, weight):  # noqa: ANN001, ANN202
    return grad.new_empty(grad.shape[-1], z.shape[-1], dtype=torch.promote_types(grad.dtype, z.dtype))
