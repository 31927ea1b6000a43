"""The saved-byte ledgers of MiniLM (b16 s128, dropout on) per preset, as JSON, for before/after checks.

    python tools/ledger_snapshot.py OUT.json [--presets exact,balanced,aggressive] [--batch 16 --seq 128]

Why: a change meant to alter structure only must leave every saved tensor as it was; two
snapshots compare byte for byte (``cmp before.json after.json``).  Analysis mode (no code
generation): the partition, and so the ledger, is the one code generation compiles.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def snapshot(presets: list[str], batch: int, seq: int) -> dict[str, object]:
    import fxshear
    from fxshear.config import ShearConfig
    from fxshear.zoo.models import build_model

    example = build_model("minilm", dropout=True)
    inputs = example.make_batch(batch, seq, seed=1)
    result: dict[str, object] = {}
    for preset in presets:
        torch._dynamo.reset()
        backend = fxshear.ShearBackend(ShearConfig.from_options(preset=preset), codegen=False)
        torch.manual_seed(0)
        example.loss(torch.compile(example.model, backend=backend), inputs).backward()
        example.model.zero_grad(set_to_none=True)
        result[preset] = [region.ledger.to_dict() for region in backend.regions]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--presets", default="exact,balanced,aggressive")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    data = snapshot([p for p in args.presets.split(",") if p], args.batch, args.seq)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    print(f"wrote {args.out}: " + ", ".join(f"{p} {sum(r['activation_bytes'] for r in data[p])} B" for p in data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
