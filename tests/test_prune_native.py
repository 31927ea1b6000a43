"""The native CPU prune kernels (prune_cpu.c) against the torch reference, bit for bit, and how
they are built, cached, turned off and kept out of the CPU lowering."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from fxshear.kernels import prune_native
from fxshear.kernels.infra import native
from fxshear.kernels.infra.lowering import LowerOpsOnCpu
from fxshear.kernels.prune import (
    keep_count,
    prune_pack,
    prune_pack_reference,
    pruned_weight_grad,
    pruned_weight_grad_reference,
    samples_and_size,
    unprune_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

pytestmark = pytest.mark.skipif(native.load("prune_cpu") is None, reason="no C compiler for the native kernels")


def assert_same_pack(x: torch.Tensor, keep_ratio: float) -> None:
    expected_values, expected_bits = prune_pack_reference(x, keep_ratio)
    samples, n = samples_and_size(x)
    values, bits = prune_native.prune_pack(x.reshape(samples, n), keep_count(n, keep_ratio))
    assert torch.equal(bits, expected_bits)
    # compare bit patterns: NaN payloads and the sign of zero must survive too
    assert torch.equal(values.view(INT_VIEW[x.dtype]), expected_values.view(INT_VIEW[x.dtype]))
    dense = prune_native.unprune(values, bits, n)
    assert torch.equal(dense.view(INT_VIEW[x.dtype]), unprune_reference(values, bits, n).view(INT_VIEW[x.dtype]))


@st.composite
def activations(draw):  # noqa: ANN001, ANN201
    """Tensors with ties, signed zeros, infinities, NaNs and subnormals mixed into random values."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39])
    pick = torch.randint(0, special.numel(), shape, generator=generator)
    use = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.3, 0.9]))
    return torch.where(use, special[pick], x).to(dtype)


@settings(max_examples=150, deadline=None)
@given(x=activations(), keep_ratio=st.sampled_from([1e-6, 0.05, 0.1, 0.3, 0.5, 0.99, 1.0]))
def test_native_pack_and_unprune_equal_the_reference(x: torch.Tensor, keep_ratio: float) -> None:
    assert_same_pack(x, keep_ratio)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 128, 96), (3, 1000), (1, 4096), (2, 8), (5, 7, 3)])
def test_native_pack_equals_the_reference_on_activation_sized_rows(dtype: torch.dtype, shape: tuple) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for keep_ratio in (0.05, 0.1, 0.2, 0.5):
        assert_same_pack(x, keep_ratio)


def test_all_ties_are_kept_in_index_order() -> None:
    x = torch.ones(4, 37)
    x[1, 5] = -1.0  # same magnitude
    x[2] = torch.arange(37.0) % 3  # many ties at the threshold
    x[3, ::2] = float("nan")  # NaN ties with +inf at the top
    x[3, 1] = float("inf")
    assert_same_pack(x, 0.3)


def test_one_dimensional_input_is_one_sample() -> None:
    x = torch.randn(1001)
    values, bits = prune_pack(x, 0.1, "auto")
    expected = prune_pack_reference(x, 0.1)
    assert torch.equal(values, expected[0]) and torch.equal(bits, expected[1])


def test_results_do_not_depend_on_the_thread_count() -> None:
    x = torch.randn(7, 3001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prune_native.prune_pack(x, 300)
        torch.set_num_threads(max(2, threads))
        many = prune_native.prune_pack(x, 300)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_take_the_native_path_for_auto_and_match_torch(dtype: torch.dtype) -> None:
    assert prune_native.usable(torch.device("cpu"), dtype, "auto")
    assert not prune_native.usable(torch.device("cpu"), dtype, "torch")
    assert not prune_native.usable(torch.device("cpu"), torch.float64, "auto")
    x = torch.randn(6, 10, 48).to(dtype)
    auto = prune_pack(x, 0.1, "auto")
    reference = prune_pack(x, 0.1, "torch")
    assert all(torch.equal(a, b) for a, b in zip(auto, reference))
    grad = torch.randn(6, 10, 20).to(dtype)
    torch.testing.assert_close(pruned_weight_grad(grad, *auto, 48, "auto"),
                               pruned_weight_grad_reference(grad, *reference, 48))


@pytest.mark.parametrize("impl, lowered", [("auto", False), ("torch", True)])
def test_cpu_lowering_leaves_native_calls_opaque(impl: str, lowered: bool) -> None:
    x = torch.randn(4, 8, 16)
    gm = make_fx(lambda t: prune_pack(t, 0.25, impl), tracing_mode="fake")(x)
    LowerOpsOnCpu()(gm.graph)
    gm.recompile()
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert (torch.ops.fxshear.prune_pack.default not in ops) == lowered
    assert all(torch.equal(a, b) for a, b in zip(gm(x), prune_pack_reference(x, 0.25)))


def test_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FXSHEAR_NATIVE", "0")
    native.load.cache_clear()
    try:
        assert native.load("prune_cpu") is None
        assert not prune_native.usable(torch.device("cpu"), torch.float32, "auto")
        x = torch.randn(3, 50)
        assert all(torch.equal(a, b) for a, b in zip(prune_pack(x, 0.1, "auto"), prune_pack_reference(x, 0.1)))
    finally:
        monkeypatch.delenv("FXSHEAR_NATIVE")
        native.load.cache_clear()
    assert native.load("prune_cpu") is not None


def test_a_broken_compiler_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path,  # noqa: ANN001
                                                     caplog: pytest.LogCaptureFixture) -> None:
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("FXSHEAR_CACHE_DIR", str(tmp_path / "cache"))
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="fxshear"):
            assert native.load("prune_cpu") is None
        assert "could not build native CPU kernels prune_cpu" in caplog.text
        assert "internal error" in caplog.text
    finally:
        native.load.cache_clear()


def test_build_is_cached_by_source_and_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("FXSHEAR_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    try:
        assert native.load("prune_cpu") is not None
        built = sorted((tmp_path / "native").glob("prune_cpu-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.load.cache_clear()
        assert native.load("prune_cpu") is not None  # loaded from the cache, not rebuilt
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        native.load.cache_clear()


@pytest.mark.parametrize("period", [7, 11, 13, 16, 17, 19, 23, 32])
def test_a_misleading_sample_falls_back_to_the_full_histogram(period: int) -> None:
    """Large samples first guess the threshold from ~4096 evenly spaced entries; entries that are
    large exactly at a fixed period can fool that guess, and the pack must still be exact."""
    x = torch.randn(3, 65536, generator=torch.Generator().manual_seed(period)) * 1e-3
    x[:, ::period] = 50.0 + torch.rand(3, len(range(0, 65536, period)))
    x[1, 1::period] = -60.0  # a second comb in another sample
    for keep_ratio in (0.01, 0.1, 0.3):
        assert_same_pack(x, keep_ratio)


def test_large_samples_with_heavy_ties_are_exact() -> None:
    x = torch.randint(-3, 4, (4, 50000), generator=torch.Generator().manual_seed(3)).float()
    x[2] = 1.0
    for keep_ratio in (0.05, 0.1, 0.5):
        assert_same_pack(x, keep_ratio)
