"""Saved-for-backward memory and step time: eager vs torch.compile vs fxshear, one process run.

    python benchmarks/saved_memory.py [--suite exact|pruning] [--models minilm,llama] [--steps N]
                                      [--quick] [--out DIR]

Why one process: on a small CPU machine a cold Inductor compile of MiniLM takes minutes, so every
configuration compiles exactly once and nothing else runs (parallel jobs would make the step
times meaningless).  Each configuration gets a fresh model built with the same seed and its own
backend, so Dynamo keeps a separate compiled graph per row.  The timed steps then run
round-robin, one step of each row in turn, so machine drift affects every row alike.

What is measured per configuration: one compile/warm-up training step (``compile_s``), then
``--steps`` timed training steps (forward + backward, gradients dropped; no optimizer because
the optimizer does not change what is saved for backward).  Saved activation bytes are counted
at run time with ``fxshear.measure_saved_bytes`` (a ``saved_tensors_hooks`` count that returns
tensors unchanged, so measuring does not change what is saved) for every row, eager included;
fxshear rows also report the bytes their ledger predicts from the partitioned graphs.

``--quick`` is a smoke test (tiny shapes, two steps) that writes to /tmp by default so it never
overwrites the committed results in benchmarks/results.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from torch import nn

import fxshear
from fxshear.zoo.models import ExampleModel, build_model

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
QUICK_OUT = Path(tempfile.gettempdir()) / "fxshear-bench-quick"
BASELINE = "torch.compile"  # the row every ratio is taken against
SEED = 0
MIB = 1024 * 1024

Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------
# what is benchmarked


@dataclass(frozen=True)
class BenchConfig:
    """One row of the benchmark: how to wrap the model, and which partitioner knob to patch.

    ``functorch_budget`` patches ``torch._functorch.config.activation_memory_budget`` around
    every training step: the compiling first call (where the partition is chosen, lazily for
    the backward) as well as the later ones, so the knob is in force whenever it is read.
    """

    name: str
    wrap: Callable[[nn.Module], nn.Module]
    functorch_budget: float | None = None
    uses_fxshear: bool = False

    def step_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.functorch_budget is None:
            return contextlib.nullcontext()
        return torch._functorch.config.patch(activation_memory_budget=self.functorch_budget)


def _eager(model: nn.Module) -> nn.Module:
    return model


def _inductor(model: nn.Module) -> nn.Module:
    """Plain Inductor, as ``torch.compile(model)`` runs it, under a backend object of its own.

    Why not ``torch.compile(model)``: its default backend wrappers compare equal, so Dynamo would
    serve every baseline row (with or without a memory budget) the first row's compiled graph.
    """
    from torch._inductor.compile_fx import compile_fx

    def inductor(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        return compile_fx(gm, example_inputs)

    return torch.compile(model, backend=inductor)


def _with_fxshear(preset: str, **overrides: Any) -> Callable[[nn.Module], nn.Module]:
    """A wrapper that builds a fresh fxshear backend per model (so its ledger is this model's)."""

    def wrap(model: nn.Module) -> nn.Module:
        return torch.compile(model, backend=fxshear.backend(preset=preset, **overrides))

    return wrap


CONFIGS: list[BenchConfig] = [
    BenchConfig("eager", _eager),
    BenchConfig(BASELINE, _inductor),
    BenchConfig("torch.compile budget=0.5", _inductor, functorch_budget=0.5),
    BenchConfig("torch.compile budget=0.1", _inductor, functorch_budget=0.1),
    BenchConfig("fxshear exact", _with_fxshear("exact"), uses_fxshear=True),
    BenchConfig("fxshear exact budget=0.5", _with_fxshear("exact", memory_budget=0.5), uses_fxshear=True),
    BenchConfig("fxshear exact budget=0.1", _with_fxshear("exact", memory_budget=0.1), uses_fxshear=True),
    # Budget 0.0: torch's partitioner recomputes everything it may (and, alone, redraws dropout;
    # pytorch#190758); fxshear keeps its masks there (issue 22).
    BenchConfig("torch.compile budget=0.0", _inductor, functorch_budget=0.0),
    BenchConfig("fxshear exact budget=0.0", _with_fxshear("exact", memory_budget=0.0), uses_fxshear=True),
    # The same with dropout masks from the compiler's fused RNG instead of eager's (serial on CPU).
    BenchConfig("fxshear exact fast-rng", _with_fxshear("exact", dropout_rng="fast"), uses_fxshear=True),
    BenchConfig("fxshear exact fast-rng budget=0.5", _with_fxshear("exact", dropout_rng="fast", memory_budget=0.5),
                uses_fxshear=True),
    BenchConfig("fxshear exact fast-rng budget=0.1", _with_fxshear("exact", dropout_rng="fast", memory_budget=0.1),
                uses_fxshear=True),
    BenchConfig("fxshear balanced", _with_fxshear("balanced"), uses_fxshear=True),
    # Pruning (Back Razor): the aggressive preset at several keep ratios; 0.1 is its default.
    *[BenchConfig(f"fxshear aggressive keep={ratio:g}", _with_fxshear("aggressive", keep_ratio=ratio),
                  uses_fxshear=True) for ratio in (0.5, 0.2, 0.1, 0.05)],
    BenchConfig("fxshear aggressive budget=0.5", _with_fxshear("aggressive", memory_budget=0.5), uses_fxshear=True),
    BenchConfig("fxshear aggressive budget=0.1", _with_fxshear("aggressive", memory_budget=0.1), uses_fxshear=True),
    # Back Razor's opt-in targets too: attention's matmul operands and softmax output pruned
    # (instead of the exact attention rebuild, which they replace).
    BenchConfig("fxshear aggressive +attention", _with_fxshear(
        "aggressive", prune_ops=("linear", "attention", "softmax"), attention_recompute=False), uses_fxshear=True),
]

_BASELINES = ("eager", BASELINE, "torch.compile budget=0.5", "torch.compile budget=0.1")
SUITES: dict[str, tuple[str, ...]] = {
    # The exact rewrites (and balanced) against Inductor with and without its memory budget.
    "exact": (*_BASELINES, *[c.name for c in CONFIGS if c.name.startswith(("fxshear exact", "fxshear balanced"))
                             and not c.name.endswith("budget=0.0")]),
    # Pruning at keep ratios 0.5 / 0.2 / 0.1 / 0.05 and under budgets, with exact for context.
    "pruning": (*_BASELINES, "fxshear exact", *[c.name for c in CONFIGS if c.name.startswith("fxshear aggressive")]),
    # The extreme budget: what saving only the draws costs against Inductor recomputing all.
    "budget0": ("eager", BASELINE, "torch.compile budget=0.1", "torch.compile budget=0.0", "fxshear exact",
                "fxshear exact budget=0.1", "fxshear exact budget=0.0"),
}
SUITE_OUT = {"exact": DEFAULT_OUT, "pruning": DEFAULT_OUT / "pruning", "budget0": DEFAULT_OUT / "budget0"}


@dataclass(frozen=True)
class ModelSpec:
    """A model and the batch shape it is benchmarked at (fp32, dropout on)."""

    name: str
    size: str
    batch: int
    seq: int

    def build(self) -> ExampleModel:
        return build_model(self.name, size=self.size, seed=SEED, dropout=True)

    @property
    def label(self) -> str:
        size = "" if self.name == "minilm" else f" ({self.size})"
        return f"{self.name}{size}, batch {self.batch}, seq {self.seq}, fp32, dropout 0.1"


FULL_MODELS = {
    "minilm": ModelSpec("minilm", "bench", batch=16, seq=128),  # size is ignored: real weights
    "llama": ModelSpec("llama", "bench", batch=8, seq=256),
}
QUICK_MODELS = {
    "minilm": ModelSpec("minilm", "bench", batch=2, seq=32),
    "llama": ModelSpec("llama", "small", batch=2, seq=32),
}


# ---------------------------------------------------------------------------------------
# one configuration


@dataclass
class Row:
    """Everything recorded for one (model, configuration); ``error`` set when it failed."""

    model: str
    config: str
    saved_activation_bytes: int | None = None
    saved_parameter_bytes: int | None = None
    saved_input_bytes: int | None = None
    ledger_activation_bytes: int | None = None
    parameter_bytes: int | None = None
    first_loss: float | None = None
    compile_s: float | None = None
    step_s_median: float | None = None
    step_s_all: list[float] = field(default_factory=list)
    saved_ratio: float | None = None
    time_ratio: float | None = None
    peak_rss_mib_process: float | None = None
    peak_rss_mib_step: float | None = None
    step_rss_growth_mib: float | None = None
    error: str | None = None

    @property
    def saved_mib(self) -> float | None:
        return None if self.saved_activation_bytes is None else self.saved_activation_bytes / MIB

    @property
    def ledger_mib(self) -> float | None:
        return None if self.ledger_activation_bytes is None else self.ledger_activation_bytes / MIB


class LossOf(nn.Module):
    """``example.loss(module, batch)`` as a module, for ``fxshear.measure_saved_bytes``.

    Why not a lambda: ``measure_saved_bytes`` recognises parameters by the storages of the
    callable's own parameters; a lambda has none, so views of weights that autograd saves
    (``weight.t()`` for a linear layer) would be counted as activations.  Registering the
    (compiled) module as a submodule exposes its parameters without changing the call.
    """

    def __init__(self, example: ExampleModel, module: nn.Module) -> None:
        super().__init__()
        self.example = example
        self.module = module

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.example.loss(self.module, batch)


@dataclass
class StepResult:
    seconds: float
    loss: float
    saved: fxshear.SavedBytes


def training_step(loss_of: LossOf, batch: Batch, params: list[nn.Parameter],
                  cfg: BenchConfig) -> StepResult:
    """Forward (saved bytes counted) + backward + drop gradients, timed on the wall clock."""
    start = time.perf_counter()
    with cfg.step_context():
        saved = fxshear.measure_saved_bytes(loss_of, **batch)
        loss = saved.output
        loss.backward()
    for p in params:
        p.grad = None
    seconds = time.perf_counter() - start
    saved.output = None  # drop the graph's output so nothing outlives the step
    return StepResult(seconds, float(loss.detach()), saved)


def peak_rss_mib() -> float:
    """Process peak RSS; ru_maxrss is KiB on Linux (bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


@dataclass
class Prepared:
    """A compiled configuration waiting for its timed steps."""

    cfg: BenchConfig
    row: Row
    model: nn.Module
    loss_of: LossOf
    batch: Batch
    params: list[nn.Parameter]
    timed: list[StepResult] = field(default_factory=list)


def prepare_config(spec: ModelSpec, cfg: BenchConfig) -> Prepared:
    """Fresh model (same seed for every row) and its first, compiling, step."""
    row = Row(model=spec.name, config=cfg.name)
    example = spec.build()
    model = example.model
    params = [p for p in model.parameters() if p.requires_grad]
    row.parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = example.make_batch(spec.batch, spec.seq, seed=SEED)
    loss_of = LossOf(example, cfg.wrap(model))
    torch.manual_seed(SEED)  # same dropout stream for the first step of every row
    first = training_step(loss_of, batch, params, cfg)
    row.compile_s, row.first_loss = first.seconds, first.loss
    return Prepared(cfg, row, model, loss_of, batch, params)


def finish_row(prepared: Prepared) -> Row:
    """Median step time and the saved bytes of the last timed step."""
    row = prepared.row
    row.step_s_all = [r.seconds for r in prepared.timed]
    row.step_s_median = statistics.median(row.step_s_all)
    last = prepared.timed[-1].saved
    row.saved_activation_bytes = last.activation_bytes
    row.saved_parameter_bytes = last.parameter_bytes
    row.saved_input_bytes = last.input_bytes
    if prepared.cfg.uses_fxshear:
        row.ledger_activation_bytes = fxshear.ledger(prepared.model).activation_bytes
    return row


def read_status_kib(field_name: str) -> int | None:
    """A ``VmHWM``/``VmRSS`` value from /proc/self/status, in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS: ``echo 5 > clear_refs``."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_step_peak(spec: ModelSpec, cfg: BenchConfig, steps: int = 3) -> dict[str, float]:
    """In this (fresh) process: compile, warm up, then the peak RSS over ``steps`` steps.

    The peak mark is reset after the warm-up step, so compile-time memory does not count: what
    is left is the model, the batch and the training step itself.
    """
    prepared = prepare_config(spec, cfg)
    training_step(prepared.loss_of, prepared.batch, prepared.params, cfg)
    gc.collect()
    before = read_status_kib("VmRSS")
    if not reset_peak_rss() or before is None:
        raise RuntimeError("peak RSS needs Linux /proc/self/clear_refs")
    for _ in range(steps):
        training_step(prepared.loss_of, prepared.batch, prepared.params, cfg)
    peak = read_status_kib("VmHWM")
    return {"peak_rss_mib_step": peak / 1024, "step_rss_growth_mib": (peak - before) / 1024}


def fresh_process_peaks(spec_key: str, quick: bool, configs: list[BenchConfig],
                        progress: Progress) -> dict[str, dict[str, float]]:
    """Each configuration's step peak, measured in its own fresh Python process.

    The children share this run's Inductor cache directory, so they compile from a warm cache.
    """
    peaks: dict[str, dict[str, float]] = {}
    task = progress.add_task(f"{spec_key}: peak memory, one fresh process per row", total=len(configs))
    for cfg in configs:
        command = [sys.executable, __file__, "--peak-of", cfg.name, "--models", spec_key]
        if quick:
            command.append("--quick")
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            peaks[cfg.name] = json.loads(lines[-1])
        else:
            progress.console.print(f"[red]{spec_key} / {cfg.name}: peak run failed[/red] "
                                   f"{done.stderr.strip().splitlines()[-1:] }")
        progress.advance(task)
    progress.remove_task(task)
    return peaks


def run_model(spec: ModelSpec, configs: list[BenchConfig], steps: int,
              progress: Progress, overall: Any) -> list[Row]:
    """Compile every configuration, then time them round-robin, one step of each in turn.

    Why round-robin: on a shared 2-core machine the speed drifts by 10-30% over minutes;
    timing the rows one after another would put that drift into the ratios.  Interleaved,
    every row sees the same drift.  Dynamo keys its cache on the backend, so the compiled
    rows live side by side without a reset (the recompile limit is raised for them).
    """
    torch._dynamo.reset()
    failed: list[Row] = []
    prepared: list[Prepared] = []
    compile_task = progress.add_task(f"{spec.name}: compiling", total=len(configs))
    for cfg in configs:
        try:
            prepared.append(prepare_config(spec, cfg))
        except Exception as error:  # noqa: BLE001 - record the failure, benchmark the rest
            row = Row(model=spec.name, config=cfg.name, error=f"{type(error).__name__}: {error}")
            progress.console.print(f"[red]{spec.name} / {cfg.name} failed:[/red] {row.error}")
            failed.append(row)
        progress.advance(compile_task)
    progress.remove_task(compile_task)
    timing_task = progress.add_task(f"{spec.name}: timing round-robin", total=steps * len(prepared))
    for _ in range(steps):
        for item in prepared:
            item.timed.append(training_step(item.loss_of, item.batch, item.params, item.cfg))
            progress.advance(timing_task)
    progress.remove_task(timing_task)
    rows = []
    for item in prepared:
        row = finish_row(item)
        row.peak_rss_mib_process = peak_rss_mib()
        progress.console.print(row_summary(row))  # one line per row, readable in a log file
        rows.append(row)
    rows.extend(failed)
    order = {cfg.name: k for k, cfg in enumerate(configs)}
    rows.sort(key=lambda r: order[r.config])
    progress.advance(overall, len(configs))
    prepared.clear()
    gc.collect()
    add_ratios(rows)
    return rows


def row_summary(row: Row) -> str:
    """A log line per finished row (rich shows no live progress when output is not a terminal)."""
    if row.error is not None:
        return f"{row.model} / {row.config}: error"
    return (f"{row.model} / {row.config}: saved {row.saved_mib:.1f} MiB, "
            f"step {row.step_s_median:.3f} s, compile {row.compile_s:.1f} s")


def add_ratios(rows: list[Row]) -> None:
    """saved_ratio and time_ratio against the plain torch.compile row of the same model."""
    base = next((r for r in rows if r.config == BASELINE and r.error is None), None)
    if base is None:
        return
    for r in rows:
        if r.error is not None:
            continue
        if base.saved_activation_bytes:
            r.saved_ratio = r.saved_activation_bytes / base.saved_activation_bytes
        if base.step_s_median:
            r.time_ratio = r.step_s_median / base.step_s_median


# ---------------------------------------------------------------------------------------
# environment


def git_commit() -> str | None:
    """Short commit of the checkout, with "-dirty" for uncommitted changes; None if no git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, check=True, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def cpu_model() -> str:
    """The CPU's model name (step times and even eager's vectorized kernels depend on it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fxshear": fxshear.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


@contextlib.contextmanager
def inductor_cache(warm: bool) -> Iterator[str]:
    """A fresh, empty Inductor cache for the run unless ``warm``.

    Why: with a warm on-disk cache ``compile_s`` depends on what ran before on this machine;
    a fresh directory makes it a cold compile every time.  Within one process, later rows still
    reuse identical kernels compiled for earlier rows (Inductor's in-memory code caches).
    Set before the first compile, which is when Inductor first reads the variable.
    """
    if warm:
        yield os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (warm)")
        return
    path = tempfile.mkdtemp(prefix="fxshear-bench-inductor-")
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# output

NOTES = [
    "saved activations: unique storages autograd saves for backward during one timed step, "
    "counted at run time with fxshear.measure_saved_bytes (parameters and inputs excluded).",
    "ledger: what fxshear's ledger predicts from the partitioned graphs (fxshear rows only).",
    "step time: median wall-clock of the timed forward+backward steps, taken round-robin across "
    "all rows of a model (one step of each in turn) so that machine drift hits every row alike; "
    "compile: the first step.",
    "first loss: loss of the first step after torch.manual_seed(0); with dropout on, eager and "
    "Inductor draw dropout masks differently, so only compiled exact rows are expected to match.",
    "aggressive rows: pruning (Back Razor) at the keep ratio named, 2-bit GELU/SiLU codes and "
    "the exact rewrites; their dropout masks come from the fast RNG (dropout_rng='fast': on CPU "
    "fxshear's C Philox kernel), so their first loss differs from the exact rows'. '+attention' also "
    "prunes what eager attention saves (q, kᵀ, v, the probabilities) at the same keep ratio, "
    "with attention_recompute off.",
    "torch.compile budget rows with dropout on: PyTorch's own partitioner may recompute a random "
    "draw in the backward, with new random numbers (pytorch#190758): at exactly 0.0 every draw, "
    "below 1.0 whatever its knapsack trades back (MiniLM batch 16 x 128 at 0.1: Inductor's seeds; "
    "gradients 1.03 relative off its own budget-1.0 run at the same seed, torch 2.13 CPU). Their "
    "bytes and times are those of wrong gradients; fxshear rows keep every draw at every budget.",
    "peak RSS of the step: each row again in its own fresh process (warm Inductor cache), one "
    "warm-up step, then the kernel's peak-RSS mark (VmHWM) is reset and 3 steps run; the "
    "column is that peak (model, batch and step; compile-time memory excluded) and, in the JSON, "
    "step_rss_growth_mib is the peak minus the resident size before the steps.",
]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def table_cells(row: Row) -> list[str]:
    """The Markdown/rich cells of one row, in HEADERS order."""
    if row.error is not None:
        return [row.config, "error", *["—"] * (len(HEADERS) - 2)]
    return [
        row.config,
        _fmt(row.saved_mib, ".1f"),
        _fmt(row.ledger_mib, ".1f"),
        _fmt(row.saved_ratio, ".2f", "×"),
        _fmt(row.step_s_median, ".3f"),
        _fmt(row.time_ratio, ".2f", "×"),
        _fmt(row.compile_s, ".1f"),
        _fmt(row.first_loss, ".4f"),
        _fmt(row.peak_rss_mib_step, ".0f"),
    ]


HEADERS = [
    "config", "saved activations (MiB, run time)", "ledger (MiB)", "vs torch.compile",
    "step time (s)", "vs torch.compile", "compile (s)", "first loss", "peak RSS of the step (MiB, fresh process)",
]


def markdown(results: dict[str, Any]) -> str:
    """benchmarks/results/saved_memory.md: one table per model, machine and how to reproduce."""
    m = results["machine"]
    lines = [
        "# Saved-for-backward memory: eager vs torch.compile vs fxshear",
        "",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs "
        f"({m['torch_threads']} torch threads), torch {m['torch']}, Python {m['python']}, "
        f"fxshear {m['fxshear']} @ {m['git_commit'] or 'unknown commit'}; date {m['date']}; "
        f"total wall time {results['wall_s']:.0f} s.",
        "",
        f"Reproduce: `{results['command']}` (all rows in one process, timed round-robin, on an "
        "otherwise idle machine).",
    ]
    for spec_label, rows in results["models"].items():
        lines += ["", f"## {spec_label}", "",
                  "| " + " | ".join(HEADERS) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|"]
        lines += ["| " + " | ".join(table_cells(Row(**r))) + " |" for r in rows]
        errors = [r for r in rows if r["error"]]
        if errors:
            lines += [""] + [f"- {r['config']} failed: `{r['error']}`" for r in errors]
    lines += ["", "Notes:", ""] + [f"- {note}" for note in NOTES]
    return "\n".join(lines) + "\n"


def rich_table(title: str, rows: list[Row]) -> Table:
    table = Table(title=title)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*table_cells(row), style="red" if row.error else None)
    return table


def write_results(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "saved_memory.json", out / "saved_memory.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path


# ---------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,llama",
                        help="comma-separated subset of: " + ", ".join(FULL_MODELS))
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per configuration (default 6; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny shapes, llama size=small, 2 steps, output in /tmp")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; "
                        f"with --quick {QUICK_OUT})")
    parser.add_argument("--peak-of", default=None, metavar="CONFIG",
                        help="internal: measure one configuration's step peak RSS in this process "
                        "and print it as JSON")
    parser.add_argument("--suite", default="exact", choices=SUITES,
                        help="which rows: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in SUITES.items()))
    parser.add_argument("--configs", default=None, metavar="NAMES",
                        help="comma-separated rows to run instead of a suite's: "
                        + ", ".join(c.name for c in CONFIGS))
    parser.add_argument("--no-peaks", action="store_true",
                        help="skip the per-row fresh-process peak memory runs")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use the existing Inductor cache instead of a fresh empty one "
                        "(compile times then depend on earlier runs)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in FULL_MODELS]
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(FULL_MODELS)}")
    if args.configs is None:
        args.configs = [c for c in CONFIGS if c.name in SUITES[args.suite]]
    else:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = sorted(set(names) - {c.name for c in CONFIGS})
        if unknown or not names:
            parser.error(f"--configs: no row named {unknown or names}")
        args.configs = [c for c in CONFIGS if c.name in names]
    if args.steps is None:
        args.steps = 2 if args.quick else 6
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else SUITE_OUT[args.suite]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peak_of is not None:
        spec = (QUICK_MODELS if args.quick else FULL_MODELS)[args.models[0]]
        cfg = next(c for c in CONFIGS if c.name == args.peak_of)
        print(json.dumps(measure_step_peak(spec, cfg)))
        return 0
    # Every row of a model keeps its own compiled graph of the same forward: allow them all.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    configs = args.configs
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4 * len(configs)))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: do not squeeze the tables to 80 columns
    specs = [(QUICK_MODELS if args.quick else FULL_MODELS)[name] for name in args.models]
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick,
                               "steps": args.steps, "notes": NOTES, "models": {}}
    all_rows: dict[str, list[Row]] = {}
    with inductor_cache(args.warm_cache) as cache_dir, Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    ) as progress:
        results["inductor_cache"] = "warm: " + cache_dir if args.warm_cache else "fresh (cold)"
        overall = progress.add_task("all configurations", total=len(specs) * len(configs))
        for key, spec in zip(args.models, specs):
            all_rows[spec.label] = run_model(spec, configs, args.steps, progress, overall)
            if not args.no_peaks:
                peaks = fresh_process_peaks(key, args.quick, configs, progress)
                for row in all_rows[spec.label]:
                    for name, value in peaks.get(row.config, {}).items():
                        setattr(row, name, value)
    results["wall_s"] = time.perf_counter() - start
    results["command"] = "python benchmarks/saved_memory.py " + " ".join(
        (["--quick"] if args.quick else []) + [f"--models {','.join(args.models)}",
                                               f"--steps {args.steps}"]
        + ([f"--configs '{','.join(c.name for c in configs)}'"]
           if [c.name for c in configs] != [c.name for c in CONFIGS if c.name in SUITES[args.suite]]
           else [f"--suite {args.suite}"]))
    results["models"] = {label: [asdict(r) for r in rows] for label, rows in all_rows.items()}

    for label, rows in all_rows.items():
        console.print(rich_table(label, rows))
    console.print(f"Wall time {results['wall_s']:.0f} s.")
    json_path, md_path = write_results(results, args.out)
    console.print(f"wrote {json_path} and {md_path}")
    return 1 if any(r.error for rows in all_rows.values() for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
