"""A compiled region: one graph Dynamo handed the backend, what fxshear did to it, what it saves.

Why regions re-derive their partition: with Inductor's FX-graph and AOTAutograd caches warm,
the partitioner is never called, so nothing recorded during a compile can be trusted to exist.
A region therefore keeps the (rewritten) graph and a description of its inputs; if its
partition was not seen, it replays the trace and the min-cut with the caches off and no code
generation, which gives the same partition and so the same ledger.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .compat import caches_disabled
from .config import ShearConfig
from .graph.ledger import Ledger, Origin, build_ledger
from .graph.partitioner import Partition, SavedSizes, ShearPartitioner, current_recorder, saved_sizes
from .kernels.infra.lowering import LowerOpsOnCpu
from .passes.base import PASS_META_KEY, PassReport, module_path

_region_counter = itertools.count()


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    def make(self) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return t.zero_().requires_grad_(self.requires_grad)


class _ParameterRef:
    """A weak reference to a parameter the region was compiled with (replay needs the real one)."""

    def __init__(self, p: torch.Tensor) -> None:
        self.ref = weakref.ref(p)

    def make(self) -> torch.Tensor:
        p = self.ref()
        if p is None:
            raise RuntimeError("the parameters this region was compiled for no longer exist")
        return p


@dataclass
class Region:
    """Everything fxshear knows about one compiled graph."""

    cfg: ShearConfig
    graph: torch.fx.GraphModule
    inputs: list[Any]
    order: int = field(default_factory=lambda: next(_region_counter))
    pass_reports: list[PassReport] = field(default_factory=list)
    fallback_reason: str | None = None
    saved: Ledger | None = None
    graphs: dict[str, str] | None = None
    origins: dict[str, Origin] = field(default_factory=dict)
    input_origins: list[Origin] = field(default_factory=list)
    parameter_ids: frozenset[int] = frozenset()
    replayed: bool = False
    grad_enabled: bool = True
    #: The unrewritten graph's budget range (set when a memory_budget in (0, 1) is read against
    #: plain Inductor), and the budget fraction the partitioner finally used.
    reference: SavedSizes | None = None
    effective_budget: float | None = None
    #: Per-step freezing: the inputs whose gradients this compile drops (a mask variant), and
    #: those whose weight-gradient matmuls are gated at run time (see fxshear.freezing.joint).
    frozen: frozenset[int] = frozenset()
    gated: frozenset[int] = frozenset()

    @classmethod
    def create(cls, cfg: ShearConfig, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Region:
        inputs: list[Any] = []
        for x in example_inputs:
            if isinstance(x, torch.nn.Parameter):
                inputs.append(_ParameterRef(x))
            elif isinstance(x, torch.Tensor):
                inputs.append(_TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, x.device,
                                          x.requires_grad))
            else:
                inputs.append(x)
        ids = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
        return cls(cfg=cfg, graph=gm, inputs=inputs, parameter_ids=ids, grad_enabled=torch.is_grad_enabled())

    @property
    def name(self) -> str:
        return f"region{self.order}"

    # -- provenance -------------------------------------------------------------------------
    def index_origins(self, gm: torch.fx.GraphModule) -> None:
        """Map every node of the graph being compiled to its source line, module and pass.

        A private copy is kept for replays, since compiling may rewrite ``gm`` in place.  What a
        failed earlier attempt recorded is forgotten.
        """
        self.graph = copy_graph_module(gm)
        self.saved = self.graphs = None
        self.origins = {n.name: _origin(n) for n in gm.graph.nodes}
        self.input_origins = [_placeholder_origin(n) for n in gm.graph.nodes if n.op == "placeholder"]

    def recorder(self, graph_id: int):  # noqa: ANN201
        """A callback for the partitioner: the partition of the graph ``graph_id``."""

        def record(partition: Partition) -> None:
            # Read the ledger now: Inductor's post-grad passes rewrite the forward graph in place.
            self.graphs = dict(partition.readable)
            self.effective_budget = partition.effective_budget
            self.saved = build_ledger(
                self.name,
                partition.forward,
                partition.num_fwd_outputs,
                partition.static_input_indices,
                self.origins,
                graph_id,
                self.input_origins,
                self.parameter_indices(),
            )

        return record

    def parameter_indices(self) -> list[int]:
        """Inputs that live as long as the model: parameters, and buffers by their source name."""
        return [
            i for i, x in enumerate(self.inputs)
            if isinstance(x, _ParameterRef)
            or (i < len(self.input_origins) and "_buffers" in self.input_origins[i].source)
        ]

    def trainable_parameter_indices(self) -> list[int]:
        """Inputs that are parameters requiring a gradient: what per-step freezing can freeze."""
        indices = []
        for i, x in enumerate(self.inputs):
            if isinstance(x, _ParameterRef):
                p = x.ref()
                if p is not None and p.requires_grad:
                    indices.append(i)
        return indices

    def example_inputs(self) -> list[Any]:
        """Inputs to compile this region's graph again (zeros of the recorded shapes, the real
        parameters)."""
        return [x.make() if isinstance(x, (_TensorSpec, _ParameterRef)) else x for x in self.inputs]

    @property
    def has_backward(self) -> bool:
        """Whether this graph was compiled for training (grad mode on, something needs a grad)."""
        return self.grad_enabled and any(isinstance(x, _ParameterRef) or getattr(x, "requires_grad", False) for x in self.inputs)

    # -- what is saved --------------------------------------------------------------------
    def ensure_recorded(self) -> None:
        """Replay the partition without caches if a warm cache skipped fxshear's partitioner."""
        if self.saved is None and self.has_backward:
            self.replay()

    def replay(self) -> None:
        """Trace and partition the region again with caches off and no code generation."""
        inputs = self.example_inputs()
        graph = copy_graph_module(self.graph)
        compile_and_record(graph, inputs, self.cfg, self.recorder(id(graph.graph)), codegen=False,
                           reference=self.reference, frozen=self.frozen, gated=self.gated)
        self.replayed = True

    @property
    def ledger(self) -> Ledger:
        self.ensure_recorded()
        return self.saved if self.saved is not None else Ledger(self.name)

    def readable_graphs(self) -> dict[str, str]:
        """Joint, forward and backward graphs as text (for diffs)."""
        self.ensure_recorded()
        return dict(self.graphs or {})


def compile_and_record(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: ShearConfig,
                       record: Callable[[Partition], None], *, codegen: bool,
                       reference: SavedSizes | None = None, frozen: frozenset[int] = frozenset(),
                       gated: frozenset[int] = frozenset()) -> Callable:
    """``compile_fx`` with fxshear's partitioner, which hands its partition to ``record``.

    With ``codegen`` the graph is lowered by Inductor (on CPU, fxshear's ops become aten math it
    can fuse, after the partition); without, the partitioned aten graphs run as they are and the
    caches are off, so the partitioner always runs (inspection, and replays on a cache hit).
    ``frozen`` and ``gated`` are input indices handed to the partitioner (per-step freezing:
    gradients dropped from this variant, and weight-gradient matmuls gated at run time).
    """
    from torch._inductor.compile_fx import compile_fx

    partitioner = ShearPartitioner(cfg, reference, frozen=frozen, gated=gated)
    patches: dict[str, Any] = {"custom_partitioner_fn": partitioner}
    token = current_recorder.set(record)
    try:
        if codegen:
            patches["post_grad_custom_pre_pass"] = LowerOpsOnCpu()
            return compile_fx(gm, example_inputs, config_patches=patches)
        with caches_disabled():
            return compile_fx(gm, example_inputs, inner_compile=no_codegen, config_patches=patches)
    finally:
        current_recorder.reset(token)


def unrewritten_sizes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                      budget: float) -> SavedSizes | None:
    """What plain Inductor saves for ``gm`` at ``budget`` (trace and partition only, no codegen)."""
    found: list[SavedSizes] = []

    def record(partition: Partition) -> None:
        found.append(saved_sizes(partition.forward, partition.num_fwd_outputs))

    reference = ShearConfig.from_options(preset="none", memory_budget=budget)
    compile_and_record(copy_graph_module(gm), example_inputs, reference, record, codegen=False)
    return found[-1] if found else None


def no_codegen(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Any:
    """An inner compiler that skips Inductor's code generation (the partition is all we need)."""
    from functorch.compile import make_boxed_func

    return make_boxed_func(gm.forward)


# What Dynamo attaches to its graph outside node meta (pytorch/pytorch#141640), which AOTAutograd
# reads to tell parameters from activations: without it a copy is "not captured by Dynamo", its
# parameters lose their static lifetime, and the min-cut then pays to save what a parameter gives
# for free (MiniLM at budget 0.1 kept its embedding outputs instead of the embedding weight).
_DYNAMO_MODULE_ATTRIBUTES = ("_param_name_to_source", "_source_to_user_stacks")
_DYNAMO_PLACEHOLDER_ATTRIBUTE = "_dynamo_source"


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` that shares its submodules and keeps what Dynamo recorded on it.

    Node meta is copied shallowly; the module's meta and Dynamo's attributes (parameter sources,
    placeholder sources) come along, so AOTAutograd treats the copy exactly as Dynamo's graph.
    """
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    value_remap: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, value_remap)
    graph.output(output)
    for old, new in value_remap.items():
        if hasattr(old, _DYNAMO_PLACEHOLDER_ATTRIBUTE):
            setattr(new, _DYNAMO_PLACEHOLDER_ATTRIBUTE, getattr(old, _DYNAMO_PLACEHOLDER_ATTRIBUTE))
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    for name in _DYNAMO_MODULE_ATTRIBUTES:
        if hasattr(gm, name):
            setattr(copy, name, getattr(gm, name))
    return copy


def _origin(node: torch.fx.Node) -> Origin:
    return Origin(source=_source_line(node), module=module_path(node),
                  introduced_by=node.meta.get(PASS_META_KEY))


def _placeholder_origin(node: torch.fx.Node) -> Origin:
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", None)
    if callable(source):
        source = source()
    return Origin(source=str(source or node.name), module="", introduced_by=None)


def _source_line(node: torch.fx.Node) -> str:
    """``file.py:123  code`` of the innermost user frame in the node's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            parts = lines[i].split('"')
            filename = parts[1].rsplit("/", 1)[-1] if len(parts) > 1 else "?"
            lineno = lines[i].split("line ")[-1].split(",")[0]
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{filename}:{lineno}  {code}"
    return ""
