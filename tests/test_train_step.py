"""``@fxshear.train_step``: freezing policies around a user's step, compile bounds, resumption."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxshear
import fxshear.sched  # the public alias of fxshear.freezing the tests use (not imported by fxshear itself)
from fxshear.config import ConfigError
from fxshear.zoo.models import build_model
from fxshear.freezing.arms import find_arms


@pytest.fixture(scope="module")
def llama():  # noqa: ANN201
    return build_model("llama", size="small", dropout=False)


def make_step(example, model, optimizer, **kwargs):  # noqa: ANN001, ANN003, ANN201
    @fxshear.train_step(model, optimizer, **kwargs)
    def step(batch):  # noqa: ANN001, ANN202
        loss = example.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


def test_compiled_freezing_matches_eager_freezing(llama) -> None:  # noqa: ANN001
    """Same policy and seed: the compiled step (no requires_grad toggles) trains as eager does."""
    batch = llama.make_batch(2, 16)
    runs = []
    for compile_ in (True, False):
        model = copy.deepcopy(llama.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        step = make_step(llama, model, optimizer, freeze="bandit", period=2, compile=compile_, seed=3)
        losses = [step(batch).item() for _ in range(6)]
        runs.append((model, step, losses))
    (compiled_model, compiled_step, compiled_losses), (eager_model, eager_step, eager_losses) = runs
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(compiled_model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled_step.metrics[-1].saved_activation_bytes > 0
    assert compiled_step.metrics[-1].frozen_arms == eager_step.metrics[-1].frozen_arms > 0


@pytest.mark.slow
def test_200_steps_of_changing_masks_compile_a_bounded_number_of_times(llama) -> None:  # noqa: ANN001
    """A new random mask every step: compiles stay at regions + freeze_variants, frozen weights stay
    put, and no parameter's requires_grad is ever toggled."""
    model = copy.deepcopy(llama.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # no momentum: a frozen weight must not move
    toggled = []  # requires_grad of the arms as the user's step sees them, mask applied

    @fxshear.train_step(model, optimizer, freeze="random", sparsity=0.5, freeze_variants=2)
    def step(batch):  # noqa: ANN001, ANN202
        toggled.append(not all(arm.parameter.requires_grad for arm in step.arms))
        loss = llama.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    arms = step.arms
    batch = llama.make_batch(2, 16)
    step(batch)
    regions = len(step.backend.regions)
    for _ in range(199):
        before = [arm.parameter.detach().clone() for arm in arms]
        step(batch)
        frozen = step.metrics[-1].frozen_arms
        moved = [not torch.equal(b, arm.parameter) for b, arm in zip(before, arms)]
        assert len(moved) - sum(moved) == frozen  # exactly the frozen arms did not train
    assert len(step.backend.regions) == regions  # Dynamo never recompiled
    # Frozen weights reach the graph detached; requires_grad is never toggled, so torch 2.11's
    # stale-graph bug (pytorch#139476, a graph cached for other requires_grad flags) cannot arise.
    assert not any(toggled)
    variant_compiles = sum(d.stats.compiles for d in step.backend.dispatchers)
    assert variant_compiles <= 2 * len(step.backend.dispatchers)
    assert step.compiles == regions + variant_compiles
    assert {m.compiles for m in step.metrics[10:]} == {step.compiles}


def test_state_dict_round_trip_continues_identically(llama) -> None:  # noqa: ANN001
    batch = llama.make_batch(2, 16)

    def fresh():  # noqa: ANN202
        model = copy.deepcopy(llama.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, optimizer, make_step(llama, model, optimizer, freeze="bandit", period=3, compile=False, seed=5)

    model, optimizer, step = fresh()
    for _ in range(4):
        step(batch)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), step.state_dict()))
    expected = [(float(step(batch).detach()), step.policy.mask.clone()) for _ in range(5)]

    model, optimizer, step = fresh()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    step.load_state_dict(saved[2])
    resumed = [(float(step(batch).detach()), step.policy.mask.clone()) for _ in range(5)]
    for (loss_a, mask_a), (loss_b, mask_b) in zip(expected, resumed):
        assert loss_a == loss_b and torch.equal(mask_a, mask_b)


def test_frozen_grads_stay_none_after_zero_grad_without_set_to_none(llama) -> None:  # noqa: ANN001
    model = copy.deepcopy(llama.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    @fxshear.train_step(model, optimizer, freeze="random", sparsity=0.5, compile=False)
    def step(batch):  # noqa: ANN001, ANN202
        optimizer.zero_grad(set_to_none=False)
        loss = llama.loss(model, batch)
        loss.backward()
        return loss

    batch = llama.make_batch(2, 16)
    for _ in range(3):
        step(batch)
        active = step.policy.mask.tolist()
        for arm, on in zip(step.arms, active):
            assert (arm.parameter.grad is not None) == on, arm.name


def test_a_weight_never_trained_is_warned_about(llama) -> None:  # noqa: ANN001
    model = copy.deepcopy(llama.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = make_step(llama, model, optimizer, freeze="fixed", active=["*layers.0.*"], stale_after=3, compile=False)
    batch = llama.make_batch(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            step(batch)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("layers.1" in m and "no gradient for 3 steps" in m for m in messages)
    assert all("layers.0" not in m for m in messages)
    assert step.stale_arms() and all("layers.1" in name for name in step.stale_arms())


@pytest.mark.slow
def test_metrics_are_recorded_and_handed_to_a_callback(llama) -> None:  # noqa: ANN001
    model = copy.deepcopy(llama.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    step = make_step(llama, model, optimizer, freeze=None, on_metrics=seen.append)
    step(llama.make_batch(2, 8))
    (metrics,) = step.metrics
    assert seen == [metrics]
    assert metrics.step == 1 and metrics.seconds > 0 and metrics.active_fraction == 1.0
    assert metrics.loss == pytest.approx(metrics.loss) and metrics.saved_activation_bytes > 0
    assert step.backend.dispatchers == []  # freeze=None: the plain backend


@pytest.mark.parametrize("kwargs, match", [
    ({"freeze": "fixed"}, "needs active"),
    ({"freeze": "fixed", "active": ["nothing.*"]}, "matches no freezable weight"),
    ({"freeze": "bandit", "sparsity": 1.0}, "sparsity"),
    ({"freeze": "sometimes"}, "freeze must be one of"),
    ({"freeze": "bandit", "arms": ["nothing*"]}, "no trainable Linear weight"),
    ({"freeze": "bandit", "stale_after": 0}, "stale_after"),
    ({"freeze": "bandit", "compile": False, "memory_budget": 0.5}, "need compile=True"),
])
def test_configs_that_cannot_train_are_errors(llama, kwargs, match) -> None:  # noqa: ANN001
    model = copy.deepcopy(llama.model)
    with pytest.raises(ConfigError, match=match):
        fxshear.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_compiled_model_and_foreign_optimizer_are_errors(llama) -> None:  # noqa: ANN001
    model = copy.deepcopy(llama.model)
    with pytest.raises(ConfigError, match="not torch.compile"):
        fxshear.train_step(torch.compile(model), None)
    head_only = torch.optim.SGD(model.lm_head.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizer does not hold"):
        fxshear.train_step(model, head_only)


def test_arms_are_block_linears(llama) -> None:  # noqa: ANN001
    names = [arm.name for arm in find_arms(llama.model)]
    assert names and all(".layers." in n for n in names)
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in names)
    toy = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="no trainable Linear weight"):
        find_arms(toy)


class RecordingPolicy(fxshear.sched.FreezePolicy):
    """Freezes arm 0 every step and records the feedback it is given."""

    name = "recording"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.feedback: list[torch.Tensor] = []

    def _next_mask(self) -> torch.Tensor:
        mask = torch.ones(self.n, dtype=torch.bool)
        mask[0] = False
        return mask

    @property
    def wants_feedback(self) -> bool:
        return True

    def update(self, gradient_norms: torch.Tensor) -> None:
        self.feedback.append(gradient_norms.clone())


def test_policy_learns_from_the_gradient_norms_of_the_active_arms(llama) -> None:  # noqa: ANN001
    model = copy.deepcopy(llama.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    policy = RecordingPolicy(len(find_arms(model)))
    expected = []

    @fxshear.train_step(model, optimizer, freeze=policy, compile=False)
    def step(batch):  # noqa: ANN001, ANN202
        loss = llama.loss(model, batch)
        loss.backward()
        expected.append([0.0 if a.parameter.grad is None else float(a.parameter.grad.norm()) for a in step.arms])
        optimizer.step()
        optimizer.zero_grad()
        return loss

    step(llama.make_batch(2, 8))
    (feedback,) = policy.feedback
    assert feedback[0] == 0.0 and (feedback[1:] > 0).all()
    torch.testing.assert_close(feedback, torch.tensor(expected[0], dtype=torch.float64), rtol=1e-6, atol=0)


def test_distributed_ranks_share_rank_zeros_mask(llama, tmp_path) -> None:  # noqa: ANN001
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = copy.deepcopy(llama.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        step = make_step(llama, model, optimizer, freeze="random", compile=False)
        step(llama.make_batch(2, 8))
        assert step.metrics[-1].frozen_arms == int((~step.policy.mask).sum()) > 0
    finally:
        dist.destroy_process_group()


def test_per_mask_ledger_drops_what_only_frozen_weights_needed(llama) -> None:  # noqa: ANN001
    model = copy.deepcopy(llama.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = make_step(llama, model, optimizer, freeze="fixed", active=["*layers.0.*"])
    step(llama.make_batch(2, 16))
    (full,) = step.ledgers()
    (per_mask,) = step.ledgers(per_mask=True)
    assert per_mask.activation_bytes < full.activation_bytes
    assert step.saved_activation_bytes() == full.activation_bytes
