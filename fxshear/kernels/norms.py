"""``fxshear::normalize``: LayerNorm / RMSNorm that keep only their normalized output for backward.

Why (MS-LN / MS-RMSNorm): eager LayerNorm saves its input plus mean and rstd, and the affine
``z * weight + bias`` that follows saves ``z`` again for the weight gradient.  The input gradient
can be written with ``z`` instead of ``x``:

    layer:  z = (x - mean) * rstd     dx = rstd * (g - mean(g) - z * mean(g * z))
    rms:    z = x * rstd              dx = rstd * (g - z * mean(g * z))

(means over the last dim), so ``z`` and ``rstd`` (one fp32 per row) are all the backward needs,
and the caller's affine, the next Linear (see :mod:`shared_linear`) and this op share one ``z``.

Ops:
    normalize(x, kind, eps, impl) -> (z, rstd)         z in x.dtype, rstd fp32 [..., 1]
    normalize_backward(grad_z, z, rstd, kind, impl) -> dx   in z.dtype

Statistics are computed in fp32.  "layer" uses the biased variance, as ``F.layer_norm``; "rms"
is Hugging Face's LlamaRMSNorm bit for bit: ``h = x.float();
z = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps); z.to(x.dtype)``.  Both ops are lowered to
the same aten math on CPU after partitioning.
"""

from __future__ import annotations

import torch

from .infra.dispatch import IMPLS, triton_switch  # noqa: F401  (IMPLS re-exported)
from .infra.lowering import register_cpu_lowering
from .norms_reference import NORM_KINDS, rstd_shape

def _check_kind(kind: str) -> None:
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")


def _check_input(x: torch.Tensor) -> None:
    if x.dim() == 0:
        raise ValueError("normalize needs at least one dimension (it normalizes over the last)")
    if not x.is_floating_point():
        raise ValueError(f"normalize needs a floating point tensor, got {x.dtype}")


def normalize_reference(x: torch.Tensor, kind: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, rstd)`` as traceable aten math: statistics in fp32, z rounded once to x.dtype."""
    h = x.float()
    if kind == "rms":
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * rstd).to(x.dtype), rstd
    centered = h - h.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    return (centered * rstd).to(x.dtype), rstd


def normalize_backward_reference(
    grad_z: torch.Tensor, z: torch.Tensor, rstd: torch.Tensor, kind: str
) -> torch.Tensor:
    """dx from the saved ``z`` and ``rstd`` as traceable aten math, in fp32, returned in z.dtype."""
    g = grad_z.float()
    zf = z.float()
    projection = zf * (g * zf).mean(-1, keepdim=True)
    if kind == "layer":
        inner = g - g.mean(-1, keepdim=True) - projection
    else:
        inner = g - projection
    return (rstd * inner).to(z.dtype)


_use_triton = triton_switch("norms_triton")


def _contiguous_copy(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``t`` in a fresh contiguous tensor of ``shape`` (the layout the fake kernels promise)."""
    if t.is_contiguous() and t.shape == shape and t.dtype == dtype:
        return t
    return torch.empty(shape, dtype=dtype, device=t.device).copy_(t)


@torch.library.custom_op("fxshear::normalize", mutates_args=())
def normalize(x: torch.Tensor, kind: str, eps: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm ("layer") or RMSNorm ("rms") without affine: ``(z, rstd)``, both contiguous."""
    _check_kind(kind)
    _check_input(x)
    if _use_triton(x, impl) and x.numel() > 0:
        from .norms_triton import normalize_forward_triton

        return normalize_forward_triton(x, kind, eps)
    z, rstd = normalize_reference(x.contiguous(), kind, eps)  # both fresh tensors, never x
    return _contiguous_copy(z, tuple(x.shape), x.dtype), _contiguous_copy(rstd, rstd_shape(x), torch.float32)


@normalize.register_fake
def _normalize_fake(x: torch.Tensor, kind: str, eps: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kind(kind)
    _check_input(x)
    return (
        x.new_empty(x.shape),
        x.new_empty(rstd_shape(x), dtype=torch.float32),
    )


@torch.library.custom_op("fxshear::normalize_backward", mutates_args=())
def normalize_backward(
    grad_z: torch.Tensor, z: torch.Tensor, rstd: torch.Tensor, kind: str, impl: str
) -> torch.Tensor:
    """``dx`` of :func:`normalize` from ``grad_z`` and the saved ``z`` and ``rstd``; contiguous."""
    _check_kind(kind)
    if grad_z.shape != z.shape or rstd.shape != rstd_shape(z):
        raise ValueError(
            f"grad_z {tuple(grad_z.shape)}, z {tuple(z.shape)} and rstd {tuple(rstd.shape)} do not match"
        )
    if _use_triton(z, impl) and z.numel() > 0:
        from .norms_triton import normalize_backward_triton

        return normalize_backward_triton(grad_z, z, rstd, kind)
    dx = normalize_backward_reference(grad_z, z, rstd.float(), kind)
    return _contiguous_copy(dx, tuple(z.shape), z.dtype)


@normalize_backward.register_fake
def _normalize_backward_fake(
    grad_z: torch.Tensor, z: torch.Tensor, rstd: torch.Tensor, kind: str, impl: str
) -> torch.Tensor:
    _check_kind(kind)
    return z.new_empty(z.shape)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    _, kind, _, impl = inputs
    z, rstd = output
    ctx.save_for_backward(z, rstd)
    ctx.kind = kind
    ctx.impl = impl
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, grad_z: torch.Tensor, grad_rstd: torch.Tensor | None):  # noqa: ANN001, ANN202
    z, rstd = ctx.saved_tensors
    return normalize_backward(grad_z, z, rstd, ctx.kind, ctx.impl), None, None, None


normalize.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    impl: str = "auto",
) -> torch.Tensor:
    """``F.layer_norm`` over the last dim whose backward keeps only ``z`` (and rstd)."""
    z = normalize(x, "layer", eps, impl)[0]
    if weight is not None:
        z = z * weight
    if bias is not None:
        z = z + bias
    return z


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, impl: str = "auto"
) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm (``weight * z``) whose backward keeps only ``z`` (and rstd)."""
    z = normalize(x, "rms", eps, impl)[0]
    return z if weight is None else weight * z


@register_cpu_lowering(torch.ops.fxshear.normalize.default)
def _lower_normalize(x: torch.Tensor, kind: str, eps: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return normalize_reference(x, kind, eps)


@register_cpu_lowering(torch.ops.fxshear.normalize_backward.default)
def _lower_normalize_backward(
    grad_z: torch.Tensor, z: torch.Tensor, rstd: torch.Tensor, kind: str, impl: str
) -> torch.Tensor:
    return normalize_backward_reference(grad_z, z, rstd.float(), kind)
