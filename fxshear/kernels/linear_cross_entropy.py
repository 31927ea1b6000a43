"""``fxshear::linear_cross_entropy``: LM head + cross-entropy that never keeps the logits.

An LM head saves its ``[tokens, vocab]`` logits for backward (and the fp32 copy HF makes with
``logits.float()``, and the log-softmax): for a 128k vocabulary that is the largest activation
of the whole step.  This op (Liger-style) walks the tokens in chunks; for each chunk it builds
the logits, turns them into the loss terms and, in the same buffer, into ``dloss/dlogits``,
and immediately contracts those with the weight and the hidden states.  For a "mean" or "sum"
loss what it keeps for backward is the finished gradients w.r.t. ``hidden``, ``weight`` and
``bias``; the backward only scales them by the incoming (scalar) gradient of the loss.  For
``reduction="none"`` each token's loss has its own incoming gradient, so nothing can be
finished in the forward: it keeps ``hidden`` (which the head's weight gradient needs anyway)
and ``fxshear::linear_cross_entropy_backward`` rebuilds each chunk's logits (one more
vocabulary matmul) and weights its rows.  Either way no ``[N, V]`` tensor outlives a chunk.

Ops:
    linear_cross_entropy(hidden [N, H], weight [V, H], bias [V]?, target int64|int32 [N],
                         ignore_index, label_smoothing, reduction, chunk_size, logits_fp32,
                         need_hidden_grad, need_weight_grad, impl, logits [N, V]? = None,
                         class_weight [V]? = None)
        -> (loss 0-d ("mean", "sum") | [N] ("none"),
            grad_hidden [N, H] | [0], grad_weight [V, H] | [0], grad_bias [V] | [0])
           (the three gradients are always [0] for "none")
    linear_cross_entropy_backward(grad_rows [N], hidden, weight, bias?, target, class_weight?,
                                  ignore_index, label_smoothing, chunk_size, logits_fp32,
                                  need_hidden_grad, need_weight_grad, need_bias_grad, impl)
        -> (grad_hidden, grad_weight, grad_bias)       ("none" only)

    ``logits`` (optional, last): the ``[N, V]`` output of ``F.linear(hidden, weight, bias)`` when
    the caller computes it anyway (a model that returns its logits); each chunk is then copied
    from it instead of recomputed, which saves one ``[N, H] x [H, V]`` matmul.  It is read in the
    forward only and never saved, and gets no gradient from this op.

Semantics are those of ``F.cross_entropy(F.linear(hidden, weight, bias)[.float()], target,
weight=class_weight, ignore_index=, label_smoothing=, reduction=)``:

* ``logits_fp32``: the linear runs in ``hidden``'s dtype and its output is upcast (HF LLaMA:
  ``logits.float()``); the loss is fp32.  Without it the chunk buffer stays in ``hidden``'s
  dtype and so does the loss.  The softmax/loss math itself runs in fp32 either way (at least
  fp32: fp64 inputs stay fp64), which is never less exact than eager.
* ``label_smoothing`` ε: per row ``(1-ε)·(lse - x_t) + ε·(lse - mean_c x_c)``; "mean" divides
  both terms by the number of non-ignored targets (torch's definition).  All targets ignored:
  "mean" gives NaN and zero gradients, as eager does; "none" gives 0 for every ignored row.
* ``class_weight`` w [V]: per row ``(1-ε)·w_t·(lse - x_t) + (ε/V)·Σ_c w_c·(lse - x_c)``, and
  "mean" divides by the sum of ``w_t`` over the non-ignored targets (torch's definition).  It
  is a constant: it gets no gradient (torch has none for it either).
* Gradients are summed over chunks in fp32 (``grad_weight``, ``grad_bias``) and returned in
  the dtype of the tensor they belong to; ``grad_hidden`` rows are written chunk by chunk.
  A gradient that is not needed (``need_*`` False, or no bias) is an empty ``[0]`` tensor and
  its matmul is skipped.  The chunk size changes results only by float rounding.

``impl``: "auto" (Triton on CUDA when importable), "torch" or "triton"; Triton only replaces
the per-chunk softmax/loss/dlogits step, the matmuls are torch's in both paths.

No CPU lowering is registered (see :mod:`fxshear.kernels.infra.lowering`): traced by ``make_fx`` the
chunk loop would unroll into one copy of the graph per chunk, and the work is matmuls, which
Inductor calls as extern kernels anyway.  On CPU the op runs eagerly inside the graph.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .infra.dispatch import triton_switch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Default chunk: rows whose logits chunk buffer is at most this many bytes.
DEFAULT_CHUNK_BYTES = 64 * 2**20
# On CPU smaller chunks are faster (the [chunk, V] buffer and the GEMMs that read it stay closer
# to the caches): a whole LLaMA-style step (2048 tokens, 32k vocabulary, fused AdamW, 2-core Xeon)
# took 1.053 s at 64 MiB (512 rows), 1.025 s at 32 MiB and 1.027 s at 16 MiB (128 rows), medians
# of 8 interleaved steps; 16 MiB also keeps the transient buffer small.
CPU_CHUNK_BYTES = 16 * 2**20


_use_triton = triton_switch("linear_cross_entropy_triton")


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax/loss math and the gradient sums run in: at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def _loss_dtype(hidden_dtype: torch.dtype, logits_fp32: bool) -> torch.dtype:
    return _math_dtype(hidden_dtype) if logits_fp32 else hidden_dtype


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
           label_smoothing: float, reduction: str, chunk_size: int, class_weight: torch.Tensor | None = None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)} (flatten the token dimensions first)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows (vocabulary size 0)")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be one of {FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                         f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if target.dtype not in (torch.int64, torch.int32) or tuple(target.shape) != (hidden.shape[0],):
        raise ValueError(f"target must be int64 (or int32) [N] = [{hidden.shape[0]}], "
                         f"got {target.dtype} {tuple(target.shape)}")
    if class_weight is not None and (not class_weight.is_floating_point()
                                     or tuple(class_weight.shape) != (weight.shape[0],)):
        raise ValueError(f"class_weight must be a floating-point [V] = [{weight.shape[0]}] tensor, "
                         f"got {class_weight.dtype} {tuple(class_weight.shape)}")


def _check_logits(logits: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if logits is None:
        return
    expected = (hidden.shape[0], weight.shape[0])
    if tuple(logits.shape) != expected or logits.dtype != hidden.dtype:
        raise ValueError(f"logits must be the Linear's output, {hidden.dtype} {expected}, "
                         f"got {logits.dtype} {tuple(logits.shape)}")


def _check_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is a class index or ``ignore_index``; asynchronous (no host sync) on CUDA."""
    ok = ((target >= 0) & (target < vocab)) | (target == ignore_index)
    if target.device.type == "cuda":
        torch._assert_async(ok.all(), "fxshear::linear_cross_entropy: target out of range")
    elif not bool(ok.all()):
        bad = target[~ok][:5].tolist()
        raise ValueError(f"target values must be in [0, {vocab}) or ignore_index={ignore_index}, got {bad}")


def cross_entropy_chunk_reference(logits: torch.Tensor, target: torch.Tensor, row_loss: torch.Tensor,
                                  scale: torch.Tensor, ignore_index: int, label_smoothing: float,
                                  compute_grad: bool = True, class_weight: torch.Tensor | None = None) -> None:
    """The per-chunk step in torch; :func:`cross_entropy_chunk_triton` is its Triton twin.

    ``logits`` [C, V] (any float dtype) is overwritten with ``dloss/dlogits`` (zero rows for
    ignored targets) scaled by ``scale`` when ``compute_grad``, and with scratch values
    otherwise; ``row_loss`` [C] (fp32 or fp64) receives each row's unscaled loss (0 for ignored
    rows).  ``scale`` is 0-d, or [C] for one factor per row (the backward of ``reduction="none"``).

    With class weights ``w`` [V] (in ``row_loss``'s dtype; ``W = Σ w``) a row's loss is torch's
    ``(1-ε)·w_t·(lse - x_t) + (ε/V)·Σ_c w_c·(lse - x_c)`` and its gradient
    ``softmax·((1-ε)·w_t + ε·W/V) - (1-ε)·w_t·onehot - (ε/V)·w``; without them ``w = 1``.

    One exponential per element: the row maximum is subtracted and exponentiated in place, and
    both the log-sum-exp and the softmax come from that one buffer (``torch.logsumexp`` followed
    by a second ``exp`` for the softmax costs twice the passes over ``[C, V]`` on CPU).
    """
    vocab = logits.shape[1]
    x = logits.to(row_loss.dtype)  # the buffer itself when it already is the math dtype
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    picked = x.gather(1, safe_target).squeeze(1)
    target_weight = class_weight.gather(0, safe_target.squeeze(1)) if class_weight is not None else None
    if not label_smoothing:
        weighted_mean_x = None
    elif class_weight is None:
        weighted_mean_x = x.mean(dim=1)
    else:
        weighted_mean_x = torch.mv(x, class_weight) / vocab
    row_max = x.amax(dim=1, keepdim=True)
    # rows that are all -inf would give inf - inf; eager's logsumexp gives -inf there, so do we
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    exp_sum = x.sub_(row_max).exp_().sum(dim=1)
    lse = row_max.squeeze(1) + exp_sum.log()
    loss = lse - picked
    if target_weight is not None:
        loss = target_weight * loss
    mean_weight = class_weight.sum() / vocab if class_weight is not None and label_smoothing else None
    if weighted_mean_x is not None:
        smooth = lse - weighted_mean_x if mean_weight is None else mean_weight * lse - weighted_mean_x
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    row_loss.copy_(torch.where(valid, loss, 0.0))
    if not compute_grad:
        return
    hit_weight = -(1.0 - label_smoothing) * scale
    softmax_weight = scale
    if target_weight is not None:
        hit_weight = hit_weight * target_weight
        softmax_weight = -hit_weight
        if mean_weight is not None:
            softmax_weight = softmax_weight + label_smoothing * mean_weight * scale
    row_scale = torch.where(valid, softmax_weight / exp_sum, 0.0)
    x.mul_(row_scale.unsqueeze(1))  # softmax · coefficient; ignored rows become 0
    if label_smoothing:
        smoothing_term = torch.where(valid, (label_smoothing / vocab) * scale, 0.0)
        if class_weight is None:
            x.sub_(smoothing_term.unsqueeze(1))
        else:
            x.addr_(smoothing_term.expand(x.shape[0]), class_weight, alpha=-1)
    hit = torch.where(valid, hit_weight, 0.0).to(x.dtype).unsqueeze(1)
    x.scatter_add_(1, safe_target, hit.expand(x.shape[0], 1))
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)


@functools.cache
def _fp32_out_addmm_works(device: torch.device) -> bool:
    """Whether ``addmm(acc32, a16, b16, out_dtype=fp32, out=acc32)`` runs and is right here."""
    try:
        acc = torch.ones(4, 8, device=device)
        a = torch.arange(12, device=device, dtype=torch.float32).reshape(4, 3).div_(8)
        b = torch.arange(24, device=device, dtype=torch.float32).reshape(3, 8).div_(16)
        expected = acc + a @ b  # every value is exact in bf16, fp16 and fp32
        ok = True
        for dtype in (torch.bfloat16, torch.float16):
            out = acc.clone()
            torch.addmm(out, a.to(dtype), b.to(dtype), out_dtype=torch.float32, out=out)
            ok = ok and out.dtype == torch.float32 and torch.equal(out, expected)
        return ok
    except Exception:  # noqa: BLE001 - unsupported here: use the fallback
        return False


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32/fp64 and ``a``, ``b`` possibly 16-bit."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and a.dtype == b.dtype and acc.dtype == torch.float32 \
            and _fp32_out_addmm_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # fp32 out of a 16-bit GEMM
    elif acc.device.type == "cuda" and a.dtype == b.dtype:
        acc.add_(torch.mm(a, b))  # one 16-bit rounding per chunk; no [V, H] fp32 GEMM on GPU
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
             class_weight: torch.Tensor | None, ignore_index: int, label_smoothing: float, scale: torch.Tensor,
             chunk_size: int, logits_fp32: bool, need_hidden_grad: bool, need_weight_grad: bool,
             need_bias_grad: bool, impl: str, logits: torch.Tensor | None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk loop shared by the forward and the ``reduction="none"`` backward.

    ``scale`` (math dtype) is 0-d or one factor per row [N]; the gradients it produces are
    ``scale``-weighted sums of the rows' loss gradients.  Returns the unscaled row losses (math
    dtype) and the three gradients (``[0]`` when not needed).
    """
    triton_step = _use_triton(hidden, impl)
    if triton_step and hidden.dtype == torch.float64:
        if impl == "triton":
            raise ValueError("the Triton path of fxshear::linear_cross_entropy does not take float64")
        triton_step = False
    n, h = hidden.shape
    vocab = weight.shape[0]
    math_dtype = _math_dtype(hidden.dtype)
    row_loss = torch.empty(n, dtype=math_dtype, device=hidden.device)
    grad_hidden = (torch.empty((n, h), dtype=hidden.dtype, device=hidden.device) if need_hidden_grad
                   else hidden.new_empty(0))
    weight_acc = torch.zeros((vocab, h), dtype=math_dtype, device=weight.device) if need_weight_grad else None
    bias_acc = (torch.zeros(vocab, dtype=math_dtype, device=weight.device) if need_bias_grad and bias is not None
                else None)
    compute_grad = need_hidden_grad or need_weight_grad or bias_acc is not None

    if triton_step:
        from .linear_cross_entropy_triton import cross_entropy_chunk_triton as step
    else:
        step = cross_entropy_chunk_reference
    target = target.to(torch.int64).contiguous()
    per_row = scale.dim() == 1
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h_chunk = hidden[start:end]
        if logits is not None:  # a private copy: the step overwrites its buffer
            buffer = logits[start:end].to(math_dtype if logits_fp32 else hidden.dtype, copy=True)
        else:
            buffer = F.linear(h_chunk, weight, bias)
            if logits_fp32:
                buffer = buffer.to(math_dtype)
        step(buffer, target[start:end], row_loss[start:end], scale[start:end] if per_row else scale,
             ignore_index, label_smoothing, compute_grad, class_weight)
        if not compute_grad:
            continue
        dlogits = buffer  # now dloss/dlogits, already scaled
        dlogits_low = dlogits.to(hidden.dtype)
        if need_hidden_grad:
            torch.mm(dlogits_low, weight, out=grad_hidden[start:end])
        if weight_acc is not None:
            a = dlogits_low if weight_acc.device.type == "cuda" else dlogits
            _accumulate_mm(weight_acc, a.t(), h_chunk)
        if bias_acc is not None:
            bias_acc.add_(dlogits.sum(dim=0, dtype=math_dtype))
        del buffer, dlogits, dlogits_low

    grad_weight = weight_acc.to(weight.dtype) if weight_acc is not None else weight.new_empty(0)
    grad_bias = bias_acc.to(bias.dtype) if bias_acc is not None else hidden.new_empty(0)
    return row_loss, grad_hidden, grad_weight, grad_bias


def _class_weight_in(class_weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if class_weight is None else class_weight.to(dtype).contiguous()


@torch.library.custom_op("fxshear::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    chunk_size: int,
    logits_fp32: bool,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    impl: str,
    logits: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of ``F.linear`` + ``F.cross_entropy`` and its gradients, chunk by chunk (module doc)."""
    _check(hidden, weight, bias, target, label_smoothing, reduction, chunk_size, class_weight)
    _check_logits(logits, hidden, weight)
    vocab = weight.shape[0]
    math_dtype = _math_dtype(hidden.dtype)
    _check_targets(target, vocab, ignore_index)
    class_weight = _class_weight_in(class_weight, math_dtype)
    loss_dtype = _loss_dtype(hidden.dtype, logits_fp32)

    if reduction == "none":  # the gradients need the incoming per-row factors: backward computes them
        row_loss, *_ = _chunked(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                torch.ones((), dtype=math_dtype, device=hidden.device), chunk_size, logits_fp32,
                                False, False, False, impl, logits)
        return row_loss.to(loss_dtype), hidden.new_empty(0), weight.new_empty(0), hidden.new_empty(0)

    valid = target != ignore_index
    if class_weight is None:
        count = valid.sum().to(math_dtype)
    else:  # torch normalizes a weighted mean by the weights of the counted targets
        count = torch.where(valid, class_weight.gather(0, torch.where(valid, target, 0).long()), 0.0).sum()
    scale = 1.0 / count if reduction == "mean" else torch.ones((), dtype=math_dtype, device=hidden.device)
    row_loss, grad_hidden, grad_weight, grad_bias = _chunked(
        hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, scale, chunk_size, logits_fp32,
        need_hidden_grad, need_weight_grad, True, impl, logits)
    total = row_loss.sum()
    loss = (total / count if reduction == "mean" else total).to(loss_dtype)
    return loss, grad_hidden, grad_weight, grad_bias


@linear_cross_entropy.register_fake
def _linear_cross_entropy_fake(hidden, weight, bias, target, ignore_index, label_smoothing, reduction,  # noqa: ANN001, ANN202
                               chunk_size, logits_fp32, need_hidden_grad, need_weight_grad, impl, logits=None,
                               class_weight=None):
    _check(hidden, weight, bias, target, label_smoothing, reduction, chunk_size, class_weight)
    _check_logits(logits, hidden, weight)
    loss_dtype = _loss_dtype(hidden.dtype, logits_fp32)
    if reduction == "none":
        return (hidden.new_empty((hidden.shape[0],), dtype=loss_dtype), hidden.new_empty(0), weight.new_empty(0),
                hidden.new_empty(0))
    loss = hidden.new_empty((), dtype=loss_dtype)
    grad_hidden = hidden.new_empty(tuple(hidden.shape)) if need_hidden_grad else hidden.new_empty(0)
    grad_weight = weight.new_empty(tuple(weight.shape)) if need_weight_grad else weight.new_empty(0)
    grad_bias = bias.new_empty(tuple(bias.shape)) if bias is not None else hidden.new_empty(0)
    return loss, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("fxshear::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    chunk_size: int,
    logits_fp32: bool,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``reduction="none"``: rebuilds each chunk's logits and weights its rows by ``grad_rows``.

    Per-token losses leave no scalar to fold into precomputed gradients, so the forward keeps
    ``hidden`` (which the head's weight gradient needs anyway) instead of the logits, and this
    op repeats the chunk's vocabulary matmul.
    """
    _check(hidden, weight, bias, target, label_smoothing, "none", chunk_size, class_weight)
    if tuple(grad_rows.shape) != (hidden.shape[0],):
        raise ValueError(f"grad_rows must be [{hidden.shape[0]}], got {tuple(grad_rows.shape)}")
    math_dtype = _math_dtype(hidden.dtype)
    _, grad_hidden, grad_weight, grad_bias = _chunked(
        hidden, weight, bias, target, _class_weight_in(class_weight, math_dtype), ignore_index, label_smoothing,
        grad_rows.to(math_dtype).contiguous(), chunk_size, logits_fp32, need_hidden_grad, need_weight_grad,
        need_bias_grad, impl, None)
    return grad_hidden, grad_weight, grad_bias


@linear_cross_entropy_backward.register_fake
def _linear_cross_entropy_backward_fake(grad_rows, hidden, weight, bias, target, class_weight, ignore_index,  # noqa: ANN001, ANN202
                                        label_smoothing, chunk_size, logits_fp32, need_hidden_grad, need_weight_grad,
                                        need_bias_grad, impl):
    _check(hidden, weight, bias, target, label_smoothing, "none", chunk_size, class_weight)
    grad_hidden = hidden.new_empty(tuple(hidden.shape)) if need_hidden_grad else hidden.new_empty(0)
    grad_weight = weight.new_empty(tuple(weight.shape)) if need_weight_grad else weight.new_empty(0)
    grad_bias = (bias.new_empty(tuple(bias.shape)) if need_bias_grad and bias is not None
                 else hidden.new_empty(0))
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    hidden, weight, bias, target = inputs[:4]
    ctx.reduction = inputs[6]
    ctx.computed = (inputs[9], inputs[10], bias is not None)  # need_hidden_grad, need_weight_grad, bias
    ctx.mark_non_differentiable(*output[1:])
    if ctx.reduction == "none":
        class_weight = inputs[13] if len(inputs) > 13 else None
        ctx.options = (inputs[4], inputs[5], inputs[7], inputs[8], inputs[11])  # ignore, ε, chunk, fp32, impl
        ctx.save_for_backward(hidden, weight, bias, target, class_weight)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, grad_h, grad_w, grad_b):  # noqa: ANN001, ANN202
    # no gradient for the given logits (the returned ones have their own path through the
    # Linear) nor for the targets or class weights (torch has none for them either)
    untouched = (None,) * 11
    if ctx.reduction == "none":
        hidden, weight, bias, target, class_weight = ctx.saved_tensors
        ignore_index, label_smoothing, chunk_size, logits_fp32, impl = ctx.options
        needed = ctx.needs_input_grad[:3]
        grads = torch.ops.fxshear.linear_cross_entropy_backward(
            grad_loss, hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, chunk_size,
            logits_fp32, needed[0], needed[1], needed[2] and bias is not None, impl)
        return (*[g if need else None for g, need in zip(grads, needed)], *untouched)
    saved = ctx.saved_tensors
    results = []
    for needed, computed, grad, name in zip(ctx.needs_input_grad[:3], ctx.computed, saved,
                                            ("hidden", "weight", "bias")):
        if not needed:
            results.append(None)
        elif not computed:
            raise RuntimeError(f"fxshear::linear_cross_entropy: {name} requires grad but was called with "
                               f"need_{name}_grad=False")
        else:
            results.append(grad * grad_loss.to(grad.dtype))
    return (*results, *untouched)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def default_chunk_size(vocab: int, logits_fp32: bool = True, dtype: torch.dtype = torch.bfloat16,
                       budget_bytes: int | None = None, device: torch.device | str | None = None) -> int:
    """Rows per chunk so that one chunk's logits buffer stays within ``budget_bytes``.

    ``budget_bytes`` defaults to :data:`CPU_CHUNK_BYTES` for a CPU ``device`` and to
    :data:`DEFAULT_CHUNK_BYTES` otherwise.  Depends only on the vocabulary (never on the token
    count, which may be dynamic under torch.compile); a multiple of 16 rows once there are at
    least 16, for tensor-core GEMMs.
    """
    if budget_bytes is None:
        on_cpu = device is not None and torch.device(device).type == "cpu"
        budget_bytes = CPU_CHUNK_BYTES if on_cpu else DEFAULT_CHUNK_BYTES
    element = _math_dtype(dtype).itemsize if logits_fp32 else dtype.itemsize
    rows = max(1, budget_bytes // (int(vocab) * element))
    return rows - rows % 16 if rows >= 16 else rows


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    logits_fp32: bool = True,
    impl: str = "auto",
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias)[.float()], target, ...)`` without the logits.

    ``hidden`` [..., H] and ``target`` [...] are flattened; with ``reduction="none"`` the
    per-token losses come back in ``target``'s shape.  ``class_weight`` is cross_entropy's
    ``weight``.  Which gradients are computed follows ``requires_grad`` (and grad mode).
    """
    if target is None:
        raise TypeError("fused_linear_cross_entropy() needs a target")
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    target_1d = target.reshape(-1)
    if target_1d.dtype not in (torch.int64, torch.int32):
        target_1d = target_1d.long()
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], logits_fp32, hidden.dtype, device=hidden.device)
    grad_on = torch.is_grad_enabled()
    loss, _, _, _ = linear_cross_entropy(
        hidden_2d, weight, bias, target_1d, ignore_index, float(label_smoothing), reduction, chunk_size,
        logits_fp32, grad_on and hidden.requires_grad, grad_on and weight.requires_grad, impl, None, class_weight,
    )
    return loss.reshape(target.shape) if reduction == "none" else loss
