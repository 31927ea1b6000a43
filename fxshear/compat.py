"""The one place that knows how torch 2.11-2.14 differ.

Private APIs drift between releases; everything version-dependent is feature-detected here so
the rest of fxshear can import one stable name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SUPPORTED_TORCH = ((2, 11), (2, 14))


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch, ignoring local build tags."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_torch_version() -> None:
    """Warn, not fail, outside the tested range: private APIs may have moved."""
    low, high = SUPPORTED_TORCH
    if not (low <= torch_version() <= high):
        import warnings

        warnings.warn(
            f"fxshear is tested with torch {low[0]}.{low[1]} to {high[0]}.{high[1]}; "
            f"found {torch.__version__}. Rewrites may be skipped if internals moved.",
            stacklevel=2,
        )


try:  # 2.13+: the common base class of custom passes and partitioners
    from torch._inductor.custom_graph_pass import CustomPassBase as _PassBase
except ImportError:  # 2.11
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase

from torch._functorch.partitioners import min_cut_rematerialization_partition  # stable 2.11-2.14
from torch._inductor.custom_graph_pass import (  # noqa: F401  (stable 2.11-2.14)
    CustomGraphPass,
    CustomPartitionerFn,
    get_hash_for_files,
)

CustomPassBase = _PassBase


@contextlib.contextmanager
def caches_disabled() -> Iterator[None]:
    """Turn off the FX-graph and AOTAutograd caches (used to re-derive a ledger on a hit)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(
        enable_autograd_cache=False
    ):
        yield


@contextlib.contextmanager
def activation_memory_budget(budget: float | None) -> Iterator[None]:
    """Patch the partitioner's exact memory-for-recompute knob, if a budget is given."""
    if budget is None:
        yield
        return
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=budget):
        yield

