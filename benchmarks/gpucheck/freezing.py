"""Per-step freezing on a GPU: ``@fxshear.train_step`` at sparsity 0.5 against full fine-tuning.

Full training steps (forward, backward, fused AdamW, ``zero_grad``) on the LLaMA-style model in
bf16, dropout off: full fine-tuning under fxshear ``exact`` (``freeze=None``) and the bandit at
sparsity 0.5 (one compiled graph, the frozen weights' gradient matmuls skipped at run time),
timed in interleaved rounds.  Records the median step time, the ratio, the compile count (the
bandit must not recompile per mask) and the mean fraction of weights that trained.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from .runner import Check, Context

SEED = 0


class _Runner:
    def __init__(self, example: Any, batch: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, **options: Any) -> None:
        import fxshear

        self.example = example
        self.model = copy.deepcopy(example.model).to(device, dtype).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=device.type == "cuda")
        self.batch = batch
        self.device = device
        self.step = fxshear.train_step(self.model, self.optimizer, seed=SEED, preset="exact", **options)(self._body)
        self.seconds: list[float] = []

    def _body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.example.loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def run(self, steps: int, timed: bool) -> None:
        for _ in range(steps):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.step(self.batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if timed:
                self.seconds.append(time.perf_counter() - start)


def _compare(ctx: Context) -> dict[str, Any]:
    from fxshear.zoo.models import build_model

    torch._dynamo.reset()
    device = torch.device(ctx.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch_size, seq = (2, 16) if ctx.small else (8, 512)
    example = build_model("llama", size="small" if ctx.small else "bench", dropout=False, seed=SEED)
    batch = {k: v.to(device) for k, v in example.make_batch(batch_size, seq, seed=SEED).items()}
    full = _Runner(example, batch, device, dtype, freeze=None)
    frozen = _Runner(example, batch, device, dtype, freeze="bandit", sparsity=0.5, period=5)
    warm, rounds, steps = (2, 1, 2) if ctx.small else (3, 4, 10)
    for runner in (full, frozen):
        runner.run(warm, timed=False)
    for _ in range(rounds):
        for runner in (full, frozen):
            runner.run(steps, timed=True)
    full_s, frozen_s = statistics.median(full.seconds), statistics.median(frozen.seconds)
    metrics = frozen.step.metrics
    return {
        "model": "llama", "shape": f"b{batch_size} s{seq}", "dtype": str(dtype).removeprefix("torch."),
        "full_ms": full_s * 1e3, "sparsity_0.5_ms": frozen_s * 1e3, "ratio": frozen_s / full_s,
        "compiles_full": full.step.compiles, "compiles_frozen": frozen.step.compiles,
        "active_fraction_mean": statistics.fmean(m.active_fraction for m in metrics),
        "steps": len(metrics),
        # the bandit's masks change every period: more compiles than the full run means recompiles
        "ok": frozen.step.compiles <= full.step.compiles + 1,
    }


def build(ctx: Context) -> list[Check]:
    return [Check("llama bandit 0.5 vs full fine-tuning", lambda: _compare(ctx))]
