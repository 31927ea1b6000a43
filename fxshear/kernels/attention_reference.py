"""What ``fxshear::attention`` and its Triton twin agree on: supported sizes and the dropout scale.

Kept apart from the op module (which registers the ops and their CPU lowering) so that the
Triton twin imports only this and the bit format (:mod:`fxshear.kernels.infra.bits`).
"""

from __future__ import annotations

from .infra.numbers import FLOAT_DTYPES

TRITON_MAX_HEAD_DIM = 128
TRITON_DTYPES = FLOAT_DTYPES


def dropout_scale(dropout_p: float) -> float:
    """``1 / (1 - p)`` as ``native_dropout`` uses it (0 for p == 1)."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
