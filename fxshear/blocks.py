"""Where a model's numbered blocks are, when the user names them: ``blocks="encoder.layer"`` or
the ``nn.ModuleList`` itself.

Why one place: ``fxshear.reversible`` and ``fxshear.block_selective`` both take ``blocks=``, and a
user should get the same answer (and the same clear error) from either.  How each finds the
blocks *without* being told differs (reversible looks for a family it can invert, selective for
the longest list of one block class), so only the explicit case lives here.
"""

from __future__ import annotations

from torch import nn

from .config import ConfigError


def named_block_list(model: nn.Module, blocks: str | nn.ModuleList) -> tuple[str, nn.ModuleList]:
    """``(path, block list)`` for ``blocks`` given as a path in ``model`` or as the ModuleList."""
    if isinstance(blocks, nn.ModuleList):
        for name, module in model.named_modules():
            if module is blocks:
                return name, blocks
        raise ConfigError("blocks= is a ModuleList that is not inside the model")
    try:
        module = model.get_submodule(blocks)
    except AttributeError as error:
        raise ConfigError(f"blocks={blocks!r}: {error}") from None
    if not isinstance(module, nn.ModuleList):
        raise ConfigError(f"blocks={blocks!r} is a {type(module).__name__}, not an nn.ModuleList of blocks")
    return blocks, module
