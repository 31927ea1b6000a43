"""Pass: a Linear's saved input is pruned per sample to its largest entries (Back Razor).

``o = linear(x, W, b)`` becomes ``values, bits = fxshear::prune_pack(x, ratio)`` and
``o = fxshear::pruned_linear(x, values, bits, W, b)``: the forward is unchanged and dense, the
backward reads the pruned copy for ``dW`` and ``W`` for ``dx`` (exact).  Linears that read one
``x`` with one ratio share one pruned copy (a LoRA A and its siblings prune their input once).

Pruning only pays where the dense ``x`` is not kept anyway, so the pass leaves a Linear alone
when something else may keep ``x`` for its backward: a producer that saves its own output
(softmax, sigmoid, tanh, exp, fxshear's output-saving activations) or another user that is not
a Linear, a dropout or an addition.  It runs after the exact rewrites, so a norm output shared
with its Linears (``share_norms``) is never pruned: the norm's backward needs it dense.
"""

from __future__ import annotations

import fnmatch
import operator
from collections import defaultdict

import torch
import torch.fx

from ..config import ShearConfig
from .base import RewritePass, Walk, excluded, module_path
from .match import LINEAR_FUNCTIONS, call, is_float_tensor, linear_parts, outputs, requires_grad, tensor_value

NAME = "prune"


def output_saving_producers() -> set[object]:
    ops = {torch.softmax, torch.nn.functional.softmax, torch.sigmoid, torch.tanh, torch.exp,
           torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, torch.ops.aten.sigmoid.default,
           torch.ops.aten.tanh.default, torch.ops.aten.exp.default}
    ops.add(torch.ops.fxshear.act_from_output.default)
    ops |= {"softmax", "sigmoid", "tanh", "exp"}  # the same ops called as tensor methods
    return ops


def harmless_users() -> set[object]:
    """Ops that read x without keeping it for their backward."""
    users = set(LINEAR_FUNCTIONS) | {operator.add, operator.iadd, torch.add, operator.sub, torch.sub,
                                     torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor,
                                     torch.nn.functional.dropout, torch.dropout}
    fxshear = torch.ops.fxshear
    users |= {fxshear.dropout_draw.default, fxshear.dropout_apply.default, fxshear.pruned_linear.default,
              fxshear.prune_pack.default, fxshear.pruned_matmul.default, fxshear.pruned_softmax.default}
    return users


def producer(node: torch.fx.Node) -> object:
    """The op that made ``node``, seen through ``getitem`` of a multi-output op."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        return node.args[0].target
    return node.target if node.op in ("call_function", "call_method") else None


def exclusion_reason(node: torch.fx.Node, cfg: ShearConfig) -> str | None:
    """Why the node's module is not pruned by configuration (``exclude``, ``prune_exclude``)."""
    pattern = excluded(node, cfg)
    if pattern:
        return f"module excluded by pattern {pattern!r}"
    path = module_path(node)
    for pattern in cfg.prune_exclude:
        if fnmatch.fnmatchcase(path, pattern):
            return f"module excluded from pruning by pattern {pattern!r}"
    return None


def why_input_is_kept(x: torch.fx.Node, saving: set[object], harmless: set[object],
                      rewriting: torch.fx.Node | None = None) -> str | None:
    """Why the dense x stays saved whatever this pass does (then a pruned copy only adds).

    ``rewriting`` is the user about to be replaced by its pruned form (not counted)."""
    if producer(x) in saving:
        return f"its input is kept dense by its producer ({producer(x)}) for that op's backward"
    for user in x.users:
        if user is rewriting or (user.op == "call_function" and user.target in harmless):
            continue
        if user.op == "output":
            continue
        return f"its input is also read by {user.target}, which may keep it for its backward"
    return None


class PrunePass(RewritePass[tuple[torch.fx.Node, torch.fx.Node, object]]):
    """Rewrite Linears whose input is kept only for their weight gradient into pruned Linears."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.prune and "linear" in cfg.prune_ops

    def match(self, walk: Walk, node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, object] | None:
        return linear_parts(node)

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: tuple[torch.fx.Node, torch.fx.Node, object]) -> None:
        # Grouped by input and ratio: one pruned copy serves every Linear reading that input.
        groups = walk.state.setdefault("groups", defaultdict(list))
        groups[found[0], walk.cfg.keep_ratio_for(module_path(node))].append(node)

    def finish(self, walk: Walk) -> None:
        graph, cfg, report = walk.graph, walk.cfg, walk.report
        groups: dict[tuple[torch.fx.Node, float], list[torch.fx.Node]] = walk.state.get("groups", {})
        saving, harmless = output_saving_producers(), harmless_users()
        # A pruned Linear's output may be another group's input (LoRA A feeding LoRA B): groups run
        # in graph order, and a group whose input was rewritten reads the rewritten node.
        replaced: dict[torch.fx.Node, torch.fx.Node] = {}
        for (x, ratio), linears in groups.items():
            x = replaced.get(x, x)
            reason = why_input_is_kept(x, saving, harmless)
            if reason:
                for linear in linears:
                    report.skip(linear, reason)
                continue
            first = linears[0]  # grouped in graph order
            with graph.inserting_before(first):
                packed = call(graph, torch.ops.fxshear.prune_pack.default, (x, ratio, cfg.kernels),
                              like=first, pass_name=self.name)
            values, bits = outputs(graph, packed, 2, like=first, pass_name=self.name)
            paths = []
            for linear in linears:
                _, weight, bias = linear_parts(linear)
                with graph.inserting_before(linear):
                    pruned = call(graph, torch.ops.fxshear.pruned_linear.default,
                                  (x, values, bits, weight, bias, cfg.kernels), like=linear, pass_name=self.name)
                paths.append(module_path(linear) or linear.name)
                replaced[linear] = pruned
                linear.replace_all_uses_with(pruned)
                graph.erase_node(linear)
            # One entry per pruned copy: Linears reading one input (a LoRA A per adapter) share it.
            report.rewritten.append(f"{x.name} pruned once (keep {ratio:g}) for {len(linears)} linear: "
                                    + ", ".join(paths))

    def why_not(self, walk: Walk, node: torch.fx.Node, found: tuple[torch.fx.Node, torch.fx.Node, object]) -> str | None:
        x, weight, _ = found
        cfg = walk.cfg
        reason = exclusion_reason(node, cfg)
        if reason:
            return reason
        path = module_path(node)
        if not requires_grad(weight):
            return "frozen weight: the Linear saves nothing for a weight gradient"
        if not is_float_tensor(x):
            return "input is not an fp32/fp16/bf16 tensor"
        value = tensor_value(x)
        if value is None or value.dim() < 2:
            return "input has no sample dimension"
        if cfg.keep_ratio_for(path) >= 1.0:
            return "keep_ratio 1.0: nothing to prune"
        return None
