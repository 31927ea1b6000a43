"""Which parameters are frozen right now: the one piece of state the freeze dispatcher reads.

Why not ``requires_grad_(False)``: Dynamo guards ``requires_grad`` on torch 2.13+, so every new
freeze mask would recompile the model (the 9th falls back to eager), and on 2.11 it silently
reuses the stale all-gradients graph (pytorch#139476), so frozen weights would still be computed.
fxshear leaves ``requires_grad`` alone; its compiled regions look up this set on every call.

The set holds parameter identities; it must stay the same from a step's forward through its
backward (the regions decide at forward time which gradients the backward computes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

_frozen_ids: frozenset[int] = frozenset()
# Strong references keep the ids valid (an id is reused once its object dies).
_frozen_refs: tuple[torch.Tensor, ...] = ()


def set_frozen(parameters: Iterable[torch.Tensor]) -> None:
    """Freeze exactly ``parameters`` from now on (an empty iterable unfreezes everything)."""
    global _frozen_ids, _frozen_refs
    refs = tuple(parameters)
    for p in refs:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"only tensors (parameters) can be frozen, got {type(p).__name__}")
    _frozen_refs = refs
    _frozen_ids = frozenset(id(p) for p in refs)


def frozen_ids() -> frozenset[int]:
    """Identities of the parameters frozen now."""
    return _frozen_ids


def frozen_parameters() -> tuple[torch.Tensor, ...]:
    return _frozen_refs


def is_frozen(t: torch.Tensor) -> bool:
    return id(t) in _frozen_ids


@contextlib.contextmanager
def frozen(parameters: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, fxshear-compiled models give ``parameters`` no gradient.

    Run the forward *and* the backward inside it::

        with fxshear.frozen(layer.weight for layer in some_layers):
            loss = model(batch).loss
            loss.backward()

    Only regions compiled with ``freezing=True`` read it; anything running eagerly is unaffected
    (``@fxshear.train_step`` also clears those gradients).
    """
    previous = _frozen_refs
    set_frozen(parameters)
    try:
        yield
    finally:
        set_frozen(previous)
