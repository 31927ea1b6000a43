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
from .base import PASS_META_KEY, PassReport, example_value, excluded, module_types
from .match import activation_kind, inplace_activation

NAME = "act2bit"

class Act2BitPass:
    """Rewrite GELU/SiLU into ``fxshear::act2bit`` where a gradient flows through them."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.act2bit and bool(cfg.act2bit_ops)

    def run(self, gm: torch.fx.GraphModule, cfg: ShearConfig) -> PassReport:
        report = PassReport(self.name)
        graph = gm.graph
        seen_modules: set[str] = set()
        for node in list(graph.nodes):
            matched = activation_kind(node)
            if matched is None:
                continue
            seen_modules.update(path for path, _ in module_types(node))
            kind, approximate = matched
            reason = self._why_not(node, kind, approximate, cfg)
            if reason:
                report.skip(node, reason)
                continue
            source = node.args[0] if node.args else node.kwargs["input"]
            with graph.inserting_after(node):
                fused = graph.call_function(
                    torch.ops.fxshear.act2bit.default, (source, kind, approximate, _impl(cfg))
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
            report.rewritten.append(f"{node.name} ({kind}{'' if approximate == 'none' else ', tanh'})")
        self._note_unmatched_modules(graph, seen_modules, report)
        graph.lint()
        gm.recompile()
        return report

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

    @staticmethod
    def _why_not(node: torch.fx.Node, kind: str, approximate: str, cfg: ShearConfig) -> str | None:
        if kind not in cfg.act2bit_ops:
            return f"{kind} is not in act2bit_ops"
        if inplace_activation(node):
            return "in-place activation: its input may be read again after being overwritten"
        if approximate not in ("none", "tanh"):
            return f"unknown GELU approximation {approximate!r}"
        pattern = excluded(node, cfg)
        if pattern:
            return f"module excluded by pattern {pattern!r}"
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
