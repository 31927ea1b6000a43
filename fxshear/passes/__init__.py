"""fxshear's rewrites, one per module. The backend runs them in the order of ``PASSES``.

The order matters where patterns overlap: hand-written GELU/SiLU formulas become library calls
first, so every later pass sees one activation op; the fused loss and attention take their whole pattern
(attention includes its dropout) before the single-op passes look; norms are shared before the
activation passes check which outputs a Linear saves; ``act_from_output`` claims the activations
it can invert exactly before ``act2bit`` approximates the rest; pruning comes last, when it is
known which Linear inputs nothing else keeps dense, and attention's own tensors (opt-in) after
the Linears.
"""

from .act2bit import Act2BitPass
from .act_from_output import ActFromOutputPass
from .attention import AttentionPass
from .base import GraphPass, PassReport, Skip
from .dropout_bits import DropoutBitsPass
from .fused_loss import FusedLossPass
from .gelu_formula import GeluFormulaPass
from .prune import PrunePass
from .prune_attention import PruneAttentionPass
from .share_norms import ShareNormsPass

PASSES: tuple[GraphPass, ...] = (
    GeluFormulaPass(),
    FusedLossPass(),
    AttentionPass(),
    ShareNormsPass(),
    ActFromOutputPass(),
    Act2BitPass(),
    DropoutBitsPass(),
    PrunePass(),
    PruneAttentionPass(),
)

__all__ = ["PASSES", "Act2BitPass", "ActFromOutputPass", "AttentionPass", "DropoutBitsPass",
           "FusedLossPass", "GeluFormulaPass", "GraphPass", "PassReport", "PruneAttentionPass", "PrunePass", "ShareNormsPass", "Skip"]
