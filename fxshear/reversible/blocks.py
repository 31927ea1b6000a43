"""A pretrained block as a reversible two-stream block (MEFT, arXiv 2306.00477).

The hidden state enters the reversible stack as two streams ``(x1, x2) = (h, h)``; each block
computes ``y1 = λ·x1 + F(x2)``, ``y2 = β·x2 + G(y1)`` (streams swapped on the way out for MEFT1 and
MEFT2) and the last one returns ``(y1 + y2) / 2``.  Between blocks the two streams travel as one
tensor, concatenated on the last dimension, so the model's own loop over its blocks is untouched.

Backward needs no block input: ``x2 = (y2 − G(y1)) / β`` and ``x1 = (y1 − F(x2)) / λ``.  In eager
mode :class:`InvertedBlock` does that (the autograd graph keeps only the last block's output; each
block's backward rebuilds its input from its output, which the block after it rebuilt, and re-runs
F and G under the random state they first ran with, so dropout draws the same masks).  Under
``torch.compile`` the blocks run as plain ops and fxshear's backend rebuilds the inputs inside the
compiled backward (docs/design.md §11).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .architectures import Family, bind_call
from ..kernels.reversible_mark import F_OUT, G_OUT, IN1, IN2, OUT1, OUT2, Y1, Y2, mark
from .coupling import STREAM_LIMIT, Coupling, on_grid


@dataclasses.dataclass(frozen=True)
class Variant:
    """What F and G are, and the factors that keep the pretrained starting point."""

    name: str
    lam: float
    beta: float
    swap: bool
    f: str  # "layer" (whole block, adapter beside its FFN), "adapter", "attention" (+ adapter)
    g: str  # "adapter", "layer" (the pretrained block), "mlp" (+ adapter)
    description: str


VARIANTS: dict[str, Variant] = {
    "meft1": Variant("meft1", 0.1, 1.0, True, "layer", "adapter",
                     "F = the block with an adapter beside its FFN, G = an adapter; λ = 0.1, β = 1, swapped"),
    "meft2": Variant("meft2", 1.0, 0.1, True, "adapter", "layer",
                     "F = an adapter, G = the pretrained block; λ = 1, β = 0.1, swapped"),
    "meft3": Variant("meft3", 0.1, 0.1, False, "attention", "mlp",
                     "F = attention sub-block + adapter, G = MLP sub-block + adapter; λ = β = 0.1"),
}


class StackState:
    """What the blocks of one reversible stack share during a backward: each block's rebuilt
    input, handed to the block before it, and (``measure``) the rebuild's error per block."""

    def __init__(self) -> None:
        self.rebuilt: dict[int, torch.Tensor] = {}
        self.measure = False
        #: exact mode: a stream reached STREAM_LIMIT in this forward (a device flag, read once per
        #: backward, at the first block, so it costs one sync a step)
        self.overflow: torch.Tensor | None = None
        #: block index -> max |rebuilt - exact| / max |exact| of its input (measure mode)
        self.errors: dict[int, float] = {}


@dataclasses.dataclass
@dataclasses.dataclass
class Reversibility:
    """Set on each reversible block (``block._fxshear_reversible``)."""

    variant: Variant
    family: Family
    index: int  # position within the reversible stack
    first: bool
    last: bool
    invert: bool
    keep_input: bool  # checkpoint_every: this block's input is kept exactly
    stack: StackState
    #: the block class's own forward's signature, to bind the arguments the model's loop passes
    signature: inspect.Signature
    exact: bool = True  # fixed-point streams and remainders (fxshear/reversible/coupling.py)

    @property
    def mark_info(self) -> list[float]:
        """What every mark carries for the compiled rebuild: [λ, β, swap, keep_input]."""
        v = self.variant
        return [v.lam, v.beta, float(v.swap), float(self.keep_input)]

    @property
    def coupling(self) -> Coupling:
        return Coupling(self.variant.lam, self.variant.beta, self.exact)

    def dtypes(self, block: nn.Module) -> tuple[torch.dtype, torch.dtype]:
        """(compute dtype, stream dtype): F and G run in the block's own dtype; exact streams
        are fp64 fixed-point numbers."""
        compute = next(block.parameters()).dtype
        return compute, torch.float64 if self.exact else compute

    def f(self, block: nn.Module, x2: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        compute, stream = self.dtypes(block)
        return self.coupling.output(self._f(block, x2.to(compute), call), stream)

    def g(self, block: nn.Module, y1: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        compute, stream = self.dtypes(block)
        return self.coupling.output(self._g(block, y1.to(compute), call), stream)

    def _f(self, block: nn.Module, x2: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        kind, fam = self.variant.f, self.family
        if kind == "layer":
            return fam.mlp_part(block, fam.attention_part(block, x2, call, None), block.meft_f, True)
        if kind == "adapter":
            return block.meft_f(x2)
        return fam.attention_part(block, x2, call, block.meft_f)

    def _g(self, block: nn.Module, y1: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        kind, fam = self.variant.g, self.family
        if kind == "adapter":
            return block.meft_g(y1)
        if kind == "layer":
            return fam.mlp_part(block, fam.attention_part(block, y1, call, None), None, False)
        return fam.mlp_part(block, y1, block.meft_g, False)

    def split(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two input streams: ``(h, h)`` at the first block, on the grid when exact."""
        if self.first:
            _, stream = self.dtypes(block)
            h = on_grid(x) if self.exact else x.to(stream)
            return h, h
        x1, x2 = x.chunk(2, dim=-1)
        return x1, x2

    def join(self, block: nn.Module, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """One tensor for the next block, or, after the last, ``(y1 + y2) / 2`` in the model's dtype."""
        if self.last:
            return ((y1 + y2) / 2).to(self.dtypes(block)[0])
        return torch.cat([y1, y2], dim=-1)

    def _sum(self, block: nn.Module, scaled: torch.Tensor, factor: float, fn: Callable[..., torch.Tensor],
             fn_input: torch.Tensor, call: dict[str, Any], rng: list | None,
             marks: tuple[int, int, list[float]] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``factor · scaled + fn(fn_input)`` and the scaling's remainder; the random state
        before ``fn`` goes to ``rng``; ``marks`` = (role of fn's output, role of the sum, info)."""
        if rng is not None:
            rng.append(_RandomState(fn_input.device))
        s, remainder = self.coupling.scale(scaled, factor)
        out = fn(block, fn_input, call)
        if marks is None:
            return s + out, remainder
        out_role, sum_role, info = marks
        return mark(s + mark(out, self.index, out_role, info), self.index, sum_role, info, remainder), remainder

    def forward_sums(self, block: nn.Module, x1: torch.Tensor, x2: torch.Tensor, call: dict[str, Any],
                     rng: list | None = None, marked: bool = False) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(y1, y2, what the inverse needs besides them); ``rng`` collects the random states
        before F and before G, for the rebuild to replay; ``marked`` names the block's tensors
        for the compiled rebuild (:mod:`fxshear.kernels.reversible_mark`)."""
        v, i = self.variant, self.index
        info = self.mark_info
        if marked:
            x1, x2 = mark(x1, i, IN1, info), mark(x2, i, IN2, info)
        y1, r1 = self._sum(block, x1, v.lam, self.f, x2, call, rng, (F_OUT, Y1, info) if marked else None)
        y2, r2 = self._sum(block, x2, v.beta, self.g, y1, call, rng, (G_OUT, Y2, info) if marked else None)
        return y1, y2, [r1, r2]


def two_stream_forward(rev: Reversibility, block: nn.Module, x: torch.Tensor, call: dict[str, Any],
                       marked: bool = False) -> torch.Tensor:
    """The block with ordinary autograd (``invert=False``, inference, and under torch.compile,
    where ``marked`` lets fxshear's backend rebuild the inputs in the compiled backward)."""
    x1, x2 = rev.split(block, x)
    y1, y2, _ = rev.forward_sums(block, x1, x2, call, marked=marked)
    if rev.variant.swap:
        y1, y2 = y2, y1
    if marked:
        y1, y2 = mark(y1, rev.index, OUT1, rev.mark_info), mark(y2, rev.index, OUT2, rev.mark_info)
    return rev.join(block, y1, y2)


class _RandomState:
    """The CPU and CUDA generators' states at one point, to replay the dropout draws after it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)




class InvertedBlock(torch.autograd.Function):
    """One reversible block whose backward rebuilds its input instead of reading a saved one.

    Saved: the remainders of the scaling (int8, exact mode), the random states F and G ran
    under, and for the last block its two output streams; never the block's input (unless
    ``keep_input`` or the stack measures its rebuild error).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: nn.Module, rev: Reversibility, call: dict[str, Any],
                *params: torch.Tensor) -> torch.Tensor:
        ctx.block, ctx.rev, ctx.call, ctx.param_inputs = block, rev, call, params
        ctx.input_dtype = x.dtype
        x1, x2 = rev.split(block, x)
        ctx.rng = []
        y1, y2, remainders = rev.forward_sums(block, x1, x2, call, ctx.rng)
        out1, out2 = (y2, y1) if rev.variant.swap else (y1, y2)
        if rev.exact:
            big = torch.maximum(y1.abs().amax(), y2.abs().amax()) >= STREAM_LIMIT
            rev.stack.overflow = big if rev.first or rev.stack.overflow is None else rev.stack.overflow | big
        ctx.has_remainder = [r is not None for r in remainders]
        kept = [r for r in remainders if r is not None]
        if rev.last:
            kept += [out1, out2]
        if (rev.keep_input or rev.stack.measure) and not rev.first:
            kept.append(x)
        ctx.save_for_backward(*kept)
        return rev.join(block, out1, out2)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        block, rev, call = ctx.block, ctx.rev, ctx.call
        v, coupling = rev.variant, rev.coupling
        if rev.last and rev.stack.overflow is not None and bool(rev.stack.overflow):
            rev.stack.overflow = None
            raise RuntimeError(
                f"fxshear.reversible: a stream reached {STREAM_LIMIT:.0f} in magnitude, beyond the exact "
                "fixed-point range, so the rebuilt inputs would not be the forward's; use exact=False "
                "(MEFT's plain arithmetic, inexact) or keep the hidden states smaller")
        saved = list(ctx.saved_tensors)
        r1, r2 = (saved.pop(0) if has else None for has in ctx.has_remainder)
        if rev.last:
            out1, out2 = saved.pop(0), saved.pop(0)
            g_out1 = g_out2 = grad_out.to(out1.dtype) / 2
        else:
            out1, out2 = rev.stack.rebuilt.pop(rev.index).chunk(2, dim=-1)
            g_out1, g_out2 = grad_out.chunk(2, dim=-1)
        y1, y2, gy1, gy2 = (out2, out1, g_out2, g_out1) if v.swap else (out1, out2, g_out1, g_out2)
        params = [p for p in block.parameters() if p.requires_grad]
        devices = [y1.device] if y1.device.type == "cuda" else []
        rng_f, rng_g = ctx.rng
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):
            y1 = y1.detach().requires_grad_()
            rng_g.restore()
            g = rev.g(block, y1, call)
            x2 = coupling.unscale(y2.detach() - g.detach(), r2, v.beta).requires_grad_()
            rng_f.restore()
            f = rev.f(block, x2, call)
        x1 = coupling.unscale(y1.detach() - f.detach(), r1, v.lam)
        through_g = torch.autograd.grad(g, [y1, *params], gy2, allow_unused=True)
        gy1_total = gy1 + through_g[0]
        through_f = torch.autograd.grad(f, [x2, *params], gy1_total, allow_unused=True)
        gx2 = v.beta * gy2 + through_f[0]
        gx1 = v.lam * gy1_total
        if not rev.first:
            rebuilt = torch.cat([x1, x2.detach()], dim=-1)
            if saved:
                exact = saved.pop(0)
                if rev.stack.measure:
                    scale = exact.abs().max().clamp_min(1e-30)
                    rev.stack.errors[rev.index] = float((rebuilt - exact).abs().max() / scale)
                if rev.keep_input:
                    rebuilt = exact
            rev.stack.rebuilt[rev.index - 1] = rebuilt
        grad_x = (gx1 + gx2).to(ctx.input_dtype) if rev.first else torch.cat([gx1, gx2], dim=-1)
        by_param = {id(p): _add(a, b) for p, a, b in zip(params, through_g[1:], through_f[1:])}
        return (grad_x, None, None, None, *[by_param.get(id(p)) for p in ctx.param_inputs])


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def reversible_forward(block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of every reversible block (set on its class by :func:`fxshear.reversible`)."""
    rev: Reversibility = block._fxshear_reversible
    call = bind_call(rev.signature, block, hidden_states, args, kwargs)
    for name in rev.family.unsupported:
        if call.get(name) is not None:
            raise NotImplementedError(f"a reversible {rev.family.name} block cannot take {name!r} "
                                      "(no cross-attention or KV cache while training reversibly)")
    if rev.invert and torch.is_grad_enabled():
        if torch.compiler.is_compiling():
            return two_stream_forward(rev, block, hidden_states, call, marked=True)
        params = [p for p in block.parameters() if p.requires_grad]
        return InvertedBlock.apply(hidden_states, block, rev, call, *params)
    return two_stream_forward(rev, block, hidden_states, call)
