"""2-bit activation codes (Approx-BP's ReGELU2 / ReSiLU2): constants and the torch reference.

Why 2 bits: the backward of GELU/SiLU is replaced by the derivative of
``sum_i a_i * ReLU(x - c_i)``, a 4-level step function.  Which step an element sits on is
all the backward needs, so the forward keeps a code in {0, 1, 2, 3} (4 per byte) instead of
the dense pre-activation.

This module is the ground truth: the custom ops use it on CPU, and the Triton kernels are
tested against it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import GELU_APPROXIMATIONS  # noqa: F401  (the one list, re-exported)


@dataclass(frozen=True)
class StepDerivative:
    """Thresholds ``c`` and slopes ``a`` of one published 2-bit approximation."""

    thresholds: tuple[float, float, float]
    slopes: tuple[float, float, float]

    @property
    def levels(self) -> tuple[float, float, float, float]:
        """Derivative value for codes 0..3: 0, a1, a1+a2, a1+a2+a3 (summed in float64)."""
        a1, a2, a3 = self.slopes
        return (0.0, a1, a1 + a2, a1 + a2 + a3)


# Published constants (Approx-BP, ICML 2024). sum(a) == 1 and sum(a * c) == 0.
GELU_STEPS = StepDerivative(
    thresholds=(-3.1858810036855245, -0.001178821281161997, 3.190832613414926),
    slopes=(-0.04922261145617846, 1.0979632065417297, -0.048740595085551286),
)
SILU_STEPS = StepDerivative(
    thresholds=(-6.3050461001646445, -0.0008684942046214787, 6.325815242089708),
    slopes=(-0.04060357190528599, 1.080925428529668, -0.040321856624382146),
)
STEPS: dict[str, StepDerivative] = {"gelu": GELU_STEPS, "silu": SILU_STEPS}
KINDS = tuple(STEPS)
CODES_PER_BYTE = 4


def packed_numel(numel: int) -> int:
    """Bytes needed for ``numel`` 2-bit codes."""
    return (numel + CODES_PER_BYTE - 1) // CODES_PER_BYTE


def activation_reference(x: torch.Tensor, kind: str, approximate: str = "none") -> torch.Tensor:
    """The exact forward, computed exactly as eager PyTorch computes it."""
    if kind == "gelu":
        return torch.nn.functional.gelu(x, approximate=approximate)
    if kind == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"unknown activation kind {kind!r}; expected one of {KINDS}")


def codes_reference(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Unpacked codes ``[x > c1] + [x > c2] + [x > c3]`` as uint8, compared in fp32."""
    c1, c2, c3 = STEPS[kind].thresholds
    xf = x.float()
    return (xf > c1).to(torch.uint8) + (xf > c2).to(torch.uint8) + (xf > c3).to(torch.uint8)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in {0..3} four to a byte in planes: with ``B = packed_numel(numel)``,
    element ``i`` sits in bits ``2 * (i // B)`` of byte ``i % B``.

    Why planes rather than four consecutive elements per byte: every byte then combines
    elements ``B`` apart, so packing and unpacking are plain element-wise math over four
    contiguous runs, which Inductor's C++ backend vectorizes (the consecutive layout needs a
    stride-4 gather that it compiles to a scalar loop, ~5x slower forward and ~10x slower
    backward).  On a GPU the four runs load just as coalesced.  The pad codes (the last
    ``4 * B - numel`` elements, in the top plane) are zero.
    """
    planes = code_planes(codes.reshape(-1))
    return planes[0] | (planes[1] << 2) | (planes[2] << 4) | (planes[3] << 6)


def code_planes(flat: torch.Tensor) -> torch.Tensor:
    """A flat tensor zero-padded to a multiple of 4 and viewed as the ``[4, B]`` planes of the
    code layout (row ``j`` holds the elements whose codes sit in bits ``2j`` of each byte)."""
    pad = (-flat.numel()) % CODES_PER_BYTE
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(CODES_PER_BYTE, -1)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as uint8."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(-1, 1)
    planes = (packed.reshape(1, -1) >> shifts) & 3
    return planes.reshape(-1)[:numel]


def encode_reference(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Packed 2-bit codes of ``x``: ``uint8[packed_numel(x.numel())]``."""
    return pack_codes(codes_reference(x, kind))


def level_table(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 derivative value of each code (index = code)."""
    return torch.tensor(STEPS[kind].levels, dtype=torch.float32, device=device)


def backward_reference(grad: torch.Tensor, packed: torch.Tensor, kind: str) -> torch.Tensor:
    """``dx = grad * level[code]``, multiplied in fp32 and returned in ``grad``'s dtype."""
    codes = unpack_codes(packed, grad.numel()).view(grad.shape)
    slope = level_table(kind, grad.device)[codes.long()]
    return (grad.float() * slope).to(grad.dtype)
