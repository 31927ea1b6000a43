"""Reversible fine-tuning (MEFT): adapters make a pretrained model reversible, so backward
rebuilds each block's input from its output instead of saving it (docs/design.md §11)."""

from .blocks import VARIANTS, StackState, Variant
from .convert import reversible, reversible_stack

__all__ = ["VARIANTS", "StackState", "Variant", "reversible", "reversible_stack"]
