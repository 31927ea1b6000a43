"""The backend end to end on a GPU: MiniLM and the LLaMA-style model in bf16, every preset.

Per model, one check per configuration compiles it and takes one training step from the same
seed and weights, recording:

- gradients against eager PyTorch in bf16 (``grad_cos``: cosine of all gradients flattened,
  ``grad_max_rel``: the largest per-parameter relative error, ``||g - g_eager|| / ||g_eager||``).
  bf16 rounds differently when Inductor fuses, so exactness is judged against torch.compile's
  own error: ``exact`` passes when its largest relative error is at most twice torch.compile's
  plus 1e-2 and its cosine at least 0.999; the approximate presets report their cosine (floors
  0.95 and 0.8 for ``balanced`` and ``aggressive`` only catch a broken rewrite);
- the ledger's saved activation bytes against the run-time count of what autograd kept
  (``fxshear.measure_saved_bytes``) on the same step;
- ``torch.cuda.max_memory_allocated`` over the step.

Dropout is off (so torch.compile and Inductor with a memory budget, which draw their own random
numbers, can be compared gradient for gradient with eager); the CPU benchmarks cover dropout.
A last check per model times every compiled configuration in interleaved rounds (median step
time, forward + backward) against torch.compile and Inductor with ``activation_memory_budget``
0.5 and 0.1, in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..saved_memory import _inductor as inductor  # plain Inductor under a backend object of its own
from .runner import Check, Context

MIB = 2**20
SEED = 0


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    preset: str | None = None  # fxshear preset; None: eager or Inductor
    inductor: bool = False
    budget: float | None = None  # torch._functorch.config.activation_memory_budget

    def step_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.budget is None:
            return contextlib.nullcontext()
        return torch._functorch.config.patch(activation_memory_budget=self.budget)


CONFIGS = (
    Config("eager"),
    Config("fxshear exact", preset="exact"),
    Config("torch.compile", inductor=True),
    Config("fxshear balanced", preset="balanced"),
    Config("fxshear aggressive", preset="aggressive"),
    Config("torch.compile budget=0.5", inductor=True, budget=0.5),
    Config("torch.compile budget=0.1", inductor=True, budget=0.1),
)
#: (model, batch, seq) on the GPU and in the CPU self-test.
MODELS = {"minilm": (16, 128), "llama": (8, 512)}
SMALL_MODELS = {"llama": (2, 16)}
#: Floors that catch a broken rewrite, not the approximation's size (which is reported): the
#: 2-bit SiLU of ``balanced`` gave 0.988 on the tiny LLaMA of the CPU self-test.
COSINE_FLOOR = {"exact": 0.999, "balanced": 0.95, "aggressive": 0.8}


@dataclasses.dataclass
class Prepared:
    config: Config
    module: nn.Module
    params: list[nn.Parameter]
    seconds: list[float] = dataclasses.field(default_factory=list)


class ModelRun:
    """One model's configurations: same weights, same batch, one process."""

    def __init__(self, name: str, ctx: Context) -> None:
        from fxshear.zoo.models import build_model

        self.name, self.ctx = name, ctx
        self.device = torch.device(ctx.device)
        self.dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
        batch, seq = (SMALL_MODELS if ctx.small else MODELS)[name]
        self.example = build_model(name, size="small" if ctx.small else "bench", dropout=False, seed=SEED)
        self.batch = {k: v.to(self.device) for k, v in self.example.make_batch(batch, seq, seed=SEED).items()}
        self.shape = f"b{batch} s{seq}"
        self.prepared: dict[str, Prepared] = {}
        self.eager_grads: list[torch.Tensor] | None = None
        self.compile_grad_rel: float | None = None

    def _fresh_model(self) -> nn.Module:
        import copy

        return copy.deepcopy(self.example.model).to(self.device, self.dtype).train()

    def _step(self, prepared: Prepared) -> torch.Tensor:
        with prepared.config.step_context():
            loss = self.example.loss(prepared.module, self.batch)
            loss.backward()
        return loss

    def check(self, config: Config) -> dict[str, Any]:
        import fxshear

        model = self._fresh_model()
        params = [p for p in model.parameters() if p.requires_grad]
        backend = None
        if config.preset is not None:
            backend = fxshear.backend(preset=config.preset)
            module: nn.Module = torch.compile(model, backend=backend)
        elif config.inductor:
            module = inductor(model)
        else:
            module = model
        prepared = Prepared(config, module, params)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
        torch.manual_seed(SEED)
        start = time.perf_counter()
        with config.step_context():
            counted = fxshear.measure_saved_bytes(self.example.loss, module, self.batch)
            counted.output.backward()
        self._sync()
        first_step_s = time.perf_counter() - start
        grads = [p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                 for p in params]
        row: dict[str, Any] = {"model": self.name, "shape": self.shape, "dtype": str(self.dtype).removeprefix("torch."),
                               "first_step_s": first_step_s,
                               "runtime_saved_mib": counted.activation_bytes / MIB}
        if self.device.type == "cuda":
            row["peak_mib_over_weights"] = (torch.cuda.max_memory_allocated() - base_memory) / MIB
        if backend is not None:
            ledger = sum(region.ledger.activation_bytes for region in backend.regions)
            row["ledger_saved_mib"] = ledger / MIB
            row["ledger_vs_runtime"] = ledger / max(counted.activation_bytes, 1)
        counted.output = None
        for p in params:
            p.grad = None
        if config.name == "eager":
            self.eager_grads = grads
        elif self.eager_grads is not None:
            row.update(self._compare(config, grads))
        self.prepared[config.name] = prepared
        return row

    def _compare(self, config: Config, grads: list[torch.Tensor]) -> dict[str, Any]:
        assert self.eager_grads is not None
        flat = torch.cat([g.flatten() for g in grads])
        ref = torch.cat([g.flatten() for g in self.eager_grads])
        cos = float(torch.nn.functional.cosine_similarity(flat, ref, dim=0))
        rel = max(float((g - r).norm() / r.norm()) for g, r in zip(grads, self.eager_grads) if float(r.norm()) > 0)
        out: dict[str, Any] = {"grad_cos": cos, "grad_max_rel": rel}
        if config.name == "torch.compile":
            self.compile_grad_rel = rel
        if config.preset == "exact":
            # judged after torch.compile has run when it has; else against bf16's own rounding
            reference = self.compile_grad_rel if self.compile_grad_rel is not None else 2e-2
            out["ok"] = cos >= COSINE_FLOOR["exact"] and rel <= 2 * reference + 1e-2
        elif config.preset in COSINE_FLOOR:
            out["ok"] = cos >= COSINE_FLOOR[config.preset]
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timing(self, rounds: int, steps: int) -> dict[str, Any]:
        """Median step time of every prepared configuration, interleaved in rounds."""
        runs = list(self.prepared.values())
        for prepared in runs:  # one untimed step each after the compile
            self._step(prepared)
            self._drop_grads(prepared)
        for _ in range(rounds):
            for prepared in runs:
                for _ in range(steps):
                    self._sync()
                    start = time.perf_counter()
                    self._step(prepared)
                    self._sync()
                    prepared.seconds.append(time.perf_counter() - start)
                    self._drop_grads(prepared)
        medians = {p.config.name: statistics.median(p.seconds) for p in runs}
        base = medians.get("torch.compile", math.nan)
        return {"step_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
                "vs_torch_compile": {k: round(v / base, 3) for k, v in medians.items()} if base == base else {},
                "model": self.name, "shape": self.shape}

    @staticmethod
    def _drop_grads(prepared: Prepared) -> None:
        for p in prepared.params:
            p.grad = None


def build(ctx: Context) -> list[Check]:
    checks: list[Check] = []
    models = SMALL_MODELS if ctx.small else MODELS
    configs = CONFIGS if not ctx.small else tuple(c for c in CONFIGS if c.budget is None)
    for name in models:
        holder: dict[str, ModelRun] = {}

        def run_for(config: Config, name: str = name, holder: dict[str, ModelRun] = holder) -> dict[str, Any]:
            if "run" not in holder:
                torch._dynamo.reset()
                holder["run"] = ModelRun(name, ctx)
            return holder["run"].check(config)

        def timing(holder: dict[str, ModelRun] = holder) -> dict[str, Any]:
            run = holder.get("run")
            if run is None:
                raise RuntimeError("no configuration of this model compiled")
            result = run.timing(rounds=1 if ctx.small else 3, steps=1 if ctx.small else 5)
            holder.clear()  # free the model's compiled copies before the next model
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
            return result

        checks += [Check(f"{name} {c.name}", lambda c=c, run_for=run_for: run_for(c)) for c in configs]
        checks.append(Check(f"{name} step time (interleaved)", timing))
    return checks
