"""Which implementation an fxshear op runs: Triton on CUDA when usable, the torch reference otherwise.

``impl`` is an op argument ("auto" | "torch" | "triton"), not global state, so the choice is
part of the traced graph and of every cache key.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from ...options import KERNEL_CHOICES as IMPLS


@functools.cache
def triton_usable(module: str) -> bool:
    """True when CUDA is present and ``fxshear.kernels.<module>`` (a Triton module) imports."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(f"fxshear.kernels.{module}")
    except Exception:  # noqa: BLE001 - any import failure means "use the torch path"
        return False
    return True


def use_triton(t: torch.Tensor, impl: str, module: str) -> bool:
    """Whether to launch the Triton kernels of ``module`` for tensor ``t``.

    ``impl="triton"`` on a CUDA tensor where Triton cannot run is an error, not a silent fallback.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or t.device.type != "cuda":
        return False
    if impl == "triton" and not triton_usable(module):
        raise RuntimeError("fxshear kernels='triton' was requested but Triton is not usable here")
    return triton_usable(module)


def triton_switch(module: str) -> Callable[[torch.Tensor, str], bool]:
    """``use_triton`` bound to one op family's Triton module: ``switch(t, impl)``."""
    return functools.partial(_use_triton_of, module)


def _use_triton_of(module: str, t: torch.Tensor, impl: str) -> bool:
    return use_triton(t, impl, module)
