"""Run a function on N real processes joined by a ``gloo`` (or, with several GPUs, ``nccl``) process
group, bounded in time, and bring each rank's result back.

Why processes and not mocks: what must agree across ranks (gradients after DDP's all-reduce,
FSDP2's shards, the freeze mask) only shows with real collectives.  Each rank writes its result
with ``torch.save``; a rank that raises writes the traceback instead, and a run that passes its
deadline is killed (every child), so a test never hangs.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for_this_machine() -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo"


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, backend: str, out_dir: str,
           group_timeout_s: float, kwargs: dict[str, Any]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"] = str(rank), str(rank), str(world)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group(backend, rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=group_timeout_s))
        result = fn(rank, world, **kwargs)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - the parent reports it
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class RankFailed(RuntimeError):
    pass


def run_ranks(fn: Callable[..., Any], world: int = 2, timeout_s: float = 240.0, group_timeout_s: float = 60.0,
              allow_failure: bool = False, **kwargs: Any) -> list[dict[str, Any]]:
    """``fn(rank, world, **kwargs)`` on ``world`` spawned processes; returns each rank's
    ``{"ok": bool, "result" | "error": ...}`` (raises :class:`RankFailed` on a failure unless
    ``allow_failure``, and on a deadline always).  ``fn`` must be importable (module level)."""
    backend = backend_for_this_machine()
    with tempfile.TemporaryDirectory(prefix="fxshear-dist-") as out_dir:
        context = mp.start_processes(_entry, args=(fn, world, free_port(), backend, out_dir, group_timeout_s, kwargs),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RankFailed(f"{fn.__name__} on {world} ranks passed its {timeout_s:g} s deadline (killed)")
        except mp.ProcessRaisedException as error:  # the entry catches everything; this is a crash
            raise RankFailed(str(error)) from error
        except mp.ProcessExitedException as error:
            if not allow_failure:
                raise RankFailed(str(error)) from error
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        results = []
        for rank in range(world):
            path = Path(out_dir) / f"rank{rank}.pt"
            results.append(torch.load(path, weights_only=False) if path.exists()
                           else {"ok": False, "error": "no result written (the process died)"})
    if not allow_failure:
        failed = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if not res["ok"]]
        if failed:
            raise RankFailed("\n".join(failed))
    return results
