"""Dtype sets and scalar rounding every op family uses the same way."""

from __future__ import annotations

import struct

import torch

#: The floating dtypes fxshear's ops and Triton kernels take.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32, as torch uses a Python scalar against fp32 tensors
    (and as CUDA's ``masked_scale`` receives its scale).  Pure Python: safe inside traced code,
    where a ``torch.tensor`` call would become a graph constant."""
    return struct.unpack("f", struct.pack("f", float(value)))[0]
