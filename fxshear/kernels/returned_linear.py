"""``fxshear::returned_linear``: an LM head whose logits are returned but rarely backpropagated.

Why: a Hugging Face causal LM returns its logits *and* its loss.  Once the fused loss
(``fxshear::linear_cross_entropy``) has taken the loss's gradients, the returned logits are
still a differentiable output of the compiled graph, and AOTAutograd cannot know at trace time
whether the caller will backpropagate through them: it hands the backward a tangent of zeros
when the caller does not, and the head's backward then runs two ``[tokens, vocab]`` matmuls on
those zeros, as expensive as the whole loss.  This op is ``F.linear`` whose backward is one
opaque kernel that first looks at the incoming gradient and, when it is all zeros, returns zero
gradients without any matmul.  When the caller does use the logits (a distillation term, say)
the gradients are exactly ``F.linear``'s.

Ops:
    returned_linear(x [..., H], weight [V, H], bias [V]?) -> y [..., V]     (saves x, weight)
    returned_linear_backward(grad [..., V], x, weight, need_x, need_weight, need_bias)
        -> (grad_x | [0], grad_weight | [0], grad_bias | [0])

The zero test reads the gradient once (``any``); on CUDA that is a host synchronisation in the
backward.  It is what makes the common case cost nothing, so it is taken on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _empty_like_nothing(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


@torch.library.custom_op("fxshear::returned_linear", mutates_args=())
def returned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; its backward skips the matmuls for an all-zero gradient."""
    return F.linear(x, weight, bias)


@returned_linear.register_fake
def _returned_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@torch.library.custom_op("fxshear::returned_linear_backward", mutates_args=())
def returned_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.linear``'s gradients, or zeros without a matmul when ``grad`` is all zeros."""
    out_features, in_features = weight.shape
    if not bool(grad.any()):
        return (torch.zeros_like(x) if need_x else _empty_like_nothing(x),
                torch.zeros_like(weight) if need_weight else _empty_like_nothing(weight),
                grad.new_zeros(out_features) if need_bias else _empty_like_nothing(grad))
    grad_2d = grad.reshape(-1, out_features)
    grad_x = grad.matmul(weight) if need_x else _empty_like_nothing(x)
    grad_weight = (grad_2d.t().matmul(x.reshape(-1, in_features)) if need_weight
                   else _empty_like_nothing(weight))
    grad_bias = grad_2d.sum(0) if need_bias else _empty_like_nothing(grad)
    return grad_x, grad_weight, grad_bias


@returned_linear_backward.register_fake
def _returned_linear_backward_fake(grad, x, weight, need_x, need_weight, need_bias):  # noqa: ANN001, ANN202
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            grad.new_empty(weight.shape[0]) if need_bias else grad.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad
    need_bias = need_bias and ctx.has_bias
    grad_x, grad_weight, grad_bias = torch.ops.fxshear.returned_linear_backward(
        grad, x, weight, need_x, need_weight, need_bias)
    return (grad_x if need_x else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None)


returned_linear.register_autograd(_backward, setup_context=_setup_context)
