"""Write what ``make gpu-check`` carries to a GPU machine that has no network and no MiniLM
package: a bf16 copy of all-MiniLM-L6-v2 (config, tokenizer files, ``model.safetensors``, about
45 MB instead of 88), in ``.gpu-carry/minilm-bf16`` (git-ignored).

    python benchmarks/gpu_carry.py [--out DIR]

The device tool's working tree is capped at 64 MiB; the repo is a few MB, so the copy fits.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / ".gpu-carry" / "minilm-bf16"
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def main(argv: list[str] | None = None) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from fxshear.zoo.models import minilm_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    source = minilm_model_path()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (source / name).exists():
            shutil.copy2(source / name, args.out / name)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              str(args.out / "model.safetensors"), metadata={"format": "pt"})
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
