"""Fine-tune the real all-MiniLM-L6-v2 reversibly (MEFT) on the docstring task.

    python examples/reversible_minilm.py [--variant meft1] [--steps 60] [--batch 16] [--seq 128]

``fxshear.reversible`` adds MEFT's adapters and makes the six blocks reversible in place; the
model is then compiled with the fxshear backend, whose backward rebuilds every block's input from
its output instead of saving it.  The run prints the saved bytes per step (counted at run time),
the step time, and the held-out accuracy and loss after fine-tuning; ``--compare`` also runs
full fine-tuning under plain torch.compile on the same batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fxshear
from fxshear.reversible import VARIANTS
from fxshear.zoo.data import load_docstring_dataset
from fxshear.zoo.models import load_minilm_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_minilm as task  # noqa: E402  (the docstring task's batches, training loop, evaluation)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="meft1", choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="the adapters and head train (default 1e-3)")
    parser.add_argument("--compare", action="store_true", help="also run full fine-tuning under torch.compile")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    dataset = load_docstring_dataset(num_classes=task.NUM_CLASSES, seed=task.SEED)
    tokenizer = load_minilm_tokenizer()
    batches = task.training_batches(dataset, tokenizer, args.batch, args.seq, args.steps)
    held_out = task.held_out_batches(dataset, tokenizer, args.batch, args.seq)

    def reversible_compiled(model: torch.nn.Module) -> torch.nn.Module:
        fxshear.reversible(model, variant=args.variant)
        return torch.compile(model, backend="fxshear")

    runs = [task.run(f"{args.variant} (reversible, fxshear)", reversible_compiled, batches, held_out, args.lr)]
    if args.compare:
        runs.append(task.run("full fine-tuning (torch.compile)", torch.compile, batches, held_out, 5e-5))
    for result in runs:
        task.console.print(f"{result.name}: saved {result.activation_mib:.1f} MiB per step, "
                           f"{result.steady_step_seconds:.2f} s/step, final train loss {result.final_train_loss:.3f}, "
                           f"held-out accuracy {result.held_out_accuracy:.1%}, loss {result.held_out_loss:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
