"""The aten math ``fxshear::act2bit`` is lowered to on CPU after partitioning (see ``lowering``).

Why after partitioning: the op must stay opaque until the min-cut has run, or the partitioner
would save the dense pre-activation again (docs/design.md §2).  Once forward and backward are split,
what is saved is fixed, and the op is only a kernel: an eager fallback call costs ~10 passes
over the activation, while the same math as aten pointwise ops lets Inductor's C++ backend
fuse GELU into the matmul epilogue and compare-and-pack 4 codes per byte in one vectorized
loop (the planar code layout of ``act2bit_reference.pack_codes`` is chosen for this).

On CUDA the op keeps its Triton kernels; this pass only rewrites CPU nodes.
"""

from __future__ import annotations

import torch

from . import act2bit as _ops  # noqa: F401  (registers the ops lowered here)
from .act2bit_reference import STEPS, code_planes
from .infra.lowering import register_cpu_lowering
from .infra.numbers import fp32 as _fp32


# Rounded once here: a torch.tensor() call inside a traced function would become a constant.
_THRESHOLDS = {kind: tuple(_fp32(c) for c in steps.thresholds) for kind, steps in STEPS.items()}
_LEVELS = {kind: tuple(_fp32(v) for v in steps.levels) for kind, steps in STEPS.items()}


def fused_forward(x: torch.Tensor, kind: str, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's forward as traceable aten math: the activation and its packed codes.

    The codes are counted in fp32 and combined as ``c0 + 4 c1 + 16 c2 + 64 c3`` (exact in fp32,
    and equal to the bitwise OR of the shifted codes) because Inductor's vectorized C++ has no
    native uint8 shifts: uint8 math there is emulated lane by lane, fp32 math is SIMD.
    """
    y = torch.nn.functional.gelu(x, approximate=approximate) if kind == "gelu" else torch.nn.functional.silu(x)
    c1, c2, c3 = _THRESHOLDS[kind]
    xf = x.float()
    codes = (xf > c1).to(torch.float32) + (xf > c2).to(torch.float32) + (xf > c3).to(torch.float32)
    planes = code_planes(codes.reshape(-1))
    packed = planes[0] + planes[1] * 4.0 + planes[2] * 16.0 + planes[3] * 64.0
    return y, packed.to(torch.uint8)


def fused_backward(grad: torch.Tensor, packed: torch.Tensor, kind: str) -> torch.Tensor:
    """The op's backward as traceable aten math: ``grad * level[code]`` in fp32.

    ``grad`` is read as the same ``[4, B]`` planes as the codes, so every output element's
    shift is constant along the contiguous inner loop (a per-element ``i // B`` would defeat
    vectorization), and the shift runs on int32 lanes, which SIMD has (uint8 lanes it has not).
    """
    _, a1, a12, a123 = _LEVELS[kind]
    shifts = (torch.arange(4, dtype=torch.int32, device=packed.device) * 2).unsqueeze(1)
    codes = (packed.to(torch.int32).unsqueeze(0) >> shifts) & 3
    slope = torch.where(codes == 3, a123, torch.where(codes == 2, a12, torch.where(codes == 1, a1, 0.0)))
    dx = (code_planes(grad.reshape(-1)).float() * slope).to(grad.dtype)
    return dx.reshape(-1)[: grad.numel()].view(grad.shape)


@register_cpu_lowering(torch.ops.fxshear.act2bit.default)
def _lower_forward(x: torch.Tensor, kind: str, approximate: str, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_forward(x, kind, approximate)


@register_cpu_lowering(torch.ops.fxshear.act2bit_backward.default)
def _lower_backward(grad: torch.Tensor, packed: torch.Tensor, kind: str, impl: str) -> torch.Tensor:
    return fused_backward(grad, packed, kind)
