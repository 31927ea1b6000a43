"""Small pattern-matching helpers over the torch-IR graph Dynamo hands the backend.

Dynamo records torch functions as ``call_function`` nodes (``torch._C._nn.linear``,
``torch.matmul``, ``F.softmax``...) and tensor methods as ``call_method`` nodes (``.to``,
``.view``, ``.transpose``...).  The passes match both spellings through these helpers, and build
replacement nodes that carry the replaced node's metadata (module stack, source line) so the
ledger can still say where a saved tensor came from.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ..kernels.infra.numbers import FLOAT_DTYPES
from ..config import ShearConfig
from ..options import GELU_APPROXIMATIONS
from .base import PASS_META_KEY, example_value, excluded

LINEAR_FUNCTIONS = {torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default}
# The spellings of a binary op Dynamo may record as a call_function (``a * b``, ``torch.mul``,
# an aten overload in graphs that were already lowered); methods (``a.mul(b)``) are matched apart.
ADD_FUNCTIONS = (operator.add, torch.add, torch.ops.aten.add.Tensor)
MUL_FUNCTIONS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
DIV_FUNCTIONS = (operator.truediv, torch.div, torch.ops.aten.div.Tensor)
_DROPOUT_FUNCTIONS = {torch.nn.functional.dropout, torch.dropout, torch.ops.aten.dropout.default}
_GELU_FUNCTIONS = {torch._C._nn.gelu, torch.nn.functional.gelu, torch.ops.aten.gelu.default}
_SILU_FUNCTIONS = {torch.nn.functional.silu, torch._C._nn.silu, torch.ops.aten.silu.default}
INPLACE_SILU_FUNCTIONS = {torch._C._nn.silu_, torch.ops.aten.silu_.default}


def is_function(node: object, *targets: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: object, *names: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in names


def argument(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword (Dynamo keeps whichever the user wrote)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_value(node: object) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node, if it is a tensor."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def is_float_tensor(node: object) -> bool:
    value = tensor_value(node)
    return value is not None and value.dtype in FLOAT_DTYPES


def requires_grad(node: object) -> bool:
    value = tensor_value(node)
    return bool(value is not None and value.requires_grad)


def linear_parts(node: object) -> tuple[torch.fx.Node, torch.fx.Node, object] | None:
    """(input, weight, bias) when ``node`` is ``F.linear``; None otherwise."""
    if not is_function(node, *LINEAR_FUNCTIONS):
        return None
    x = argument(node, 0, "input")
    weight = argument(node, 1, "weight")
    bias = argument(node, 2, "bias")
    if not isinstance(x, torch.fx.Node) or not isinstance(weight, torch.fx.Node):
        return None
    return x, weight, bias


def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclass
class Consumer:
    """A Linear-like consumer of ``y``: ``node`` computes ``view(y) @ weightᵀ + bias``."""

    node: torch.fx.Node
    view: torch.fx.Node | None     # the reshape of y it reads (Conv1D), or None for y itself
    weight: torch.fx.Node
    bias: object
    transposed: bool               # weight stored [in, out] (Conv1D's addmm)
    dropout: torch.fx.Node | None = None  # a training dropout between y and the Linear, if any
    p: float = 0.0                 # that dropout's probability


def linear_consumers(y: torch.fx.Node) -> list[Consumer]:
    """The Linears with a trainable weight that read ``y`` as their input, and so save it.

    Both spellings: ``F.linear(y, W, b)`` and GPT-2's Conv1D, ``addmm(b, y.view(-1, D), W)``.
    """
    found = []
    for user in y.users:
        parts = linear_parts(user)
        if parts is not None and parts[0] is y:
            found.append(Consumer(user, None, parts[1], parts[2], transposed=False))
        elif is_method(user, "view", "reshape") and len(user.users) == 1:
            addmm = only_user(user)
            if is_function(addmm, torch.addmm) and addmm.args[1] is user and len(addmm.args) == 3 \
                    and not addmm.kwargs:
                value = tensor_value(user)
                if value is not None and value.dim() == 2:
                    found.append(Consumer(addmm, user, addmm.args[2], addmm.args[0], transposed=True))
    return [c for c in found if requires_grad(c.weight)]


def copy_meta(new: torch.fx.Node, old: torch.fx.Node, pass_name: str) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k not in ("example_value", "val")})
    new.meta[PASS_META_KEY] = pass_name


def fake_run(node: torch.fx.Node) -> None:
    """Record ``example_value`` for a node a pass created, by running it on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensor

    def value_of(a: object) -> object:
        return example_value(a) if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(node.args, value_of)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value_of)
    flat: list[torch.Tensor] = []
    torch.fx.node.map_aggregate((args, kwargs), lambda v: flat.append(v) if isinstance(v, torch.Tensor) else v)
    # The tensors' own mode: inside a backend call the tracing context may hold another one.
    mode = next((t.fake_mode for t in flat if isinstance(t, FakeTensor)), None)
    if mode is None:
        return
    # No autograd while computing metadata: a user's saved_tensors_hooks (a memory counter)
    # would otherwise be handed fake tensors.  requires_grad is then set as autograd would.
    with mode, torch.no_grad():
        if node.op == "call_function":
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            return
    if any(t.requires_grad for t in flat):
        for out in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
                out.requires_grad_(True)
    node.meta["example_value"] = value


def call(graph: torch.fx.Graph, target: object, args: Sequence[object], *, like: torch.fx.Node,
         pass_name: str, kwargs: dict[str, object] | None = None) -> torch.fx.Node:
    """Insert ``target(*args)`` at the graph's current insertion point, metadata copied from
    ``like``, with a fake example value."""
    node = graph.call_function(target, tuple(args), kwargs or {})
    copy_meta(node, like, pass_name)
    fake_run(node)
    return node


def outputs(graph: torch.fx.Graph, node: torch.fx.Node, count: int, *, like: torch.fx.Node,
            pass_name: str) -> list[torch.fx.Node]:
    """``getitem`` nodes for a multi-output op, inserted right after it."""
    result = []
    with graph.inserting_after(node):
        for index in reversed(range(count)):
            item = graph.call_function(operator.getitem, (node, index))
            copy_meta(item, like, pass_name)
            result.append(item)
    result.reverse()
    for index, item in enumerate(result):
        value = node.meta.get("example_value")
        if isinstance(value, (tuple, list)):
            item.meta["example_value"] = value[index]
    return result


def erase_dead(graph: torch.fx.Graph, nodes: Iterable[torch.fx.Node]) -> None:
    """Erase nodes a rewrite bypassed, users first, keeping any that are still used."""
    for node in reversed(list(nodes)):
        if not node.users and node.graph is graph:
            graph.erase_node(node)


def dropout_arguments(node: torch.fx.Node) -> tuple[torch.fx.Node, object, object, object] | None:
    """(input, p, training, inplace) when the node is a dropout call."""
    if not is_function(node, *_DROPOUT_FUNCTIONS):
        return None
    if node.target is torch.nn.functional.dropout:
        return (argument(node, 0, "input"), argument(node, 1, "p", 0.5),
                argument(node, 2, "training", True), argument(node, 3, "inplace", False))
    return (argument(node, 0, "input"), argument(node, 1, "p", 0.5),
            argument(node, 2, "train", True), False)


def activation_kind(node: object) -> tuple[str, str] | None:
    """(kind, approximate) if the node is a GELU or SiLU call."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in _GELU_FUNCTIONS:
        return "gelu", argument(node, 1, "approximate", "none")
    if node.target in _SILU_FUNCTIONS or node.target in INPLACE_SILU_FUNCTIONS:
        return "silu", "none"
    return None


def inplace_activation(node: torch.fx.Node) -> bool:
    return bool(node.target in INPLACE_SILU_FUNCTIONS or node.kwargs.get("inplace")
                or (node.target in _SILU_FUNCTIONS and len(node.args) > 1 and node.args[1] is True))


def activation_blocker(node: torch.fx.Node, approximate: str, cfg: ShearConfig) -> str | None:
    """Why no activation rewrite may touch this GELU/SiLU: in place, an unknown approximation,
    or a module the user excluded (the checks every activation pass makes first)."""
    if inplace_activation(node):
        return "in-place activation: its input may be read again after being overwritten"
    if approximate not in GELU_APPROXIMATIONS:
        return f"unknown GELU approximation {approximate!r}"
    pattern = excluded(node, cfg)
    if pattern:
        return f"module excluded by pattern {pattern!r}"
    return None
