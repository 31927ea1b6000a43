"""Where the blocks are and how to run half of one: the architectures MEFT can make reversible.

A reversible block runs the pretrained block in two halves (MEFT3) or whole (MEFT1, MEFT2), with an
adapter added inside.  Each family below knows its Hugging Face block's submodules (transformers
5.x) and runs:

- ``attention_part(x)``: the attention sub-block with its residual (and, post-norm, its LayerNorm),
  an optional adapter added to the sub-block's output before the residual;
- ``mlp_part(h)``: the feed-forward sub-block likewise, the adapter either on its output
  (``parallel=False``, MEFT3) or beside it, fed the sub-block's input (``parallel=True``: MEFT1's
  adapter "in parallel to the FFN").

Families: ``bert`` (post-norm: BERT, RoBERTa, ELECTRA, MiniLM), ``distilbert`` (post-norm, its own
submodule names), ``decoder`` (pre-norm with RMSNorm and a gated MLP: Llama, Qwen2, Mistral), ``vit``
(pre-norm ViT).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Adapter = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    examples: str
    required: tuple[str, ...]  # attribute paths every block of the family has
    attention_part: Callable[[nn.Module, torch.Tensor, dict[str, Any], Adapter | None], torch.Tensor]
    mlp_part: Callable[[nn.Module, torch.Tensor, Adapter | None, bool], torch.Tensor]
    hidden_size: Callable[[nn.Module], int]
    #: keyword arguments of the block's forward handed on to its attention
    attention_kwargs: tuple[str, ...]
    #: arguments that must be None (what a reversible block cannot carry)
    unsupported: tuple[str, ...] = ()

    def matches(self, block: nn.Module) -> bool:
        return all(_has_path(block, path) for path in self.required)


def _has_path(module: nn.Module, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(module, name):
            return False
        module = getattr(module, name)
    return True


def _with_adapter(h: torch.Tensor, adapter: Adapter | None, source: torch.Tensor | None = None) -> torch.Tensor:
    return h if adapter is None else h + adapter(h if source is None else source)


# --- BERT family: post-norm, LayerNorm(sub-block + residual) ----------------------------------

def _bert_attention(block: nn.Module, x: torch.Tensor, call: dict[str, Any], adapter: Adapter | None) -> torch.Tensor:
    context = block.attention.self(x, attention_mask=call.get("attention_mask"))[0]
    out = block.attention.output
    h = out.dropout(out.dense(context))
    return out.LayerNorm(_with_adapter(h, adapter) + x)


def _bert_mlp(block: nn.Module, a: torch.Tensor, adapter: Adapter | None, parallel: bool) -> torch.Tensor:
    out = block.output
    h = out.dropout(out.dense(block.intermediate(a)))
    return out.LayerNorm(_with_adapter(h, adapter, a if parallel else None) + a)


# --- DistilBERT: post-norm like BERT; dropout sits inside ``ffn`` and on the attention weights -----

def _distilbert_attention(block: nn.Module, x: torch.Tensor, call: dict[str, Any],
                          adapter: Adapter | None) -> torch.Tensor:
    a = block.attention(x, attention_mask=call.get("attention_mask"))[0]
    return block.sa_layer_norm(_with_adapter(a, adapter) + x)


def _distilbert_mlp(block: nn.Module, a: torch.Tensor, adapter: Adapter | None, parallel: bool) -> torch.Tensor:
    return block.output_layer_norm(_with_adapter(block.ffn(a), adapter, a if parallel else None) + a)


# --- decoders: pre-norm, x + attn(norm(x)), h + mlp(norm(h)) ------------------------------------

def _decoder_attention(block: nn.Module, x: torch.Tensor, call: dict[str, Any], adapter: Adapter | None) -> torch.Tensor:
    a = block.self_attn(hidden_states=block.input_layernorm(x), attention_mask=call.get("attention_mask"),
                        position_ids=call.get("position_ids"), position_embeddings=call.get("position_embeddings"))[0]
    return x + _with_adapter(a, adapter)


def _decoder_mlp(block: nn.Module, h: torch.Tensor, adapter: Adapter | None, parallel: bool) -> torch.Tensor:
    n = block.post_attention_layernorm(h)
    return h + _with_adapter(block.mlp(n), adapter, n if parallel else None)


# --- ViT: pre-norm, dropout after each sub-block ------------------------------------------------

def _vit_attention(block: nn.Module, x: torch.Tensor, call: dict[str, Any], adapter: Adapter | None) -> torch.Tensor:
    a = block.dropout(block.attention(block.layernorm_before(x), call.get("attention_mask"))[0])
    return x + _with_adapter(a, adapter)


def _vit_mlp(block: nn.Module, h: torch.Tensor, adapter: Adapter | None, parallel: bool) -> torch.Tensor:
    n = block.layernorm_after(h)
    return h + _with_adapter(block.dropout(block.mlp(n)), adapter, n if parallel else None)


FAMILIES: tuple[Family, ...] = (
    Family("bert", "BERT, RoBERTa, ELECTRA, MiniLM",
           ("attention.self", "attention.output.dense", "attention.output.LayerNorm", "intermediate",
            "output.dense", "output.LayerNorm"),
           _bert_attention, _bert_mlp, lambda b: b.output.dense.out_features, ("attention_mask",),
           unsupported=("encoder_hidden_states", "cache", "past_key_values")),
    Family("distilbert", "DistilBERT", ("attention.q_lin", "sa_layer_norm", "ffn.lin1", "output_layer_norm"),
           _distilbert_attention, _distilbert_mlp, lambda b: b.sa_layer_norm.normalized_shape[0],
           ("attention_mask",)),
    Family("decoder", "Llama, Qwen2, Mistral",
           ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
           _decoder_attention, _decoder_mlp, lambda b: b.self_attn.o_proj.out_features,
           ("attention_mask", "position_ids", "position_embeddings"),
           unsupported=("cache", "past_key_values", "past_key_value")),
    Family("vit", "ViT", ("layernorm_before", "attention", "layernorm_after", "mlp", "dropout"),
           _vit_attention, _vit_mlp, lambda b: b.layernorm_before.normalized_shape[0], ("attention_mask",)),
)


def family_of(block: nn.Module) -> Family | None:
    for family in FAMILIES:
        if family.matches(block):
            return family
    return None


def supported_text() -> str:
    return "; ".join(f"{f.name} ({f.examples})" for f in FAMILIES)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ``nn.ModuleList`` of blocks of one supported family, with its path."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        families = {family_of(block) for block in module}
        if len(families) == 1 and None not in families and (best is None or len(module) > len(best[1])):
            best = (name, module)
    return best


def bind_call(signature: inspect.Signature, block: nn.Module, hidden: torch.Tensor, args: tuple,
              kwargs: dict[str, Any]) -> dict[str, Any]:
    """The block forward's arguments by name, as the model's loop passed them (``signature``:
    the original forward's, read once when the block is converted, not every step)."""
    bound = signature.bind(block, hidden, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    extra = arguments.pop("kwargs", None) or {}
    arguments.update(extra)
    return arguments
