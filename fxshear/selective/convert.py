"""``fxshear.block_selective(model, ...)``: train a few blocks, drop the tokens the CLS ignores.

BSR (Sarkar et al., arXiv 2405.10951): only ``train_blocks`` (and what follows the blocks: the
final norm, pooler and head) train, so the blocks below the lowest trained one build no autograd
graph and save nothing; at each block in ``drop_at``, after the attention residual and before the
MLP, only the summary tokens (CLS; DeiT's distillation token too) and the
``ceil(keep_rate · (N − summary))`` tokens the CLS attends to most are kept, the dropped ones
fused into one extra token (EViT), so every later block works on fewer tokens, forward and
backward.  Blocks keep their class (a subclass with the dropping forward), as with
``fxshear.reversible``, so the model's own loop runs them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..blocks import named_block_list
from ..config import ConfigError
from .tokens import cls_attention, keep_tokens, kept_count, key_valid, mask_like

log = logging.getLogger("fxshear.selective")


@dataclasses.dataclass
class SelectiveState:
    """Shared by a model's blocks: what was chosen, and the mask that follows the kept tokens
    within one forward (set by the first drop site, read by every later block)."""

    train_blocks: tuple[int, ...]
    drop_at: tuple[int, ...]
    keep_rate: float
    fuse: bool
    summary: int
    path: str
    #: set by the first drop site and cleared by the last block, so a forward starts with None
    #: (nothing a forward records may differ between calls: Dynamo would guard on it and recompile)
    mask: torch.Tensor | None = None

    def token_counts(self, tokens: int) -> list[tuple[int, int, int]]:
        """``(block, tokens in, tokens out)`` per drop site for an input of ``tokens`` tokens
        (summary tokens included): static, as the compiled graph's shapes are."""
        counts = []
        for index in self.drop_at:
            keep = max(1, kept_count(self.keep_rate, tokens, self.summary))
            out = tokens if keep >= tokens - self.summary else self.summary + keep + int(self.fuse)
            counts.append((index, tokens, out))
            tokens = out
        return counts


@dataclasses.dataclass(frozen=True)
class Site:
    index: int
    drops: bool
    first_drop: bool
    last: bool
    state: SelectiveState
    family: Family


# --- families: how to reach a block's attention projections and run its halves ---------------

def _vit_qk(block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    attn = block.attention
    for owner in (attn, getattr(attn, "attention", None)):
        if owner is None:
            continue
        for q, k in (("q_proj", "k_proj"), ("query", "key")):
            if hasattr(owner, q) and hasattr(owner, k):
                heads = getattr(owner, "num_attention_heads", None) or owner.config.num_attention_heads
                return getattr(owner, q), getattr(owner, k), heads
    raise ConfigError(f"{type(block).__name__}: no query/key projections found in its attention")


def _vit_forward(block: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any],
                 site: Site) -> torch.Tensor:
    """transformers 5 (``mlp`` and ``dropout``) and 4 (``intermediate`` and ``output``, whose
    ``output`` adds the residual) ViT/DeiT layers."""
    normed = block.layernorm_before(h)
    a = block.attention(normed, mask, **kwargs)[0]
    h = (block.dropout(a) if hasattr(block, "dropout") else a) + h
    if site.drops:
        q, k, heads = _vit_qk(block)
        h, _ = _drop(h, cls_attention(q, k, normed, heads, None, site.state.summary), None, site)
    if hasattr(block, "mlp"):
        return block.dropout(block.mlp(block.layernorm_after(h))) + h
    return block.output(block.intermediate(block.layernorm_after(h)), h)


def _bert_forward(block: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any],
                  site: Site) -> torch.Tensor:
    a = block.attention(h, mask, **kwargs)[0]
    if site.drops:
        attn = block.attention.self
        valid = key_valid(mask, h.shape[1])
        a, valid = _drop(a, cls_attention(attn.query, attn.key, h, attn.num_attention_heads, valid,
                                          site.state.summary), valid, site)
        site.state.mask = mask_like(mask, valid)
    return block.output(block.intermediate(a), a)


def _drop(h: torch.Tensor, attn: torch.Tensor, valid: torch.Tensor | None,
          site: Site) -> tuple[torch.Tensor, torch.Tensor | None]:
    state = site.state
    tokens = h.shape[1]
    keep = kept_count(state.keep_rate, tokens, state.summary)
    if keep < 1:
        raise ConfigError(f"drop_at={list(state.drop_at)}: block {site.index} receives {tokens} tokens, "
                          f"{state.summary} of them summary tokens, so keep_rate={state.keep_rate} would keep "
                          f"{keep} of the others (at least 1 is needed to rank); drop later or on longer inputs")
    if keep >= tokens - state.summary:
        return h, valid  # nothing to drop at this length
    return keep_tokens(h, attn, keep, state.fuse, state.summary, valid)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    examples: str
    required: tuple[str, ...]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor | None, dict[str, Any], Site], torch.Tensor]
    has_mask: bool

    def matches(self, block: nn.Module) -> bool:
        try:
            for path in self.required:
                block.get_submodule(path)
        except AttributeError:
            return False
        return True


FAMILIES = (
    Family("vit", "ViT, DeiT", ("layernorm_before", "attention", "layernorm_after"),
           _vit_forward, has_mask=False),
    Family("bert", "BERT, RoBERTa, ELECTRA, MiniLM",
           ("attention.self.query", "attention.self.key", "intermediate", "output"), _bert_forward, has_mask=True),
)


def _family_of(block: nn.Module) -> Family | None:
    return next((f for f in FAMILIES if f.matches(block)), None)


# --- the converted block's forward -------------------------------------------------------------

def selective_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      *args: Any, **kwargs: Any) -> torch.Tensor:
    """A drop site, or a block after one whose mask must follow the kept tokens."""
    site: Site = self._fxshear_selective
    if any(a is not None for a in args) or any(kwargs.get(k) is not None for k in UNSUPPORTED):
        raise TypeError(f"{type(self).__name__} under fxshear.block_selective: cross-attention and caches are "
                        "not supported (token dropping changes the sequence they index)")
    for key in UNSUPPORTED:
        kwargs.pop(key, None)
    if not site.first_drop and site.state.mask is not None:
        attention_mask = site.state.mask
    out = site.family.forward(self, hidden_states, attention_mask, kwargs, site)
    if site.last:
        site.state.mask = None
    return out


UNSUPPORTED = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "past_key_value")
_CLASSES: dict[type, type] = {}


def _selective_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Selective{cls.__name__}", (cls,), {"forward": selective_forward})
    return _CLASSES[cls]


# --- conversion --------------------------------------------------------------------------------

def _find_blocks(model: nn.Module, blocks: object) -> tuple[str, nn.ModuleList]:
    if isinstance(blocks, (str, nn.ModuleList)):
        return named_block_list(model, blocks)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(b) for b in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ConfigError(f"fxshear.block_selective found no numbered blocks (an nn.ModuleList of one block "
                          f"class) in {type(model).__name__}; point blocks= at it (e.g. blocks='encoder.layer')")
    return best


def _indices(name: str, values: Sequence[int] | None, count: int) -> tuple[int, ...]:
    if values is None:
        return tuple(range(count))
    if isinstance(values, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
        raise ConfigError(f"{name} must be a list of block indices, got {values!r}")
    chosen = tuple(sorted(set(values)))
    if chosen and (chosen[0] < 0 or chosen[-1] >= count):
        raise ConfigError(f"{name}={list(values)}: indices must be in 0..{count - 1} (the model has {count} blocks)")
    return chosen


def _summary_tokens(model: nn.Module) -> int:
    """CLS, and DeiT's distillation token."""
    return 2 if any(hasattr(m, "distillation_token") for m in model.modules()) else 1


def _is_causal(model: nn.Module, block: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) or "CausalLM" in type(model).__name__ or hasattr(block, "self_attn")


def block_selective(model: nn.Module, train_blocks: Sequence[int] | None = None, drop_at: Sequence[int] = (),
                    keep_rate: float = 0.5, fuse_dropped: bool = True, blocks: str | nn.ModuleList | None = None,
                    train_head: bool = True, train_embeddings: bool | None = None) -> nn.Module:
    """Make ``model`` block-selective (and token-dropping), in place; returns ``model``.

    ``train_blocks``: the indices of the blocks that train (default all; BSR's ViT-B runs:
    ``[3, 7, 11]``).  Parameters outside the blocks that do not embed (the final norm, pooler and
    head) train unless ``train_head=False``; the embeddings (names with ``embed``, CLS and
    distillation tokens) train only when ``train_embeddings`` says so, by default when block 0
    trains (so training every block is full fine-tuning).  ``drop_at``: blocks after whose attention
    tokens are dropped (BSR: ``[3, 6, 9]``), keeping ``ceil(keep_rate · (N − summary))``;
    ``fuse_dropped``: the dropped tokens become one token, their CLS-attention-weighted sum.
    Token dropping needs a summary token: HF ViT and DeiT, and the BERT family (with an attention
    mask, padding ranks below every real token and the mask follows the kept tokens).
    """
    if not isinstance(keep_rate, (int, float)) or isinstance(keep_rate, bool) or not 0.0 < keep_rate <= 1.0:
        raise ConfigError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
    path, block_list = _find_blocks(model, blocks)
    if hasattr(model, "_fxshear_selective_state"):
        raise ConfigError(f"{path} is already block-selective; call fxshear.block_selective on a fresh model")
    if any(hasattr(b, "_fxshear_reversible") for b in block_list):
        raise ConfigError(f"{path} is reversible (fxshear.reversible); block selection on reversible blocks is "
                          "not supported")
    count = len(block_list)
    trained = _indices("train_blocks", train_blocks, count)
    drops = _indices("drop_at", list(drop_at), count)
    if not trained:
        raise ConfigError("train_blocks is empty: at least one block must train")
    family = _family_of(block_list[0])
    if drops and family is None:
        if _is_causal(model, block_list[0]):
            raise ConfigError(
                "token dropping ranks tokens by the attention a summary token (CLS) pays them, and a causal LM "
                "has none (every position predicts its own next token, so none may be dropped); use block "
                "selection alone: fxshear.block_selective(model, train_blocks=[...]) with no drop_at")
        raise ConfigError(f"token dropping supports {'; '.join(f'{f.name} ({f.examples})' for f in FAMILIES)}; "
                          f"{type(block_list[0]).__name__} is none of them (block selection alone works: no drop_at)")

    if train_embeddings is None:
        train_embeddings = trained[0] == 0
    for name, param in model.named_parameters():
        inside = name.startswith(path + ".")
        embeds = "embed" in name or "cls_token" in name or "distillation_token" in name
        param.requires_grad_(not inside and (train_embeddings if embeds else train_head))
    for i in trained:
        for param in block_list[i].parameters():
            param.requires_grad_(True)

    state = SelectiveState(trained, drops, float(keep_rate), bool(fuse_dropped), _summary_tokens(model), path)
    if drops:
        first = drops[0]
        # blocks after the first drop site take the mask that follows the kept tokens
        converted = range(first, count) if family.has_mask else drops
        for i in converted:
            block = block_list[i]
            block._fxshear_selective = Site(i, i in drops, i == first, i == converted[-1], state, family)
            block.__class__ = _selective_class(type(block))
    model._fxshear_selective_state = state
    log.info("fxshear.block_selective: %s, training blocks %s, dropping tokens at %s (keep %.2f, fuse %s)",
             path, list(trained), list(drops), keep_rate, fuse_dropped)
    return model


def selective_state(model: nn.Module) -> SelectiveState | None:
    """The shared state of ``model``'s block-selective stack (which sites dropped how many tokens)."""
    return getattr(model, "_fxshear_selective_state", None)
