"""Hand-written GELU/SiLU formulas are recognised, replaced by the library calls, and stay exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fxshear
from fxshear.config import ShearConfig
from helpers import assert_grads_close, grads


def gelu_new(x: torch.Tensor) -> torch.Tensor:  # Hugging Face's NewGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_tanh_cubed_by_hand(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x * x * x)))


def gelu_erf(x: torch.Tensor) -> torch.Tensor:  # Hugging Face's gelu_python
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:  # CLIP's: not GELU, must be left alone
    return x * torch.sigmoid(1.702 * x)


class MLP(torch.nn.Module):
    def __init__(self, activation, width: int = 16) -> None:  # noqa: ANN001
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


def _backend(preset: str = "balanced", passes: tuple[str, ...] | None = None, **options: object) -> fxshear.ShearBackend:
    return fxshear.ShearBackend(ShearConfig.from_options(preset=preset, **options), codegen=False, pass_names=passes)


def _reports(backend: fxshear.ShearBackend) -> dict[str, list[str]]:
    return {r.name: r.rewritten for region in backend.regions for r in region.pass_reports}


@pytest.mark.parametrize(("activation", "label", "library"), [
    (gelu_new, "gelu, tanh formula", lambda x: F.gelu(x, approximate="tanh")),
    (gelu_tanh_cubed_by_hand, "gelu, tanh formula", lambda x: F.gelu(x, approximate="tanh")),
    (gelu_erf, "gelu, erf formula", F.gelu),
    (swish, "silu formula", F.silu),
])
def test_formula_becomes_the_library_call_and_gradients_stay_exact(activation, label, library) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = MLP(activation)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(activation(x), library(x), rtol=1e-5, atol=1e-6)  # same function
    model(x).square().sum().backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    # The pass alone: the library call computes the same function, so gradients stay eager's.
    backend = _backend(passes=("gelu_formula",))
    torch.compile(model, backend=backend)(x).square().sum().backward()
    assert [r.split(" ", 1)[1] for r in _reports(backend)["gelu_formula"]] == [f"({label})"]
    assert_grads_close(grads(model), expected, rtol=1e-4, atol=1e-6)
    # With every pass, the activation passes now see it.
    torch._dynamo.reset()
    backend = _backend()
    torch.compile(model, backend=backend)(x).square().sum().backward()
    reports = _reports(backend)
    assert len(reports["act_from_output"]) + len(reports["act2bit"]) == 1, reports


def test_formula_stays_as_written_where_no_activation_pass_would_use_it() -> None:
    """exact in fp32: the inversion is not exact enough and the 2-bit codes are off, so replacing
    the formula would only change its rounding."""
    backend = _backend("exact")
    torch.compile(MLP(gelu_new), backend=backend)(torch.randn(2, 16)).sum().backward()
    (report,) = [r for region in backend.regions for r in region.pass_reports if r.name == "gelu_formula"]
    assert not report.rewritten
    assert [s.reason for s in report.skipped] == ["no activation pass rewrites a gelu in float32 under this config"]


def test_look_alikes_and_shared_intermediates_are_left_alone() -> None:
    class SharedTanh(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
            return 0.5 * x * (1.0 + torch.tanh(inner)) + inner  # inner is used again

    for activation in (quick_gelu, SharedTanh()):
        torch._dynamo.reset()
        backend = _backend()
        model = MLP(activation)
        torch.compile(model, backend=backend)(torch.randn(2, 16)).sum().backward()
        assert _reports(backend)["gelu_formula"] == []


def test_gpt2_gelu_new_reaches_the_activation_passes() -> None:
    from fxshear.zoo.models import build_model

    example = build_model("gpt2", dropout=False)
    backend = _backend("balanced")
    example.loss(torch.compile(example.model, backend=backend), example.make_batch(2, 16)).backward()
    reports = _reports(backend)
    layers = example.model.config.n_layer
    assert len(reports["gelu_formula"]) == layers
    # GPT-2's next layer is a Conv1D (addmm on a view), which saves the GELU output: the
    # inversion from that output (1 bit) is preferred to the 2-bit codes.
    assert len(reports["act_from_output"]) == layers
    assert reports["act2bit"] == []
