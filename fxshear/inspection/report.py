"""``fxshear.inspect``: what fxshear saves for backward next to what plain torch.compile saves.

Both sides are traced and partitioned exactly as Inductor would (the baseline is Inductor's own
min-cut with no fxshear pass), in analysis mode: no kernels are generated, so a report of a real
model takes seconds.  The numbers are read from the partitioned graphs, never from intentions.
"""

from __future__ import annotations

import difflib
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backend import ShearBackend
from ..config import DEFAULT_PRESET, ConfigError, ShearConfig
from ..graph.ledger import ModelLedger
from ..passes import PASSES
from ..passes.base import PassReport
from ..region import Region

GRAPH_KINDS = ("forward", "backward", "joint")


@dataclass
class RegionPasses:
    """The pass reports of one region."""

    region: str
    reports: list[PassReport]
    fallback_reason: str | None = None


@dataclass
class InspectionReport:
    """The ledger under fxshear beside plain torch.compile, what each pass did, and graph diffs."""

    config: ShearConfig
    baseline: ModelLedger
    shear: ModelLedger
    passes: list[RegionPasses]
    graphs_before: list[dict[str, str]] = field(repr=False, default_factory=list)
    graphs_after: list[dict[str, str]] = field(repr=False, default_factory=list)
    #: (pass, activation bytes removed), measured by adding the passes one at a time in the
    #: backend's order and reading each partition's ledger; empty when not measured.
    removed_by_pass: list[tuple[str, int]] = field(default_factory=list)

    @property
    def ledger(self) -> ModelLedger:
        """The fxshear ledger (what the user's compiled model saves)."""
        return self.shear

    @property
    def saved_ratio(self) -> float:
        """fxshear activation bytes / torch.compile activation bytes."""
        return self.shear.activation_bytes / max(self.baseline.activation_bytes, 1)

    def diff(self, kind: str = "forward", context: int = 3) -> str:
        """Unified diff of one readable graph kind, region by region, torch.compile → fxshear
        (``context`` unchanged lines around each change)."""
        if kind not in GRAPH_KINDS:
            raise ValueError(f"kind must be one of {GRAPH_KINDS}, got {kind!r}")
        parts = []
        for i, (before, after) in enumerate(zip(self.graphs_before, self.graphs_after)):
            parts.append(graph_diff(before.get(kind, ""), after.get(kind, ""),
                                    f"torch.compile/region{i}/{kind}", f"fxshear/region{i}/{kind}", context))
        return "".join(parts)

    def pass_bytes(self) -> dict[str, int]:
        """Activation bytes each pass's ops now save (negative space is in the totals)."""
        return {k: v for k, v in self.shear.by_pass().items() if k}

    def bytes_removed(self) -> dict[str, int]:
        """Activation bytes each pass removed from the ledger (measured, see ``removed_by_pass``)."""
        return dict(self.removed_by_pass)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "baseline": self.baseline.to_dict(),
            "fxshear": self.shear.to_dict(),
            "saved_ratio": self.saved_ratio,
            "bytes_removed_by_pass": self.bytes_removed(),
            "passes": [
                {"region": p.region, "fallback_reason": p.fallback_reason,
                 "reports": [r.to_dict() for r in p.reports]}
                for p in self.passes
            ],
        }

    def print(self, console: Any = None, ledger: bool = False) -> None:
        """The terminal summary, readable at 80 columns (:mod:`fxshear.inspection.terminal`);
        ``ledger`` adds every saved tensor, one unabridged line each."""
        from .terminal import print_report

        print_report(self, console, ledger)

    def save_html(self, path: str | os.PathLike[str]) -> str:
        """Write one self-contained HTML page (creating its folder); returns the absolute path."""
        from .html import render_html

        target = pathlib.Path(path).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render_html(self), encoding="utf-8")
        return str(target)


def graph_diff(before: str, after: str, label_before: str, label_after: str, context: int = 3) -> str:
    """Unified diff of two readable graphs."""
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        label_before, label_after, n=context))


def _analyse(model: torch.nn.Module, backend: ShearBackend, args: tuple[Any, ...],
             kwargs: Mapping[str, Any]) -> list[Region]:
    compiled = torch.compile(model, backend=backend)
    with torch.enable_grad():
        compiled(*args, **kwargs)
    return [r for r in backend.regions if r.has_backward]


def _removed_by_pass(model: torch.nn.Module, cfg: ShearConfig, baseline: ModelLedger,
                     after: list[Region], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Add the passes that rewrote something one at a time and read each ledger's change."""
    order = [p.name for p in PASSES if p.applies(cfg)]
    active = [name for name in order if any(r.name == name and r.rewritten
                                             for region in after for r in region.pass_reports)]
    full = ModelLedger([r.ledger for r in after]).activation_bytes
    removed: list[tuple[str, int]] = []
    previous = baseline.activation_bytes
    for i, name in enumerate(active):
        if i == len(active) - 1:
            current = full
        else:
            partial = ShearBackend(cfg, codegen=False, pass_names=active[: i + 1])
            current = ModelLedger([r.ledger for r in _analyse(model, partial, args, kwargs)]).activation_bytes
        removed.append((name, previous - current))
        previous = current
    return removed + [(name, 0) for name in order if name not in active]


def inspect(model: torch.nn.Module, *example_inputs: Any, preset: str = DEFAULT_PRESET,
            example_kwargs: Mapping[str, Any] | None = None, per_pass: bool = True,
            **overrides: Any) -> InspectionReport:
    """Trace ``model(*example_inputs, **example_kwargs)`` under torch.compile and under fxshear.

    ``overrides`` are fxshear options (e.g. ``memory_budget=0.5``), validated as for the backend.
    With ``per_pass`` the passes are also added one at a time, so the report shows the bytes
    each one removed (one more trace and partition per pass that rewrote something).
    The baseline is Inductor's default partition of the same graph under the same
    ``memory_budget``, so the ratio isolates what fxshear's rewrites change.
    """
    if not example_inputs and not example_kwargs:
        raise ConfigError(
            "fxshear.inspect traces the model on an example batch and was given none: "
            "fxshear.inspect(model, *inputs) or fxshear.inspect(model, example_kwargs=batch). "
            "For what a model you already compiled and ran saved: fxshear.ledger(model)")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod  # inspect traces both sides itself; the user's compiled wrapper stays as it is
    cfg = ShearConfig.from_options(preset=preset, **overrides)
    baseline_cfg = ShearConfig.from_options(preset="none", memory_budget=cfg.memory_budget)
    kwargs = dict(example_kwargs or {})
    baseline = ShearBackend(baseline_cfg, codegen=False)
    shear = ShearBackend(cfg, codegen=False)
    # Dynamo guards its cache entries on the backend, so each side gets its own trace and the
    # user's compiled models keep theirs (no torch._dynamo.reset()).
    before = _analyse(model, baseline, example_inputs, kwargs)
    after = _analyse(model, shear, example_inputs, kwargs)
    baseline_ledger = ModelLedger([r.ledger for r in before])
    removed = _removed_by_pass(model, cfg, baseline_ledger, after, example_inputs, kwargs) if per_pass else []
    return InspectionReport(
        config=cfg,
        removed_by_pass=removed,
        baseline=baseline_ledger,
        shear=ModelLedger([r.ledger for r in after]),
        passes=[RegionPasses(r.name, r.pass_reports, r.fallback_reason) for r in after],
        graphs_before=[r.readable_graphs() for r in before],
        graphs_after=[r.readable_graphs() for r in after],
    )
