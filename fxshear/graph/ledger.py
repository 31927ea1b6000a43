"""The saved-tensor ledger: every tensor a partitioned forward keeps for backward, with its bytes.

Why from the partitioned graph: a pass's intent means nothing until the min-cut partitioner has
decided what to save; the forward graph's outputs after ``num_fwd_outputs`` are the truth.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.fx

ACTIVATION, PARAMETER, INPUT = "activation", "parameter", "input"


@dataclass(frozen=True)
class Origin:
    """Where a node of the Dynamo graph came from in the user's code."""

    source: str = ""
    module: str = ""
    introduced_by: str | None = None


@dataclass(frozen=True)
class SavedTensor:
    """One tensor saved for backward."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    kind: str  # activation | parameter | input
    op: str
    source: str = ""
    module: str = ""
    introduced_by: str | None = None


@dataclass
class Ledger:
    """The saved tensors of one compiled region (one forward/backward pair)."""

    region: str
    entries: list[SavedTensor] = field(default_factory=list)
    saved_symints: int = 0

    def bytes_of(self, kind: str) -> int:
        return sum(e.bytes for e in self.entries if e.kind == kind)

    @property
    def activation_bytes(self) -> int:
        """Bytes saved that are neither parameters nor graph inputs: what fxshear shrinks."""
        return self.bytes_of(ACTIVATION)

    @property
    def parameter_bytes(self) -> int:
        return self.bytes_of(PARAMETER)

    @property
    def input_bytes(self) -> int:
        return self.bytes_of(INPUT)

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def activations(self) -> list[SavedTensor]:
        return [e for e in self.entries if e.kind == ACTIVATION]

    def to_dict(self) -> dict[str, object]:
        return {
            "region": self.region,
            "saved_symints": self.saved_symints,
            "activation_bytes": self.activation_bytes,
            "parameter_bytes": self.parameter_bytes,
            "input_bytes": self.input_bytes,
            "entries": [asdict(e) for e in self.entries],
        }


@dataclass
class ModelLedger:
    """The ledgers of every region compiled for one model (graph breaks make several)."""

    regions: list[Ledger]

    @property
    def activation_bytes(self) -> int:
        return sum(r.activation_bytes for r in self.regions)

    @property
    def parameter_bytes(self) -> int:
        return sum(r.parameter_bytes for r in self.regions)

    @property
    def input_bytes(self) -> int:
        return sum(r.input_bytes for r in self.regions)

    @property
    def entries(self) -> list[SavedTensor]:
        return [e for r in self.regions for e in r.entries]

    def by_pass(self) -> dict[str, int]:
        """Activation bytes grouped by the fxshear pass that introduced them ('' = none)."""
        totals: dict[str, int] = {}
        for e in self.entries:
            if e.kind == ACTIVATION:
                key = e.introduced_by or ""
                totals[key] = totals.get(key, 0) + e.bytes
        return totals

    def to_dict(self) -> dict[str, object]:
        return {
            "activation_bytes": self.activation_bytes,
            "parameter_bytes": self.parameter_bytes,
            "input_bytes": self.input_bytes,
            "regions": [r.to_dict() for r in self.regions],
        }

    def table(self, title: str = "saved for backward") -> object:
        """A rich Table of the activation entries, largest first."""
        from rich.table import Table

        table = Table(title=title)
        for column in ("region", "name", "shape", "dtype", "bytes", "op", "module", "pass", "source"):
            table.add_column(column, justify="right" if column == "bytes" else "left")
        for region in self.regions:
            for e in sorted(region.activations(), key=lambda e: -e.bytes):
                table.add_row(region.region, e.name, str(list(e.shape)), e.dtype, f"{e.bytes:,}",
                              e.op, e.module, e.introduced_by or "", e.source)
        return table


def describe_target(node: torch.fx.Node) -> str:
    """Readable producer of a node: ``aten.addmm``, ``fxshear.act2bit[1]``, ``placeholder``."""
    if node.op == "placeholder":
        return "placeholder"
    if node.op != "call_function":
        return node.op
    target = node.target
    if target.__name__ == "getitem" and isinstance(node.args[0], torch.fx.Node):
        return f"{describe_target(node.args[0])}[{node.args[1]}]"
    name = getattr(target, "_schema", None)
    if name is not None:
        qualified = target._schema.name.replace("::", ".")
        return qualified
    return getattr(target, "__name__", str(target))


def origin_names(node: torch.fx.Node, graph_id: int) -> list[str]:
    """Names of the Dynamo-graph nodes (graph ``graph_id``) a node descends from, nearest first."""
    found: list[str] = []
    pending = list(node.meta.get("from_node") or [])
    while pending:
        source = pending.pop(0)
        if source.graph_id == graph_id and source.name not in found:
            found.append(source.name)
        pending.extend(source.from_node or [])
    return found


def build_ledger(
    region: str,
    forward: torch.fx.GraphModule,
    num_fwd_outputs: int,
    static_input_indices: Iterable[int] | None,
    origins: Mapping[str, Origin],
    dynamo_graph_id: int,
    input_origins: Sequence[Origin] = (),
    parameter_indices: Iterable[int] = (),
) -> Ledger:
    """Read the saved tensors off a partitioned forward graph."""
    static = set(static_input_indices or ()) | set(parameter_indices)
    output = next(n for n in reversed(forward.graph.nodes) if n.op == "output")
    saved = list(output.args[0])[num_fwd_outputs:]
    ledger = Ledger(region)
    counted_storages: set[torch.fx.Node] = set()
    for node in saved:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            ledger.saved_symints += 1
            continue
        root = alias_root(node)
        # A saved view keeps its whole base alive: count the base's bytes, once per base.
        nbytes = 0 if root in counted_storages else _nbytes(root.meta.get("val", value))
        counted_storages.add(root)
        if root.op == "placeholder":
            index = _primal_index(root.name)
            kind = PARAMETER if index in static else INPUT
            origin = input_origins[index] if index is not None and index < len(input_origins) else Origin()
        else:
            kind = ACTIVATION
            origin = _activation_origin(node, root, origins, dynamo_graph_id)
        ledger.entries.append(
            SavedTensor(
                name=node.name,
                shape=tuple(_as_int(s) for s in value.shape),
                dtype=str(value.dtype).replace("torch.", ""),
                bytes=nbytes,
                kind=kind,
                op=describe_target(node),
                source=origin.source,
                module=origin.module,
                introduced_by=origin.introduced_by,
            )
        )
    return ledger


def _activation_origin(node: torch.fx.Node, root: torch.fx.Node, origins: Mapping[str, Origin],
                       graph_id: int, max_steps: int = 8) -> Origin:
    """Where a saved activation came from.  Nodes the partitioner or a decomposition made (a
    ``permute`` of attention scores saved for a ``bmm``'s backward) have no Dynamo origin of
    their own; they take the module and source of the nearest producer up their first-argument
    chain that has one (its view root first), never its pass, which did not make them."""
    own = next((origins[n] for n in origin_names(node, graph_id) if n in origins), None)
    if own is not None:
        return own
    candidate = root
    for _ in range(max_steps):
        found = next((origins[n] for n in origin_names(candidate, graph_id) if n in origins), None)
        if found is not None:
            return Origin(source=found.source, module=found.module)
        inputs = [a for a in candidate.args if isinstance(a, torch.fx.Node)]
        if candidate.op != "call_function" or not inputs:
            break
        candidate = inputs[0]
    return Origin()


_ALIASING_OPS = {
    "aten::permute", "aten::t", "aten::transpose", "aten::view", "aten::_unsafe_view", "aten::expand",
    "aten::alias", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::reshape",
    "aten::as_strided",
}


def alias_root(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose storage ``node`` views (itself if it is not a view).

    Why: the partitioner may save ``permute(weight)`` rather than ``weight``; that shares the
    parameter's storage and must be counted as a parameter, as the run-time count does.
    """
    while node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is None or schema.name not in _ALIASING_OPS or not isinstance(node.args[0], torch.fx.Node):
            break
        node = node.args[0]
    return node


def _as_int(size: object) -> int:
    """A concrete size; symbolic sizes use their example (hint) value."""
    if isinstance(size, torch.SymInt):  # int() would guard on (and specialize) the size
        from ..compat import size_hint

        return size_hint(size)
    return int(size)


def _nbytes(value: torch.Tensor) -> int:
    return _as_int(value.numel()) * value.element_size()


def _primal_index(name: str) -> int | None:
    if name.startswith("primals_"):
        try:
            return int(name.split("_")[1]) - 1
        except ValueError:
            return None
    return None
