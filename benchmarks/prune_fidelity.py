"""How much pruning (Back Razor) and the 2-bit GELU codes change training: gradients and loss.

    python benchmarks/prune_fidelity.py [--steps N] [--seeds S] [--keep-ratios R,R] [--quick] [--out DIR]

Two measurements on all-MiniLM-L6-v2 (real weights, dropout on) and the docstring task of
``fxshear.zoo.data`` (real text, no download):

1. **Gradient cosine per layer type.**  One batch of real text, one backward under fxshear's
   ``exact`` preset (its gradients equal eager's) and one under each approximate setting, with the
   same seed and the same dropout masks (every row draws them as eager does, ``dropout_rng=
   "eager"``), so the only difference is the approximation.  For each layer type (attention q/k/v,
   attention output, FFN in, FFN out, LayerNorm, embeddings, head) the cosine between the two
   gradients of every parameter, summarised as min and mean over the 6 layers.  Pruning changes
   only the weight gradients of the pruned Linears (their input gradients stay exact); the 2-bit
   GELU codes change every gradient upstream of a GELU.

2. **Short fine-tune.**  The same model fine-tuned for ``--steps`` AdamW steps on the same batches
   under ``exact`` and under the approximate settings; the table compares the final training loss
   (mean of the last steps) and the held-out loss and accuracy.  ``torch.compile`` (exact
   gradients, but Inductor's own dropout masks) is listed too: the spread between it and
   ``exact`` is how much a different dropout stream alone moves these numbers.  Every run is
   repeated for ``--seeds`` seeds (head initialisation and dropout stream) and compared with
   exact per seed, so a loss gap can be told from that noise.

Writes ``prune_fidelity.json`` (with every step's loss) and ``prune_fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import fxshear
from fxshear.zoo.data import load_docstring_dataset
from fxshear.zoo.models import build_model, load_minilm_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_minilm  # noqa: E402  (its data split, training loop and evaluation)
from saved_memory import machine_info  # noqa: E402  (the same machine record as the other benchmark)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "pruning"
SEED = 0
console = Console(width=160)


# ---------------------------------------------------------------------------------------
# what is compared


@dataclass(frozen=True)
class Setting:
    """An approximate fxshear configuration compared against ``exact``."""

    name: str
    options: dict[str, Any]


def settings(keep_ratios: list[float]) -> list[Setting]:
    """2-bit codes alone, aggressive (2-bit codes + pruning) at each keep ratio, then at the
    smallest ratio with attention's own tensors pruned too (Back Razor's opt-in targets).

    Every setting draws dropout masks as eager does, so gradients differ from exact only by the
    approximation.
    """
    rows = [Setting("2-bit GELU only", {"preset": "aggressive", "prune": False, "dropout_rng": "eager"})]
    rows += [Setting(f"aggressive keep={r:g}", {"preset": "aggressive", "keep_ratio": r, "dropout_rng": "eager"})
             for r in keep_ratios]
    smallest = min(keep_ratios)
    rows.append(Setting(f"aggressive keep={smallest:g} +attention",
                        {"preset": "aggressive", "keep_ratio": smallest, "dropout_rng": "eager",
                         "prune_ops": ["linear", "attention", "softmax"], "attention_recompute": False}))
    return rows


LAYER_TYPES: list[tuple[str, Callable[[str], bool]]] = [
    ("attention q/k/v weight", lambda n: ".attention.self." in n and n.endswith("weight")),
    ("attention output weight (pruned)", lambda n: ".attention.output.dense.weight" in n),
    ("FFN in weight (shares the LN output)", lambda n: ".intermediate.dense.weight" in n),
    ("FFN out weight (pruned)", lambda n: n.endswith(".output.dense.weight") and ".attention." not in n),
    ("Linear biases", lambda n: ".dense.bias" in n or ".self." in n and n.endswith("bias")),
    ("LayerNorm", lambda n: "LayerNorm" in n),
    ("embeddings", lambda n: ".embeddings." in n and "LayerNorm" not in n),
    ("classifier head", lambda n: "classifier" in n),
]


def layer_type(name: str) -> str:
    for label, matches in LAYER_TYPES:
        if matches(name):
            return label
    return "other"


# ---------------------------------------------------------------------------------------
# 1. gradient cosine


def gradients(options: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one seeded forward + backward under fxshear(options)."""
    torch._dynamo.reset()
    example = build_model("minilm", num_labels=4, seed=SEED, dropout=True)
    compiled = torch.compile(example.model, backend=fxshear.backend(**options))
    torch.manual_seed(SEED)
    example.loss(compiled, batch).backward()
    return {n: p.grad.detach().clone() for n, p in example.model.named_parameters() if p.grad is not None}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denominator = a.norm() * b.norm()
    if denominator == 0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float(a @ b / denominator)


def gradient_fidelity(rows: list[Setting], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per setting: per-parameter cosine to exact, and min / mean per layer type, and overall."""
    with console.status("gradients under exact (the reference)…"):
        reference = gradients({"preset": "exact"}, batch)
    out: dict[str, Any] = {}
    for setting in rows:
        with console.status(f"gradients under {setting.name}…"):
            approx = gradients(setting.options, batch)
        per_parameter = {n: cosine(approx[n], reference[n]) for n in reference}
        by_type: dict[str, list[float]] = defaultdict(list)
        for name, value in per_parameter.items():
            by_type[layer_type(name)].append(value)
        flat = cosine(torch.cat([approx[n].flatten() for n in reference]),
                      torch.cat([reference[n].flatten() for n in reference]))
        out[setting.name] = {
            "options": setting.options,
            "all_parameters": flat,
            "by_layer_type": {t: {"min": min(v), "mean": statistics.fmean(v), "count": len(v)}
                              for t, v in by_type.items()},
            "per_parameter": per_parameter,
        }
        console.print(f"  {setting.name}: cosine over all parameters {flat:.5f}")
    return out


# ---------------------------------------------------------------------------------------
# 2. short fine-tune


def fine_tunes(example: Any, dataset: Any, tokenizer: Any, rows: list[Setting], steps: int, batch_size: int,
               seq_len: int, lr: float, seeds: int) -> dict[str, Any]:
    """``examples/finetune_minilm.py``'s run (fresh model, AdamW, held-out evaluation) per setting
    and seed.

    Why several seeds: a different dropout stream alone moves the held-out loss by several
    percent, so one run per setting cannot tell a real loss gap from that noise.  Each seed sets
    the head's initialisation and the dropout stream; every setting runs every seed, and the
    ratio to exact is taken per seed (paired: same head, same first masks) and then averaged.
    """
    batches = example.training_batches(dataset, tokenizer, batch_size, seq_len, steps)
    held_out = example.held_out_batches(dataset, tokenizer, batch_size, seq_len)
    runs: list[tuple[str, dict[str, Any] | None]] = [("torch.compile", None), ("exact", {"preset": "exact"})]
    runs += [(s.name, s.options) for s in rows]
    per_seed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for seed in range(seeds):
        for name, options in runs:
            if options is None:
                def compile_model(model: nn.Module) -> nn.Module:
                    return torch.compile(model)
            else:
                def compile_model(model: nn.Module, options: dict[str, Any] = options) -> nn.Module:
                    return torch.compile(model, backend=fxshear.backend(**options))
            result = example.run(f"{name} (seed {seed})", compile_model, batches, held_out, lr, seed=seed)
            per_seed[name].append({
                "seed": seed,
                "losses": result.losses,
                "final_train_loss": result.final_train_loss,
                "held_out_loss": result.held_out_loss,
                "held_out_accuracy": result.held_out_accuracy,
                "activation_mib": result.activation_mib,
            })
    out: dict[str, Any] = {}
    exact = per_seed["exact"]
    for name, options in runs:
        results = per_seed[name]
        held_ratios = [r["held_out_loss"] / e["held_out_loss"] for r, e in zip(results, exact)]
        train_ratios = [r["final_train_loss"] / e["final_train_loss"] for r, e in zip(results, exact)]
        out[name] = {
            "options": options,
            "seeds": results,
            "losses": results[0]["losses"],  # seed 0's curve
            "final_train_loss": statistics.fmean(r["final_train_loss"] for r in results),
            "held_out_loss": statistics.fmean(r["held_out_loss"] for r in results),
            "held_out_loss_sd": statistics.stdev(r["held_out_loss"] for r in results) if seeds > 1 else 0.0,
            "held_out_accuracy": statistics.fmean(r["held_out_accuracy"] for r in results),
            "activation_mib": results[0]["activation_mib"],
            "final_loss_vs_exact": statistics.fmean(train_ratios),
            "held_out_loss_vs_exact": statistics.fmean(held_ratios),
            "held_out_loss_vs_exact_per_seed": held_ratios,
        }
    return out


# ---------------------------------------------------------------------------------------
# report


def markdown(results: dict[str, Any]) -> str:
    grads, tune = results["gradients"], results["fine_tune"]
    seeds = results.get("seeds", 1)
    machine = results["machine"]
    lines = [
        "# Pruning fidelity: gradients and a short fine-tune against exact backprop",
        "",
        f"Machine: {machine['processor']} ({machine.get('cpu_capability', '?')}), {machine['cpu_count']} cores, "
        f"torch {machine['torch']}, "
        f"fxshear {machine['fxshear']} at {machine['git_commit']}, {machine['date']}.",
        f"Command: `{results['command']}` ({results['wall_s']:.0f} s).",
        "",
        f"## Gradient cosine to exact, per layer type (min / mean over layers)",
        "",
        f"all-MiniLM-L6-v2, one batch of {results['batch']} docstrings at seq {results['seq']}, "
        "dropout on with the same masks in every row (drawn as eager does).",
        "",
    ]
    types = [label for label, _ in LAYER_TYPES if any(label in g["by_layer_type"] for g in grads.values())]
    lines.append("| layer type | " + " | ".join(grads) + " |")
    lines.append("|---|" + "---:|" * len(grads))
    for t in types:
        cells = []
        for g in grads.values():
            stats = g["by_layer_type"].get(t)
            cells.append("—" if stats is None else f"{stats['min']:.4f} / {stats['mean']:.4f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **all parameters, one vector** | " + " | ".join(f"**{g['all_parameters']:.4f}**" for g in grads.values()) + " |")
    lines += [
        "",
        f"## Fine-tune: {results['steps']} AdamW steps (lr {results['lr']:g}), batch {results['batch']}, "
        f"seq {results['fine_tune_seq']}, same batches and seed",
        "",
        f"{seeds} seed{'s' if seeds > 1 else ''} per run (head initialisation and dropout stream; same "
        "data order).  train loss = mean of the last 5 steps; losses and accuracy are means over "
        "the seeds, held-out ± its standard deviation across seeds; 'vs exact' is the per-seed "
        "ratio to exact with the same seed, averaged (per seed in the last column).  torch.compile "
        "differs from exact only by its dropout masks: its ratio is the noise floor of these "
        "numbers.  Step times are not reported here (other jobs may share the machine); see "
        "saved_memory.md.",
        "",
        "| run | train loss | vs exact | held-out loss | vs exact | held-out accuracy | saved MiB/step | held-out vs exact per seed |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in tune.items():
        per_seed = ", ".join(f"{x:.3f}" for x in r.get("held_out_loss_vs_exact_per_seed", [r["held_out_loss_vs_exact"]]))
        lines.append(f"| {name} | {r['final_train_loss']:.4f} | {r['final_loss_vs_exact']:.3f}× | "
                     f"{r['held_out_loss']:.4f} ± {r.get('held_out_loss_sd', 0.0):.4f} | "
                     f"{r['held_out_loss_vs_exact']:.3f}× | "
                     f"{r['held_out_accuracy']:.1%} | {r['activation_mib']:.1f} | {per_seed} |")
    every = max(1, results["steps"] // 10)
    lines += ["", "Training loss every %d steps (seed 0):" % every, "",
              "| step | " + " | ".join(tune) + " |", "|---:|" + "---:|" * len(tune)]
    for step in range(0, results["steps"], every):
        lines.append(f"| {step + 1} | " + " | ".join(f"{r['losses'][step]:.4f}" for r in tune.values()) + " |")
    return "\n".join(lines) + "\n"


def rich_table(results: dict[str, Any]) -> Table:
    table = Table(title="fine-tune against exact")
    for column in ("run", "train loss", "vs exact", "held-out loss", "held-out acc"):
        table.add_column(column, justify="right")
    for name, r in results["fine_tune"].items():
        table.add_row(name, f"{r['final_train_loss']:.4f}", f"{r['final_loss_vs_exact']:.3f}x",
                      f"{r['held_out_loss']:.4f}", f"{r['held_out_accuracy']:.1%}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only rewrite the Markdown table of an earlier run's JSON")
    parser.add_argument("--steps", type=int, default=100, help="fine-tune steps per run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the gradient batch")
    parser.add_argument("--fine-tune-seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--keep-ratios", default="0.2,0.1")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tunes per setting (head init + dropout stream)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 6 steps, batch 4, seq 32, output in /tmp")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.render is not None:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    if args.quick:
        args.steps, args.batch, args.seq, args.fine_tune_seq = 6, 4, 32, 32
        args.keep_ratios, args.seeds = "0.1", 1
    out_dir = args.out or (Path("/tmp/fxshear-fidelity-quick") if args.quick else DEFAULT_OUT)
    keep_ratios = [float(r) for r in args.keep_ratios.split(",")]
    rows = settings(keep_ratios)

    start = time.perf_counter()
    example = finetune_minilm
    dataset = load_docstring_dataset(num_classes=example.NUM_CLASSES, seed=SEED)
    tokenizer = load_minilm_tokenizer()
    (batch,) = example.training_batches(dataset, tokenizer, args.batch, args.seq, 1)
    console.print("[bold]1. gradient cosine to exact[/bold]")
    grads = gradient_fidelity(rows, batch)
    console.print("[bold]2. fine-tune against exact[/bold]")
    tune = fine_tunes(example, dataset, tokenizer, [r for r in rows if r.name != "2-bit GELU only"],
                      args.steps, args.batch, args.fine_tune_seq, args.lr, args.seeds)
    results = {
        "machine": machine_info(),
        "command": "python benchmarks/prune_fidelity.py" + (
            " --quick" if args.quick else f" --steps {args.steps} --seeds {args.seeds} --keep-ratios {args.keep_ratios}"),
        "steps": args.steps, "seeds": args.seeds, "batch": args.batch, "seq": args.seq, "fine_tune_seq": args.fine_tune_seq,
        "lr": args.lr, "gradients": grads, "fine_tune": tune,
        "wall_s": time.perf_counter() - start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prune_fidelity.json").write_text(json.dumps(results, indent=1))
    (out_dir / "prune_fidelity.md").write_text(markdown(results))
    console.print(rich_table(results))
    console.print(f"wrote {out_dir / 'prune_fidelity.json'} and {out_dir / 'prune_fidelity.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
