"""``fxshear::shared_linear``: a Linear whose weight gradient is computed from the norm's saved ``z``.

Why: after ``x = z * gamma + beta`` (the affine of a LayerNorm/RMSNorm, see :mod:`norms`) eager
autograd saves ``z`` for the affine's backward and ``x`` for the Linear's weight gradient: two
copies of one activation.  Since ``x`` is ``z * gamma + beta``,

    grad_weight = g^T x = (g^T z) * gamma[None, :] + outer(g.sum(0), beta)

(rows of ``g`` and ``z`` are the flattened leading dims), so the Linear can save ``z``, ``gamma``
and ``beta`` instead of ``x``, and ``z`` is the only saved copy.

Op:
    shared_linear(x, z, gamma, beta, weight, bias, impl) -> F.linear(x, weight, bias)

The caller guarantees ``x == z * gamma + beta`` (broadcast on the last dim; ``gamma`` None means
1, ``beta`` None means 0).  The forward is ``F.linear`` itself (bit for bit eager).  The backward
returns gradients for ``x``, ``weight`` and ``bias`` only, and skips those not needed (frozen
weights, no bias, an ``x`` that needs no gradient); ``z``, ``gamma`` and ``beta`` get none: their
gradients flow through ``x``.  The backward is aten math in the autograd formula, which
AOTAutograd traces, so no separate backward op or CPU lowering is needed.  ``impl`` is checked
and carried for uniformity with the other ops; there is no Triton path (the work is matmuls).
"""

from __future__ import annotations

import torch

from .dispatch import IMPLS


def _check(x: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
           weight: torch.Tensor, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if x.dim() == 0 or x.shape != z.shape:
        raise ValueError(f"x {tuple(x.shape)} and z {tuple(z.shape)} must have one shape (at least 1-D)")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None and t.shape != (x.shape[-1],):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},), got {tuple(t.shape)}")


@torch.library.custom_op("fxshear::shared_linear", mutates_args=())
def shared_linear(
    x: torch.Tensor,
    z: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    impl: str,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; its backward reads ``z``, ``gamma`` and ``beta``, not ``x``."""
    _check(x, z, gamma, beta, weight, impl)
    return torch.nn.functional.linear(x, weight, bias)


@shared_linear.register_fake
def _shared_linear_fake(
    x: torch.Tensor,
    z: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    impl: str,
) -> torch.Tensor:
    _check(x, z, gamma, beta, weight, impl)
    return torch.nn.functional.linear(x, weight, bias)


def shared_linear_backward(
    grad: torch.Tensor,
    z: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    weight: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x, grad_weight, grad_bias)``, each None when ``needs`` says it is not wanted.

    Matmuls run in the inputs' dtype (fp32 accumulation, as torch's); the few elementwise terms
    that combine ``g^T z`` with ``gamma`` and ``beta`` run in fp32 and are rounded once.
    """
    need_x, need_weight, need_bias = needs
    out_features = weight.shape[0]
    grad_x = grad_weight = grad_bias = None
    if need_x:
        grad_x = grad.matmul(weight)
    if need_weight or need_bias:
        g2 = grad.reshape(-1, out_features)
        if need_bias:
            grad_bias = g2.sum(0)
        if need_weight:
            gz = g2.t().matmul(z.reshape(-1, z.shape[-1]))
            if gamma is None and beta is None:
                grad_weight = gz
            else:
                acc = gz.float()
                if gamma is not None:
                    acc = acc * gamma.float()
                if beta is not None:
                    g_sum = g2.sum(0, dtype=torch.float32)
                    acc = acc + g_sum[:, None] * beta.float()[None, :]
                grad_weight = acc.to(weight.dtype)
            if grad_weight.dtype != weight.dtype:
                grad_weight = grad_weight.to(weight.dtype)
    return grad_x, grad_weight, grad_bias


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    _, z, gamma, beta, weight, bias, _ = inputs
    ctx.save_for_backward(z, gamma, beta, weight)  # not x: z * gamma + beta stands in for it
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    z, gamma, beta, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_weight, grad_bias = shared_linear_backward(
        grad, z, gamma, beta, weight, (needs[0], needs[4], ctx.has_bias and needs[5])
    )
    return grad_x, None, None, None, grad_weight, grad_bias, None


shared_linear.register_autograd(_backward, setup_context=_setup_context)
