"""The backend against eager PyTorch, in analysis mode (real partition, no Inductor codegen).

Analysis mode runs exactly the graphs Inductor would receive (Dynamo, fxshear's passes,
AOTAutograd, Inductor's joint passes, the steered min-cut) and executes the partitioned graphs,
so it tests every rewrite and what is saved, at a fraction of the compile time.  Code
generation is covered by tests/test_inductor.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

import fxshear
from fxshear.config import ShearConfig
from fxshear.zoo.models import build_model
from fxshear.passes.act2bit import Act2BitPass
from helpers import assert_grads_close, assert_grads_close_in_norm, gradient_fidelity, grads, with_2bit_activations

MODELS = ["minilm", "llama", "gpt2", "vit"]


def analysis_backend(preset: str = "balanced", **overrides: object) -> fxshear.ShearBackend:
    return fxshear.ShearBackend(ShearConfig.from_options(preset=preset, **overrides), codegen=False)


def report_of(backend: fxshear.ShearBackend, name: str, region: int = 0):  # noqa: ANN201
    return next(r for r in backend.regions[region].pass_reports if r.name == name)


def run(example, module, batch):  # noqa: ANN001, ANN201
    loss = example.loss(module, batch)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("name", MODELS)
def test_balanced_is_exactly_the_documented_approximation(name: str, record_property) -> None:  # noqa: ANN001
    example = build_model(name, size="small", dropout=False)
    batch = example.make_batch(2, 16, seed=1)
    reference = with_2bit_activations(example.model)
    ref_loss = run(example, reference, batch)
    ref_grads = grads(reference)
    exact_loss = run(example, example.model, batch)
    exact_grads = grads(example.model)
    example.model.zero_grad(set_to_none=True)
    # The 2-bit codes alone (the exact rewrites on, the exact-inversion pass off).
    backend = analysis_backend("balanced", act_from_output="off")
    loss = run(example, torch.compile(example.model, backend=backend), batch)
    torch.testing.assert_close(loss, exact_loss, rtol=1e-5, atol=1e-6)  # forward stays exact
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # Norm-wise: the exact rewrites round the pre-activation differently, which may move the
    # rare element sitting on a step threshold by one step.
    assert_grads_close_in_norm(grads(example.model), ref_grads, rel=1e-3, floor=1e-4)
    fidelity = gradient_fidelity(grads(example.model), exact_grads)
    for key, value in fidelity.items():
        record_property(key, value)
    print(f"{name}: balanced vs exact backprop gradient cosine: global {fidelity['global_cosine']:.4f}, "
          f"smallest per parameter {fidelity['min_param_cosine']:.4f}")
    assert fidelity["global_cosine"] > 0.8


def test_ledger_agrees_with_runtime_count_on_minilm() -> None:
    example = build_model("minilm", dropout=True)
    batch = example.make_batch(2, 32)
    for preset in ("exact", "balanced"):
        torch._dynamo.reset()
        backend = analysis_backend(preset)
        compiled = torch.compile(example.model, backend=backend)
        counted = fxshear.measure_saved_bytes(example.loss, compiled, batch)
        counted.output.backward()
        ledger = fxshear.ledger(example.model)
        assert ledger.activation_bytes == counted.activation_bytes, preset
        assert ledger.input_bytes == counted.input_bytes, preset


def test_minilm_ledger_shows_gelu_replaced_by_dense_plus_codes() -> None:
    example = build_model("minilm", dropout=False)
    batch = example.make_batch(2, 32)
    ledgers = {}
    for preset, options in (("none", {}), ("balanced", {"act_from_output": "off"}),
                            ("from_output", {"act_from_output": "all", "act2bit": False})):
        torch._dynamo.reset()
        backend = analysis_backend("balanced" if preset != "none" else "none", **options)
        compiled = torch.compile(example.model, backend=backend)
        example.loss(compiled, batch).backward()
        ledgers[preset] = fxshear.ledger(example.model)
    tokens, intermediate = 2 * 32, 1536

    def dense_intermediate(ledger: fxshear.ModelLedger) -> int:
        return sum(1 for e in ledger.entries if e.kind == "activation" and e.dtype == "float32"
                   and e.shape[-1] == intermediate and e.bytes > 0)

    codes = [e for e in ledgers["balanced"].entries if e.introduced_by == "act2bit" and e.dtype == "uint8"]
    assert len(codes) == 6 and all(e.bytes == tokens * intermediate // 4 for e in codes)
    assert dense_intermediate(ledgers["none"]) == 12  # GELU input and output, per layer
    assert dense_intermediate(ledgers["balanced"]) == 6  # GELU output only (the next Linear needs it)
    assert all(e.source and e.module for e in codes)
    assert ledgers["balanced"].activation_bytes < ledgers["none"].activation_bytes
    # From the output: the same dense output plus one bit per element instead of two.
    flags = [e for e in ledgers["from_output"].entries if e.introduced_by == "act_from_output" and e.dtype == "uint8"]
    assert len(flags) == 6 and all(e.bytes == tokens * intermediate // 8 for e in flags)
    assert dense_intermediate(ledgers["from_output"]) == 6
    assert ledgers["from_output"].activation_bytes < ledgers["balanced"].activation_bytes


def test_a_pass_that_raises_is_dropped_and_training_goes_on(monkeypatch, caplog) -> None:  # noqa: ANN001
    def broken(self, gm, cfg):  # noqa: ANN001, ANN202
        raise RuntimeError("boom")

    monkeypatch.setattr(Act2BitPass, "run", broken)
    example = build_model("llama", dropout=False)
    batch = example.make_batch(2, 16)
    eager_loss = run(example, example.model, batch)
    eager_grads = grads(example.model)
    example.model.zero_grad(set_to_none=True)
    backend = analysis_backend("balanced")
    with caplog.at_level(logging.WARNING, logger="fxshear"):
        loss = run(example, torch.compile(example.model, backend=backend), batch)
    torch.testing.assert_close(loss, eager_loss)
    assert_grads_close(grads(example.model), eager_grads)
    assert report_of(backend, "act2bit").error == "RuntimeError: boom"
    assert "act2bit failed" in caplog.text


def test_a_failing_compile_falls_back_to_the_unmodified_graph(monkeypatch, caplog) -> None:  # noqa: ANN001
    real = fxshear.ShearBackend._compile
    calls = []

    def fail_first(self, gm, example_inputs, region):  # noqa: ANN001, ANN202
        calls.append(gm)
        if len(calls) == 1:
            raise RuntimeError("lowering exploded")
        return real(self, gm, example_inputs, region)

    monkeypatch.setattr(fxshear.ShearBackend, "_compile", fail_first)
    model = build_model("llama", dropout=False)
    batch = model.make_batch(2, 16)
    backend = analysis_backend("balanced")
    with caplog.at_level(logging.WARNING, logger="fxshear"):
        run(model, torch.compile(model.model, backend=backend), batch)
    assert backend.regions[0].fallback_reason == "RuntimeError: lowering exploded"
    assert not any(n.target == torch.ops.fxshear.act2bit.default for n in calls[1].graph.nodes)
    assert "compiling it unmodified" in caplog.text


def test_dynamo_restarts_pass_through_instead_of_falling_back(caplog) -> None:  # noqa: ANN001
    """Eager attention scaled by ``1 / math.sqrt(head_dim)`` under ``dynamic=True``: Dynamo first
    traces the float symbolically, then raises TensorifyScalarRestartAnalysis inside the
    backend's compile to trace the frame again with it specialized.  fxshear must let that
    through, not take it for a failed rewrite and fall back to the unmodified graph."""
    from test_prune_attention import EagerAttention

    backend = fxshear.ShearBackend(ShearConfig.from_options(preset="aggressive"))
    compiled = torch.compile(EagerAttention(), backend=backend, dynamic=True)
    with caplog.at_level(logging.WARNING, logger="fxshear"):
        for batch, seq in ((2, 10), (3, 12)):
            compiled(torch.randn(batch, seq, 32), torch.zeros(batch, 1, 1, seq)).sum().backward()
    assert "compiling it unmodified" not in caplog.text
    assert len(backend.regions) == 1  # the restarted attempt's region is not kept
    assert backend.regions[0].fallback_reason is None
    assert any(r.rewritten for r in backend.regions[0].pass_reports)


def test_on_error_raise_surfaces_the_failure(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(Act2BitPass, "run", lambda self, gm, cfg: (_ for _ in ()).throw(RuntimeError("boom")))
    example = build_model("llama", dropout=False)
    compiled = torch.compile(example.model, backend=analysis_backend("balanced", on_error="raise"))
    with pytest.raises(Exception, match="boom"):
        example.loss(compiled, example.make_batch(2, 16))


def test_unmatched_hand_written_gelu_is_reported() -> None:
    """CLIP's QuickGELU (x·sigmoid(1.702x)) is not GELU: no pass matches it, and the report says so."""
    from transformers.activations import QuickGELUActivation

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.act = QuickGELUActivation()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x))

    backend = analysis_backend("balanced")
    torch.compile(Block(), backend=backend)(torch.randn(2, 8)).sum().backward()
    report = report_of(backend, "act2bit")
    assert report.rewritten == []
    assert any("QuickGELUActivation" in note for note in report.notes), report.notes


def test_excluded_modules_are_left_alone() -> None:
    example = build_model("llama", dropout=False)
    backend = analysis_backend("balanced", exclude=["model.layers.0.*"])
    run(example, torch.compile(example.model, backend=backend), example.make_batch(2, 16))
    report = report_of(backend, "act2bit")
    assert len(report.rewritten) == 1
    assert [s.reason for s in report.skipped] == ["module excluded by pattern 'model.layers.0.*'"]


def test_inference_is_not_rewritten() -> None:
    example = build_model("llama", dropout=False)
    backend = analysis_backend("balanced")
    with torch.no_grad():
        torch.compile(example.model, backend=backend)(**example.make_batch(2, 16))
    assert backend.regions[0].pass_reports == []
    assert fxshear.ledger(example.model).regions == []


def test_graph_copies_keep_what_dynamo_recorded() -> None:
    """Passes and the budget reference work on copies; AOTAutograd must still see Dynamo's graph
    (parameters of static lifetime), or the min-cut pays to save what a parameter gives for free."""
    from fxshear.region import copy_graph_module

    seen: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:  # noqa: ANN001
        seen.append(gm)
        return gm.forward

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    torch.compile(model, backend=capture)(torch.randn(2, 4))
    original = seen[0]
    copy = copy_graph_module(original)
    assert copy.meta.get("dynamo_compile_id") == original.meta["dynamo_compile_id"]
    assert copy._param_name_to_source == original._param_name_to_source
    sources = [p._dynamo_source for p in copy.graph.find_nodes(op="placeholder")]
    assert sources == [p._dynamo_source for p in original.graph.find_nodes(op="placeholder")]


@pytest.mark.slow
def test_budget_reference_is_what_the_unrewritten_graph_saves_under_inductor() -> None:
    """The reference a budget is read against equals a preset="none" backend's own partition."""
    example = build_model("minilm", dropout=True)
    batch = example.make_batch(8, 128, seed=1)  # smaller, the knapsack never reaches the embeddings
    saved = {}
    for preset in ("none", "exact"):
        torch._dynamo.reset()
        backend = fxshear.ShearBackend(ShearConfig.from_options(preset=preset, memory_budget=0.1), codegen=False)
        torch.compile(example.model, backend=backend)(**batch).backward()
        (region,) = backend.regions
        saved[preset] = region.ledger.activation_bytes if preset == "none" else region.reference.activations
    assert saved["exact"] == saved["none"]
