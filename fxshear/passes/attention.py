"""Pass: eager/math attention keeps no probabilities for backward (``fxshear::attention``).

Hugging Face's eager attention (BERT, GPT-2, LLaMA, ViT) traces to
``matmul(q, kᵀ) · scale [+ mask] → softmax → [cast] → [dropout] → matmul(·, v)``.  Inductor then
saves the softmax output, the dropped-out probabilities and the byte-per-element dropout mask:
three ``[batch, heads, q, k]`` tensors per layer; so does ``F.scaled_dot_product_attention`` with
dropout on CPU, which falls back to the same math.  The op keeps q, k, v (saved anyway for the
matmul gradients), the fp32 row log-sum-exp and a 1-bit dropout mask drawn exactly as eager
draws it, and rebuilds the probabilities in backward.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from ..config import ShearConfig
from .base import RewritePass, Walk, excluded
from .match import ADD_FUNCTIONS, DIV_FUNCTIONS, MUL_FUNCTIONS, argument, call, dropout_arguments, is_float_tensor, is_function, is_method, only_user, outputs, requires_grad, tensor_value

NAME = "attention"

_MATMUL = (torch.matmul, torch.ops.aten.matmul.default)
_SOFTMAX = (torch.nn.functional.softmax, torch.softmax, torch.ops.aten.softmax.int)
# ``scores += mask`` too: HF's eager attention adds the mask in place on a fresh tensor.
_ADD = (*ADD_FUNCTIONS, operator.iadd)


@dataclass
class AttentionMatch:
    """The nodes of one attention pattern, from the q·kᵀ matmul to the ·v matmul."""

    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    mask: torch.fx.Node | None
    scale: float
    dropout_p: float
    chain: list[torch.fx.Node]  # scores ... output matmul, in graph order
    boolean_mask: bool = False  # SDPA's True-means-attend mask, made additive by the pass
    causal: bool = False  # SDPA's is_causal: the pass builds its (top-left aligned) additive mask
    kv_groups: int = 1  # SDPA's enable_gqa: query heads per k/v head, repeated by the pass

    @property
    def output(self) -> torch.fx.Node:
        return self.chain[-1]


def _is_last_two_transpose(node: torch.fx.Node) -> bool:
    value = tensor_value(node.args[0]) if node.args else None
    if value is None:
        return False
    rank = value.dim()
    dims = {d % rank for d in node.args[1:3] if isinstance(d, int)}
    return dims == {rank - 2, rank - 1}


def _key_of(transposed: object) -> torch.fx.Node | None:
    if is_method(transposed, "transpose") or is_function(transposed, torch.transpose):
        if len(transposed.args) >= 3 and _is_last_two_transpose(transposed):
            return transposed.args[0]
    return None


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def match_attention(softmax: torch.fx.Node) -> AttentionMatch | str | None:
    """The pattern around a softmax node, a reason string when it almost matches, or None."""
    if not (is_function(softmax, *_SOFTMAX) or is_method(softmax, "softmax")):
        return None
    dim = argument(softmax, 1, "dim")
    scores = softmax.args[0]
    value = tensor_value(scores)
    if value is None or value.dim() != 4:
        return "scores are not a 4-D [batch, heads, q, k] tensor"
    if not isinstance(dim, int) or dim % 4 != 3:
        return "softmax is not over the last dimension"
    chain = [softmax]
    mask = None
    node = scores
    if (is_function(node, *_ADD) or is_method(node, "add", "__add__")) and len(node.args) == 2:
        left, right = node.args
        if not isinstance(left, torch.fx.Node) or not isinstance(right, torch.fx.Node):
            return "mask is not a tensor"
        mask = right
        if requires_grad(mask):
            return "the attention mask requires grad"
        if len(left.users) != 1:
            return "the scaled scores are used elsewhere"
        chain.insert(0, node)
        node = left
    scale = 1.0
    if (is_function(node, *MUL_FUNCTIONS, *DIV_FUNCTIONS) or is_method(node, "mul", "div")) and len(node.args) == 2:
        factor = _number(node.args[1])
        if factor is None:
            return "the scale is not a constant number"
        scale = factor if (node.target in MUL_FUNCTIONS or node.target == "mul") else 1.0 / factor
        if len(node.args[0].users) != 1:
            return "the raw scores are used elsewhere"
        chain.insert(0, node)
        node = node.args[0]
    if not (is_function(node, *_MATMUL) or is_method(node, "matmul")):
        return "scores do not come from a q @ kᵀ matmul"
    chain.insert(0, node)
    q, transposed = node.args[0], node.args[1]
    key = _key_of(transposed)
    if key is None:
        return "the matmul's right operand is not kᵀ"
    if len(transposed.users) != 1:
        return "kᵀ is used elsewhere"
    # Forward from the softmax: [cast] [dropout] @ v
    node = only_user(softmax)
    dropout_p = 0.0
    if node is not None and (is_method(node, "to", "type", "float")):
        cast, q_value = tensor_value(node), tensor_value(q)
        if cast is None or q_value is None or cast.dtype != q_value.dtype:
            return "the probabilities are cast to a dtype other than q's"
        chain.append(node)
        node = only_user(node)
    if node is not None and dropout_arguments(node) is not None:
        _, p, training, inplace = dropout_arguments(node)
        if not isinstance(p, (int, float)) or not isinstance(training, bool) or inplace:
            return "dropout arguments are not constants"
        dropout_p = float(p) if training else 0.0
        chain.append(node)
        node = only_user(node)
    if node is None:
        return "the probabilities are used elsewhere"
    if not (is_function(node, *_MATMUL) or is_method(node, "matmul")) or node.args[0] is not chain[-1]:
        return "the probabilities do not feed a matmul with v"
    chain.append(node)
    for intermediate in chain[:-1]:
        if len(intermediate.users) != 1:
            return f"{intermediate.name} is used outside the attention pattern"
    return AttentionMatch(q=q, k=key, v=node.args[1], mask=mask, scale=scale, dropout_p=dropout_p,
                          chain=chain)


_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)


def match_sdpa(node: torch.fx.Node) -> AttentionMatch | str | None:
    """``F.scaled_dot_product_attention`` where it keeps the probabilities for backward.

    On CPU with dropout, SDPA falls back to its math path, which saves the softmax output, the
    dropped-out probabilities and the byte mask like eager attention; its dropout draws the mask
    as eager ``F.dropout`` of the probabilities does, so the op reproduces it.  Without dropout
    the CPU flash kernel runs (it keeps only the log-sum-exp), and on CUDA fused kernels do:
    there the call is left alone.  ``is_causal`` becomes an explicit additive mask (query ``i``
    attends keys ``j <= i``, SDPA's top-left alignment) when both lengths are static.
    ``enable_gqa`` (Hugging Face passes it for grouped-query attention without a padding mask)
    becomes k and v repeated per query head, as SDPA's math path does before it draws its mask:
    left to Inductor, the draw would come from Inductor's random stream rather than eager's.
    """
    if not is_function(node, *_SDPA):
        return None
    q, k, v = (argument(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = argument(node, 3, "attn_mask")
    dropout_p = argument(node, 4, "dropout_p", 0.0)
    is_causal = argument(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale")
    enable_gqa = node.kwargs.get("enable_gqa", False)
    if not isinstance(dropout_p, (int, float)) or not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return "SDPA arguments are not constants"
    value = tensor_value(q)
    if value is None or value.dim() != 4:
        return "SDPA inputs are not 4-D [batch, heads, seq, dim] tensors"
    key_value = tensor_value(k)
    kv_groups = 1
    if enable_gqa:
        kv_heads = key_value.shape[-3] if key_value is not None and key_value.dim() == 4 else None
        if not isinstance(value.shape[-3], int) or not isinstance(kv_heads, int) or value.shape[-3] % kv_heads:
            return "SDPA with enable_gqa needs static head counts, query heads a multiple of k/v heads"
        kv_groups = value.shape[-3] // kv_heads
    if is_causal and (mask is not None or key_value is None
                      or not isinstance(value.shape[-2], int) or not isinstance(key_value.shape[-2], int)):
        return "causal SDPA with an attn_mask or symbolic sequence lengths is not rewritten"
    if value.device.type != "cpu":
        return f"on {value.device.type} SDPA runs a fused kernel that keeps no probabilities"
    if dropout_p == 0:
        return "SDPA without dropout runs the CPU flash kernel, which keeps no probabilities"
    mask_value = tensor_value(mask) if isinstance(mask, torch.fx.Node) else None
    boolean_mask = mask_value is not None and mask_value.dtype == torch.bool
    if mask is not None and not (boolean_mask or (isinstance(mask, torch.fx.Node) and is_float_tensor(mask))):
        return "SDPA's attn_mask is neither boolean nor an fp32/fp16/bf16 additive mask"
    if isinstance(mask, torch.fx.Node) and requires_grad(mask):
        return "the attention mask requires grad"
    if scale is None:
        if not isinstance(value.shape[-1], int):
            return "the head dimension is symbolic, so SDPA's default scale is not a constant"
        scale = value.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)):
        return "the SDPA scale is not a constant number"
    return AttentionMatch(q=q, k=k, v=v, mask=mask, scale=float(scale), dropout_p=float(dropout_p), chain=[node],
                          boolean_mask=boolean_mask, causal=is_causal, kv_groups=kv_groups)


class AttentionPass(RewritePass[AttentionMatch]):
    """Rewrite eager attention into ``fxshear::attention`` (probabilities recomputed in backward)."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.attention_recompute

    def match(self, walk: Walk, node: torch.fx.Node) -> AttentionMatch | str | None:
        return match_attention(node) or match_sdpa(node)

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: AttentionMatch) -> str:
        graph, cfg = walk.graph, walk.cfg
        out = found.output
        with graph.inserting_before(out):
            if found.kv_groups > 1:  # SDPA's enable_gqa: each k/v head serves kv_groups query heads
                found.k, found.v = (call(graph, torch.repeat_interleave, (node, found.kv_groups),
                                         kwargs={"dim": -3}, like=out, pass_name=self.name)
                                    for node in (found.k, found.v))
            mask = found.mask
            if found.boolean_mask:
                # True = attend.  finfo.min rather than -inf: the same probabilities wherever a
                # row attends to something; a row that attends to nothing comes out uniform
                # (as eager attention's additive masks give) rather than NaN.
                mask = call(graph, torch.where, (mask, 0.0, torch.finfo(torch.float32).min), like=out,
                            pass_name=self.name)
            if found.causal:  # query i attends keys j <= i, as SDPA's is_causal does
                sq, sk = tensor_value(found.q).shape[-2], tensor_value(found.k).shape[-2]
                full = call(graph, torch.full, ((sq, sk), torch.finfo(torch.float32).min),
                            kwargs={"dtype": torch.float32, "device": tensor_value(found.q).device},
                            like=out, pass_name=self.name)
                mask = call(graph, torch.triu, (full,), kwargs={"diagonal": 1}, like=out, pass_name=self.name)
            bits = None
            if found.dropout_p > 0:
                # Drawn where eager's dropout draws (after the scores, before anything after
                # the attention), so the generator is used in eager's order.
                bits = call(graph, torch.ops.fxshear.attention_dropout_draw.default,
                            (found.q, found.k, found.dropout_p, cfg.kernels, cfg.dropout_rng), like=out,
                            pass_name=self.name)
            fused = call(graph, torch.ops.fxshear.attention.default,
                         (found.q, found.k, found.v, mask, bits, found.scale, found.dropout_p,
                          cfg.kernels), like=out, pass_name=self.name)
        result = outputs(graph, fused, 2, like=out, pass_name=self.name)[0]
        out.replace_all_uses_with(result)
        for dead in reversed(found.chain):
            graph.erase_node(dead)
        transposed_users = [u for u in found.k.users if _key_of(u) is found.k and not u.users]
        for dead in transposed_users:
            graph.erase_node(dead)
        return f"{out.name} (dropout p={found.dropout_p:g})"

    def why_not(self, walk: Walk, node: torch.fx.Node, found: AttentionMatch) -> str | None:
        cfg = walk.cfg
        pattern = excluded(found.output, cfg)
        if pattern:
            return f"module excluded by pattern {pattern!r}"
        for name, node in (("q", found.q), ("k", found.k), ("v", found.v)):
            value = tensor_value(node)
            if value is None or value.dim() != 4 or not is_float_tensor(node):
                return f"{name} is not a 4-D float tensor"
        dtypes = {tensor_value(n).dtype for n in (found.q, found.k, found.v)}
        if len(dtypes) != 1:
            return "q, k and v differ in dtype"
        if not any(requires_grad(n) for n in (found.q, found.k, found.v)):
            return "no gradient flows through it, so nothing is saved for backward"
        if found.mask is not None and not found.boolean_mask:
            mask = tensor_value(found.mask)
            if mask is None or not mask.dtype.is_floating_point:
                return "the additive mask is not a float tensor"
        return None
