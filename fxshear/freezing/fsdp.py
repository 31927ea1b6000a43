"""Per-step freezing under FSDP2: freeze the gathered copy the compiled graph actually reads.

Why: ``fully_shard`` keeps each weight as a sharded DTensor parameter (what the optimizer and
fxshear's arms hold) and, in each forward, swaps in an all-gathered ``unsharded_param`` that the
compiled block receives.  The freeze dispatcher recognises frozen weights by identity, so it must
be given that gathered parameter too, or it would compute the frozen weight's gradient (which the
arm's hook then drops).  FSDP2 allocates the gathered parameter at the first all-gather and reuses
the same object afterwards, so from the second step on the weight-gradient work is skipped.
These are private FSDP2 attributes (torch 2.11-2.14: ``_get_fsdp_state()._fsdp_param_groups[*]
.fsdp_params[*]`` with ``sharded_param`` and ``_unsharded_param``), read defensively: where
they are missing, nothing extra is frozen and freezing falls back to dropping the gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def fsdp_params_by_sharded(model: nn.Module) -> dict[int, object]:
    """``id(sharded parameter) -> FSDPParam`` for every ``fully_shard``-ed module in ``model``."""
    found: dict[int, object] = {}
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            groups = get_state()._fsdp_param_groups
        except (AttributeError, AssertionError, RuntimeError):
            continue
        for group in groups:
            for fsdp_param in getattr(group, "fsdp_params", ()):
                sharded = getattr(fsdp_param, "sharded_param", None)
                if sharded is not None:
                    found[id(sharded)] = fsdp_param
    return found


def gathered_twins(params: Iterable[torch.Tensor], by_sharded: dict[int, object]) -> list[torch.Tensor]:
    """The all-gathered parameters FSDP2 has allocated for ``params`` (none before the first
    forward, none for parameters FSDP2 does not manage)."""
    twins = []
    for p in params:
        fsdp_param = by_sharded.get(id(p))
        twin = getattr(fsdp_param, "_unsharded_param", None) if fsdp_param is not None else None
        if twin is not None:
            twins.append(twin)
    return twins
