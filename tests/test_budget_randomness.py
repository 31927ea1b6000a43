"""Random draws under every ``memory_budget``: the masks are saved, never redrawn in the backward.

Regression for a silent wrong gradient: at ``memory_budget=0.0`` PyTorch's partitioner returns
"save the forward inputs" before it reads any MUST_SAVE mark or recompute ban, so every dropout
draw was recomputed in the backward with fresh random numbers (MiniLM's gradients were off by
1.1 relative).  fxshear now hands it the smallest positive fraction on graphs that draw.

Every run is seeded like eager (``torch.manual_seed(1234)``), dropout on.  The ``exact`` preset
reproduces eager's masks, so its gradients must be eager's at every budget; ``balanced`` and
``aggressive`` approximate, so each must equal its own budget-1.0 run: the same draws, whatever
the budget makes the backward recompute.  Analysis mode (no code generation) keeps this cheap:
the partition, and so what is recomputed, is the one code generation would compile.
"""

from __future__ import annotations

import pytest
import torch

import fxshear
from fxshear.config import ShearConfig
from fxshear.zoo.models import ExampleModel, build_model
from helpers import assert_grads_close_in_norm, grads

BUDGETS = (1.0, 0.5, 0.1, 0.05, 0.0)
# Draws, and the exact rewrites' saved replacements for them: what must survive any budget.
MASK_PASSES = ("dropout_bits", "attention")


def backend_at(preset: str, budget: float, **overrides: object) -> fxshear.ShearBackend:
    return fxshear.ShearBackend(ShearConfig.from_options(preset=preset, memory_budget=budget, **overrides),
                                codegen=False)


def seeded_step(example: ExampleModel, module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """One seeded forward+backward; returns the loss and the gradients, leaving none behind."""
    example.model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    loss = example.loss(module, batch)
    loss.backward()
    result = grads(example.model)
    example.model.zero_grad(set_to_none=True)
    return loss.detach(), result


def compiled_step(example: ExampleModel, batch: dict, backend: fxshear.ShearBackend) -> tuple[torch.Tensor, dict]:
    torch._dynamo.reset()
    return seeded_step(example, torch.compile(example.model, backend=backend), batch)


def saved_masks(backend: fxshear.ShearBackend) -> int:
    """Bytes of uint8 tensors the mask-keeping passes put in the saved set (packed or per element)."""
    return sum(e.bytes for region in backend.regions for e in region.ledger.entries
               if e.kind == "activation" and e.dtype == "uint8" and e.introduced_by in MASK_PASSES)


def two_block_minilm() -> ExampleModel:
    """Real MiniLM weights, its first two blocks: the same layers as the 6-block model (whose
    full budget sweep is in the issue-22 note) at a third of the partitioning time."""
    example = build_model("minilm", dropout=True)
    layers = example.model.encoder.encoder.layer
    example.model.encoder.encoder.layer = layers[:2]
    return example


@pytest.fixture(scope="module")
def examples() -> dict[str, ExampleModel]:
    return {"minilm": two_block_minilm(), "llama": build_model("llama", dropout=True),
            "vit": build_model("vit", dropout=True)}


@pytest.mark.parametrize(("name", "budgets"), [
    ("minilm", BUDGETS),
    # Every budget strictly between 0 and 1 takes the same path (a bisection over trial
    # partitions, 8 min-cuts each); one of them suffices for the configs after the first.
    ("llama", (1.0, 0.05, 0.0)),
    ("vit", (1.0, 0.05, 0.0)),
])
def test_exact_gradients_are_eagers_at_every_budget(examples, name: str, budgets: tuple[float, ...]) -> None:  # noqa: ANN001
    example = examples[name]
    batch = example.make_batch(2, 16, seed=1)
    eager_loss, eager = seeded_step(example, example.model, batch)
    for budget in budgets:
        backend = backend_at("exact", budget)
        loss, got = compiled_step(example, batch, backend)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6, msg=f"budget {budget}")
        assert_grads_close_in_norm(got, eager, rel=2e-5, floor=1e-3)
        assert saved_masks(backend) > 0, f"no dropout mask saved at budget {budget}"


def test_full_minilm_at_budget_zero_keeps_its_masks() -> None:
    """The reported case: all six real blocks, budget 0.0.  The ledger lists the masks."""
    example = build_model("minilm", dropout=True)
    batch = example.make_batch(2, 16, seed=1)
    eager_loss, eager = seeded_step(example, example.model, batch)
    backend = backend_at("exact", 0.0)
    loss, got = compiled_step(example, batch, backend)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close_in_norm(got, eager, rel=2e-5, floor=1e-3)
    kinds = {(e.introduced_by, e.dtype) for region in backend.regions for e in region.ledger.entries
             if e.kind == "activation"}
    assert ("dropout_bits", "uint8") in kinds  # hidden dropout: 1-bit masks
    assert ("attention", "uint8") in kinds  # attention-probability dropout: per-element keep flags
    region = backend.regions[-1]
    assert region.effective_budget is not None and 0.0 < region.effective_budget < 1e-3
    backward = region.graphs["backward"]
    for draw in ("fxshear.dropout_draw.default", "fxshear.attention_dropout_draw.default"):
        assert draw in region.graphs["forward"] and draw not in backward


@pytest.mark.parametrize("preset", ["balanced", "aggressive"])
def test_approximate_presets_draw_the_same_masks_at_every_budget(examples, preset: str) -> None:  # noqa: ANN001
    """Against their own budget-1.0 run: only what is recomputed may change, not a draw.
    (``aggressive`` draws with the fast C Philox generator, ``dropout_rng="fast"``.)"""
    example = examples["minilm"]
    batch = example.make_batch(2, 16, seed=1)
    reference_loss, reference = compiled_step(example, batch, backend_at(preset, 1.0))
    for budget in (0.05, 0.0):
        backend = backend_at(preset, budget)
        loss, got = compiled_step(example, batch, backend)
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6, msg=f"budget {budget}")
        assert_grads_close_in_norm(got, reference, rel=2e-5, floor=1e-3)
        assert saved_masks(backend) > 0


def test_fast_rng_under_the_exact_preset_keeps_its_draws(examples) -> None:  # noqa: ANN001
    """``dropout_rng="fast"`` draws other masks than eager; at 0.0 they must still be the 1.0 ones."""
    example = examples["llama"]
    batch = example.make_batch(2, 16, seed=1)
    reference_loss, reference = compiled_step(example, batch, backend_at("exact", 1.0, dropout_rng="fast"))
    loss, got = compiled_step(example, batch, backend_at("exact", 0.0, dropout_rng="fast"))
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close_in_norm(got, reference, rel=2e-5, floor=1e-3)


def test_freezing_variants_keep_their_draws_at_budget_zero(examples) -> None:  # noqa: ANN001
    """A freezing mask variant is partitioned again: it must keep the draws too."""
    example = examples["minilm"]
    batch = example.make_batch(2, 16, seed=1)
    frozen = [module.weight for module in example.model.modules() if isinstance(module, torch.nn.Linear)][::2]
    frozen_ids = {id(p) for p in frozen}
    eager_loss, eager = seeded_step(example, example.model, batch)
    eager = {name: g for name, g in eager.items() if id(example.model.get_parameter(name)) not in frozen_ids}
    backend = backend_at("exact", 0.0, freezing=True, freeze_variants=1)
    torch._dynamo.reset()
    compiled = torch.compile(example.model, backend=backend)
    for _ in range(2):  # the first call runs the gated graph, the second the variant without them
        with fxshear.frozen(frozen):
            loss, got = seeded_step(example, compiled, batch)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert_grads_close_in_norm(got, eager, rel=2e-5, floor=1e-3)
    assert backend.dispatchers[0].stats.compiles == 1


def test_llama_sdpa_with_grouped_heads_reproduces_eagers_masks(monkeypatch) -> None:  # noqa: ANN001
    """HF's SDPA attention passes ``enable_gqa=True`` for grouped k/v heads (with no padding
    mask); fxshear rewrites that call too, so its attention dropout is eager's draw."""
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    example = build_model("llama", dropout=True, attn_implementation="sdpa")
    batch = example.make_batch(2, 16, seed=1)
    eager_loss, eager = seeded_step(example, example.model, batch)
    for budget in (1.0, 0.0):
        backend = backend_at("exact", budget)
        loss, got = compiled_step(example, batch, backend)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6, msg=f"budget {budget}")
        assert_grads_close_in_norm(got, eager, rel=2e-5, floor=1e-3)
        attention = next(r for r in backend.regions[0].pass_reports if r.name == "attention")
        assert attention.rewritten, attention.skipped


def test_a_partition_that_redraws_is_cut_again_with_the_draws_saved(examples, monkeypatch, caplog) -> None:  # noqa: ANN001
    """The guard behind the budget fix: torch's knapsack may still trade a banned random op back
    into recompute (only fxshear's own draws are MUST_SAVE).  Forced here by running the first
    cut at exactly 0.0 on the ``none`` preset, whose dropouts are Inductor's own ``rand`` draws."""
    from fxshear.graph import partitioner

    example = examples["minilm"]
    batch = example.make_batch(2, 16, seed=1)
    reference_loss, reference = compiled_step(example, batch, backend_at("none", 1.0))
    real_cut = partitioner.min_cut_rematerialization_partition
    cuts: list[list[str]] = []

    def first_cut_at_zero(gm, joint_inputs, **kwargs):  # noqa: ANN001, ANN202
        if cuts:
            forward, backward = real_cut(gm, joint_inputs, **kwargs)
        else:
            with partitioner.activation_memory_budget(0.0):
                forward, backward = real_cut(gm, joint_inputs, **kwargs)
        cuts.append(partitioner.redrawn_in_backward(backward))
        return forward, backward

    monkeypatch.setattr(partitioner, "min_cut_rematerialization_partition", first_cut_at_zero)
    with caplog.at_level("INFO", logger="fxshear"):
        loss, got = compiled_step(example, batch, backend_at("none", 1.0))
    assert len(cuts) >= 2 and cuts[0] and not cuts[-1], cuts
    assert "redrew" in caplog.text
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close_in_norm(got, reference, rel=2e-5, floor=1e-3)
