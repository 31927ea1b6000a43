"""Per-step freezing in compiled regions: gated matmuls, mask variants, no recompiles."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxshear
from fxshear.config import ConfigError, ShearConfig
from fxshear.freezing import gated_mm as gated_mm_module
from fxshear.freezing.gated_mm import gated_mm
from fxshear.zoo.models import build_model

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# -- the op ------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 17), k=st.integers(1, 13), n=st.integers(1, 11), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_gated_mm_is_mm_when_open_and_zeros_when_frozen(m, k, n, dtype, seed) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    weight = torch.zeros(n, k, requires_grad=True)
    assert torch.equal(gated_mm(a, b, weight), torch.mm(a, b))
    closed = gated_mm(a, b, weight.detach())
    assert closed.shape == (m, n) and closed.dtype == dtype and not closed.any()


# The gate is the weight's requires_grad as the compiled forward received it: a run-time property
# that AOTAutograd's tracing does not carry (its functional tensors never require grad).  fxshear
# inserts the op into the joint graph *after* tracing, so the aot_dispatch check does not apply;
# the compiled behaviour is tested end to end below.
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_mm_opcheck(dtype: torch.dtype) -> None:
    a = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    torch.library.opcheck(gated_mm, (a, b, torch.zeros(4, 3, requires_grad=True)), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(gated_mm, (a, b, torch.zeros(4, 3)), test_utils=OPCHECK_TESTS)


def test_gated_dropout_input_weight_grad_opcheck_and_values() -> None:
    from fxshear.kernels.dropout_bits import dropout_draw
    from fxshear.freezing.gated_mm import gated_dropout_input_weight_grad
    from fxshear.kernels.shared_linear import dropout_input_weight_grad

    z, grad = torch.randn(3, 4, 6), torch.randn(3, 4, 5)
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    bits = dropout_draw(z, 0.2, "torch")
    args = (grad, z, gamma, beta, bits, 0.2, "torch")
    trained, frozen = torch.zeros(5, 6, requires_grad=True), torch.zeros(5, 6)
    for weight in (trained, frozen):
        torch.library.opcheck(gated_dropout_input_weight_grad, (*args, weight), test_utils=OPCHECK_TESTS)
    torch.testing.assert_close(gated_dropout_input_weight_grad(*args, trained), dropout_input_weight_grad(*args))
    assert not gated_dropout_input_weight_grad(*args, frozen).any()


# -- compiled regions --------------------------------------------------------------------------
def block_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name]


def eager_grads(model: torch.nn.Module, example, batch, frozen_indices) -> dict[str, torch.Tensor | None]:  # noqa: ANN001
    reference = copy.deepcopy(model)
    linears = block_linears(reference)
    for i in frozen_indices:
        linears[i].weight.requires_grad_(False)
    example.loss(reference, batch).backward()
    return {n: p.grad for n, p in reference.named_parameters()}


@pytest.fixture(scope="module")
def minilm():  # noqa: ANN201
    return build_model("minilm", dropout=False)


@pytest.mark.parametrize("preset", ["none", "exact"])
def test_frozen_weights_get_no_gradient_and_the_rest_match_eager(minilm, preset: str) -> None:  # noqa: ANN001
    model = copy.deepcopy(minilm.model)
    batch = minilm.make_batch(2, 16)
    backend = fxshear.ShearBackend(ShearConfig.from_options(preset=preset, freezing=True), codegen=False)
    compiled = torch.compile(model, backend=backend)
    linears = block_linears(model)
    rng = random.Random(0)
    for _ in range(3):
        frozen_indices = sorted(rng.sample(range(len(linears)), len(linears) // 2))
        with fxshear.frozen(linears[i].weight for i in frozen_indices):
            minilm.loss(compiled, batch).backward()
        expected = eager_grads(model, minilm, batch, frozen_indices)
        for name, p in model.named_parameters():
            if expected[name] is None:
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
        model.zero_grad(set_to_none=True)
    assert len(backend.regions) == 1  # no recompile for any mask
    dispatcher = backend.dispatchers[0]
    assert dispatcher.stats.compiles == 0
    assert dispatcher.region.readable_graphs()["backward"].count("gated_mm") >= len(linears)  # + pooler, head


def test_frozen_matmuls_are_skipped(minilm, monkeypatch) -> None:  # noqa: ANN001
    model = copy.deepcopy(minilm.model)
    batch = minilm.make_batch(2, 16)
    backend = fxshear.ShearBackend(ShearConfig.from_options(preset="exact", freezing=True), codegen=False)
    compiled = torch.compile(model, backend=backend)
    linears = block_linears(model)
    calls: list[int] = []
    monkeypatch.setattr(gated_mm_module, "_matmul", lambda a, b: calls.append(1) or torch.mm(a, b))
    minilm.loss(compiled, batch).backward()
    all_active = len(calls)
    calls.clear()
    with fxshear.frozen(linears[i].weight for i in range(0, len(linears), 3)):
        minilm.loss(compiled, batch).backward()
    assert all_active == len(linears)
    assert len(calls) == len(linears) - len(range(0, len(linears), 3))


def test_variants_drop_saved_tensors_and_are_bounded(minilm) -> None:  # noqa: ANN001
    model = copy.deepcopy(minilm.model)
    batch = minilm.make_batch(2, 16)
    backend = fxshear.ShearBackend(ShearConfig.from_options(preset="exact", freezing=True, freeze_variants=2),
                                   codegen=False)
    compiled = torch.compile(model, backend=backend)
    linears = block_linears(model)
    rng = random.Random(1)
    masks = [sorted(rng.sample(range(len(linears)), 18)) for _ in range(4)]
    for frozen_indices in masks:
        with fxshear.frozen(linears[i].weight for i in frozen_indices):
            minilm.loss(compiled, batch).backward()
        expected = eager_grads(model, minilm, batch, frozen_indices)
        for name, p in model.named_parameters():
            assert (p.grad is None) == (expected[name] is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
        model.zero_grad(set_to_none=True)
    dispatcher = backend.dispatchers[0]
    assert dispatcher.stats.compiles == 2 and len(dispatcher.variants) == 3
    full = dispatcher.region.ledger.activation_bytes
    for mask, (variant, _) in dispatcher.variants.items():
        if mask:
            assert variant.ledger.activation_bytes < full
    # A mask beyond the cap runs the full graph (gated), whose ledger is the full one.
    assert dispatcher.last.frozen == frozenset()
    assert dispatcher.analysis_ledger(dispatcher.last_requested).activation_bytes < full


def test_freeze_variants_needs_freezing() -> None:
    with pytest.raises(ConfigError, match="freezing=True"):
        ShearConfig.from_options(freeze_variants=2)
    with pytest.raises(ConfigError, match="freeze_variants"):
        ShearConfig.from_options(freezing=True, freeze_variants=-1)


def test_pruned_linears_are_gated_too(minilm) -> None:  # noqa: ANN001
    """aggressive: freezing leaves every other gradient as the unfrozen graph computes it."""
    model = copy.deepcopy(minilm.model)
    batch = minilm.make_batch(2, 16)
    backend = fxshear.ShearBackend(ShearConfig.from_options(preset="aggressive", freezing=True), codegen=False)
    compiled = torch.compile(model, backend=backend)
    minilm.loss(compiled, batch).backward()
    unfrozen = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    linears = block_linears(model)
    frozen_weights = {id(linears[i].weight) for i in range(1, len(linears), 2)}
    with fxshear.frozen(linears[i].weight for i in range(1, len(linears), 2)):
        minilm.loss(compiled, batch).backward()
    for name, p in model.named_parameters():
        if id(p) in frozen_weights:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, unfrozen[name], rtol=1e-5, atol=1e-6, msg=name)
    backward = backend.dispatchers[0].region.readable_graphs()["backward"]
    assert "gated_pruned_weight_grad" in backward and "gated_mm" in backward


@pytest.mark.slow
def test_linears_behind_a_dropout_are_gated_too() -> None:
    """With dropout on, the first layer's q/k/v read the embedding LayerNorm's z through the
    embedding dropout: their weight gradients are gated like every other one.  Lowered through
    Inductor (codegen on): the gated op must keep the eager-input layout metadata in step with
    its extra argument, or lowering fails."""
    example = build_model("minilm", dropout=True)
    model, batch = example.model, example.make_batch(2, 16)
    backend = fxshear.ShearBackend(ShearConfig.from_options(preset="exact", freezing=True))
    compiled = torch.compile(model, backend=backend)
    torch.manual_seed(3)
    example.loss(compiled, batch).backward()
    unfrozen = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    attention = model.encoder.encoder.layer[0].attention.self
    frozen = [attention.query.weight, attention.value.weight]
    torch.manual_seed(3)
    with fxshear.frozen(frozen):
        example.loss(compiled, batch).backward()
    for name, p in model.named_parameters():
        if any(p is f for f in frozen):
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, unfrozen[name], rtol=1e-5, atol=1e-6, msg=name)
    backward = backend.dispatchers[0].region.readable_graphs()["backward"]
    assert backward.count("fxshear.gated_dropout_input_weight_grad.default(") == 3
