"""The arms of per-step freezing: one per trainable weight of a block's Linear layers.

Why these and not every parameter: Sheared Backprop freezes the weights of the repeated
transformer blocks (attention projections, MLP), where the weight-gradient matmuls and the
activations they need live; embeddings, norms and heads keep training every step.  A block is a
module path with a numeric component (``encoder.layer.3``, ``model.layers.0``), which is how
Hugging Face, timm and PEFT lay out their stacks.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..config import ConfigError

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")
#: Layers whose ``weight`` is a Linear's, by class name (GPT-2's transposed Conv1D).
_LINEAR_LIKE = ("Conv1D",)


@dataclass(frozen=True)
class Arm:
    """One freezable weight: its module path, the parameter, and its block's path."""

    name: str
    parameter: nn.Parameter
    block: str


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in _LINEAR_LIKE


def find_arms(model: nn.Module, patterns: Sequence[str] | None = None) -> list[Arm]:
    """Trainable Linear weights inside blocks (or, with ``patterns``, in modules matching them).

    Raises :class:`ConfigError` when there is none: freezing would have nothing to choose from.
    """
    arms: list[Arm] = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not _is_linear(module) or not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            continue
        block = _BLOCK.match(path)
        if patterns is not None:
            if not any(fnmatch.fnmatchcase(path, p) for p in patterns):
                continue
        elif block is None:
            continue
        arms.append(Arm(name=f"{path}.weight", parameter=weight, block=block.group(1) if block else path))
    if not arms:
        where = f"modules matching {list(patterns)}" if patterns is not None else "the model's numbered blocks"
        raise ConfigError(f"found no trainable Linear weight in {where}; nothing to freeze "
                          f"(pass freeze=None, or arms= patterns of the modules to freeze)")
    return arms


def block_groups(arms: Sequence[Arm]) -> list[list[int]]:
    """Arm indices per block, blocks in model order (for round-robin freezing)."""
    groups: dict[str, list[int]] = {}
    for i, arm in enumerate(arms):
        groups.setdefault(arm.block, []).append(i)
    return list(groups.values())


def unique_parameters(arms: Sequence[Arm]) -> None:
    """Error if two arms share a parameter (tied weights would be frozen and trained at once)."""
    seen: dict[int, str] = {}
    for arm in arms:
        if id(arm.parameter) in seen:
            raise ConfigError(f"{arm.name} and {seen[id(arm.parameter)]} are the same tensor; "
                              f"a tied weight cannot be one arm frozen and another trained")
        seen[id(arm.parameter)] = arm.name
