"""The steered partition: Inductor's min-cut, under fxshear's memory budget, recorded per region.

Why wrap rather than replace: Inductor's min-cut already trades recompute for memory well; fxshear
composes with it (``memory_budget`` drives ``activation_memory_budget``) and reads its result.
Its ``uuid()`` hashes fxshear's own sources and the config, because neither custom-op bodies
nor backward formulas are in Inductor's cache key.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ..compat import CustomPartitionerFn, activation_memory_budget, get_hash_for_files, min_cut_rematerialization_partition
from ..config import ShearConfig
from ..log import log
from ..sources import fxshear_source_files
from ..freezing.joint import drop_gradients, gate_gradients
from .pins import never_recomputed as _never_recomputed
from .reversible import rebuild_reversible_blocks


@dataclass
class Partition:
    """What one min-cut produced, as the region needs it for its ledger and its report.

    The readable graphs are rendered at once, and the recorder must read ``forward`` before
    returning: Inductor goes on to compile (and mutate) the forward and backward modules.
    """

    forward: torch.fx.GraphModule
    num_fwd_outputs: int
    static_input_indices: list[int] | None
    readable: dict[str, str]
    effective_budget: float | None = None


def readable_graph(gm: torch.fx.GraphModule) -> str:
    """The graph as annotated Python, the form used for diffs."""
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False)
    except TypeError:  # older signature
        return gm.print_readable(print_output=False)


#: Set by the backend while it compiles a region; the partitioner hands its result to it.
current_recorder: contextvars.ContextVar[Callable[[Partition], None] | None] = contextvars.ContextVar(
    "fxshear_partition_recorder", default=None
)



def _bytes(node: object) -> int:
    """A node's tensor bytes; symbolic sizes at their hint, as the ledger counts them."""
    from .ledger import _as_int

    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return _as_int(value.numel()) * value.element_size() if isinstance(value, torch.Tensor) else 0


@dataclass(frozen=True)
class SavedSizes:
    """What one partition saves, the way PyTorch's memory budget counts it.

    ``saved``: every tensor the partition saves, inputs (parameters) included; ``inputs``: every
    forward input (what budget 0 would save).  A budget ``b`` lets the knapsack save at most
    ``inputs + b * (saved_at_1 - inputs)``.  ``activations``: the saved tensors that are not
    forward inputs, i.e. the memory a partition adds (a saved parameter exists anyway); budgets
    are compared in these bytes.
    """

    saved: int
    inputs: int
    activations: int = 0


def saved_sizes(forward: torch.fx.GraphModule, num_fwd_outputs: int) -> SavedSizes:
    from .ledger import alias_root

    output = next(n for n in reversed(forward.graph.nodes) if n.op == "output")
    saved_nodes = [n for n in output.args[0][num_fwd_outputs:] if isinstance(n, torch.fx.Node)]
    placeholders = [n for n in forward.graph.nodes if n.op == "placeholder"]
    saved = sum(_bytes(n) for n in saved_nodes)
    inputs = sum(_bytes(n) for n in placeholders)
    # Activations exactly as the ledger (and the run-time count) see them: a saved view keeps
    # its whole base alive, each base counted once, and a view of an input costs nothing.
    roots = {alias_root(n) for n in saved_nodes}
    activations = sum(_bytes(root) for root in roots if root.op != "placeholder")
    return SavedSizes(saved=saved, inputs=inputs, activations=activations)


def rescaled_budget(budget: float, reference: SavedSizes, own: SavedSizes) -> float:
    """The fraction of this graph's range whose byte limit is what plain Inductor actually
    saved at ``budget`` (``reference``); 1.0 when this graph's runtime-optimal set is smaller."""
    span = own.saved - own.inputs
    if span <= 0:
        return budget
    fraction = (reference.saved - own.inputs) / span
    return min(1.0, max(fraction, MIN_FRACTION))


# Trial partitions after the first two: each halves the interval of candidate fractions.
BISECTION_STEPS = 6
MIN_FRACTION = 1e-6


class ShearPartitioner(CustomPartitionerFn):
    """min-cut under the config's memory budget; reports the partition to the compiling region.

    ``reference`` is what the *unrewritten* graph saves under Inductor's own partition at the
    same budget.  PyTorch's budget is a fraction of a graph's own range between saving only its
    inputs and its runtime-optimal saved set; after fxshear's rewrites that set is smaller, so
    the same fraction would be a tighter byte target than plain torch.compile gets, bought with
    more recompute.  With a reference, budget ``b`` means "save no more than torch.compile saves
    at ``b``", and the fraction passed on is the largest one of this graph's range that does.
    """

    def __init__(self, cfg: ShearConfig, reference: SavedSizes | None = None, *,
                 frozen: frozenset[int] = frozenset(), gated: frozenset[int] = frozenset()) -> None:
        """``frozen``: input indices whose gradients this partition drops (a mask variant);
        ``gated``: input indices whose weight-gradient matmuls are skipped at run time when the
        input arrives frozen (see :mod:`fxshear.freezing.joint`)."""
        self.cfg = cfg
        self.reference = reference
        self.frozen = frozenset(frozen)
        self.gated = frozenset(gated) - self.frozen
        self.effective_budget: float | None = cfg.memory_budget
        self.gate_report = None
        self.reversible_report = None

    def _trial(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], kwargs: dict[str, Any],
               fraction: float) -> SavedSizes:
        """What the min-cut saves at ``fraction``, on a copy of the (already pinned) joint graph."""
        with activation_memory_budget(fraction):
            forward, _ = min_cut_rematerialization_partition(copy_joint(gm), joint_inputs, **kwargs)
        return saved_sizes(forward, int(kwargs["num_fwd_outputs"]))

    def _budget(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], kwargs: dict[str, Any],
                keeps_some: bool) -> float | None:
        """The largest fraction at which this graph saves no more than the reference.

        Budget 0.0 on a graph with pinned or random ops becomes :data:`MIN_FRACTION`: PyTorch's
        partitioner reads exactly 0.0 as "save the forward inputs" and returns before it looks at
        any MUST_SAVE mark or recompute ban, so every random draw would be recomputed in the
        backward with fresh randomness (a wrong gradient).  The smallest positive fraction runs its
        knapsack instead, which still recomputes everything it may, and keeps what must be kept.

        The saved bytes are a step function of the fraction (the partitioner first tries a few
        fixed recompute heuristics and returns the first one under the limit, and only then runs
        its knapsack), so a linear rescale of the range can land far below the reference, paying
        for bytes nobody asked to free with recompute.  A short bisection over trial partitions
        finds the least recompute that still meets the reference.
        """
        budget = self.cfg.memory_budget
        if budget == 0.0 and keeps_some:
            return MIN_FRACTION
        if budget is None or not 0.0 < budget < 1.0 or self.reference is None:
            return budget
        target = self.reference.activations
        full = self._trial(gm, joint_inputs, kwargs, 1.0)
        if full.activations <= target:
            return 1.0
        estimate = rescaled_budget(budget, self.reference, full)
        if self._trial(gm, joint_inputs, kwargs, estimate).activations <= target:
            low, high = estimate, 1.0
        else:
            low, high = MIN_FRACTION, estimate
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            if self._trial(gm, joint_inputs, kwargs, middle).activations <= target:
                low = middle
            else:
                high = middle
        return low

    def __call__(
        self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        from .cost import register_flop_formulas

        register_flop_formulas()
        recorder = current_recorder.get()
        num_fwd_outputs = int(kwargs["num_fwd_outputs"])
        # Reversible blocks (fxshear.reversible): the backward rebuilds their inputs.
        self.reversible_report = rebuild_reversible_blocks(gm)
        if self.frozen:
            drop_gradients(gm, num_fwd_outputs, sorted(self.frozen))
        if self.gated:
            self.gate_report = gate_gradients(gm, num_fwd_outputs, sorted(self.gated))
            for index, reason in sorted(self.gate_report.ungated.items()):
                # Freezing this input still gives it no gradient; only its compute is not skipped.
                log.info("fxshear: freezing input %d skips no matmul: %s", index, reason)
        # The partitioner consumes the joint graph; render it first.
        joint_text = readable_graph(gm) if recorder is not None else ""
        pinned = pin_ops(gm)
        random = draws_randomness(gm)
        self.effective_budget = self._budget(gm, joint_inputs, kwargs, pinned > 0 or random)
        spare = copy_joint(gm) if random else None
        with activation_memory_budget(self.effective_budget):
            forward, backward = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        redrawn = redrawn_in_backward(backward)
        if redrawn and spare is not None:
            # Torch's knapsack may trade a banned random op back into recompute (only fxshear's
            # own draws are MUST_SAVE); a redraw is a different mask, so pin those and cut again.
            # Seen: the unrewritten MiniLM graph (batch 16 x 128) at 0.1 recomputed Inductor's
            # ``inductor_seeds`` (pytorch#190758 describes both torch paths).
            log.info("fxshear: the partition redrew %s in the backward; partitioning again with them saved",
                        ", ".join(redrawn))
            pin_named(spare, redrawn)
            with activation_memory_budget(self.effective_budget):
                forward, backward = min_cut_rematerialization_partition(spare, joint_inputs, **kwargs)
        if recorder is not None:
            recorder(
                Partition(
                    forward=forward,
                    num_fwd_outputs=int(kwargs["num_fwd_outputs"]),
                    static_input_indices=kwargs.get("static_lifetime_input_indices"),
                    readable={"joint": joint_text, "forward": readable_graph(forward),
                              "backward": readable_graph(backward)},
                    effective_budget=self.effective_budget,
                )
            )
        return forward, backward

    def uuid(self) -> bytes:
        extra = (f"{self.cfg.to_json()}|reference={self.reference}|frozen={sorted(self.frozen)}"
                 f"|gated={sorted(self.gated)}|torch={torch.__version__}")
        return get_hash_for_files(fxshear_source_files(), extra=extra)


def draws_randomness(gm: torch.fx.GraphModule) -> bool:
    """Whether any op of the graph draws from a generator (``nondeterministic_seeded``).

    PyTorch's partitioner bans recomputing these (Inductor's own dropout, ``rand_like``) at every
    budget but exactly 0.0, where it recomputes the whole forward; see :meth:`ShearPartitioner._budget`.
    """
    return any(_draws(node) for node in gm.graph.nodes)


def _draws(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in node.target.tags)


def redrawn_in_backward(backward: torch.fx.GraphModule) -> list[str]:
    """Names of the random ops a backward graph runs: each would draw anew, not replay the forward.

    A backward built from the joint never needs a draw of its own, so any is a recomputed one.
    FX keeps a joint node's name in the graph it is copied into, so the names find it again.
    """
    return [node.name for node in backward.graph.nodes if _draws(node)]


def pin_named(gm: torch.fx.GraphModule, names: Sequence[str]) -> None:
    """Mark the named nodes of a joint graph MUST_SAVE."""
    from torch.utils.checkpoint import CheckpointPolicy

    wanted = set(names)
    for node in gm.graph.nodes:
        if node.name in wanted:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def pin_ops(gm: torch.fx.GraphModule) -> int:
    """Mark the ops of :func:`_never_recomputed` MUST_SAVE; returns how many were marked.

    Under a memory budget the partitioner's knapsack may choose to recompute any banned node
    except those marked MUST_SAVE, and in its aggressive modes custom ops are not banned at all.
    On a multi-output op the mark bans recomputation: what the backward then needs downstream
    of the op's outputs is saved rather than rebuilt from a fresh call.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    pinned = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if _never_recomputed(node.target):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            pinned += 1
        mask = _attention_mask(node)
        if mask is not None and mask.op == "call_function" and mask.meta.get("recompute") is None:
            mask.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            pinned += 1
    return pinned


def _attention_mask(node: torch.fx.Node) -> torch.fx.Node | None:
    """The additive mask an ``fxshear::attention`` call reads, if it is a node.

    Why it is saved, not recomputed: it is one small tensor (``[batch, 1, q, k]``) that every
    layer's attention shares.  Recomputed in the backward, its boolean pieces are broadcast inside
    each layer's fused attention kernel, whose index math then goes per-element: on MiniLM at
    budget 0.5 that cost ~37 ms a step to save 1 MiB.
    """
    if node.target is not torch.ops.fxshear.attention.default:
        return None
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("mask")
    return mask if isinstance(mask, torch.fx.Node) else None


def copy_joint(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a joint graph with its node metadata, for a trial partition."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        env[node].meta = dict(node.meta)
    return torch.fx.GraphModule(gm, graph)
