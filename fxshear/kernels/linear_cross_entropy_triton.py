"""Triton kernel for the per-chunk step of ``fxshear::linear_cross_entropy``.

One program per row of the chunk's logits buffer ``[C, V]``.  The first pass walks the vocab
in ``BLOCK_V`` blocks with an online logsumexp (running max and rescaled sum of exponentials,
plus the running (class-weighted) sum of logits when label smoothing needs it); the second
pass overwrites the row, in place, with ``dloss/dlogits = (softmax - (1-ε)·onehot - ε/V) ·
scale``, or its class-weighted form (see the reference).  ``scale`` is one value or one per row.  The row's loss
goes to a separate fp32 vector.  The math is fp32 whatever the buffer's dtype; results are
rounded to the buffer's dtype to nearest even (also under the interpreter).  The matmuls
around it are torch's.

It must agree with :func:`fxshear.kernels.linear_cross_entropy.cross_entropy_chunk_reference`
up to float rounding; that is what the tests check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxshear.kernels.infra.triton_helpers import SUPPORTED_DTYPES, cast_fp32_to

# Liger takes a whole 32k block per loop step over 32 warps (32 values a thread); compiled for
# sm_90 that spilled in fp32 with smoothing, class weights and per-row scales, so 16k blocks
# (16 values a thread), which spill nowhere (benchmarks/results/gpu/aot_compile.md).
MAX_BLOCK_V = 16384


@triton.jit
def _cross_entropy_chunk_kernel(
    logits_ptr,
    logits_row_stride,
    target_ptr,
    row_loss_ptr,
    scale_ptr,
    class_weight_ptr,
    n_cols,
    ignore_index,
    label_smoothing,
    HAS_SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    PER_ROW_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    out_dtype = logits_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row)

    if target == ignore_index:
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                offsets = start + cols
                tl.store(row_ptr + offsets, tl.zeros([BLOCK_V], dtype=out_dtype), mask=offsets < n_cols)
        tl.store(row_loss_ptr + row, 0.0)
        return

    # Pass 1: online logsumexp (and the (weighted) sum of logits for the smoothing term, and
    # the sum of the class weights).
    running_max = float("-inf")
    running_sum = 0.0
    logit_sum = 0.0
    weight_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offsets = start + cols
        mask = offsets < n_cols
        x = tl.load(row_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
        if HAS_SMOOTHING:
            if HAS_CLASS_WEIGHT:
                w = tl.load(class_weight_ptr + offsets, mask=mask, other=0.0)
                logit_sum += tl.sum(tl.where(mask, x * w, 0.0), axis=0)
                weight_sum += tl.sum(w, axis=0)
            else:
                logit_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = running_max + tl.log(running_sum)

    # Read before pass 2 overwrites it.
    target_logit = tl.load(row_ptr + target).to(tl.float32)
    loss = lse - target_logit
    target_weight = 1.0
    if HAS_CLASS_WEIGHT:
        target_weight = tl.load(class_weight_ptr + target)
        loss = target_weight * loss
    if HAS_SMOOTHING:
        if HAS_CLASS_WEIGHT:
            smooth = (weight_sum * lse - logit_sum) / n_cols
        else:
            smooth = lse - logit_sum / n_cols
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    tl.store(row_loss_ptr + row, loss)

    # Pass 2: the gradient, in place.
    if WRITE_GRAD:
        if PER_ROW_SCALE:
            scale = tl.load(scale_ptr + row).to(tl.float32)
        else:
            scale = tl.load(scale_ptr).to(tl.float32)
        softmax_weight = 1.0
        if HAS_CLASS_WEIGHT:
            softmax_weight = (1.0 - label_smoothing) * target_weight
            if HAS_SMOOTHING:
                softmax_weight += label_smoothing * weight_sum / n_cols
        # exp(x - max) / sum rather than exp(x - lse): lse rounds at the logits' magnitude,
        # which for large logits costs more precision than the division (torch's softmax order)
        inv_sum = softmax_weight / running_sum
        for start in range(0, n_cols, BLOCK_V):
            offsets = start + cols
            mask = offsets < n_cols
            x = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - running_max) * inv_sum
            if HAS_SMOOTHING:
                if HAS_CLASS_WEIGHT:
                    w = tl.load(class_weight_ptr + offsets, mask=mask, other=0.0)
                    grad = grad - (label_smoothing / n_cols) * w
                else:
                    grad = grad - label_smoothing / n_cols
            grad = tl.where(offsets == target, grad - (1.0 - label_smoothing) * target_weight, grad)
            tl.store(row_ptr + offsets, cast_fp32_to(grad * scale, out_dtype), mask=mask)


def _num_warps(block_v: int) -> int:
    # 512 elements a warp: at MAX_BLOCK_V (32 warps) no variant spills on sm_80 or sm_90, where
    # 32768 elements on 32 warps spilled in fp32 with smoothing and class weights (aot_compile.md).
    return min(32, max(4, block_v // 512))


def cross_entropy_chunk_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    row_loss: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_grad: bool = True,
    class_weight: torch.Tensor | None = None,
    block_v: int | None = None,
) -> None:
    """Same contract as :func:`~fxshear.kernels.linear_cross_entropy.cross_entropy_chunk_reference`.

    ``logits`` [C, V] (fp32/fp16/bf16, unit column stride) becomes ``dloss/dlogits`` when
    ``compute_grad``; ``row_loss`` fp32 [C] gets the unscaled per-row losses; ``scale`` is an
    fp32 tensor of one element or of one per row (read on the device: no host sync);
    ``class_weight`` an optional fp32 [V].  ``block_v`` overrides the vocab block (a power of
    two; tests use small ones to exercise the loop).
    """
    if logits.dim() != 2 or logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits must be a 2-D {SUPPORTED_DTYPES} tensor, got {logits.dtype} {tuple(logits.shape)}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous (column stride 1)")
    n_rows, n_cols = logits.shape
    if target.dtype != torch.int64 or tuple(target.shape) != (n_rows,):
        raise ValueError(f"target must be int64 [{n_rows}], got {target.dtype} {tuple(target.shape)}")
    if row_loss.dtype != torch.float32 or tuple(row_loss.shape) != (n_rows,):
        raise ValueError(f"row_loss must be float32 [{n_rows}], got {row_loss.dtype} {tuple(row_loss.shape)}")
    per_row_scale = scale.dim() == 1 and scale.shape[0] == n_rows and n_rows != 1
    if scale.dtype != torch.float32 or not (scale.numel() == 1 or per_row_scale):
        raise ValueError(f"scale must be a float32 tensor of one element or [{n_rows}], "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if class_weight is not None and (class_weight.dtype != torch.float32
                                     or tuple(class_weight.shape) != (n_cols,)):
        raise ValueError(f"class_weight must be float32 [{n_cols}], "
                         f"got {class_weight.dtype} {tuple(class_weight.shape)}")
    for name, t in (("target", target), ("row_loss", row_loss), ("scale", scale), ("class_weight", class_weight)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
    if n_rows == 0:
        return
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(n_cols, 1)))
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")

    target = target.contiguous()
    scale = scale.contiguous()
    class_weight = class_weight.contiguous() if class_weight is not None else None
    loss_out = row_loss if row_loss.is_contiguous() else torch.empty_like(row_loss, memory_format=torch.contiguous_format)
    _cross_entropy_chunk_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        target,
        loss_out,
        scale,
        class_weight if class_weight is not None else scale,  # never read without HAS_CLASS_WEIGHT
        n_cols,
        ignore_index,
        float(label_smoothing),
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_CLASS_WEIGHT=class_weight is not None,
        PER_ROW_SCALE=per_row_scale,
        WRITE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    if loss_out is not row_loss:
        row_loss.copy_(loss_out)
