"""``fxshear::returned_linear``: F.linear whose backward skips its matmuls for an all-zero gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxshear.kernels.returned_linear import returned_linear, returned_linear_backward

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(shape: tuple[int, ...], out_features: int, dtype: torch.dtype, bias: bool, seed: int = 0):  # noqa: ANN201
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(out_features, shape[-1], generator=generator).to(dtype).requires_grad_()
    b = torch.randn(out_features, generator=generator).to(dtype).requires_grad_() if bias else None
    return x, weight, b


def leaves(*tensors):  # noqa: ANN002, ANN201
    return [t for t in tensors if t is not None]


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), h=st.integers(1, 9), v=st.integers(1, 11),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_f_linear(lead, h, v, dtype, bias, seed) -> None:  # noqa: ANN001
    x, weight, b = make((*lead, h), v, dtype, bias, seed)
    grad = torch.randn(*lead, v, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    expected_y = F.linear(x, weight, b)
    expected = torch.autograd.grad(expected_y, leaves(x, weight, b), grad)
    y = returned_linear(x, weight, b)
    assert torch.equal(y, expected_y)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, e in zip(torch.autograd.grad(y, leaves(x, weight, b), grad), expected):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("bias", [True, False])
def test_zero_gradient_gives_zeros_without_matmuls(bias: bool, monkeypatch) -> None:  # noqa: ANN001
    x, weight, b = make((3, 4, 5), 7, torch.float32, bias)
    y = returned_linear(x, weight, b)
    calls = []
    real_matmul = torch.Tensor.matmul
    monkeypatch.setattr(torch.Tensor, "matmul", lambda *a, **k: calls.append(1) or real_matmul(*a, **k))
    result = torch.autograd.grad(y, leaves(x, weight, b), torch.zeros_like(y))
    assert calls == []
    for g, t in zip(result, leaves(x, weight, b)):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype: torch.dtype) -> None:
    x, weight, b = make((2, 3, 4), 5, dtype, True, seed=3)
    torch.library.opcheck(returned_linear, (x, weight, b))
    torch.library.opcheck(returned_linear, (x, weight.detach(), None))
    grad = torch.randn(2, 3, 5).to(dtype)
    torch.library.opcheck(returned_linear_backward, (grad, x.detach(), weight.detach(), True, True, True))
    torch.library.opcheck(returned_linear_backward, (torch.zeros_like(grad), x.detach(), weight.detach(),
                                                     False, True, False))


def test_saves_only_the_input_and_weight() -> None:
    x, weight, b = make((4, 6), 9, torch.float32, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        returned_linear(x, weight, b)
    assert sorted(tuple(t.shape) for t in saved) == [(4, 6), (9, 6)]
