"""Pass: attention's own saved tensors are pruned too (Back Razor's opt-in targets).

``prune_ops`` "softmax": ``softmax(x)`` becomes ``fxshear::pruned_softmax``, whose backward
reads the per-sample top-``keep_ratio`` copy of its output instead of the dense probabilities.
``prune_ops`` "attention": a batched matmul of two activations (``q @ kᵀ``, ``p @ v``) becomes
``fxshear::pruned_matmul``, which keeps a pruned copy of each operand the other's gradient needs.
Both are approximate in the *input* gradients too, unlike a pruned Linear; the reference work
reports them harmless at the keep ratios it uses, fidelity here is measured, not assumed.

These patterns exist only where attention is eager/math and not rebuilt in the backward, so the
config requires ``attention_recompute=False`` with these targets (the exact rebuild saves no
probabilities at all).  A matmul is left alone, with the reason logged, when an operand is a
graph input or a parameter (nothing to free), the operands broadcast, or the dense operand is
kept anyway by another op.  Runs after the Linear pruning pass, in graph order, softmax first, so
probabilities a pruned softmax produces count as freed for the matmul that reads them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..config import ShearConfig
from .base import PassReport, RewritePass, Walk, module_path
from .match import argument, call, is_float_tensor, is_function, is_method, outputs, requires_grad, tensor_value
from .prune import exclusion_reason, harmless_users, output_saving_producers, why_input_is_kept

NAME = "prune_attention"

_SOFTMAX = (torch.nn.functional.softmax, torch.softmax, torch.ops.aten.softmax.int)
_MATMUL = (torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)


def _ratio(node: torch.fx.Node, cfg: ShearConfig) -> tuple[float, str | None]:
    """The node's keep ratio, or a reason it is not pruned (exclusions, ratio 1)."""
    reason = exclusion_reason(node, cfg)
    if reason:
        return 1.0, reason
    ratio = cfg.keep_ratio_for(module_path(node))
    if ratio >= 1.0:
        return ratio, "keep_ratio 1.0: nothing to prune"
    return ratio, None


class PruneAttentionPass(RewritePass[torch.fx.Node]):
    """Rewrite softmaxes and activation-activation matmuls to keep pruned copies for backward."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.prune and bool({"attention", "softmax"} & set(cfg.prune_ops))

    # Softmaxes first: a pruned softmax's pack then serves the matmul that reads the probabilities.
    phases = ("softmax", "attention")

    def match(self, walk: Walk, node: torch.fx.Node) -> torch.fx.Node | None:
        if walk.phase not in walk.cfg.prune_ops:
            return None
        if walk.phase == "softmax":
            found = is_function(node, *_SOFTMAX) or is_method(node, "softmax")
        else:
            found = is_function(node, *_MATMUL) or is_method(node, "matmul", "bmm")
        return node if found else None

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: torch.fx.Node) -> None:
        # (tensor, ratio) -> its pruned (values, bits): an operand read by two matmuls is packed
        # once.  Each operand is skipped or pruned on its own, so these report for themselves.
        packs = walk.state.setdefault("packs", {})
        prune = self._softmax if walk.phase == "softmax" else self._matmul
        prune(walk.graph, node, walk.cfg, walk.report, packs)

    def _softmax(self, graph: torch.fx.Graph, node: torch.fx.Node, cfg: ShearConfig, report: PassReport,
                 packs: dict[tuple[torch.fx.Node, float], tuple[torch.fx.Node, torch.fx.Node]]) -> None:
        x = node.args[0] if node.args else node.kwargs.get("input")
        dim = argument(node, 1, "dim")
        # dtype is F.softmax's 4th argument, torch.softmax's and Tensor.softmax's 3rd.
        dtype_index = 3 if node.target is torch.nn.functional.softmax else 2
        dtype = argument(node, dtype_index, "dtype")
        value = tensor_value(x)
        if dtype is not None and (value is None or dtype != value.dtype):
            report.skip(node, "softmax casts to another dtype (dtype=); not pruned")
            return
        if not isinstance(dim, int):
            report.skip(node, "softmax dim is not a constant")
            return
        if not is_float_tensor(x) or value is None or value.dim() < 2:
            report.skip(node, "input is not a float tensor with a sample dimension")
            return
        if not requires_grad(x):
            report.skip(node, "no gradient flows through this softmax")
            return
        ratio, reason = _ratio(node, cfg)
        if reason:
            report.skip(node, reason)
            return
        with graph.inserting_before(node):
            pruned = call(graph, torch.ops.fxshear.pruned_softmax.default, (x, dim, ratio, cfg.kernels),
                          like=node, pass_name=self.name)
        y, values, bits = outputs(graph, pruned, 3, like=node, pass_name=self.name)
        packs[y, ratio] = (values, bits)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        report.rewritten.append(f"{node.name}: softmax output pruned (keep {ratio:g})"
                                + (f" in {module_path(pruned)}" if module_path(pruned) else ""))

    def _matmul(self, graph: torch.fx.Graph, node: torch.fx.Node, cfg: ShearConfig, report: PassReport,
                packs: dict[tuple[torch.fx.Node, float], tuple[torch.fx.Node, torch.fx.Node]]) -> None:
        if len(node.args) != 2 or node.kwargs:
            report.skip(node, "matmul call with extra arguments")
            return
        a, b = node.args
        if not all(isinstance(t, torch.fx.Node) and is_float_tensor(t) for t in (a, b)):
            report.skip(node, "an operand is not an fp32/fp16/bf16 tensor")
            return
        if any(t.op in ("placeholder", "get_attr") for t in (a, b)):
            report.skip(node, "an operand is a graph input or parameter (kept alive by the caller anyway)")
            return
        a_value, b_value = tensor_value(a), tensor_value(b)
        if (a_value.dim() < 3 or a_value.dim() != b_value.dim() or a_value.shape[:-2] != b_value.shape[:-2]):
            report.skip(node, "not a batched matmul of equal batch dims (broadcasting is not pruned)")
            return
        # a's copy serves b's gradient and vice versa.
        wanted = [t for t, other in ((a, b), (b, a)) if requires_grad(other)]
        if not wanted:
            report.skip(node, "no operand needs a gradient")
            return
        ratio, reason = _ratio(node, cfg)
        if reason:
            report.skip(node, reason)
            return
        saving, harmless = output_saving_producers(), harmless_users()
        for operand in wanted:
            kept = why_input_is_kept(operand, saving, harmless, rewriting=node)
            if kept:
                report.skip(node, kept.replace("its input", f"operand {operand.name}"))
                return
        args: list[object] = []
        for operand in (a, b):
            if operand not in wanted:
                args += [None, None]
                continue
            key = (operand, ratio)
            if key not in packs:
                with graph.inserting_before(node):
                    packed = call(graph, torch.ops.fxshear.prune_pack.default, (operand, ratio, cfg.kernels),
                                  like=node, pass_name=self.name)
                packs[key] = tuple(outputs(graph, packed, 2, like=node, pass_name=self.name))
            args += list(packs[key])
        with graph.inserting_before(node):
            pruned = call(graph, torch.ops.fxshear.pruned_matmul.default, (a, b, *args, cfg.kernels),
                          like=node, pass_name=self.name)
        node.replace_all_uses_with(pruned)
        graph.erase_node(node)
        names = " and ".join(t.name for t in wanted)
        report.rewritten.append(f"{pruned.name}: matmul keeps pruned {names} (keep {ratio:g})"
                                + (f" in {module_path(pruned)}" if module_path(pruned) else ""))
