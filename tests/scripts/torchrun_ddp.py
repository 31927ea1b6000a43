"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: one DDP step of the
LLaMA-style config under backend="fxshear" (exact), each rank on its half of the global batch;
rank 0 saves the gradients to the path given as the first argument."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed_scenarios as scenarios  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # torchrun's env
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        result = scenarios.ddp_step(rank, world, model_name="llama", preset="exact", order="compile_ddp")
        if rank == 0:
            torch.save({"world": world, **result}, sys.argv[1])
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
