"""Reversible blocks under torch.compile(backend=fxshear): the compiled backward rebuilds every
block input (fxshear/graph/reversible.py); gradients equal eager ordinary autograd's, dropout on;
the partitioned graphs save the top block's outputs, the remainders and the masks, not the inputs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fxshear
from fxshear.kernels.reversible_mark import GRID
from fxshear.reversible import coupling
from fxshear.zoo.models import build_model


def _grads(example, module, model, batch) -> tuple[float, dict[str, torch.Tensor], int]:
    torch.manual_seed(5)
    counted = fxshear.measure_saved_bytes(example.loss, module, batch)
    counted.output.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(counted.output.detach()), grads, counted.activation_bytes


def _run(example, variant: str, invert: bool, compiled: bool, batch):
    model = copy.deepcopy(example.model)
    torch.manual_seed(1)
    fxshear.reversible(model, variant=variant, invert=invert)
    backend = fxshear.backend(preset="exact") if compiled else None
    module = torch.compile(model, backend=backend) if compiled else model
    loss, grads, runtime = _grads(example, module, model, batch)
    return loss, grads, runtime, backend


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


@pytest.mark.parametrize("name, variant", [
    ("minilm", "meft1"),
    pytest.param("llama", "meft3", marks=pytest.mark.slow),
    pytest.param("vit", "meft2", marks=pytest.mark.slow),  # G the whole block: attention copied too
])
def test_compiled_inverted_backward_matches_eager_and_saves_no_block_input(name: str, variant: str, caplog) -> None:
    example = build_model(name, dropout=True)
    batch = example.make_batch(2, 16, seed=0)
    eager_loss, eager, _, _ = _run(example, variant, invert=False, compiled=False, batch=batch)
    with caplog.at_level(logging.INFO, logger="fxshear.reversible"):
        loss, grads, runtime, backend = _run(example, variant, invert=True, compiled=True, batch=batch)
    assert "rebuilt the inputs of reversible blocks" in caplog.text
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    assert _max_rel(grads, eager) < 1e-5
    ledger = sum(region.ledger.activation_bytes for region in backend.regions)
    assert ledger == runtime  # the ledger of the partitioned graphs is the run-time count
    entries = [e for region in backend.regions for e in region.ledger.entries if e.kind == "activation"]
    streams = [e for e in entries if e.dtype == "float64"]
    # the top block's two output streams, nothing else in fp64: no block input is saved
    assert len(streams) == 2, [(e.shape, e.dtype) for e in streams]


@pytest.mark.slow
def test_compiled_inverted_minilm_saves_a_fraction_of_the_compiled_plain_stack() -> None:
    example = build_model("minilm", dropout=True)
    batch = example.make_batch(4, 64, seed=0)
    _, plain, plain_bytes, _ = _run(example, "meft1", invert=False, compiled=True, batch=batch)
    _, inverted, inverted_bytes, _ = _run(example, "meft1", invert=True, compiled=True, batch=batch)
    assert _max_rel(inverted, plain) < 1e-5
    assert inverted_bytes < 0.25 * plain_bytes, (inverted_bytes, plain_bytes)


def test_the_grid_is_one_constant() -> None:
    assert coupling.GRID == GRID == 2.0**32


@pytest.mark.slow
def test_it_composes_with_train_step_and_a_memory_budget() -> None:
    example = build_model("llama", dropout=True)
    batch = example.make_batch(2, 16, seed=0)
    _, eager, _, _ = _run(example, "meft1", invert=False, compiled=False, batch=batch)

    model = copy.deepcopy(example.model)
    torch.manual_seed(1)
    fxshear.reversible(model, variant="meft1")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    grads: dict[str, torch.Tensor] = {}

    def body(b):  # noqa: ANN001, ANN202
        loss = example.loss(model, b)
        loss.backward()
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.zero_grad(set_to_none=True)
        return loss

    step = fxshear.train_step(model, optimizer, freeze=None, memory_budget=0.5)(body)
    torch.manual_seed(5)
    step(batch)
    assert _max_rel(grads, eager) < 1e-5
    assert step.saved_activation_bytes() > 0


@pytest.mark.slow
def test_inspect_shows_the_reversible_stack_saving_its_top_outputs() -> None:
    example = build_model("llama", dropout=True)
    model = copy.deepcopy(example.model)
    fxshear.reversible(model, variant="meft3")
    batch = example.make_batch(2, 16, seed=0)
    report = fxshear.inspect(model, example_kwargs=batch)
    text = report.diff() if hasattr(report, "diff") else str(report)
    assert "float64" in text or "f64" in text


def test_compiled_checkpoint_every_keeps_those_inputs_and_matches_eager() -> None:
    example = build_model("minilm", dropout=True)
    batch = example.make_batch(2, 16, seed=0)
    _, eager, _, _ = _run(example, "meft1", invert=False, compiled=False, batch=batch)
    model = copy.deepcopy(example.model)
    torch.manual_seed(1)
    fxshear.reversible(model, variant="meft1", checkpoint_every=2)  # blocks 2 and 4 keep their inputs
    backend = fxshear.backend(preset="exact")
    _, grads, runtime = _grads(example, torch.compile(model, backend=backend), model, batch)
    assert _max_rel(grads, eager) < 1e-5
    entries = [e for region in backend.regions for e in region.ledger.entries if e.kind == "activation"]
    streams = [e for e in entries if e.dtype == "float64"]
    # the top block's two output streams, and the kept inputs of blocks 2 and 4 (both streams each, as
    # the one concatenated tensor that travels between blocks): six streams' worth, nothing else
    stream_bytes = 2 * 16 * 384 * 8
    assert sum(e.bytes for e in streams) == 6 * stream_bytes, [(e.shape, e.dtype) for e in streams]
    assert sum(region.ledger.activation_bytes for region in backend.regions) == runtime
