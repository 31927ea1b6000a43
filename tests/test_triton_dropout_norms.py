"""The Triton dropout-bit and normalization kernels against the torch references.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (~12 ms per program
launch), so the tensors here stay small.  The dropout kernels must equal the torch path bit for
bit; the normalization kernels reduce in another order and are compared to float tolerance.
"""

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 without CUDA, before anything imports triton.
pytest.importorskip("triton")

from helpers import DEVICE, DTYPES  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxshear.kernels.dropout_bits import (  # noqa: E402
    dropout_apply,
    dropout_bits,
    dropout_draw,
    native_scale,
    pack_bits,
    unpack_bits,
)
from fxshear.kernels.dropout_bits_triton import (  # noqa: E402
    dropout_backward_triton,
    pack_bits_triton,
)
from fxshear.kernels.norms import (  # noqa: E402
    normalize,
    normalize_backward,
    normalize_backward_reference,
    normalize_reference,
)
from fxshear.kernels.norms_triton import (  # noqa: E402
    normalize_backward_triton,
    normalize_forward_triton,
)

BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# z and dx are rounded once to their dtype on both sides; fp32 differs by the reduction order.
NORM_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

pytestmark = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value) encountered in (exp|multiply):RuntimeWarning"
)


def random(shape, dtype=torch.float32, seed=0, scale=1.0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale + offset).to(dtype).to(DEVICE)


def random_mask(shape, seed=0, density=0.5):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < density).to(DEVICE)


def assert_bitwise_equal(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    bits = BITS_DTYPE[expected.dtype]
    assert torch.equal(actual[~nan].contiguous().view(bits), expected[~nan].contiguous().view(bits))


# ----------------------------------------------------------------------------- dropout bits


@pytest.mark.parametrize("numel", (1, 7, 8, 9, 63, 4097))
@pytest.mark.parametrize("density", (0.0, 0.5, 1.0))
def test_pack_matches_reference(numel, density):
    mask = random_mask((numel,), seed=numel, density=density)
    packed = pack_bits_triton(mask)
    assert packed.dtype == torch.uint8 and packed.shape == ((numel + 7) // 8,)
    assert torch.equal(packed, pack_bits(mask))
    if numel % 8:
        assert packed[-1].item() >> (numel % 8) == 0  # pad bits stay 0


def test_pack_non_contiguous_and_empty():
    mask = random_mask((6, 13), seed=3).t()
    assert torch.equal(pack_bits_triton(mask), pack_bits(mask))
    assert pack_bits_triton(torch.zeros(0, 5, dtype=torch.bool, device=DEVICE)).shape == (0,)
    with pytest.raises(ValueError, match="bool"):
        pack_bits_triton(mask.to(torch.uint8))


@pytest.mark.parametrize("p", (0.1, 0.123, 0.5, 0.9))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_equals_native_dropout_backward(dtype, p):
    """Eager's fused-path gradient (``native_dropout_backward``), bit for bit, incl. NaN/inf/-0."""
    shape = (5, 37)
    grad = random(shape, dtype, seed=1)
    grad.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.0], dtype=dtype)
    mask = random_mask(shape, seed=2)
    dx = dropout_backward_triton(grad, pack_bits(mask), p)
    expected = torch.ops.aten.native_dropout_backward.default(grad, mask, native_scale(p))
    assert_bitwise_equal(dx, expected)


def test_backward_non_contiguous_grad_and_bad_arguments():
    grad = random((12, 9), torch.bfloat16, seed=4).t()
    mask = random_mask((9, 12), seed=5)
    dx = dropout_backward_triton(grad, pack_bits(mask), 0.3)
    assert dx.stride() == grad.stride()
    assert_bitwise_equal(dx, torch.ops.aten.native_dropout_backward.default(grad, mask, native_scale(0.3)))
    bits = pack_bits(mask)
    with pytest.raises(ValueError, match="0 < p < 1"):
        dropout_backward_triton(grad, bits, 1.0)
    with pytest.raises(ValueError, match="packed"):
        dropout_backward_triton(grad, bits[:-1], 0.3)
    with pytest.raises(ValueError, match="float64"):
        dropout_backward_triton(grad.double(), bits, 0.3)


@settings(max_examples=10, deadline=None)
@given(shape=st.lists(st.integers(1, 30), min_size=1, max_size=3), p=st.floats(0.01, 0.99),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_dropout_round_trip(shape, p, dtype, seed):
    mask = random_mask(shape, seed=seed, density=1 - p)
    packed = pack_bits_triton(mask)
    assert torch.equal(unpack_bits(packed, mask.numel()).view(mask.shape), mask)
    grad = random(shape, dtype, seed=seed + 1)
    expected = torch.ops.aten.native_dropout_backward.default(grad, mask, native_scale(p))
    assert_bitwise_equal(dropout_backward_triton(grad, packed, p), expected)


# ----------------------------------------------------------------------------- normalization


SHAPES = ((5, 33), (3, 1), (2, 3, 7), (4, 384), (70, 5))


@pytest.mark.parametrize("max_block_n", (4096, 16), ids=("one_tile", "looped"))
@pytest.mark.parametrize("kind", ("layer", "rms"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalize_matches_reference(dtype, kind, max_block_n):
    for i, shape in enumerate(SHAPES):
        x = random(shape, dtype, seed=i, scale=2.0, offset=1.0)
        z, rstd = normalize_forward_triton(x, kind, 1e-5, max_block_n=max_block_n)
        z_ref, rstd_ref = normalize_reference(x, kind, 1e-5)
        assert z.dtype == dtype and z.is_contiguous() and rstd.shape == (*shape[:-1], 1)
        torch.testing.assert_close(rstd, rstd_ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(z, z_ref, **NORM_TOL[dtype])

        grad = random(shape, dtype, seed=100 + i)
        dx = normalize_backward_triton(grad, z_ref, rstd_ref, kind, max_block_n=max_block_n)
        dx_ref = normalize_backward_reference(grad, z_ref, rstd_ref, kind)
        assert dx.dtype == dtype and dx.shape == shape
        torch.testing.assert_close(dx, dx_ref, **NORM_TOL[dtype])


def test_normalize_non_contiguous_and_empty():
    x = random((40, 3, 6), seed=7).transpose(0, 2)
    for kind in ("layer", "rms"):
        z, rstd = normalize_forward_triton(x, kind, 1e-6)
        z_ref, rstd_ref = normalize_reference(x, kind, 1e-6)
        torch.testing.assert_close(z, z_ref, **NORM_TOL[torch.float32])
        torch.testing.assert_close(rstd, rstd_ref, **NORM_TOL[torch.float32])
        grad = random(x.shape, seed=8).transpose(0, 1).contiguous().transpose(0, 1)
        torch.testing.assert_close(normalize_backward_triton(grad, z_ref, rstd_ref, kind),
                                   normalize_backward_reference(grad, z_ref, rstd_ref, kind),
                                   **NORM_TOL[torch.float32])
    z, rstd = normalize_forward_triton(random((0, 4)), "layer", 1e-5)
    assert z.shape == (0, 4) and rstd.shape == (0, 1)
    assert normalize_backward_triton(z, z, rstd, "layer").shape == (0, 4)


def test_normalize_bad_arguments():
    x = random((3, 4))
    with pytest.raises(ValueError, match="kind"):
        normalize_forward_triton(x, "batch", 1e-5)
    with pytest.raises(ValueError, match="float64"):
        normalize_forward_triton(x.double(), "rms", 1e-5)
    z, rstd = normalize_reference(x, "rms", 1e-5)
    with pytest.raises(ValueError, match="do not match"):
        normalize_backward_triton(x[:2], z, rstd, "rms")


@settings(max_examples=10, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), kind=st.sampled_from(("layer", "rms")),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), looped=st.booleans())
def test_normalize_round_trip(shape, kind, dtype, seed, looped):
    max_block_n = 8 if looped else 4096
    x = random(shape, dtype, seed=seed, scale=3.0, offset=0.5)
    z, rstd = normalize_forward_triton(x, kind, 1e-5, max_block_n=max_block_n)
    z_ref, rstd_ref = normalize_reference(x, kind, 1e-5)
    torch.testing.assert_close(z, z_ref, **NORM_TOL[dtype])
    grad = random(shape, dtype, seed=seed + 1)
    # Near-constant rows (last dim 2, or variance ~ eps) amplify z's rounding by rstd: scale the atol.
    atol = NORM_TOL[dtype]["atol"] * max(1.0, rstd_ref.max().item())
    torch.testing.assert_close(normalize_backward_triton(grad, z_ref, rstd_ref, kind, max_block_n=max_block_n),
                               normalize_backward_reference(grad, z_ref, rstd_ref, kind),
                               rtol=NORM_TOL[dtype]["rtol"], atol=atol)


# ----------------------------------------------------------------------------- ops on CUDA

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the ops take the Triton path on CUDA only")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_triton_path_on_cuda(dtype):
    x = torch.randn(33, 130, dtype=dtype, device="cuda", requires_grad=True)
    torch.library.opcheck(dropout_draw, (x, 0.3, "triton"), test_utils=("test_schema", "test_faketensor"))
    torch.cuda.manual_seed(0)
    _, bits = dropout_bits(x.detach(), 0.3, "triton")
    torch.cuda.manual_seed(0)
    _, bits_ref = dropout_bits(x.detach(), 0.3, "torch")
    assert torch.equal(bits, bits_ref)
    grad = torch.randn_like(x)
    assert_bitwise_equal(dropout_apply(grad, bits, 0.3, "triton"),
                         dropout_apply(grad, bits, 0.3, "torch"))
    torch.library.opcheck(dropout_apply, (grad, bits, 0.3, "triton"))
    for kind in ("layer", "rms"):
        torch.library.opcheck(normalize, (x, kind, 1e-5, "triton"))
        z, rstd = normalize(x.detach(), kind, 1e-5, "triton")
        z_ref, rstd_ref = normalize(x.detach(), kind, 1e-5, "torch")
        torch.testing.assert_close(z, z_ref, **NORM_TOL[dtype])
        torch.testing.assert_close(rstd, rstd_ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(normalize_backward(grad, z_ref, rstd_ref, kind, "triton"),
                                   normalize_backward(grad, z_ref, rstd_ref, kind, "torch"), **NORM_TOL[dtype])
        torch.library.opcheck(normalize_backward, (grad, z, rstd, kind, "triton"))


@pytest.mark.gpu
@cuda_only
def test_large_rows_on_cuda():
    x = torch.randn(8, 10000, device="cuda")
    for kind in ("layer", "rms"):
        z, rstd = normalize(x, kind, 1e-5, "triton")
        z_ref, rstd_ref = normalize(x, kind, 1e-5, "torch")
        torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rstd, rstd_ref, rtol=1e-5, atol=0)
