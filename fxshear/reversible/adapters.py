"""The bottleneck adapter MEFT inserts: small, and near zero at initialisation.

MEFT's finding (Liao et al., NeurIPS 2023, arXiv 2306.00477) is that a PEFT method works when it
keeps the pretrained model's starting point; its adapters start at N(0, 0.02²) weights and zero
biases, so each adds almost nothing until it has trained.
"""

from __future__ import annotations

import torch
from torch import nn

#: MEFT's initialisation: weights N(0, 0.02²), biases 0.
INIT_STD = 0.02


class Adapter(nn.Module):
    """``up(act(down(x)))``: hidden -> ``bottleneck`` -> hidden.

    The activation is GELU (the adapters' usual choice; the paper does not tie it to the model).
    """

    def __init__(self, hidden: int, bottleneck: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter_dim must be a positive integer, got {bottleneck}")
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        self.act = nn.GELU()
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))
