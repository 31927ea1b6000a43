"""One prepared run that proves fxshear on a CUDA GPU: ``make gpu-check``.

    python benchmarks/gpu_check.py [--out DIR] [--dry-run] [--only SECTION ...]

A GPU machine here is lent for about 15 minutes per issue, starts bare and has no network, so
this script is ready before the machine is and uses only what it has (Python 3.12, torch 2.11,
Triton 3.6, transformers 5.x): nothing is installed.  Sections, in order, each under its own
time limit (8 minutes in all, compiles included):

1. ``kernels``: every Triton kernel against its torch reference, fp32/fp16/bf16, at MiniLM and
   8B-LLaMA sizes (``benchmarks/gpucheck/kernels.py``);
2. ``end_to_end``: the backend on MiniLM and the LLaMA-style model in bf16, every preset:
   gradients against eager, ledger against the run-time count, peak memory, step time against
   torch.compile and Inductor's memory budget (``benchmarks/gpucheck/end_to_end.py``);
3. ``freezing``: ``@fxshear.train_step`` at sparsity 0.5 against full fine-tuning
   (``benchmarks/gpucheck/freezing.py``).

A failing check is recorded and the next runs; a section out of time skips the rest of its
checks; ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` are rewritten after every
check.  Without CUDA it says so and exits 0.  MiniLM's real weights load from
``$FXSHEAR_MINILM_DIR`` (``make gpu-carry`` writes a bf16 copy to ``.gpu-carry/``); without
them the check uses MiniLM's architecture with random weights and says so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.gpucheck import end_to_end, freezing, kernels  # noqa: E402
from benchmarks.gpucheck.runner import Context, Report, Section, run_sections  # noqa: E402
from benchmarks.saved_memory import git_commit  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "gpu"
#: The whole run must fit in 8 minutes on the device; the limits leave a minute for start-up.
SECTIONS = [
    Section("kernels", "Every Triton kernel against its torch reference (fp32, fp16, bf16; MiniLM and "
            "8B-LLaMA sizes).", 100.0, kernels.build),
    Section("end_to_end", "The backend on MiniLM and the LLaMA-style model in bf16, dropout off: gradients "
            "against eager, ledger against the run-time count, peak memory, interleaved step times.",
            260.0, end_to_end.build),
    Section("freezing", "Per-step freezing (bandit, sparsity 0.5) against full fine-tuning, LLaMA-style "
            "model, bf16.", 80.0, freezing.build),
]


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "commit": git_commit() or os.environ.get("FXSHEAR_COMMIT", "unknown"), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["mode"] = "CPU self-test (TRITON_INTERPRET=1, small sizes)"
    env["minilm_weights"] = "real (bf16 copy)" if os.environ.get("FXSHEAR_MINILM_DIR") else "package or random"
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu_check.json/.md")
    parser.add_argument("--dry-run", action="store_true", help="list the sections and checks, run nothing")
    parser.add_argument("--only", action="append", choices=[s.name for s in SECTIONS], help="run only these")
    parser.add_argument("--cpu-selftest", action="store_true",
                        help="run every section on the CPU at tiny sizes (needs TRITON_INTERPRET=1): "
                             "checks this script, not the GPU")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time limit")
    return parser.parse_args(argv)


def selected(args: argparse.Namespace) -> list[Section]:
    chosen = [s for s in SECTIONS if not args.only or s.name in args.only]
    return [Section(s.name, s.description, s.budget_s * args.time_scale, s.build) for s in chosen]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = selected(args)
    if args.dry_run:
        ctx = Context(device="cuda", small=False, out=args.out)
        total = 0.0
        for section in sections:
            total += section.budget_s
            print(f"{section.name} (time limit {section.budget_s:.0f} s): {section.description}")
            try:
                for check in section.build(ctx):
                    print(f"  - {check.name}")
            except Exception as error:  # noqa: BLE001 - listing only
                print(f"  (cannot list its checks here: {type(error).__name__}: {error})")
        print(f"time limits add up to {total:.0f} s; report in {args.out}")
        return 0
    import torch

    if args.cpu_selftest:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu-selftest needs TRITON_INTERPRET=1 (the Triton kernels run interpreted on the CPU)")
            return 2
        device, small = "cpu", True
    elif not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; skipped (use --dry-run to list the checks)")
        return 0
    else:
        device, small = "cuda", False
    ctx = Context(device=device, small=small, out=args.out)
    report = Report(environment(device))
    run_sections(sections, ctx, report)
    counts = {s: sum(r.status == s for r in report.rows) for s in ("ok", "failed", "error", "timeout", "skipped")}
    print("gpu-check: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; report in {args.out}")
    for row in report.failed:
        print(f"  {row.status}: {row.section} / {row.check}: {row.error or row.fields}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
