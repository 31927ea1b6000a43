"""Fine-tune all-MiniLM-L6-v2 twice — under torch.compile and under fxshear — and compare.

This is the program ``make demo`` runs.  Both runs start from the same pretrained weights
(a fresh model built with seed 0), see the same batches in the same order and use the same
optimizer, so the only difference is the compiler backend:

    compiled = torch.compile(model)                                          # Inductor
    compiled = torch.compile(model, backend=fxshear.backend(preset="exact"))  # fxshear (default preset)

The task is real text classification that needs no download: which stdlib package
(asyncio, email, logging, xml) wrote a docstring?  Each step counts the activation bytes
autograd saves for backward (``fxshear.measure_saved_bytes``), and after each run the plain
model is evaluated on the held-out split.  At the end a table compares the two runs and an
HTML report (``fxshear.inspect``) explains what fxshear saved, op by op.

    python examples/finetune_minilm.py                        # defaults: 30 steps, batch 16, seq 64
    python examples/finetune_minilm.py --steps 4 --batch 4 --seq 32 --preset balanced
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
)
from rich.table import Table
from torch import nn

import fxshear
from fxshear.zoo.data import DocstringDataset, load_docstring_dataset, tokenize_batches
from fxshear.inspection import InspectionReport
from fxshear.zoo.models import ExampleModel, build_model, load_minilm_tokenizer

SEED = 0
NUM_CLASSES = 4
MAX_SEQ_LEN = 512  # MiniLM's position embeddings
LAST_STEPS_FOR_FINAL_LOSS = 5
MIB = 2**20

Batch = dict[str, torch.Tensor]

console = Console()


# ---------------------------------------------------------------------------------------
# command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seq_len(text: str) -> int:
    value = int(text)
    if not 2 <= value <= MAX_SEQ_LEN:
        raise argparse.ArgumentTypeError(f"must be between 2 and {MAX_SEQ_LEN}, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options; invalid values exit with status 2 and a message, before any work."""
    parser = argparse.ArgumentParser(
        description="Fine-tune all-MiniLM-L6-v2 under torch.compile and under fxshear; "
        "compare saved activations, step time and accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=_positive_int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch", type=_positive_int, default=16, help="examples per step")
    parser.add_argument("--seq", type=_seq_len, default=64, help="tokens per example (padded)")
    parser.add_argument("--preset", default="exact", choices=fxshear.PRESETS,
                        help="fxshear preset for the second run")
    parser.add_argument("--html", default="out/fxshear-inspect.html",
                        help="where to write the HTML inspection report")
    parser.add_argument("--lr", type=_positive_float, default=5e-5, help="AdamW learning rate")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------
# data


def training_batches(dataset: DocstringDataset, tokenizer: object, batch_size: int,
                     seq_len: int, steps: int) -> list[Batch]:
    """Exactly ``steps`` static-shape batches; epoch ``e`` is shuffled with seed ``SEED + e``.

    Tokenized once up front, so both runs get identical tensors in identical order and
    tokenization never shows up in the step times.
    """
    if len(dataset.train) < batch_size:
        raise SystemExit(f"--batch {batch_size} is larger than the training split "
                         f"({len(dataset.train)} examples)")

    def epochs() -> Iterator[Batch]:
        for epoch in itertools.count():
            yield from tokenize_batches(dataset.train, tokenizer, batch_size, seq_len,
                                        seed=SEED + epoch)

    return list(itertools.islice(epochs(), steps))


def held_out_batches(dataset: DocstringDataset, tokenizer: object, batch_size: int,
                     seq_len: int) -> list[Batch]:
    """The whole held-out split (last batch may be smaller: evaluation runs eagerly)."""
    return list(tokenize_batches(dataset.held_out, tokenizer, batch_size, seq_len,
                                 seed=SEED, drop_last=False))


# ---------------------------------------------------------------------------------------
# training and evaluation


@dataclass
class RunResult:
    """What one fine-tuning run measured."""

    name: str
    losses: list[float]
    step_seconds: list[float]
    saved_activation_bytes: list[int]
    held_out_loss: float = float("nan")
    held_out_accuracy: float = float("nan")

    @property
    def steady_step_seconds(self) -> float:
        """Median step time, leaving out the first step (which compiles)."""
        rest = self.step_seconds[1:]
        return statistics.median(rest) if rest else float("nan")

    @property
    def compile_seconds(self) -> float:
        """First step (trace + compile forward and backward + run) minus a steady step."""
        steady = self.steady_step_seconds
        return self.step_seconds[0] - (0.0 if math.isnan(steady) else steady)

    @property
    def activation_mib(self) -> float:
        """Saved activations per step (shapes are static, so every step saves the same)."""
        return statistics.median(self.saved_activation_bytes) / MIB

    @property
    def final_train_loss(self) -> float:
        return statistics.fmean(self.losses[-LAST_STEPS_FOR_FINAL_LOSS:])


def fresh_model(seed: int = SEED) -> ExampleModel:
    """Pretrained MiniLM plus a new 4-way head, initialised identically for one seed."""
    return build_model("minilm", num_labels=NUM_CLASSES, seed=seed)


def train(name: str, example: ExampleModel, compile_model: Callable[[nn.Module], nn.Module],
          batches: list[Batch], lr: float, seed: int = SEED) -> RunResult:
    """Fine-tune ``example.model`` through ``compile_model(model)`` with AdamW, one step per batch.

    The forward runs inside ``fxshear.measure_saved_bytes``, which counts the storages autograd
    keeps for backward; its ``.output`` is the loss we then call ``backward`` on.
    """
    model = example.model
    compiled = compile_model(model)
    # fused: one pass over all parameters. The default (foreach) AdamW allocates full-size
    # temporaries every step, which costs more than forward + backward on a small CPU box.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    torch.manual_seed(seed)  # same dropout RNG stream at the start of runs with the same seed
    result = RunResult(name, losses=[], step_seconds=[], saved_activation_bytes=[])

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{name}: step 1 compiles (a minute or two on CPU)…",
                                 total=len(batches))
        for step, batch in enumerate(batches, start=1):
            start = time.perf_counter()
            saved = fxshear.measure_saved_bytes(example.loss, compiled, batch)
            loss = saved.output
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start

            result.losses.append(loss.item())
            result.step_seconds.append(seconds)
            result.saved_activation_bytes.append(saved.activation_bytes)
            progress.update(task, advance=1, description=(
                f"{name}: loss {result.losses[-1]:.3f}  "
                f"{seconds:.2f} s/step{'  (incl. compile)' if step == 1 else ''}"))
    return result


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the plain (uncompiled) model, in eval mode.

    The compiled wrapper shares its parameters with ``model``, so this sees the fine-tuned
    weights without triggering another compile for no_grad/eval.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model(batch["input_ids"], batch["attention_mask"])  # no labels -> logits
        total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(dim=-1) == batch["labels"]).sum().item()
        count += batch["labels"].numel()
    model.train(was_training)
    return total_loss / count, correct / count


def run(name: str, compile_model: Callable[[nn.Module], nn.Module], batches: list[Batch],
        held_out: list[Batch], lr: float, seed: int = SEED) -> RunResult:
    """Build a fresh model, fine-tune it and evaluate it on the held-out split.

    ``seed`` sets the new head's initialisation and the dropout stream (the data order is fixed).
    """
    torch._dynamo.reset()  # each run compiles from scratch, like a new process would
    example = fresh_model(seed)
    result = train(name, example, compile_model, batches, lr, seed)
    result.held_out_loss, result.held_out_accuracy = evaluate(example.model, held_out)
    console.print(f"  {name}: held-out accuracy {result.held_out_accuracy:.1%} "
                  f"(chance {1 / NUM_CLASSES:.0%}), loss {result.held_out_loss:.3f}")
    return result


# ---------------------------------------------------------------------------------------
# report


def results_table(results: list[RunResult], batch_size: int, seq_len: int, preset: str) -> Table:
    """One row per run, then fxshear / torch.compile for saved bytes and step time."""
    table = Table(
        title=f"Fine-tuning all-MiniLM-L6-v2: batch {batch_size}, seq {seq_len}, "
        f"fxshear preset {preset!r}",
        caption="ratio = fxshear / torch.compile; "
        "saved = activations autograd keeps for backward, per step; step = median "
        "after step 1; compile = step 1 minus a median step (the second run reuses "
        "Inductor's warm-up and kernels the first one built); train loss = mean of the "
        f"last {LAST_STEPS_FOR_FINAL_LOSS} steps",
    )
    table.add_column("run", no_wrap=True)
    for column in ("saved\nMiB", "step\ns", "compile\ns", "train\nloss", "held-out\nloss",
                   "held-out\naccuracy"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        table.add_row(r.name, f"{r.activation_mib:,.2f}", f"{r.steady_step_seconds:.3f}",
                      f"{r.compile_seconds:.0f}", f"{r.final_train_loss:.3f}",
                      f"{r.held_out_loss:.3f}", f"{r.held_out_accuracy:.1%}")
    baseline, shear = results
    table.add_section()
    table.add_row("ratio",
                  _ratio(shear.activation_mib, baseline.activation_mib),
                  _ratio(shear.steady_step_seconds, baseline.steady_step_seconds),
                  "", "", "", "", style="bold")
    return table


def _ratio(numerator: float, denominator: float) -> str:
    if not denominator or math.isnan(numerator) or math.isnan(denominator):
        return "-"
    return f"{numerator / denominator:.2f}x"


def write_inspection(preset: str, batch: Batch, path: str) -> tuple[Path, InspectionReport]:
    """``fxshear.inspect`` on a fresh model: which tensors each side saves, and why.

    It traces and partitions both sides without generating kernels, so it takes seconds.
    Its totals come from the partitioned graphs — a cross-check of the bytes measured above.
    """
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    report = fxshear.inspect(fresh_model().model, preset=preset, example_kwargs=batch)
    report.save_html(str(target))
    return target, report


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    console.print(
        f"[bold]Fine-tuning all-MiniLM-L6-v2 twice for {args.steps} steps[/bold] (batch "
        f"{args.batch}, seq {args.seq}): first under torch.compile (Inductor), then under "
        f"fxshear (preset {args.preset!r}) — same seed, weights and data order. "
        "Each run begins with an Inductor compile that takes a minute or two on CPU."
    )

    dataset = load_docstring_dataset(num_classes=NUM_CLASSES, seed=SEED)
    tokenizer = load_minilm_tokenizer()
    batches = training_batches(dataset, tokenizer, args.batch, args.seq, args.steps)
    held_out = held_out_batches(dataset, tokenizer, args.batch, args.seq)
    console.print(f"Task: which package wrote a docstring ({', '.join(dataset.label_names)}); "
                  f"{len(dataset.train)} training and {len(dataset.held_out)} held-out examples.")

    backend = fxshear.backend(preset=args.preset)
    runs: list[tuple[str, Callable[[nn.Module], nn.Module]]] = [
        ("torch.compile", lambda model: torch.compile(model)),
        ("fxshear", lambda model: torch.compile(model, backend=backend)),
    ]
    results = [run(name, compile_model, batches, held_out, args.lr)
               for name, compile_model in runs]

    console.print(results_table(results, args.batch, args.seq, args.preset))
    with console.status("Writing the inspection report (traces both sides, no codegen)…"):
        html, report = write_inspection(args.preset, batches[0], args.html)
    console.print(f"Graph ledger for one step: torch.compile saves "
                  f"{report.baseline.activation_bytes / MIB:,.2f} MiB of activations, fxshear "
                  f"{report.shear.activation_bytes / MIB:,.2f} MiB ({report.saved_ratio:.2f}x).")
    console.print(f"Total time: {time.perf_counter() - started:.0f} s")
    console.print(f"[bold]Inspection report: {html}[/bold]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
