"""fxshear::act2bit: exact forward, the published step derivative exactly, opcheck, packing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxshear.kernels.act2bit import act2bit, act2bit_backward, gelu2, silu2
from fxshear.kernels.act2bit_reference import (
    GELU_STEPS,
    SILU_STEPS,
    STEPS,
    codes_reference,
    encode_reference,
    pack_codes,
    unpack_codes,
)

from conftest import cosine

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_published_constants_are_consistent() -> None:
    """sum(a) = 1 and sum(a*c) = 0: the step derivative is that of sum a_i ReLU(x - c_i)."""
    for steps in (GELU_STEPS, SILU_STEPS):
        assert math.isclose(sum(steps.slopes), 1.0, abs_tol=1e-12)
        assert math.isclose(sum(a * c for a, c in zip(steps.slopes, steps.thresholds)), 0.0, abs_tol=1e-9)
        assert steps.levels[0] == 0.0


@pytest.mark.parametrize("kind", ["gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_is_exactly_the_step_function(kind: str, dtype: torch.dtype) -> None:
    x = torch.linspace(-9, 9, 4001, dtype=dtype)
    x = torch.cat([x, torch.tensor(STEPS[kind].thresholds, dtype=torch.float32).to(dtype)]).requires_grad_()
    fn = gelu2 if kind == "gelu" else silu2
    fn(x).backward(torch.ones_like(x))
    codes = codes_reference(x.detach(), kind).long()
    expected = torch.tensor(STEPS[kind].levels, dtype=torch.float32)[codes].to(dtype)
    assert torch.equal(x.grad, expected)
    assert set(torch.unique(x.grad.float()).tolist()) <= {float(torch.tensor(v, dtype=torch.float32).to(dtype))
                                                         for v in STEPS[kind].levels}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_forward_is_bitwise_eager(approximate: str) -> None:
    x = torch.randn(257, 33)
    assert torch.equal(gelu2(x, approximate), torch.nn.functional.gelu(x, approximate=approximate))
    assert torch.equal(silu2(x), torch.nn.functional.silu(x))


@pytest.mark.parametrize("kind", ["gelu", "silu"])
def test_gradient_cosine_to_exact_is_reported(kind: str, record_property) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    x = torch.randn(64, 512, requires_grad=True)
    g = torch.randn(64, 512)
    exact = torch.nn.functional.gelu if kind == "gelu" else torch.nn.functional.silu
    approx_fn = gelu2 if kind == "gelu" else silu2
    (gx_exact,) = torch.autograd.grad(exact(x), x, g)
    (gx_approx,) = torch.autograd.grad(approx_fn(x), x, g)
    value = cosine(gx_exact, gx_approx)
    record_property(f"{kind}_grad_cosine", value)
    print(f"{kind}: input-gradient cosine to exact backprop = {value:.4f}")
    assert value > 0.9  # measured: 0.945 (GELU), 0.921 (SiLU) on N(0, 1) inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 3, 9)])
def test_opcheck(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(act2bit, (x, "gelu", "none", "torch"))
    torch.library.opcheck(act2bit, (x, "silu", "none", "torch"))
    _, codes = act2bit(x.detach(), "gelu", "none", "torch")
    torch.library.opcheck(act2bit_backward, (torch.randn(shape, dtype=dtype), codes, "gelu", "torch"))


def test_non_contiguous_input() -> None:
    x = torch.randn(6, 10).t()
    y, codes = act2bit(x, "gelu", "none", "torch")
    assert y.stride() == torch.empty_like(x).stride()
    assert torch.equal(y, torch.nn.functional.gelu(x))
    assert torch.equal(codes, encode_reference(x, "gelu"))


def test_codes_are_packed_in_planes() -> None:
    """Element i sits in bits 2 * (i // B) of byte i % B (B bytes): the layout Inductor vectorizes."""
    codes = torch.tensor([1, 2, 3, 0, 1, 2, 3, 3, 2, 1], dtype=torch.uint8)  # 10 codes -> 3 bytes
    packed = pack_codes(codes)
    expected = [
        sum(int(codes[i]) << (2 * (i // 3)) for i in range(10) if i % 3 == byte) for byte in range(3)
    ]
    assert packed.tolist() == expected
    assert unpack_codes(packed, 12)[10:].tolist() == [0, 0]  # pad codes


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 17), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["gelu", "silu"]),
)
def test_pack_roundtrip_and_size(shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> None:
    x = (torch.randn(shape) * 5).to(dtype)
    codes = codes_reference(x, kind)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (x.numel() + 3) // 4
    assert torch.equal(unpack_codes(packed, x.numel()), codes.reshape(-1))
    grad = torch.randn(shape).to(dtype)
    dx = act2bit_backward(grad, packed, kind, "torch")
    expected = (grad.float() * torch.tensor(STEPS[kind].levels)[codes.long()]).to(dtype)
    assert torch.equal(dx, expected)


def test_bad_arguments_are_clear() -> None:
    x = torch.randn(4)
    with pytest.raises(ValueError, match="kind must be one of"):
        act2bit(x, "relu", "none", "torch")
    with pytest.raises(ValueError, match="approximate must be one of"):
        act2bit(x, "gelu", "erf", "torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        act2bit(x, "gelu", "none", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path runs on CUDA only")
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_triton_path_on_cuda(dtype: torch.dtype) -> None:
    x = torch.randn(33, 130, dtype=dtype, device="cuda", requires_grad=True)
    torch.library.opcheck(act2bit, (x, "gelu", "none", "triton"))
    torch.library.opcheck(act2bit, (x, "silu", "none", "triton"))
    y, codes = act2bit(x.detach(), "gelu", "tanh", "triton")
    ref_y, ref_codes = act2bit(x.detach().cpu(), "gelu", "tanh", "torch")
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(y.cpu(), ref_y)
    torch.library.opcheck(act2bit_backward, (torch.randn_like(x), codes, "gelu", "triton"))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 19), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["gelu", "silu"]),
)
def test_aten_lowering_equals_the_reference(shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> None:
    """The math Inductor fuses on CPU is the reference, bit for bit (eagerly evaluated)."""
    from fxshear.kernels.act2bit_inductor import fused_backward, fused_forward

    x = (torch.randn(shape) * 4).to(dtype)
    y, packed = fused_forward(x, kind, "none")
    assert torch.equal(packed, encode_reference(x, kind))
    grad = torch.randn(shape).to(dtype)
    assert torch.equal(fused_backward(grad, packed, kind), act2bit_backward(grad, packed, kind, "torch"))
