"""The two sums of a reversible block, ``y1 = λ·x1 + F(x2)`` and ``y2 = β·x2 + G(y1)``, done so
that the inverse is exact.

Why not plain floats: the inverse ``x1 = (y1 − F(x2)) / λ`` divides a rounding error by λ = 0.1,
so any difference between the rebuilt and the original input (even one ulp of one element that
F rounds differently) grows tenfold per block.  Measured on MiniLM (6 blocks, real weights, fp32):
plain fp32 streams, as MEFT's code, gave gradients 2e-2 (MEFT1) to 3.4 (MEFT3) relative off
ordinary autograd; fp64 streams still 1e-3 to 1.25, because an fp64 residue of 1e-14 still moves
some element across an fp32 rounding boundary and the tenfold growth does the rest.

So, with ``exact=True``, the streams are fixed-point numbers held in fp64: multiples of
``2**-32`` below ``2**20`` in magnitude, on which fp64 sums and differences are exact.  F's and
G's outputs are rounded onto that grid (a straight-through step: the gradient is F's own).  The
only inexact step left is the scaling by λ = 1/c (c = 10 for 0.1): in grid units ``k``,
``round(k / c)`` drops ``k − c·round(k / c)``, a small integer, which is kept (int8, one byte per
element of that stream per block).  The inverse then restores ``k`` exactly, every block, at any
depth and in any model dtype.  ``exact=False`` keeps MEFT's plain arithmetic in the model's dtype.
"""

from __future__ import annotations

import dataclasses

import torch


from ..kernels.reversible_mark import GRID  # 2**32: resolution 2.3e-10; |values| < 2**20 keeps k < 2**52

STREAM_LIMIT = 2.0**20


def on_grid(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the grid (fp64), with ``t``'s gradient."""
    t = t.to(torch.float64)
    return t + (torch.round(t * GRID) / GRID - t).detach()


def divisor(factor: float) -> int | None:
    """c with ``factor == 1 / c`` (None for 1); the factors a reversible block can scale by exactly."""
    if factor == 1.0:
        return None
    c = round(1.0 / factor)
    if c < 2 or c > 127 or abs(1.0 / c - factor) > 1e-12:
        raise ValueError(f"a reversible block's factor must be 1 or 1/c for an integer c in 2..127, got {factor}")
    return c


@dataclasses.dataclass(frozen=True)
class Coupling:
    """How one block scales its streams: ``lam`` and ``beta``, exactly (``exact``) or in floats."""

    lam: float
    beta: float
    exact: bool

    def scale(self, x: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(factor · x, what the inverse needs besides it)."""
        if not self.exact:
            return factor * x, None
        c = divisor(factor)
        if c is None:
            return x, None
        k = torch.round(x.detach() * GRID)
        m = torch.round(k / c)
        remainder = (k - c * m).to(torch.int8)
        return x / c + (m / GRID - x / c).detach(), remainder

    def unscale(self, scaled: torch.Tensor, remainder: torch.Tensor | None, factor: float) -> torch.Tensor:
        """x from ``scale(x)``: exact with the remainder."""
        if not self.exact:
            return scaled / factor
        c = divisor(factor)
        if c is None:
            return scaled
        return (c * torch.round(scaled * GRID) + remainder.to(torch.float64)) / GRID

    def output(self, t: torch.Tensor, stream: torch.dtype) -> torch.Tensor:
        """F's or G's output as a stream value."""
        return on_grid(t) if self.exact else t.to(stream)
