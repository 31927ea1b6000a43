"""fxshear through Inductor's real code generation (C++ on CPU): slow, so kept few and targeted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxshear
from conftest import toy_mlp
from fxshear.zoo.models import build_model
from helpers import assert_grads_close, assert_grads_close_in_norm, gradient_fidelity, grads, with_2bit_activations

pytestmark = pytest.mark.slow


def _train_step(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    loss = module(x).square().mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("preset", ["exact", "balanced"])
def test_toy_mlp_matches_eager_and_ledger_matches_runtime(preset: str) -> None:
    model = toy_mlp()
    x = torch.randn(16, 32)
    reference = with_2bit_activations(model) if preset == "balanced" else model
    ref_loss = _train_step(reference, x)
    ref_grads = grads(reference)
    model.zero_grad(set_to_none=True)
    # balanced with the 2-bit codes alone, so the reference is the published step function
    options = {"act_from_output": "off"} if preset == "balanced" else {}
    compiled = torch.compile(model, backend=fxshear.backend(preset=preset, **options))
    counted = fxshear.measure_saved_bytes(compiled, x)
    loss = counted.output.square().mean()
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    assert_grads_close(grads(model), ref_grads)
    ledger = fxshear.ledger(model)
    assert ledger.activation_bytes == counted.activation_bytes
    codes = [e for e in ledger.entries if e.introduced_by == "act2bit" and e.dtype == "uint8"]
    assert len(codes) == (1 if preset == "balanced" else 0)


def test_llama_silu_balanced_through_inductor() -> None:
    example = build_model("llama", dropout=False)
    batch = example.make_batch(2, 16)
    reference = with_2bit_activations(example.model)
    ref_loss = example.loss(reference, batch)
    ref_loss.backward()
    compiled = torch.compile(example.model, backend="fxshear", options={"preset": "balanced"})
    loss = example.loss(compiled, batch)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(example.model), grads(reference), rtol=1e-4, atol=1e-5)


def test_minilm_balanced_through_inductor(record_property) -> None:  # noqa: ANN001
    example = build_model("minilm", dropout=False)
    batch = example.make_batch(4, 64)
    exact_loss = example.loss(example.model, batch)
    exact_loss.backward()
    exact_grads = grads(example.model)
    example.model.zero_grad(set_to_none=True)
    reference = with_2bit_activations(example.model)
    example.loss(reference, batch).backward()
    compiled = torch.compile(example.model, backend=fxshear.backend(preset="balanced", act_from_output="off"))
    counted = fxshear.measure_saved_bytes(example.loss, compiled, batch)
    counted.output.backward()
    torch.testing.assert_close(counted.output, exact_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close_in_norm(grads(example.model), grads(reference), rel=5e-3)  # measured 5.7e-4
    assert fxshear.ledger(example.model).activation_bytes == counted.activation_bytes
    fidelity = gradient_fidelity(grads(example.model), exact_grads)
    record_property("minilm_global_grad_cosine", fidelity["global_cosine"])
    print(f"MiniLM (Inductor): balanced vs exact gradient cosine {fidelity}")


def test_minilm_exact_through_inductor_equals_eager_with_dropout_on() -> None:
    """fxshear's dropout draws its masks as eager does, so even with dropout on and Inductor's
    code generation the exact preset reproduces eager's loss and gradients for the same seed
    (plain torch.compile draws different masks)."""
    example = build_model("minilm", dropout=True)
    batch = example.make_batch(4, 64)
    torch.manual_seed(7)
    eager_loss = example.loss(example.model, batch)
    eager_loss.backward()
    eager_grads = grads(example.model)
    example.model.zero_grad(set_to_none=True)
    compiled = torch.compile(example.model, backend=fxshear.backend(preset="exact"))
    torch.manual_seed(7)
    counted = fxshear.measure_saved_bytes(example.loss, compiled, batch)
    counted.output.backward()
    torch.testing.assert_close(counted.output, eager_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close_in_norm(grads(example.model), eager_grads, rel=1e-4, floor=1e-4)
    assert fxshear.ledger(example.model).activation_bytes == counted.activation_bytes


def _compile_in_fresh_process(cache_dir: Path, preset: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    script = Path(__file__).parent / "scripts" / "compile_once.py"
    result = subprocess.run([sys.executable, str(script), preset], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_warm_cache_gives_the_same_graphs_ledger_and_numbers(tmp_path: Path) -> None:
    cold = _compile_in_fresh_process(tmp_path, "balanced")
    warm = _compile_in_fresh_process(tmp_path, "balanced")
    assert cold["replayed"] == [False]  # the partitioner ran and was recorded
    assert warm["aot_cache_hits"] >= 1 and warm["replayed"] == [True]  # our hooks were skipped
    assert warm["ledger"] == cold["ledger"]
    assert warm["graphs"] == cold["graphs"]
    assert warm["loss"] == cold["loss"] and warm["grads"] == cold["grads"]
    assert any(e["introduced_by"] == "act_from_output" for r in warm["ledger"]["regions"] for e in r["entries"])
    # A different config must not be served from the balanced entry.
    plain = _compile_in_fresh_process(tmp_path, "none")
    assert plain["ledger"] != cold["ledger"]
    assert not any(e["introduced_by"] for r in plain["ledger"]["regions"] for e in r["entries"])


def test_cpu_lowering_fuses_the_op_and_keeps_codes_exact() -> None:
    """On CPU the op is lowered after partitioning: no eager fallback call in the generated code,
    and the codes Inductor computes equal the reference for values on the thresholds."""
    from torch._inductor.utils import run_and_get_code

    from fxshear.kernels.act2bit_reference import STEPS

    thresholds = torch.tensor(STEPS["gelu"].thresholds, dtype=torch.float32)
    x = torch.cat([thresholds, torch.nextafter(thresholds, thresholds + 1), torch.randn(90) * 4])
    x = x.reshape(4, 24).requires_grad_()
    grad = torch.randn(4, 24)

    def step(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(t * 1.0)

    compiled = torch.compile(step, backend=fxshear.backend(preset="balanced"))
    out, codes = run_and_get_code(lambda: torch.autograd.grad(compiled(x), x, grad))
    from fxshear.kernels.act2bit import gelu2

    (expected,) = torch.autograd.grad(gelu2(x * 1.0, "none", "torch"), x, grad)
    assert torch.equal(out[0], expected)
    assert not any("torch.ops.fxshear" in code for code in codes)


@pytest.mark.parametrize("shape", [(4, 24), (3, 7)], ids=["planes-even", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["gelu", "silu"])
def test_inductor_code_math_equals_the_reference_bit_for_bit(shape, dtype, kind) -> None:  # noqa: ANN001
    """The aten math the CPU lowering inlines, compiled by Inductor (vectorized, fp32 code sums,
    int32 shifts), writes the reference's codes and computes its backward bit for bit."""
    from fxshear.kernels import act2bit_inductor
    from fxshear.kernels.act2bit_reference import backward_reference, encode_reference

    x = (torch.randn(shape) * 4).to(dtype)
    x.view(-1)[:3] = torch.tensor([-0.0, float("inf"), float("nan")])  # codes 2, 3, 0
    grad = torch.randn(shape).to(dtype)
    forward = torch.compile(act2bit_inductor.fused_forward, dynamic=False)
    backward = torch.compile(act2bit_inductor.fused_backward, dynamic=False)
    y, packed = forward(x, kind, "none")
    assert torch.equal(packed, encode_reference(x, kind))
    exact = torch.nn.functional.gelu(x) if kind == "gelu" else torch.nn.functional.silu(x)
    torch.testing.assert_close(y.reshape(-1)[3:], exact.reshape(-1)[3:])  # Inductor's own GELU/SiLU (inf and NaN are its business)
    assert torch.equal(backward(grad, packed, kind), backward_reference(grad, packed, kind))
