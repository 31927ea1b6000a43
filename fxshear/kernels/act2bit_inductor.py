"""The aten math ``fxshear::act2bit`` is lowered to on CPU after partitioning (see ``lowering``).

Why after partitioning: the op must stay opaque until the min-cut has run, or the partitioner
would save the dense pre-activation again (DESIGN §2).  Once forward and backward are split,
what is saved is fixed, and the op is only a kernel: an eager fallback call costs ~10 passes
over the activation, while the same math as aten pointwise ops lets Inductor's C++ backend
fuse GELU into the matmul epilogue and compare-and-pack 4 codes per byte in one loop.

On CUDA the op keeps its Triton kernels; this pass only rewrites CPU nodes.
"""

from __future__ import annotations

import torch

from . import act2bit as _ops  # noqa: F401  (registers the ops lowered here)
from .act2bit_reference import STEPS
from .lowering import register_cpu_lowering


def _fp32(value: float) -> float:
    """The value as torch uses it against an fp32 tensor, exactly representable in fp32."""
    return float(torch.tensor(value, dtype=torch.float32))


# Rounded once here: a torch.tensor() call inside a traced function would become a constant.
_THRESHOLDS = {kind: tuple(_fp32(c) for c in steps.thresholds) for kind, steps in STEPS.items()}
_LEVELS = {kind: tuple(_fp32(v) for v in steps.levels) for kind, steps in STEPS.items()}


def fused_forward(x: torch.Tensor, kind: str, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's forward as traceable aten math: the activation and its packed codes."""
    y = torch.nn.functional.gelu(x, approximate=approximate) if kind == "gelu" else torch.nn.functional.silu(x)
    c1, c2, c3 = _THRESHOLDS[kind]
    xf = x.float()
    codes = (xf > c1).to(torch.uint8) + (xf > c2).to(torch.uint8) + (xf > c3).to(torch.uint8)
    flat = codes.reshape(-1)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    lanes = flat.view(-1, 4)
    packed = lanes[:, 0] | (lanes[:, 1] << 2) | (lanes[:, 2] << 4) | (lanes[:, 3] << 6)
    return y, packed


def fused_backward(grad: torch.Tensor, packed: torch.Tensor, kind: str) -> torch.Tensor:
    """The op's backward as traceable aten math: ``grad * level[code]`` in fp32."""
    _, a1, a12, a123 = _LEVELS[kind]
    shifts = torch.arange(4, dtype=torch.uint8, device=packed.device) * 2
    codes = ((packed.unsqueeze(1) >> shifts) & 3).reshape(-1)[: grad.numel()].view(grad.shape)
    slope = torch.where(codes == 3, a123, torch.where(codes == 2, a12, torch.where(codes == 1, a1, 0.0)))
    return (grad.float() * slope).to(grad.dtype)


@register_cpu_lowering(torch.ops.fxshear.act2bit.default)
def _lower_forward(x: torch.Tensor, kind: str, approximate: str, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_forward(x, kind, approximate)


@register_cpu_lowering(torch.ops.fxshear.act2bit_backward.default)
def _lower_backward(grad: torch.Tensor, packed: torch.Tensor, kind: str, impl: str) -> torch.Tensor:
    return fused_backward(grad, packed, kind)
