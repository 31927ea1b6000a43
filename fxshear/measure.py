"""Run-time cross-check of the ledger: count what autograd actually saves during a call.

Why: the ledger is read from the partitioned graph; this counts the storages handed to autograd
at run time through ``saved_tensors_hooks``, so the two can be compared.  Unique storages are
counted once (views share a storage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from .freezing.fsdp import fsdp_params_by_sharded, gathered_twins


@dataclass
class SavedBytes:
    """Bytes saved for backward during one call, split like the ledger."""

    activation_bytes: int = 0
    parameter_bytes: int = 0
    input_bytes: int = 0
    tensors: int = 0
    output: Any = field(default=None, repr=False)

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.parameter_bytes + self.input_bytes


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    local = getattr(t, "to_local", None)  # a DTensor (FSDP2's sharded parameters): its local shard
    if local is not None:
        t = local()
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def _modules_of(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.nn.Module]:
    """``fn`` (or its bound module) and the modules passed to it, compiled wrappers unwrapped."""
    candidates = [fn, getattr(fn, "__self__", None), *args, *kwargs.values()]
    modules = (getattr(candidate, "_orig_mod", candidate) for candidate in candidates)
    return [module for module in modules if isinstance(module, torch.nn.Module)]


def _parameters_of(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Parameters and buffers of ``modules``."""
    found: list[torch.Tensor] = []
    for module in modules:
        found.extend(module.parameters())
        found.extend(module.buffers())
    return found


def measure_saved_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> SavedBytes:
    """Call ``fn(*args, **kwargs)`` and count unique storages saved for backward.

    Parameters and buffers of ``fn`` (when it is a module or a bound method) or of any module
    among the arguments, and any ``nn.Parameter``, count as parameters; storages of the call's own tensor arguments count as inputs; everything else is
    an activation.  The call's output is kept in ``.output`` so the caller can run backward.
    """
    modules = _modules_of(fn, args, kwargs)
    parameters = _parameters_of(modules)
    parameter_keys = {_storage_key(p) for p in parameters}
    # FSDP2 gathers each weight into a parameter of its own for the forward (allocated at the first
    # all-gather, its storage resized every step): those count as parameters too, their storages
    # read when met (the copies are looked up again only while some are not allocated yet)
    fsdp = {key: value for module in modules for key, value in fsdp_params_by_sharded(module).items()}
    sharded = [p for p in parameters if id(p) in fsdp]
    twins: list[torch.Tensor] = []

    def gathered(key: tuple[str, int]) -> bool:
        if not sharded:
            return False
        if len(twins) < len(sharded):
            twins[:] = gathered_twins(sharded, fsdp)
        return any(t.untyped_storage().nbytes() > 0 and _storage_key(t) == key for t in twins)

    input_keys = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    seen: dict[tuple[str, int], tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in seen:
            if isinstance(t, torch.nn.Parameter) or key in parameter_keys or gathered(key):
                kind = "parameter"
            elif key in input_keys:
                kind = "input"
            else:
                kind = "activation"
            seen[key] = (kind, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = fn(*args, **kwargs)
    result = SavedBytes(output=output, tensors=len(seen))
    for kind, nbytes in seen.values():
        setattr(result, f"{kind}_bytes", getattr(result, f"{kind}_bytes") + nbytes)
    return result
