"""``@fxshear.train_step``: a user's whole training step, with per-step freezing and metrics.

    @fxshear.train_step(model, optimizer, freeze="bandit", sparsity=0.5)
    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    for batch in loader:
        step(batch)
    print(step.metrics[-1])          # step time, saved bytes, active fraction, ...

Why a decorator and not a compiled function: ``torch.compile`` breaks a graph at ``backward()``
and at ``optimizer.step()`` anyway (docs/design.md §2); the work that matters is in the model's forward
and backward.  So the decorator compiles the *model* in place with the fxshear backend, and
around the user's function it samples the freeze mask, makes the compiled regions honour it
(:mod:`fxshear.freezing.state`, no recompiles), reads the active weights' gradient norms as
backward produces them (post-accumulate-grad hooks) and feeds them to the policy.
"""

from __future__ import annotations

import fnmatch
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .backend import ShearBackend
from .config import ConfigError, ShearConfig
from .log import log
from .freezing.policies import BanditPolicy, BanditSettings, FixedPolicy, FreezePolicy, RandomPolicy, RoundRobinPolicy
from .freezing.arms import Arm, block_groups, find_arms, unique_parameters
from .freezing.fsdp import fsdp_params_by_sharded, gathered_twins
from .freezing.ranks import DEFAULT_TIMEOUT_S, check_same_mask, distributed, global_norms
from .freezing.state import set_frozen

FREEZE_CHOICES = (None, "bandit", "random", "round_robin", "fixed")


@dataclass(frozen=True)
class StepMetrics:
    """What one decorated call did."""

    step: int
    seconds: float
    loss: float | None
    active_fraction: float
    frozen_arms: int
    saved_activation_bytes: int
    compiles: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainStep:
    """The decorated step; call it like the function it wraps.

    One call is one optimizer step: the mask is drawn before it, and a frozen weight's ``.grad``
    is cleared at its start (gradient accumulation across calls would lose a frozen weight's
    earlier micro-batches; accumulate inside one call instead).
    """

    def __init__(self, fn: Callable[..., Any], model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 policy: FreezePolicy | None, arms: Sequence[Arm], backend: ShearBackend | None,
                 stale_after: int, on_metrics: Callable[[StepMetrics], None] | None,
                 collective_timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.fn = fn
        self.model = model
        self.optimizer = optimizer
        self.policy = policy
        self.arms = list(arms)
        self.backend = backend
        self.stale_after = stale_after
        self.on_metrics = on_metrics
        self.metrics: list[StepMetrics] = []
        self.step = 0
        #: Per arm: the last step (1-based) it received a gradient; 0 if never.
        self.last_gradient_step = [0] * len(self.arms)
        self._warned: set[int] = set()
        self._norms: dict[int, torch.Tensor | None] = {}
        self._frozen_now: frozenset[int] = frozenset()
        self._leaked: set[int] = set()
        self._leaked_now: set[int] = set()
        self._expected_leaks: set[int] = set()
        self.collective_timeout = collective_timeout
        self._hooks = [arm.parameter.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, arm in enumerate(self.arms)] if policy is not None else []
        # Under torch.distributed the norms are read at optimizer.step(), after DDP's all-reduce
        # (FSDP2's reduce-scatter), and combined across ranks (fxshear/freezing/ranks.py).
        self._read_at_step = False
        self._fsdp_params = fsdp_params_by_sharded(model) if policy is not None and backend is not None else {}
        if policy is not None and optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._read_norms_at_step))
        functools.update_wrapper(self, fn)

    # -- the step ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._read_at_step = self.policy is not None and distributed()
        if self._read_at_step and self.optimizer is None:
            raise ConfigError(
                "fxshear.train_step under torch.distributed needs the optimizer: train_step(model, optimizer, ...). "
                "The freezing policy learns from gradient norms that must be the same on every rank, and they are "
                "only final (all-reduced by DDP, reduce-scattered by FSDP2) when optimizer.step() is called")
        mask = self._sample() if self.policy is not None else None
        frozen_indices = [i for i, on in enumerate(mask.tolist()) if not on] if mask is not None else []
        frozen = [self.arms[i].parameter for i in frozen_indices]
        self._frozen_now = frozenset(frozen_indices)
        self._norms = {}
        for p in frozen:
            p.grad = None  # a zero tensor left by zero_grad(set_to_none=False) would still be stepped
        self.step += 1
        start = time.perf_counter()
        toggled = self._freeze_eagerly(frozen) if self.backend is None else []
        if self._fsdp_params:
            twins = gathered_twins(frozen, self._fsdp_params)
            # before FSDP2's first all-gather there is no gathered copy to freeze: the hook drops
            # those gradients, as expected, not because of a graph break
            self._expected_leaks = {i for i in frozen_indices if id(self.arms[i].parameter) in self._fsdp_params} \
                if len(twins) < len(frozen) else set()
            set_frozen([*frozen, *twins])
        else:
            set_frozen(frozen)
        try:
            result = self.fn(*args, **kwargs)
        finally:
            set_frozen(())
            self._frozen_now = frozenset()
            for p in toggled:
                p.requires_grad_(True)
        seconds = time.perf_counter() - start
        self._report_leaks()
        if self.policy is not None:
            self._learn()
        metrics = StepMetrics(
            step=self.step, seconds=seconds, loss=_as_float(result),
            active_fraction=float(mask.double().mean()) if mask is not None else 1.0,
            frozen_arms=len(frozen), saved_activation_bytes=self.saved_activation_bytes(),
            compiles=self.compiles)
        self.metrics.append(metrics)
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        return result

    def _sample(self) -> torch.Tensor:
        """The policy's mask.  Under torch.distributed every rank's policy is seeded alike and
        learns from the same all-reduced norms, so the ranks draw the same mask; one all-reduce
        checks it (a policy with rank-local randomness is an error on every rank at once)."""
        mask = self.policy.sample()
        if self._read_at_step:
            check_same_mask(mask, self.policy.name, self.step + 1, self.collective_timeout)
        return mask

    def _read_norms_at_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: the active arms' gradient norms, identical on every rank."""
        if not self._read_at_step:
            return
        active = [i for i in range(len(self.arms)) if i not in self._frozen_now]
        if not self.policy.wants_feedback:  # only which arms got a gradient (FSDP2's shards get no hook call)
            self._norms = {i: None for i in active if self.arms[i].parameter.grad is not None}
            return
        norms = global_norms([self.arms[i].parameter.grad for i in active], self.collective_timeout)
        self._norms = {i: norms[k] for k, i in enumerate(active) if not torch.isnan(norms[k])}

    def _freeze_eagerly(self, frozen: Sequence[nn.Parameter]) -> list[nn.Parameter]:
        """Without a compiled model, freezing is autograd's own ``requires_grad``."""
        toggled = [p for p in frozen if p.requires_grad]
        for p in toggled:
            p.requires_grad_(False)
        return toggled

    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(parameter: torch.Tensor) -> None:
            if index in self._frozen_now:
                # Ran outside a freezing region (an eager graph break): drop the gradient.
                parameter.grad = None
                self._leaked_now.add(index)
                return
            if parameter.grad is not None and not self._read_at_step:  # distributed: read at step()
                # A norm only when the policy learns from this step; kept as a tensor (no device sync).
                self._norms[index] = (parameter.grad.detach().norm() if self.policy.wants_feedback
                                      else None)
        return hook

    def _report_leaks(self) -> None:
        """One warning for all the frozen weights whose gradient ran eagerly this step and were not
        reported before (not one per weight per step)."""
        new = sorted(self._leaked_now - self._leaked - self._expected_leaks)
        self._leaked_now.clear()
        self._expected_leaks = set()
        if not new:
            return
        self._leaked.update(new)
        names = ", ".join(self.arms[i].name for i in new[:3]) + (", ..." if len(new) > 3 else "")
        log.warning("fxshear: %d frozen weights (%s) ran outside a compiled region at step %d; their gradients "
                    "were computed and then dropped (%d such weights so far; a graph break puts them in eager "
                    "code: TORCH_LOGS=graph_breaks shows where)", len(new), names, self.step, len(self._leaked))

    def _learn(self) -> None:
        for i in self._norms:
            self.last_gradient_step[i] = self.step
        if self.policy.wants_feedback:
            norms = torch.zeros(len(self.arms), dtype=torch.float64)
            measured = {i: v for i, v in self._norms.items() if v is not None}
            if measured:
                values = torch.stack([v.float() for v in measured.values()]).double().cpu()
                norms[list(measured)] = values
            self.policy.update(norms)
        self._warn_stale()

    def _warn_stale(self) -> None:
        for i, last in enumerate(self.last_gradient_step):
            if self.step - last >= self.stale_after and i not in self._warned:
                self._warned.add(i)
                message = (f"fxshear: {self.arms[i].name} has received no gradient for {self.step - last} steps "
                           f"(policy {self.policy.name!r}); it is not training")
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                log.warning("%s", message)

    # -- what the user reads ----------------------------------------------------------------
    @property
    def compiles(self) -> int:
        """Graphs compiled so far for this model: Dynamo's calls of the backend plus mask variants."""
        if self.backend is None:
            return 0
        return len(self.backend.regions) + sum(d.stats.compiles for d in self.backend.dispatchers)

    def saved_activation_bytes(self) -> int:
        """Activation bytes the graphs that ran last saved for backward (their ledgers)."""
        return sum(ledger.activation_bytes for ledger in self.ledgers())

    def ledgers(self, per_mask: bool = False) -> list[Any]:
        """The saved-tensor ledgers of the graphs that ran last (one per trainable region).

        ``per_mask=True``: for the current mask, what a per-mask variant would save (traced and
        partitioned now, not compiled), i.e. the saved set with the frozen weights' gradients
        and everything only they needed gone.
        """
        if self.backend is None:
            return []
        dispatched = {id(d.region): d for d in self.backend.dispatchers}
        frozen = ({id(arm.parameter) for arm, on in zip(self.arms, self.policy.mask.tolist()) if not on}
                  if self.policy is not None else set())
        out = []
        for region in self.backend.regions:
            if not region.has_backward:
                continue
            dispatcher = dispatched.get(id(region))
            if dispatcher is None:
                out.append(region.ledger)
            elif per_mask:
                out.append(dispatcher.analysis_ledger(dispatcher.mask_of(frozen)))
            else:
                out.append(dispatcher.last.ledger)
        return out

    def stale_arms(self) -> list[str]:
        """Arms that have gone ``stale_after`` steps or more without a gradient."""
        return [arm.name for arm, last in zip(self.arms, self.last_gradient_step)
                if self.step - last >= self.stale_after]

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (the policy's RNG included)."""
        return {"step": self.step, "last_gradient_step": list(self.last_gradient_step),
                "policy": self.policy.state_dict() if self.policy is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state.get("policy") is None) != (self.policy is None):
            raise ValueError("the saved train_step and this one differ in whether they freeze")
        if len(state["last_gradient_step"]) != len(self.arms):
            raise ValueError(f"saved state has {len(state['last_gradient_step'])} arms, this model {len(self.arms)}")
        self.step = int(state["step"])
        self.last_gradient_step = list(state["last_gradient_step"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])

    def close(self) -> None:
        """Remove the gradient hooks (the step can no longer learn)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _as_float(result: Any) -> float | None:
    value = result
    if isinstance(result, Mapping):
        value = result.get("loss")
    elif isinstance(result, (tuple, list)) and result:
        value = result[0]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def make_policy(freeze: str | FreezePolicy | None, arms: Sequence[Arm], *, sparsity: float, period: int,
                alpha: float, p_min: float, active: Sequence[str] | None, seed: int) -> FreezePolicy | None:
    """The policy ``freeze`` names, over ``arms``; a clear error for anything that cannot train."""
    if freeze is None or isinstance(freeze, FreezePolicy):
        if isinstance(freeze, FreezePolicy) and freeze.n != len(arms):
            raise ConfigError(f"the policy has {freeze.n} arms but the model has {len(arms)} freezable weights")
        return freeze
    if freeze not in FREEZE_CHOICES:
        raise ConfigError(f"freeze must be one of {FREEZE_CHOICES!r} or a FreezePolicy, got {freeze!r}")
    if freeze == "bandit":
        return BanditPolicy(len(arms), BanditSettings(sparsity=sparsity, period=period, alpha=alpha, p_min=p_min),
                            seed=seed)
    if freeze == "random":
        return RandomPolicy(len(arms), sparsity=sparsity, seed=seed)
    if freeze == "round_robin":
        return RoundRobinPolicy(block_groups(arms), sparsity=sparsity)
    if not active:
        raise ConfigError("freeze='fixed' needs active=[module patterns of the weights that train]; with none "
                          "every arm would be frozen")
    chosen = [i for i, arm in enumerate(arms) if any(fnmatch.fnmatchcase(arm.name, p) for p in active)]
    if not chosen:
        raise ConfigError(f"active={list(active)} matches no freezable weight; e.g. {arms[0].name!r}")
    return FixedPolicy(len(arms), chosen)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               freeze: str | FreezePolicy | None = "bandit", sparsity: float = 0.5, period: int = 20,
               alpha: float = 1e-3, p_min: float = 1e-3, active: Sequence[str] | None = None,
               arms: Sequence[str] | None = None, seed: int = 0, compile: bool = True,
               preset: str = "exact", stale_after: int | None = None,
               on_metrics: Callable[[StepMetrics], None] | None = None,
               collective_timeout: float = DEFAULT_TIMEOUT_S,
               **options: Any) -> Callable[[Callable[..., Any]], TrainStep]:
    """Decorate a training step (forward, ``backward``, ``optimizer.step()``, ``zero_grad``).

    ``model`` is compiled in place with the fxshear backend (``preset`` and ``options`` as for
    :func:`fxshear.backend`; ``compile=False`` keeps it eager and freezes with ``requires_grad``).
    ``freeze``: ``"bandit"`` (Sheared Backprop; ``sparsity``, ``period``, ``alpha``, ``p_min``),
    ``"random"``, ``"round_robin"`` over blocks, ``"fixed"`` (``active`` = name patterns of the
    weights that train), a :class:`fxshear.freezing.FreezePolicy`, or ``None`` (plain fine-tuning).
    ``arms``: module-name patterns of the Linears that may be frozen (default: every Linear in a
    numbered block).  ``stale_after`` (default ``10 * period``): warn when an arm goes this many
    steps without a gradient.  ``on_metrics`` is called with each step's :class:`StepMetrics`.
    ``optimizer`` is not called by fxshear; it is checked to hold the arms.  Under
    ``torch.distributed`` (DDP, FSDP2) it is required: the policy's gradient norms are read at
    ``optimizer.step()`` and all-reduced, so every rank draws the same mask (checked each step);
    ``collective_timeout`` bounds each of those collectives in seconds (docs/design.md §10).
    """
    if not isinstance(collective_timeout, (int, float)) or isinstance(collective_timeout, bool) \
            or collective_timeout <= 0:
        raise ConfigError(f"collective_timeout must be a positive number of seconds, got {collective_timeout!r}")
    if stale_after is not None and (not isinstance(stale_after, int) or stale_after < 1):
        raise ConfigError(f"stale_after must be a positive integer, got {stale_after!r}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ConfigError("pass the model itself, not torch.compile(model): train_step compiles it with fxshear")
    if compile and type(model).forward is nn.Module.forward:
        children = ", ".join(name for name, _ in model.named_children()) or "none"
        raise ConfigError(
            f"train_step compiles model.forward, and this {type(model).__name__} has no forward of its own "
            f"(children: {children}), so nothing would be compiled or frozen. Pass the module your step calls, "
            "e.g. one whose forward runs them: class Net(nn.Module): def forward(self, x): "
            "return self.head(self.body(x))")
    freezing = freeze is not None
    if freezing and isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
        raise ConfigError(
            "per-step freezing leaves the frozen weights without a gradient, and DDP waits for every parameter's "
            "gradient unless told otherwise: wrap with DDP(model, find_unused_parameters=True) (frozen weights are "
            "then marked ready at the end of the forward and their buckets are not waited on)")
    found = find_arms(model, arms) if freezing else []
    unique_parameters(found)
    policy = make_policy(freeze, found, sparsity=sparsity, period=period, alpha=alpha, p_min=p_min,
                         active=active, seed=seed)
    if optimizer is not None and found:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [arm.name for arm in found if id(arm.parameter) not in held]
        if missing:
            raise ConfigError(f"the optimizer does not hold {len(missing)} freezable weights (e.g. {missing[0]}); "
                              f"freezing them would change nothing")
    backend = None
    if compile:
        cfg = ShearConfig.from_options(preset=preset, freezing=freezing, **options)
        backend = ShearBackend(cfg)
        model.compile(backend=backend)
    elif options:
        raise ConfigError(f"fxshear options {sorted(options)} need compile=True")
    window = stale_after if stale_after is not None else 10 * max(period, 1)

    def decorate(fn: Callable[..., Any]) -> TrainStep:
        return TrainStep(fn, model, optimizer, policy=policy, arms=found, backend=backend,
                         stale_after=max(1, window), on_metrics=on_metrics,
                         collective_timeout=float(collective_timeout))

    return decorate


__all__ = ["FREEZE_CHOICES", "StepMetrics", "TrainStep", "make_policy", "train_step"]
