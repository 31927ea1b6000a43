"""Which weights to freeze this step: the Sheared-Backprop bandit and simple policies to compare.

Each policy holds one *arm* per trainable weight tensor (the block Linears'), and every step says
which arms are active (get a gradient) and which are frozen.  The bandit (docs/design.md §6, after
JointSpar / Sheared Backpropagation) samples ``active_i ~ Bernoulli(p_i)`` every ``period`` steps
and holds that mask in between; after the backward of a sampling step it reads the active arms'
gradient norms ``g_i`` and moves probability towards arms whose importance-weighted gradient
``g_i / p_i`` is large:

    L   = max_i g_i                                   (over active arms)
    l_i = (L / p_min)^2 - (g_i / p_i)^2               (active arms; inactive arms: no loss)
    l   = l - min over active arms of l               (shifted to min 0)
    w_i = p_i * exp(-alpha * l_i / p_i)
    p   = the Euclidean projection of w onto {sum p = keep * n, p_min <= p_i <= 1}

with ``keep = 1 - sparsity`` and the published defaults ``period = 20``, ``alpha = 1e-3``,
``p_min = 1e-3``, start ``p_i = keep``.  Every policy is seeded, draws from its own generator
(never the global one, so dropout masks do not depend on the freezing policy) and round-trips
through ``state_dict()`` / ``load_state_dict()``, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError

POLICIES = ("bandit", "random", "round_robin", "fixed")


@dataclass(frozen=True)
class BanditSettings:
    """Validated knobs of the bandit (the published defaults)."""

    sparsity: float = 0.5
    period: int = 20
    alpha: float = 1e-3
    p_min: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1) (the fraction of arms frozen per step; 1 would "
                              f"freeze everything), got {self.sparsity!r}")
        if not isinstance(self.period, int) or self.period < 1:
            raise ConfigError(f"period (T) must be an integer >= 1, got {self.period!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 < self.p_min <= 1.0 - self.sparsity:
            raise ConfigError(f"p_min must be in (0, 1 - sparsity], got {self.p_min!r}")

    @property
    def keep(self) -> float:
        return 1.0 - self.sparsity


def project_capped_simplex(w: torch.Tensor, total: float, low: float, high: float = 1.0,
                           iterations: int = 100) -> torch.Tensor:
    """The Euclidean projection of ``w`` onto ``{p : sum p = total, low <= p_i <= high}``.

    ``p_i = clamp(w_i - tau, low, high)`` for the ``tau`` that meets the sum; the sum is monotone in
    ``tau``, so bisection finds it (to float64 precision after ~100 halvings).
    """
    n = w.numel()
    if not n * low <= total <= n * high:
        raise ValueError(f"no p with sum {total} and every entry in [{low}, {high}] for {n} arms")
    w = w.double()
    lo, hi = float(w.min()) - high, float(w.max()) - low  # sum(clamp(w - tau)) is n*high at lo, n*low at hi
    for _ in range(iterations):
        tau = 0.5 * (lo + hi)
        if float((w - tau).clamp(low, high).sum()) > total:
            lo = tau
        else:
            hi = tau
    return (w - 0.5 * (lo + hi)).clamp(low, high)


class FreezePolicy:
    """Base: ``n`` arms, a per-step mask, optional feedback, and exact resumable state."""

    name = "policy"

    def __init__(self, n: int, seed: int = 0) -> None:
        if n < 1:
            raise ConfigError("a freeze policy needs at least one arm (no trainable weight was found)")
        self.n = n
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.mask = torch.ones(n, dtype=torch.bool)

    def sample(self) -> torch.Tensor:
        """The active mask for the coming step (bool ``[n]``, at least one True)."""
        self.mask = self._next_mask()
        self.step += 1
        return self.mask.clone()

    def _next_mask(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def wants_feedback(self) -> bool:
        """Whether :meth:`update` will use the gradient norms of the step just sampled."""
        return False

    def update(self, gradient_norms: torch.Tensor) -> None:
        """Feedback after the backward of the step just sampled (norms of active arms; others ignored)."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n, "step": self.step, "mask": self.mask.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name or state.get("n") != self.n:
            raise ValueError(f"state of a {state.get('name')!r} policy over {state.get('n')} arms cannot be "
                             f"loaded into a {self.name!r} policy over {self.n}")
        self.step = int(state["step"])
        self.mask = state["mask"].clone()
        self.generator.set_state(state["generator"])


def _at_least_one(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if not mask.any():
        mask = mask.clone()
        mask[int(torch.randint(mask.numel(), (1,), generator=generator))] = True
    return mask


class BanditPolicy(FreezePolicy):
    """The Sheared-Backprop bandit: Bernoulli(p) masks held for ``period`` steps, p learned."""

    name = "bandit"

    def __init__(self, n: int, settings: BanditSettings | None = None, seed: int = 0) -> None:
        super().__init__(n, seed)
        self.settings = settings or BanditSettings()
        self.p = torch.full((n,), self.settings.keep, dtype=torch.float64)
        self.sampled_this_step = False

    def _next_mask(self) -> torch.Tensor:
        self.sampled_this_step = self.step % self.settings.period == 0
        if not self.sampled_this_step:
            return self.mask
        draw = torch.rand(self.n, generator=self.generator, dtype=torch.float64) < self.p
        return _at_least_one(draw, self.generator)

    @property
    def wants_feedback(self) -> bool:
        return self.sampled_this_step

    def update(self, gradient_norms: torch.Tensor) -> None:
        """The gradient-norm update, on sampling steps only (the held steps carry no new draw)."""
        if not self.sampled_this_step:
            return
        s = self.settings
        active = self.mask
        g = gradient_norms.double().reshape(-1)
        if g.numel() != self.n:
            raise ValueError(f"expected {self.n} gradient norms, got {g.numel()}")
        if not torch.isfinite(g[active]).all():
            return  # a non-finite step (e.g. an AMP overflow) teaches nothing
        top = float(g[active].max())
        loss = torch.zeros(self.n, dtype=torch.float64)
        loss[active] = (top / s.p_min) ** 2 - (g[active] / self.p[active]) ** 2
        loss[active] -= loss[active].min()
        w = self.p * torch.exp(-s.alpha * loss / self.p)
        self.p = project_capped_simplex(w, s.keep * self.n, s.p_min, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "p": self.p.clone(), "sampled_this_step": self.sampled_this_step,
                "settings": vars(self.settings).copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.p = state["p"].clone()
        self.sampled_this_step = bool(state["sampled_this_step"])
        self.settings = BanditSettings(**state["settings"])


class RandomPolicy(FreezePolicy):
    """Uniform: each step, ``round(keep * n)`` arms chosen at random (at least one)."""

    name = "random"

    def __init__(self, n: int, sparsity: float = 0.5, seed: int = 0) -> None:
        super().__init__(n, seed)
        BanditSettings(sparsity=sparsity)  # validates
        self.active_count = max(1, round((1.0 - sparsity) * n))

    def _next_mask(self) -> torch.Tensor:
        chosen = torch.randperm(self.n, generator=self.generator)[: self.active_count]
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[chosen] = True
        return mask


class RoundRobinPolicy(FreezePolicy):
    """Blocks in turn: ``groups`` (arm indices per block) active ``ceil(keep * blocks)`` at a time."""

    name = "round_robin"

    def __init__(self, groups: Sequence[Sequence[int]], sparsity: float = 0.5) -> None:
        super().__init__(sum(len(g) for g in groups))
        BanditSettings(sparsity=sparsity)
        self.groups = [list(g) for g in groups]
        self.per_step = max(1, math.ceil((1.0 - sparsity) * len(self.groups)))

    def _next_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.n, dtype=torch.bool)
        start = self.step * self.per_step
        for k in range(self.per_step):
            mask[self.groups[(start + k) % len(self.groups)]] = True
        return mask


class FixedPolicy(FreezePolicy):
    """The same arms active every step (e.g. the last blocks only)."""

    name = "fixed"

    def __init__(self, n: int, active: Sequence[int]) -> None:
        super().__init__(n)
        mask = torch.zeros(n, dtype=torch.bool)
        if not active:
            raise ConfigError("a fixed freeze policy with no active arm freezes everything")
        mask[list(active)] = True
        self.fixed = mask

    def _next_mask(self) -> torch.Tensor:
        return self.fixed
