"""Block-selective fine-tuning with token dropping (BSR): ``fxshear.block_selective(model, ...)``."""

from .convert import block_selective, selective_state

__all__ = ["block_selective", "selective_state"]
