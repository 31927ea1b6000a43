"""How many entries a pruned pack keeps, and of what: shared by ``fxshear::prune_pack`` and its Triton twin.

Kept apart from the op module (which registers the ops and their CPU lowering) so that the
Triton twin imports only this and the bit format.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def check_keep_ratio(keep_ratio: float) -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")


def keep_count(n: int, keep_ratio: float) -> int:
    """Entries kept of a sample of ``n``: ``ceil(keep_ratio * n)``, at least 1 (0 when n == 0).

    Integer arithmetic on the ratio as a fraction (so 0.1 * 10 keeps 1, not 2), which also keeps
    a symbolic ``n`` symbolic under ``dynamic=True`` instead of specializing on it.
    """
    check_keep_ratio(keep_ratio)
    ratio = Fraction(keep_ratio).limit_denominator(10**6)
    k = (ratio.numerator * n + ratio.denominator - 1) // ratio.denominator
    return torch.sym_min(n, torch.sym_max(k, torch.sym_min(n, 1)))


def samples_and_size(x: torch.Tensor) -> tuple[int, int]:
    """``(samples, n)``: x's first dim and the elements per sample (a 1-D x is one sample)."""
    if x.dim() <= 1:
        return 1, x.numel()
    samples = x.shape[0]
    n = 1
    for size in x.shape[1:]:
        n = n * size
    return samples, n
