"""Block-selective fine-tuning with token dropping (BSR) under torch.compile: saved bytes and step time.

    python benchmarks/block_selective.py [--quick] [--steps N] [--models vit,minilm] [--out DIR]

Models: a ViT-B/16 config (random weights, 224² images, batch 8, 12 blocks of 768, dropout 0 as
ViT's config has it) and all-MiniLM-L6-v2 (real weights, CLS pooling, batch 16, seq 128, dropout
0.1).  Rows, each compiled and timed in one process, interleaved (``benchmarks/saved_memory.py``'s
runner), saved bytes counted at run time (``fxshear.measure_saved_bytes``):

- full fine-tuning under torch.compile, under Inductor with ``activation_memory_budget=0.5``, and
  under fxshear ``exact``;
- the same trained blocks as BSR, without dropping (block selection alone);
- BSR at the published settings (ViT-B: train blocks 3, 7, 11 with the final norm and head, drop
  at 3, 6, 9, keep rate 0.5, fused; MiniLM's 6 blocks: the same rule halved, train 1, 3, 5, drop
  at 1, 3, 4), under torch.compile, fxshear ``exact`` and fxshear ``aggressive``.

The Markdown table splits each gain (bytes and time against full fine-tuning under
torch.compile) into the part block selection gives and the part token dropping adds.
Writes ``block_selective.json`` and ``block_selective.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

import fxshear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saved_memory import MIB, SEED, BenchConfig, ModelSpec, _inductor, machine_info, run_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "block_selective"
console = Console(width=160)

#: BSR's published ViT-B settings, and the same rule on MiniLM's 6 blocks (index // 2)
SETTINGS = {"vit": dict(train_blocks=[3, 7, 11], drop_at=[3, 6, 9]),
            "minilm": dict(train_blocks=[1, 3, 5], drop_at=[1, 3, 4])}
QUICK_SETTINGS = {"vit": dict(train_blocks=[1, 3], drop_at=[1, 2]), "minilm": SETTINGS["minilm"]}


@dataclass(frozen=True)
class Spec(ModelSpec):
    """``vit`` here is ViT-B/16 (``--quick``: 4 blocks of 192 on 64² images)."""

    quick: bool = False

    def build(self):
        from fxshear.zoo.models import build_model
        if self.name == "minilm":
            return build_model("minilm", seed=SEED, dropout=True, pooling="cls")
        return vit_base(self.quick)

    @property
    def label(self) -> str:
        if self.name == "minilm":
            return f"MiniLM (real weights, CLS pooling), batch {self.batch}, seq {self.seq}, fp32, dropout 0.1"
        size = "ViT (quick: 4x192, 64²)" if self.quick else "ViT-B/16 config (random weights), 224²"
        return f"{size}, batch {self.batch}, fp32, dropout off"


def vit_base(quick: bool):
    """ViT-B/16 (12 x 768, 12 heads, MLP 3072) with random weights, 10 classes, dropout 0."""
    from transformers import ViTConfig, ViTForImageClassification

    from fxshear.zoo.models import ExampleModel, _hf_output_loss, _seeded_generator

    dims = (dict(image_size=64, patch_size=16, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                 intermediate_size=768) if quick else
            dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072))
    config = ViTConfig(**dims, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       problem_type="single_label_classification", attn_implementation="eager")
    torch.manual_seed(SEED)
    model = ViTForImageClassification(config).train()

    def make_batch(batch_size: int, seq_len: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = _seeded_generator(seed)
        size = config.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
                "labels": torch.randint(0, 10, (batch_size,), generator=generator)}

    return ExampleModel("vit", model, make_batch, _hf_output_loss, "ViT-B/16 config")


def _selective(options: dict[str, Any], backend: str | None, **overrides: Any):
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        fxshear.block_selective(model, **options, **overrides)
        if backend is None:
            return _inductor(model)
        return torch.compile(model, backend=fxshear.backend(preset=backend))
    return wrap


def _full(backend: str):
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(model, backend=fxshear.backend(preset=backend))
    return wrap


def configs(options: dict[str, Any]) -> list[BenchConfig]:
    blocks_only = dict(train_blocks=options["train_blocks"])
    return [
        BenchConfig("full FT, torch.compile", _inductor),
        BenchConfig("full FT, torch.compile budget=0.5", _inductor, functorch_budget=0.5),
        BenchConfig("full FT, fxshear exact", _full("exact"), uses_fxshear=True),
        BenchConfig("blocks only, torch.compile", _selective(blocks_only, None)),
        BenchConfig("blocks only, fxshear exact", _selective(blocks_only, "exact"), uses_fxshear=True),
        BenchConfig("BSR, torch.compile", _selective(options, None, keep_rate=0.5)),
        BenchConfig("BSR, fxshear exact", _selective(options, "exact", keep_rate=0.5), uses_fxshear=True),
        BenchConfig("BSR, fxshear aggressive", _selective(options, "aggressive", keep_rate=0.5), uses_fxshear=True),
    ]


def split_of_gains(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Against full FT under torch.compile: what block selection alone removes, what token
    dropping removes on top (both under torch.compile), as fractions of full FT's."""
    by = {r["config"]: r for r in rows if not r.get("error")}
    full, blocks, bsr = (by.get(k) for k in ("full FT, torch.compile", "blocks only, torch.compile",
                                             "BSR, torch.compile"))
    if not (full and blocks and bsr):
        return []
    out = []
    for label, key in (("saved bytes", "saved_activation_bytes"), ("step time", "step_s_median")):
        f, b, s = full[key], blocks[key], bsr[key]
        out.append({"measure": label, "full": f, "blocks_only": b, "bsr": s,
                    "selection_removes": (f - b) / f, "dropping_removes": (b - s) / f, "bsr_ratio": s / f})
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Block-selective fine-tuning with token dropping (BSR) under torch.compile", "",
             f"Machine: {results['machine']['processor']} ({results['machine']['cpu_count']} cores), "
             f"torch {results['machine']['torch']}; commit {results['machine']['git_commit']}; "
             f"wall time {results['wall_s']:.0f} s.", "",
             f"Reproduce: `{results['command']}`.", ""]
    for block in results["models"].values():
        lines += [f"## {block['label']}", "", f"BSR settings: {block['settings']}, keep rate 0.5, fused.", "",
                  "| row | saved activations (MiB, run time) | vs full FT (torch.compile) | step time (s) | "
                  "vs full FT (torch.compile) | compile (s) | first loss |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        rows = block["rows"]
        full = next(r for r in rows if r["config"] == "full FT, torch.compile")
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['config']} | error: {r['error'][:120]} | | | | | |")
                continue
            lines.append(f"| {r['config']} | {r['saved_activation_bytes'] / MIB:.1f} | "
                         f"{r['saved_activation_bytes'] / full['saved_activation_bytes']:.3f}× | "
                         f"{r['step_s_median']:.3f} | {r['step_s_median'] / full['step_s_median']:.2f}× | "
                         f"{r['compile_s']:.0f} | {r['first_loss']:.4f} |")
        if block["split"]:
            lines += ["", "Split of the gain (torch.compile rows, fractions of full fine-tuning's):", "",
                      "| measure | block selection removes | token dropping removes | BSR / full FT |",
                      "| --- | ---: | ---: | ---: |"]
            for s in block["split"]:
                lines.append(f"| {s['measure']} | {s['selection_removes']:.1%} | {s['dropping_removes']:.1%} | "
                             f"{s['bsr_ratio']:.3f}× |")
        lines.append("")
    lines += ["Notes:", "",
              "- step = forward + backward, median of the timed steps, rows interleaved one step each in turn; "
              "compile = the first step.",
              "- saved activations: unique storages autograd kept for backward in one step "
              "(parameters and inputs excluded).",
              "- targets (issue 19): BSR's step time and saved bytes each at most 0.5x full fine-tuning's under "
              "torch.compile.",
              "- the torch.compile budget=0.5 row is Inductor's own recompute knob on full fine-tuning, for scale."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small ViT, MiniLM b2 s32, 2 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--models", default="vit,minilm")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 3)
    out = args.out or (Path("/tmp/fxshear-block-selective-quick") if args.quick else DEFAULT_OUT)
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    specs = {"vit": Spec("vit", "base", batch=2 if args.quick else 8, seq=0, quick=args.quick),
             "minilm": Spec("minilm", "bench", batch=2 if args.quick else 16, seq=32 if args.quick else 128)}
    names = args.models.split(",")
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 32))
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "steps": steps, "models": {},
                               "command": "python benchmarks/block_selective.py" + (" --quick" if args.quick else "")
                               + (f" --models {args.models}" if args.models != "vit,minilm" else "")}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        overall = progress.add_task("all rows", total=8 * len(names))
        for name in names:
            spec = specs[name]
            rows = [asdict(r) for r in run_model(spec, configs(settings[name]), steps, progress, overall)]
            results["models"][name] = {"label": spec.label, "settings": settings[name], "rows": rows,
                                       "split": split_of_gains(rows)}
    results["wall_s"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "block_selective.json").write_text(json.dumps(results, indent=1))
    (out / "block_selective.md").write_text(markdown(results))
    console.print(markdown(results))
    return 1 if any(r.get("error") for m in results["models"].values() for r in m["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
