"""Pass: ``Linear(hidden → vocab)`` followed by cross-entropy never keeps the logits for backward.

Why: a causal LM's loss saves the ``[tokens, vocab]`` logits (in fp32, after Hugging Face's
``logits.float()``): with a 32k vocabulary that is the largest tensor of a small model's step.
``fxshear::linear_cross_entropy`` walks the tokens in chunks, computing the loss and, as it goes,
the gradients of the hidden states and the head weight (scaled by the incoming gradient in
backward), so no chunk's logits outlive the chunk.

Matched: ``cross_entropy(view/reshape/slice/float/to(logits), target)`` where ``logits =
linear(h, W, b)`` and every step keeps the vocabulary as the last dimension (the shifted
``logits[:, :-1]`` of hand-written causal-LM losses: the slice is replayed on ``h``); any ``reduction``, ``ignore_index``,
``label_smoothing`` and a constant class ``weight``.  With ``reduction="none"`` the op keeps
``h`` instead of finished gradients and rebuilds each chunk's logits in the backward.  When the logits are also used
elsewhere (returned to the caller) they are still computed for that use and the op reads its
chunks from them instead of recomputing them, but they are not saved; the head becomes
``fxshear::returned_linear``, whose backward skips its matmuls when nobody backpropagates
through the returned logits (AOTAutograd then passes zeros).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..config import ShearConfig
from .base import RewritePass, Walk, excluded
from .match import argument, call, is_function, is_method, linear_parts, outputs, requires_grad, tensor_value

NAME = "fused_loss"

_CROSS_ENTROPY = (torch.nn.functional.cross_entropy,)
_CASTS = ("float", "to", "contiguous")
_RESHAPES = ("view", "reshape")


#: (the head Linear, the steps between it and the loss, logits in fp32, whether the logits have other users)
_LossMatch = tuple[torch.fx.Node, list[torch.fx.Node], bool, bool]


class FusedLossPass(RewritePass[_LossMatch]):
    """Rewrite lm-head + cross-entropy into ``fxshear::linear_cross_entropy``."""

    name = NAME

    def applies(self, cfg: ShearConfig) -> bool:
        return cfg.fused_loss

    def match(self, walk: Walk, node: torch.fx.Node) -> _LossMatch | str | None:
        if not is_function(node, *_CROSS_ENTROPY):
            return None
        return self._match(node, walk.cfg)

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: _LossMatch) -> str:
        from ..kernels.linear_cross_entropy import default_chunk_size

        graph, cfg = walk.graph, walk.cfg
        linear, steps, logits_fp32, extra_users = found
        hidden, weight, bias = linear_parts(linear)
        target = argument(node, 1, "target")
        ignore_index = argument(node, 4, "ignore_index", -100)
        reduction = argument(node, 6, "reduction", "mean")
        smoothing = float(argument(node, 7, "label_smoothing", 0.0))
        class_weight = argument(node, 2, "weight")
        hidden_value, weight_value = tensor_value(hidden), tensor_value(weight)
        # Rows per chunk depend on the vocabulary only (the token count may be dynamic).
        chunk = default_chunk_size(weight_value.shape[0], logits_fp32, hidden_value.dtype,
                                   device=hidden_value.device)
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
            # The slices and reshapes between the head and the loss act on the token
            # dimensions only, so they are replayed on the hidden states.
            rows = call(graph, torch.reshape,
                        (self._replay(graph, steps, hidden, hidden_value.shape[-1], linear),
                         (-1, hidden_value.shape[-1])),
                        like=linear, pass_name=self.name)
            # Returned logits are computed anyway: the op copies its chunks from them rather
            # than repeating the vocabulary matmul (it still saves none of them).
            given_logits = (call(graph, torch.reshape,
                                 (self._replay(graph, steps, linear, weight_value.shape[0], linear),
                                  (-1, weight_value.shape[0])),
                                 like=linear, pass_name=self.name) if extra_users else None)
            fused = call(graph, torch.ops.fxshear.linear_cross_entropy.default,
                         (rows, weight, bias, target, int(ignore_index), smoothing, reduction,
                          chunk, logits_fp32,
                          requires_grad(hidden), requires_grad(weight), cfg.kernels, given_logits,
                          class_weight),
                         like=node, pass_name=self.name)
        loss = outputs(graph, fused, 4, like=node, pass_name=self.name)[0]
        node.replace_all_uses_with(loss)
        graph.erase_node(node)
        for dead in reversed(steps):
            if not dead.users:
                graph.erase_node(dead)
        note = ("; the logits are still computed for their other use (and read from there), but not saved"
                if extra_users else "")
        weighted = ", class weights" if class_weight is not None else ""
        return f"{node.name} (vocab {weight_value.shape[0]}, {reduction}{weighted}){note}"

    def _replay(self, graph: torch.fx.Graph, steps: list[torch.fx.Node], start: torch.fx.Node, last_dim: int,
                like: torch.fx.Node) -> torch.fx.Node:
        """``start`` put through the structural steps (slices, views), ``last_dim`` as the last size."""
        current = start
        for step in steps:
            if step.op == "call_function":  # getitem: the index leaves the last dimension alone
                current = call(graph, operator.getitem, (current, step.args[1]), like=like, pass_name=self.name)
            elif step.target in _RESHAPES:
                sizes = _sizes(step)
                current = call(graph, torch.reshape, (current, (*sizes[:-1], last_dim)), like=like,
                               pass_name=self.name)
        return current

    def _match(self, node: torch.fx.Node, cfg: ShearConfig) -> _LossMatch | str:
        for index, name in ((3, "size_average"), (5, "reduce")):
            if argument(node, index, name) is not None:
                return f"cross_entropy's deprecated {name} argument is not supported"
        reduction = argument(node, 6, "reduction", "mean")
        if reduction not in ("mean", "sum", "none"):
            return f"reduction={reduction!r} is not one of cross_entropy's"
        class_weight = argument(node, 2, "weight")
        if class_weight is not None:
            value = tensor_value(class_weight) if isinstance(class_weight, torch.fx.Node) else None
            if value is None or not value.is_floating_point() or value.dim() != 1:
                return "the class weight is not a floating-point [vocab] tensor"
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
        steps: list[torch.fx.Node] = []
        current = logits
        while linear_parts(current) is None:
            if not (is_method(current, *_CASTS, *_RESHAPES) or is_function(current, operator.getitem)):
                return "the logits do not come straight from a Linear (through slices, views and casts)"
            value, source = tensor_value(current), tensor_value(current.args[0])
            if value is None or source is None or value.shape[-1] != vocab:
                return "a step between the Linear and the loss changes the vocabulary dimension"
            if is_function(current, operator.getitem) and not _keeps_last_dim(current.args[1], source.dim()):
                return "an index between the Linear and the loss touches the vocabulary dimension"
            if is_method(current, *_RESHAPES) and _sizes(current) is None:
                return "a view between the Linear and the loss does not name the vocabulary size last"
            if current.target in ("float", "to"):
                if value.dtype != torch.float32:
                    return "the logits are cast to a dtype other than fp32"
                logits_fp32 = True
            extra_users |= len(current.users) > 1
            steps.append(current)
            current = current.args[0]
        steps.reverse()  # from the Linear to the loss
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
        return linear, steps, logits_fp32, extra_users


def _sizes(view: torch.fx.Node) -> tuple | None:
    """A view/reshape's target sizes when the last one is the constant vocabulary size."""
    sizes = view.args[1:] if len(view.args) > 2 else view.args[1] if len(view.args) == 2 else view.kwargs.get("shape")
    if isinstance(sizes, int):
        sizes = (sizes,)
    if not isinstance(sizes, (tuple, list)) or not sizes:
        return None
    value = tensor_value(view)
    if not isinstance(sizes[-1], int) or value is None or sizes[-1] != value.shape[-1]:
        return None
    return tuple(sizes)


def _keeps_last_dim(index: object, ndim: int) -> bool:
    """Whether ``tensor[index]`` (basic indexing: ints, slices, one Ellipsis) leaves the last dim whole."""
    entries = index if isinstance(index, tuple) else (index,)
    if any(e is None or not (isinstance(e, (int, slice, torch.fx.Node)) or e is Ellipsis) for e in entries):
        return False
    if any(isinstance(e, torch.fx.Node) and tensor_value(e) is not None for e in entries):
        return False  # a tensor index (advanced indexing)
    whole = slice(None, None, None)
    if Ellipsis in entries:
        after = entries[entries.index(Ellipsis) + 1:]
        return not after or after[-1] == whole
    return len(entries) < ndim or entries[-1] == whole
