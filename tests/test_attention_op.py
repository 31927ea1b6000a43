"""fxshear::attention: equals the eager attention pattern (forward, gradients, dropout masks),
keeps no probabilities for backward, opcheck, and the CPU lowering."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from fxshear.kernels.attention import (
    _lower_attention,
    _lower_attention_backward,
    attention,
    attention_backward,
    attention_dropout_draw,
    pack_bits,
    packed_bits_numel,
    recompute_attention,
    unpack_bits,
)
from fxshear.kernels.infra.lowering import LowerOpsOnCpu
from helpers import fxshear_ops_in_code, opaque_fxshear_ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_MIN = torch.finfo(torch.float32).min
# Largest |error| / max |expected| against eager in the same dtype (measured on these inputs:
# bf16 ~0.6%, fp16 ~0.07%; the op computes scores and softmax in fp32, eager in half).
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2}

# A row of all -inf is NaN by design (as eager); numpy-free, but torch may warn on NaN grads.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def draw_and_attend(q, k, v, mask, scale, p, impl="torch"):  # noqa: ANN001, ANN201
    """``(out, lse, bits)``: the draw (when p > 0) and the attention, as the pass emits them."""
    bits = attention_dropout_draw(q, k, p, impl) if p > 0 else None
    out, lse = attention(q, k, v, mask, bits, scale, p, impl)
    return out, lse, bits


def eager_attention(q, k, v, mask, scale, p, fp32_softmax):  # noqa: ANN001, ANN201
    """The pattern HF eager attention traces to (LLaMA: fp32 softmax, cast back to q's dtype)."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale if q.dim() == 4 else torch.matmul(q, k.transpose(1, 2)) * scale
    if mask is not None:
        scores = scores + mask
    if fp32_softmax:
        probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        probs = torch.nn.functional.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=p, training=True)
    return torch.matmul(probs, v)


def hf_qkv(batch, seq, heads, dim, dtype, seed=0, dv=None):  # noqa: ANN001, ANN201
    """q, k, v as HF makes them: ``proj(x).view(B, S, H, D).transpose(1, 2)`` (non-contiguous)."""
    generator = torch.Generator().manual_seed(seed)
    dv = dim if dv is None else dv
    x = torch.randn(batch, seq, heads * (2 * dim + dv), generator=generator).to(dtype)
    q, k, v = x.split([heads * dim, heads * dim, heads * dv], dim=-1)
    q = q.view(batch, seq, heads, dim).transpose(1, 2)
    k = k.view(batch, seq, heads, dim).transpose(1, 2)
    v = v.view(batch, seq, heads, dv).transpose(1, 2)
    return q, k, v


def make_mask(kind, batch, heads, sq, sk, dtype=torch.float32, seed=0):  # noqa: ANN001, ANN201
    generator = torch.Generator().manual_seed(seed)
    minimum = torch.finfo(dtype).min
    if kind is None:
        return None
    if kind == "padding":  # BERT's extended mask: [B, 1, 1, Sk]
        mask = torch.zeros(batch, 1, 1, sk, dtype=dtype)
        mask[-1, ..., sk // 2:] = minimum
        return mask
    if kind == "causal":  # LLaMA's causal mask: [B, 1, Sq, Sk]
        return torch.triu(torch.full((sq, sk), minimum, dtype=dtype), diagonal=1 + sk - sq)[None, None].expand(
            batch, 1, sq, sk)
    if kind == "random":
        return (torch.randn(batch, heads, sq, sk, generator=generator) * 2).to(dtype)
    raise ValueError(kind)


def run(fn, q, k, v, grad, seed):  # noqa: ANN001, ANN201
    """(out, dq, dk, dv) of ``fn(q, k, v)`` after seeding the global RNG."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad))


def assert_rel_close(actual, expected, tol):  # noqa: ANN001, ANN201
    """max |actual - expected| <= tol * max |expected|, with NaNs in the same places."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    a, e = actual[~nan].double(), expected[~nan].double()
    if e.numel():
        assert (a - e).abs().max().item() <= tol * max(e.abs().max().item(), 1e-30)


def assert_no_further_from_the_truth(actual, expected, truth, tol):  # noqa: ANN001, ANN201
    """NaNs where eager has them; elsewhere within ``tol`` of the float64 truth (relative to its
    largest entry) or at most twice as far from it as eager is."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    keep = ~nan & ~truth.isnan()
    if not keep.any():
        return
    a, e, t = actual[keep].double(), expected[keep].double(), truth[keep]
    ours, eagers = (a - t).abs().max().item(), (e - t).abs().max().item()
    assert ours <= max(tol * max(t.abs().max().item(), 1e-30), 2 * eagers), (ours, eagers)


def eager_keep_mask(shape, dtype, p, seed):  # noqa: ANN001, ANN201
    """The mask eager ``F.dropout`` draws on a tensor of ``shape``/``dtype`` after ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.functional.dropout(torch.ones(shape, dtype=dtype), p=p, training=True) != 0


# ---------------------------------------------------------------------------------------------
# Against eager
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("mask_kind", [None, "padding", "causal", "random"])
def test_fp32_matches_eager_with_the_same_seed(mask_kind, p) -> None:  # noqa: ANN001
    batch, seq, heads, dim = 2, 11, 3, 8
    q, k, v = hf_qkv(batch, seq, heads, dim, torch.float32)
    mask = make_mask(mask_kind, batch, heads, seq, seq)
    grad = torch.randn(batch, heads, seq, dim)
    scale = 1 / math.sqrt(dim)
    expected = run(lambda q, k, v: eager_attention(q, k, v, mask, scale, p, False), q, k, v, grad, seed=7)
    actual = run(lambda q, k, v: recompute_attention(q, k, v, mask, scale, p, "torch"), q, k, v, grad, seed=7)
    # Same ops on the same fp32 data: the output is bit for bit eager's, dropout mask included.
    assert torch.equal(actual[0], expected[0])
    for a, e in zip(actual[1:], expected[1:]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_llama_eager(dtype, p) -> None:  # noqa: ANN001
    """LLaMA: softmax(dtype=float32).to(q.dtype); the op also computes the scores in fp32."""
    batch, seq, heads, dim = 2, 13, 2, 16
    q, k, v = hf_qkv(batch, seq, heads, dim, dtype, seed=1)
    mask = make_mask("causal", batch, heads, seq, seq, dtype=dtype)
    grad = torch.randn(batch, heads, seq, dim).to(dtype)
    scale = dim**-0.5
    expected = run(lambda q, k, v: eager_attention(q, k, v, mask, scale, p, True), q, k, v, grad, seed=3)
    actual = run(lambda q, k, v: recompute_attention(q, k, v, mask, scale, p, "torch"), q, k, v, grad, seed=3)
    for a, e in zip(actual, expected):
        assert_rel_close(a, e, HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_as_accurate_as_eager(dtype) -> None:  # noqa: ANN001
    """Against float64 ground truth the op is no worse than eager half precision."""
    batch, seq, heads, dim = 2, 17, 2, 16
    q, k, v = hf_qkv(batch, seq, heads, dim, dtype, seed=2)
    grad = torch.randn(batch, heads, seq, dim).to(dtype)
    scale = dim**-0.5
    truth = run(lambda q, k, v: eager_attention(q, k, v, None, scale, 0.0, False),
                q.double(), k.double(), v.double(), grad.double(), seed=0)
    ours = run(lambda q, k, v: recompute_attention(q, k, v, None, scale, 0.0, "torch"), q, k, v, grad, seed=0)
    eager = run(lambda q, k, v: eager_attention(q, k, v, None, scale, 0.0, True), q, k, v, grad, seed=0)
    for o, e, t in zip(ours, eager, truth):
        ours_error = (o.double() - t).abs().max().item()
        eager_error = (e.double() - t).abs().max().item()
        assert ours_error <= 1.5 * eager_error + 1e-3 * t.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_bits_are_the_eager_mask_and_rng_is_consumed_identically(dtype) -> None:  # noqa: ANN001
    batch, heads, sq, sk, dim = 2, 3, 5, 7, 4  # 210 elements: the last byte is partly padding
    q, k, v = (torch.randn(batch, heads, s, dim).to(dtype) for s in (sq, sk, sk))
    p = 0.3
    torch.manual_seed(11)
    _, _, bits = draw_and_attend(q, k, v, None, 0.5, p)
    after_op = torch.rand(3)
    keep = eager_keep_mask((batch, heads, sq, sk), dtype, p, seed=11)
    after_eager = torch.rand(3)
    assert bits.dtype == torch.uint8 and bits.shape == (packed_bits_numel(keep.numel()),) == (27,)
    assert torch.equal(unpack_bits(bits, keep.shape), keep)
    assert torch.equal(after_op, after_eager)
    assert bits[-1].item() >> (keep.numel() % 8) == 0  # pad bits are zero


def test_no_dropout_uses_no_rng_and_takes_no_bits() -> None:
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    torch.manual_seed(5)
    _, lse = attention(q, k, v, None, None, 0.5, 0.0, "torch")
    after_op = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after_op, torch.rand(4))
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 6)
    torch.testing.assert_close(lse, torch.logsumexp((q @ k.transpose(-1, -2)) * 0.5, -1))


def test_bit_packing_is_little_endian() -> None:
    keep = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    packed = pack_bits(keep)
    assert packed.tolist() == [0b1000_0001, 0b0000_0110]
    assert torch.equal(unpack_bits(packed, keep.shape), keep)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fully_masked_rows_are_uniform_like_eager(mask_dtype, p) -> None:  # noqa: ANN001
    batch, heads, seq, dim = 2, 2, 6, 4
    q, k, v = hf_qkv(batch, seq, heads, dim, torch.float32, seed=4)
    mask = torch.zeros(batch, 1, seq, seq, dtype=mask_dtype)
    mask[0, 0, 2, :] = torch.finfo(mask_dtype).min  # one query row sees no key at all
    mask[1, 0, :, :] = torch.finfo(mask_dtype).min  # a whole padded sequence
    grad = torch.randn(batch, heads, seq, dim)
    expected = run(lambda q, k, v: eager_attention(q, k, v, mask, 0.5, p, False), q, k, v, grad, seed=2)
    actual = run(lambda q, k, v: recompute_attention(q, k, v, mask, 0.5, p, "torch"), q, k, v, grad, seed=2)
    if p == 0:
        torch.testing.assert_close(actual[0][0, :, 2], v[0].mean(dim=-2))
    assert torch.equal(actual[0], expected[0])
    for a, e in zip(actual[1:], expected[1:]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_rows_of_all_minus_inf_are_nan_like_eager() -> None:
    batch, heads, seq, dim = 1, 2, 5, 4
    q, k, v = hf_qkv(batch, seq, heads, dim, torch.float32, seed=5)
    mask = torch.zeros(1, 1, seq, seq)
    mask[..., 1, :] = float("-inf")
    mask[..., 3, 2:] = float("-inf")  # partly -inf is fine
    grad = torch.randn(batch, heads, seq, dim)
    expected = run(lambda q, k, v: eager_attention(q, k, v, mask, 0.5, 0.0, False), q, k, v, grad, seed=0)
    actual = run(lambda q, k, v: recompute_attention(q, k, v, mask, 0.5, 0.0, "torch"), q, k, v, grad, seed=0)
    assert actual[0][:, :, 1].isnan().all() and not actual[0][:, :, [0, 2, 3, 4]].isnan().any()
    for a, e in zip(actual, expected):
        assert torch.equal(a.isnan(), e.isnan())
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_three_dimensional_inputs_and_mixed_mask_dtype() -> None:
    n, sq, sk, dim, dv = 3, 5, 9, 6, 10
    q, k, v = torch.randn(n, sq, dim), torch.randn(n, sk, dim), torch.randn(n, sk, dv)
    mask = torch.randn(sq, sk).to(torch.bfloat16)  # broadcast over n, other float dtype
    grad = torch.randn(n, sq, dv)
    expected = run(lambda q, k, v: eager_attention(q, k, v, mask.float(), 0.3, 0.0, False), q, k, v, grad, seed=0)
    actual = run(lambda q, k, v: recompute_attention(q, k, v, mask, 0.3, 0.0, "torch"), q, k, v, grad, seed=0)
    assert actual[0].shape == (n, sq, dv)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_nothing_of_size_q_by_k_is_saved_for_backward() -> None:
    batch, heads, sq, sk, dim = 2, 3, 16, 20, 8
    q, k, v = (torch.randn(batch, heads, s, dim, requires_grad=True) for s in (sq, sk, sk))
    mask = torch.zeros(batch, 1, 1, sk)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = recompute_attention(q, k, v, mask, 0.3, 0.1, "torch")
    shapes = sorted(tuple(t.shape) for t in saved)
    scores_numel = batch * heads * sq * sk
    assert shapes == sorted([tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(mask.shape),
                             (batch, heads, sq), (packed_bits_numel(scores_numel),)])
    assert not any(t.numel() >= scores_numel for t in saved)
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v))


def test_bad_arguments_are_clear() -> None:
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, k, v, None, None, 1.0, 0.0, "cuda")
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, None, None, 1.0, 1.5, "torch")
    with pytest.raises(ValueError, match="dropout_p"):
        attention_dropout_draw(q, k, 0.0, "torch")
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, torch.zeros(1, 2, 5, 4), None, 1.0, 0.0, "torch")
    with pytest.raises(ValueError, match="float mask"):
        attention(q, k, v, torch.zeros(4, 4, dtype=torch.bool), None, 1.0, 0.0, "torch")
    with pytest.raises(ValueError, match="head dims"):
        attention(q, k[..., :4], v, None, None, 1.0, 0.0, "torch")
    with pytest.raises(ValueError, match="same rank"):
        attention(q, k[0], v, None, None, 1.0, 0.0, "torch")
    with pytest.raises(ValueError, match="bits must be"):
        attention(q, k, v, None, None, 1.0, 0.5, "torch")
    with pytest.raises(ValueError, match="bits must be"):
        attention(q, k, v, None, torch.zeros(3, dtype=torch.uint8), 1.0, 0.5, "torch")
    with pytest.raises(ValueError, match="bits must be None"):
        attention(q, k, v, None, torch.zeros(4, dtype=torch.uint8), 1.0, 0.0, "torch")
    with pytest.raises(ValueError, match="does not differentiate its additive mask"):
        attention(q.requires_grad_(), k, v, torch.zeros(4, 4, requires_grad=True), None, 1.0, 0.0, "torch")


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype) -> None:  # noqa: ANN001
    q = torch.randn(2, 3, 5, 4, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 3, 7, 4, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 3, 7, 6, dtype=dtype, requires_grad=True)
    mask = torch.randn(2, 1, 1, 7)
    torch.library.opcheck(attention, (q, k, v, mask, None, 0.5, 0.0, "torch"))
    torch.library.opcheck(attention, (q, k, v, None, None, 0.5, 0.0, "torch"))
    # The draw is random, so only the checks that do not compare two runs; the attention itself
    # is deterministic given the bits.
    torch.library.opcheck(attention_dropout_draw, (q, k, 0.2, "torch"), test_utils=("test_schema", "test_faketensor"))
    bits = attention_dropout_draw(q, k, 0.2, "torch")
    torch.library.opcheck(attention, (q, k, v, mask, bits, 0.5, 0.2, "torch"))
    _, lse = attention(q.detach(), k.detach(), v.detach(), mask, bits, 0.5, 0.2, "torch")
    grad = torch.randn(2, 3, 5, 6, dtype=dtype)
    torch.library.opcheck(attention_backward, (grad, q.detach(), k.detach(), v.detach(), mask, lse, bits, 0.5, 0.2,
                                               "torch"))


# ---------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    sq=st.integers(1, 13),
    sk=st.integers(1, 13),
    dim=st.integers(1, 9),
    dv=st.integers(1, 9),
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from([0.0, 0.3]),
    mask_kind=st.sampled_from([None, "random", "row"]),
    seed=st.integers(0, 2**16),
)
# bf16 eager is far from the truth on one cancelling gradient entry here (fp32 math is not)
@example(batch=1, heads=1, sq=1, sk=7, dim=1, dv=1, dtype=torch.bfloat16, p=0.0, mask_kind="random", seed=761)
def test_matches_eager_on_random_shapes(batch, heads, sq, sk, dim, dv, dtype, p, mask_kind, seed) -> None:  # noqa: ANN001, PLR0913
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, sq, dim, generator=generator).to(dtype)
    k = torch.randn(batch, heads, sk, dim, generator=generator).to(dtype)
    v = torch.randn(batch, heads, sk, dv, generator=generator).to(dtype)
    grad = torch.randn(batch, heads, sq, dv, generator=generator).to(dtype)
    if mask_kind == "random":
        mask = torch.randn(batch, 1, sq, sk, generator=generator).to(dtype)
    elif mask_kind == "row":
        mask = torch.where(torch.rand(1, 1, 1, sk, generator=generator) < 0.3, FP32_MIN, 0.0).to(dtype)
    else:
        mask = None
    scale = dim**-0.5
    fp32 = dtype == torch.float32
    expected = run(lambda q, k, v: eager_attention(q, k, v, mask, scale, p, True), q, k, v, grad, seed)
    actual = run(lambda q, k, v: recompute_attention(q, k, v, mask, scale, p, "torch"), q, k, v, grad, seed)
    if fp32:
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-6 * max(1.0, e.abs().max().item()))
        return
    # Half precision: eager rounds every intermediate to the dtype, the op computes in fp32, so on
    # tiny or cancelling outputs eager itself is far from the truth.  Judge both against float64:
    # the op is within the tolerance of the truth, or at least no further from it than eager is.
    wide = None if mask is None else mask.double()
    truth = run(lambda q, k, v: eager_attention(q, k, v, wide, scale, p, True),
                q.double(), k.double(), v.double(), grad.double(), seed)
    for a, e, t in zip(actual, expected, truth):
        assert_no_further_from_the_truth(a, e, t, HALF_TOL[dtype])


# ---------------------------------------------------------------------------------------------
# CPU lowering
# ---------------------------------------------------------------------------------------------


def _lowering_inputs(dtype=torch.float32):  # noqa: ANN001, ANN202
    q, k, v = hf_qkv(2, 6, 2, 4, dtype, seed=9)
    mask = make_mask("padding", 2, 2, 6, 6, dtype=dtype)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lowering_functions_trace_to_the_op(dtype, p) -> None:  # noqa: ANN001
    """make_fx of the lowering functions (aten math) computes exactly what the op computes."""
    q, k, v, mask = _lowering_inputs(dtype)

    bits = attention_dropout_draw(q, k, p, "torch") if p > 0 else None

    def forward(q, k, v, mask, bits):  # noqa: ANN001, ANN202
        return _lower_attention(q, k, v, mask, bits, 0.5, p, "auto")

    traced = make_fx(forward)(q, k, v, mask, bits)
    assert not opaque_fxshear_ops(traced.graph)
    assert not any(n.target in (torch.ops.aten.native_dropout.default, torch.ops.aten.bernoulli_.float)
                   for n in traced.graph.nodes)  # nothing random is inlined
    expected = attention(q, k, v, mask, bits, 0.5, p, "torch")
    actual = traced(q, k, v, mask, bits)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)

    grad = torch.randn(expected[0].shape).to(dtype)
    saved = (q, k, v, mask, expected[1], bits)

    def backward(grad, q, k, v, mask, lse, bits):  # noqa: ANN001, ANN202
        return _lower_attention_backward(grad, q, k, v, mask, lse, bits, 0.5, p, "auto")

    traced = make_fx(backward)(grad, *saved)
    assert not opaque_fxshear_ops(traced.graph)
    for a, e in zip(traced(grad, *saved), attention_backward(grad, *saved, 0.5, p, "torch")):
        assert torch.equal(a, e)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lowering_pass_inlines_all_but_the_dropout_draw(p) -> None:  # noqa: ANN001
    q, k, v, mask = _lowering_inputs()

    def forward(q, k, v, mask):  # noqa: ANN001, ANN202
        return draw_and_attend(q, k, v, mask, 0.5, p, "auto")

    gm = make_fx(forward, tracing_mode="fake")(q, k, v, mask)
    LowerOpsOnCpu()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    remaining = opaque_fxshear_ops(gm.graph)
    assert remaining == ([torch.ops.fxshear.attention_dropout_draw.default] if p > 0 else [])
    torch.manual_seed(2)
    expected = forward(q, k, v, mask)
    torch.manual_seed(2)
    actual = gm(q, k, v, mask)
    for a, e in zip(actual[:2], expected[:2]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    if p > 0:
        assert torch.equal(actual[2], expected[2])

    grad = torch.randn(expected[0].shape)
    saved = (q, k, v, mask, expected[1], expected[2])

    def backward(grad, q, k, v, mask, lse, bits):  # noqa: ANN001, ANN202
        return torch.ops.fxshear.attention_backward.default(grad, q, k, v, mask, lse, bits, 0.5, p, "auto")

    gm = make_fx(backward, tracing_mode="fake")(grad, *saved)
    LowerOpsOnCpu()(gm.graph)
    gm.recompile()
    assert not opaque_fxshear_ops(gm.graph)
    for a, e in zip(gm(grad, *saved), backward(grad, *saved)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_with_the_lowering_matches_eager_with_dropout() -> None:
    """Compiled with the CPU lowering: only the dropout draw stays an opaque call (eager masks),
    the rest of the forward and the backward are fused aten math, and the same seed gives eager's output and gradients."""
    from torch._inductor.utils import run_and_get_code

    q, k, v = hf_qkv(2, 9, 2, 8, torch.float32, seed=3)
    mask = make_mask("padding", 2, 2, 9, 9)
    grad = torch.randn(2, 2, 9, 8)

    def step(q, k, v):  # noqa: ANN001, ANN202
        return recompute_attention(q, k, v, mask, 8**-0.5, 0.2, "auto")

    with torch._inductor.config.patch(post_grad_custom_pre_pass=LowerOpsOnCpu()):
        compiled = torch.compile(step, backend="inductor")
        actual, codes = run_and_get_code(lambda: run(compiled, q, k, v, grad, seed=4))
    expected = run(lambda q, k, v: eager_attention(q, k, v, mask, 8**-0.5, 0.2, False), q, k, v, grad, seed=4)
    # Inductor's fused softmax may round differently in the last bit; a different mask would
    # differ by whole dropped terms, far outside this tolerance
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    forward_code, backward_code = codes
    assert "torch.ops.fxshear.attention.default" not in forward_code
    assert "torch.ops.fxshear.attention_dropout_draw.default" in forward_code
    assert not fxshear_ops_in_code(backward_code)


def test_partitioner_pins_the_computed_attention_mask() -> None:
    """The additive mask an attention call reads is saved, never rebuilt in the backward: it is
    one small tensor all layers share, and rebuilt inside the fused attention kernels it made
    their index math per-element (MiniLM at budget 0.5: ~37 ms a step for 1 MiB)."""
    from torch.utils.checkpoint import CheckpointPolicy

    from fxshear.graph.partitioner import pin_ops

    q, k, v = hf_qkv(2, 6, 2, 4, torch.float32, seed=1)
    keep = torch.rand(2, 6) < 0.8

    def forward(q, k, v, keep):  # noqa: ANN001, ANN202
        mask = torch.where(keep[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
        return torch.ops.fxshear.attention.default(q, k, v, mask, None, 0.5, 0.0, "torch")[0]

    gm = make_fx(forward, tracing_mode="fake")(q, k, v, keep)
    pin_ops(gm)
    (call,) = [n for n in gm.graph.nodes if n.target is torch.ops.fxshear.attention.default]
    assert call.args[3].meta.get("recompute") == CheckpointPolicy.MUST_SAVE
    assert all(n.meta.get("recompute") is None for n in gm.graph.nodes if n is not call.args[3])
