"""Block-selective fine-tuning with token dropping (BSR) of a ViT, on real images that ship offline.

    python examples/block_selective_vit.py [--steps 150] [--keep-rate 0.5] [--compare]

No pretrained ViT ships offline, so a small one (6 blocks of 96, 32x32 images in 4x4 patches: 64
tokens and CLS) is first trained on scikit-learn's digits 0-4 (the stand-in for a pretrained
checkpoint; with one, ``ViTForImageClassification.from_pretrained(...)`` takes its place), then
fine-tuned on the digits 5-9 with a new head:

    fxshear.block_selective(model, train_blocks=[1, 3, 5], drop_at=[1, 3, 4], keep_rate=0.5)
    compiled = torch.compile(model, backend="fxshear")

Blocks 1, 3 and 5, the final norm and the head train; block 0 runs without building a graph; at
blocks 1, 3 and 4 the tokens the CLS token attends to least are fused into one, so each later
block sees fewer.  The run prints the tokens each block sees, the saved bytes per step (counted at
run time), the step time and the held-out accuracy; ``--compare`` also fine-tunes every weight
under plain torch.compile on the same batches.  Needs scikit-learn (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console

import fxshear
from fxshear.selective import selective_state
from fxshear.zoo.images import load_digits

console = Console()
BSR = dict(train_blocks=[1, 3, 5], drop_at=[1, 3, 4])


def small_vit(num_labels: int, seed: int = 0) -> torch.nn.Module:
    """ViT 6 x 96 (4 heads, MLP 384) on 32x32 images in 4x4 patches, dropout 0.1, eager attention."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=4, hidden_size=96, num_hidden_layers=6, num_attention_heads=4,
                       intermediate_size=384, num_labels=num_labels, hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.0, problem_type="single_label_classification",
                       attn_implementation="eager")
    torch.manual_seed(seed)
    return ViTForImageClassification(config).train()


def digit_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``pretrain``: the digits 0-4; ``train`` / ``held_out``: the digits 5-9 (relabelled 0-4),
    250 of them held out (a fixed shuffle)."""
    images, labels = load_digits(32)
    lower = labels < 5
    upper_images, upper_labels = images[~lower], labels[~lower] - 5
    order = torch.randperm(len(upper_images), generator=torch.Generator().manual_seed(0))
    held, train = order[:250], order[250:]
    return {"pretrain": (images[lower], labels[lower]), "train": (upper_images[train], upper_labels[train]),
            "held_out": (upper_images[held], upper_labels[held])}


def train(model: torch.nn.Module, step_fn: Callable[..., torch.Tensor], data: tuple[torch.Tensor, torch.Tensor],
          steps: int, batch: int, lr: float, seed: int = 0) -> dict[str, list[float]]:
    """AdamW on the trainable parameters; the batches are the same for every call (a fixed generator)."""
    images, labels = data
    generator = torch.Generator().manual_seed(1234)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(seed)
    record: dict[str, list[float]] = {"losses": [], "seconds": [], "saved_bytes": []}
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator)
        start = time.perf_counter()
        saved = fxshear.measure_saved_bytes(step_fn, pixel_values=images[index], labels=labels[index])
        saved.output.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["seconds"].append(time.perf_counter() - start)
        record["losses"].append(float(saved.output.detach()))
        record["saved_bytes"].append(saved.activation_bytes)
    return record


class LossOf(torch.nn.Module):
    """The loss of ``module`` as a module, so the run-time count knows the parameters."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.module(**batch).loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    images, labels = data
    model.eval()
    logits = torch.cat([model(pixel_values=images[i:i + 128]).logits for i in range(0, len(images), 128)])
    model.train()
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(-1) == labels).float().mean())


def pretrained(splits: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: int) -> torch.nn.Module:
    """The stand-in for a pretrained checkpoint: every weight trained on the digits 0-4."""
    model = small_vit(5)
    train(model, LossOf(model), splits["pretrain"], steps, 64, 1e-3)
    return model


def with_new_head(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    model.classifier = torch.nn.Linear(model.config.hidden_size, 5)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--compare", action="store_true", help="also fine-tune every weight under torch.compile")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.pretrain_steps < 0:
        parser.error("--steps must be >= 1 and --pretrain-steps >= 0")

    splits = digit_splits()
    console.print(f"pretraining a ViT 6x96 on the digits 0-4 ({args.pretrain_steps} steps, eager)…")
    base = pretrained(splits, args.pretrain_steps)

    runs = {}
    model = fxshear.block_selective(with_new_head(base), **BSR, keep_rate=args.keep_rate)
    counts = selective_state(model).token_counts(1 + (32 // 4) ** 2)
    console.print("tokens per drop site (block: in -> out): "
                  + ", ".join(f"{block}: {n_in} -> {n_out}" for block, n_in, n_out in counts))
    compiled = torch.compile(model, backend="fxshear")
    runs["BSR (fxshear)"] = (model, train(model, LossOf(compiled), splits["train"], args.steps, args.batch, 1e-3))
    if args.compare:
        full = with_new_head(base)
        runs["full fine-tuning (torch.compile)"] = (
            full, train(full, LossOf(torch.compile(full)), splits["train"], args.steps, args.batch, 1e-3))
    for name, (trained, record) in runs.items():
        loss, accuracy = evaluate(trained, splits["held_out"])
        steady = record["seconds"][1:] or record["seconds"]
        console.print(f"{name}: saved {record['saved_bytes'][-1] / 2**20:.2f} MiB per step, "
                      f"{statistics.median(steady) * 1e3:.0f} ms/step (after the compiling one), "
                      f"held-out accuracy {accuracy:.1%}, loss {loss:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
