"""Does reversible fine-tuning (MEFT) learn as well as LoRA and full fine-tuning?  Three seeds each.

    python benchmarks/reversible_quality.py [--steps 80] [--batch 16] [--seq 64] [--seeds 0 1 2]
                                            [--compiled] [--out DIR]

The task is the docstring task of ``examples/finetune_minilm.py`` (which stdlib package wrote a
docstring; real all-MiniLM-L6-v2 weights, a new 4-way head).  Every method sees the same batches
in the same order for the same number of steps, with AdamW; a seed sets the new head's (and the
adapters') initialisation and the dropout stream.  Methods and learning rates (chosen once, the
usual ones for each kind of method, not tuned here):

- full fine-tuning, lr 5e-5 (every weight trains);
- PEFT LoRA r=8 (alpha 16, dropout 0.1, on query/key/value/dense), lr 1e-3, head trains;
- MEFT1/2/3 (``fxshear.reversible``, adapters of width 8, ``invert=True``), lr 1e-3, head trains.

By default the runs are eager (no compile: fifteen compiles would cost more than the training on
a small CPU); ``--compiled`` runs MEFT under ``backend="fxshear"`` and the others under
torch.compile.  The compiled reversible backward equals eager's gradients (tests/
test_reversible_compile.py), so the quality is the method's either way.

Writes ``quality.json``, ``quality.md`` (held-out accuracy and loss, mean ± sd over seeds) and
``quality_loss_curves.svg`` (training loss per step, mean over seeds, 5-step moving mean).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fxshear

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_minilm as task  # noqa: E402  (the docstring task's batches, training loop, evaluation)
from freezing import svg_curves  # noqa: E402
from saved_memory import git_commit, machine_info  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "reversible"
LORA_TARGETS = ["query", "key", "value", "dense"]
Wrap = Callable[[torch.nn.Module], torch.nn.Module]


def _full(compiled: bool) -> Wrap:
    return torch.compile if compiled else (lambda model: model)


def _lora(compiled: bool) -> Wrap:
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS,
                                 modules_to_save=["classifier"])
        lora = peft.get_peft_model(model, config)
        return torch.compile(lora) if compiled else lora
    return wrap


def _meft(variant: str, compiled: bool) -> Wrap:
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        fxshear.reversible(model, variant=variant)
        return torch.compile(model, backend="fxshear") if compiled else model
    return wrap


def methods(compiled: bool) -> dict[str, tuple[Wrap, float]]:
    """Method name -> (how the model is prepared, learning rate)."""
    table: dict[str, tuple[Wrap, float]] = {"full FT": (_full(compiled), 5e-5), "LoRA r=8": (_lora(compiled), 1e-3)}
    for variant in ("meft1", "meft2", "meft3"):
        table[variant.upper()] = (_meft(variant, compiled), 1e-3)
    return table


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_one(name: str, wrap: Wrap, lr: float, seed: int, batches: list, held_out: list) -> dict[str, Any]:
    torch._dynamo.reset()
    example = task.fresh_model(seed)
    torch.manual_seed(seed)  # the adapters' / LoRA's initialisation follows the seed too
    prepared: dict[str, torch.nn.Module] = {}

    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        prepared["model"] = wrap(model)
        return prepared["model"]

    start = time.perf_counter()
    result = task.train(f"{name} seed {seed}", example, prepare, batches, lr, seed)
    seconds = time.perf_counter() - start
    loss, accuracy = task.evaluate(example.model, held_out)
    return {"method": name, "seed": seed, "lr": lr, "losses": result.losses,
            "held_out_loss": loss, "held_out_accuracy": accuracy,
            "trainable_parameters": trainable_parameters(example.model),
            "train_seconds": seconds}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        acc = [r["held_out_accuracy"] for r in mine]
        loss = [r["held_out_loss"] for r in mine]
        final = [statistics.fmean(r["losses"][-task.LAST_STEPS_FOR_FINAL_LOSS:]) for r in mine]
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        rows.append({"method": name, "seeds": len(mine), "lr": mine[0]["lr"],
                     "trainable_parameters": mine[0]["trainable_parameters"],
                     "held_out_accuracy_mean": statistics.fmean(acc), "held_out_accuracy_sd": sd(acc),
                     "held_out_loss_mean": statistics.fmean(loss), "held_out_loss_sd": sd(loss),
                     "final_train_loss_mean": statistics.fmean(final), "final_train_loss_sd": sd(final),
                     "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in mine)})
    return rows


def mean_curves(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    curves = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        per_seed = [r["losses"] for r in runs if r["method"] == name]
        curves[name] = {"losses": [statistics.fmean(step) for step in zip(*per_seed)]}
    return curves


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Reversible fine-tuning: quality on the docstring task", "",
        f"Machine: {results['machine']['processor']}, torch {results['machine']['torch']}; commit {results['commit']}.",
        f"all-MiniLM-L6-v2 (real weights) + new 4-way head; {s['steps']} steps of batch {s['batch']}, seq {s['seq']}, "
        f"AdamW, dropout 0.1 on; seeds {', '.join(map(str, s['seeds']))}; held-out split of "
        f"{s['held_out_examples']} docstrings (chance 25%). Runs: {'compiled' if s['compiled'] else 'eager'}.", "",
        "| method | lr | trainable params | held-out accuracy | held-out loss | final train loss | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["summary"]:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['trainable_parameters']:,} | "
                     f"{r['held_out_accuracy_mean']:.1%} ± {r['held_out_accuracy_sd']:.1%} | "
                     f"{r['held_out_loss_mean']:.3f} ± {r['held_out_loss_sd']:.3f} | "
                     f"{r['final_train_loss_mean']:.3f} ± {r['final_train_loss_sd']:.3f} | "
                     f"{r['train_seconds_mean']:.0f} |")
    lines += ["", "mean ± sample standard deviation over the seeds. Loss curves: `quality_loss_curves.svg` "
              "(training loss per step, mean over seeds, 5-step moving mean).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="a subset of the methods (default all)")
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    from fxshear.zoo.data import load_docstring_dataset
    from fxshear.zoo.models import load_minilm_tokenizer

    dataset = load_docstring_dataset(num_classes=task.NUM_CLASSES, seed=task.SEED)
    tokenizer = load_minilm_tokenizer()
    batches = task.training_batches(dataset, tokenizer, args.batch, args.seq, args.steps)
    held_out = task.held_out_batches(dataset, tokenizer, args.batch, args.seq)
    table = methods(args.compiled)
    chosen = args.methods or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(table)}")

    runs = []
    for seed in args.seeds:  # seeds outermost: a cut-short run still has every method for the first seeds
        for name in chosen:
            wrap, lr = table[name]
            runs.append(run_one(name, wrap, lr, seed, batches, held_out))
            task.console.print(f"  {name} seed {seed}: held-out accuracy {runs[-1]['held_out_accuracy']:.1%}, "
                               f"loss {runs[-1]['held_out_loss']:.3f}")

    results = {"machine": machine_info(), "commit": git_commit(),
               "settings": {"steps": args.steps, "batch": args.batch, "seq": args.seq, "seeds": args.seeds,
                            "compiled": args.compiled, "held_out_examples": len(dataset.held_out)},
               "summary": summarise(runs), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    (args.out / "quality.md").write_text(markdown(results))
    (args.out / "quality_loss_curves.svg").write_text(svg_curves(mean_curves(runs)))
    task.console.print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
