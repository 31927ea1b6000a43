"""Flop formulas for fxshear's custom ops, so the partitioner's knapsack can price recomputing them.

Why: under a memory budget Inductor's partitioner estimates each recomputable node's runtime by
counting flops (``activation_memory_budget_runtime_estimator="flops"``).  A custom op without a
formula counts as free, so the knapsack would recompute a matmul hidden inside one before a cheap
elementwise op.  Only the matmul-bearing ops need one; the rest are elementwise (free, as aten's).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import register_flop_formula


def _rows(shape: Sequence[int]) -> int:
    return math.prod(shape[:-1])


def _linear(x_shape: Sequence[int], out_features: int) -> int:
    return 2 * _rows(x_shape) * x_shape[-1] * out_features


@functools.cache
def register_flop_formulas() -> None:
    """Register once (the flop registry refuses duplicates)."""
    ops = torch.ops.fxshear

    @register_flop_formula(ops.shared_linear)
    def _shared_linear(x, z, gamma, beta, weight, bias, impl, bits=None, p=0.0, *, out_shape=None, **_):  # noqa: ANN001, ANN202
        return _linear(x, weight[0])

    @register_flop_formula(ops.returned_linear)
    def _returned_linear(x, weight, bias, *, out_shape=None, **_):  # noqa: ANN001, ANN202
        return _linear(x, weight[0])

    @register_flop_formula(ops.pruned_linear)
    def _pruned_linear(x, values, bits, weight, bias, impl, *, out_shape=None, **_):  # noqa: ANN001, ANN202
        return _linear(x, weight[0])

    @register_flop_formula(ops.attention)
    def _attention(q, k, v, mask, bits, scale, dropout_p, impl, *, out_shape=None, **_):  # noqa: ANN001, ANN202
        scores = _rows(q) * k[-2]
        return 2 * scores * q[-1] + 2 * scores * v[-1]
