"""Fine-tune all-MiniLM-L6-v2 with per-step freezing: ``@fxshear.train_step`` in a real loop.

Each step the Sheared-Backprop bandit (or ``--freeze random`` / ``round_robin`` / ``none``)
freezes a fraction of the block Linears' weights; fxshear skips their weight-gradient matmuls in
the one compiled graph, and the optimizer skips them because their ``.grad`` stays ``None``.

    python examples/freeze_minilm.py                                 # bandit, sparsity 0.5, 60 steps
    python examples/freeze_minilm.py --freeze none --steps 60        # the same loop, nothing frozen
    python examples/freeze_minilm.py --steps 3 --batch 4 --seq 32    # a quick look

Same task, data and evaluation as ``examples/finetune_minilm.py`` (``make demo``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import fxshear
from fxshear.zoo.data import load_docstring_dataset
from fxshear.zoo.models import load_minilm_tokenizer

import finetune_minilm as finetune  # the sibling example (this script's folder is on sys.path)

console = Console()
Batch = dict[str, torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; bad values exit with status 2 and a message before anything is loaded."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--freeze", default="bandit", choices=("bandit", "random", "round_robin", "none"))
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of block weights frozen per step")
    parser.add_argument("--period", type=finetune._positive_int, default=20, help="steps a bandit mask is held")
    parser.add_argument("--steps", type=finetune._positive_int, default=60)
    parser.add_argument("--batch", type=finetune._positive_int, default=16)
    parser.add_argument("--seq", type=finetune._seq_len, default=64)
    parser.add_argument("--lr", type=finetune._positive_float, default=5e-5)
    parser.add_argument("--preset", default="exact", choices=fxshear.PRESETS)
    args = parser.parse_args(argv)
    try:
        fxshear.freezing.BanditSettings(sparsity=args.sparsity, period=args.period)
    except fxshear.ConfigError as error:
        parser.error(str(error))
    return args


def fine_tune(batches: list[Batch], held_out: list[Batch], *, lr: float,
              on_step: Callable[[fxshear.TrainStep], None] | None = None,
              **train_step_options: Any) -> tuple[fxshear.TrainStep, float, float]:
    """A fresh pretrained MiniLM fine-tuned on ``batches``, one decorated step per batch.

    Returns the step (its metrics, arms and policy) and the held-out loss and accuracy.
    ``train_step_options`` go to :func:`fxshear.train_step` (``freeze``, ``sparsity``, ...).
    """
    example = finetune.fresh_model()
    model = example.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    @fxshear.train_step(model, optimizer, seed=finetune.SEED, **train_step_options)
    def step(batch: Batch) -> torch.Tensor:
        loss = example.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.manual_seed(finetune.SEED)
    for batch in batches:
        step(batch)
        if on_step is not None:
            on_step(step)
    held_loss, held_accuracy = finetune.evaluate(model, held_out)
    return step, held_loss, held_accuracy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset = load_docstring_dataset(num_classes=finetune.NUM_CLASSES, seed=finetune.SEED)
    tokenizer = load_minilm_tokenizer()
    batches = finetune.training_batches(dataset, tokenizer, args.batch, args.seq, args.steps)
    held_out = finetune.held_out_batches(dataset, tokenizer, args.batch, args.seq)

    freeze = None if args.freeze == "none" else args.freeze
    with console.status("step 1 compiles (a minute on CPU)…") as status:
        def show(step: fxshear.TrainStep) -> None:
            m = step.metrics[-1]
            status.update(f"step {m.step}/{len(batches)}: loss {m.loss:.3f}, {m.seconds:.2f} s, "
                          f"{m.frozen_arms} of {len(step.arms)} block weights frozen")

        step, held_loss, held_accuracy = fine_tune(batches, held_out, lr=args.lr, on_step=show, freeze=freeze,
                                                   sparsity=args.sparsity, period=args.period,
                                                   preset=args.preset)

    steady = step.metrics[1:] or step.metrics
    table = Table(title=f"MiniLM, freeze={args.freeze!r}, sparsity {args.sparsity if freeze else 0}, "
                        f"{args.steps} steps of batch {args.batch} x {args.seq}")
    for column in ("median step s", "mean active fraction", "saved MiB (graph)", "compiles",
                   "final train loss", "held-out loss", "held-out accuracy"):
        table.add_column(column, justify="right")
    table.add_row(f"{statistics.median(m.seconds for m in steady):.3f}",
                  f"{statistics.fmean(m.active_fraction for m in step.metrics):.2f}",
                  f"{step.metrics[-1].saved_activation_bytes / 2**20:,.1f}", str(step.compiles),
                  f"{statistics.fmean(m.loss for m in step.metrics[-5:]):.4f}", f"{held_loss:.4f}",
                  f"{held_accuracy:.1%}")
    console.print(table)
    if step.stale_arms():
        console.print(f"[yellow]{len(step.stale_arms())} weights never trained in this run[/yellow]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
