"""Per-step freezing without recompiles: one compiled region, picked per freeze mask at run time.

Why a dispatcher in the backend rather than ``requires_grad_(False)``: Dynamo guards
``requires_grad`` (torch 2.13+: one recompile per mask, eager fallback after 8), and torch 2.11
reuses a stale graph instead (pytorch#139476).  fxshear never toggles ``requires_grad``; the
callable it returns to Dynamo reads :mod:`fxshear.freezing.state` on every call:

* no parameter of the region frozen: the all-gradients graph runs as compiled;
* some frozen: they are handed to the graph detached, so autograd gives them no gradient, and
  their weight-gradient matmuls (behind ``fxshear::gated_mm``) are skipped.  Nothing recompiles.
* with ``freeze_variants = K > 0``: the first ``K`` distinct masks a region sees also get their
  own compiled variant, whose joint graph drops the frozen gradients before partitioning, so
  tensors only they needed are not saved at all.  Later masks use the cached variant that
  freezes the most of what they freeze (any variant freezing a subset is correct: the rest is
  gated), so a region compiles at most ``1 + K`` times, whatever the masks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from ..log import log
from ..region import Region, compile_and_record, copy_graph_module
from .state import frozen_ids


@dataclasses.dataclass
class VariantStats:
    """How a dispatcher has been used: calls per variant, compiles and their time."""

    calls: dict[frozenset[int], int] = dataclasses.field(default_factory=dict)
    compiles: int = 0
    compile_seconds: float = 0.0


class FreezeDispatcher:
    """What the backend returns for a trainable region when ``freezing`` is on."""

    def __init__(self, region: Region, full: Callable, *, max_variants: int, codegen: bool) -> None:
        self.region = region
        self.variants: dict[frozenset[int], tuple[Region, Callable]] = {frozenset(): (region, full)}
        self.max_variants = max_variants
        self.codegen = codegen
        self.freezable = tuple(sorted(region.gated))
        self.stats = VariantStats()
        self.last: Region = region
        self.last_requested: frozenset[int] = frozenset()
        self._no_variants_reason = _why_no_variants(region, max_variants)

    def __repr__(self) -> str:
        return (f"FreezeDispatcher({self.region.name}, freezable={len(self.freezable)}, "
                f"variants={len(self.variants)})")

    # -- run time ---------------------------------------------------------------------------
    def __call__(self, *call_args: Any) -> Any:
        args = list(call_args)
        frozen = frozen_ids()
        requested = frozenset(i for i in self.freezable if id(args[i]) in frozen) if frozen else frozenset()
        self.last_requested = requested
        if not requested:
            region, fn = self.variants[frozenset()]
        else:
            region, fn = self._variant_for(requested)
            for i in requested:
                args[i] = args[i].detach()
        self.last = region
        self.stats.calls[region.frozen] = self.stats.calls.get(region.frozen, 0) + 1
        return fn(*args)

    def _variant_for(self, requested: frozenset[int]) -> tuple[Region, Callable]:
        found = self.variants.get(requested)
        if found is not None:
            return found
        if self._no_variants_reason is None and len(self.variants) - 1 < self.max_variants:
            try:
                return self._compile_variant(requested)
            except Exception as error:  # noqa: BLE001 - the gated full graph is always correct
                if self.region.cfg.on_error == "raise":
                    raise
                self._no_variants_reason = f"compiling a variant failed ({type(error).__name__}: {error})"
                log.warning("fxshear: %s: %s; every mask now runs the gated full graph",
                            self.region.name, self._no_variants_reason)
        return self._best_cached(requested)

    def _best_cached(self, requested: frozenset[int]) -> tuple[Region, Callable]:
        """The cached variant freezing the most of what is asked (the full graph freezes nothing)."""
        best = max((mask for mask in self.variants if mask <= requested), key=len)
        return self.variants[best]

    def _variant_region(self, mask: frozenset[int]) -> Region:
        """The region of a variant dropping the gradients of ``mask`` (nothing recorded yet)."""
        base = self.region
        return dataclasses.replace(base, frozen=mask, gated=base.gated - mask, saved=None, graphs=None,
                                   replayed=False, effective_budget=None)

    def _compile_variant(self, mask: frozenset[int]) -> tuple[Region, Callable]:
        base = self.region
        variant = self._variant_region(mask)
        start = time.perf_counter()
        fn = compile_and_record(copy_graph_module(base.graph), variant.example_inputs(), base.cfg,
                                variant.recorder(id(variant.graph.graph)), codegen=self.codegen,
                                reference=base.reference, frozen=mask, gated=variant.gated)
        elapsed = time.perf_counter() - start
        self.stats.compiles += 1
        self.stats.compile_seconds += elapsed
        log.info("fxshear: %s compiled a variant with %d of %d gradients dropped (%.1f s; %d of %d variants)",
                 base.name, len(mask), len(self.freezable), elapsed, len(self.variants), self.max_variants)
        self.variants[mask] = (variant, fn)
        return variant, fn

    # -- inspection -------------------------------------------------------------------------
    def mask_of(self, parameter_ids: frozenset[int] | set[int]) -> frozenset[int]:
        """The input indices of this region holding the parameters with these ``id``s."""
        return frozenset(i for i in self.freezable if id(self.region.inputs[i].ref()) in parameter_ids)

    def ledger_for(self, mask: frozenset[int]) -> Any:
        """The saved-tensor ledger of the graph that runs for ``mask`` (input indices frozen)."""
        return self._best_cached(mask)[0].ledger

    def analysis_ledger(self, mask: frozenset[int]) -> Any:
        """What a variant for ``mask`` would save (a trace and partition, no code generation):
        the memory per-mask variants buy, whether or not one is compiled."""
        probe = self._variant_region(frozenset(mask))
        probe.replay()
        return probe.ledger


def _why_no_variants(region: Region, max_variants: int) -> str | None:
    """Why this region never compiles mask variants, or None when it may."""
    if max_variants <= 0:
        return "freeze_variants is 0"
    if any(isinstance(x, (torch.SymInt, torch.SymFloat)) for x in region.inputs):
        return "its graph has dynamic shapes (a variant is compiled later from recorded input shapes)"
    return None
