"""What each rank runs in tests/test_distributed.py (module level: spawned processes import it).

Every scenario builds the same model on every rank (same seed), gives each rank its slice of one
global batch and returns plain tensors (gradients as full tensors) and numbers for the parent to
compare with a one-process run of the whole batch.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import fxshear
from fxshear.zoo.models import build_model

GLOBAL_BATCH = 4
SEQ = 16


def example_of(name: str):
    return build_model(name, dropout=False, seed=0)


def global_batch(example, seed: int = 0, size: int = GLOBAL_BATCH, seq: int = SEQ) -> dict[str, torch.Tensor]:
    return example.make_batch(size, seq, seed=seed)


def slice_for(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = next(iter(batch.values())).shape[0] // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.replace("_orig_mod.", "").replace("module.", "", 1) if name.startswith("module.") else
            name.replace("_orig_mod.", "")] = grad.detach().clone()
    return out


def _ledger_summary(backend: fxshear.ShearBackend, vocab: int | None = None) -> dict[str, Any]:
    """Per-fragment and total activation bytes; whether the fused loss ran in a compiled region
    and whether any saved activation has the vocabulary as its last dimension (logits)."""
    regions = [r for r in backend.regions if r.has_backward]
    entries = [e for r in regions for e in r.ledger.entries if e.kind == "activation"]
    return {"fragments": len(regions), "per_fragment": [r.ledger.activation_bytes for r in regions],
            "total": sum(r.ledger.activation_bytes for r in regions),
            "saved_inputs": sum(r.ledger.input_bytes for r in regions),
            "fused_loss": any("linear_cross_entropy" in e.op for e in entries),
            "logits_saved": vocab is not None and any(e.shape and e.shape[-1] == vocab for e in entries)}


def _vocab(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None) if hasattr(model, "lm_head") else None


def ddp_step(rank: int, world: int, model_name: str, preset: str, order: str,
             bucket_cap_mb: float = 0.1, size: int = GLOBAL_BATCH, seq: int = SEQ) -> dict[str, Any]:
    """One forward+backward of DDP under ``backend="fxshear"``: ``order`` is ``compile_ddp``
    (torch.compile(DDP(model))) or ``ddp_compile`` (DDP(torch.compile(model))).  Small buckets,
    so Dynamo's DDPOptimizer splits even the small models' graphs into several fragments (its
    first bucket must not exceed the others: c10d's 1 MiB default first bucket is lowered too)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = int(bucket_cap_mb * 2**20)

    example = example_of(model_name)
    backend = fxshear.backend(preset=preset)
    if order == "compile_ddp":
        wrapped = torch.compile(DDP(example.model, bucket_cap_mb=bucket_cap_mb), backend=backend)
    elif order == "ddp_compile":
        wrapped = DDP(torch.compile(example.model, backend=backend), bucket_cap_mb=bucket_cap_mb)
    else:
        raise ValueError(order)
    loss = example.loss(wrapped, slice_for(global_batch(example, size=size, seq=seq), rank, world))
    loss.backward()
    return {"loss": float(loss.detach()), "grads": full_gradients(example.model), "ledger": _ledger_summary(backend)}


def fsdp_step(rank: int, world: int, model_name: str, preset: str, compile_scope: str) -> dict[str, Any]:
    """One forward+backward with ``fully_shard`` on every block and the root; ``compile_scope``
    ``blocks`` compiles each block, ``whole`` the root module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    example = example_of(model_name)
    model = example.model
    mesh = init_device_mesh("cpu", (world,))
    blocks = _blocks(model)
    backend = fxshear.backend(preset=preset)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if compile_scope == "blocks":
        for block in blocks:
            block.compile(backend=backend)
        runner: nn.Module = model
    else:
        runner = torch.compile(model, backend=backend)
    loss = example.loss(runner, slice_for(global_batch(example), rank, world))
    loss.backward()
    return {"loss": float(loss.detach()), "grads": full_gradients(model),
            "ledger": _ledger_summary(backend, _vocab(model))}


def _blocks(model: nn.Module) -> nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return max(lists, key=len)


def reference_step(model_name: str, preset: str | None = None, scope: str = "whole") -> dict[str, Any]:
    """The one-process run of the whole global batch: eager, or compiled with fxshear ``preset``
    whole or per block (the ranks' graphs up to the batch size: what their arithmetic should equal)."""
    torch._dynamo.reset()
    example = example_of(model_name)
    model = copy.deepcopy(example.model)
    runner = model
    if preset is not None and scope == "whole":
        runner = torch.compile(model, backend=fxshear.backend(preset=preset))
    elif preset is not None:
        backend = fxshear.backend(preset=preset)
        for block in _blocks(model):
            block.compile(backend=backend)
    loss = example.loss(runner, global_batch(example))
    loss.backward()
    return {"loss": float(loss.detach()), "grads": full_gradients(model)}


def freeze_steps(rank: int, world: int, engine: str, steps: int = 40, policy: str = "bandit",
                 model_name: str = "llama") -> dict[str, Any]:
    """``steps`` steps of ``@fxshear.train_step`` (bandit freezing, period 5) under ``engine``
    (``ddp`` or ``fsdp``), each rank on its own slice of a new global batch per step; returns
    the mask of every step and the final weights."""
    example = example_of(model_name)
    model = example.model
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped: nn.Module = DDP(model, find_unused_parameters=True)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    freeze: Any = policy
    if policy == "rank_local":
        from fxshear.freezing.arms import find_arms
        from fxshear.freezing.policies import RandomPolicy
        freeze = RandomPolicy(len(find_arms(wrapped)), seed=rank)  # a rank-dependent seed: the misuse
    step_fn = fxshear.train_step(wrapped, optimizer, freeze=freeze, sparsity=0.5, period=5)

    @step_fn
    def step(batch):
        loss = example.loss(wrapped, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    masks, losses = [], []
    for i in range(steps):
        losses.append(float(step(slice_for(global_batch(example, seed=i), rank, world)).detach()))
        masks.append(step.policy.mask.clone())
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for n, p in model.named_parameters()}
    return {"masks": torch.stack(masks), "losses": losses, "weights": weights,
            "p": getattr(step.policy, "p", None), "compiles": step.compiles}


def one_rank_stalls(rank: int, world: int, stall_s: float = 20.0, collective_timeout_s: float = 3.0) -> dict[str, Any]:
    """Rank 1 never reaches its step (it sleeps, alive, holding the process group open); rank 0
    must give up within ``collective_timeout_s`` with fxshear's message, not wait for it."""
    import time

    if rank == 1:
        time.sleep(stall_s)
        return {"stalled": True}
    example = example_of("llama")
    optimizer = torch.optim.SGD(example.model.parameters(), lr=0.0)

    @fxshear.train_step(example.model, optimizer, freeze="bandit", compile=False, collective_timeout=collective_timeout_s)
    def step(batch):
        loss = example.loss(example.model, batch)
        loss.backward()
        optimizer.step()
        return loss

    start = time.monotonic()
    try:
        step(slice_for(global_batch(example), rank, world))
    except RuntimeError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def ddp_freezing_without_unused_detection(rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    example = example_of("llama")
    wrapped = DDP(example.model)
    fxshear.train_step(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.0), freeze="bandit")
    return {"unreachable": True}


class _Rows(torch.utils.data.Dataset):
    """Single examples of one fixed batch, in order (the Trainer's sampler is made sequential)."""

    def __init__(self, example, n: int) -> None:
        batch = example.make_batch(n, SEQ, seed=0)
        self.items = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def trainer_losses(rank: int, world: int, out_dir: str, steps: int = 4, global_batch_size: int = 4,
                   model_name: str = "minilm") -> dict[str, Any]:
    """HF ``Trainer`` with ``torch_compile_backend="fxshear"``: ``steps`` steps of a global batch
    of ``global_batch_size`` split over the ranks (sequential sampling, so any world size sees the
    same global batches); returns the logged (rank-averaged) loss of every step."""
    from transformers import Trainer, TrainingArguments

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class LossAsOutput(nn.Module):
        """The zoo's classifier returns the loss tensor; Trainer reads ``outputs["loss"]``."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
            batch.pop("num_items_in_batch", None)  # Trainer passes it to models that take **kwargs
            return {"loss": self.model(**batch)}

    example = example_of(model_name)
    args = TrainingArguments(
        output_dir=f"{out_dir}/rank{rank}", max_steps=steps, per_device_train_batch_size=global_batch_size // world,
        learning_rate=1e-4, torch_compile=True, torch_compile_backend="fxshear", report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_drop_last=True, seed=0,
        remove_unused_columns=False, average_tokens_across_devices=False)
    trainer = SequentialTrainer(model=LossAsOutput(example.model), args=args, train_dataset=_Rows(example, steps * global_batch_size))
    trainer.train()
    return {"losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
