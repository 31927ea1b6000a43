"""Fast dropout masks on CPU: ``rng_cpu.c`` through ctypes, and its numpy reference.

Why: the ``"fast"`` dropout RNG promises only a mask with keep probability ``1 - p``.  Inlined as
``torch.rand(...) < 1 - p`` Inductor's CPU code runs a whole Philox4x32-10 per element (~3.5 ns,
~140 ms of a MiniLM training step); the C kernel uses all four Philox words per call and writes the
packed bits directly (~0.8 ns per element, ~5x faster).  The stream is Philox4x32-10 keyed by a
seed drawn from torch's default CPU generator, so ``torch.manual_seed`` makes masks reproducible,
and any thread count gives the same bits.  Without a C compiler (or with ``FXSHEAR_NATIVE=0``) the
draws fall back to Inductor's random numbers: another stream, the same distribution.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from .infra import native
from .infra.bits import packed_numel

_LIBRARY = "rng_cpu"
_TWO_32 = 1 << 32
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10


def _library() -> ctypes.CDLL | None:
    return native.bind(_LIBRARY, {"fxshear_bernoulli_bits": (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int], ctypes.c_int)})


def usable(device: torch.device | str) -> bool:
    """Whether a fast dropout draw on ``device`` runs the C kernel (else Inductor's ``rand``)."""
    return torch.device(device).type == "cpu" and _library() is not None


def keep_threshold(keep_prob: float) -> int:
    """Flags whose 32-bit word is below this are kept: probability ``threshold / 2**32``."""
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep probability must lie in [0, 1], got {keep_prob}")
    return min(_TWO_32, round(keep_prob * _TWO_32))


def draw_seed() -> int:
    """63 random bits from torch's default CPU generator (so ``torch.manual_seed`` governs masks)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def bernoulli_bits(numel: int, keep_prob: float, seed: int | None = None) -> torch.Tensor:
    """``uint8[packed_numel(numel)]`` keep flags (bits.py's layout) with probability ``keep_prob``."""
    seed = draw_seed() if seed is None else seed
    out = torch.empty((packed_numel(numel),), dtype=torch.uint8)
    if numel:
        status = _library().fxshear_bernoulli_bits(out.data_ptr(), numel, seed, keep_threshold(keep_prob),
                                                   torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"fxshear native bernoulli_bits failed (status {status})")
    return out


def philox_reference(seed: int, counters: np.ndarray) -> np.ndarray:
    """Philox4x32-10 under the 64-bit key ``seed`` of the 128-bit counters given as ``uint32[n, 4]``
    words (low first): ``uint32[n, 4]``.  Plain numpy, for tests and as the kernel's specification."""
    mask = np.uint64(0xFFFFFFFF)
    x0, x1, x2, x3 = (counters[:, w].astype(np.uint64) for w in range(4))
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(PHILOX_ROUNDS):
        p0 = np.uint64(PHILOX_M[0]) * x0
        p1 = np.uint64(PHILOX_M[1]) * x2
        x0, x1, x2, x3 = ((p1 >> np.uint64(32)) ^ x1 ^ np.uint64(k0), p1 & mask,
                          (p0 >> np.uint64(32)) ^ x3 ^ np.uint64(k1), p0 & mask)
        k0, k1 = (k0 + PHILOX_W[0]) & 0xFFFFFFFF, (k1 + PHILOX_W[1]) & 0xFFFFFFFF
    return np.stack([x0, x1, x2, x3], axis=1).astype(np.uint32)


def bernoulli_bits_reference(numel: int, keep_prob: float, seed: int) -> torch.Tensor:
    """What :func:`bernoulli_bits` writes, from :func:`philox_reference` (flag i: word i % 4 of block i // 4)."""
    blocks = np.arange((numel + 3) // 4, dtype=np.uint64)
    counters = np.stack([blocks & np.uint64(0xFFFFFFFF), blocks >> np.uint64(32),
                         np.zeros_like(blocks), np.zeros_like(blocks)], axis=1)
    words = philox_reference(seed, counters).reshape(-1)[:numel]
    keep = words.astype(np.uint64) < np.uint64(keep_threshold(keep_prob))
    return torch.from_numpy(np.packbits(keep, bitorder="little"))
