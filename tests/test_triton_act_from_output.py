"""The Triton act_from_output kernels against the torch reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (~12 ms per program launch,
more for the backward's Newton steps), so the tensors here stay small.  On CUDA the same tests run
on the GPU, and the CUDA-only test checks the op's Triton path with opcheck.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from helpers import DEVICE, DTYPES  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxshear.kernels import act_from_output as afo  # noqa: E402
from fxshear.kernels.act_from_output_triton import (  # noqa: E402
    act_from_output_backward_triton,
    act_from_output_forward_triton,
)
from helpers import eager_forward_error, eager_nan_at_inf  # noqa: E402

FUNCTIONS = (("gelu", "none"), ("gelu", "tanh"), ("silu", "none"))
SHAPES = ((7,), (3, 5, 13), (1,), (0,), (33, 65))
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# Under the interpreter numpy warns about the IEEE overflow / NaN the kernels rely on (exp(-x) -> inf
# in a sigmoid, 0 / 0 in lanes a tl.where then discards).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for the torch reference on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_input(shape, dtype, kind="gelu", approximate="none", seed=0):
    """Wide normal samples, a quarter of them packed around x_min."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 4
    near = afo.INVERSIONS[(kind, approximate)].x_min + torch.randn(shape, generator=g) * 0.05
    x = torch.where(torch.rand(shape, generator=g) < 0.25, near, x)
    return x.to(dtype).to(DEVICE)


def ordered_bits(t):
    """Float bits mapped to integers in the order of the values (adjacent floats differ by 1)."""
    i = t.view(BITS[t.dtype]).long()
    sign_bit = 1 << (8 * t.element_size() - 1)
    return torch.where(i < 0, -(i & (sign_bit - 1)), i)


def largest(t):
    return t.max().item() if t.numel() else 0


def ulp_distance(a, b):
    return (ordered_bits(a) - ordered_bits(b)).abs()


def assert_same_nans(a, b):
    assert torch.equal(a.isnan(), b.isnan())


def assert_y_close(y, x, kind, approximate):
    """Close to eager: erf/tanh/exp differ between libdevice, numpy and PyTorch's CPU code."""
    expected = afo.activation_reference(x.cpu(), kind, approximate)
    y = y.cpu()
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert y.stride() == torch.empty_like(x).stride()
    assert_same_nans(y, expected)
    ok = ~expected.isnan()
    # An ulp of the dtype; but absolute (1e-7 * |x|) in the left tail, where 1 + erf/tanh cancels.
    rtol = max(3e-7, torch.finfo(y.dtype).eps)
    atol = max(5e-7, 1.5 * eager_forward_error(kind, approximate, y.dtype))  # eager's error on this CPU
    torch.testing.assert_close(y[ok], expected[ok], rtol=rtol, atol=atol)


def assert_backward_close(dx, expected):
    """fp32: a few ulp, tens of ulp where f' is tiny (Newton amplifies last-bit exp/log differences);
    16-bit: the fp32 values round to the same output within 1 ulp."""
    dx, expected = dx.cpu(), expected.cpu()
    assert dx.shape == expected.shape and dx.dtype == expected.dtype
    assert_same_nans(dx, expected)
    ok = ~expected.isnan()
    if dx.dtype == torch.float32:
        torch.testing.assert_close(dx[ok], expected[ok], rtol=1e-5, atol=1e-6)
    else:
        assert largest(ulp_distance(dx[ok], expected[ok])) <= 1


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_forward_matches_reference(kind, approximate, dtype, shape):
    x = random_input(shape, dtype, kind, approximate)
    y, flag = act_from_output_forward_triton(x, kind, approximate)
    _, expected_flag = afo.forward_reference(x.cpu(), kind, approximate)
    assert flag.dtype == torch.uint8 and flag.shape == (afo.packed_numel(x.numel()),)
    assert torch.equal(flag.cpu(), expected_flag)
    assert_y_close(y, x, kind, approximate)


@pytest.mark.parametrize("shape", ((7,), (3, 5, 13), (33, 65)), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_backward_matches_reference(kind, approximate, dtype, shape):
    x = random_input(shape, dtype, kind, approximate, seed=1)
    grad = random_input(shape, dtype, seed=2)
    y, flag = afo.forward_reference(x.cpu(), kind, approximate)
    dx = act_from_output_backward_triton(grad, y.to(DEVICE), flag.to(DEVICE), kind, approximate)
    assert_backward_close(dx, afo.backward_reference(grad.cpu(), y, flag, kind, approximate))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_backward_near_the_minimum_agrees_to_a_few_ulp(kind, approximate, dtype):
    """Where the derivative is the near-minimum polynomial, both compute the same fp32 operations."""
    inv = afo.INVERSIONS[(kind, approximate)]
    x = (inv.x_min + torch.linspace(-0.1, 0.1, 2001)).to(dtype)
    y, flag = afo.forward_reference(x, kind, approximate)
    ones = torch.ones_like(x)
    dx = act_from_output_backward_triton(ones.to(DEVICE), y.to(DEVICE), flag.to(DEVICE), kind, approximate).cpu()
    expected = afo.backward_reference(ones, y, flag, kind, approximate)
    near = (y.float() - inv.y_min).clamp(min=0).sqrt() <= afo.NEAR_RADIUS
    assert near.sum() > 100
    assert (dx[near] - expected[near]).abs().max() <= 4 * torch.finfo(torch.float32).eps * 0.13
    assert_backward_close(dx, expected)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_special_values(kind, approximate, dtype):
    inv = afo.INVERSIONS[(kind, approximate)]
    values = [math.inf, -math.inf, math.nan, 0.0, -0.0, 1e30, -1e30, 3e38, -3e38, 1e-40, -1e-40,
              inv.x_min, inv.x_left, inv.x_left - 1, 29.0, 31.0, -4.0, -5.5]
    x = torch.tensor(values).to(dtype).to(DEVICE)
    y, flag = act_from_output_forward_triton(x, kind, approximate)
    ref_y, ref_flag = afo.forward_reference(x.cpu(), kind, approximate)
    assert torch.equal(flag.cpu(), ref_flag)
    if eager_nan_at_inf(kind, approximate, dtype):  # eager's vectorized f(+inf) is NaN here; ours is +inf
        assert y.cpu()[0] == math.inf and ref_y[0].isnan()
        assert_same_nans(y.cpu()[1:], ref_y[1:])
    else:
        assert_same_nans(y.cpu(), ref_y)
    grad = torch.tensor([1.0, 1.0, 1.0, math.nan, math.inf, -0.0] * 3).to(dtype).to(DEVICE)
    dx = act_from_output_backward_triton(grad, ref_y.to(DEVICE), ref_flag.to(DEVICE), kind, approximate)
    assert_backward_close(dx, afo.backward_reference(grad.cpu(), ref_y, ref_flag, kind, approximate))


def test_synthetic_outputs_match_reference():
    """(y, flag) pairs no forward produces: below the minimum, positive on the left, huge, -inf."""
    for kind, approximate in FUNCTIONS:
        inv = afo.INVERSIONS[(kind, approximate)]
        y = torch.tensor([inv.y_min - 1.0, -math.inf, 0.0, 5.0, 1e38, -1e-30, inv.y_min, 0.3, math.inf])
        right = torch.tensor([True, True, False, False, True, False, False, False, True])
        flag = afo.pack_bits(right)
        ones = torch.ones_like(y)
        dx = act_from_output_backward_triton(ones.to(DEVICE), y.to(DEVICE), flag.to(DEVICE), kind, approximate)
        assert_backward_close(dx, afo.backward_reference(ones, y, flag, kind, approximate))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_non_contiguous_input_and_gradient(dtype):
    x = random_input((40, 57), dtype).t()
    grad = random_input((40, 57), dtype, seed=3).t()
    assert not x.is_contiguous()
    y, flag = act_from_output_forward_triton(x, "silu", "none")
    assert y.stride() == x.stride()
    assert_y_close(y, x, "silu", "none")
    assert torch.equal(flag.cpu(), afo.forward_reference(x.cpu().contiguous(), "silu")[1])
    ref_y = afo.activation_reference(x.cpu(), "silu").to(DEVICE)  # non-contiguous, like x
    dx = act_from_output_backward_triton(grad, ref_y, flag, "silu", "none")
    assert dx.stride() == grad.stride()
    assert_backward_close(dx, afo.backward_reference(grad.cpu(), ref_y.cpu(), flag.cpu(), "silu"))


@pytest.mark.parametrize("numel", (1, 7, 9, 4097))
def test_pad_bits_of_last_byte_are_zero(numel):
    x = torch.full((numel,), 10.0, device=DEVICE)  # every flag 1: pad bits would show
    _, flag = act_from_output_forward_triton(x, "gelu", "tanh")
    used = numel % 8
    if used:
        assert int(flag[-1]) == (1 << used) - 1
    assert torch.equal(flag.cpu(), afo.forward_reference(x.cpu(), "gelu", "tanh")[1])


def test_empty_input():
    x = torch.empty((0, 3), device=DEVICE)
    y, flag = act_from_output_forward_triton(x, "gelu", "none")
    assert y.shape == (0, 3) and flag.shape == (0,)
    dx = act_from_output_backward_triton(torch.empty((0, 3), device=DEVICE), y, flag, "gelu", "none")
    assert dx.shape == (0, 3)


def test_invalid_arguments_raise():
    x = torch.zeros(9, device=DEVICE)
    flag = torch.zeros(2, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="kind must be one of"):
        act_from_output_forward_triton(x, "relu", "none")
    with pytest.raises(ValueError, match="SiLU has no approximate form"):
        act_from_output_forward_triton(x, "silu", "tanh")
    with pytest.raises(ValueError, match="float64"):
        act_from_output_forward_triton(x.double(), "gelu", "none")
    with pytest.raises(ValueError, match="flag must be uint8"):
        act_from_output_backward_triton(x, x, flag[:1], "gelu", "none")
    with pytest.raises(ValueError, match="flag must be uint8"):
        act_from_output_backward_triton(x, x, flag.to(torch.int8), "gelu", "none")
    with pytest.raises(ValueError, match="y has shape"):
        act_from_output_backward_triton(x, x[:8], flag, "gelu", "none")


@settings(max_examples=10, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    function=st.sampled_from(FUNCTIONS),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_round_trip_matches_reference(shape, dtype, function, seed):
    kind, approximate = function
    x = random_input(shape, dtype, kind, approximate, seed=seed)
    grad = random_input(shape, dtype, seed=seed + 1)
    y, flag = act_from_output_forward_triton(x, kind, approximate)
    assert torch.equal(flag.cpu(), afo.forward_reference(x.cpu(), kind, approximate)[1])
    assert_y_close(y, x, kind, approximate)
    dx = act_from_output_backward_triton(grad, y, flag, kind, approximate)
    assert_backward_close(dx, afo.backward_reference(grad.cpu(), y.cpu(), flag.cpu(), kind, approximate))


# Compiling these kernels for sm_80 / sm_90 without a GPU: tests/test_aot_compile.py.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's Triton path runs on CUDA only")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_op_triton_path_on_cuda(kind, approximate, dtype):
    x = random_input((33, 130), dtype, kind, approximate).requires_grad_()
    torch.library.opcheck(afo.act_from_output, (x, kind, approximate, "triton"))
    y, flag = afo.act_from_output(x.detach(), kind, approximate, "triton")
    cuda_eager = afo.activation_reference(x.detach(), kind, approximate)
    assert largest(ulp_distance(y[~y.isnan()], cuda_eager[~y.isnan()])) <= 1  # libdevice, as PyTorch
    grad = torch.randn_like(x)
    torch.library.opcheck(afo.act_from_output_backward, (grad, y, flag, kind, approximate, "triton"))
    dx = afo.act_from_output_backward(grad, y, flag, kind, approximate, "triton")
    assert_backward_close(dx, afo.backward_reference(grad.cpu(), y.cpu(), flag.cpu(), kind, approximate))
