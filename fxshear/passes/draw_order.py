"""Thread fxshear's mask draws into one chain, so the compiler keeps every one, in eager's order.

Why: each draw consumes the global generator, so eager-equal masks need every draw to run once
and in program order.  The ``nondeterministic_seeded`` tag stops recomputation, but AOTAutograd's
CSE only spares aten's own random ops: PEFT LoRA's q, k and v adapters each apply a dropout to
the same tensor, and their three identical draw calls were merged into one (one mask for three
adapters, and a generator two draws behind eager from then on).  Nor does anything order two
draws with no data path between them.  Handing each draw the previous draw's bits (``after``,
never read) makes their arguments distinct and their order a data dependency.

This is not a rewrite a user chooses: the backend applies it after the passes, to whatever
draws they made.
"""

from __future__ import annotations

import torch
import torch.fx


def _draw_ops() -> tuple[object, ...]:
    return (torch.ops.fxshear.dropout_draw.default, torch.ops.fxshear.attention_dropout_draw.default)


def order_draws(gm: torch.fx.GraphModule) -> int:
    """Give every draw after the first the previous draw as ``after``; returns how many draws."""
    ops = _draw_ops()
    previous: torch.fx.Node | None = None
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        count += 1
        if previous is not None:
            node.kwargs = {**node.kwargs, "after": previous}
        previous = node
    if count > 1:
        gm.graph.lint()
        gm.recompile()
    return count
