"""fxshear::linear_cross_entropy: F.cross_entropy(F.linear(...)) without keeping the logits.

Loss and the gradients w.r.t. hidden, weight and bias against eager autograd, for every option
of the op; opcheck; chunking invariance; what autograd keeps for backward.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fxshear.kernels.linear_cross_entropy import (
    cross_entropy_chunk_reference,
    default_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy,
    linear_cross_entropy_backward,
)

LOW_DTYPES = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *LOW_DTYPES]
# Norm-wise relative error allowed against eager autograd on the same inputs.  Both sides round
# the same logits; they differ in where the 16-bit roundings of dlogits and the sums happen.
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype = torch.float32, *, bias: bool = True,
                ignore: float = 0.25, seed: int = 0, weight_grad: bool = True, hidden_grad: bool = True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator).to(dtype).requires_grad_(hidden_grad)
    weight = (torch.randn(v, h, generator=generator) * 2 / h**0.5).to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(v, generator=generator) * 0.5).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < ignore] = -100
    return hidden, weight, b, target


def leaves(hidden, weight, bias):  # noqa: ANN001, ANN201
    return [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    """Per-token losses (reduction="none") weighted by fixed factors of both signs, so each row's
    gradient reaches the leaves with its own incoming gradient."""
    if loss.dim() == 0:
        return loss
    factors = torch.linspace(-1.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return (loss * factors).sum()


def eager(hidden, weight, bias, target, *, logits_fp32=True, class_weight=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
    logits = F.linear(hidden, weight, bias)
    if logits_fp32:
        logits = logits.float() if logits.dtype != torch.float64 else logits
    if class_weight is not None:
        class_weight = class_weight.to(logits.dtype)
    loss = F.cross_entropy(logits, target, weight=class_weight, **kwargs)
    return loss, torch.autograd.grad(_scalar(loss), leaves(hidden, weight, bias)) if loss.requires_grad else ()


def fused(hidden, weight, bias, target, **kwargs):  # noqa: ANN001, ANN003, ANN201
    loss = fused_linear_cross_entropy(hidden, weight, bias, target, **kwargs)
    return loss, torch.autograd.grad(_scalar(loss), leaves(hidden, weight, bias)) if loss.requires_grad else ()


def class_weights(v: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(v, generator=torch.Generator().manual_seed(seed + 7)) * 2 + 0.1


@contextlib.contextmanager
def saved_shapes():  # noqa: ANN201
    """The shapes of the tensors autograd saves inside the block, in a list filled as it runs."""
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_matches(actual, expected, dtype: torch.dtype, loss_rtol: float | None = None) -> None:  # noqa: ANN001
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert torch.equal(loss.isnan(), ref_loss.isnan())
    rtol = REL_TOL[dtype] if loss_rtol is None else loss_rtol
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=rtol, atol=rtol, equal_nan=True)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        if r.abs().max() == 0:
            # exactly zero in eager (e.g. one class with label smoothing: p - (1 - eps) - eps/V),
            # a rounding residue here: bounded on the scale of the probabilities, which is 1
            assert g.abs().max() <= REL_TOL[dtype]
        else:
            assert rel_err(g, r) <= REL_TOL[dtype], (rel_err(g, r), dtype)


# --------------------------------------------------------------------------- against eager

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class_weight"])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_fp64_matches_eager_exactly(reduction: str, label_smoothing: float, bias: bool, weighted: bool,
                                    chunk_size: int) -> None:
    """fp64: every option, chunk sizes that do (1, 16) and do not (5) divide N, and > N (64)."""
    args = make_inputs(16, 9, 37, torch.float64, bias=bias)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing,
                  class_weight=class_weights(37).double() if weighted else None)
    assert_matches(fused(*args, chunk_size=chunk_size, **kwargs), eager(*args, **kwargs), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class_weight"])
def test_matches_eager_logits_fp32(dtype: torch.dtype, reduction: str, label_smoothing: float, weighted: bool) -> None:
    """HF's ``F.cross_entropy(lm_head(h).float(), t)``: fp32 loss, grads in the inputs' dtype."""
    args = make_inputs(40, 24, 131, dtype)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing,
                  class_weight=class_weights(131) if weighted else None)
    assert_matches(fused(*args, chunk_size=7, **kwargs), eager(*args, **kwargs), dtype,
                   loss_rtol=REL_TOL[torch.float32] if dtype in LOW_DTYPES else None)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_eager_logits_in_input_dtype(dtype: torch.dtype, reduction: str) -> None:
    """``logits_fp32=False``: loss in the input dtype.  Eager rounds its log-softmax to 16 bits,
    this op does the softmax in fp32, so the loss agrees to 16-bit rounding only."""
    args = make_inputs(40, 24, 131, dtype)
    actual = fused(*args, chunk_size=9, reduction=reduction, logits_fp32=False)
    expected = eager(*args, reduction=reduction, logits_fp32=False)
    assert_matches(actual, expected, dtype, loss_rtol=3e-2 if dtype == torch.bfloat16 else 5e-3)
    # The loss is closer to the exact loss of the same rounded logits than eager's is.
    logits = F.linear(*[t.detach() for t in args[:3]]).double()
    exact = F.cross_entropy(logits, args[3], reduction=reduction)
    assert abs(actual[0].double() - exact) <= abs(expected[0].double() - exact) + 1e-3 * abs(exact)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class_weight"])
def test_all_targets_ignored(reduction: str, label_smoothing: float, weighted: bool) -> None:
    """mean: NaN loss (0/0) and zero gradients, as eager; sum: 0; none: a 0 per row."""
    args = make_inputs(6, 5, 11, ignore=1.0)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing,
                  class_weight=class_weights(11) if weighted else None)
    (loss, grads), (ref_loss, ref_grads) = fused(*args, chunk_size=4, **kwargs), eager(*args, **kwargs)
    assert torch.equal(loss.isnan(), ref_loss.isnan())
    assert loss.isnan().all().item() == (reduction == "mean")
    if reduction == "none":
        assert torch.equal(loss, torch.zeros(6))
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(r, torch.zeros_like(r))


def test_ignored_rows_get_zero_hidden_gradient() -> None:
    hidden, weight, bias, target = make_inputs(12, 6, 17, ignore=0.5, seed=3)
    ignored = target == -100
    assert 0 < ignored.sum() < 12
    grad_hidden = fused(hidden, weight, bias, target, chunk_size=5)[1][0]
    assert torch.equal(grad_hidden[ignored], torch.zeros_like(grad_hidden[ignored]))
    assert (grad_hidden[~ignored].abs().sum(1) > 0).all()


def test_custom_ignore_index() -> None:
    hidden, weight, bias, target = make_inputs(10, 6, 17, ignore=0.0, seed=4)
    target[::3] = 5  # a real class used as ignore_index
    kwargs = dict(ignore_index=5, label_smoothing=0.1)
    assert_matches(fused(hidden, weight, bias, target, chunk_size=3, **kwargs),
                   eager(hidden, weight, bias, target, **kwargs), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_weight_and_frozen_hidden(dtype: torch.dtype) -> None:
    """need_weight_grad / need_hidden_grad False: the gradient is an empty [0] tensor."""
    hidden, weight, _, target = make_inputs(10, 8, 23, dtype, bias=False, weight_grad=False)
    assert_matches(fused(hidden, weight, None, target, chunk_size=4), eager(hidden, weight, None, target), dtype,
                   loss_rtol=2e-5)
    loss, gh, gw, gb = linear_cross_entropy(hidden.detach(), weight, None, target, -100, 0.0, "mean", 4,
                                            True, True, False, "torch")
    assert gh.shape == hidden.shape and gw.shape == (0,) and gb.shape == (0,)

    hidden, weight, bias, target = make_inputs(10, 8, 23, dtype, hidden_grad=False)
    assert_matches(fused(hidden, weight, bias, target, chunk_size=4), eager(hidden, weight, bias, target), dtype,
                   loss_rtol=2e-5)
    _, gh, gw, gb = linear_cross_entropy(hidden, weight.detach(), bias.detach(), target, -100, 0.0, "mean", 4,
                                         True, False, True, "torch")
    assert gh.shape == (0,) and gw.shape == weight.shape and gw.dtype == dtype and gb.shape == bias.shape


def test_loss_only_under_no_grad() -> None:
    hidden, weight, bias, target = make_inputs(10, 8, 23)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, None, target, label_smoothing=0.1)
        ref = F.cross_entropy(F.linear(hidden, weight), target, label_smoothing=0.1)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref)
    _, gh, gw, gb = linear_cross_entropy(hidden.detach(), weight.detach(), None, target, -100, 0.1, "sum", 3,
                                         True, False, False, "torch")
    assert gh.shape == gw.shape == gb.shape == (0,)


@pytest.mark.parametrize("scale", [3.0, -0.5])
def test_grad_loss_scaling(scale: float) -> None:
    hidden, weight, bias, target = make_inputs(12, 8, 19)
    loss = fused_linear_cross_entropy(hidden, weight, bias, target, chunk_size=5, label_smoothing=0.1)
    grads = torch.autograd.grad(loss * scale, (hidden, weight, bias))
    ref = F.cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing=0.1)
    ref_grads = torch.autograd.grad(ref * scale, (hidden, weight, bias))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_gradcheck_fp64() -> None:
    hidden, weight, bias, target = make_inputs(7, 4, 9, torch.float64, ignore=0.3, seed=5)

    def fn(h, w, b):  # noqa: ANN001, ANN202
        return fused_linear_cross_entropy(h, w, b, target, chunk_size=3, label_smoothing=0.15)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_size_changes_results_only_by_rounding(dtype: torch.dtype) -> None:
    hidden, weight, bias, target = make_inputs(33, 16, 71, dtype)
    results = [fused(hidden, weight, bias, target, chunk_size=c, label_smoothing=0.1) for c in (1, 4, 10, 33, 1000)]
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, results[0][1]):
            # grad_weight/bias are fp32 sums over chunks; only their summation order changes.
            assert rel_err(g, r) <= (1e-6 if dtype == torch.float32 else 1e-2)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 24),
    h=st.integers(1, 17),
    v=st.integers(1, 41).map(lambda x: 2 * x - 1),
    dtype=st.sampled_from([torch.float64, *DTYPES]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.05, 0.5]),
    bias=st.booleans(),
    weighted=st.booleans(),
    ignore=st.sampled_from([0.0, 0.3, 1.0]),
    chunk_size=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
# one class with label smoothing: eager's gradient is exactly 0, ours a 1e-16 residue (found by hypothesis)
@example(n=1, h=1, v=1, dtype=torch.float64, reduction="none", label_smoothing=0.05, bias=False, weighted=False,
         ignore=0.0, chunk_size=1, seed=0)
def test_hypothesis_against_eager(n, h, v, dtype, reduction, label_smoothing, bias, weighted, ignore,  # noqa: ANN001
                                  chunk_size, seed) -> None:
    args = make_inputs(n, h, v, dtype, bias=bias, ignore=ignore, seed=seed)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing,
                  class_weight=class_weights(v, seed) if weighted else None)
    actual, expected = fused(*args, chunk_size=chunk_size, **kwargs), eager(*args, **kwargs)
    assert_matches(actual, expected, dtype, loss_rtol=1e-12 if dtype == torch.float64 else 1e-5)


def test_flattens_leading_dims_and_int32_targets() -> None:
    hidden, weight, bias, target = make_inputs(12, 8, 19)
    hidden3 = hidden.detach().reshape(3, 4, 8).requires_grad_()
    loss = fused_linear_cross_entropy(hidden3, weight, bias, target.reshape(3, 4).int(), chunk_size=5)
    (g3,) = torch.autograd.grad(loss, hidden3)
    ref = F.cross_entropy(F.linear(hidden3, weight, bias).reshape(12, -1), target)
    (r3,) = torch.autograd.grad(ref, hidden3)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g3, r3)
    op_loss = linear_cross_entropy(hidden.detach(), weight.detach(), None, target.int(), -100, 0.0, "sum", 5,
                                   True, False, False, "torch")[0]
    torch.testing.assert_close(op_loss, F.cross_entropy(F.linear(hidden, weight), target, reduction="sum"))


# --------------------------------------------------------------------------- op mechanics

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(dtype: torch.dtype, bias: bool) -> None:
    hidden, weight, b, target = make_inputs(7, 5, 13, dtype, bias=bias, seed=1)
    torch.library.opcheck(linear_cross_entropy,
                          (hidden, weight, b, target, -100, 0.1, "mean", 3, True, True, True, "torch"))
    torch.library.opcheck(linear_cross_entropy,
                          (hidden, weight.detach(), b, target, -100, 0.0, "sum", 4, False, True, False, "torch"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("logits_fp32", [True, False])
def test_given_logits_match_recomputed_and_stay_untouched(dtype: torch.dtype, logits_fp32: bool) -> None:
    """A model that returns its logits hands them in: same loss and gradients, logits unmodified."""
    hidden, weight, b, target = make_inputs(11, 6, 17, dtype, seed=2)
    logits = F.linear(hidden, weight, b).detach()
    before = logits.clone()
    args = (hidden, weight, b, target, -100, 0.1, "mean", 4, logits_fp32, True, True, "torch")
    recomputed = linear_cross_entropy(*args)
    given = linear_cross_entropy(*args, logits)
    assert torch.equal(logits, before)
    for g, r in zip(given, recomputed):  # a chunk's matmul may round unlike the full one
        torch.testing.assert_close(g, r)
    torch.library.opcheck(linear_cross_entropy, (*args, logits))
    with pytest.raises(ValueError, match="logits must be the Linear's output"):
        linear_cross_entropy(*args, logits[:, :-1])


def test_opcheck_no_grads() -> None:
    hidden, weight, _, target = make_inputs(5, 4, 9, hidden_grad=False, weight_grad=False)
    torch.library.opcheck(linear_cross_entropy,
                          (hidden, weight, None, target, -100, 0.0, "mean", 2, True, False, False, "torch"))


def test_saves_no_logits_for_backward() -> None:
    """Autograd keeps [N, H] + [V, H] + [V] gradients, nothing of shape [N, V]."""
    n, h, v = 32, 8, 97
    hidden, weight, bias, target = make_inputs(n, h, v)
    with saved_shapes() as saved:
        fused_linear_cross_entropy(hidden, weight, bias, target, chunk_size=8)
    assert sorted(saved) == sorted([(n, h), (v, h), (v,)])
    with saved_shapes() as saved:
        F.cross_entropy(F.linear(hidden, weight, bias), target)
    assert (n, v) in saved  # what eager keeps, for contrast


def test_aot_eager_compile_matches_eager() -> None:
    hidden, weight, bias, target = make_inputs(12, 8, 19, seed=2)

    def fn(h, w, b, t):  # noqa: ANN001, ANN202
        return fused_linear_cross_entropy(h.reshape(3, 4, 8), w, b, t.reshape(3, 4), chunk_size=5,
                                          label_smoothing=0.1)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, bias, target)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    ref_loss, ref_grads = eager(hidden, weight, bias, target, label_smoothing=0.1)
    assert_matches((loss, grads), (ref_loss, ref_grads), torch.float32)


def test_backward_refuses_a_gradient_it_did_not_compute() -> None:
    hidden, weight, bias, target = make_inputs(6, 4, 9)
    loss = linear_cross_entropy(hidden, weight, bias, target, -100, 0.0, "mean", 4, True, True, False, "torch")[0]
    with pytest.raises(RuntimeError, match="need_weight_grad=False"):
        loss.backward()


def test_bad_arguments_are_clear() -> None:
    hidden, weight, bias, target = make_inputs(6, 4, 9)
    with pytest.raises(ValueError, match="class_weight must be"):
        fused_linear_cross_entropy(hidden, weight, bias, target, class_weight=torch.ones(8))
    with pytest.raises(ValueError, match="class_weight must be"):
        fused_linear_cross_entropy(hidden, weight, bias, target, class_weight=torch.ones(9, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_cross_entropy(hidden, weight, bias, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cross_entropy(hidden, weight, bias, target, label_smoothing=1.0)
    with pytest.raises(ValueError, match="target values"):
        fused_linear_cross_entropy(hidden, weight, bias, torch.full((6,), 9))
    with pytest.raises(ValueError, match="share a dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), None, target)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, bias, target, chunk_size=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_linear_cross_entropy(hidden, weight, bias, target, impl="cuda")
    with pytest.raises(TypeError, match="target"):
        fused_linear_cross_entropy(hidden, weight, bias)


def test_empty_batch() -> None:
    hidden, weight, bias, target = make_inputs(0, 4, 9)
    assert fused_linear_cross_entropy(hidden, weight, bias, target).isnan()
    loss = fused_linear_cross_entropy(hidden, weight, bias, target, reduction="sum")
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert grads[0].shape == (0, 4) and not grads[1].any() and not grads[2].any()


def test_default_chunk_size() -> None:
    assert default_chunk_size(128256) == 128  # 64 MiB of fp32 logits, a multiple of 16
    assert default_chunk_size(128256, logits_fp32=False, dtype=torch.bfloat16) == 256
    assert default_chunk_size(32000) == 512
    assert default_chunk_size(10**9) == 1
    assert default_chunk_size(32000, device="cpu") == 128  # 16 MiB on CPU
    assert default_chunk_size(32000, device=torch.device("cuda")) == 512
    assert default_chunk_size(32000, budget_bytes=8 * 2**20, device="cpu") == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunk_step_reference_against_autograd(dtype: torch.dtype) -> None:
    """The per-chunk step: row losses and dlogits equal F.cross_entropy's, per row."""
    logits = (torch.randn(9, 31) * 4).to(dtype)
    target = torch.randint(0, 31, (9,))
    target[2] = -100
    x = logits.float().requires_grad_()
    ref_rows = F.cross_entropy(x, target, reduction="none", label_smoothing=0.2)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum() * 0.125, x)
    row_loss = torch.empty(9)
    buffer = logits.clone()
    cross_entropy_chunk_reference(buffer, target, row_loss, torch.tensor(0.125), -100, 0.2)
    torch.testing.assert_close(row_loss, ref_rows, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(buffer, ref_grad.to(dtype))


# --------------------------------------------------------------------------- reduction="none", class weights

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_none_and_class_weight(dtype: torch.dtype, bias: bool) -> None:
    hidden, weight, b, target = make_inputs(7, 5, 13, dtype, bias=bias, seed=1)
    cw = class_weights(13)
    torch.library.opcheck(linear_cross_entropy,
                          (hidden, weight, b, target, -100, 0.1, "none", 3, True, True, True, "torch", None, cw))
    torch.library.opcheck(linear_cross_entropy,
                          (hidden, weight, b, target, -100, 0.0, "mean", 3, False, True, True, "torch", None, cw))
    grad_rows = torch.linspace(-1, 1, 7)
    torch.library.opcheck(linear_cross_entropy_backward,
                          (grad_rows, hidden.detach(), weight.detach(), None if b is None else b.detach(), target,
                           cw, -100, 0.2, 4, True, True, True, bias, "torch"))


def test_none_keeps_hidden_not_logits_and_returns_target_shape() -> None:
    """reduction="none": autograd keeps the inputs (hidden, weight, bias, target), no [N, V]."""
    n, h, v = 32, 8, 97
    hidden, weight, bias, target = make_inputs(n, h, v)
    with saved_shapes() as saved:
        loss = fused_linear_cross_entropy(hidden.reshape(4, 8, h), weight, bias, target.reshape(4, 8),
                                          reduction="none", chunk_size=8)
    assert loss.shape == (4, 8)
    assert sorted(saved) == sorted([(n, h), (v, h), (v,), (n,)])


def test_none_backward_weights_each_row_and_skips_what_is_not_needed() -> None:
    hidden, weight, bias, target = make_inputs(10, 6, 21, hidden_grad=False)
    loss = fused_linear_cross_entropy(hidden, weight, bias, target, reduction="none", chunk_size=3)
    rows = torch.zeros(10)
    rows[4] = 1.0  # only row 4 contributes
    gw, gb = torch.autograd.grad(loss, (weight, bias), rows)
    ref = F.cross_entropy(F.linear(hidden[4:5], weight, bias), target[4:5], reduction="sum")
    rgw, rgb = torch.autograd.grad(ref, (weight, bias)) if target[4] != -100 else (torch.zeros_like(weight),) * 2
    torch.testing.assert_close(gw, rgw)
    torch.testing.assert_close(gb, rgb)
    grads = linear_cross_entropy_backward(rows, hidden, weight.detach(), bias.detach(), target, None, -100, 0.0, 3,
                                          True, False, True, False, "torch")
    assert grads[0].shape == (0,) and grads[1].shape == weight.shape and grads[2].shape == (0,)


def test_aot_eager_compile_none_with_class_weight() -> None:
    hidden, weight, bias, target = make_inputs(12, 8, 19, seed=2)
    cw = class_weights(19)

    def fn(h, w, b, t):  # noqa: ANN001, ANN202
        rows = fused_linear_cross_entropy(h, w, b, t, chunk_size=5, label_smoothing=0.1, reduction="none",
                                          class_weight=cw)
        return _scalar(rows)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, bias, target)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    ref_rows, ref_grads = eager(hidden, weight, bias, target, label_smoothing=0.1, reduction="none", class_weight=cw)
    torch.testing.assert_close(loss, _scalar(ref_rows))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_chunk_step_reference_weighted_per_row_scale(label_smoothing: float) -> None:
    """Class weights and one scale per row: dlogits equal autograd's for sum(scale_i * loss_i)."""
    logits = torch.randn(9, 31) * 4
    target = torch.randint(0, 31, (9,))
    target[2] = -100
    cw, scale = class_weights(31), torch.linspace(-2, 2, 9)
    x = logits.clone().requires_grad_()
    ref_rows = F.cross_entropy(x, target, weight=cw, reduction="none", label_smoothing=label_smoothing)
    (ref_grad,) = torch.autograd.grad((ref_rows * scale).sum(), x)
    row_loss, buffer = torch.empty(9), logits.clone()
    cross_entropy_chunk_reference(buffer, target, row_loss, scale, -100, label_smoothing, True, cw)
    torch.testing.assert_close(row_loss, ref_rows, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(buffer, ref_grad)
