"""Pass: ``Linear(hidden → vocab)`` followed by cross-entropy never keeps the logits for backward.

Why: a causal LM's loss saves the ``[tokens, vocab]`` logits (in fp32, after Hugging Face's
``logits.float()``): with a 32k vocabulary that is the largest tensor of a small model's step.
``fxshear::linear_cross_entropy`` walks the tokens in chunks, computing the loss and, as it goes,
the gradients of the hidden states and the head weight (scaled by the incoming gradient in
backward), so no chunk's logits outlive the chunk.

Matched: ``cross_entropy(view/reshape/float/to(logits), target)`` where ``logits = linear(h, W, b)``
and every step keeps the vocabulary as the last dimension.  When the logits are also used
elsewhere (returned to the caller) they are still computed for that use and the op reads its
chunks from them instead of recomputing them, but they are not saved; the head becomes
``fxshear::returned_linear``, whose backward skips its matmuls when nobody backpropagates
through the returned logits (AOTAutograd then passes zeros).
"""

from __future__ import annotations

import torch
import torch.fx

from ..config import ShearConfig
from .base import PassReport, excluded
from .match import argument, call, is_function, is_method, linear_parts, outputs, requires_grad, tensor_value

NAME = "fused_loss"

_CROSS_ENTROPY = (torch.nn.functional.cross_entropy,)
_PASS_THROUGH = ("view", "reshape", "float", "to", "contiguous")


class FusedLossPass:
    """Rewrite lm-head + cross-entropy into ``fxshear::linear_cross_entropy``."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.fused_loss

    def run(self, gm: torch.fx.GraphModule, cfg: ShearConfig) -> PassReport:
        from ..kernels.linear_cross_entropy import default_chunk_size

        report = PassReport(self.name)
        graph = gm.graph
        for node in list(graph.nodes):
            if not is_function(node, *_CROSS_ENTROPY):
                continue
            found = self._match(node, cfg)
            if isinstance(found, str):
                report.skip(node, found)
                continue
            linear, logits_fp32, extra_users = found
            hidden, weight, bias = linear_parts(linear)
            target = argument(node, 1, "target")
            ignore_index = argument(node, 4, "ignore_index", -100)
            reduction = argument(node, 6, "reduction", "mean")
            smoothing = float(argument(node, 7, "label_smoothing", 0.0))
            hidden_value, weight_value = tensor_value(hidden), tensor_value(weight)
            # Rows per chunk depend on the vocabulary only (the token count may be dynamic).
            chunk = default_chunk_size(weight_value.shape[0], logits_fp32, hidden_value.dtype)
            if extra_users:
                # The returned logits stay a differentiable output; usually nobody backpropagates
                # through them and AOTAutograd feeds their backward zeros.  returned_linear skips
                # its matmuls for an all-zero gradient (and is F.linear's backward otherwise).
                with graph.inserting_before(linear):
                    head = call(graph, torch.ops.fxshear.returned_linear.default, (hidden, weight, bias),
                                like=linear, pass_name=self.name)
                linear.replace_all_uses_with(head)
                graph.erase_node(linear)
                linear = head
            with graph.inserting_before(node):
                rows = call(graph, torch.reshape, (hidden, (-1, hidden_value.shape[-1])),
                            like=linear, pass_name=self.name)
                # Returned logits are computed anyway: the op copies its chunks from them rather
                # than repeating the vocabulary matmul (it still saves none of them).
                given_logits = (call(graph, torch.reshape, (linear, (-1, weight_value.shape[0])),
                                     like=linear, pass_name=self.name) if extra_users else None)
                fused = call(graph, torch.ops.fxshear.linear_cross_entropy.default,
                             (rows, weight, bias, target, int(ignore_index), smoothing, reduction,
                              chunk, logits_fp32,
                              requires_grad(hidden), requires_grad(weight), cfg.kernels, given_logits),
                             like=node, pass_name=self.name)
            loss = outputs(graph, fused, 4, like=node, pass_name=self.name)[0]
            node.replace_all_uses_with(loss)
            chain = self._chain(node)
            graph.erase_node(node)
            for dead in chain:
                if not dead.users:
                    graph.erase_node(dead)
            note = ("; the logits are still computed for their other use (and read from there), but not saved"
                    if extra_users else "")
            report.rewritten.append(f"{node.name} (vocab {weight_value.shape[0]}, {reduction}){note}")
        graph.lint()
        gm.recompile()
        return report

    @staticmethod
    def _chain(node: torch.fx.Node) -> list[torch.fx.Node]:
        """The nodes from the cross-entropy's input back to the linear, nearest first."""
        chain = []
        current = argument(node, 0, "input")
        while isinstance(current, torch.fx.Node):
            chain.append(current)
            if linear_parts(current) is not None or current.target is torch.ops.fxshear.returned_linear.default:
                break
            current = current.args[0] if current.args else None
        return chain

    def _match(self, node: torch.fx.Node, cfg: ShearConfig) -> tuple[torch.fx.Node, bool, bool] | str:
        for index, name in ((2, "weight"), (3, "size_average"), (5, "reduce")):
            if argument(node, index, name) is not None:
                return f"cross_entropy's {name} argument is not supported"
        reduction = argument(node, 6, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            return f"reduction={reduction!r}: per-token losses need the logits' row gradients"
        smoothing = argument(node, 7, "label_smoothing", 0.0)
        ignore_index = argument(node, 4, "ignore_index", -100)
        if not isinstance(smoothing, (int, float)) or not isinstance(ignore_index, int):
            return "ignore_index or label_smoothing is not a constant"
        logits = argument(node, 0, "input")
        target = argument(node, 1, "target")
        target_value, logits_value = tensor_value(target), tensor_value(logits)
        if target_value is None or target_value.dtype not in (torch.int64, torch.int32) \
                or logits_value is None or logits_value.dim() != 2 or target_value.dim() != 1:
            return "needs [tokens, vocab] logits and integer class targets (not probabilities)"
        vocab = logits_value.shape[-1]
        logits_fp32 = False
        extra_users = False
        current = logits
        while linear_parts(current) is None:
            if not is_method(current, *_PASS_THROUGH):
                return "the logits do not come straight from a Linear (through views and casts)"
            value = tensor_value(current)
            if value is None or value.shape[-1] != vocab:
                return "a step between the Linear and the loss changes the vocabulary dimension"
            if current.target in ("float", "to"):
                if value.dtype != torch.float32:
                    return "the logits are cast to a dtype other than fp32"
                logits_fp32 = True
            extra_users |= len(current.users) > 1
            current = current.args[0]
        linear = current
        extra_users |= len(linear.users) > 1
        hidden, weight, bias = linear_parts(linear)
        weight_value, hidden_value = tensor_value(weight), tensor_value(hidden)
        if weight_value is None or hidden_value is None or weight_value.shape[0] != vocab:
            return "the Linear's output size is not the vocabulary"
        if bias is not None and not isinstance(bias, torch.fx.Node):
            return "the Linear's bias is not a tensor"
        if hidden_value.dtype == torch.float32:
            logits_fp32 = True
        pattern = excluded(linear, cfg)
        if pattern:
            return f"module excluded by pattern {pattern!r}"
        if not (requires_grad(hidden) or requires_grad(weight)):
            return "no gradient flows through it, so nothing is saved for backward"
        return linear, logits_fp32, extra_users
