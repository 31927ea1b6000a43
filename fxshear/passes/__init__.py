"""fxshear's rewrites, one per module. The backend runs them in the order of ``PASSES``.

The order matters where patterns overlap: the fused loss and attention take their whole pattern
(attention includes its dropout) before the single-op passes look; norms are shared before the
activation passes check which outputs a Linear saves; ``act_from_output`` claims the activations
it can invert exactly before ``act2bit`` approximates the rest.
"""

from .act2bit import Act2BitPass
from .act_from_output import ActFromOutputPass
from .attention import AttentionPass
from .base import GraphPass, PassReport, Skip
from .dropout_bits import DropoutBitsPass
from .fused_loss import FusedLossPass
from .share_norms import ShareNormsPass

PASSES: tuple[GraphPass, ...] = (
    FusedLossPass(),
    AttentionPass(),
    ShareNormsPass(),
    ActFromOutputPass(),
    Act2BitPass(),
    DropoutBitsPass(),
)

__all__ = ["PASSES", "Act2BitPass", "ActFromOutputPass", "AttentionPass", "DropoutBitsPass",
           "FusedLossPass", "GraphPass", "PassReport", "ShareNormsPass", "Skip"]
