"""DDP and FSDP2 under ``backend="fxshear"`` with real process groups: 2 spawned ranks on
``gloo`` (``nccl`` where the machine has two GPUs), each run bounded in time.

What is compared: every gradient after one step on each rank's half of a global batch against a
one-process run of the whole batch under the same backend and compile scope (within 1e-5) and eager (within 1e-4:
Inductor reassociates fp32 sums; on MiniLM one cancelling bias gradient moves by 2.2e-5 relative
in one process too); dropout off; a parameter whose exact gradient is zero, such as an attention key bias, is judged against 1e-3 of the whole gradient norm). per-step
freezing's masks and final weights across ranks, bit for bit; and that a rank left waiting by
another gives up with a message instead of hanging.
"""

from __future__ import annotations

import pytest
import torch

import distributed_scenarios as scenarios
from distributed_runner import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def _worst_relative(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Worst ‖g − r‖ / ‖r‖ over the parameters, the denominator at least 1e-3 of the whole
    gradient's norm: attention key biases have an exact gradient of zero (softmax ignores a
    shift shared by a row), so theirs is rounding noise whose own relative error means nothing."""
    assert grads.keys() == reference.keys()
    floor = 1e-3 * float(torch.stack([r.norm() for r in reference.values()]).norm())
    return max(float((grads[k] - reference[k]).norm()) / max(float(reference[k].norm()), floor) for k in reference)


def _references(model_name: str) -> dict:
    return {"whole": scenarios.reference_step(model_name, preset="exact"),
            "blocks": scenarios.reference_step(model_name, preset="exact", scope="blocks"),
            "eager": scenarios.reference_step(model_name)}


@pytest.fixture(scope="module")
def llama_reference() -> dict:
    return _references("llama")


def _check_ranks_match_one_process(results: list[dict], reference: dict, scope: str = "whole") -> list[dict]:
    outs = [r["result"] for r in results]
    for out in outs:
        assert _worst_relative(out["grads"], reference[scope]["grads"]) < 1e-5
        assert _worst_relative(out["grads"], reference["eager"]["grads"]) < 1e-4
    assert outs[0]["ledger"] == outs[1]["ledger"]  # the same fragments, the same bytes, on every rank
    return outs


def test_ddp_compiled_around_the_wrapper_matches_one_process(llama_reference) -> None:
    outs = _check_ranks_match_one_process(
        run_ranks(scenarios.ddp_step, model_name="llama", preset="exact", order="compile_ddp"), llama_reference)
    ledger = outs[0]["ledger"]
    # DDPOptimizer split the graph at bucket boundaries; the ledger reports each fragment and the total
    assert ledger["fragments"] > 1 and ledger["total"] == sum(ledger["per_fragment"])


def test_fsdp2_per_block_compile_matches_one_process(llama_reference) -> None:
    outs = _check_ranks_match_one_process(
        run_ranks(scenarios.fsdp_step, model_name="llama", preset="exact", compile_scope="blocks"), llama_reference,
        "blocks")
    # compiled per block, the LM head and its loss run eagerly (FSDP2's root): no fused loss here
    assert not outs[0]["ledger"]["fused_loss"]


@pytest.mark.slow
def test_fsdp2_whole_model_fuses_the_loss_on_the_gathered_lm_head(llama_reference) -> None:
    """Compiled whole, FSDP2's root all-gathers the LM head before the head's graph runs, so the
    fused linear + cross-entropy sees the full [vocab, hidden] weight (no size mismatch) and no
    logits are saved."""
    outs = _check_ranks_match_one_process(
        run_ranks(scenarios.fsdp_step, model_name="llama", preset="exact", compile_scope="whole"), llama_reference)
    assert outs[0]["ledger"]["fused_loss"] and not outs[0]["ledger"]["logits_saved"]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["llama", "minilm"])
def test_every_order_and_scope_matches_one_process(model_name) -> None:
    reference = _references(model_name)
    _check_ranks_match_one_process(
        run_ranks(scenarios.ddp_step, model_name=model_name, preset="exact", order="ddp_compile", timeout_s=400),
        reference)
    for scope in ("blocks", "whole"):
        _check_ranks_match_one_process(
            run_ranks(scenarios.fsdp_step, model_name=model_name, preset="exact", compile_scope=scope, timeout_s=400),
            reference, scope)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["balanced", "aggressive"])
def test_approximate_presets_run_under_ddp_and_fsdp2(preset) -> None:
    for outs in (run_ranks(scenarios.ddp_step, model_name="llama", preset=preset, order="compile_ddp"),
                 run_ranks(scenarios.fsdp_step, model_name="llama", preset=preset, compile_scope="blocks")):
        a, b = (r["result"] for r in outs)
        assert torch.isfinite(torch.tensor(a["loss"])) and a["grads"].keys() == b["grads"].keys()
        for key in a["grads"]:  # after the all-reduce / reduce-scatter, the same gradient on both ranks
            assert torch.equal(a["grads"][key], b["grads"][key]), key


def _masks_and_weights_agree(engine: str, steps: int) -> dict:
    a, b = (r["result"] for r in run_ranks(scenarios.freeze_steps, engine=engine, steps=steps, timeout_s=400))
    assert torch.equal(a["masks"], b["masks"])
    assert (a["masks"][1:] != a["masks"][:-1]).any(dim=1).sum() >= 2, "the bandit should redraw every 5 steps"
    assert not a["masks"].all(), "something must have been frozen"
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    assert torch.equal(a["p"], b["p"])  # the bandit learned the same probabilities from the same norms
    return a


def test_freezing_under_ddp_draws_one_mask_on_every_rank() -> None:
    result = _masks_and_weights_agree("ddp", 40)
    assert result["compiles"] == 1  # one graph for every mask


@pytest.mark.slow
def test_freezing_under_fsdp2_draws_one_mask_on_every_rank() -> None:
    _masks_and_weights_agree("fsdp", 40)


def test_a_policy_with_rank_local_randomness_is_an_error_on_every_rank() -> None:
    results = run_ranks(scenarios.freeze_steps, engine="ddp", steps=1, policy="rank_local", allow_failure=True)
    for result in results:
        assert not result["ok"] and "different masks on different ranks" in result["error"]


def test_a_stalled_rank_makes_the_other_fail_within_the_timeout_not_hang() -> None:
    results = run_ranks(scenarios.one_rank_stalls, stall_s=15.0, timeout_s=120.0)
    waiting = results[0]["result"]
    assert waiting["error"] and "did not complete" in waiting["error"]
    assert waiting["seconds"] < 10.0


def test_ddp_freezing_without_find_unused_parameters_is_a_clear_error() -> None:
    results = run_ranks(scenarios.ddp_freezing_without_unused_detection, allow_failure=True, timeout_s=120)
    for result in results:
        assert not result["ok"] and "find_unused_parameters=True" in result["error"]


@pytest.mark.slow
def test_hf_trainer_on_two_ranks_logs_the_one_process_losses(tmp_path) -> None:
    """Trainer(torch_compile_backend="fxshear") on 2 processes, MiniLM (real weights): the logged
    (rank-averaged) loss of every step equals a 1-process run of the same global batches."""
    two = run_ranks(scenarios.trainer_losses, out_dir=str(tmp_path), timeout_s=600)
    one = scenarios.trainer_losses(0, 1, str(tmp_path / "one"))
    for result in two:
        assert result["result"]["world"] == 2
        assert result["result"]["losses"] == pytest.approx(one["losses"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_as_the_launcher(tmp_path, llama_reference) -> None:
    """The real launcher: ``torchrun --standalone --nproc_per_node 2`` starts the ranks and sets
    their environment; the script joins the group from it."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "grads.pt"
    script = Path(__file__).resolve().parent / "scripts" / "torchrun_ddp.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["world"] == 2
    assert _worst_relative(result["grads"], llama_reference["whole"]["grads"]) < 1e-5
