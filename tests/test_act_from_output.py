"""fxshear::act_from_output: exact forward, 1-bit flags, derivative recovered from the output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxshear.kernels import act_from_output as afo
from fxshear.kernels.act_from_output import (
    EXACT_DTYPES,
    INVERSIONS,
    INVERSIONS_F64,
    NEAR_RADIUS,
    act_from_output,
    act_from_output_backward,
    backward_reference,
    derivative_from_output,
    forward_reference,
    gelu_from_output,
    pack_bits,
    right_branch,
    silu_from_output,
    unpack_bits,
)
from fxshear.kernels.infra.lowering import lowerable_ops
from helpers import eager_forward_error, eager_nan_at_inf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FUNCTIONS = [("gelu", "none"), ("gelu", "tanh"), ("silu", "none")]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
AWAY = 0.25  # |x - x_min| beyond which the inversion is at the dtype's rounding level

# Largest |dx - f'(x)| (grad = 1) anywhere, from benchmarks/results/act_inversion_error.md, +5%.
MEASURED_MAX_ERROR = {
    (torch.bfloat16, "gelu", "none"): 1.081e-2, (torch.bfloat16, "gelu", "tanh"): 1.072e-2,
    (torch.bfloat16, "silu", "none"): 1.192e-2,
    (torch.float16, "gelu", "none"): 4.871e-3, (torch.float16, "gelu", "tanh"): 3.554e-3,
    (torch.float16, "silu", "none"): 3.814e-3,
    (torch.float32, "gelu", "none"): 2.928e-4, (torch.float32, "gelu", "tanh"): 1.589e-4,
    (torch.float32, "silu", "none"): 1.101e-4,
}
# Away from the minimum: |dx_ours - dx_eager| (grad = 1) <= the sum of both measured errors there.
AWAY_TOLERANCE = {torch.float32: 2e-6, torch.float16: 1.2e-3, torch.bfloat16: 9e-3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box, spinning OpenMP threads cost 100x here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def activation(x: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    return F.gelu(x, approximate=approximate) if kind == "gelu" else F.silu(x)


def true_derivative(x: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    x = x.double()
    if kind == "gelu" and approximate == "none":
        return 0.5 * torch.special.erfc(-x * math.sqrt(0.5)) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return afo.activation_and_derivative(x, kind, approximate)[1]


def eager_grad(x: torch.Tensor, grad: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    activation(x, kind, approximate).backward(grad)
    return x.grad


def ours_grad(x: torch.Tensor, grad: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    y = gelu_from_output(x, approximate, "torch") if kind == "gelu" else silu_from_output(x, "torch")
    y.backward(grad)
    return x.grad


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, dtype and bits, NaN payloads aside."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    bits = BITS[expected.dtype]
    assert torch.equal(actual[~nan].view(bits), expected[~nan].view(bits))


def wide_inputs(dtype: torch.dtype, kind: str, approximate: str, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """Normal samples of several scales, a dense grid around x_min and special values."""
    g = torch.Generator().manual_seed(seed)
    x_min = INVERSIONS[(kind, approximate)].x_min
    parts = [torch.randn(n, generator=g) * s for s in (1.0, 4.0, 20.0)]
    parts.append(x_min + torch.linspace(-0.5, 0.5, 4001))
    parts.append(torch.tensor([0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0, 1e4, -1e4, 60000.0, -60000.0]))
    return torch.cat(parts).to(dtype)


# ----------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_constants_describe_the_minimum_and_the_branches(kind: str, approximate: str) -> None:
    inv = INVERSIONS_F64[(kind, approximate)]
    x = torch.tensor([inv.x_min, inv.x_left], dtype=torch.float64)
    f = activation(x, kind, approximate)
    assert abs(true_derivative(x, kind, approximate)[0].item()) < 1e-12  # f'(x_min) = 0
    assert f[0].item() == pytest.approx(inv.y_min, abs=1e-15)
    assert f[1].item() == pytest.approx(inv.y_left, rel=1e-9)
    assert inv.log_y_min == pytest.approx(-math.log(-inv.y_min), rel=1e-15)
    assert abs(true_derivative(x, kind, approximate)[1].item()) < 1e-9  # clamping at x_left is harmless
    # The near region lies in one binade of y, so its rounding half-width is one constant.
    assert 2.0 ** math.floor(math.log2(-inv.y_min)) <= -inv.y_min - NEAR_RADIUS**2
    assert INVERSIONS[(kind, approximate)] == inv.fp32()


@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_near_polynomial_meets_newton_at_the_boundary(kind: str, approximate: str) -> None:
    """Both sides of ``|rho| = NEAR_RADIUS`` give the same derivative (no seam in the backward)."""
    inv = INVERSIONS[(kind, approximate)]
    y = torch.full((4,), inv.y_min + NEAR_RADIUS**2, dtype=torch.float64)
    y = y + torch.tensor([-1e-9, 1e-9, -1e-9, 1e-9], dtype=torch.float64)  # either side of the seam
    right = torch.tensor([True, True, False, False])
    d = derivative_from_output(y.float(), right, kind, approximate)
    assert abs(d[0] - d[1]) < 1e-6 and abs(d[2] - d[3]) < 1e-6
    assert d[0] > 0 > d[2]


@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_solver_converges_to_fp32_precision(kind: str, approximate: str) -> None:
    """With y = f(x) rounded once to fp32, the fp32 solver's derivative error is at fp32 level
    except where y's own rounding dominates (the sqrt-shaped region at the minimum)."""
    inv = INVERSIONS[(kind, approximate)]
    x = torch.cat([torch.linspace(-40, 40, 40001, dtype=torch.float64),
                   inv.x_min + torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64)])
    y = activation(x, kind, approximate).float()
    d = derivative_from_output(y, x >= inv.x_min, kind, approximate).double()
    err = (d - true_derivative(x, kind, approximate)).abs()
    away = (x - inv.x_min).abs() >= AWAY
    assert err[away].max() < 5e-7
    assert err.max() < 3e-4


# ----------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "function"), [((3, 5), ("gelu", "none")), ((13,), ("gelu", "tanh")),
                                                 ((2, 3, 9), ("silu", "none"))])
def test_opcheck(dtype: torch.dtype, shape: tuple[int, ...], function: tuple[str, str]) -> None:
    kind, approximate = function
    x = (torch.randn(shape) * 2).to(dtype).requires_grad_()
    torch.library.opcheck(act_from_output, (x, kind, approximate, "torch"))
    y, flag = act_from_output(x.detach(), kind, approximate, "torch")
    grad = torch.randn(shape, dtype=dtype)
    torch.library.opcheck(act_from_output_backward, (grad, y, flag, kind, approximate, "torch"))


@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_bitwise_eager(dtype: torch.dtype, kind: str, approximate: str) -> None:
    x = wide_inputs(dtype, kind, approximate, n=3000)
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype)]).view(-1, 6)
    y, _ = act_from_output(x, kind, approximate, "torch")
    assert_bitwise_equal(y, activation(x, kind, approximate))
    wrapped = gelu_from_output(x, approximate, "torch") if kind == "gelu" else silu_from_output(x, "torch")
    assert_bitwise_equal(wrapped, activation(x, kind, approximate))


@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flag_bits_are_the_branch_little_endian(dtype: torch.dtype, kind: str, approximate: str) -> None:
    x_min = torch.tensor(INVERSIONS[(kind, approximate)].x_min, dtype=torch.float32)
    center = x_min.to(dtype)
    below, above = [center], [center]
    for _ in range(4):
        below.append(torch.nextafter(below[-1], torch.tensor(-math.inf, dtype=dtype)))
        above.append(torch.nextafter(above[-1], torch.tensor(math.inf, dtype=dtype)))
    specials = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 5.0, -5.0], dtype=dtype)
    x = torch.cat([torch.stack(below), torch.stack(above), specials, (torch.randn(40) * 2).to(dtype)])
    _, flag = act_from_output(x, kind, approximate, "torch")
    assert flag.dtype == torch.uint8 and flag.shape == ((x.numel() + 7) // 8,)
    expected = [bool(v.float() >= x_min) for v in x]  # NaN compares False: the left branch
    got = [bool((int(flag[i // 8]) >> (i % 8)) & 1) for i in range(x.numel())]
    assert got == expected
    assert int(flag[-1]) >> (x.numel() % 8 or 8) == 0  # pad bits of the last byte are zero


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 23])
def test_pad_bits_zero_and_roundtrip(numel: int) -> None:
    x = torch.full((numel,), 3.0)  # every element on the right branch
    _, flag = act_from_output(x, "silu", "none", "torch")
    assert flag.numel() == (numel + 7) // 8
    assert int(flag[-1]) == (1 << (numel % 8 or 8)) - 1
    bits = torch.rand(numel) > 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), numel), bits)


@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_eager_away_from_the_minimum(dtype: torch.dtype, kind: str, approximate: str) -> None:
    x = wide_inputs(dtype, kind, approximate)
    ones = torch.ones_like(x)
    ours, eager = ours_grad(x, ones, kind, approximate), eager_grad(x, ones, kind, approximate)
    away = (x.double() - INVERSIONS[(kind, approximate)].x_min).abs() >= AWAY
    diff = (ours.double() - eager.double()).abs()
    # The inversion reads eager's output: an error δ there moves the recovered f' by |f''/f'|·δ,
    # at most ~2δ this far from the minimum.
    tolerance = AWAY_TOLERANCE[dtype] + 2 * eager_forward_error(kind, approximate, dtype)
    assert diff[away].max() <= tolerance
    # ... and with a random gradient the product is just as close (fp32 multiply, one rounding).
    grad = torch.randn(x.shape).to(dtype)
    ours_g, eager_g = ours_grad(x, grad, kind, approximate), eager_grad(x, grad, kind, approximate)
    gdiff = (ours_g.double() - eager_g.double()).abs()
    scale = grad.double().abs().clamp(min=1)
    assert (gdiff[away] / scale[away]).max() <= 2 * tolerance


@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_near_the_minimum_is_bounded_by_the_measurement(
    dtype: torch.dtype, kind: str, approximate: str
) -> None:
    """Every x of the dtype within 0.6 of x_min (fp32: 2^15 ulps each side plus a grid)."""
    x_min = INVERSIONS[(kind, approximate)].x_min
    if dtype == torch.float32:
        center = torch.tensor(x_min, dtype=torch.float32).view(torch.int32)
        x = (center + torch.arange(-(2**15), 2**15 + 1, dtype=torch.int32)).view(torch.float32)
        x = torch.cat([x, x_min + torch.linspace(-0.6, 0.6, 50001)])
    else:
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        x = every[(every.double() - x_min).abs() <= 0.6]
    dx = ours_grad(x, torch.ones_like(x), kind, approximate)
    err = (dx.double() - true_derivative(x, kind, approximate)).abs()
    assert err.max() <= MEASURED_MAX_ERROR[(dtype, kind, approximate)] * 1.05
    if dtype in EXACT_DTYPES:  # eager's largest error in the dtype is half an ulp of f' near 1
        assert err.max() <= afo.EXACT_RATIO * torch.finfo(dtype).eps / 2


@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_extreme_and_nonfinite_inputs(kind: str, approximate: str) -> None:
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e30, -1e30, 3e38, -3e38, 1e-40, -1e-40])
    dx = ours_grad(x, torch.ones_like(x), kind, approximate)
    y = activation(x, kind, approximate)
    # +inf: the limit 1 (eager: NaN); NaN stays NaN; huge x: 1 or 0; y = -0 on the left: 0, not NaN.
    # Where eager's own forward gives NaN at +inf (AVX512 erf GELU), that NaN output propagates.
    assert dx[0] == 1.0 or (eager_nan_at_inf(kind, approximate, x.dtype) and dx[0].isnan())
    assert dx[2].isnan()
    assert dx[1].isnan() == y[1].isnan()  # GELU(-inf) is NaN in eager (-inf * 0), SiLU(-inf) is -0
    if not y[1].isnan():
        assert dx[1] == 0.0
    assert dx[3] == 0.5 and dx[4] == 0.5 and dx[9] == 0.5 and dx[10] == 0.5
    assert dx[5] == 1.0 and dx[7] == 1.0
    assert dx[6] == 0.0 and dx[8] == 0.0
    # Synthetic (y, flag) pairs no forward produces still give finite, sensible derivatives.
    inv = INVERSIONS[(kind, approximate)]
    y = torch.tensor([inv.y_min - 1.0, -math.inf, 0.0, 5.0, 1e38, -1e-30, inv.y_min - 1.0])
    right = torch.tensor([True, True, False, False, True, False, False])
    d = derivative_from_output(y, right, kind, approximate)
    assert d.tolist()[:6] == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert abs(d[6].item()) < 1e-6  # below the minimum on the left: x_min, f' = 0


def test_gradient_nan_and_inf_propagate() -> None:
    x = torch.tensor([-3.0, -0.5, 0.5, 3.0] * 3)
    grad = torch.tensor([math.nan] * 4 + [math.inf] * 4 + [-0.0] * 4)
    y, flag = act_from_output(x, "gelu", "none", "torch")
    dx = act_from_output_backward(grad, y, flag, "gelu", "none", "torch")
    assert dx[:4].isnan().all()
    assert torch.equal(dx[4:8], torch.tensor([-math.inf, math.inf, math.inf, math.inf]))  # sign of f'
    assert (dx[8:] == 0).all()


def test_non_contiguous_input_and_gradient() -> None:
    x = (torch.randn(10, 6) * 3).t()
    grad = torch.randn(10, 6).t()
    y, flag = act_from_output(x, "gelu", "tanh", "torch")
    assert y.stride() == torch.empty_like(x).stride()
    assert torch.equal(y, F.gelu(x, approximate="tanh"))
    assert torch.equal(flag, pack_bits(right_branch(x.contiguous(), "gelu", "tanh")))
    dx = act_from_output_backward(grad, y, flag, "gelu", "tanh", "torch")
    assert dx.stride() == grad.stride()
    expected = act_from_output_backward(grad.contiguous(), y.contiguous(), flag, "gelu", "tanh", "torch")
    assert torch.equal(dx, expected)


def test_autograd_saves_the_output_and_the_flag() -> None:
    x = torch.randn(37, requires_grad=True)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = gelu_from_output(x, "none", "torch")
    assert saved == [(torch.float32, (37,)), (torch.uint8, (5,))]
    y.sum().backward()  # an expanded (stride-0) gradient
    torch.testing.assert_close(x.grad, eager_grad(x, torch.ones(37), "gelu", "none"), atol=3e-4, rtol=0)


def test_double_backward_raises_clearly() -> None:
    """The backward op has no autograd formula of its own: second derivatives are refused."""
    x = torch.randn(10, requires_grad=True)
    (g,) = torch.autograd.grad(gelu_from_output(x, "none", "torch").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(0, 19), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    function=st.sampled_from(FUNCTIONS),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_and_dtypes(
    shape: tuple[int, ...], dtype: torch.dtype, function: tuple[str, str], seed: int
) -> None:
    kind, approximate = function
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    y, flag = act_from_output(x, kind, approximate, "torch")
    numel = x.numel()
    assert flag.dtype == torch.uint8 and flag.shape == ((numel + 7) // 8,)
    assert_bitwise_equal(y.detach(), activation(x.detach(), kind, approximate))
    assert torch.equal(unpack_bits(flag, numel).view(shape), right_branch(x.detach(), kind, approximate))
    grad = torch.randn(shape, generator=g).to(dtype)
    y.backward(grad)
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert_bitwise_equal(x.grad, backward_reference(grad, y.detach(), flag, kind, approximate))


def test_bad_arguments_are_clear() -> None:
    x = torch.randn(9)
    with pytest.raises(ValueError, match="kind must be one of"):
        act_from_output(x, "relu", "none", "torch")
    with pytest.raises(ValueError, match="approximate must be one of"):
        act_from_output(x, "gelu", "erf", "torch")
    with pytest.raises(ValueError, match="SiLU has no approximate form"):
        act_from_output(x, "silu", "tanh", "torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        act_from_output(x, "gelu", "none", "cuda")
    y, flag = act_from_output(x, "gelu", "none", "torch")
    with pytest.raises(ValueError, match="flag must be uint8 with 2 elements"):
        act_from_output_backward(x, y, flag[:1], "gelu", "none", "torch")
    with pytest.raises(ValueError, match="flag must be uint8"):
        act_from_output_backward(x, y, flag.to(torch.int8), "gelu", "none", "torch")
    with pytest.raises(ValueError, match="y has shape"):
        act_from_output_backward(x, y[:8], flag, "gelu", "none", "torch")


# ----------------------------------------------------------------------------------------------
# Inductor CPU lowering and the error policy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kind", "approximate"), FUNCTIONS)
def test_cpu_lowering_traces_to_the_op(dtype: torch.dtype, kind: str, approximate: str) -> None:
    """The registered lowerings, traced as lowering._inline traces them, compute the op."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    assert torch.ops.fxshear.act_from_output.default in lowerable_ops()
    assert torch.ops.fxshear.act_from_output_backward.default in lowerable_ops()
    x = wide_inputs(dtype, kind, approximate, n=300, seed=1)[:4901].view(-1, 13)  # numel % 8 == 5
    grad = torch.randn(x.shape).to(dtype)
    y, flag = act_from_output(x, kind, approximate, "torch")

    forward = make_fx(lambda t: afo.lower_forward(t, kind, approximate, "auto"),
                      decomposition_table=select_decomp_table())(x)
    ty, tflag = forward(x)
    assert torch.equal(tflag, flag)
    # gelu/silu are decomposed into erf/exp math here: eager's fused kernel uses its own erf/exp
    # approximations, so values differ by an ulp, and by ~1e-7 absolute in the cancelling left tail.
    atol = max(5e-7, 1.5 * eager_forward_error(kind, approximate, dtype))  # eager's error on this CPU
    torch.testing.assert_close(ty, y, rtol=2 * torch.finfo(dtype).eps, atol=atol)

    backward = make_fx(lambda g, t, f: afo.lower_backward(g, t, f, kind, approximate, "auto"),
                       decomposition_table=select_decomp_table())(grad, y, flag)
    assert not any(n.op == "get_attr" for n in backward.graph.nodes)  # no baked-in tensor constants
    expected = act_from_output_backward(grad, y, flag, kind, approximate, "torch")
    assert_bitwise_equal(backward(grad, y, flag), expected)


def test_forward_reference_is_the_op() -> None:
    x = torch.randn(5, 11)
    y, flag = forward_reference(x, "silu")
    ry, rflag = act_from_output(x, "silu", "none", "torch")
    assert torch.equal(y, ry) and torch.equal(flag, rflag)


def test_exact_dtypes_agree_with_a_fresh_measurement() -> None:
    """The policy constant is what a (thinned) run of benchmarks/act_inversion_error.py finds."""
    from benchmarks.act_inversion_error import FUNCTIONS as BENCH_FUNCTIONS
    from benchmarks.act_inversion_error import exact_dtypes, measure

    measurements = [measure(dtype, kind, approximate, scale=64)
                    for dtype in DTYPES for kind, approximate in BENCH_FUNCTIONS]
    assert exact_dtypes(measurements) == EXACT_DTYPES
    for m in measurements:
        assert m.inversion_nonfinite == 0
        assert m.inversion_max >= m.floor  # nothing beats the floor ...
        if m.dtype != "float32":  # ... and the inversion is within 5% of it (measured: 0.3-4.8%)
            assert m.inversion_max <= 1.08 * m.floor
        # away from the minimum: at the dtype's rounding level (fp32: torch's own forward is only
        # accurate to ~1.5e-7 absolute on AVX2 builds, 1.2e-6 on AVX512 ones, which the inversion
        # turns into up to ~2.5x that in the tail)
        kind, _, approximate = m.function.partition(" ")
        forward_error = eager_forward_error(kind, approximate or "none", getattr(torch, m.dtype))
        assert m.inversion_away_max <= max(1.6 * m.eager_away_max, 1e-6) + 2.5 * forward_error
