"""The C Philox kernel behind fast dropout draws on CPU (``fxshear/kernels/rng_cpu.c``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxshear.kernels import rng_native
from fxshear.kernels.attention import attention_dropout_draw
from fxshear.kernels.infra.bits import unpack_bits
from fxshear.kernels.dropout_bits import dropout_draw

pytestmark = pytest.mark.skipif(not rng_native.usable("cpu"), reason="no C compiler for the native kernels")

# Random123's known-answer vectors for Philox4x32-10: (counter words, key words, output words).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_reference_is_philox4x32_10(counter: tuple, key: tuple, expected: tuple) -> None:
    words = rng_native.philox_reference(key[0] | key[1] << 32, np.array([counter], dtype=np.uint64))
    assert tuple(int(w) for w in words[0]) == expected


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(0, 5000), keep=st.sampled_from([0.0, 1e-9, 0.1, 0.5, 0.9, 1 - 1e-9, 1.0]),
       seed=st.integers(0, 2**64 - 1))
def test_kernel_equals_the_reference(numel: int, keep: float, seed: int) -> None:
    assert torch.equal(rng_native.bernoulli_bits(numel, keep, seed), rng_native.bernoulli_bits_reference(numel, keep, seed))


def test_large_draw_equals_the_reference_and_keeps_its_probability() -> None:
    numel = 3 * 2**20 + 13  # many chunks per thread, a partial last chunk and byte
    bits = rng_native.bernoulli_bits(numel, 0.9, seed=7)
    assert torch.equal(bits, rng_native.bernoulli_bits_reference(numel, 0.9, seed=7))
    assert abs(unpack_bits(bits, numel).float().mean().item() - 0.9) < 1e-3
    assert bits[-1].item() >> 5 == 0  # pad bits of the last byte (13 % 8 = 5 used)


def test_bits_do_not_depend_on_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        draws = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            draws.append(rng_native.bernoulli_bits(100_003, 0.7, seed=11))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(draws[0], d) for d in draws[1:])


def test_draws_follow_torch_manual_seed_and_differ_between_calls() -> None:
    x = torch.empty(64, 96)
    torch.manual_seed(5)
    first, second = dropout_draw(x, 0.3, "auto", "fast"), dropout_draw(x, 0.3, "auto", "fast")
    torch.manual_seed(5)
    assert torch.equal(dropout_draw(x, 0.3, "auto", "fast"), first)
    assert not torch.equal(first, second)


def test_neighbouring_flags_are_uncorrelated() -> None:
    """Four flags share a Philox call: their pairwise agreement must be that of independent draws."""
    numel, keep = 4 * 250_000, 0.5
    flags = unpack_bits(rng_native.bernoulli_bits(numel, keep, seed=3), numel).view(-1, 4).float()
    expected = keep * keep + (1 - keep) * (1 - keep)
    for a in range(4):
        for b in range(a + 1, 4):
            agreement = (flags[:, a] == flags[:, b]).float().mean().item()
            assert abs(agreement - expected) < 5e-3, (a, b, agreement)


@pytest.mark.parametrize("p", [0.0, 0.1, 1.0])
def test_ops_draw_with_the_kernel(p: float) -> None:
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    torch.manual_seed(1)
    bits = attention_dropout_draw(q, k, p, "auto", "fast") if p > 0 else dropout_draw(q, p, "auto", "fast")
    numel = 2 * 3 * 5 * 7 if p > 0 else q.numel()
    torch.manual_seed(1)
    expected = rng_native.bernoulli_bits(numel, 1 - p)
    assert torch.equal(bits, expected)
    torch.library.opcheck(dropout_draw, (q, p, "auto", "fast"), test_utils=("test_schema", "test_faketensor"))


def test_keep_threshold_is_checked() -> None:
    assert rng_native.keep_threshold(1.0) == 2**32 and rng_native.keep_threshold(0.0) == 0
    with pytest.raises(ValueError, match="keep probability"):
        rng_native.keep_threshold(1.5)
