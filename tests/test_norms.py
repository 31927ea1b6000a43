"""fxshear::normalize (MS-LN / MS-RMSNorm) and fxshear::shared_linear against eager PyTorch.

Tolerances are relative to the largest magnitude of the float64 result (floored at 1, so values
near 0 are compared absolutely).  Measured worst cases on these inputs: fp32 ~2e-7, fp16 ~2e-3,
bf16 ~1.5e-2; half-precision ``z`` is rounded once more than inside F.layer_norm's kernel.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from fxshear.kernels.infra.lowering import lowerable_ops
from fxshear.kernels.norms import (
    layer_norm,
    normalize,
    normalize_backward,
    normalize_backward_reference,
    normalize_reference,
    rms_norm,
)
from fxshear.kernels.dropout_bits import dropout_apply, dropout_draw
from fxshear.kernels.shared_linear import _lower_dropout_input_weight_grad, dropout_input_weight_grad, shared_linear

F = torch.nn.functional
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
LAST_DIMS = [1, 2, 7, 33, 384]


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, scale: float = 0.0) -> None:
    """max |actual - expected| <= tol * max(max |expected|, scale, 1)."""
    assert actual.shape == expected.shape
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.double().abs().max().item() if expected.numel() else 0.0, scale, 1.0)
    assert error <= tol * scale, f"max error {error:.3g} > {tol:.1g} * {scale:.3g}"


def dx_error_scale(x: torch.Tensor, grad_z: torch.Tensor, eps: float, kind: str) -> float:
    """max over rows of rstd * max |grad_z|: the size of dx's rounding error.

    dx = rstd * (g - mean(g) - z * mean(g z)) cancels to ~0 when a row is nearly constant
    (n = 2, or a tiny variance next to eps); the rounding error of the saved z (and of the fp32
    sums) is then amplified by rstd, as in any backward that uses the normalized output.
    """
    h = x.double()
    variance = h.var(-1, unbiased=False, keepdim=True) if kind == "layer" else h.pow(2).mean(-1, keepdim=True)
    rows = torch.rsqrt(variance + eps) * grad_z.double().abs().amax(-1, keepdim=True)
    return rows.max().item() if rows.numel() else 0.0


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


shapes = st.tuples(st.lists(st.integers(1, 4), min_size=0, max_size=2), st.sampled_from(LAST_DIMS)).map(
    lambda t: (*t[0], t[1])
)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), offset=st.floats(-3, 3))
def test_layer_matches_f_layer_norm(shape: tuple[int, ...], dtype: torch.dtype, seed: int, offset: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    n, eps = shape[-1], 1e-5
    x = (torch.randn(shape, generator=generator) * 2 + offset).to(dtype)
    weight = (torch.randn(n, generator=generator) * 0.5 + 1).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    grad = torch.randn(shape, generator=generator).to(dtype)

    xo, wo, bo = leaves(x, weight, bias)
    out = layer_norm(xo, wo, bo, eps, "torch")
    out.backward(grad)
    xe, we, be = leaves(x, weight, bias)
    eager = F.layer_norm(xe, (n,), we, be, eps)
    eager.backward(grad)
    xt, wt, bt = leaves(x.double(), weight.double(), bias.double())
    truth = F.layer_norm(xt, (n,), wt, bt, eps)
    truth.backward(grad.double())

    tol = TOL[dtype]
    assert out.dtype == dtype
    dx_scale = dx_error_scale(x, grad * weight, eps, "layer")
    for ours, ref, exact, scale in ((out, eager, truth, 0.0), (xo.grad, xe.grad, xt.grad, dx_scale),
                                    (wo.grad, we.grad, wt.grad, 0.0), (bo.grad, be.grad, bt.grad, 0.0)):
        assert_close_scaled(ours, exact, tol, scale)
        if n > 2:
            # For n <= 2 the output is (nearly) constant and dx ~ 0; there eager's kernel is the
            # inexact one (n == 1, fp32: dx ~ 1.5e-5 where the float64 answer is 0).
            assert_close_scaled(ours, ref, 2 * tol, scale)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_rms_matches_hugging_face(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    n, eps = shape[-1], 1e-6
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    weight = (torch.randn(n, generator=generator) * 0.5 + 1).to(dtype)
    grad = torch.randn(shape, generator=generator).to(dtype)

    xo, wo = leaves(x, weight)
    out = rms_norm(xo, wo, eps, "torch")
    out.backward(grad)
    xe, we = leaves(x, weight)
    eager = hf_rms_norm(xe, we, eps)
    eager.backward(grad)
    xt, wt = leaves(x.double(), weight.double())
    hf_rms_norm(xt, wt, eps).backward(grad.double())

    # Same fp32 math and roundings as Hugging Face: forward and weight gradient bit for bit.
    assert torch.equal(out, eager)
    assert torch.equal(wo.grad, we.grad)
    dx_scale = dx_error_scale(x, grad * weight, eps, "rms")
    assert_close_scaled(xo.grad, xt.grad, TOL[dtype], dx_scale)
    assert_close_scaled(xo.grad, xe.grad, 2 * TOL[dtype], dx_scale)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_contract(kind: str, dtype: torch.dtype) -> None:
    x = (torch.randn(2, 3, 33) * 2 + 1).to(dtype)
    z, rstd = normalize(x, kind, 1e-5, "torch")
    assert z.dtype == dtype and z.shape == x.shape and z.is_contiguous()
    assert rstd.dtype == torch.float32 and rstd.shape == (2, 3, 1)
    h = x.double()
    if kind == "layer":
        expected = 1 / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    else:
        expected = 1 / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rstd.double(), expected, rtol=1e-6, atol=0)


def test_non_contiguous_input() -> None:
    x = torch.randn(33, 4, 6).transpose(0, 2)
    for kind in ("layer", "rms"):
        z, rstd = normalize(x, kind, 1e-5, "torch")
        z_ref, rstd_ref = normalize(x.contiguous(), kind, 1e-5, "torch")
        assert z.is_contiguous() and torch.equal(z, z_ref) and torch.equal(rstd, rstd_ref)


def test_only_z_and_rstd_are_saved() -> None:
    x = torch.randn(4, 16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z, rstd = normalize(x, "layer", 1e-5, "torch")
    assert [t.data_ptr() for t in saved] == [z.data_ptr(), rstd.data_ptr()]
    assert not rstd.requires_grad and z.requires_grad
    z.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowerings_traced_equal_the_ops(dtype: torch.dtype) -> None:
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxshear.kernels.norms import _lower_normalize, _lower_normalize_backward

    assert torch.ops.fxshear.normalize.default in lowerable_ops()
    assert torch.ops.fxshear.normalize_backward.default in lowerable_ops()
    decompositions = select_decomp_table()
    x = (torch.randn(3, 5, 33) + 0.5).to(dtype)
    grad = torch.randn(3, 5, 33).to(dtype)
    for kind in ("layer", "rms"):
        forward = make_fx(lambda t: _lower_normalize(t, kind, 1e-5, "torch"),  # noqa: B023
                          decomposition_table=decompositions)(x)
        z, rstd = normalize(x, kind, 1e-5, "torch")
        traced_z, traced_rstd = forward(x)
        torch.testing.assert_close(traced_z, z, rtol=0, atol=0)
        torch.testing.assert_close(traced_rstd, rstd, rtol=0, atol=0)
        backward = make_fx(lambda g, a, b: _lower_normalize_backward(g, a, b, kind, "torch"),  # noqa: B023
                           decomposition_table=decompositions)(grad, z, rstd)
        torch.testing.assert_close(backward(grad, z, rstd), normalize_backward(grad, z, rstd, kind, "torch"),
                                   rtol=0, atol=0)


def test_references_are_the_documented_formulas() -> None:
    x = torch.randn(4, 7) * 2 + 1
    z, rstd = normalize_reference(x, "layer", 1e-5)
    mean = x.mean(-1, keepdim=True)
    torch.testing.assert_close(z, (x - mean) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5))
    g = torch.randn(4, 7)
    dx = normalize_backward_reference(g, z, rstd, "layer")
    expected = rstd * (g - g.mean(-1, keepdim=True) - z * (g * z).mean(-1, keepdim=True))
    torch.testing.assert_close(dx, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_normalize(dtype: torch.dtype) -> None:
    for shape in [(3, 5), (2, 3, 1)]:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        for kind in ("layer", "rms"):
            torch.library.opcheck(normalize, (x, kind, 1e-5, "torch"))
            z, rstd = normalize(x.detach(), kind, 1e-5, "torch")
            torch.library.opcheck(normalize_backward, (torch.randn(shape, dtype=dtype), z, rstd, kind, "torch"))


def test_normalize_bad_arguments() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        normalize(x, "batch", 1e-5, "torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        normalize(x, "rms", 1e-5, "cuda")
    with pytest.raises(ValueError, match="at least one dimension"):
        normalize(torch.tensor(1.0), "rms", 1e-5, "torch")
    z, rstd = normalize(x, "rms", 1e-5, "torch")
    with pytest.raises(ValueError, match="do not match"):
        normalize_backward(x, z, rstd[:2], "rms", "torch")


# ----------------------------------------------------------------------------- shared_linear


def linear_case(dtype: torch.dtype, gamma: bool, beta: bool, bias: bool, frozen: bool, shape=(2, 5, 12), out=9):
    generator = torch.Generator().manual_seed(0)
    k = shape[-1]
    z = torch.randn(shape, generator=generator).to(dtype)
    params = {
        "gamma": (torch.randn(k, generator=generator) * 0.5 + 1).to(dtype) if gamma else None,
        "beta": torch.randn(k, generator=generator).to(dtype) if beta else None,
        "weight": (torch.randn(out, k, generator=generator) / k**0.5).to(dtype),
        "bias": torch.randn(out, generator=generator).to(dtype) if bias else None,
    }
    grad = torch.randn((*shape[:-1], out), generator=generator).to(dtype)
    return z, params, grad


def affine(z, gamma, beta):  # noqa: ANN001, ANN201
    """``z * gamma + beta`` where each is given: the norm's output as the rewrite rebuilds it."""
    x = z
    if gamma is not None:
        x = x * gamma
    if beta is not None:
        x = x + beta
    return x


def run_linear(z, params, grad, frozen: bool, ours: bool, precision: torch.dtype | None = None):
    """Gradients of F.linear(z * gamma + beta, W, b) w.r.t. every leaf (None where not required)."""
    cast = (lambda t: t.to(precision)) if precision else (lambda t: t)
    z = cast(z).detach().requires_grad_()
    leaves_ = {name: None if t is None else cast(t).detach().requires_grad_(not (frozen and name == "weight"))
               for name, t in params.items()}
    x = affine(z, leaves_["gamma"], leaves_["beta"])
    if ours:
        y = shared_linear(x, z, leaves_["gamma"], leaves_["beta"], leaves_["weight"], leaves_["bias"], "torch")
    else:
        y = F.linear(x, leaves_["weight"], leaves_["bias"])
    y.backward(cast(grad))
    grads = {"z": z.grad, **{name: None if t is None else t.grad for name, t in leaves_.items()}}
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize(("gamma", "beta", "bias"),
                         [(True, True, True), (True, False, True), (False, True, False), (False, False, False)])
def test_shared_linear_matches_eager(dtype, frozen, gamma, beta, bias) -> None:  # noqa: ANN001
    z, params, grad = linear_case(dtype, gamma, beta, bias, frozen)
    y_ours, ours = run_linear(z, params, grad, frozen, ours=True)
    y_eager, eager = run_linear(z, params, grad, frozen, ours=False)
    _, truth = run_linear(z, params, grad, frozen, ours=False, precision=torch.float64)
    assert torch.equal(y_ours, y_eager)  # the forward is F.linear itself
    for name, value in eager.items():
        if value is None:
            assert ours[name] is None, name
            continue
        assert ours[name].dtype == value.dtype
        assert_close_scaled(ours[name], truth[name], TOL[dtype])
        assert_close_scaled(ours[name], value, 2 * TOL[dtype])
    if frozen:
        assert ours["weight"] is None


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_weight_skips_its_matmul(frozen: bool) -> None:
    z, params, grad = linear_case(torch.float32, True, True, True, frozen)
    x = (z * params["gamma"] + params["beta"]).requires_grad_()
    weight = params["weight"].requires_grad_(not frozen)
    y = shared_linear(x, z, params["gamma"], params["beta"], weight, params["bias"], "torch")
    with CountMatmuls() as counter:
        y.backward(grad)
    assert counter.count == (1 if frozen else 2)
    assert x.grad is not None and (weight.grad is None) == frozen


def test_shared_linear_saves_z_not_x() -> None:
    z, params, grad = linear_case(torch.float32, True, True, True, False)
    z.requires_grad_()
    x = z * params["gamma"] + params["beta"]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = shared_linear(x, z, params["gamma"], params["beta"], params["weight"].requires_grad_(), None, "torch")
    pointers = {t.data_ptr() for t in saved}
    assert x.data_ptr() not in pointers
    assert {z.data_ptr(), params["weight"].data_ptr()} <= pointers
    y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_then_shared_linear_matches_eager_modules(dtype: torch.dtype) -> None:
    """LayerNorm -> Linear, rebuilt from normalize + affine + shared_linear: same gradients everywhere."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(24).to(dtype)
    linear = torch.nn.Linear(24, 10).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_()
    x = torch.randn(3, 7, 24).to(dtype)
    grad = torch.randn(3, 7, 10).to(dtype)

    def ours(inp: torch.Tensor) -> torch.Tensor:
        z = normalize(inp, "layer", norm.eps, "torch")[0]
        h = z * norm.weight + norm.bias
        return shared_linear(h, z, norm.weight, norm.bias, linear.weight, linear.bias, "torch")

    results = []
    for fn in (ours, lambda inp: linear(norm(inp))):
        inp = x.clone().requires_grad_()
        for p in (*norm.parameters(), *linear.parameters()):
            p.grad = None
        fn(inp).backward(grad)
        results.append([inp.grad] + [p.grad.clone() for p in (*norm.parameters(), *linear.parameters())])
    for a, b in zip(*results):
        assert_close_scaled(a, b, 2 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_shared_linear(dtype: torch.dtype) -> None:
    for gamma, beta, bias, shape in [(True, True, True, (2, 3, 6)), (False, False, False, (4, 5)),
                                     (True, False, True, (6,))]:
        z, params, _ = linear_case(dtype, gamma, beta, bias, False, shape=shape, out=4)
        x = affine(z.clone(), params["gamma"], params["beta"])
        args = [t if t is None else t.requires_grad_() for t in (x, z, *params.values())]
        torch.library.opcheck(shared_linear, (*args, "torch"))


# ----------------------------------------------------------------------------- behind a dropout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize(("gamma", "beta", "bias"), [(True, True, True), (False, False, False), (True, False, True)])
def test_shared_linear_behind_dropout_matches_eager(dtype, frozen, gamma, beta, bias) -> None:  # noqa: ANN001
    """norm affine -> F.dropout -> Linear (PEFT LoRA A): the same seed gives eager's mask, output
    and every gradient, while the Linear keeps z and the bits instead of the dropout output."""
    z0, params, grad = linear_case(dtype, gamma, beta, bias, frozen)
    p = 0.3
    results = []
    for ours in (True, False):
        z = z0.clone().requires_grad_()
        leaves_ = {name: None if t is None else t.clone().requires_grad_(not (frozen and name == "weight"))
                   for name, t in params.items()}
        x = affine(z, leaves_["gamma"], leaves_["beta"])
        torch.manual_seed(7)
        if ours:
            bits = dropout_draw(x, p, "torch")
            d = dropout_apply(x, bits, p, "torch")
            y = shared_linear(d, z, leaves_["gamma"], leaves_["beta"], leaves_["weight"], leaves_["bias"], "torch",
                              bits, p)
        else:
            y = F.linear(F.dropout(x, p), leaves_["weight"], leaves_["bias"])
        y.backward(grad)
        results.append((y, {"z": z.grad, **{k: None if t is None else t.grad for k, t in leaves_.items()}}))
    (y_ours, ours_grads), (y_eager, eager_grads) = results
    assert torch.equal(y_ours, y_eager)
    for name, value in eager_grads.items():
        if value is None:
            assert ours_grads[name] is None, name
        else:
            assert ours_grads[name].dtype == value.dtype
            assert_close_scaled(ours_grads[name], value, 2 * TOL[dtype])


def test_shared_linear_behind_dropout_saves_z_and_bits_not_the_dropout_output() -> None:
    z, params, grad = linear_case(torch.float32, True, True, True, False)
    z.requires_grad_()
    x = z * params["gamma"] + params["beta"]
    bits = dropout_draw(x, 0.2, "torch")
    d = dropout_apply(x, bits, 0.2, "torch")
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = shared_linear(d, z, params["gamma"], params["beta"], params["weight"].requires_grad_(), None, "torch",
                          bits, 0.2)
    pointers = {t.data_ptr() for t in saved}
    assert d.data_ptr() not in pointers and x.data_ptr() not in pointers
    assert {z.data_ptr(), bits.data_ptr()} <= pointers
    y.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_behind_dropout_and_its_lowering(dtype: torch.dtype) -> None:
    z, params, grad = linear_case(dtype, True, True, True, False, shape=(3, 4, 6), out=5)
    x = z * params["gamma"] + params["beta"]
    bits = dropout_draw(x, 0.25, "torch")
    d = dropout_apply(x, bits, 0.25, "torch")
    args = [t.requires_grad_() for t in (d, z, *params.values())]
    torch.library.opcheck(shared_linear, (*args, "torch", bits, 0.25))
    op_args = (grad, z.detach(), params["gamma"].detach(), params["beta"].detach(), bits, 0.25, "torch")
    torch.library.opcheck(dropout_input_weight_grad, op_args)
    expected = grad.reshape(-1, 5).t().matmul(d.detach().reshape(-1, 6))
    torch.testing.assert_close(dropout_input_weight_grad(*op_args), expected)
    torch.testing.assert_close(_lower_dropout_input_weight_grad(*op_args), expected)
    with pytest.raises(ValueError, match="0 < p < 1"):
        shared_linear(d, z, None, None, params["weight"], None, "torch", bits, 0.0)


def test_shared_linear_bad_arguments() -> None:
    z = torch.randn(3, 4)
    w = torch.randn(5, 4)
    with pytest.raises(ValueError, match="one shape"):
        shared_linear(z, z[:2], None, None, w, None, "torch")
    with pytest.raises(ValueError, match="gamma must have shape"):
        shared_linear(z, z, torch.ones(3), None, w, None, "torch")
    with pytest.raises(ValueError, match="does not match"):
        shared_linear(z, z, None, None, w.t(), None, "torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        shared_linear(z, z, None, None, w, None, "cpu")
