"""Back Razor's opt-in attention targets: pruned matmul operands and softmax output.

The ops against hand-written formulas on hand-pruned tensors, opcheck, the pass against an eager
module built from the same ops (the documented approximation, reproduced exactly), keep ratios
that keep everything against eager PyTorch, config errors, skips and the ledger."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxshear
from fxshear.config import ConfigError, ShearConfig
from fxshear.kernels.prune import prune_pack, unprune_reference
from fxshear.kernels.prune_attention import (
    grad_times_pruned_t,
    pruned_matmul,
    pruned_softmax,
    pruned_softmax_backward,
    pruned_t_times_grad,
)

OPTIONS = {"preset": "aggressive", "prune_ops": ("linear", "attention", "softmax"), "attention_recompute": False}
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 1e-2)}


def dense(x: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """x as its pruned copy reads back: each sample's top-k magnitudes, zeros elsewhere."""
    values, bits = prune_pack(x.detach(), keep_ratio, "torch")
    return unprune_reference(values, bits, x[0].numel()).view(x.shape)


@settings(max_examples=15, deadline=None)
@given(batch=st.sampled_from([(1,), (2, 3), (3,)]), m=st.integers(1, 9), k=st.integers(1, 9), n=st.integers(1, 9),
       keep_ratio=st.sampled_from([1.0, 0.5, 0.2]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_matmul_gradients_read_the_pruned_operands(batch: tuple[int, ...], m: int, k: int, n: int, keep_ratio: float,
                                                   dtype: torch.dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, m, k, generator=generator).to(dtype).requires_grad_()
    b = torch.randn(*batch, k, n, generator=generator).to(dtype).requires_grad_()
    out = pruned_matmul(a, b, *prune_pack(a.detach(), keep_ratio, "torch"), *prune_pack(b.detach(), keep_ratio, "torch"),
                        "torch")
    assert torch.equal(out, torch.matmul(a, b))  # the forward is dense
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    grad_a, grad_b = torch.autograd.grad(out, (a, b), grad)
    a_hat, b_hat = dense(a, keep_ratio).float(), dense(b, keep_ratio).float()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(grad_a.float(), grad.float() @ b_hat.transpose(-1, -2), rtol=rtol, atol=atol * k)
    torch.testing.assert_close(grad_b.float(), a_hat.transpose(-1, -2) @ grad.float(), rtol=rtol, atol=atol * m)
    if keep_ratio == 1.0 and dtype == torch.float32:
        expected = torch.autograd.grad(torch.matmul(a, b), (a, b), grad)
        for actual, wanted in zip((grad_a, grad_b), expected):
            torch.testing.assert_close(actual, wanted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keep_ratio", [1.0, 0.3])
def test_softmax_backward_reads_the_pruned_output(dtype: torch.dtype, keep_ratio: float) -> None:
    x = torch.randn(2, 3, 5, 7).to(dtype).requires_grad_()
    y, values, bits = pruned_softmax(x, -1, keep_ratio, "torch")
    assert torch.equal(y, torch.softmax(x, -1))
    assert values.shape == (2, math.ceil(keep_ratio * 105)) and bits.dtype == torch.uint8
    grad = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    expected = torch._softmax_backward_data(grad, dense(y, keep_ratio), -1, dtype)
    assert torch.equal(grad_x, expected)
    if keep_ratio == 1.0:
        (eager,) = torch.autograd.grad(torch.softmax(x, -1), x, grad)
        torch.testing.assert_close(grad_x, eager)


def test_opcheck() -> None:
    a = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    packs = (*prune_pack(a.detach(), 0.4, "torch"), *prune_pack(b.detach(), 0.4, "torch"))
    torch.library.opcheck(pruned_matmul, (a, b, *packs, "torch"))
    # Only a needs a gradient: only b's pack is kept.
    torch.library.opcheck(pruned_matmul, (a, b.detach(), None, None, *packs[2:], "torch"))
    torch.library.opcheck(pruned_softmax, (a, -1, 0.4, "torch"))
    torch.library.opcheck(pruned_softmax, (a, 1, 0.4, "torch"))
    grad = torch.randn(2, 4, 3, 6, dtype=torch.float64)
    torch.library.opcheck(grad_times_pruned_t, (grad, *packs[2:], 5, "torch"))  # b: [2, 4, 5, 6]
    torch.library.opcheck(pruned_t_times_grad, (grad, *packs[:2], 5, "torch"))  # a: [2, 4, 3, 5]
    torch.library.opcheck(pruned_softmax_backward, (torch.randn_like(a), *packs[:2], -1, "torch"))


def test_op_argument_errors() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="equal batch dims"):
        pruned_matmul(a, b, None, None, None, None, "torch")
    values, _ = prune_pack(a, 0.5, "torch")
    with pytest.raises(ValueError, match="both be given"):
        pruned_matmul(a, torch.randn(2, 4, 5), values, None, None, None, "torch")
    with pytest.raises(ValueError, match="keep_ratio"):
        pruned_softmax(a, -1, 0.0, "torch")


class EagerAttention(nn.Module):
    """BERT's eager self-attention: q·kᵀ / √d + mask → softmax → dropout → ·v → output Linear.

    ``keep_ratio`` set: the same attention built from fxshear's pruned ops, run eagerly, which
    is what the pass must reproduce (Linears left dense)."""

    def __init__(self, dim: int = 32, heads: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.heads, self.p = heads, p
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.keep_ratio: float | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        kt = k.transpose(-1, -2)
        if self.keep_ratio is None:
            scores = torch.matmul(q, kt) / math.sqrt(dim // self.heads) + mask
            probs = F.softmax(scores, dim=-1)
            if self.p:
                probs = F.dropout(probs, self.p, self.training)
            context = torch.matmul(probs, v)
        else:
            ratio = self.keep_ratio
            scores = pruned_matmul(q, kt, *prune_pack(q, ratio, "torch"), *prune_pack(kt, ratio, "torch"), "torch")
            probs, values, bits = pruned_softmax(scores / math.sqrt(dim // self.heads) + mask, -1, ratio, "torch")
            context = pruned_matmul(probs, v, values, bits, *prune_pack(v, ratio, "torch"), "torch")
        return self.out(context.transpose(1, 2).reshape(b, s, dim))


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 10, 32, generator=generator)
    mask = torch.zeros(3, 1, 1, 10)
    mask[1, ..., 7:] = -1e4  # padding in one sample
    return x, mask


def _grads(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    model(x, mask).square().sum().backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return x.grad, grads


def _compiled(model: nn.Module, codegen: bool = True, **options: object) -> tuple[nn.Module, fxshear.ShearBackend]:
    backend = fxshear.ShearBackend(ShearConfig.from_options({**OPTIONS, **options}), codegen=codegen)
    return torch.compile(model, backend=backend), backend


def _report(backend: fxshear.ShearBackend, name: str = "prune_attention"):  # noqa: ANN202
    return next(r for region in backend.regions for r in region.pass_reports if r.name == name)


@pytest.mark.parametrize("codegen", [False, True], ids=["graphs", "inductor"])
def test_the_pass_reproduces_the_pruned_ops_run_eagerly(codegen: bool) -> None:
    torch.manual_seed(0)
    model = EagerAttention()
    reference = copy.deepcopy(model)
    reference.keep_ratio = 0.3
    compiled, backend = _compiled(model, codegen=codegen, keep_ratio=0.3, prune_ops=("attention", "softmax"))
    x, mask = _inputs()
    grad_x, grads = _grads(compiled, x, mask)
    expected_x, expected = _grads(reference, x, mask)
    torch.testing.assert_close(grad_x, expected_x, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    rewritten = _report(backend).rewritten
    assert sum("softmax output pruned" in r for r in rewritten) == 1
    assert sum("matmul keeps pruned" in r for r in rewritten) == 2
    # q·kᵀ, softmax and ·v saved as packs; the softmax's pack serves the ·v matmul.
    packed = [e for region in backend.regions for e in region.ledger.entries if e.introduced_by == "prune_attention"]
    assert sorted(e.dtype for e in packed).count("uint8") == 4, packed  # q, kᵀ, probabilities, v
    dense_probabilities = [e for region in backend.regions for e in region.ledger.entries
                           if tuple(e.shape) == (3, 4, 10, 10) and e.dtype == "float32"]
    assert not dense_probabilities, dense_probabilities


def test_keeping_everything_equals_eager_with_dropout() -> None:
    """A ratio that keeps every entry: the rewritten graph must be eager attention, dropout too
    (the matmul then packs the dropped-out probabilities, not the softmax's)."""
    torch.manual_seed(0)
    model = EagerAttention(p=0.2)
    reference = copy.deepcopy(model)
    compiled, backend = _compiled(model, keep_ratio=0.999999, dropout_rng="eager")  # eager's masks
    x, mask = _inputs(1)
    torch.manual_seed(7)
    grad_x, grads = _grads(compiled, x, mask)
    torch.manual_seed(7)
    expected_x, expected = _grads(reference, x, mask)
    torch.testing.assert_close(grad_x, expected_x, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert len(_report(backend).rewritten) == 3
    packed = [e for region in backend.regions for e in region.ledger.entries if e.introduced_by == "prune_attention"]
    assert [e.dtype for e in packed].count("uint8") == 5, packed  # q, kᵀ, probabilities, dropped out, v


def test_pruned_attention_saves_less_than_linear_pruning_alone() -> None:
    torch.manual_seed(0)
    model = EagerAttention()
    x, mask = _inputs()
    saved = {}
    for ops in (("linear",), ("linear", "attention", "softmax")):
        compiled, backend = _compiled(copy.deepcopy(model), codegen=False, prune_ops=ops)
        _grads(compiled, x, mask)
        saved[ops] = sum(region.ledger.activation_bytes for region in backend.regions)
    assert saved["linear", "attention", "softmax"] < 0.6 * saved["linear",], saved


class NotAttention(nn.Module):
    """Matmuls the attention target must leave alone: a parameter operand, a broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # [2, 5, 8]
        with_parameter = torch.matmul(h, self.weight)
        broadcast = torch.matmul(h, h[0].transpose(-1, -2))  # [2, 5, 8] @ [8, 5]
        return with_parameter.sum() + broadcast.sum()


def test_matmuls_that_are_not_attention_are_left_alone_with_a_reason() -> None:
    compiled, backend = _compiled(NotAttention(), codegen=False)
    x = torch.randn(2, 5, 8)
    compiled(x).backward()
    reasons = [s.reason for s in _report(backend).skipped]
    assert any("graph input or parameter" in r for r in reasons), reasons
    assert any("broadcasting" in r for r in reasons), reasons
    assert not _report(backend).rewritten


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="attention_recompute=False"):
        ShearConfig.from_options(preset="aggressive", prune_ops=("linear", "softmax"))
    with pytest.raises(ConfigError, match="not built"):
        ShearConfig.from_options(preset="aggressive", prune_ops=("norm",))
    # Without pruning the targets are inert, so no conflict to report.
    assert not ShearConfig.from_options(preset="exact", prune_ops=("attention",)).prune
    assert ShearConfig.from_options(preset="aggressive").prune_ops == ("linear",)


def test_dynamic_shapes_compile_once_and_match_the_eager_ops() -> None:
    """``dynamic=True``: batches of other sizes reuse a symbolic graph (the backward ops take their
    operand's size as a SymInt, which the CPU lowering traces), gradients as the eager ops'."""
    torch.manual_seed(0)
    model = EagerAttention()
    reference = copy.deepcopy(model)
    reference.keep_ratio = 0.3
    backend = fxshear.ShearBackend(ShearConfig.from_options(
        {**OPTIONS, "keep_ratio": 0.3, "prune_ops": ("attention", "softmax")}))  # Linears dense, as the reference
    compiled = torch.compile(model, backend=backend, dynamic=True)
    generator = torch.Generator().manual_seed(3)
    for batch, seq in [(2, 10), (3, 12), (4, 7), (2, 9), (5, 11)]:
        x = torch.randn(batch, seq, 32, generator=generator)
        mask = torch.zeros(batch, 1, 1, seq)
        grad_x, grads = _grads(compiled, x, mask)
        expected_x, expected = _grads(reference, x, mask)
        torch.testing.assert_close(grad_x, expected_x, rtol=1e-5, atol=1e-6)
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # At most two graphs: the bit packing guards on whether a sample's size (heads * seq²) is a
    # multiple of 8, so seq 7 / 9 / 11 share one graph and seq 10 / 12 the other.
    assert len(backend.regions) <= 2
    for region in backend.regions:
        assert region.fallback_reason is None
        assert len(next(r for r in region.pass_reports if r.name == "prune_attention").rewritten) == 3
