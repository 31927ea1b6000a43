"""``fxshear::rev_mark``: an identity that names a tensor of a reversible block in the graph.

Under ``torch.compile`` a reversible block (fxshear.reversible) runs as plain ops; the joint-graph
rebuild (fxshear/graph/reversible.py) must still find each block's streams, F's and G's outputs
and the scaling remainders.  Each is passed through this op, with the block's index and the
tensor's role, so it survives AOTAutograd as one opaque node; the rebuild reads the marks and
then removes them.  ``aux`` carries a tensor only the backward needs (a remainder), which would
otherwise be dead code in the forward and removed before the joint graph exists.
"""

from __future__ import annotations

import torch

# Roles
IN1, IN2, F_OUT, G_OUT, Y1, Y2, OUT1, OUT2 = range(8)
ROLE_NAMES = ("in1", "in2", "f_out", "g_out", "y1", "y2", "out1", "out2")
#: the exact streams' fixed-point resolution (fxshear.reversible.coupling), here because the
#: joint-graph rebuild needs it too
GRID = 2.0**32


@torch.library.custom_op("fxshear::rev_mark", mutates_args=())
def rev_mark(x: torch.Tensor, aux: torch.Tensor | None, block: int, role: int, info: list[float]) -> torch.Tensor:
    """``x`` (a copy: a custom op may not return its input); ``aux`` is only kept alive;
    ``info`` = [λ, β, swap, keep_input] of the block."""
    return x.clone()


@rev_mark.register_fake
def _(x: torch.Tensor, aux: torch.Tensor | None, block: int, role: int, info: list[float]) -> torch.Tensor:
    return torch.empty_like(x)


def _backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
    return grad, None, None, None, None


rev_mark.register_autograd(_backward)


def mark(x: torch.Tensor, block: int, role: int, info: list[float], aux: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.fxshear.rev_mark(x, aux, block, role, info)
