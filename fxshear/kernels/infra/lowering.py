"""Lower fxshear ops to plain aten math after partitioning, on CPU, so Inductor fuses them.

Why after partitioning: an op must stay opaque until the min-cut has run, or the partitioner
would pick its own saved set again (docs/design.md §2).  Once forward and backward are split, what is
saved is fixed and the op is only a kernel: an eager fallback call costs several passes over the
tensor, while the same math as aten ops lets Inductor's C++ backend fuse it with its neighbours.

Each op module registers a traceable torch function (its reference math) with
:func:`register_cpu_lowering`.  On CUDA the ops keep their Triton kernels; nodes whose ``impl``
argument is ``"triton"`` are left alone everywhere.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from ...compat import CustomGraphPass, get_hash_for_files, native_random
from ...sources import fxshear_source_files
from . import bits as _bits  # noqa: F401  (defines fxshear::unpack_flags, which _share_unpacks merges)

# op overload -> function with the op's own signature, made only of traceable aten math
_LOWERINGS: dict[object, Callable[..., object]] = {}
# op overload -> predicate on the call's (args, kwargs): inline only the calls it accepts
_CONDITIONS: dict[object, Callable[[tuple, dict], bool]] = {}
# ops whose lowering draws random numbers (Inductor must then rewrite them to its seeded ops)
_USES_RNG: set[object] = set()


def register_cpu_lowering(
    op: object, when: Callable[[tuple, dict], bool] | None = None, uses_rng: bool = False
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Decorator: ``fn`` (same signature as ``op``) is inlined in place of CPU calls of ``op``.

    ``fn`` must be pure aten math: no ``.item()``, no data-dependent shapes, and random numbers
    only where the op promises no particular stream (Inductor re-seeds them).  ``when``, given
    a call's args and kwargs, limits the lowering to the calls it accepts; ``uses_rng`` marks a
    lowering that draws random numbers.
    """

    def wrap(fn: Callable[..., object]) -> Callable[..., object]:
        _LOWERINGS[op] = fn
        if when is not None:
            _CONDITIONS[op] = when
        if uses_rng:
            _USES_RNG.add(op)
        return fn

    return wrap


def lowerable_ops() -> tuple[object, ...]:
    return tuple(_LOWERINGS)


def _inline(graph: torch.fx.Graph, node: torch.fx.Node, fn: Callable[..., object]) -> object:
    """Trace ``fn`` on the node's fake tensor arguments and splice its graph in before ``node``."""
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table

    tensor_positions = [i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node)]
    tensor_nodes = [node.args[i] for i in tensor_positions]
    constants = list(node.args)

    def bound(*tensors: torch.Tensor) -> object:
        args = list(constants)
        for position, tensor in zip(tensor_positions, tensors):
            args[position] = tensor
        return fn(*args, **node.kwargs)

    fakes = [n.meta["val"] for n in tensor_nodes]
    with detect_fake_mode(fakes):
        traced = make_fx(bound, decomposition_table=select_decomp_table())(*fakes)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(node):
        return graph.graph_copy(traced.graph, dict(zip(placeholders, tensor_nodes)))


def _on_cpu(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def _impl_arg(node: torch.fx.Node) -> object:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for position, argument in enumerate(schema.arguments):
        if argument.name == "impl":
            return node.args[position] if position < len(node.args) else node.kwargs.get("impl")
    return None


def _share_unpacks(graph: torch.fx.Graph) -> None:
    """One ``fxshear::unpack_flags`` per (bits, numel): lowerings that read the same mask (e.g.
    the attention backward, twice) would otherwise each unpack it, and an opaque op is not CSE'd."""
    unpack = torch.ops.fxshear.unpack_flags.default
    first: dict[tuple[object, ...], torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not unpack:
            continue
        key = (*node.args, *sorted(node.kwargs.items()))
        try:
            earlier = first.setdefault(key, node)
        except TypeError:  # an unhashable argument: leave this call alone
            continue
        if earlier is not node:
            node.replace_all_uses_with(earlier)
            graph.erase_node(node)


class LowerOpsOnCpu(CustomGraphPass):
    """Post-grad pass: replace CPU calls of registered fxshear ops by their aten math."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        inlined_random = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _LOWERINGS or not _on_cpu(node):
                continue
            if _impl_arg(node) == "triton":
                continue
            condition = _CONDITIONS.get(node.target)
            if condition is not None and not condition(node.args, node.kwargs):
                continue
            inlined_random = inlined_random or node.target in _USES_RNG
            result = _inline(graph, node, _LOWERINGS[node.target])
            if isinstance(result, (tuple, list)):
                for user in list(node.users):
                    if user.target is not operator.getitem:
                        raise RuntimeError(f"unexpected user {user} of multi-output op {node}")
                    user.replace_all_uses_with(result[user.args[1]])
                    graph.erase_node(user)
            else:
                node.replace_all_uses_with(result)
            if not node.users:
                graph.erase_node(node)
        if inlined_random and not native_random(graph):
            raise RuntimeError("this torch has no Inductor random-op rewrite for fxshear's fast dropout draws")
        _share_unpacks(graph)

    def uuid(self) -> bytes:
        from .native import enabled

        # Whether the native C kernels may run decides which prune ops are lowered (same results).
        return get_hash_for_files(fxshear_source_files(),
                                  extra=f"torch={torch.__version__} native={enabled()}")
