"""Pass: dropout keeps its mask at 1 bit per element instead of one byte.

``F.dropout(x)`` becomes ``fxshear::dropout_apply(x, fxshear::dropout_draw(x))``.  The draw makes
the calls eager ``F.dropout`` makes on the global generator, so a seeded run gives the same
masks and gradients as eager; plain torch.compile re-draws masks with Inductor's own generator.
Backward needs only the packed bits, and the output can be recomputed from x and the bits.  Every
training-mode dropout of the graph is rewritten, even one no gradient flows through (a frozen
embedding's): a single dropout left to Inductor would draw from its generator instead.
"""

from __future__ import annotations

import torch
import torch.fx

from ..config import ShearConfig
from .base import RewritePass, Walk, excluded
from .match import call, dropout_arguments, is_float_tensor

NAME = "dropout_bits"


class DropoutBitsPass(RewritePass[tuple[torch.fx.Node, object, object, object]]):
    """Rewrite training-mode dropout into ``fxshear::dropout_draw`` + ``fxshear::dropout_apply``."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.dropout_bits

    def match(self, walk: Walk, node: torch.fx.Node) -> tuple[torch.fx.Node, object, object, object] | None:
        return dropout_arguments(node)

    def why_not(self, walk: Walk, node: torch.fx.Node, found: tuple[torch.fx.Node, object, object, object]) -> str | None:
        x, p, training, inplace = found
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not isinstance(training, bool):
            return "p or training is not a constant"
        if not training or p == 0:
            return "dropout is the identity here (eval mode or p=0); nothing is saved"
        if inplace:
            return "in-place dropout"
        if not 0 < p < 1:
            return f"p={p} outside (0, 1)"
        pattern = excluded(node, walk.cfg)
        if pattern:
            return f"module excluded by pattern {pattern!r}"
        if not is_float_tensor(x):
            return "input is not an fp32/fp16/bf16 tensor"
        # Dropouts no gradient flows through are rewritten too: they save nothing either way, but
        # left to Inductor they would draw from its generator and shift every later mask.
        return None

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: tuple[torch.fx.Node, object, object, object]) -> str:
        x, p, _, _ = found
        graph, cfg = walk.graph, walk.cfg
        with graph.inserting_before(node):
            bits = call(graph, torch.ops.fxshear.dropout_draw.default,
                        (x, float(p), cfg.kernels, cfg.dropout_rng), like=node, pass_name=self.name)
            y = call(graph, torch.ops.fxshear.dropout_apply.default, (x, bits, float(p), cfg.kernels),
                     like=node, pass_name=self.name)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        return f"{node.name} (p={float(p):g})"
