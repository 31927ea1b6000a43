"""Reversible fine-tuning (MEFT) under torch.compile: saved bytes and step time, and depth.

    python benchmarks/reversible.py [--quick] [--steps N] [--out DIR]

1. **Saved bytes and step time** on MiniLM (real weights, batch 16, seq 128) and the LLaMA-style
   config (batch 8, seq 256), fp32, dropout 0.1, every row compiled and timed in one process,
   rows interleaved (``benchmarks/saved_memory.py``'s runner): full fine-tuning under
   torch.compile; PEFT LoRA r=8 under torch.compile and under fxshear ``exact``; MEFT1/2/3 with
   ``invert=False`` (same architecture, ordinary autograd) and ``invert=True`` (inputs rebuilt in
   the compiled backward), both under fxshear ``exact``.  Saved bytes: the run-time count of
   what autograd kept (``fxshear.measure_saved_bytes``).
2. **Depth**: LLaMA-style configs of 6, 12 and 24 blocks (hidden 256), ledger of the partitioned
   graphs (fxshear's analysis mode, no code generation): full fine-tuning (torch.compile's
   partition of the unrewritten graph) against MEFT1 ``invert=True`` (LM head frozen), also with
   dropout off and with MEFT's plain arithmetic, which splits each block's bytes into remainders
   and masks.
3. **Rebuild error per block** by dtype, exact and MEFT's plain arithmetic, and
   ``checkpoint_every=2``; 4. **starting point**: each variant's final hidden state and task loss
   at initialisation against the pretrained model's, on a real docstring batch; 5. **float16
   without loss scaling**: how far the adapters' gradients fall from float32's.

``--only depth,fp16`` reruns those sections into the existing results.  Writes ``reversible.json`` and ``reversible.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

import fxshear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saved_memory import (  # noqa: E402
    MIB,
    BenchConfig,
    ModelSpec,
    _inductor,
    machine_info,
    run_model,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "reversible"
console = Console(width=160)
LORA_TARGETS = {"minilm": ["query", "key", "value", "dense"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _lora(model_name: str, backend: str | None):
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS[model_name])
        lora = peft.get_peft_model(model, config)
        if backend is None:
            return _inductor(lora)
        return torch.compile(lora, backend=fxshear.backend(preset=backend))
    return wrap


def _meft(variant: str, invert: bool, train_head: bool):
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        torch.manual_seed(1)  # the same adapters in every MEFT row
        fxshear.reversible(model, variant=variant, invert=invert, train_head=train_head)
        return torch.compile(model, backend=fxshear.backend(preset="exact"))
    return wrap


def configs(model_name: str) -> list[BenchConfig]:
    rows = [BenchConfig("full FT, torch.compile", _inductor),
            BenchConfig("LoRA r=8, torch.compile", _lora(model_name, None)),
            BenchConfig("LoRA r=8, fxshear exact", _lora(model_name, "exact"), uses_fxshear=True)]
    for variant in ("meft1", "meft2", "meft3"):
        for invert in (False, True):
            # LLaMA's head is its 32k-word LM head: frozen, as LoRA's (the fused loss would save its
            # [vocab, hidden] gradient); MiniLM's is the new task head, which trains
            rows.append(BenchConfig(f"{variant.upper()} invert={invert}", _meft(variant, invert, model_name != "llama"),
                                    uses_fxshear=True))
    return rows


def starting_point() -> list[dict[str, Any]]:
    """At initialisation, each variant's final hidden state against the pretrained model's on
    real text (docstrings, the fine-tuning task's batch), eval mode; and the task loss with the
    same fresh head."""
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import finetune_minilm

    from fxshear.zoo.data import load_docstring_dataset
    from fxshear.zoo.models import build_model, load_minilm_tokenizer

    dataset = load_docstring_dataset(num_classes=finetune_minilm.NUM_CLASSES, seed=0)
    batch = finetune_minilm.training_batches(dataset, load_minilm_tokenizer(), 16, 128, 1)[0]
    out = []
    reference = build_model("minilm", num_labels=finetune_minilm.NUM_CLASSES, seed=0).model.eval()
    with torch.no_grad():
        ref_hidden = reference.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref_loss = float(reference(**batch))
    keep = batch["attention_mask"].bool()
    for variant in ("meft1", "meft2", "meft3"):
        model = build_model("minilm", num_labels=finetune_minilm.NUM_CLASSES, seed=0).model
        torch.manual_seed(1)
        fxshear.reversible(model, variant=variant)
        model.eval()
        with torch.no_grad():
            hidden = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            loss = float(model(**batch))
        a, b = hidden[keep], ref_hidden[keep]
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
        rel = float((a - b).norm() / b.norm())
        out.append({"variant": variant, "token_cosine_mean": cos, "relative_error": rel,
                    "loss": loss, "pretrained_loss": ref_loss})
        console.print(f"  {variant}: hidden cosine {cos:.4f}, relative error {rel:.3f}, loss {loss:.4f} "
                      f"(pretrained + same head {ref_loss:.4f})")
    return out


def rebuild_error() -> list[dict[str, Any]]:
    """Max relative error of each rebuilt block input (eager, measure mode), MiniLM b4 s64, by
    dtype and arithmetic; and what ``checkpoint_every=2`` bounds it to, and costs."""
    import copy
    import warnings

    from fxshear.reversible import reversible_stack
    from fxshear.zoo.models import build_model

    example = build_model("minilm", dropout=True)
    batch = example.make_batch(4, 64, seed=0)
    out = []
    cases = [(v, d, e, None) for v in ("meft1", "meft3") for d in (torch.float32, torch.bfloat16, torch.float16)
             for e in (False, True)]
    cases += [("meft1", torch.bfloat16, False, 2)]
    for variant, dtype, exact, every in cases:
        measured: dict[bool, Any] = {}
        for measure in (True, False):  # errors (every input also saved to compare), then bytes
            model = copy.deepcopy(example.model).to(dtype)
            torch.manual_seed(1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fxshear.reversible(model, variant=variant, exact=exact, checkpoint_every=every)
            stack = reversible_stack(model)
            stack.measure = measure
            torch.manual_seed(5)
            counted = fxshear.measure_saved_bytes(example.loss, model, batch)
            counted.output.backward()
            measured[measure] = (dict(stack.errors), counted.activation_bytes)
        errors = [measured[True][0][i] for i in sorted(measured[True][0], reverse=True)]
        row = {"variant": variant, "dtype": str(dtype).removeprefix("torch."), "exact": exact,
               "checkpoint_every": every, "errors_top_down": errors, "saved_mib": measured[False][1] / MIB}
        out.append(row)
        console.print(f"  {variant} {row['dtype']} exact={exact} every={every}: "
                      + " ".join(f"{e:.1e}" for e in errors) + f"  saved {row['saved_mib']:.2f} MiB")
    return out


DEPTH_ROWS = (  # label, reversible, exact arithmetic, dropout
    ("full FT", False, True, 0.1),
    ("MEFT1 inverted", True, True, 0.1),
    ("MEFT1 inverted, dropout off", True, True, 0.0),
    ("MEFT1 inverted, plain arithmetic, dropout off", True, False, 0.0),
)


def depth(quick: bool) -> list[dict[str, Any]]:
    """Ledger bytes of full fine-tuning and MEFT1 (inverted) at 6, 12 and 24 blocks; with dropout
    off and with MEFT's plain arithmetic too, to show what each block's bytes are for."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    out = []
    batch, seq = (2, 32) if quick else (8, 256)
    for layers in ((2, 4) if quick else (6, 12, 24)):
        row: dict[str, Any] = {"blocks": layers, "batch": batch, "seq": seq}
        for label, reversible, exact, dropout in DEPTH_ROWS:
            torch.manual_seed(0)
            config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                                 num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                                 attention_dropout=dropout, use_cache=False, tie_word_embeddings=False,
                                 attn_implementation="eager")
            model = LlamaForCausalLM(config).train()
            if reversible:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # exact=False's warning: the point of that row
                    fxshear.reversible(model, variant="meft1", train_head=False, exact=exact)
            cfg = fxshear.ShearConfig.from_options(preset="exact" if reversible else "none")
            backend = fxshear.ShearBackend(cfg, codegen=False)
            ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
            torch._dynamo.reset()
            loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
            loss.backward()
            row[f"{label} MiB"] = sum(r.ledger.activation_bytes for r in backend.regions) / MIB
        row["ratio"] = row["MEFT1 inverted MiB"] / row["full FT MiB"]
        console.print(f"  {layers} blocks: " + ", ".join(f"{label} {row[label + ' MiB']:.2f} MiB"
                                                     for label, *_ in DEPTH_ROWS))
        out.append(row)
    return out


def fp16_underflow() -> list[dict[str, Any]]:
    """float16 without loss scaling: the adapters' gradients (MEFT1, exact rebuild) against
    float32's, MiniLM b4 s32, dropout off, unscaled and with a loss scale of 1024."""
    import copy
    import warnings

    from fxshear.zoo.models import build_model

    example = build_model("minilm", dropout=False)
    batch = example.make_batch(4, 32, seed=0)
    grads = {}
    for dtype, scale in ((torch.float32, 1.0), (torch.float16, 1.0), (torch.float16, 1024.0)):
        model = copy.deepcopy(example.model).to(dtype)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the float16 warning quotes this measurement
            fxshear.reversible(model, variant="meft1")
        (example.loss(model, batch).float() * scale).backward()
        grads[(dtype, scale)] = torch.cat([p.grad.float().flatten() / scale for n, p in model.named_parameters()
                                           if p.requires_grad and "meft" in n])
    reference = grads[(torch.float32, 1.0)]
    out = []
    for (dtype, scale), g in grads.items():
        if dtype == torch.float32:
            continue
        row = {"dtype": str(dtype).removeprefix("torch."), "loss_scale": scale,
               "relative_error": float((g - reference).norm() / reference.norm()),
               "flushed_to_zero": float(((g == 0) & (reference != 0)).float().mean())}
        console.print(f"  {row['dtype']} loss scale {scale:g}: {row['relative_error']:.1e} relative off float32, "
                      f"{row['flushed_to_zero']:.2%} of the adapters' gradient elements flushed to zero")
        out.append(row)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Reversible fine-tuning (MEFT) under torch.compile", "",
             f"Machine: {results['machine']}; wall time {results['wall_s']:.0f} s.", "",
             f"Reproduce: `python benchmarks/reversible.py{' --quick' if results['quick'] else ''}`.", ""]
    for model, block in results["models"].items():
        lines += [f"## {block['label']}", "",
                  "| row | saved activations (MiB, run time) | vs full FT | step time (s) | vs full FT | vs LoRA (torch.compile) | first loss |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        rows = block["rows"]
        full = next(r for r in rows if r["config"].startswith("full FT"))
        lora = next((r for r in rows if r["config"] == "LoRA r=8, torch.compile"), None)
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['config']} | error: {r['error'][:120]} | | | | | |")
                continue
            saved = r["saved_activation_bytes"] / MIB
            vs_full = r["saved_activation_bytes"] / full["saved_activation_bytes"]
            step = r["step_s_median"]
            vs_lora = step / lora["step_s_median"] if lora and not lora.get("error") else float("nan")
            lines.append(f"| {r['config']} | {saved:.1f} | {vs_full:.3f}× | {step:.3f} | "
                         f"{step / full['step_s_median']:.2f}× | {vs_lora:.2f}× | {r['first_loss']:.4f} |")
        lines.append("")
    lines += ["## Rebuild error per block (MiniLM, b4 s64, eager, MEFT's measure mode)", "",
              "Max |rebuilt − exact| / max |exact| of each block's input, from the top block down "
              "(block 5's input is rebuilt from the saved output; each lower one from the one above).", "",
              "| variant | dtype | arithmetic | errors, blocks 5 → 1 | saved (MiB) |", "| --- | --- | --- | --- | ---: |"]
    for row in results["rebuild_error"]:
        kind = "exact (fixed point + remainders)" if row["exact"] else "plain (MEFT's)"
        if row["checkpoint_every"]:
            kind += f", checkpoint_every={row['checkpoint_every']}"
        errors = " ".join(f"{e:.1e}" for e in row["errors_top_down"])
        lines.append(f"| {row['variant']} | {row['dtype']} | {kind} | {errors} | {row['saved_mib']:.2f} |")
    lines += ["", "## Starting point (MiniLM, real weights, a docstring batch of 16 x 128, eval mode)", "",
              "| variant | final hidden vs pretrained: cosine per token (mean) | relative error | task loss (fresh head) | pretrained + same head |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for row in results["starting_point"]:
        lines.append(f"| {row['variant']} | {row['token_cosine_mean']:.4f} | {row['relative_error']:.3f} | "
                     f"{row['loss']:.4f} | {row['pretrained_loss']:.4f} |")
    depth_rows = results["depth"]
    labels = [label for label, *_ in DEPTH_ROWS if depth_rows and f"{label} MiB" in depth_rows[0]]
    lines += ["", "## Depth (LLaMA-style, hidden 256, b8 s256, LM head frozen, ledger of the partitioned graphs)", "",
              "| blocks | " + " | ".join(f"{label} (MiB)" for label in labels) + " | MEFT1 inverted / full FT |",
              "| ---: |" + " ---: |" * (len(labels) + 1)]
    for row in depth_rows:
        lines.append(f"| {row['blocks']} | " + " | ".join(f"{row[label + ' MiB']:.2f}" for label in labels)
                     + f" | {row['ratio']:.3f} |")
    if len(depth_rows) > 1:
        first, last = depth_rows[0], depth_rows[-1]
        blocks = last["blocks"] - first["blocks"]
        lines += ["", "Growth per block (MiB): " + ", ".join(
            f"{label} {(last[label + ' MiB'] - first[label + ' MiB']) / blocks:.3f}" for label in labels) + "."]
    if results.get("fp16"):
        lines += ["", "## float16 without loss scaling (MiniLM b4 s32, MEFT1, exact rebuild, dropout off)", "",
                  "| dtype | loss scale | adapters' gradient vs float32 (relative) | elements flushed to zero |",
                  "| --- | ---: | ---: | ---: |"]
        for row in results["fp16"]:
            lines.append(f"| {row['dtype']} | {row['loss_scale']:g} | {row['relative_error']:.1e} | "
                         f"{row['flushed_to_zero']:.2%} |")
    lines += ["", "Notes:", "",
              "- fp32, dropout 0.1 (LoRA's dropout 0.1 too); step = forward + backward, median of the timed steps, "
              "rows interleaved.",
              "- MEFT rows save, per block, the scaling remainders (int8, one byte per element of each stream "
              "scaled by 0.1), the 1-bit dropout masks and attention keep flags, and for the top block its two fp64 "
              "output streams; the first loss differs from full FT's because the architecture differs "
              "(λ, β and the averaged output), and matches between invert=False and invert=True."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", default="minilm,llama")
    parser.add_argument("--only", help="comma-separated sections to rerun (depth, fp16, rebuild_error, "
                        "starting_point), the rest kept from the existing reversible.json")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 4)
    out = args.out or (Path("/tmp/fxshear-reversible-quick") if args.quick else DEFAULT_OUT)
    start = time.perf_counter()
    specs = {"minilm": ModelSpec("minilm", "bench", batch=2 if args.quick else 16, seq=32 if args.quick else 128),
             "llama": ModelSpec("llama", "small" if args.quick else "bench", batch=2 if args.quick else 8,
                                seq=32 if args.quick else 256)}
    sections = {"rebuild_error": rebuild_error, "starting_point": starting_point,
                "depth": lambda: depth(args.quick), "fp16": fp16_underflow}
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(sections))
        if unknown:
            parser.error(f"unknown sections {unknown}; choose from {sorted(sections)}")
        results = json.loads((out / "reversible.json").read_text())
        for name in args.only.split(","):
            console.print(f"[bold]{name}[/bold]")
            results[name] = sections[name]()
        results.setdefault("reruns", []).append({"sections": args.only, "machine": machine_info()})
        (out / "reversible.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out / "reversible.md").write_text(markdown(results))
        console.print(f"updated {out / 'reversible.json'} and {out / 'reversible.md'}")
        return 0
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "models": {}}
    torch._dynamo.config.cache_size_limit = 64
    with Progress(console=console, transient=True) as progress:
        overall = progress.add_task("rows", total=sum(len(configs(m)) for m in args.models.split(",")))
        for name in args.models.split(","):
            spec = specs[name]
            rows = run_model(spec, configs(name), steps, progress, overall)
            results["models"][name] = {"label": spec.label, "rows": [r.__dict__ for r in rows]}
    for name, section in sections.items():
        console.print(f"[bold]{name}[/bold]")
        results[name] = section()
    results["wall_s"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "reversible.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "reversible.md").write_text(markdown(results))
    console.print(f"wrote {out / 'reversible.json'} and {out / 'reversible.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
