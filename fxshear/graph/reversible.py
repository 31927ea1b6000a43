"""Reversible blocks in the compiled backward: rebuild each block's input from its output.

A reversible model (fxshear.reversible) compiled with ``invert=True`` reaches the joint graph
as ordinary ops plus ``fxshear::rev_mark`` nodes naming each block's streams (in1, in2), F's and
G's outputs, y1 and y2 (with the scaling remainders as their ``aux``) and the outputs after the
swap (out1, out2).  Left alone, the backward of block i reads block i's own forward tensors, so
the partitioner saves them all.  This edit, made on the joint graph before the min-cut, gives the
backward its own copies instead, computed from the block's *outputs*:

    y1*, y2*  = the rebuilt inputs of block i+1 (the saved outputs for the top block)
    x2*       = unscale(y2* − G*(y1*), r2)      G*: G's forward ops, copied, fed y1*
    x1*       = unscale(y1* − F*(x2*), r1)      F*: F's forward ops, copied, fed x2*

and every backward use of a block-i forward node is redirected to its copy.  Random draws and
the ops the partitioner never recomputes are not copied (their outputs, a 1-bit mask for a
dropout, stay saved).  Block i's copies are inserted just before block i's first backward op,
so one block's rebuilt tensors live at a time.  The partitioner then saves the top block's
outputs, the remainders and the masks: no block input.  The marks are removed afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

from ..kernels.reversible_mark import F_OUT, G_OUT, GRID, IN1, IN2, OUT1, OUT2, ROLE_NAMES, Y1, Y2
from .pins import never_recomputed

log = logging.getLogger("fxshear.reversible")
MUST_RECOMPUTE = CheckpointPolicy.MUST_RECOMPUTE


@dataclasses.dataclass
class RebuildReport:
    blocks: list[int] = dataclasses.field(default_factory=list)
    copied_nodes: int = 0
    redirected_uses: int = 0
    skipped: str | None = None


def _is_mark(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.fxshear.rev_mark.default


def _backward_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that depend on a tangent: the backward part of the joint graph."""
    backward: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith("tangents"):
                backward.add(node)
        elif node.op != "output" and any(arg in backward for arg in node.all_input_nodes):
            backward.add(node)
    return backward


def _region(ins: list[torch.fx.Node], outs: list[torch.fx.Node], backward: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Forward nodes downstream of a block's inputs but not past its outputs: the block's own
    computation, including what only its backward reads (a SiLU's sigmoid, say)."""

    def downstream(starts: list[torch.fx.Node], strict: bool) -> set[torch.fx.Node]:
        seen: set[torch.fx.Node] = set()
        stack = [u for s in starts for u in s.users] if strict else list(starts)
        while stack:
            node = stack.pop()
            if node in seen or node in backward or node.op == "output":
                continue
            seen.add(node)
            stack.extend(node.users)
        return seen

    return downstream(ins, strict=False) - downstream(outs, strict=True)


def _not_copied(node: torch.fx.Node) -> bool:
    """Ops whose forward output the backward must read, never recompute: random draws (a copy
    would draw anew) and what the partitioner pins (the fused loss, pruning's packs)."""
    if node.op != "call_function":
        return True
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
        return True
    return never_recomputed(target)


class _Rebuilder:
    def __init__(self, graph: torch.fx.Graph, marks: dict[tuple[int, int], torch.fx.Node],
                 backward: set[torch.fx.Node], factors: dict[int, tuple[float, float]]):
        self.graph = graph
        self.marks = marks
        self.backward = backward
        self.factors = factors
        self.copied = 0

    def _fake(self, target: Callable, *args: object) -> torch.fx.Node:
        """A new node whose ``val`` is computed from its arguments' fake values."""
        node = self.graph.call_function(target, args)
        vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
        fake_mode = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        with fake_mode:
            node.meta["val"] = target(*vals)
        node.meta["recompute"] = MUST_RECOMPUTE
        self.copied += 1
        return node

    def fresh(self, node: torch.fx.Node) -> torch.fx.Node:
        """A backward-side copy of a saved tensor (``aten.clone``)."""
        return self._fake(torch.ops.aten.clone.default, node)

    def unscale(self, scaled: torch.fx.Node, remainder: torch.fx.Node | None, factor: float) -> torch.fx.Node:
        """``fxshear.reversible.coupling.Coupling.unscale`` as graph nodes."""
        aten = torch.ops.aten
        if factor == 1.0:
            return scaled
        if remainder is None:  # exact=False: plain division
            return self._fake(aten.div.Tensor, scaled, factor)
        c = float(round(1.0 / factor))
        k = self._fake(aten.round.default, self._fake(aten.mul.Tensor, scaled, GRID))
        r = self._fake(torch.ops.prims.convert_element_type.default, remainder, torch.float64)
        return self._fake(aten.div.Tensor, self._fake(aten.add.Tensor, self._fake(aten.mul.Tensor, k, c), r), GRID)

    def rebuild_block(self, i: int, region: set[torch.fx.Node], y1: torch.fx.Node, y2: torch.fx.Node
                      ) -> tuple[dict[torch.fx.Node, torch.fx.Node], torch.fx.Node, torch.fx.Node]:
        memo: dict[torch.fx.Node, torch.fx.Node] = {}
        m = self.marks
        memo[m[(i, Y1)]] = y1
        memo[m[(i, Y2)]] = y2

        def copy(node: torch.fx.Node) -> torch.fx.Node:
            if node in memo:
                return memo[node]
            if node not in region or _not_copied(node):
                return node
            new = self.graph.node_copy(node, lambda a: copy(a))
            new.meta = dict(node.meta)
            # a copy belongs to the backward: the min-cut must not compute it in the forward and
            # save it (it would, for the matmuls it bans from recompute)
            new.meta["recompute"] = MUST_RECOMPUTE
            self.copied += 1
            memo[node] = new
            return new

        lam, beta = self.factors[i]
        aten = torch.ops.aten
        g = copy(m[(i, G_OUT)])
        x2 = self.unscale(self._fake(aten.sub.Tensor, y2, g), m[(i, Y2)].args[1], beta)
        memo[m[(i, IN2)]] = x2
        f = copy(m[(i, F_OUT)])
        x1 = self.unscale(self._fake(aten.sub.Tensor, y1, f), m[(i, Y1)].args[1], lam)
        memo[m[(i, IN1)]] = x1
        for node in list(region):
            if any(user in self.backward for user in node.users):
                copy(node)
        return memo, x1, x2


def _rebuild(graph: torch.fx.Graph, marks: dict[tuple[int, int], torch.fx.Node], report: RebuildReport) -> None:
    """The edit itself (module docstring); says in ``report`` what it did or why it did nothing."""
    blocks = sorted({block for block, _ in marks})
    missing = [(b, ROLE_NAMES[r]) for b in blocks for r in range(8) if (b, r) not in marks]
    if missing:
        report.skipped = f"marks missing for {missing[:4]}: the reversible stack is not whole in this graph"
        return
    factors: dict[int, tuple[float, float]] = {}
    swaps: dict[int, bool] = {}
    kept: set[int] = set()
    for (b, _), node in marks.items():
        lam, beta, swap, keep = node.args[4]
        factors[b], swaps[b] = (float(lam), float(beta)), bool(swap)
        if keep:
            kept.add(b)
    backward = _backward_nodes(graph)
    order = {node: k for k, node in enumerate(graph.nodes)}
    regions = {b: _region([marks[(b, IN1)], marks[(b, IN2)]], [marks[(b, OUT1)], marks[(b, OUT2)]], backward)
               for b in blocks}
    first_use: dict[int, torch.fx.Node] = {}
    for b in blocks:
        users = [u for n in regions[b] for u in n.users if u in backward]
        if users:
            first_use[b] = min(users, key=order.__getitem__)
    if not first_use:
        report.skipped = "no backward op reads the reversible blocks"
        return
    # one insertion point per block, top block first; fall back to one shared point if the
    # backward does not visit the blocks top-down
    points = [first_use[b] for b in reversed(blocks) if b in first_use]
    monotone = all(order[a] <= order[b] for a, b in zip(points, points[1:]))
    shared = min(points, key=order.__getitem__)
    rebuilder = _Rebuilder(graph, marks, backward, factors)
    rebuilt_in: dict[int, tuple[torch.fx.Node, torch.fx.Node]] = {}
    for b in reversed(blocks):
        if b + 1 in kept:  # checkpoint_every: the block above kept its input (saved)
            outs = marks[(b + 1, IN1)], marks[(b + 1, IN2)]
        elif b + 1 in rebuilt_in:
            outs = rebuilt_in[b + 1]
        else:  # the top block (of this graph): its outputs are saved
            outs = marks[(b, OUT1)], marks[(b, OUT2)]
        saved = b + 1 in kept or b + 1 not in rebuilt_in
        y1, y2 = (outs[1], outs[0]) if swaps[b] else outs
        with graph.inserting_before(first_use.get(b, shared) if monotone else shared):
            if saved:
                # saved forward tensors: copied once more in the backward, so that the copies of
                # F and G differ from the forward's ops and the partitioner's CSE does not merge
                # them back (it would, and then save their outputs)
                y1, y2 = rebuilder.fresh(y1), rebuilder.fresh(y2)
            memo, x1, x2 = rebuilder.rebuild_block(b, regions[b], y1, y2)
        rebuilt_in[b] = (x1, x2)
        for node in regions[b]:
            for user in list(node.users):
                if user in backward:
                    user.replace_input_with(node, memo.get(node, node))
                    report.redirected_uses += 1
        report.blocks.append(b)
    report.copied_nodes = rebuilder.copied


def rebuild_reversible_blocks(gm: torch.fx.GraphModule) -> RebuildReport:
    """Edit a joint graph so each reversible block's backward reads rebuilt tensors (see module
    docstring); then remove the marks.  Each mark carries its block's [λ, β, swap, keep_input]."""
    graph = gm.graph
    report = RebuildReport()
    marks = {(int(node.args[2]), int(node.args[3])): node for node in graph.nodes if _is_mark(node)}
    if not marks:
        return report
    _rebuild(graph, marks, report)
    for node in list(graph.nodes):  # the marks and their copies
        if _is_mark(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    if report.skipped:
        log.info("fxshear: reversible blocks kept their saved inputs: %s", report.skipped)
    else:
        log.info("fxshear: rebuilt the inputs of reversible blocks %s in the backward (%d ops copied, %d uses)",
                 report.blocks, report.copied_nodes, report.redirected_uses)
    return report
