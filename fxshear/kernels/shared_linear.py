"""``fxshear::shared_linear``: a Linear whose weight gradient is computed from the norm's saved ``z``.

Why: after ``x = z * gamma + beta`` (the affine of a LayerNorm/RMSNorm, see :mod:`norms`) eager
autograd saves ``z`` for the affine's backward and ``x`` for the Linear's weight gradient: two
copies of one activation.  Since ``x`` is ``z * gamma + beta``,

    grad_weight = g^T x = (g^T z) * gamma[None, :] + outer(g.sum(0), beta)

(rows of ``g`` and ``z`` are the flattened leading dims), so the Linear can save ``z``, ``gamma``
and ``beta`` instead of ``x``, and ``z`` is the only saved copy.

With a dropout between the norm and the Linear (PEFT LoRA's ``lora_dropout`` before LoRA A),
``x = dropout(z * gamma + beta)``: the mask is already kept at 1 bit per element
(``fxshear::dropout_draw``), so the backward rebuilds ``x`` from ``z``, ``gamma``, ``beta`` and
those bits (one elementwise pass) instead of keeping a second dense copy.

Ops:
    shared_linear(x, z, gamma, beta, weight, bias, impl, bits=None, p=0.0) -> F.linear(x, weight, bias)
    dropout_input_weight_grad(grad, z, gamma, beta, bits, p, impl) -> [out, in]
        the weight gradient behind a dropout (backward only; lowered to aten math on CPU)

The caller guarantees ``x == z * gamma + beta`` (broadcast on the last dim; ``gamma`` None means
1, ``beta`` None means 0), or ``x == fxshear::dropout_apply(z * gamma + beta, bits, p)`` when
``bits`` is given.  The forward is ``F.linear`` itself (bit for bit eager).  The backward
returns gradients for ``x``, ``weight`` and ``bias`` only, and skips those not needed (frozen
weights, no bias, an ``x`` that needs no gradient); ``z``, ``gamma`` and ``beta`` get none: their
gradients flow through ``x``.  Without a dropout the backward is aten math in the autograd
formula, which AOTAutograd traces.  Behind a dropout the weight gradient is one op,
``dropout_input_weight_grad``, lowered to aten math on CPU after partitioning and running
``dropout_apply`` (Triton on CUDA) plus a matmul elsewhere.  There is no Triton path of its
own (the work is matmuls).
"""

from __future__ import annotations

import torch

from .infra.dispatch import IMPLS
from .infra.lowering import register_cpu_lowering


def _check(x: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
           weight: torch.Tensor, impl: str, bits: torch.Tensor | None = None, p: float = 0.0) -> None:
    if bits is not None:
        from .dropout_bits import _check_bits

        _check_bits(bits, x.numel())
        if not 0.0 < p < 1.0:
            raise ValueError(f"a dropout mask needs 0 < p < 1, got p={p}")
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
    bits: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; its backward reads ``z``, ``gamma``, ``beta`` (and the
    dropout ``bits``), not ``x``."""
    _check(x, z, gamma, beta, weight, impl, bits, p)
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
    bits: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    _check(x, z, gamma, beta, weight, impl, bits, p)
    return torch.nn.functional.linear(x, weight, bias)


def shared_linear_backward(
    grad: torch.Tensor,
    z: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    weight: torch.Tensor,
    needs: tuple[bool, bool, bool],
    dropout: tuple[torch.Tensor, float, str] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x, grad_weight, grad_bias)``, each None when ``needs`` says it is not wanted.

    Matmuls run in the inputs' dtype (fp32 accumulation, as torch's); the few elementwise terms
    that combine ``g^T z`` with ``gamma`` and ``beta`` run in fp32 and are rounded once.  With
    ``dropout`` (bits, p, impl) the input is rebuilt as the forward computed it (the affine as
    the graph writes it, then the mask) and the weight gradient is ``g^T x`` itself.
    """
    if dropout is not None:
        return _through_dropout_backward(grad, z, gamma, beta, weight, needs, *dropout)
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


def _affine(z: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> torch.Tensor:
    """``z * gamma + beta`` with the ops the rewritten graph uses, so the rebuild equals the forward."""
    y = z
    if gamma is not None:
        y = torch.mul(y, gamma)
    if beta is not None:
        y = torch.add(y, beta)
    return y


def _grad_t_input(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gradᵀ · x`` over the flattened leading dims: a Linear's ``[out, in]`` weight gradient."""
    return grad.reshape(-1, grad.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))


@torch.library.custom_op("fxshear::dropout_input_weight_grad", mutates_args=())
def dropout_input_weight_grad(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None,
                              beta: torch.Tensor | None, bits: torch.Tensor, p: float, impl: str) -> torch.Tensor:
    """``gradᵀ · dropout(z * gamma + beta)`` over the flattened leading dims: ``[out, in]``.

    Why one op that takes the incoming gradient: the rebuilt input depends only on forward
    values, so as separate ops the min-cut would compute it in the forward and save it (a custom
    op may not be recomputed), which is the dense copy this rewrite exists to drop.
    """
    from .dropout_bits import dropout_apply

    return _grad_t_input(grad, dropout_apply(_affine(z, gamma, beta), bits, p, impl))


@dropout_input_weight_grad.register_fake
def _dropout_input_weight_grad_fake(grad, z, gamma, beta, bits, p, impl):  # noqa: ANN001, ANN202
    return grad.new_empty((grad.shape[-1], z.shape[-1]), dtype=torch.promote_types(grad.dtype, z.dtype))


def _lower_dropout_input_weight_grad(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None,
                                     beta: torch.Tensor | None, bits: torch.Tensor, p: float,
                                     impl: str) -> torch.Tensor:
    from .dropout_bits import apply_math

    return _grad_t_input(grad, apply_math(_affine(z, gamma, beta), bits, p))


register_cpu_lowering(torch.ops.fxshear.dropout_input_weight_grad.default)(_lower_dropout_input_weight_grad)


def _through_dropout_backward(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor | None,
                              beta: torch.Tensor | None, weight: torch.Tensor, needs: tuple[bool, bool, bool],
                              bits: torch.Tensor, p: float, impl: str,
                              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    need_x, need_weight, need_bias = needs
    grad_x = grad.matmul(weight) if need_x else None
    grad_bias = grad.reshape(-1, weight.shape[0]).sum(0) if need_bias else None
    grad_weight = None
    if need_weight:
        grad_weight = torch.ops.fxshear.dropout_input_weight_grad(grad, z, gamma, beta, bits, p, impl)
        grad_weight = grad_weight.to(weight.dtype)
    return grad_x, grad_weight, grad_bias


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    _, z, gamma, beta, weight, bias, impl = inputs[:7]
    bits = inputs[7] if len(inputs) > 7 else None
    # not x: z * gamma + beta (and the dropout bits) stand in for it
    ctx.save_for_backward(z, gamma, beta, weight, bits)
    ctx.has_bias = bias is not None
    ctx.p = inputs[8] if len(inputs) > 8 else 0.0
    ctx.impl = impl


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    z, gamma, beta, weight, bits = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dropout = (bits, ctx.p, ctx.impl) if bits is not None else None
    grad_x, grad_weight, grad_bias = shared_linear_backward(
        grad, z, gamma, beta, weight, (needs[0], needs[4], ctx.has_bias and needs[5]), dropout
    )
    return grad_x, None, None, None, grad_weight, grad_bias, None, None, None


shared_linear.register_autograd(_backward, setup_context=_setup_context)
