"""The Triton per-chunk cross-entropy step against the torch reference and eager autograd.

Without CUDA the kernel runs under TRITON_INTERPRET=1 on CPU tensors (one program per row,
tens of ms each), so the sizes stay tiny: N <= 16 rows, V <= 300, H <= 32.
"""

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 without CUDA, before anything imports triton.
pytest.importorskip("triton")

from helpers import DEVICE, DTYPES  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxshear.kernels import linear_cross_entropy as lce  # noqa: E402
from fxshear.kernels.linear_cross_entropy_triton import cross_entropy_chunk_triton  # noqa: E402


# The interpreter evaluates exp(-inf) and masked -inf lanes with numpy, which warns.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value|divide by zero) encountered in .*:RuntimeWarning"
)


def random_chunk(n, v, dtype, seed=0, scale=4.0, ignore=0.25):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=generator) * scale).to(dtype)
    target = torch.randint(0, v, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < ignore] = -100
    return logits.to(DEVICE), target.to(DEVICE)


def run_both(logits, target, scale, label_smoothing, compute_grad=True, block_v=None, ignore_index=-100,
             class_weight=None):
    """(row_loss, buffer) from the reference and from the kernel, on copies of ``logits``.

    ``scale``: a float, or a list with one factor per row."""
    scale_t = torch.tensor(scale, dtype=torch.float32, device=logits.device)
    ref_buf, tri_buf = logits.clone(), logits.clone()
    ref_loss = torch.empty(logits.shape[0], device=logits.device)
    tri_loss = torch.full_like(ref_loss, float("nan"))
    lce.cross_entropy_chunk_reference(ref_buf, target, ref_loss, scale_t, ignore_index, label_smoothing, compute_grad,
                                      class_weight)
    cross_entropy_chunk_triton(tri_buf, target, tri_loss, scale_t, ignore_index, label_smoothing, compute_grad,
                               class_weight, block_v=block_v)
    return (ref_loss, ref_buf), (tri_loss, tri_buf)


def assert_step_close(ref, tri, dtype):
    (ref_loss, ref_buf), (tri_loss, tri_buf) = ref, tri
    torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert tri_buf.dtype == ref_buf.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(tri_buf, ref_buf, rtol=1e-5, atol=1e-7)
    else:  # both round an fp32 value to 16 bits; they may land one ulp apart
        torch.testing.assert_close(tri_buf, ref_buf, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("block_v", [None, 64], ids=["one-block", "block64"])
def test_step_matches_reference(dtype, label_smoothing, block_v):
    """V = 300 is no multiple of 64: the masked tail of the last block counts as nothing."""
    logits, target = random_chunk(6, 300, dtype)
    assert (target == -100).any() and (target != -100).any()
    ref, tri = run_both(logits, target, 0.125, label_smoothing, block_v=block_v)
    assert_step_close(ref, tri, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_step_class_weight_and_per_row_scale(dtype, label_smoothing):
    """cross_entropy's ``weight`` and one scale per row (the reduction="none" backward)."""
    logits, target = random_chunk(6, 300, dtype, seed=8)
    class_weight = (torch.rand(300, generator=torch.Generator().manual_seed(9)) * 2 + 0.1).to(DEVICE)
    scale = [0.5, -1.0, 2.0, 0.0, 0.25, -0.125]
    ref, tri = run_both(logits, target, scale, label_smoothing, block_v=64, class_weight=class_weight)
    assert_step_close(ref, tri, dtype)
    x = logits.float().cpu().requires_grad_()
    rows = F.cross_entropy(x, target.cpu(), weight=class_weight.cpu(), reduction="none",
                           label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad((rows * torch.tensor(scale)).sum(), x)
    torch.testing.assert_close(tri[0].cpu(), rows.detach(), rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(tri[1].cpu(), grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_step_matches_eager_autograd(label_smoothing):
    logits, target = random_chunk(5, 97, torch.float32, seed=1)
    x = logits.cpu().requires_grad_()
    rows = F.cross_entropy(x, target.cpu(), reduction="none", label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad(rows.sum() / 3.0, x)
    _, (tri_loss, tri_buf) = run_both(logits, target, 1 / 3.0, label_smoothing, block_v=32)
    torch.testing.assert_close(tri_loss.cpu(), rows.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri_buf.cpu(), grad, rtol=1e-5, atol=1e-7)


def test_loss_only_leaves_the_buffer_alone():
    logits, target = random_chunk(4, 50, torch.bfloat16, seed=2)
    ref, tri = run_both(logits, target, 1.0, 0.1, compute_grad=False, block_v=16)
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(tri[1], logits)


def test_ignored_rows_and_custom_ignore_index():
    logits, target = random_chunk(4, 33, torch.float32, seed=3, ignore=0.0)
    target[1] = target[3] = 7
    target[0] = 7
    ref, tri = run_both(logits, target, 0.5, 0.2, block_v=16, ignore_index=7)
    assert_step_close(ref, tri, torch.float32)
    assert torch.equal(tri[0][[0, 1, 3]], torch.zeros(3, device=DEVICE))
    assert not tri[1][[0, 1, 3]].any()


def test_extreme_logits_stay_finite():
    """The online logsumexp rescales: logits of 1e4 in one block, -1e4 in another, never overflow."""
    logits = torch.full((3, 80), -1e4, device=DEVICE)
    logits[0, 70] = 1e4
    logits[1, 3] = 1e4
    logits[1, 75] = 1e4 - 1.0
    logits[2] = torch.linspace(-3e3, 3e3, 80)
    target = torch.tensor([70, 75, 0], device=DEVICE)
    ref, tri = run_both(logits, target, 1.0, 0.1, block_v=16)
    assert torch.isfinite(tri[0]).all() and torch.isfinite(tri[1]).all()
    assert_step_close(ref, tri, torch.float32)


def test_strided_rows_and_empty_chunk():
    base, target = random_chunk(4, 64, torch.float32, seed=4)
    wide = torch.zeros(4, 80, device=DEVICE)
    wide[:, :64] = base
    view = wide[:, :64]  # row stride 80
    ref, tri = run_both(view, target, 0.25, 0.0, block_v=32)
    assert_step_close(ref, tri, torch.float32)
    cross_entropy_chunk_triton(view, target, torch.empty(4, device=DEVICE), torch.tensor(1.0, device=DEVICE), -100, 0.0)
    assert not wide[:, 64:].any()  # the padding columns are never written
    empty = torch.empty(0, 64, device=DEVICE)
    cross_entropy_chunk_triton(empty, target[:0], torch.empty(0, device=DEVICE), torch.tensor(1.0, device=DEVICE),
                               -100, 0.0)


def test_invalid_arguments_raise():
    logits, target = random_chunk(2, 8, torch.float32)
    loss, scale = torch.empty(2, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        cross_entropy_chunk_triton(logits.double(), target, loss, scale, -100, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy_chunk_triton(logits.t(), target[:1].repeat(8), torch.empty(8, device=DEVICE), scale, -100, 0.0)
    with pytest.raises(ValueError, match="target"):
        cross_entropy_chunk_triton(logits, target.int(), loss, scale, -100, 0.0)
    with pytest.raises(ValueError, match="row_loss"):
        cross_entropy_chunk_triton(logits, target, loss.double(), scale, -100, 0.0)
    with pytest.raises(ValueError, match="scale"):
        cross_entropy_chunk_triton(logits, target, loss, scale.double(), -100, 0.0)
    with pytest.raises(ValueError, match="scale"):
        cross_entropy_chunk_triton(logits, target, loss, torch.ones(3, device=DEVICE), -100, 0.0)
    with pytest.raises(ValueError, match="class_weight"):
        cross_entropy_chunk_triton(logits, target, loss, scale, -100, 0.0, class_weight=torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        cross_entropy_chunk_triton(logits, target, loss, scale, -100, 0.0, block_v=48)


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 4),
    v=st.integers(1, 150),
    dtype=st.sampled_from(DTYPES),
    label_smoothing=st.sampled_from([0.0, 0.05, 0.5]),
    block_v=st.sampled_from([None, 16, 128]),
    seed=st.integers(0, 2**16),
)
def test_step_hypothesis(n, v, dtype, label_smoothing, block_v, seed):
    logits, target = random_chunk(n, v, dtype, seed=seed)
    ref, tri = run_both(logits, target, 0.5, label_smoothing, block_v=block_v)
    assert_step_close(ref, tri, dtype)


# --------------------------------------------------------------------------- the whole op

@pytest.fixture
def triton_step_on_cpu(monkeypatch):
    """Route the op's per-chunk step to the kernel even for CPU tensors (interpreter)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(lce, "_use_triton", lambda t, impl: impl != "torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("reduction", "logits_fp32", "bias"), [("mean", True, True), ("sum", False, False)])
def test_op_with_triton_step_matches_torch(triton_step_on_cpu, dtype, reduction, logits_fp32, bias):
    """N = 10 in chunks of 4 (no divisor), V = 75, H = 12: loss and all three gradients."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(10, 12, generator=generator).to(dtype).to(DEVICE)
    weight = (torch.randn(75, 12, generator=generator) / 2).to(dtype).to(DEVICE)
    b = (torch.randn(75, generator=generator) / 4).to(dtype).to(DEVICE) if bias else None
    target = torch.randint(0, 75, (10,), generator=generator).to(DEVICE)
    target[[1, 6]] = -100
    args = (hidden, weight, b, target, -100, 0.1, reduction, 4, logits_fp32, True, True)
    tri = lce.linear_cross_entropy(*args, "triton")
    ref = lce.linear_cross_entropy(*args, "torch")
    for t, r in zip(tri, ref):
        assert t.dtype == r.dtype and t.shape == r.shape
        if dtype == torch.float32:
            torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(t.float(), r.float(), rtol=2e-2, atol=2e-3)


def test_op_with_triton_step_autograd(triton_step_on_cpu):
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(8, 16, generator=generator, device="cpu").to(DEVICE).requires_grad_()
    weight = torch.randn(40, 16, generator=generator, device="cpu").div(4).to(DEVICE).requires_grad_()
    target = torch.randint(0, 40, (8,), generator=generator).to(DEVICE)
    target[0] = -100
    loss = lce.fused_linear_cross_entropy(hidden, weight, None, target, chunk_size=3, impl="triton")
    grads = torch.autograd.grad(loss * 3, (hidden, weight))
    ref = F.cross_entropy(F.linear(hidden, weight), target)
    ref_grads = torch.autograd.grad(ref * 3, (hidden, weight))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_op_none_with_class_weight_triton_step_autograd(triton_step_on_cpu, label_smoothing):
    """reduction="none" with class weights: the forward and the rebuilding backward on the kernel."""
    generator = torch.Generator().manual_seed(10)
    hidden = torch.randn(7, 12, generator=generator).to(DEVICE).requires_grad_()
    weight = torch.randn(45, 12, generator=generator).div(4).to(DEVICE).requires_grad_()
    bias = torch.randn(45, generator=generator).div(4).to(DEVICE).requires_grad_()
    target = torch.randint(0, 45, (7,), generator=generator).to(DEVICE)
    target[2] = -100
    class_weight = (torch.rand(45, generator=generator) + 0.5).to(DEVICE)
    factors = torch.linspace(-1, 2, 7, device=DEVICE)
    kwargs = dict(reduction="none", label_smoothing=label_smoothing)
    rows = lce.fused_linear_cross_entropy(hidden, weight, bias, target, chunk_size=3, impl="triton",
                                          class_weight=class_weight, **kwargs)
    grads = torch.autograd.grad((rows * factors).sum(), (hidden, weight, bias))
    ref = F.cross_entropy(F.linear(hidden, weight, bias), target, weight=class_weight, **kwargs)
    ref_grads = torch.autograd.grad((ref * factors).sum(), (hidden, weight, bias))
    torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path runs on CUDA only")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_triton_path_on_cuda(dtype):
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(37, 64, generator=generator).to(dtype).cuda().requires_grad_()
    weight = (torch.randn(1000, 64, generator=generator) / 8).to(dtype).cuda().requires_grad_()
    bias = torch.randn(1000, generator=generator).to(dtype).cuda().requires_grad_()
    target = torch.randint(0, 1000, (37,), generator=generator).cuda()
    target[::5] = -100
    args = (hidden, weight, bias, target, -100, 0.1, "mean", 16, True, True, True)
    torch.library.opcheck(lce.linear_cross_entropy, (*args, "triton"))
    tri = lce.linear_cross_entropy(*args, "triton")
    ref = lce.linear_cross_entropy(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args], "torch")
    for t, r in zip(tri, ref):
        torch.testing.assert_close(t.cpu().float(), r.float(), rtol=2e-2, atol=2e-3)
    class_weight = torch.rand(1000, generator=generator).add(0.5).cuda()
    none_args = (hidden, weight, bias, target, -100, 0.1, "none", 16, True, True, True, "triton", None, class_weight)
    torch.library.opcheck(lce.linear_cross_entropy, none_args)
    torch.library.opcheck(lce.linear_cross_entropy_backward,
                          (torch.randn(37, device="cuda"), hidden.detach(), weight.detach(), bias.detach(), target,
                           class_weight, -100, 0.1, 16, True, True, True, True, "triton"))
