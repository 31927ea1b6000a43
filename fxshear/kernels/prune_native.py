"""The CPU path of the prune ops: ``prune_cpu.c`` through ctypes, same results as the torch reference.

Why: the reference (topk, mask, two running counts, scatter, bit packing) costs several passes
over the activation and made a pruned MiniLM step ~1.25x slower than torch.compile on CPU; the
C kernel does one sample per thread in two passes over it (three when its sampled guess misses).  Used for ``impl="auto"`` on CPU tensors of
fp32, fp16 and bf16 when the kernel builds (:mod:`.native`); ``impl="torch"`` keeps the
reference, which the tests compare it against bit for bit.
"""

from __future__ import annotations

import ctypes

import torch

from .infra import native
from .infra.bits import packed_numel

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_LIBRARY = "prune_cpu"


def _library() -> ctypes.CDLL | None:
    return native.bind(_LIBRARY, {
        "fxshear_prune_pack": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
        "fxshear_unprune": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
    })


def usable(device: torch.device | str, dtype: torch.dtype, impl: str) -> bool:
    """Whether a prune op with ``impl`` on a tensor of this device and dtype runs the C kernel."""
    return (impl == "auto" and torch.device(device).type == "cpu" and dtype in _DTYPE_CODES
            and _library() is not None)


def usable_for(t: torch.Tensor, impl: str) -> bool:
    return usable(t.device, t.dtype, impl)


def prune_pack(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [samples, k], bits)`` of ``rows`` ``[samples, n]``, as ``prune_pack_reference``."""
    rows = rows.contiguous()
    samples, n = rows.shape
    values = rows.new_empty((samples, k))
    bits = torch.empty((samples, packed_numel(n)), dtype=torch.uint8, device=rows.device)
    if samples and n:
        status = _library().fxshear_prune_pack(rows.data_ptr(), samples, n, k, _DTYPE_CODES[rows.dtype],
                                               values.data_ptr(), bits.data_ptr(), torch.get_num_threads())
        if status != 0:
            reason = f"out of memory for {n} keys per thread" if status == -1 else f"unsupported {rows.dtype}"
            raise RuntimeError(f"fxshear native prune_pack failed (status {status}: {reason})")
    return values, bits


def unprune(values: torch.Tensor, bits: torch.Tensor, n: int) -> torch.Tensor:
    """Dense ``[samples, n]``: the kept values in place, zeros elsewhere (``unprune_reference``)."""
    values = values.contiguous()
    bits = bits.contiguous()
    samples, k = values.shape
    dense = values.new_empty((samples, n))
    if samples and n:
        status = _library().fxshear_unprune(values.data_ptr(), bits.data_ptr(), samples, n, k,
                                            values.element_size(), dense.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"fxshear native unprune failed (status {status}) for {values.dtype}")
    return dense
