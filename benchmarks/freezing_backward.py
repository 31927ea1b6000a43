"""What freezing saves inside one compiled graph: forward+backward time per frozen fraction.

    python benchmarks/freezing_backward.py [--quick] [--out DIR]

The whole-step benchmark (``benchmarks/freezing.py``) includes the optimizer and this machine's
drift; this one isolates the part freezing changes.  One model copy is compiled plain
(``torch.compile``), one with fxshear ``exact``, one with ``exact`` and ``freezing=True``; the
last runs with 0, 25, 50, 75 and 100% of the block Linears' weights frozen (a fixed random
choice per fraction, via ``fxshear.frozen``).  Forward and backward are timed apart, every
configuration interleaved in rounds so all see the same drift; medians are reported.  Nothing
recompiles between fractions (checked).

Writes ``forward_backward.json`` and ``forward_backward.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

import fxshear
from fxshear.zoo.models import build_model
from fxshear.freezing.arms import find_arms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saved_memory import machine_info  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "freezing"
MODELS = {"minilm": (16, 128), "llama": (8, 256)}
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _timed(example: Any, compiled: Any, model: torch.nn.Module, batch: dict[str, torch.Tensor],
           frozen: list[torch.nn.Parameter]) -> tuple[float, float]:
    with fxshear.frozen(frozen):
        start = time.perf_counter()
        loss = example.loss(compiled, batch)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return middle - start, end - middle


def measure(name: str, quick: bool, rounds: int) -> dict[str, Any]:
    batch_size, seq = (4, 32) if quick else MODELS[name]
    example = build_model(name, size="small" if quick else "bench", dropout=True)
    batch = example.make_batch(batch_size, seq)
    torch._dynamo.reset()
    setups: dict[str, tuple[torch.nn.Module, Any]] = {}
    for label, backend in (("torch.compile", "inductor"), ("fxshear exact", fxshear.backend(preset="exact")),
                           ("exact, freezing", fxshear.backend(preset="exact", freezing=True))):
        model = copy.deepcopy(example.model)
        setups[label] = (model, torch.compile(model, backend=backend))
    frozen_model, frozen_compiled = setups["exact, freezing"]
    arms = [arm.parameter for arm in find_arms(frozen_model)]
    choice = random.Random(0)
    masks = {f: choice.sample(arms, round(f * len(arms))) for f in FRACTIONS}
    runs = [(label, model, compiled, []) for label, (model, compiled) in setups.items() if label != "exact, freezing"]
    runs += [(f"exact, {f:.0%} frozen", frozen_model, frozen_compiled, masks[f]) for f in FRACTIONS]
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in runs}
    for label, model, compiled, frozen in runs:  # warm-up: compiles
        _timed(example, compiled, model, batch, frozen)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(rounds):
        for label, model, compiled, frozen in runs:
            times[label].append(_timed(example, compiled, model, batch, frozen))
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    rows = []
    for label, *_ in runs:
        forward = statistics.median(t[0] for t in times[label])
        backward = statistics.median(t[1] for t in times[label])
        rows.append({"name": label, "forward_s": forward, "backward_s": backward,
                     "total_s": statistics.median(a + b for a, b in times[label])})
    base = rows[0]["total_s"]
    exact = rows[1]["total_s"]
    for row in rows:
        row["vs_torch_compile"] = row["total_s"] / base
        row["vs_exact"] = row["total_s"] / exact
    print(f"{name}: " + ", ".join(f"{r['name']} {r['total_s']:.3f} s" for r in rows), flush=True)
    return {"batch": batch_size, "seq": seq, "arms": len(arms), "rounds": rounds,
            "recompiles_while_timing": recompiled, "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# Freezing inside one compiled graph: forward + backward time", "",
             f"Machine: {m.get('processor')} ({m.get('cpu_count')} CPUs, {m.get('cpu_capability')}), torch "
             f"{m.get('torch')}, CPU; commit {m.get('git_commit')}, {m.get('date')}. Command: `{results['command']}`.",
             "", "fp32, dropout 0.1, no optimizer; medians over the rounds, configurations interleaved. The "
             "frozen rows run one compiled graph (`freezing=True`) with a fixed random share of the block "
             "Linears' weights frozen through `fxshear.frozen`; their weight-gradient matmuls are skipped.", ""]
    for name, block in results["models"].items():
        lines += [f"## {name}, batch {block['batch']}, seq {block['seq']} ({block['arms']} freezable weights, "
                  f"{block['rounds']} rounds, recompiles while timing: {block['recompiles_while_timing']})", "",
                  "| run | forward s | backward s | forward+backward s | vs torch.compile | vs exact |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in block["rows"]:
            lines.append(f"| {r['name']} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | {r['total_s']:.3f} | "
                         f"{r['vs_torch_compile']:.3f} | {r['vs_exact']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    torch._dynamo.config.recompile_limit = 32  # several compiled copies of one model class
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, 2 rounds, output in /tmp")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    out_dir = args.out or (Path("/tmp/fxshear-freezing-backward-quick") if args.quick else DEFAULT_OUT)
    start = time.perf_counter()
    models = {name: measure(name, args.quick, rounds) for name in MODELS}
    results = {"machine": machine_info(), "command": "python benchmarks/freezing_backward.py"
               + (" --quick" if args.quick else ""), "models": models, "wall_s": time.perf_counter() - start}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "forward_backward.json").write_text(json.dumps(results, indent=1))
    (out_dir / "forward_backward.md").write_text(markdown(results))
    print(f"wrote {out_dir}/forward_backward.json and forward_backward.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
