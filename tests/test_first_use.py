"""A first-time user's slips: each is one clear message at the call that made it, naming the fix."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fxshear
from fxshear.config import ConfigError
from fxshear.zoo.models import build_model


def _fxshear_warnings(caplog) -> list[str]:  # noqa: ANN001
    return [r.getMessage() for r in caplog.records if r.name == "fxshear" and r.levelno >= logging.WARNING]


def test_train_step_on_a_container_without_forward_is_an_error() -> None:
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    with pytest.raises(ConfigError, match=r"ModuleDict has no forward of its own \(children: body, head\).*"
                                          r"Pass the module your step calls"):
        fxshear.train_step(model, freeze=None)
    with pytest.raises(ConfigError, match="ModuleList has no forward"):
        fxshear.train_step(nn.ModuleList([nn.Linear(4, 4)]), freeze=None)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _eager(self.fc, x)


@torch.compiler.disable
def _eager(fc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(fc(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block() for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_frozen_weights_running_eagerly_are_one_warning_not_one_per_weight_per_step(caplog) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    @fxshear.train_step(model, optimizer, freeze="fixed", active=["layers.0.*"])
    def step(x: torch.Tensor) -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    with caplog.at_level(logging.WARNING, logger="fxshear"):
        for _ in range(3):
            step(torch.randn(2, 8))
    leaks = [m for m in _fxshear_warnings(caplog) if "ran outside a compiled region" in m]
    assert len(leaks) == 1, leaks
    assert leaks[0].startswith("fxshear: 3 frozen weights (layers.1.fc.weight")


def test_inspect_without_an_example_batch_says_what_to_pass() -> None:
    with pytest.raises(ConfigError, match=r"given none: fxshear.inspect\(model, \*inputs\)"):
        fxshear.inspect(nn.Linear(4, 4))


def test_ledger_before_any_step_says_what_to_call_first() -> None:
    with pytest.raises(ConfigError, match=r"no fxshear-compiled region has run for this model yet.*"
                                          r"Compile and run one step first"):
        fxshear.ledger(nn.Linear(3, 3))


@pytest.mark.parametrize("options, match", [
    ({"max_autotune": True}, r"'max_autotune' is an Inductor option.*torch._inductor.config.max_autotune = True"),
    ({"triton.cudagraphs": True}, r"'triton.cudagraphs' is an Inductor option"),
    ({"mode": "max-autotune"}, r"'mode' is an argument of torch.compile"),
    ({"options": {"preset": "aggressive"}}, r"takes its options as keywords.*fxshear.backend\(preset='aggressive'\)"),
])
def test_options_of_torch_compile_or_inductor_given_to_fxshear_backend(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        fxshear.backend(**options)


def _run(compiled: nn.Module) -> None:
    compiled(torch.randn(2, 4, requires_grad=True)).sum().backward()


def test_an_inductor_option_in_torch_compile_options_names_where_it_goes() -> None:
    torch._dynamo.reset()
    with pytest.raises(Exception, match="'max_autotune' is an Inductor option"):
        _run(torch.compile(nn.Linear(4, 4), backend="fxshear", options={"max_autotune": True}))


def test_torch_compile_options_do_not_silently_miss_a_configured_backend() -> None:
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"does not reach a configured fxshear backend.*"
                                        r"backend=fxshear.backend\(preset='aggressive'\)"):
        _run(torch.compile(nn.Linear(4, 4), backend=fxshear.backend(), options={"preset": "aggressive"}))


def test_a_mode_fxshear_does_not_apply_is_said_once(caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.WARNING, logger="fxshear"):
        for _ in range(2):
            torch._dynamo.reset()
            _run(torch.compile(nn.Linear(4, 4), backend="fxshear", mode="max-autotune-no-cudagraphs"))
    said = [m for m in _fxshear_warnings(caplog) if "mode='max-autotune-no-cudagraphs'" in m]
    assert len(said) == 1


def test_a_float64_model_hears_what_the_preset_does_instead(caplog) -> None:  # noqa: ANN001
    example = build_model("llama", dropout=False)
    model = example.model.to(torch.float64)
    backend = fxshear.ShearBackend(fxshear.ShearConfig.from_options(preset="aggressive"), codegen=False)
    with caplog.at_level(logging.WARNING, logger="fxshear"):
        example.loss(torch.compile(model, backend=backend), example.make_batch(2, 8)).backward()
    said = [m for m in _fxshear_warnings(caplog) if "computes in float64" in m]
    assert len(said) == len([r for r in backend.regions if r.has_backward]) == 1
    assert "'aggressive' preset's rewrites handle float32, float16 and bfloat16" in said[0]
    assert "model.float()" in said[0]


def test_triton_kernels_asked_for_on_cpu_say_what_runs_instead(caplog) -> None:  # noqa: ANN001
    backend = fxshear.ShearBackend(fxshear.ShearConfig.from_options(preset="exact", kernels="triton"), codegen=False)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="fxshear"):
        _run(torch.compile(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)), backend=backend))
    said = [m for m in _fxshear_warnings(caplog) if "kernels='triton'" in m]
    assert len(said) == 1 and "runs on cpu" in said[0] and "torch implementations run instead" in said[0]
