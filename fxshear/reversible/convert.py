"""``fxshear.reversible(model, ...)``: make a pretrained model's blocks reversible, in place."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..blocks import named_block_list
from ..config import ConfigError
from .adapters import Adapter
from .architectures import family_of, find_blocks, supported_text
from .blocks import VARIANTS, Reversibility, StackState, reversible_forward

log = logging.getLogger("fxshear.reversible")

_CLASSES: dict[type, type] = {}


def _reversible_class(cls: type) -> type:
    """``cls`` with the two-stream forward (one subclass per block class, so isinstance holds)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Reversible{cls.__name__}", (cls,), {"forward": reversible_forward})
    return _CLASSES[cls]


def _block_list(model: nn.Module, blocks: object) -> tuple[str, nn.ModuleList]:
    if isinstance(blocks, (str, nn.ModuleList)):
        return named_block_list(model, blocks)
    found = find_blocks(model)
    if found is None:
        raise ConfigError(
            f"fxshear.reversible found no block list it supports in {type(model).__name__}; supported: "
            f"{supported_text()}. Point blocks= at the model's nn.ModuleList of blocks (its path, e.g. "
            "blocks='encoder.layer', or the ModuleList) if its blocks are of one of these families")
    return found


def _chosen(blocks: object, count: int) -> list[int]:
    """Indices of the blocks to make reversible: all; the lowest ``n``; or a contiguous list."""
    if blocks is None or isinstance(blocks, (str, nn.ModuleList)):
        return list(range(count))
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        if not 1 <= blocks <= count:
            raise ConfigError(f"blocks={blocks}: the model has {count} blocks")
        return list(range(blocks))  # MEFT's num_rev_layers: the lowest ones
    if isinstance(blocks, Sequence) and all(isinstance(i, int) for i in blocks) and blocks:
        chosen = sorted(set(blocks))
        if chosen[0] < 0 or chosen[-1] >= count:
            raise ConfigError(f"blocks={list(blocks)}: indices must be in 0..{count - 1}")
        if chosen != list(range(chosen[0], chosen[-1] + 1)):
            raise ConfigError(f"blocks={list(blocks)}: reversible blocks must be consecutive (one stack)")
        return chosen
    raise ConfigError(f"blocks must be None, a block count, a list of block indices, a module path or an "
                      f"nn.ModuleList, got {blocks!r}")


def _base_model(model: nn.Module, block_list: nn.ModuleList) -> nn.Module | None:
    """The Hugging Face base model holding the blocks (its parameters are the pretrained ones)."""
    for _, module in model.named_modules():
        if getattr(module, "base_model", None) is module and any(m is block_list for m in module.modules()):
            return module
    return None


def reversible(model: nn.Module, variant: str = "meft1", adapter_dim: int = 8, blocks: object = None,
               invert: bool = True, checkpoint_every: int | None = None, train_head: bool = True,
               exact: bool = True) -> nn.Module:
    """Make ``model``'s blocks reversible with MEFT's adapters, in place; returns ``model``.

    ``variant``: ``"meft1"``, ``"meft2"`` or ``"meft3"`` (:data:`fxshear.reversible.VARIANTS`).
    ``adapter_dim``: the adapters' bottleneck (MEFT: 8).  ``blocks``: which blocks (default all;
    an int ``n``: the lowest ``n``, MEFT's ``num_rev_layers``; a list of consecutive indices; or
    the path / ``nn.ModuleList`` of the blocks for a model it cannot find them in).
    ``invert=False`` trains the same architecture with ordinary autograd (everything saved), for
    measuring and tests.  ``checkpoint_every=k`` keeps every k-th block's input exactly, which
    bounds the rebuild error's growth with depth.  ``exact`` (default): the streams are fp64
    fixed-point numbers and each block keeps its scaling's remainder (1 byte per element of a
    stream scaled by 0.1), so every input is rebuilt bit for bit
    (:mod:`fxshear.reversible.coupling`); ``exact=False``: MEFT's plain arithmetic in the
    model's dtype, where each division by 0.1 amplifies the rebuild error about tenfold per
    block.  The base model's weights are frozen; the
    adapters and (``train_head``) the parameters outside the base model train.  The same call on
    a fresh model gives the same parameter names, so a saved ``state_dict`` loads again.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if not isinstance(adapter_dim, int) or isinstance(adapter_dim, bool) or adapter_dim < 1:
        raise ConfigError(f"adapter_dim must be a positive integer, got {adapter_dim!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ConfigError(f"checkpoint_every must be a positive integer or None, got {checkpoint_every!r}")
    path, block_list = _block_list(model, blocks)
    if any(hasattr(block, "_fxshear_reversible") for block in block_list):
        raise ConfigError(f"{path} is already reversible; call fxshear.reversible on a fresh model")
    chosen = _chosen(blocks, len(block_list))
    families = {family_of(block_list[i]) for i in chosen}
    if None in families or len(families) != 1:
        raise ConfigError(f"the blocks at {path} are not all of one supported family ({supported_text()})")
    family = families.pop()
    spec = VARIANTS[variant]
    stack = StackState()
    base = _base_model(model, block_list)
    for param in (base if base is not None else block_list).parameters():
        param.requires_grad_(False)
    if base is None:
        log.warning("fxshear.reversible: no Hugging Face base model around %s; only its blocks are frozen", path)
    if not train_head:
        for param in model.parameters():
            param.requires_grad_(False)
    for position, index in enumerate(chosen):
        block = block_list[index]
        reference = next(block.parameters())
        hidden = family.hidden_size(block)
        block.meft_f = Adapter(hidden, adapter_dim, dtype=reference.dtype, device=reference.device)
        if spec.g != "layer":
            block.meft_g = Adapter(hidden, adapter_dim, dtype=reference.dtype, device=reference.device)
        keep = checkpoint_every is not None and position > 0 and position % checkpoint_every == 0
        block._fxshear_reversible = Reversibility(
            variant=spec, family=family, index=position, first=position == 0, last=position == len(chosen) - 1,
            invert=invert, keep_input=keep, stack=stack, signature=inspect.signature(type(block).forward),
            exact=exact)
        block.__class__ = _reversible_class(type(block))
    dtype = next(block_list[chosen[0]].parameters()).dtype
    if not exact and invert and dtype in (torch.float16, torch.bfloat16):
        warnings.warn(
            f"fxshear.reversible(exact=False) in {dtype}: every division by 0.1 amplifies the rebuild error "
            "about tenfold per block (measured on MiniLM, MEFT1: the input of block 1 rebuilt 26x off in "
            "bfloat16, 12x in float16, 4e-2 in float32); the gradients are not those of the model. "
            "exact=True (the default) rebuilds every input bit for bit in any dtype", stacklevel=2)
    if dtype == torch.float16:
        warnings.warn(
            "fxshear.reversible on a float16 model: the rebuild is exact, but float16 gradients underflow "
            "without loss scaling (measured on MiniLM, MEFT1, batch 4 x 32: 0.15% of the adapters' gradient "
            "elements flush to zero and the gradient is 3.1e-3 relative off float32's; with a loss scale of "
            "1024 none flush, 2.3e-3 off). Scale the loss with torch.amp.GradScaler, or use bfloat16",
            stacklevel=2)
    log.info("fxshear.reversible: %s, blocks %d..%d of %s (%s), adapters of %d, invert=%s",
             variant, chosen[0], chosen[-1], path, family.name, adapter_dim, invert)
    return model


def reversible_stack(model: nn.Module) -> StackState | None:
    """The shared state of ``model``'s reversible stack (rebuild errors in measure mode), if any."""
    for module in model.modules():
        rev = getattr(module, "_fxshear_reversible", None)
        if rev is not None:
            return rev.stack
    return None
