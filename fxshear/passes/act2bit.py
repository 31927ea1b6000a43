"""Pass: GELU / SiLU keep a 2-bit code for backward instead of a dense tensor (Approx-BP).

Matches the activation calls Dynamo records (``torch._C._nn.gelu``, ``F.silu`` and their aten
forms) and replaces each with ``fxshear::act2bit``, whose forward is exact and whose backward is
the published 4-level step derivative.  The next Linear still saves the activation's output, so
the win is ``output + codes`` in place of ``input + output``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..config import ShearConfig
from ..kernels.infra.numbers import FLOAT_DTYPES
from .base import PASS_META_KEY, PassReport, RewritePass, Walk, example_value, module_types
from .match import activation_blocker, activation_kind

NAME = "act2bit"

class Act2BitPass(RewritePass[tuple[str, str]]):
    """Rewrite GELU/SiLU into ``fxshear::act2bit`` where a gradient flows through them."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.act2bit and bool(cfg.act2bit_ops)

    def match(self, walk: Walk, node: torch.fx.Node) -> tuple[str, str] | None:
        found = activation_kind(node)
        if found is not None:
            walk.state.setdefault("seen_modules", set()).update(path for path, _ in module_types(node))
        return found

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: tuple[str, str]) -> str:
        kind, approximate = found
        graph = walk.graph
        source = node.args[0] if node.args else node.kwargs["input"]
        with graph.inserting_after(node):
            fused = graph.call_function(
                torch.ops.fxshear.act2bit.default, (source, kind, approximate, _impl(walk.cfg))
            )
        with graph.inserting_after(fused):
            output = graph.call_function(operator.getitem, (fused, 0))
        for new in (fused, output):
            new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
            new.meta[PASS_META_KEY] = self.name
        value = example_value(node)
        if value is not None:
            output.meta["example_value"] = value
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        return f"{node.name} ({kind}{'' if approximate == 'none' else ', tanh'})"

    def finish(self, walk: Walk) -> None:
        self._note_unmatched_modules(walk.graph, walk.state.get("seen_modules", set()), walk.report)

    @staticmethod
    def _note_unmatched_modules(graph: torch.fx.Graph, seen: set[str], report: PassReport) -> None:
        """Activation modules whose math is written out by hand (GPT-2's gelu_new) are not
        matched; say so rather than leave the user guessing why nothing changed."""
        unmatched: dict[str, str] = {}
        for node in graph.nodes:
            for path, type_name in module_types(node):
                if path not in seen and any(k in type_name.upper() for k in ("GELU", "SILU", "SWISH")):
                    unmatched.setdefault(path, type_name)
        for path, type_name in unmatched.items():
            report.note(f"{path} ({type_name}) computes its activation from elementary ops; not matched")

    def why_not(self, walk: Walk, node: torch.fx.Node, found: tuple[str, str]) -> str | None:
        kind, approximate = found
        cfg = walk.cfg
        if kind not in cfg.act2bit_ops:
            return f"{kind} is not in act2bit_ops"
        reason = activation_blocker(node, approximate, cfg)
        if reason:
            return reason
        value = example_value(node)
        if not isinstance(value, torch.Tensor):
            return "no tensor metadata recorded for this node"
        if value.dtype not in FLOAT_DTYPES:
            return f"dtype {value.dtype} is not fp32/fp16/bf16"
        if not value.requires_grad:
            return "no gradient flows through it, so nothing is saved for backward"
        return None


def _impl(cfg: ShearConfig) -> str:
    return cfg.kernels
