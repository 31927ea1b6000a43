"""The Triton 2-bit activation kernels against the torch reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors, which costs ~10 ms per
program launch, so the tensors here stay small.
"""

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 without CUDA, before anything imports triton.
pytest.importorskip("triton")

from helpers import DEVICE, DTYPES  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxshear.kernels import act2bit_reference as ref  # noqa: E402
from fxshear.kernels.act2bit_triton import (  # noqa: E402
    act2bit_backward_triton,
    act2bit_forward_triton,
)

SHAPES = ((7,), (3, 5, 13), (1,), (0,), (64, 333))
# (kind, approximate) pairs with distinct forwards; SiLU ignores `approximate`.
ACTIVATIONS = (("gelu", "none"), ("gelu", "tanh"), ("silu", "none"))
BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# Under the interpreter numpy warns about IEEE overflow/NaN the kernels rely on: exp(-x) -> inf
# makes the sigmoid exactly 0, x**3 -> inf saturates tanh, and inf or NaN gradients times 0.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value) encountered in (exp|multiply):RuntimeWarning"
)


def random_input(shape, dtype, seed=0, scale=4.0):
    """Normal samples wide enough to hit all four codes of both kinds."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype).to(DEVICE)


def assert_bitwise_equal(actual, expected):
    """Same shape, dtype and bits, NaN payloads aside (unlike torch.equal: NaN == NaN, -0 != 0)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    expected_nan = expected.isnan()
    assert torch.equal(actual.isnan(), expected_nan)
    bits = BITS_DTYPE[expected.dtype]
    assert torch.equal(actual[~expected_nan].view(bits), expected[~expected_nan].view(bits))


def assert_activation_close(y, x, kind, approximate):
    expected = ref.activation_reference(x, kind, approximate)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert y.stride() == torch.empty_like(x).stride()
    if x.dtype == torch.float32:
        torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(y, expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "approximate"), ACTIVATIONS)
def test_forward_matches_reference(kind, approximate, dtype, shape):
    x = random_input(shape, dtype)
    y, packed = act2bit_forward_triton(x, kind, approximate)
    assert packed.dtype == torch.uint8 and packed.shape == (ref.packed_numel(x.numel()),)
    assert torch.equal(packed, ref.encode_reference(x, kind))
    assert_activation_close(y, x, kind, approximate)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ref.KINDS)
def test_backward_matches_reference(kind, dtype, shape):
    x = random_input(shape, dtype, seed=1)
    grad = random_input(shape, dtype, seed=2, scale=1.0)
    packed = ref.encode_reference(x, kind)
    # Both sides multiply in fp32 and round once to grad's dtype, so they agree bit for bit.
    assert_bitwise_equal(
        act2bit_backward_triton(grad, packed, kind), ref.backward_reference(grad, packed, kind)
    )


def values_around_thresholds(kind, dtype):
    """Each threshold rounded to ``dtype`` and its two neighbours on each side, plus specials."""
    values = []
    for threshold in ref.STEPS[kind].thresholds:
        center = torch.tensor(threshold, dtype=torch.float32).to(dtype)
        below, above = center.clone(), center.clone()
        for _ in range(2):
            below = torch.nextafter(below, torch.tensor(-float("inf"), dtype=dtype))
            above = torch.nextafter(above, torch.tensor(float("inf"), dtype=dtype))
            values += [below, above]
        values.append(center)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")], dtype=dtype)
    return torch.cat([torch.stack(values), specials]).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ref.KINDS)
def test_codes_at_thresholds(kind, dtype):
    x = values_around_thresholds(kind, dtype)
    _, packed = act2bit_forward_triton(x, kind, "none")
    assert torch.equal(packed, ref.encode_reference(x, kind))


@pytest.mark.parametrize("kind", ref.KINDS)
def test_fp32_threshold_itself_is_not_above(kind):
    """torch compares fp32 x with the fp32-rounded threshold; fp32(c) is not above it."""
    thresholds = torch.tensor(ref.STEPS[kind].thresholds, dtype=torch.float32, device=DEVICE)
    just_above = torch.nextafter(thresholds, torch.full_like(thresholds, float("inf")))
    x = torch.stack([thresholds, just_above], dim=1).reshape(-1)
    _, packed = act2bit_forward_triton(x, kind, "none")
    assert ref.unpack_codes(packed, x.numel()).tolist() == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize(("kind", "approximate"), ACTIVATIONS)
def test_extreme_inputs_stay_finite(kind, approximate):
    x = torch.tensor([-1e20, -1e4, -100.0, -20.0, 20.0, 100.0, 1e4, 1e20], device=DEVICE)
    y, packed = act2bit_forward_triton(x, kind, approximate)
    assert torch.isfinite(y).all()
    assert_activation_close(y, x, kind, approximate)
    assert torch.equal(packed, ref.encode_reference(x, kind))


@pytest.mark.parametrize("kind", ref.KINDS)
def test_backward_propagates_nonfinite_gradients(kind):
    x = torch.tensor([-10.0, -1.0, 1.0, 10.0] * 3, device=DEVICE)  # every code, incl. 0
    grad = torch.tensor([float("nan")] * 4 + [float("inf")] * 4 + [-0.0] * 4, device=DEVICE)
    packed = ref.encode_reference(x, kind)
    assert_bitwise_equal(
        act2bit_backward_triton(grad, packed, kind), ref.backward_reference(grad, packed, kind)
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_non_contiguous_input_and_gradient(dtype):
    x = random_input((40, 57), dtype).t()
    grad = random_input((40, 57), dtype, seed=3, scale=1.0).t()
    assert not x.is_contiguous()

    y, packed = act2bit_forward_triton(x, "gelu", "none")
    assert y.stride() == x.stride()
    assert_activation_close(y, x, "gelu", "none")
    assert torch.equal(packed, ref.encode_reference(x, "gelu"))

    dx = act2bit_backward_triton(grad, packed, "gelu")
    assert dx.stride() == grad.stride()
    assert_bitwise_equal(dx, ref.backward_reference(grad, packed, "gelu"))


@pytest.mark.parametrize("numel", (1, 2, 3, 5, 4097))
@pytest.mark.parametrize("fill", (10.0, 0.0))  # codes 3 and 2: pad lanes would be nonzero
def test_pad_codes_are_zero(numel, fill):
    x = torch.full((numel,), fill, device=DEVICE)
    _, packed = act2bit_forward_triton(x, "silu", "none")
    every_code = ref.unpack_codes(packed, packed.numel() * ref.CODES_PER_BYTE)
    assert (every_code[numel:] == 0).all()
    assert torch.equal(packed, ref.encode_reference(x, "silu"))


def test_empty_input():
    x = torch.empty((0, 3), device=DEVICE)
    y, packed = act2bit_forward_triton(x, "gelu", "none")
    assert y.shape == (0, 3) and packed.shape == (0,)
    dx = act2bit_backward_triton(torch.empty((0, 3), device=DEVICE), packed, "gelu")
    assert dx.shape == (0, 3)


def test_invalid_arguments_raise():
    x = torch.zeros(8, device=DEVICE)
    packed = torch.zeros(2, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="activation kind"):
        act2bit_forward_triton(x, "relu", "none")
    with pytest.raises(ValueError, match="approximation"):
        act2bit_forward_triton(x, "gelu", "sigmoid")
    with pytest.raises(ValueError, match="float64"):
        act2bit_forward_triton(x.double(), "gelu", "none")
    with pytest.raises(ValueError, match="activation kind"):
        act2bit_backward_triton(x, packed, "relu")
    with pytest.raises(ValueError, match="packed"):
        act2bit_backward_triton(x, packed[:1], "gelu")
    with pytest.raises(ValueError, match="packed"):
        act2bit_backward_triton(x, packed.to(torch.int8), "gelu")


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(ACTIVATIONS),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_round_trip_matches_reference(shape, dtype, activation, seed):
    kind, approximate = activation
    x = random_input(shape, dtype, seed=seed)
    grad = random_input(shape, dtype, seed=seed + 1, scale=1.0)

    y, packed = act2bit_forward_triton(x, kind, approximate)
    assert torch.equal(packed, ref.encode_reference(x, kind))
    assert_activation_close(y, x, kind, approximate)
    assert_bitwise_equal(
        act2bit_backward_triton(grad, packed, kind), ref.backward_reference(grad, packed, kind)
    )
