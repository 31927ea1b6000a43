"""1-bit flags packed 8 to a byte: the layout every fxshear op that keeps a mask shares.

Element ``i`` of a tensor in row-major (logical) order is bit ``i % 8`` of byte ``i // 8``
(little-endian); the pad bits of the last byte are 0.  Packing is traceable aten math, so the
CPU lowerings inline it and Inductor fuses it; unpacking on CPU is the opaque op
``fxshear::unpack_flags`` (see :func:`unpack_bits`); the Triton kernels write and read the same
layout.
"""

from __future__ import annotations

import numpy as np
import torch

BITS_PER_BYTE = 8


def packed_numel(numel: int) -> int:
    """Bytes needed for ``numel`` flags."""
    return (numel + BITS_PER_BYTE - 1) // BITS_PER_BYTE


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool (or 0/1) tensor of any shape as ``uint8[packed_numel(numel)]``."""
    flat = flags.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % BITS_PER_BYTE
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    lanes = flat.view(-1, BITS_PER_BYTE)
    packed = lanes[:, 0]
    for lane in range(1, BITS_PER_BYTE):
        packed = packed | (lanes[:, lane] << lane)
    return packed


def pack_bits_now(flags: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` for code that runs eagerly (the body of a custom op), not traced.

    Why: eager aten packing is 15 small passes over the flags (~0.5 ns per flag on a CPU core);
    on CPU ``numpy.packbits`` writes the same little-endian layout in one (~0.05 ns per flag).
    Other devices, and tensor subclasses (fake or functional tensors), use :func:`pack_bits`.
    """
    if type(flags) is not torch.Tensor or flags.device.type != "cpu" or flags.requires_grad:
        return pack_bits(flags)
    flat = flags.detach().numpy().reshape(-1).astype(np.bool_, copy=False)
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` flags of ``packed`` as a flat bool tensor.

    On CPU this is the opaque op ``fxshear::unpack_flags`` (so also inside a lowered graph):
    Inductor's C++ backend cannot vectorize the per-element ``byte[i // 8] >> (i % 8)`` gather,
    and a kernel that reads it falls back to scalar code as a whole (measured on the attention
    backward: ~2x slower).  A separate unpack (``numpy.unpackbits``, ~0.1 ns per flag) gives the
    consumer a dense bool tensor it vectorizes; the bool tensor is transient, never saved.
    """
    if packed.device.type == "cpu":
        return torch.ops.fxshear.unpack_flags(packed, numel)
    return unpack_bits_math(packed, numel)


def unpack_bits_math(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """:func:`unpack_bits` as traceable aten math (any device)."""
    shifts = torch.arange(BITS_PER_BYTE, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].to(torch.bool)


@torch.library.custom_op("fxshear::unpack_flags", mutates_args=())
def unpack_flags(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` flags of ``packed`` (the layout above) as a bool tensor ``[numel]``."""
    if numel > packed.numel() * BITS_PER_BYTE:
        raise ValueError(f"{packed.numel()} bytes hold {packed.numel() * BITS_PER_BYTE} flags, not {numel}")
    if packed.device.type != "cpu":
        return unpack_bits_math(packed, numel)
    flags = np.unpackbits(packed.detach().contiguous().numpy().reshape(-1), count=numel, bitorder="little")
    return torch.from_numpy(flags.view(np.bool_))


@unpack_flags.register_fake
def _unpack_flags_fake(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return packed.new_empty((numel,), dtype=torch.bool)
