"""Finding the regions compiled for a model: ``fxshear.ledger(model)``.

Why by parameter identity: a compiled module does not expose its backend on every torch
version, but every region records which parameters it was compiled with.
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import ShearBackend, backends
from .config import ConfigError
from .graph.ledger import ModelLedger
from .region import Region


def regions_of(model: Any = None, backend: ShearBackend | None = None) -> list[Region]:
    """Regions compiled for ``model`` by its most recent fxshear backend (or by ``backend``).

    With no model, the regions of the most recently used backend.
    """
    candidates = [backend] if backend is not None else backends()
    module = getattr(model, "_orig_mod", model)
    if module is None:
        used = [b for b in candidates if b.regions]
        return list(used[-1].regions) if used else []
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fxshear.ledger expects an nn.Module (or a compiled one), got {type(model).__name__}")
    ids = {id(p) for p in module.parameters()}
    matching = [(b, [r for r in b.regions if r.parameter_ids & ids]) for b in candidates]
    matching = [(b, rs) for b, rs in matching if rs]
    if not matching:
        return []
    latest = max(matching, key=lambda item: max(r.order for r in item[1]))
    return latest[1]


def ledger(model: Any = None, backend: ShearBackend | None = None) -> ModelLedger:
    """The saved-tensor ledger of every region compiled for ``model`` (same on a warm cache).

    Before any fxshear region ran for ``model`` there is nothing to read: that is an error that
    says what to call first, not an empty ledger a user would take for "saves nothing".
    """
    regions = regions_of(model, backend)
    if not regions:
        what = "this model" if model is not None else "any model"
        raise ConfigError(
            f"no fxshear-compiled region has run for {what} yet, so there is no ledger to read. Compile and run "
            "one step first: compiled = torch.compile(model, backend=\"fxshear\"); compiled(**batch).loss.backward(); "
            "then fxshear.ledger(model). To see what it would save without running a step: "
            "fxshear.inspect(model, *example_inputs)")
    return ModelLedger([r.ledger for r in regions if r.has_backward])
