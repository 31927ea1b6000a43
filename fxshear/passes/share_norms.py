"""Pass: LayerNorm / RMSNorm and the Linears they feed share one saved tensor (MS-LN, MS-RMSNorm).

Why: a norm's backward can be written from its normalized output ``z`` and ``rstd`` alone
(docs/design.md §5), and the following Linear's weight gradient can be taken from the same ``z``:
with ``y = z·γ + β`` feeding ``W``, ``dW = (gᵀz)·γ + outer(Σg, β)``.  So the norm's input and
its affine output are no longer saved; ``z`` is, once.  The model and its state_dict are left
exactly as written: no folding of γ/β into the next layer and no division by γ.

Rewritten:
    y = layer_norm(x, w, b)           ->  z, rstd = fxshear::normalize(x, "layer")
                                          y = z * w + b
    o = linear(y, W, c)               ->  o = fxshear::shared_linear(y, z, w, b, W, c)
Hugging Face's hand-written RMSNorm (``x.float() · rsqrt(mean(x²) + eps)``, cast back, times
the weight) and ``F.rms_norm`` are matched the same way.  GPT-2's Conv1D
(``addmm(c, y.view(-1, D), W)``) is treated as a Linear with weight ``Wᵀ``.  A Linear behind a
training dropout (PEFT LoRA's ``lora_dropout`` before LoRA A, BERT's embedding dropout before
the first layer's q/k/v) shares ``z`` too: with ``dropout_bits`` on, the mask is kept at 1 bit
per element anyway, and its weight gradient rebuilds ``dropout(z·γ + β)`` from ``z`` and the bits.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from ..config import ShearConfig
from .base import RewritePass, Walk, excluded
from .match import (
    argument,
    call,
    dropout_arguments,
    fake_run,
    is_float_tensor,
    is_function,
    is_method,
    Consumer,
    linear_consumers,
    only_user,
    outputs,
    requires_grad,
    tensor_value,
)

NAME = "share_norms"

_LAYER_NORM = (torch.nn.functional.layer_norm, torch.layer_norm)
_RMS_NORM = tuple(f for f in (getattr(torch.nn.functional, "rms_norm", None), getattr(torch, "rms_norm", None)) if f)
_MUL = (torch.mul, operator.mul)
_ADD = (torch.add, operator.add)
_CASTS = ("to", "type", "float")


@dataclass
class NormMatch:
    """One norm: its input, kind, eps, affine parameters, and the nodes the rewrite replaces."""

    kind: str
    x: torch.fx.Node
    eps: float
    gamma: torch.fx.Node | None
    beta: torch.fx.Node | None
    output: torch.fx.Node          # the affine output y every consumer reads
    replaced: torch.fx.Node        # the node whose value becomes z·γ+β (LN) or z (RMS chain)
    dead: list[torch.fx.Node] = field(default_factory=list)


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _match_layer_norm(node: torch.fx.Node) -> NormMatch | str | None:
    if not is_function(node, *_LAYER_NORM):
        return None
    x = argument(node, 0, "input")
    shape = argument(node, 1, "normalized_shape")
    gamma, beta = argument(node, 2, "weight"), argument(node, 3, "bias")
    eps = _number(argument(node, 4, "eps", 1e-5))
    value = tensor_value(x)
    if value is None or eps is None:
        return "input or eps not known at trace time"
    if tuple(shape) != (value.shape[-1],):
        return "normalizes over more than the last dimension"
    return NormMatch("layer", x, eps, gamma, beta, output=node, replaced=node)


def _match_rms_function(node: torch.fx.Node) -> NormMatch | str | None:
    if not _RMS_NORM or not is_function(node, *_RMS_NORM):
        return None
    x = argument(node, 0, "input")
    shape = argument(node, 1, "normalized_shape")
    gamma = argument(node, 2, "weight")
    eps = argument(node, 3, "eps")
    value = tensor_value(x)
    if value is None or tuple(shape) != (value.shape[-1],):
        return "normalizes over more than the last dimension"
    eps = torch.finfo(value.dtype).eps if eps is None else _number(eps)
    if eps is None:
        return "eps not known at trace time"
    return NormMatch("rms", x, eps, gamma, None, output=node, replaced=node)


def _match_rms_chain(rsqrt: torch.fx.Node) -> NormMatch | str | None:
    """Hugging Face's RMSNorm: h = x.float(); h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps);
    cast back; weight * (that)."""
    if not (is_function(rsqrt, torch.rsqrt) or is_method(rsqrt, "rsqrt")):
        return None
    add = rsqrt.args[0]
    if not (is_function(add, *_ADD) or is_method(add, "add", "__add__")) or len(add.args) != 2:
        return None
    mean, eps = add.args[0], _number(add.args[1])
    if eps is None or not (is_function(mean, torch.mean) or is_method(mean, "mean")):
        return None
    dim = argument(mean, 1, "dim")
    if dim not in (-1, [-1], (-1,)) or not mean.kwargs.get("keepdim", argument(mean, 2, "keepdim", False)):
        return None
    square = mean.args[0]
    if not ((is_function(square, torch.pow) or is_method(square, "pow")) and square.args[1] == 2):
        return None
    h = square.args[0]
    scaled = only_user(rsqrt)
    if scaled is None or not (is_function(scaled, *_MUL) or is_method(scaled, "mul")) or set(scaled.args) != {h, rsqrt}:
        return "rsqrt(mean(x²)+eps) is not simply multiplied by x"
    for inner in (square, mean, add):
        if len(inner.users) != 1:
            return f"{inner.name} is used outside the RMSNorm"
    z_node = scaled
    cast = only_user(scaled)
    if cast is not None and is_method(cast, *_CASTS):
        z_node = cast
    product = only_user(z_node)
    if product is None or not (is_function(product, *_MUL) or is_method(product, "mul")):
        return "the normalized tensor is not multiplied by a weight (or is used elsewhere)"
    others = [a for a in product.args if a is not z_node]
    if len(others) != 1 or not isinstance(others[0], torch.fx.Node):
        return "the RMSNorm weight is not a tensor"
    gamma = others[0]
    gamma_value, h_value = tensor_value(gamma), tensor_value(h)
    if gamma_value is None or h_value is None or tuple(gamma_value.shape) != (h_value.shape[-1],):
        return "the RMSNorm weight does not have the hidden size"
    # The op's z comes out in its input's dtype: feed it x (pre-cast) when the chain casts back.
    x = h
    if z_node is not scaled and is_method(h, *_CASTS) and len(h.users) == 2:
        source_value, z_value = tensor_value(h.args[0]), tensor_value(z_node)
        if source_value is not None and z_value is not None and source_value.dtype == z_value.dtype:
            x = h.args[0]
    dead = [n for n in (h, square, mean, add, rsqrt, scaled, z_node) if n is not x]
    return NormMatch("rms", x, eps, gamma, None, output=product, replaced=z_node, dead=dead)


def match_norm(node: torch.fx.Node) -> NormMatch | str | None:
    for matcher in (_match_layer_norm, _match_rms_function, _match_rms_chain):
        found = matcher(node)
        if found is not None:
            return found
    return None


class ShareNormsPass(RewritePass[NormMatch]):
    """Rewrite norm → Linear pairs so both save only the norm's normalized output."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.share_norms

    def match(self, walk: Walk, node: torch.fx.Node) -> NormMatch | str | None:
        return match_norm(node)

    def reported_node(self, node: torch.fx.Node, found: NormMatch | str) -> torch.fx.Node:
        return node if isinstance(found, str) else found.output

    def why_not(self, walk: Walk, node: torch.fx.Node, found: NormMatch) -> str | None:
        reason = self._config_reason(found, walk.cfg)
        if reason:
            return reason
        consumers = linear_consumers(found.output)
        if walk.cfg.dropout_bits:
            consumers += self._behind_dropout(found.output, walk.cfg)
        if not consumers:
            return ("its output feeds no Linear with a trainable weight (directly or through a "
                    "training dropout), so there is no saved copy to share")
        walk.state[found.output] = consumers
        return None

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: NormMatch) -> str:
        consumers = walk.state.pop(found.output)
        self._rewrite(walk.graph, found, consumers, walk.cfg)
        behind = sum(c.dropout is not None for c in consumers)
        return (f"{found.output.name} ({found.kind}norm → {len(consumers)} linear"
                f"{f', {behind} behind dropout' if behind else ''})")

    def _rewrite(self, graph: torch.fx.Graph, found: NormMatch, consumers: list[Consumer],
                 cfg: ShearConfig) -> None:
        anchor = found.replaced
        with graph.inserting_before(anchor):
            normalized = call(graph, torch.ops.fxshear.normalize.default,
                              (found.x, found.kind, found.eps, cfg.kernels), like=anchor, pass_name=self.name)
        z, _ = outputs(graph, normalized, 2, like=anchor, pass_name=self.name)
        if found.kind == "layer" or found.replaced is found.output:
            # The whole norm call is replaced: rebuild its affine from z.
            with graph.inserting_after(z):
                y = z
                if found.gamma is not None:
                    y = call(graph, torch.mul, (y, found.gamma), like=anchor, pass_name=self.name)
                if found.beta is not None:
                    with graph.inserting_after(y):
                        y = call(graph, torch.add, (y, found.beta), like=anchor, pass_name=self.name)
            found.output.replace_all_uses_with(y)
            graph.erase_node(found.output)
            output = y
        else:
            # RMS chain: the cast-back normalized value becomes z; weight * z stays as written.
            found.replaced.replace_all_uses_with(z)
            output = found.output
        applied = {}
        for drop in dict.fromkeys(c.dropout for c in consumers if c.dropout is not None):
            applied[drop] = self._split_dropout(graph, drop, cfg)
        for consumer in consumers:
            self._share(graph, consumer, output, z, found, cfg, applied.get(consumer.dropout))
        for dead in reversed(found.dead):
            if not dead.users:
                graph.erase_node(dead)

    @staticmethod
    def _behind_dropout(y: torch.fx.Node, cfg: ShearConfig) -> list[Consumer]:
        """Linears (trainable, reading the dropout output itself) behind a training dropout of ``y``."""
        found = []
        for user in y.users:
            parts = dropout_arguments(user)
            if parts is None or parts[0] is not y:
                continue
            _, p, training, inplace = parts
            if training is not True or inplace or isinstance(p, bool) or not isinstance(p, (int, float)) \
                    or not 0 < p < 1 or excluded(user, cfg):
                continue  # left to the dropout_bits pass, which logs why
            for consumer in linear_consumers(user):
                if consumer.view is None:
                    consumer.dropout, consumer.p = user, float(p)
                    found.append(consumer)
        return found

    def _split_dropout(self, graph: torch.fx.Graph, drop: torch.fx.Node, cfg: ShearConfig,
                       ) -> tuple[torch.fx.Node, torch.fx.Node, float]:
        """The dropout as draw + apply, where it stood (so the generator is used in eager's order)."""
        x, p = drop.args[0] if drop.args else drop.kwargs["input"], float(dropout_arguments(drop)[1])
        with graph.inserting_before(drop):
            bits = call(graph, torch.ops.fxshear.dropout_draw.default, (x, p, cfg.kernels, cfg.dropout_rng),
                        like=drop, pass_name=self.name)
            applied = call(graph, torch.ops.fxshear.dropout_apply.default, (x, bits, p, cfg.kernels),
                           like=drop, pass_name=self.name)
        drop.replace_all_uses_with(applied)
        graph.erase_node(drop)
        return applied, bits, p

    def _share(self, graph: torch.fx.Graph, consumer: Consumer, y: torch.fx.Node, z: torch.fx.Node,
               found: NormMatch, cfg: ShearConfig,
               dropout: tuple[torch.fx.Node, torch.fx.Node, float] | None = None) -> None:
        node = consumer.node
        extra: tuple = ()
        with graph.inserting_before(node):
            x_in, z_in, weight = y, z, consumer.weight
            if dropout is not None:
                x_in, bits, p = dropout
                extra = (bits, p)
            if consumer.view is not None:
                x_in = consumer.view
                z_in = graph.call_method(consumer.view.target, (z, *consumer.view.args[1:]),
                                         dict(consumer.view.kwargs))
                z_in.meta.update(consumer.view.meta)
                z_in.meta.pop("example_value", None)
                fake_run(z_in)
            if consumer.transposed:
                weight = call(graph, torch.t, (consumer.weight,), like=node, pass_name=self.name)
            shared = call(graph, torch.ops.fxshear.shared_linear.default,
                          (x_in, z_in, found.gamma, found.beta, weight, consumer.bias, cfg.kernels, *extra),
                          like=node, pass_name=self.name)
        node.replace_all_uses_with(shared)
        graph.erase_node(node)

    @staticmethod
    def _config_reason(found: NormMatch, cfg: ShearConfig) -> str | None:
        pattern = excluded(found.output, cfg)
        if pattern:
            return f"module excluded by pattern {pattern!r}"
        if not is_float_tensor(found.x):
            return "input is not an fp32/fp16/bf16 tensor"
        if not requires_grad(found.output):
            return "no gradient flows through it, so nothing is saved for backward"
        for name, param in (("weight", found.gamma), ("bias", found.beta)):
            if param is not None and not isinstance(param, torch.fx.Node):
                return f"the norm's {name} is not a tensor"
        return None
