"""Joint-graph edits for per-step freezing (docs/design.md §6).

Two edits, both made on the joint forward+backward graph just before the min-cut, so they work
whatever the torch-IR passes made of a Linear (plain, shared-norm, pruned, LoRA):

* :func:`drop_gradients` — a *mask variant*: the gradient outputs of frozen parameters become
  ``None`` and dead code is removed, so their weight-gradient matmuls vanish and every tensor
  that only those matmuls read (a frozen Linear's input, its pruned pack) stops being saved.
  One compile per mask.
* :func:`gate_gradients` — the weight-gradient matmuls of the other parameters go behind
  ``fxshear::gated_mm``, which skips them at run time when the parameter arrives frozen.  One
  graph then serves every mask with the compute saving (not the memory saving).

Primal ``i`` of the joint graph is input ``i`` of the graph Dynamo handed the backend, and the
joint's outputs after ``num_fwd_outputs`` are the gradients of the primals in that order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx


def _gated_targets() -> dict[object, object]:
    """Ops that compute a weight gradient, each with its gated twin (the weight as last argument)."""
    return {torch.ops.aten.mm.default: torch.ops.fxshear.gated_mm.default,
            torch.ops.fxshear.pruned_weight_grad.default: torch.ops.fxshear.gated_pruned_weight_grad.default,
            torch.ops.fxshear.dropout_input_weight_grad.default:
                torch.ops.fxshear.gated_dropout_input_weight_grad.default}


@dataclass
class GateReport:
    """What :func:`gate_gradients` did: gated matmuls per primal index, and primals it could not gate."""

    gated: dict[int, int] = field(default_factory=dict)
    ungated: dict[int, str] = field(default_factory=dict)


def _output_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def primals(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The joint graph's primal placeholders, in input order (tangents excluded)."""
    return [n for n in gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]


def gradient_outputs(gm: torch.fx.GraphModule, num_fwd_outputs: int) -> list[object]:
    return list(_output_node(gm).args[0][num_fwd_outputs:])


def drop_gradients(gm: torch.fx.GraphModule, num_fwd_outputs: int, indices: Iterable[int]) -> int:
    """Make the gradients of primals ``indices`` ``None``; remove what only they needed.

    Returns how many gradient outputs were dropped (an index whose gradient already is ``None``
    does not count).
    """
    output = _output_node(gm)
    outs = list(output.args[0])
    dropped = 0
    for i in indices:
        position = num_fwd_outputs + i
        if position < len(outs) and outs[position] is not None:
            outs[position] = None
            dropped += 1
    if dropped:
        output.args = (type(output.args[0])(outs),)
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return dropped


def _depends_on_tangents(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes computed from a tangent: the backward half of the joint graph."""
    backward: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith("tangents"):
                backward.add(node)
        elif any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    return backward


def _exclusive_cone(order: list[torch.fx.Node], position: dict[torch.fx.Node, int],
                    root: torch.fx.Node) -> set[torch.fx.Node]:
    """``root`` and every node whose users all lie in the cone: what only this gradient needs.

    ``order`` is the graph's nodes in order and ``position`` their index in it."""
    cone = {root}
    for node in reversed(order[: position[root]]):
        if node.op == "call_function" and node.users and all(u in cone for u in node.users):
            cone.add(node)
    return cone


def _append_eager_input(node: torch.fx.Node, weight: torch.fx.Node) -> None:
    """Keep ``eager_input_vals`` in step with the node's new argument list.

    Why: Inductor lays out a custom op's inputs as its eager call saw them, read from this meta
    and normalized against the op's schema; left at the ungated op's arguments it no longer
    matches the gated schema (one argument more) and lowering fails.
    """
    recorded = node.meta.get("eager_input_vals")
    if recorded is None:
        return
    args, kwargs = recorded
    node.meta["eager_input_vals"] = ((*args, weight.meta.get("val")), kwargs)


def gate_gradients(gm: torch.fx.GraphModule, num_fwd_outputs: int, indices: Iterable[int]) -> GateReport:
    """Put the weight-gradient matmuls of primals ``indices`` behind ``fxshear::gated_mm``.

    A matmul is gated only when it lies in the backward, and nothing but this primal's gradient
    reads it; a primal whose gradient has no such matmul is reported in ``ungated`` with why.
    """
    report = GateReport()
    targets = _gated_targets()
    placeholders = primals(gm)
    outs = gradient_outputs(gm, num_fwd_outputs)
    backward = _depends_on_tangents(gm)
    order = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(order)}
    changed = False
    for i in indices:
        grad = outs[i] if i < len(outs) else None
        if not isinstance(grad, torch.fx.Node):
            report.ungated[i] = "no gradient output"
            continue
        cone = _exclusive_cone(order, position, grad)
        matmuls = [n for n in order if n in cone and n.op == "call_function" and n.target in targets
                   and n in backward]
        if not matmuls:
            report.ungated[i] = "its gradient is computed without a matmul only it uses"
            continue
        weight = placeholders[i]
        for node in matmuls:
            node.target = targets[node.target]
            node.args = (*node.args, weight)
            _append_eager_input(node, weight)
        report.gated[i] = len(matmuls)
        changed = True
    if changed:
        gm.recompile()
    return report
