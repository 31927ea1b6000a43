"""What ``fxshear::normalize`` and its Triton twin agree on: the norm kinds and the statistics' shape.

Kept apart from the op module (which registers the op and its CPU lowering) so that the Triton
twin imports only this.
"""

from __future__ import annotations

import torch

NORM_KINDS = ("layer", "rms")


def rstd_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The per-row statistic's shape: x's, with the normalized last dim kept as 1."""
    return (*x.shape[:-1], 1)
