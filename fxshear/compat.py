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

    patches: dict[str, object] = {"activation_memory_budget": budget}
    # fxshear's ops are custom ops: without this flag the partitioner's aggressive modes
    # recompute them freely (matmuls included) and its knapsack never weighs them; with it they
    # are treated like aten's compute-intensive ops, banned first and traded by estimated cost
    # (their flop formulas: fxshear/graph/cost.py).  Present in 2.11-2.14; feature-detected.
    if hasattr(functorch_config, "is_non_builtin_to_include"):
        patches["is_non_builtin_to_include"] = True
    with functorch_config.patch(**patches):
        yield



def native_random(graph: torch.fx.Graph) -> bool:
    """Rewrite ``aten.rand`` calls inlined after partitioning into Inductor's seeded random ops.

    Inductor does this in its joint-graph passes, before partitioning; random numbers fxshear
    inlines later (``dropout_rng="fast"``) must be rewritten the same way or Inductor refuses
    them.  Private API: returns False (leave the op opaque) where it is not available.
    """
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.fx_passes.replace_random import fuse_seed_creation_pass, patterns
    except ImportError:
        return False
    if inductor_config.fallback_random:
        return True  # Inductor then runs aten.rand as is
    patterns.apply(graph)
    fuse_seed_creation_pass(graph)
    return True


def size_hint(size: torch.SymInt) -> int:
    """A symbolic size's example value, without installing a guard (``int()`` would specialize).

    ``optimization_hint`` (2.13+) or the symbol node's own hint (older releases).
    """
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
    except ImportError:
        hint = size.node.hint
        return int(hint if hint is not None else size.node.shape_env.size_hint(size.node.expr))
    return int(optimization_hint(size))


def is_dynamo_restart(error: BaseException) -> bool:
    """True for Dynamo's control-flow exceptions that a backend must let through.

    Why: with ``dynamic=True`` the compile may raise e.g. ``TensorifyScalarRestartAnalysis``
    (a Python float must be specialized); Dynamo catches it and traces the frame again.  Taken
    for a failed rewrite, it would make fxshear fall back to the unmodified graph for nothing.
    """
    try:
        from torch._dynamo.exc import RestartAnalysis
    except ImportError:  # pragma: no cover - every supported release has it
        return False
    return isinstance(error, RestartAnalysis)
