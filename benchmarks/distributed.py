"""DDP and FSDP2 under torch.compile and fxshear, 2 ranks on this machine: per-rank saved bytes and step time.

    python benchmarks/distributed.py [--steps 4] [--batch 8] [--seq 128] [--out DIR]

MiniLM (real weights, dropout 0.1), batch 8 x seq 128 per rank, 2 processes joined by ``gloo``
(``nccl`` with two GPUs), one intra-op thread each.  Rows: DDP (``torch.compile(DDP(model))``,
default 25 MiB buckets) and FSDP2 (``fully_shard`` per block and the root, each block compiled),
each under plain torch.compile (Inductor) and fxshear ``exact`` and ``aggressive``.  Per rank:
the saved activation bytes of the last step (run-time count, ``fxshear.measure_saved_bytes``,
which counts FSDP2's all-gathered weights as parameters), fxshear's ledger total, and the
median step time (forward + backward + SGD step) of the timed steps.  Both ranks time the same
steps; the table gives rank 0's time and the larger of the two ranks' bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from distributed_runner import backend_for_this_machine, run_ranks  # noqa: E402
from saved_memory import MIB, LossOf, machine_info  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "distributed"
ROWS = [(engine, backend) for engine in ("DDP", "FSDP2") for backend in ("torch.compile", "fxshear exact",
                                                                            "fxshear aggressive")]


def rank_main(rank: int, world: int, steps: int, batch: int, seq: int) -> list[dict[str, Any]]:
    import fxshear
    from fxshear.zoo.models import build_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch._inductor.compile_fx import compile_fx

    rows = []
    for engine, backend_name in ROWS:
        torch._dynamo.reset()
        example = build_model("minilm", dropout=True, seed=0)
        model = example.model
        backend: Any = ((lambda gm, inputs: compile_fx(gm, inputs)) if backend_name == "torch.compile"
                        else fxshear.backend(preset=backend_name.split()[1]))
        if engine == "DDP":
            runner: torch.nn.Module = torch.compile(DDP(model), backend=backend)
        else:
            mesh = init_device_mesh("cpu", (world,))
            for block in model.encoder.encoder.layer:
                fully_shard(block, mesh=mesh)
                block.compile(backend=backend)
            runner = fully_shard(model, mesh=mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
        loss_of = LossOf(example, runner)
        data = example.make_batch(batch * world, seq, seed=0)
        local = {k: v[rank * batch:(rank + 1) * batch] for k, v in data.items()}
        seconds, saved = [], None
        for step in range(steps + 1):
            torch.distributed.barrier()
            start = time.perf_counter()
            saved = fxshear.measure_saved_bytes(loss_of, **local)
            saved.output.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if step == 0:
                compile_s = elapsed
            else:
                seconds.append(elapsed)
        ledger = (sum(r.ledger.activation_bytes for r in backend.regions if r.has_backward)
                  if hasattr(backend, "regions") else None)
        rows.append({"engine": engine, "backend": backend_name, "saved_activation_bytes": saved.activation_bytes,
                     "ledger_activation_bytes": ledger, "step_s_median": statistics.median(seconds),
                     "step_s_all": seconds, "compile_s": compile_s,
                     "fragments": len([r for r in getattr(backend, "regions", []) if r.has_backward]) or None})
    return rows


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# DDP and FSDP2 under torch.compile and fxshear (2 ranks on one machine)", "",
             f"Machine: {m['processor']} ({m['cpu_count']} cores; each rank one thread), torch {m['torch']}, "
             f"process group {results['process_group']}; commit {m['git_commit']}; wall time {results['wall_s']:.0f} s.",
             f"MiniLM (real weights, dropout 0.1), batch {results['batch']} x seq {results['seq']} per rank, "
             f"{results['steps']} timed steps (forward + backward + SGD) after the compiling one.", "",
             f"Reproduce: `python benchmarks/distributed.py`.", "",
             "| engine | backend | saved per rank (MiB, run time) | vs torch.compile | ledger (MiB) | fragments | "
             "step (s, rank 0) | vs torch.compile | compile (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rank0, rank1 = results["ranks"]
    for a, b in zip(rank0, rank1):
        base = next(r for r in rank0 if r["engine"] == a["engine"] and r["backend"] == "torch.compile")
        base_saved = max(base["saved_activation_bytes"], next(
            r for r in rank1 if r["engine"] == a["engine"] and r["backend"] == "torch.compile")["saved_activation_bytes"])
        saved = max(a["saved_activation_bytes"], b["saved_activation_bytes"])
        ledger = "—" if a["ledger_activation_bytes"] is None else f"{a['ledger_activation_bytes'] / MIB:.1f}"
        lines.append(f"| {a['engine']} | {a['backend']} | {saved / MIB:.1f} | {saved / base_saved:.3f}× | {ledger} | "
                     f"{a['fragments'] or '—'} | {a['step_s_median']:.3f} | "
                     f"{a['step_s_median'] / base['step_s_median']:.2f}× | {a['compile_s']:.0f} |")
    lines += ["", "Notes: FSDP2 rows compile each block (the blocks share one graph, so the ledger is one block's "
              "graph, the run-time count every block's); the run-time count treats FSDP2's all-gathered weights as "
              "parameters. The dropout masks differ between Inductor's and fxshear's rows (different random "
              "streams), not their shapes.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run_ranks(rank_main, timeout_s=3000, group_timeout_s=900, steps=args.steps, batch=args.batch,
                        seq=args.seq)
    out = {"machine": machine_info(), "process_group": backend_for_this_machine(), "steps": args.steps,
           "batch": args.batch, "seq": args.seq, "wall_s": time.perf_counter() - start,
           "ranks": [r["result"] for r in results]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(out, indent=1))
    (args.out / "distributed.md").write_text(markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
