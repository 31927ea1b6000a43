"""The package's own source files, as Inductor's cache keys must see them.

Why its own module: both the partitioner (``graph``) and the CPU lowering (``kernels``) hash
these files into their cache keys, since neither custom-op bodies nor backward formulas are in
Inductor's key; from here each reads them without importing the other.
"""

from __future__ import annotations

import functools
import pathlib


@functools.cache
def fxshear_source_files() -> tuple[str, ...]:
    """Every .py and .c file of the package: any change to a pass, op, kernel or formula changes the cache key."""
    root = pathlib.Path(__file__).resolve().parent
    return tuple(sorted(str(p) for pattern in ("*.py", "*.c") for p in root.rglob(pattern)))
