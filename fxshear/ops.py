"""Every fxshear custom op, registered with ``torch.library`` from this one place.

Why one place: an op registered as the side effect of whichever pass happened to import its
module first makes registration depend on import order, and a pass that forgot the import
fails only on the graphs it rewrites.  ``fxshear/__init__`` calls :func:`register_ops` before
anything else, so every op (its schema, fake, autograd formula and CPU lowering) exists
whenever any part of fxshear runs.
"""

from __future__ import annotations

import functools


@functools.cache
def register_ops() -> None:
    """Define every op family (idempotent)."""
    from . import kernels  # noqa: F401  (each op family module defines its ops on import)
    from .freezing import gated_mm  # noqa: F401  (the gated weight-gradient ops)
