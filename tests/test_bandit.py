"""The freezing policies of Sheared Backprop: hand-computed bandit updates, masks, resumable state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxshear
from fxshear.sched import (
    BanditPolicy,
    BanditSettings,
    FixedPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    project_capped_simplex,
)


def test_projection_by_hand() -> None:
    # clamp(w - tau, 0.05, 1) sums to 1 at tau = 0.225: [0.675, 0.275, 0.05 (clamped)]
    p = project_capped_simplex(torch.tensor([0.9, 0.5, 0.1]), total=1.0, low=0.05)
    torch.testing.assert_close(p, torch.tensor([0.675, 0.275, 0.05], dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=40), st.floats(0.0, 1.0))
def test_projection_meets_the_constraints(values: list[float], fraction: float) -> None:
    w = torch.tensor(values, dtype=torch.float64)
    low = 1e-3
    total = low * len(values) + fraction * (1 - low) * len(values)
    p = project_capped_simplex(w, total, low)
    assert math.isclose(float(p.sum()), total, rel_tol=1e-9, abs_tol=1e-9)
    assert float(p.min()) >= low - 1e-12 and float(p.max()) <= 1.0 + 1e-12
    # order-preserving: a larger weight never gets a smaller probability
    order = torch.argsort(w)
    assert bool((p[order][1:] >= p[order][:-1] - 1e-12).all())


def test_bandit_update_by_hand() -> None:
    """n = 3, keep 0.5: p = 0.5 each; arms 0, 1 active with gradient norms 2 and 1.

    L = 2; l = (L / p_min)^2 - (g / p)^2 = 4e6 - [16, 4], shifted to [0, 12]; the inactive arm 0.
    w = 0.5 exp(-1e-3 * l / 0.5) = [0.5, 0.5 e^-0.024, 0.5]; projected onto sum 1.5 (no bound
    active) every entry moves by the same (1.5 - sum w) / 3.
    """
    bandit = BanditPolicy(3, BanditSettings(sparsity=0.5, period=20, alpha=1e-3, p_min=1e-3))
    bandit.sample()
    bandit.mask = torch.tensor([True, True, False])  # the draw, fixed for the hand computation
    bandit.update(torch.tensor([2.0, 1.0, 123.0]))  # the frozen arm's norm is ignored
    w = torch.tensor([0.5, 0.5 * math.exp(-0.024), 0.5], dtype=torch.float64)
    expected = w + (1.5 - w.sum()) / 3
    torch.testing.assert_close(bandit.p, expected)
    assert bandit.p[0] > bandit.p[1]  # the arm with the larger gradient is sampled more often


def test_bandit_holds_its_mask_for_a_period_and_never_freezes_everything() -> None:
    bandit = BanditPolicy(8, BanditSettings(sparsity=0.75, period=5), seed=3)
    masks = [bandit.sample() for _ in range(20)]
    for start in range(0, 20, 5):
        assert all(torch.equal(masks[start], m) for m in masks[start:start + 5])
    assert all(m.any() for m in masks)
    tiny = BanditPolicy(1, BanditSettings(sparsity=0.9, p_min=0.05), seed=0)
    assert all(tiny.sample().all() for _ in range(50))  # a single arm is always active


def test_updates_only_on_sampling_steps() -> None:
    bandit = BanditPolicy(4, BanditSettings(period=3))
    bandit.sample()
    bandit.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    after_first = bandit.p.clone()
    bandit.sample()  # held step
    bandit.update(torch.tensor([9.0, 9.0, 9.0, 0.1]))
    assert torch.equal(bandit.p, after_first)
    bandit.update(torch.tensor([math.nan] * 4))  # non-finite feedback is ignored too
    assert torch.equal(bandit.p, after_first)


@pytest.mark.parametrize("make", [
    lambda: BanditPolicy(10, BanditSettings(period=3), seed=7),
    lambda: RandomPolicy(10, sparsity=0.5, seed=7),
    lambda: RoundRobinPolicy([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], sparsity=0.6),
])
def test_state_dict_round_trip_continues_identically(make) -> None:  # noqa: ANN001
    def run(policy, steps: int) -> list[torch.Tensor]:  # noqa: ANN001
        out = []
        for _ in range(steps):
            out.append(policy.sample())
            policy.update(torch.arange(1.0, 11.0) * policy.step)  # feedback that varies by step
        return out

    straight = make()
    expected = run(straight, 12)
    first, second = make(), make()
    run(first, 5)
    second.load_state_dict(first.state_dict())
    assert [m.tolist() for m in run(second, 7)] == [m.tolist() for m in expected[5:]]
    if isinstance(second, BanditPolicy):
        assert torch.equal(second.p, straight.p)


def test_simple_policies() -> None:
    random = RandomPolicy(10, sparsity=0.7, seed=1)
    assert all(int(random.sample().sum()) == 3 for _ in range(10))
    robin = RoundRobinPolicy([[0], [1, 2], [3]], sparsity=0.5)
    assert [robin.sample().tolist() for _ in range(3)] == [
        [True, True, True, False], [True, False, False, True], [False, True, True, True]]
    fixed = FixedPolicy(4, active=[3])
    assert fixed.sample().tolist() == [False, False, False, True]


def test_configs_that_freeze_everything_are_errors() -> None:
    with pytest.raises(fxshear.ConfigError, match="sparsity"):
        BanditSettings(sparsity=1.0)
    with pytest.raises(fxshear.ConfigError, match="p_min"):
        BanditSettings(sparsity=0.5, p_min=0.7)
    with pytest.raises(fxshear.ConfigError, match="freezes everything"):
        FixedPolicy(3, active=[])
    with pytest.raises(fxshear.ConfigError, match="at least one arm"):
        RandomPolicy(0)
    with pytest.raises(ValueError, match="cannot be loaded"):
        RandomPolicy(3).load_state_dict(BanditPolicy(3).state_dict())
