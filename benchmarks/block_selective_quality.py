"""Does block-selective fine-tuning with token dropping (BSR) learn as well as full fine-tuning?

    python benchmarks/block_selective_quality.py [--steps 80] [--seeds 0 1 2] [--sections text,vision] [--out DIR]

**Text** (the docstring task of ``examples/finetune_minilm.py``: which stdlib package wrote a
docstring; all-MiniLM-L6-v2 with its real weights, CLS pooling, a new 4-way head; batch 16, seq
64, AdamW lr 5e-5, dropout 0.1): full fine-tuning; the BSR blocks (1, 3, 5 of 6, with the head)
without dropping; BSR (drop at 1, 3, 4) at keep rates 0.7, 0.5 and 0.3.

**Vision** (``examples/block_selective_vit.py``'s task: scikit-learn's digits, 8x8 images
upscaled to 32x32, a small ViT of 6 blocks of 96 on 4x4 patches: 64 tokens and CLS): nothing
pretrained ships offline, so the ViT is first trained on the digits 0-4 (its "pretraining", the
same for every method), then fine-tuned on 5-9 with a new head by each method (AdamW lr 1e-3,
batch 32): only the relative quality of the settings is claimed.

Every method of a section sees the same batches in the same order; a seed sets the new head's
initialisation and the dropout stream.  Runs are eager (the compiled gradients equal eager's:
tests/test_selective.py).  Writes ``quality.json``, ``quality.md`` and ``quality_loss_curves.svg``
(text) / ``vision_loss_curves.svg`` (training loss per step, mean over seeds, 5-step moving mean).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fxshear

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import block_selective_vit as vision  # noqa: E402  (the digits task: splits, small ViT, training loop)
import finetune_minilm as task  # noqa: E402  (the docstring task's batches, training loop, evaluation)
from freezing import svg_curves  # noqa: E402
from reversible_quality import mean_curves, trainable_parameters as trainable  # noqa: E402
from saved_memory import git_commit, machine_info  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "block_selective"
TEXT_BLOCKS = dict(train_blocks=[1, 3, 5])
TEXT_DROP = [1, 3, 4]
VISION_BLOCKS = dict(train_blocks=[1, 3, 5])
VISION_DROP = [1, 3, 4]
KEEP_RATES = (0.7, 0.5, 0.3)


def text_methods() -> dict[str, dict[str, Any] | None]:
    """None: full fine-tuning; otherwise ``fxshear.block_selective`` options."""
    methods: dict[str, dict[str, Any] | None] = {"full FT": None, "blocks 1,3,5 (no dropping)": TEXT_BLOCKS}
    for rate in KEEP_RATES:
        methods[f"BSR keep {rate:g}"] = dict(TEXT_BLOCKS, drop_at=TEXT_DROP, keep_rate=rate)
    return methods


def vision_methods() -> dict[str, dict[str, Any] | None]:
    methods: dict[str, dict[str, Any] | None] = {"full FT": None, "blocks 1,3,5 (no dropping)": VISION_BLOCKS}
    for rate in KEEP_RATES:
        methods[f"BSR keep {rate:g}"] = dict(VISION_BLOCKS, drop_at=VISION_DROP, keep_rate=rate)
    return methods


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def sd(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    rows = []
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        acc = [r["held_out_accuracy"] for r in mine]
        loss = [r["held_out_loss"] for r in mine]
        rows.append({"method": name, "seeds": len(mine), "trainable_parameters": mine[0]["trainable_parameters"],
                     "held_out_accuracy_mean": statistics.fmean(acc), "held_out_accuracy_sd": sd(acc),
                     "held_out_loss_mean": statistics.fmean(loss), "held_out_loss_sd": sd(loss),
                     "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in mine)})
    return rows


# --- text ------------------------------------------------------------------------------------------

def text_section(steps: int, seeds: list[int], batch: int, seq: int) -> dict[str, Any]:
    from fxshear.zoo.data import load_docstring_dataset
    from fxshear.zoo.models import build_model, load_minilm_tokenizer

    dataset = load_docstring_dataset(num_classes=task.NUM_CLASSES, seed=task.SEED)
    tokenizer = load_minilm_tokenizer()
    batches = task.training_batches(dataset, tokenizer, batch, seq, steps)
    held_out = task.held_out_batches(dataset, tokenizer, batch, seq)
    runs = []
    for seed in seeds:
        for name, options in text_methods().items():
            example = build_model("minilm", num_labels=task.NUM_CLASSES, seed=seed, pooling="cls")
            if options is not None:
                fxshear.block_selective(example.model, **options)
            start = time.perf_counter()
            result = task.train(f"{name} seed {seed}", example, lambda m: m, batches, 5e-5, seed)
            seconds = time.perf_counter() - start
            loss, accuracy = task.evaluate(example.model, held_out)
            runs.append({"method": name, "seed": seed, "losses": result.losses, "held_out_loss": loss,
                         "held_out_accuracy": accuracy, "trainable_parameters": trainable(example.model),
                         "train_seconds": seconds})
            task.console.print(f"  text / {name} seed {seed}: held-out accuracy {accuracy:.1%}, loss {loss:.3f}")
    return {"settings": {"steps": steps, "batch": batch, "seq": seq, "seeds": seeds, "lr": 5e-5,
                         "held_out_examples": len(dataset.held_out), "drop_at": TEXT_DROP, **TEXT_BLOCKS},
            "summary": summarise(runs), "runs": runs}


# --- vision ----------------------------------------------------------------------------------------

def vision_section(steps: int, seeds: list[int], pretrain_steps: int = 400) -> dict[str, Any]:
    splits = vision.digit_splits()
    start = time.perf_counter()
    base = vision.pretrained(splits, pretrain_steps)
    _, pre_acc = vision.evaluate(base, splits["pretrain"])
    task.console.print(f"  vision: pretrained on digits 0-4 in {time.perf_counter() - start:.0f} s "
                       f"(train accuracy {pre_acc:.1%})")
    runs = []
    for seed in seeds:
        for name, options in vision_methods().items():
            model = vision.with_new_head(base, seed)
            if options is not None:
                fxshear.block_selective(model, **options)
            start = time.perf_counter()
            record = vision.train(model, vision.LossOf(model), splits["train"], steps, 32, 1e-3, seed)
            seconds = time.perf_counter() - start
            loss, accuracy = vision.evaluate(model, splits["held_out"])
            runs.append({"method": name, "seed": seed, "losses": record["losses"], "held_out_loss": loss,
                         "held_out_accuracy": accuracy, "trainable_parameters": trainable(model),
                         "train_seconds": seconds})
            task.console.print(f"  vision / {name} seed {seed}: held-out accuracy {accuracy:.1%}, loss {loss:.3f}")
    return {"settings": {"steps": steps, "batch": 32, "seeds": seeds, "lr": 1e-3, "pretrain_steps": pretrain_steps,
                         "pretrain_train_accuracy": pre_acc, "held_out_examples": len(splits["held_out"][1]),
                         "tokens": 1 + (32 // 4) ** 2, "drop_at": VISION_DROP, **VISION_BLOCKS},
            "summary": summarise(runs), "runs": runs}


# --- output ----------------------------------------------------------------------------------------

def _table(section: dict[str, Any]) -> list[str]:
    lines = ["| method | trainable params | held-out accuracy | held-out loss | train s |", "|---|---:|---:|---:|---:|"]
    for r in section["summary"]:
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | "
                     f"{r['held_out_accuracy_mean']:.1%} ± {r['held_out_accuracy_sd']:.1%} | "
                     f"{r['held_out_loss_mean']:.3f} ± {r['held_out_loss_sd']:.3f} | {r['train_seconds_mean']:.0f} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# Block-selective fine-tuning (BSR): quality", "",
             f"Machine: {m['processor']}, torch {m['torch']}; commit {results['commit']}. Eager runs; "
             "mean ± sample standard deviation over the seeds.", ""]
    if "text" in results:
        s = results["text"]["settings"]
        lines += ["## Text: the docstring task (MiniLM, real weights, CLS pooling)", "",
                  f"{s['steps']} steps of batch {s['batch']}, seq {s['seq']}, AdamW lr {s['lr']:g}, dropout 0.1; "
                  f"seeds {', '.join(map(str, s['seeds']))}; {s['held_out_examples']} held-out docstrings "
                  f"(4 classes, chance 25%). BSR: blocks {s['train_blocks']} and the head train, tokens dropped at "
                  f"{s['drop_at']}, fused. Curves: `quality_loss_curves.svg`.", "", *_table(results["text"]), ""]
    if "vision" in results:
        s = results["vision"]["settings"]
        lines += ["## Vision: scikit-learn digits (small ViT, relative quality only)", "",
                  f"ViT 6x96 on 32x32 upscaled digits ({s['tokens']} tokens), first trained {s['pretrain_steps']} "
                  f"steps on digits 0-4 (train accuracy {s['pretrain_train_accuracy']:.1%}), then fine-tuned "
                  f"{s['steps']} steps of batch {s['batch']} on 5-9 with a new head, AdamW lr {s['lr']:g}, "
                  f"dropout 0.1; {s['held_out_examples']} held-out images of 5-9 (chance 20%). "
                  f"BSR: blocks {s['train_blocks']}, drop at {s['drop_at']}. Curves: `vision_loss_curves.svg`.", "",
                  *_table(results["vision"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="text fine-tuning steps")
    parser.add_argument("--vision-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sections", default="text,vision")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    if not set(sections) <= {"text", "vision"} or args.steps < 1 or args.vision_steps < 1:
        parser.error("--sections takes text and/or vision; steps must be >= 1")
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "commit": git_commit()}
    if "vision" in sections:
        results["vision"] = vision_section(args.vision_steps, args.seeds)
    if "text" in sections:
        results["text"] = text_section(args.steps, args.seeds, args.batch, args.seq)
    results["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    (args.out / "quality.md").write_text(markdown(results))
    for key, name in (("text", "quality_loss_curves.svg"), ("vision", "vision_loss_curves.svg")):
        if key in results:
            (args.out / name).write_text(svg_curves(mean_curves(results[key]["runs"])))
    task.console.print(markdown(results))
    return 0 if all(math.isfinite(r["held_out_loss"]) for k in sections for r in results[k]["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
