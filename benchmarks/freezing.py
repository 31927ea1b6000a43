"""Per-step freezing (Sheared Backprop) with ``@fxshear.train_step``: speed, memory, loss.

    python benchmarks/freezing.py [--quick] [--out DIR] [--render JSON]

1. **Step time and saved bytes** on MiniLM (real weights, batch 16, seq 128, dropout on) and
   the LLaMA-style model (batch 8, seq 256): full fine-tuning under ``torch.compile`` (Inductor)
   and under fxshear ``exact``, and fxshear ``exact`` with the bandit at sparsity 0.25 / 0.5 /
   0.75 (one compiled graph, frozen weight-gradient matmuls skipped at run time), and the same
   with ``dropout_rng="fast"`` (Inductor's dropout random numbers, as torch.compile draws them).
   The configurations run interleaved in rounds, so machine drift hits all alike.  Every step is
   a whole training step: forward, backward, fused AdamW, ``zero_grad``.  Saved bytes: the
   run-time count of what autograd kept (``fxshear.measure_saved_bytes``) on one more step, and
   for the freezing rows also the ledger a per-mask variant (``freeze_variants``) would save for
   the last mask (traced and partitioned, not compiled).
2. **Loss curves**: MiniLM fine-tuned on the docstring task of ``fxshear.zoo.data`` (real text) for
   ``--steps`` steps with the same seed and batches: full fine-tuning, the bandit and uniform
   random freezing at sparsity 0.5; final training loss, held-out loss and accuracy.

Writes ``freezing.json``, ``freezing.md`` and ``loss_curves.svg``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import fxshear
import torch._dynamo
from fxshear.zoo.data import load_docstring_dataset
from fxshear.zoo.models import build_model, load_minilm_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_minilm  # noqa: E402  (the docstring task's batches, model and evaluation)
import freeze_minilm  # noqa: E402  (the decorated fine-tuning loop)
from saved_memory import machine_info  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "freezing"
MIB = 2**20
SEED = 0
console = Console(width=160)

MODELS = {"minilm": {"batch": 16, "seq": 128}, "llama": {"batch": 8, "seq": 256}}
SPARSITIES = (0.25, 0.5, 0.75)
ROUNDS, STEPS_PER_ROUND = 5, 5


# ---------------------------------------------------------------------------------------
# 1. step time and saved bytes


def _rows() -> list[tuple[str, dict[str, Any] | None]]:
    rows: list[tuple[str, dict[str, Any] | None]] = [("torch.compile", None), ("fxshear exact", {"freeze": None})]
    rows += [(f"exact + bandit {s}", {"freeze": "bandit", "sparsity": s}) for s in SPARSITIES]
    # Inductor's own dropout random numbers (torch.compile's, not eager's stream): the RNG draw is
    # ~16% of a MiniLM step on this CPU, a cost plain torch.compile does not pay.
    rows += [("exact fast-rng", {"freeze": None, "dropout_rng": "fast"}),
             ("exact fast-rng + bandit 0.5", {"freeze": "bandit", "sparsity": 0.5, "dropout_rng": "fast"})]
    return rows


class Runner:
    """One configuration: its own copy of the model, optimizer and (decorated) step."""

    def __init__(self, name: str, example: Any, options: dict[str, Any] | None,
                 batch: dict[str, torch.Tensor]) -> None:
        self.name, self.example, self.options, self.batch = name, example, options, batch
        self.model = copy.deepcopy(example.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=True)
        self.compiled = self.model
        self.step: Any = None
        if options is None:
            self.compiled = torch.compile(self.model)
        else:
            self.step = fxshear.train_step(self.model, self.optimizer, seed=SEED, preset="exact",
                                           **options)(self._body)
        self.run = self.step if self.step is not None else self._body
        self.seconds: list[float] = []
        self.first_step_s = float("nan")

    def _body(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.example.loss(self.compiled, b)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def warm_up(self, steps: int) -> None:
        for i in range(steps):
            start = time.perf_counter()
            self.run(self.batch)
            if i == 0:
                self.first_step_s = time.perf_counter() - start
                console.print(f"  {self.name}: first step {self.first_step_s:.1f} s (compiles)")

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self.run(self.batch)
            self.seconds.append(time.perf_counter() - start)

    def result(self) -> dict[str, Any]:
        # One more step whose forward is counted (the hooks cost time, so it is not timed).
        counted = fxshear.measure_saved_bytes(self.example.loss, self.compiled, self.batch)
        counted.output.backward()
        self.optimizer.zero_grad(set_to_none=True)
        row: dict[str, Any] = {
            "name": self.name, "options": self.options,
            "step_s_median": statistics.median(self.seconds), "step_s_all": self.seconds,
            "first_step_s": self.first_step_s, "saved_mib_runtime": counted.activation_bytes / MIB,
        }
        step = self.step
        if step is not None:
            row["compiles"] = step.compiles
            row["dynamo_graphs"] = len(step.backend.regions)
            row["ledger_mib"] = step.saved_activation_bytes() / MIB
            row["active_fraction_mean"] = statistics.fmean(m.active_fraction for m in step.metrics)
            if step.policy is not None:
                variant = sum(ledger.activation_bytes for ledger in step.ledgers(per_mask=True))
                row["variant_ledger_mib"] = variant / MIB
        console.print(f"  {self.name}: {row['step_s_median']:.3f} s/step, saved {row['saved_mib_runtime']:.1f} MiB"
                      + (f", a per-mask variant would save {row['variant_ledger_mib']:.1f} MiB"
                         if "variant_ledger_mib" in row else ""))
        return row


def speed_and_memory(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model_name, shape in MODELS.items():
        batch_size, seq = (4, 32) if quick else (shape["batch"], shape["seq"])
        example = build_model(model_name, size="small" if quick else "bench", dropout=True)
        batch = example.make_batch(batch_size, seq)
        console.print(f"[bold]{model_name}[/bold] batch {batch_size}, seq {seq}")
        torch._dynamo.reset()
        runners = [Runner(name, example, options, batch) for name, options in _rows()]
        for runner in runners:
            runner.warm_up(2)
        # Interleaved rounds: this machine's speed drifts by 10-30% over minutes, and every
        # configuration should see the same drift.
        rounds, per_round = (2, 2) if quick else (ROUNDS, STEPS_PER_ROUND)
        for _ in range(rounds):
            for runner in runners:
                runner.timed(per_round)
        rows = [runner.result() for runner in runners]
        base = rows[0]
        for row in rows:
            row["step_vs_torch_compile"] = row["step_s_median"] / base["step_s_median"]
            row["saved_vs_torch_compile"] = row["saved_mib_runtime"] / base["saved_mib_runtime"]
        out[model_name] = {"batch": batch_size, "seq": seq, "rows": rows}
    return out


# ---------------------------------------------------------------------------------------
# 2. loss curves


def loss_curves(steps: int, batch_size: int, seq_len: int, lr: float) -> dict[str, Any]:
    example_module = finetune_minilm
    dataset = load_docstring_dataset(num_classes=example_module.NUM_CLASSES, seed=SEED)
    tokenizer = load_minilm_tokenizer()
    batches = example_module.training_batches(dataset, tokenizer, batch_size, seq_len, steps)
    held_out = example_module.held_out_batches(dataset, tokenizer, batch_size, seq_len)
    runs = {"full": {"freeze": None}, "bandit 0.5": {"freeze": "bandit", "sparsity": 0.5},
            "random 0.5": {"freeze": "random", "sparsity": 0.5}}
    out: dict[str, Any] = {}
    for name, options in runs.items():
        torch._dynamo.reset()
        step, held_loss, held_acc = freeze_minilm.fine_tune(batches, held_out, lr=lr, preset="exact", **options)
        losses = [m.loss for m in step.metrics]
        out[name] = {
            "options": options, "losses": losses,
            "final_train_loss": statistics.fmean(losses[-5:]),
            "held_out_loss": held_loss, "held_out_accuracy": held_acc,
            "step_s_median": statistics.median(m.seconds for m in step.metrics[1:]),
            "stale_arms": step.stale_arms(),
        }
        console.print(f"  {name}: final train loss {out[name]['final_train_loss']:.3f}, "
                      f"held-out {held_loss:.3f} / {held_acc:.1%}")
    for row in out.values():
        row["final_loss_vs_full"] = row["final_train_loss"] / out["full"]["final_train_loss"]
        row["held_out_loss_vs_full"] = row["held_out_loss"] / out["full"]["held_out_loss"]
    return out


# ---------------------------------------------------------------------------------------
# report


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Per-step freezing: step time, saved bytes, loss",
        "",
        f"Machine: {m.get('processor', '?')} ({m.get('cpu_count', '?')} CPUs, {m.get('cpu_capability', '?')}), "
        f"torch {m.get('torch')}, CPU; commit {m.get('git_commit')}, {m.get('date')}. "
        f"Command: `{results['command']}` ({results.get('wall_s', 0) / 60:.0f} min).",
        "",
        "Whole training steps (forward, backward, fused AdamW, zero_grad), fp32, dropout 0.1; step = "
        "median of 25 timed steps after 2 warm-up steps, the configurations interleaved in rounds of 5 steps "
        "so that all see the same machine drift. *saved* is the run-time count of what autograd kept for "
        "backward; *per-mask variant* is what the graph for the last mask saves when "
        "`freeze_variants` compiles one (traced and partitioned, not compiled). *compiles*: Dynamo graphs "
        "plus mask variants over the whole run (one graph serves every mask).",
        "",
    ]
    for model_name, block in results["speed"].items():
        lines += [f"## {model_name}, batch {block['batch']}, seq {block['seq']}", "",
                  "| run | step s | vs torch.compile | saved MiB | vs torch.compile | per-mask variant MiB "
                  "| active | compiles |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in block["rows"]:
            variant = f"{r['variant_ledger_mib']:.1f}" if "variant_ledger_mib" in r else ""
            active = f"{r['active_fraction_mean']:.2f}" if "active_fraction_mean" in r else "1.00"
            lines.append(f"| {r['name']} | {r['step_s_median']:.3f} | {r['step_vs_torch_compile']:.3f} | "
                         f"{r['saved_mib_runtime']:.1f} | {r['saved_vs_torch_compile']:.3f} | {variant} | {active} | "
                         f"{r.get('compiles', 1)} |")
        lines.append("")
    curves = results["loss"]
    lines += [f"## MiniLM fine-tune on the docstring task: {results['loss_steps']} steps, batch "
              f"{results['loss_batch']}, seq {results['loss_seq']}, lr {results['loss_lr']}", "",
              "| run | final train loss | vs full | held-out loss | vs full | held-out accuracy | step s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in curves.items():
        lines.append(f"| {name} | {r['final_train_loss']:.4f} | {r['final_loss_vs_full']:.3f} | "
                     f"{r['held_out_loss']:.4f} | {r['held_out_loss_vs_full']:.3f} | {r['held_out_accuracy']:.1%} | "
                     f"{r['step_s_median']:.3f} |")
    lines += ["", "Loss curves: `loss_curves.svg` (training loss per step, 5-step moving mean).", ""]
    return "\n".join(lines)


def svg_curves(curves: dict[str, Any], width: int = 640, height: int = 360) -> str:
    """Training loss per step (5-step moving mean) of each run, as a small SVG line chart."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    smoothed = {}
    for name, r in curves.items():
        losses = r["losses"]
        smoothed[name] = [statistics.fmean(losses[max(0, i - 4): i + 1]) for i in range(len(losses))]
    top = max(max(v) for v in smoothed.values())
    n = max(len(v) for v in smoothed.values())
    pad = 40

    def xy(i: int, y: float) -> str:
        return f"{pad + (width - 2 * pad) * i / max(n - 1, 1):.1f},{height - pad - (height - 2 * pad) * y / top:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step (1..{n})</text>',
             f'<text x="4" y="{pad - 10}">training loss (0..{top:.2f})</text>']
    for k, (name, values) in enumerate(smoothed.items()):
        points = " ".join(xy(i, v) for i, v in enumerate(values))
        colour = colours[k % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{width - pad - 100}" y="{pad + 16 * k}" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def rich_table(results: dict[str, Any]) -> Table:
    table = Table(title="per-step freezing (step time and saved bytes vs torch.compile)")
    for column in ("model", "run", "step s", "x tc", "saved MiB", "x tc", "compiles"):
        table.add_column(column, justify="right")
    for model_name, block in results["speed"].items():
        for r in block["rows"]:
            table.add_row(model_name, r["name"], f"{r['step_s_median']:.3f}", f"{r['step_vs_torch_compile']:.3f}",
                          f"{r['saved_mib_runtime']:.1f}", f"{r['saved_vs_torch_compile']:.3f}",
                          str(r.get("compiles", 1)))
    return table


def main(argv: list[str] | None = None) -> int:
    torch._dynamo.config.recompile_limit = 32  # one model class, several compiled copies side by side
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only rewrite the Markdown and SVG from a results JSON")
    parser.add_argument("--steps", type=int, default=200, help="fine-tune steps per loss-curve run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64, help="sequence length of the fine-tune")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--quick", action="store_true", help="smoke test: small models, 6 steps, output in /tmp")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(results))
        (args.render.parent / "loss_curves.svg").write_text(svg_curves(results["loss"]))
        return 0
    if args.quick:
        args.steps, args.batch, args.seq = 6, 4, 32
    out_dir = args.out or (Path("/tmp/fxshear-freezing-quick") if args.quick else DEFAULT_OUT)
    start = time.perf_counter()
    console.print("[bold]1. step time and saved bytes[/bold]")
    speed = speed_and_memory(args.quick)
    console.print("[bold]2. loss curves[/bold]")
    curves = loss_curves(args.steps, args.batch, args.seq, args.lr)
    results = {
        "machine": machine_info(),
        "command": "python benchmarks/freezing.py" + (" --quick" if args.quick else f" --steps {args.steps}"),
        "speed": speed, "loss": curves, "loss_steps": args.steps, "loss_batch": args.batch,
        "loss_seq": args.seq, "loss_lr": args.lr, "wall_s": time.perf_counter() - start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "freezing.json").write_text(json.dumps(results, indent=1))
    (out_dir / "freezing.md").write_text(markdown(results))
    (out_dir / "loss_curves.svg").write_text(svg_curves(curves))
    console.print(rich_table(results))
    console.print(f"wrote {out_dir}/freezing.json, freezing.md and loss_curves.svg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
