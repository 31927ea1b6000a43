"""Pass: GELU / SiLU backward from the saved output plus a 1-bit branch flag (exact counterpart
of the 2-bit codes).

Why: the Linear after the activation saves the activation's output for its weight gradient
anyway.  GELU and SiLU are invertible on either side of their single minimum, so that output and
one bit saying which side recover the input, and with it the exact derivative.  Inductor would
otherwise keep the dense pre-activation as well.

Near the minimum the inversion is ill-conditioned; ``kernels.act_from_output.EXACT_DTYPES``
lists the dtypes where the largest derivative error is at the level of the dtype's own rounding
(measured by ``benchmarks/act_inversion_error.py``).  ``act_from_output="exact_dtypes"`` (the
exact preset) rewrites only those; ``"all"`` (balanced) rewrites every float dtype.
"""

from __future__ import annotations

import torch
import torch.fx

from ..config import ShearConfig
from .base import RewritePass, Walk
from .match import (
    activation_blocker,
    activation_kind,
    argument,
    call,
    is_float_tensor,
    is_function,
    linear_consumers,
    outputs,
    requires_grad,
    tensor_value,
)

NAME = "act_from_output"


def _exact_dtypes() -> frozenset[torch.dtype]:
    from ..kernels.act_from_output import EXACT_DTYPES

    return EXACT_DTYPES


def feeds_trainable_linear(node: torch.fx.Node) -> bool:
    """True when a Linear with a trainable weight (``F.linear``, GPT-2's Conv1D, or a shared
    Linear another pass made) reads ``node`` as its input, so that it is saved."""
    if linear_consumers(node):
        return True
    return any(is_function(user, torch.ops.fxshear.shared_linear.default) and user.args[0] is node
               and requires_grad(user.args[4]) for user in node.users)


class ActFromOutputPass(RewritePass[tuple[str, str]]):
    """Rewrite GELU/SiLU whose output a Linear saves into ``fxshear::act_from_output``."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.act_from_output != "off"

    def match(self, walk: Walk, node: torch.fx.Node) -> tuple[str, str] | None:
        return activation_kind(node)

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: tuple[str, str]) -> str:
        kind, approximate = found
        graph = walk.graph
        source = argument(node, 0, "input")
        with graph.inserting_before(node):
            fused = call(graph, torch.ops.fxshear.act_from_output.default,
                         (source, kind, approximate, walk.cfg.kernels), like=node, pass_name=self.name)
        y, _ = outputs(graph, fused, 2, like=node, pass_name=self.name)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        return f"{node.name} ({kind}{'' if approximate == 'none' else ', tanh'})"

    def why_not(self, walk: Walk, node: torch.fx.Node, found: tuple[str, str]) -> str | None:
        kind, approximate = found
        cfg = walk.cfg
        reason = activation_blocker(node, approximate, cfg)
        if reason:
            return reason
        if not is_float_tensor(node):
            return "not an fp32/fp16/bf16 tensor"
        if not requires_grad(node):
            return "no gradient flows through it, so nothing is saved for backward"
        dtype = tensor_value(node).dtype
        if cfg.act_from_output == "exact_dtypes" and dtype not in _exact_dtypes():
            return (f"in {str(dtype).removeprefix('torch.')} the inversion's derivative error near the "
                    "minimum exceeds the dtype's own rounding; act_from_output='all' (balanced) allows it")
        if not feeds_trainable_linear(node):
            return ("its output is not otherwise saved (no Linear with a trainable weight reads it), "
                    "so keeping it would not replace the saved input")
        return None
