"""fxshear's rewrites, one per module. The backend runs them in the order of ``PASSES``."""

from .act2bit import Act2BitPass
from .base import GraphPass, PassReport, Skip

PASSES: tuple[GraphPass, ...] = (Act2BitPass(),)

__all__ = ["PASSES", "Act2BitPass", "GraphPass", "PassReport", "Skip"]
