"""The Triton pruning kernels against the torch reference, on CPU under TRITON_INTERPRET=1
(and on CUDA when there is one)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from helpers import DEVICE, DTYPES  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxshear.kernels.prune import (  # noqa: E402
    prune_pack,
    prune_pack_reference,
    pruned_linear,
    pruned_weight_grad,
    pruned_weight_grad_reference,
    unprune_reference,
)
from fxshear.kernels.prune_triton import (  # noqa: E402
    kept_before_each_byte,
    prune_pack_triton,
    pruned_weight_grad_triton,
    unprune_triton,
)

# max |triton - reference| / max |reference| of the weight gradient: sums in another order
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype).to(DEVICE)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(expected.abs().max().item(), 1e-30)
    assert (actual.double() - expected.double()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keep_ratio", [1.0, 0.5, 0.1])
def test_pack_equals_the_reference(dtype: torch.dtype, keep_ratio: float) -> None:
    x = randn(3, 5, 70, dtype=dtype, seed=1)  # 350 elements per sample: a partial last byte
    x[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 2.0], dtype=dtype)
    x[1, 1, :] = 1.0  # a run of ties at the threshold
    expected = prune_pack_reference(x, keep_ratio)
    actual = prune_pack_triton(x, keep_ratio, block_bytes=16)
    assert torch.equal(actual[1], expected[1])
    assert torch.equal(actual[0].isnan(), expected[0].isnan())
    assert torch.equal(actual[0].nan_to_num(), expected[0].nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_grad_equals_the_reference(dtype: torch.dtype) -> None:
    x = randn(4, 6, 40, dtype=dtype, seed=2)
    grad = randn(4, 6, 24, dtype=dtype, seed=3)
    values, bits = prune_pack_reference(x, 0.2)
    expected = pruned_weight_grad_reference(grad, values, bits, 40)
    actual = pruned_weight_grad_triton(grad, values, bits, 40, block_o=16, block_i=16, block_r=16)
    assert_rel_close(actual, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keep_ratio", [1.0, 0.3, 0.01])
def test_unprune_equals_the_reference(dtype: torch.dtype, keep_ratio: float) -> None:
    x = randn(3, 7, 53, dtype=dtype, seed=4)  # 371 elements per sample: a partial last byte
    values, bits = prune_pack_reference(x, keep_ratio)
    expected = unprune_reference(values, bits, 371)
    assert torch.equal(unprune_triton(values, bits, 371, block_bytes=16), expected)
    if keep_ratio == 1.0:
        assert torch.equal(expected, x.reshape(3, -1))


def test_running_counts() -> None:
    bits = torch.tensor([[0b1011, 0, 0xFF, 1], [1, 1, 1, 1]], dtype=torch.uint8)
    assert kept_before_each_byte(bits).tolist() == [[0, 3, 3, 11], [0, 1, 2, 3]]


@settings(max_examples=12, deadline=None)
@given(samples=st.integers(1, 3), rows_per_sample=st.integers(1, 9), in_features=st.integers(1, 37),
       out_features=st.integers(1, 20), keep_ratio=st.sampled_from([0.5, 0.2, 0.05]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_random_shapes(samples: int, rows_per_sample: int, in_features: int, out_features: int,
                       keep_ratio: float, dtype: torch.dtype, seed: int) -> None:
    x = randn(samples, rows_per_sample, in_features, dtype=dtype, seed=seed)
    grad = randn(samples, rows_per_sample, out_features, dtype=dtype, seed=seed + 1)
    expected = prune_pack_reference(x, keep_ratio)
    values, bits = prune_pack_triton(x, keep_ratio, block_bytes=16)
    assert torch.equal(bits, expected[1]) and torch.equal(values, expected[0])
    assert_rel_close(pruned_weight_grad_triton(grad, values, bits, in_features, block_o=16, block_i=16, block_r=16),
                     pruned_weight_grad_reference(grad, values, bits, in_features), TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the ops take the Triton path on CUDA only")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_take_the_triton_path_on_cuda(dtype: torch.dtype) -> None:
    x = torch.randn(8, 128, 384, dtype=dtype, device="cuda", requires_grad=True)
    weight = torch.randn(96, 384, dtype=dtype, device="cuda", requires_grad=True)
    for a, e in zip(prune_pack(x, 0.1, "triton"), prune_pack(x, 0.1, "torch")):
        assert torch.equal(a, e)
    values, bits = prune_pack(x.detach(), 0.1, "triton")
    grad = torch.randn(8, 128, 96, dtype=dtype, device="cuda")
    assert_rel_close(pruned_weight_grad(grad, values, bits, 384, "triton"),
                     pruned_weight_grad(grad, values, bits, 384, "torch"), TOL[dtype])
    torch.library.opcheck(prune_pack, (x, 0.1, "triton"))
    torch.library.opcheck(pruned_linear, (x, values, bits, weight, None, "triton"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the ops take the Triton path on CUDA only")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_ops_take_the_triton_path_on_cuda(dtype: torch.dtype) -> None:
    from fxshear.kernels.prune_attention import grad_times_pruned_t, pruned_softmax, pruned_t_times_grad

    scores = torch.randn(4, 12, 128, 128, dtype=dtype, device="cuda", requires_grad=True)
    for a, e in zip(pruned_softmax(scores, -1, 0.1, "triton"), pruned_softmax(scores, -1, 0.1, "torch")):
        assert torch.equal(a, e)
    values, bits = prune_pack(scores.detach(), 0.1, "torch")
    grad = torch.randn(4, 12, 128, 128, dtype=dtype, device="cuda")
    for op in (grad_times_pruned_t, pruned_t_times_grad):  # a square operand: k = 128 either way
        assert_rel_close(op(grad, values, bits, 128, "triton"), op(grad, values, bits, 128, "torch"), TOL[dtype])
    torch.library.opcheck(pruned_softmax, (scores, -1, 0.1, "triton"))
