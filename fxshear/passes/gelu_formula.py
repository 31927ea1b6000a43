"""Pass: GELU and SiLU written out as formulas become the library calls the activation passes match.

Hugging Face's ``gelu_new`` (GPT-2, GPT-J, ...) is hand-written,
``0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))``, and ``gelu_python`` is
``x · 0.5 · (1 + erf(x / √2))``; many SiLU/Swish modules are ``x · sigmoid(x)``.  Traced, they are
chains of elementary ops, each keeping its own input for backward, and neither ``act_from_output``
nor ``act2bit`` sees an activation.  This pass replaces each matched chain by ``F.gelu(x,
approximate="tanh" | "none")`` or ``F.silu(x)``, the same functions up to float rounding (the
library kernels evaluate the same formula in another order; gradients agree within float
tolerance).  Formulas that only resemble GELU (QuickGELU's ``x · sigmoid(1.702 x)``) are left alone.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

from ..config import ShearConfig
from .base import RewritePass, Walk, excluded
from .match import (
    ADD_FUNCTIONS,
    DIV_FUNCTIONS,
    MUL_FUNCTIONS,
    call,
    is_float_tensor,
    is_function,
    is_method,
    only_user,
    tensor_value,
)

NAME = "gelu_formula"

_POW = (operator.pow, torch.pow, torch.ops.aten.pow.Tensor_Scalar)
_TANH = (torch.tanh, torch.ops.aten.tanh.default)
_ERF = (torch.erf, torch.special.erf, torch.ops.aten.erf.default)
_SIGMOID = (torch.sigmoid, torch.nn.functional.sigmoid, torch.ops.aten.sigmoid.default)

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
_REL_TOL = 1e-6  # constants are written with 7-10 significant digits in the wild


def _close(value: object, target: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(
        float(value), target, rel_tol=_REL_TOL)


def _binary(node: object, functions: tuple[object, ...], method: str) -> tuple[object, object] | None:
    if not isinstance(node, torch.fx.Node) or len(node.args) != 2 or node.kwargs:
        return None
    if is_function(node, *functions) or is_method(node, method, f"__{method}__"):
        return node.args[0], node.args[1]
    return None


def _scaled(node: object, factor: float) -> object | None:
    """The operand ``y`` when ``node`` is ``factor · y`` (either order) or ``y / (1/factor)``."""
    operands = _binary(node, MUL_FUNCTIONS, "mul")
    if operands is not None:
        left, right = operands
        if _close(left, factor) and isinstance(right, torch.fx.Node):
            return right
        if _close(right, factor) and isinstance(left, torch.fx.Node):
            return left
    operands = _binary(node, DIV_FUNCTIONS, "div")
    if operands is not None and _close(operands[1], 1.0 / factor) and isinstance(operands[0], torch.fx.Node):
        return operands[0]
    return None


def _plus_one(node: object) -> object | None:
    """The operand ``y`` when ``node`` is ``1 + y`` or ``y + 1``."""
    operands = _binary(node, ADD_FUNCTIONS, "add")
    if operands is None:
        return None
    left, right = operands
    if _close(left, 1.0):
        return right
    if _close(right, 1.0):
        return left
    return None


def _monomial(node: object, depth: int = 0) -> tuple[float, torch.fx.Node | None, int] | None:
    """``(c, x, n)`` when ``node`` is ``c · xⁿ`` written with products, powers and constants in any
    association (``0.044715 * x * x * x``, ``0.044715 * torch.pow(x, 3)``, ``x * 0.5``)."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node), None, 0
    if not isinstance(node, torch.fx.Node) or depth > 6:
        return None
    operands = _binary(node, _POW, "pow")
    if operands is not None:
        base, exponent = operands
        inner = _monomial(base, depth + 1)
        if inner is None or not isinstance(exponent, (int, float)) or float(exponent) != int(exponent):
            return None
        return inner[0] ** int(exponent), inner[1], inner[2] * int(exponent)
    operands = _binary(node, MUL_FUNCTIONS, "mul")
    if operands is not None:
        left, right = _monomial(operands[0], depth + 1), _monomial(operands[1], depth + 1)
        if left is None or right is None or (left[1] is not None and right[1] is not None and left[1] is not right[1]):
            return None
        return left[0] * right[0], left[1] if left[1] is not None else right[1], left[2] + right[2]
    return 1.0, node, 1


def _is_monomial(node: object, coefficient: float, x: torch.fx.Node, power: int) -> bool:
    found = _monomial(node)
    return found is not None and found[1] is x and found[2] == power and _close(found[0], coefficient)


def _unary(node: object, functions: tuple[object, ...], method: str) -> torch.fx.Node | None:
    if isinstance(node, torch.fx.Node) and len(node.args) == 1 and not node.kwargs and (
            is_function(node, *functions) or is_method(node, method)):
        arg = node.args[0]
        return arg if isinstance(arg, torch.fx.Node) else None
    return None


def _tanh_argument_x(argument: object) -> torch.fx.Node | None:
    """x when ``argument`` is ``√(2/π) · (x + 0.044715 · x³)``."""
    inner = _scaled(argument, SQRT_2_OVER_PI)
    operands = _binary(inner, ADD_FUNCTIONS, "add")
    if operands is None:
        return None
    for x, cubic in (operands, operands[::-1]):
        if isinstance(x, torch.fx.Node) and _is_monomial(cubic, TANH_CUBIC, x, 3):
            return x
    return None


def _erf_argument_x(argument: object) -> torch.fx.Node | None:
    """x when ``argument`` is ``x / √2`` or ``x · (1/√2)``."""
    x = _scaled(argument, 1.0 / math.sqrt(2.0))
    return x if isinstance(x, torch.fx.Node) else None


def _half_x_times(final: torch.fx.Node, bracket: torch.fx.Node, x: torch.fx.Node) -> bool:
    """Whether ``final`` is ``(0.5·x)·bracket`` or ``(x·0.5)·bracket`` (``0.5·(x·bracket)`` is
    matched by the caller, which then has one more node)."""
    operands = _binary(final, MUL_FUNCTIONS, "mul")
    if operands is not None and bracket in operands:
        other = operands[1] if operands[0] is bracket else operands[0]
        return _is_monomial(other, 0.5, x, 1)
    return False


def _unwanted(cfg: ShearConfig, kind: str, dtype: torch.dtype) -> str | None:
    """Why no activation pass would rewrite this activation under ``cfg`` (then the formula stays
    as the user wrote it: replacing it would change its rounding for nothing)."""
    from ..kernels.act_from_output import EXACT_DTYPES

    if cfg.act2bit and kind in cfg.act2bit_ops:
        return None
    if cfg.act_from_output == "all" or (cfg.act_from_output == "exact_dtypes" and dtype in EXACT_DTYPES):
        return None
    return f"no activation pass rewrites a {kind} in {str(dtype).removeprefix('torch.')} under this config"


#: (final node, x, kind, approximate, nodes replaced)
_Formula = tuple[torch.fx.Node, torch.fx.Node, str, str, list[torch.fx.Node]]


class GeluFormulaPass(RewritePass[_Formula]):
    """Replace hand-written GELU/SiLU formulas by ``F.gelu`` / ``F.silu``."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.act2bit or cfg.act_from_output != "off"

    def match(self, walk: Walk, node: torch.fx.Node) -> _Formula | None:
        return self._match(node)

    def reported_node(self, node: torch.fx.Node, found: _Formula | str) -> torch.fx.Node:
        return node if isinstance(found, str) else found[0]

    def why_not(self, walk: Walk, node: torch.fx.Node, found: _Formula) -> str | None:
        final, x, kind, _, _ = found
        pattern = excluded(final, walk.cfg)
        if pattern:
            return f"module excluded by pattern {pattern!r}"
        if not is_float_tensor(x):
            return "input is not an fp32/fp16/bf16 tensor"
        return _unwanted(walk.cfg, kind, tensor_value(x).dtype)

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: _Formula) -> str:
        final, x, kind, approximate, chain = found
        graph = walk.graph
        with graph.inserting_before(final):
            if kind == "gelu":
                new = call(graph, torch.nn.functional.gelu, (x,), kwargs={"approximate": approximate},
                           like=final, pass_name=self.name)
            else:
                new = call(graph, torch.nn.functional.silu, (x,), like=final, pass_name=self.name)
        final.replace_all_uses_with(new)
        for dead in reversed(chain):
            if not dead.users:
                graph.erase_node(dead)
        label = kind if kind == "silu" else f"gelu, {'tanh' if approximate == 'tanh' else 'erf'}"
        return f"{final.name} ({label} formula)"

    @staticmethod
    def _match(node: torch.fx.Node) -> _Formula | None:
        """(final node, x, kind, approximate, nodes replaced) for a formula starting at ``node``."""
        sigmoid_of = _unary(node, _SIGMOID, "sigmoid")
        if sigmoid_of is not None:  # x * sigmoid(x)
            final = only_user(node)
            operands = _binary(final, MUL_FUNCTIONS, "mul")
            if operands is not None and set(operands) == {node, sigmoid_of}:
                return final, sigmoid_of, "silu", "none", [node, final]
            return None
        tanh_arg = _unary(node, _TANH, "tanh")
        erf_arg = _unary(node, _ERF, "erf")
        if tanh_arg is None and erf_arg is None:
            return None
        x = _tanh_argument_x(tanh_arg) if tanh_arg is not None else _erf_argument_x(erf_arg)
        if x is None:
            return None
        bracket = only_user(node)
        if bracket is None or _plus_one(bracket) is not node:
            return None
        final = only_user(bracket)
        if final is None:
            return None
        if not _half_x_times(final, bracket, x):
            # 0.5 · (x · bracket) or (x · bracket) · 0.5
            operands = _binary(final, MUL_FUNCTIONS, "mul")
            if operands is None or set(operands) != {x, bracket}:
                return None
            outer = only_user(final)
            if outer is None or _scaled(outer, 0.5) is not final:
                return None
            final = outer
        chain = _ancestors_up_to(final, x)
        for inner in chain[:-1]:
            if any(user not in chain for user in inner.users):
                return None  # an intermediate is used elsewhere: removing the chain would not free it
        return final, x, "gelu", "tanh" if tanh_arg is not None else "none", chain


def _ancestors_up_to(final: torch.fx.Node, x: torch.fx.Node) -> list[torch.fx.Node]:
    """Nodes between ``x`` (excluded) and ``final`` (included), in graph order."""
    found: set[torch.fx.Node] = set()
    stack = [final]
    while stack:
        node = stack.pop()
        if node is x or node in found:
            continue
        found.add(node)
        stack.extend(a for a in node.all_input_nodes if a is not x)
    order = {n: i for i, n in enumerate(final.graph.nodes)}
    return sorted(found, key=order.__getitem__)
