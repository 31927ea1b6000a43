"""Per-step freezing that agrees across ranks: one mask, from gradient norms every rank shares.

Why: under DDP or FSDP2 every rank must freeze the same weights in a step (a weight frozen on one
rank and not on another gets half a gradient, and the ranks' replicas drift apart).  A policy
seeded alike on every rank draws the same masks as long as it learns from the same numbers, so
what must agree is its feedback: the gradient norms.  DDP's all-reduce lands in ``.grad`` only at
the end of the backward (the post-accumulate-grad hooks see each rank's own gradient), and FSDP2's
gradients are shards; so the norms are read at ``optimizer.step()`` and combined with one
all-reduce, after which every rank holds the same vector, bit for bit.  Each step's mask is then
checked with one more all-reduce (a policy with rank-local randomness is an error, not silent
drift).  Every collective here waits at most ``timeout`` seconds: a rank that died makes the
others fail with a message, never hang.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch

from ..config import ConfigError

DEFAULT_TIMEOUT_S = 120.0


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _device() -> torch.device:
    """Where this process group's collectives want their tensors (NCCL: the current GPU)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, timeout: float, what: str) -> torch.Tensor:
    """``all_reduce(SUM)`` that gives up after ``timeout`` seconds with an error saying why."""
    shared = tensor.to(_device())
    work = torch.distributed.all_reduce(shared, async_op=True)
    try:
        finished = work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as error:
        raise RuntimeError(f"fxshear: the all-reduce of {what} did not complete on rank "
                           f"{torch.distributed.get_rank()} within {timeout:g} s; another rank has probably failed or "
                           f"is not running the same train_step ({error})") from error
    if finished is False:
        raise RuntimeError(f"fxshear: the all-reduce of {what} timed out after {timeout:g} s on rank "
                           f"{torch.distributed.get_rank()}")
    return shared.cpu()


def squared_norm(grad: torch.Tensor, world: int) -> torch.Tensor:
    """This rank's share of ``‖grad‖²`` such that the all-reduced sum is the whole norm²: a
    sharded DTensor contributes its local shard's sum of squares; a replicated or plain gradient
    (DDP: already averaged, equal on every rank) contributes ``1/world`` of its own."""
    local = getattr(grad, "to_local", None)
    if local is not None:
        placements = getattr(grad, "placements", ())
        shard = local().detach().double().pow(2).sum()
        if any(type(p).__name__ in ("Shard", "_StridedShard") for p in placements):
            return shard
        return shard / world
    return grad.detach().double().pow(2).sum() / world


def global_norms(grads: Sequence[torch.Tensor | None], timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
    """float64 ``[len(grads)]`` gradient norms, identical on every rank; ``nan`` where a gradient
    is None on any rank (no norm to learn from)."""
    world = torch.distributed.get_world_size()
    parts = torch.zeros(2 * len(grads), dtype=torch.float64)
    for i, grad in enumerate(grads):
        if grad is not None:
            parts[i] = squared_norm(grad, world)
            parts[len(grads) + i] = 1.0
    total = _all_reduce(parts, timeout, "the freezing policy's gradient norms")
    norms, present = total[:len(grads)].clamp(min=0).sqrt(), total[len(grads):]
    return torch.where(present == world, norms, torch.full_like(norms, float("nan")))


def check_same_mask(mask: torch.Tensor, policy_name: str, step: int, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise on every rank at once when the ranks' masks differ (one all-reduce: each entry's
    sum is 0 or the world size only if all ranks agree)."""
    world = torch.distributed.get_world_size()
    total = _all_reduce(mask.to(torch.int32), timeout, "the freeze mask")
    if bool(((total != 0) & (total != world)).any()):
        differing = int(((total != 0) & (total != world)).sum())
        raise ConfigError(
            f"fxshear.train_step: the {policy_name!r} freeze policy drew different masks on different ranks at "
            f"step {step} ({differing} of {mask.numel()} weights differ). Every rank must freeze the same weights: "
            "a policy must be seeded alike on every rank and draw only from its own generator and the gradient "
            "norms fxshear passes to update() (identical on every rank), never from rank-local randomness such "
            "as torch.rand without a generator, a rank-dependent seed, or the rank's own gradients")
