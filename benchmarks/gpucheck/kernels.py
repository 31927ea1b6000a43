"""The ``kernels`` section: every fxshear Triton kernel against its torch reference, at MiniLM and
8B-LLaMA sizes, in bf16, fp32 and fp16.

A check is one op family at one size, dtype and variant.  It runs the Triton launcher (what the
op calls on CUDA, ``*_triton``) and the op with ``impl="torch"`` (or the ``*_reference``
function) on the same seeded inputs, as ``tests/test_triton_*.py`` do, and compares every output:
bit for bit where the torch reference is bit-exact, else within the tolerance those tests
document (table below).  A backward kernel gets the *reference* forward's saved tensors, so it is
judged on its own.  On CUDA a check also calls the op with ``impl="triton"`` and requires it to
equal the launcher bit for bit (``op=launcher``: the op really dispatches to the kernel), then
times both paths through the op: CUDA events, median of up to 5 calls (fewer once 0.3 s are
spent), host launch overhead included; MiniLM's tensors fit the H100's 50 MB L2, so theirs are
warm-cache times.  ``first_call_s`` is the wall time of the Triton launches' first calls, i.e.
their compiles, which are most of this section's time.

Fields: ``bit_exact``: every output of the check compared bit for bit; ``max_abs_err``: the
largest |triton - torch| over its float outputs; ``err_over_tol``: the worst ratio of an error to
what its tolerance allows (<= 1 passes; None when ``bit_exact``); ``tolerance``: the tolerances
used; ``outputs``: each output's result (``==``: identical bits, else its max abs error and the
fraction of its tolerance used); ``ms_by_op``: ``triton/torch`` ms per timed op.

Tolerances (from the interpreter tests; "rel": max|diff| <= tol * max|ref|):

| family | output | tolerance | why |
| --- | --- | --- | --- |
| act2bit | codes, dx | bit-exact | the same fp32 comparisons; dx the same single fp32 product |
| act2bit | y | fp32 atol 1e-6 + rtol 1e-5; fp16/bf16 atol 1e-2 + rtol 1e-2 | its own GELU/SiLU formulas (tanh GELU as x*sigmoid(2u), no tanh) vs PyTorch's kernels |
| act_from_output | flag | bit-exact | the same fp32 comparison |
| act_from_output | y | CUDA: 1 ulp of PyTorch's CUDA result; interpreter: rtol max(3e-7, eps), atol max(5e-7, 1.5x CPU eager's own error) | PyTorch's formulas with libdevice erf/tanh/exp (numpy's under the interpreter) |
| act_from_output | dx | fp32 atol 1e-6 + rtol 1e-5; fp16/bf16 1 ulp | the Newton inversion carries last-bit exp/log (and FMA) differences |
| dropout_bits | bits, y, dx | bit-exact | y: native_dropout's own output (interpreter: native_dropout_backward(x, mask), as CPU eager's forward rounds the scale to fp16/bf16); dx: native_dropout_backward |
| norms | z, dx | atol = rtol = fp32 1e-5, fp16 2e-3, bf16 1.6e-2 | row reductions in another order; z, dx rounded once to the dtype |
| norms | rstd | rtol 1e-5 | the same, in fp32 |
| prune | values, bits, unpruned | bit-exact | a selection and copies: no arithmetic |
| prune | dW | rel fp32 1e-5, fp16 2e-3, bf16 1.6e-2 | the weight-gradient GEMM sums in another order (32-wide tiles vs cuBLAS) |
| attention | out, dq, dk, dv | rel fp32 1e-5, fp16 3e-3, bf16 2e-2 | flash-style online softmax; 16-bit rounds the unnormalised probabilities |
| attention | lse | rel 1e-6 | online log-sum-exp vs torch.logsumexp |
| linear_cross_entropy | row loss | atol 1e-5 + rtol 1e-5 | online log-sum-exp over 16k-wide (MAX_BLOCK_V) vocab blocks |
| linear_cross_entropy | dlogits | fp32 atol 1e-7 + rtol 1e-5; fp16/bf16 atol 1e-5 + rtol 1e-2 | the same fp32 value may round one 16-bit ulp apart |

Sizes: MiniLM (2048 tokens = 16 x 128, hidden 384, intermediate 1536, 12 heads of 32 with BERT's
padding mask and dropout 0.1; cross-entropy over BERT's 30522 words with label smoothing 0.1) and a
slice of an 8B LLaMA (2048 tokens, hidden 4096, intermediate 14336; attention 1 x 1024, 32 heads of
128 repeated from 8 kv heads, causal mask; a cross-entropy chunk of 1024 rows of the 128256-word
vocabulary, no smoothing; pruned Linear input 2 x 1024 x 4096).  Cross-entropy gradients are
those of reduction="sum" (scale 1), so the fp32 atol of 1e-7 is not most of their size.
``ctx.small``: tiny sizes for the CPU self-test under TRITON_INTERPRET=1, the same code paths
(two key blocks in the causal attention).

``dropout_bits p 0.123`` (MiniLM) tests the claim that fxshear's dropout output is eager's at a p
where fl32(1 / fl32(1 - p)), the scale of CUDA's fused dropout forward, is not fl32(1 / (1 - p)),
that of native_dropout_backward, which fxshear applies: fp32 outputs should differ there.

Budget (the section's limit is 100 s): about 95 distinct kernel configurations compile, measured
for sm_90 on a 2-core box at 0.2-0.5 s each for the elementwise kernels, 1 s for an
act_from_output backward and 2-3 s for each of the three attention kernels, so the attention
kernels run in 6 configurations, not all 12: MiniLM with mask and dropout in every dtype, MiniLM
with neither in bf16, LLaMA causal in bf16 and fp32.  Order: bf16 (what both models train in),
then fp32, then fp16, then LLaMA attention in fp32 (ieee fp32 dots at head dim 128) and one LLaMA
attention-probability pack (33.5M entries in one sample, and ``prune_pack``'s kernel runs one
program per sample: seconds), so a section cut short loses those first.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .runner import Check, Context

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_ORDER = ("bf16", "fp32", "fp16")
ACTIVATIONS = (("gelu", "none"), ("gelu", "tanh"), ("silu", "none"))
KEEP_RATIO = 0.1  # fxshear's default keep_ratio
DROPOUT_P = 0.1  # BERT/MiniLM's hidden and attention dropout
ODD_DROPOUT_P = 0.123  # a p whose 1 / (1 - p) rounds differently via an fp32 1 - p (see the docstring)
REPS = 5
REPS_SECONDS = 0.3  # per timed op and path: stop repeating once this much GPU time is spent

NORM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # atol = rtol
PRUNE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # rel
ATTENTION_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # rel
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class Size:
    name: str
    tokens: int  # rows of the elementwise and norm ops
    hidden: int
    intermediate: int
    batch: int  # attention: batch x seq queries
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool  # LLaMA's causal mask, else BERT's [B, 1, 1, S] padding mask
    vocab: int
    ce_rows: int  # rows of one cross-entropy chunk
    prune_samples: int  # a pruned Linear input is [samples, tokens / samples, hidden]


MINILM = Size("minilm", tokens=2048, hidden=384, intermediate=1536, batch=16, seq=128, heads=12, kv_heads=12,
              head_dim=32, causal=False, vocab=30522, ce_rows=1024, prune_samples=16)
LLAMA = Size("llama-8b", tokens=2048, hidden=4096, intermediate=14336, batch=1, seq=1024, heads=32, kv_heads=8,
             head_dim=128, causal=True, vocab=128256, ce_rows=1024, prune_samples=2)
MINILM_TINY = Size("minilm-tiny", tokens=64, hidden=48, intermediate=96, batch=4, seq=16, heads=2, kv_heads=2,
                   head_dim=16, causal=False, vocab=300, ce_rows=8, prune_samples=4)
LLAMA_TINY = Size("llama-8b-tiny", tokens=64, hidden=64, intermediate=160, batch=1, seq=80, heads=4, kv_heads=2,
                  head_dim=16, causal=True, vocab=33000, ce_rows=4, prune_samples=2)


# ---------------------------------------------------------------------------------------------
# Inputs, clean-up
# ---------------------------------------------------------------------------------------------


def _generator(ctx: Context, seed: int) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(seed)


def _randn(ctx: Context, shape: Sequence[int], dtype: torch.dtype, seed: int, scale: float = 1.0,
           offset: float = 0.0) -> torch.Tensor:
    x = torch.randn(tuple(shape), generator=_generator(ctx, seed), device=ctx.device)
    return (x * scale + offset).to(dtype)


def _sync(ctx: Context) -> None:
    if ctx.device == "cuda":
        torch.cuda.synchronize()


def _free(ctx: Context) -> None:
    """Give the check's GPU memory back.  Its tensors are freed by reference counting when it
    returns (an error's frames are cleared first, see ``_check``); no ``gc.collect()``, which
    takes ~0.15 s with torch and triton loaded, per check."""
    if ctx.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def _bit_mismatches(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Elements whose bits differ (two NaNs count as equal whatever their payloads)."""
    if not expected.is_floating_point():
        return int((actual != expected).sum())
    ints = _INT_VIEW[expected.dtype]
    differ = actual.contiguous().view(ints) != expected.contiguous().view(ints)
    return int((differ & ~(actual.isnan() & expected.isnan())).sum())


def _abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in float64 where expected is finite, 0 elsewhere (NaN where only
    actual is NaN, so it fails every bound)."""
    finite = torch.isfinite(expected)
    return torch.where(finite, (actual.double() - expected.double()).abs(), 0.0)


def _specials_match(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """NaN in the same places, the same infinities where expected is infinite."""
    if not torch.equal(actual.isnan(), expected.isnan()):
        return False
    inf = expected.isinf()
    return torch.equal(actual[inf], expected[inf])


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Float bits as integers in the order of the values: adjacent floats differ by 1."""
    i = t.contiguous().view(_INT_VIEW[t.dtype]).long()
    sign = 1 << (8 * t.element_size() - 1)
    return torch.where(i < 0, -(i & (sign - 1)), i)


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


class _Compare:
    """Collects the comparisons of one check's outputs."""

    def __init__(self) -> None:
        self.ok = True
        self.parts: list[str] = []
        self.tolerances: list[str] = []
        self.all_exact = True
        self.max_abs = 0.0
        self.worst = 0.0
        self.dispatch: list[int] = []

    def _same_kind(self, name: str, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        if actual.shape == expected.shape and actual.dtype == expected.dtype:
            return True
        self.ok = False
        self.parts.append(f"{name} {actual.dtype} {list(actual.shape)} vs {expected.dtype} {list(expected.shape)}")
        return False

    def exact(self, name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        if not self._same_kind(name, actual, expected):
            return
        bad = _bit_mismatches(actual, expected)
        if expected.is_floating_point():
            self.max_abs = max(self.max_abs, _max(_abs_diff(actual, expected)))
        self.ok &= bad == 0
        self.parts.append(f"{name} ==" if bad == 0 else f"{name} differs in {bad} of {expected.numel()}")

    def _bounded(self, name: str, err: float, ratio: float, rule: str) -> None:
        self.all_exact = False
        self.tolerances.append(f"{name}: {rule}")
        self.max_abs = max(self.max_abs, err)
        self.worst = max(self.worst, ratio) if not math.isnan(ratio) else math.nan
        passed = ratio <= 1.0  # False for NaN
        self.ok &= passed
        self.parts.append(f"{name} {err:.2g} ({ratio:.2g} of tol)" + ("" if passed else " FAILED"))

    def close(self, name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
        """``|actual - expected| <= atol + rtol * |expected|`` elementwise (torch.testing's rule)."""
        if not self._same_kind(name, actual, expected):
            return
        diff = _abs_diff(actual, expected)
        allowed = atol + rtol * expected.double().abs()
        ratio = _max(torch.where(diff == 0, 0.0, diff / allowed))
        if not _specials_match(actual, expected):
            ratio = math.inf
        self._bounded(name, _max(diff), ratio, f"atol {atol:g} + rtol {rtol:g}")

    def relative(self, name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
        """``max |actual - expected| <= tol * max |expected|`` over finite entries."""
        if not self._same_kind(name, actual, expected):
            return
        err = _max(_abs_diff(actual, expected))
        finite = expected[torch.isfinite(expected)]
        scale = max(_max(finite.double().abs()), 1e-30)
        ratio = err / (tol * scale) if _specials_match(actual, expected) else math.inf
        self._bounded(name, err, ratio, f"{tol:g} x max|ref|")

    def ulps(self, name: str, actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
        """At most ``ulps`` representable values apart (NaN in the same places)."""
        if not self._same_kind(name, actual, expected):
            return
        ok = ~expected.isnan()
        distance = _max((_ordered_bits(actual[ok]) - _ordered_bits(expected[ok])).abs())
        ratio = distance / ulps if torch.equal(actual.isnan(), expected.isnan()) else math.inf
        self._bounded(name, _max(_abs_diff(actual, expected)), ratio, f"{ulps} ulp")

    def same_as_launcher(self, actual: Any, expected: Any) -> None:
        """The op with ``impl="triton"`` against the launcher's outputs, bit for bit."""
        actual = actual if isinstance(actual, (tuple, list)) else (actual,)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        for a, e in zip(actual, expected, strict=True):
            same = a.shape == e.shape and a.dtype == e.dtype
            self.dispatch.append(_bit_mismatches(a, e) if same else -1)

    def fields(self) -> dict[str, Any]:
        parts = list(self.parts)
        if self.dispatch:
            same = all(bad == 0 for bad in self.dispatch)
            self.ok &= same
            parts.append("op=launcher" if same else "op(impl=triton) differs from the launcher")
        return {
            "bit_exact": self.all_exact,
            "max_abs_err": self.max_abs,
            "err_over_tol": None if self.all_exact else self.worst,
            "tolerance": "; ".join(self.tolerances) if self.tolerances else "bit-exact",
            "outputs": "; ".join(parts),
        }


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class _FirstCalls:
    """Runs the Triton launches' first calls and adds up their wall time (compiles included)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.seconds = 0.0

    def __call__(self, fn: Callable[[], Any]) -> Any:
        _sync(self.ctx)
        start = time.perf_counter()
        result = fn()
        _sync(self.ctx)
        self.seconds += time.perf_counter() - start
        return result


def _time_ms(fn: Callable[..., Any], setup: Callable[[], tuple] | None) -> float:
    times: list[float] = []
    while len(times) < REPS and sum(times) < REPS_SECONDS * 1e3:
        args = setup() if setup is not None else ()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class _Timings:
    """Triton and torch paths of each op, timed on CUDA (nothing on CPU)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.rows: list[tuple[str, float, float]] = []

    def add(self, label: str, triton_fn: Callable[..., Any], torch_fn: Callable[..., Any],
            setup: Callable[[], tuple] | None = None) -> None:
        if self.ctx.device == "cuda":
            self.rows.append((label, _time_ms(triton_fn, setup), _time_ms(torch_fn, setup)))

    def fields(self) -> dict[str, Any]:
        if not self.rows:
            return {"triton_ms": None, "torch_ms": None, "speedup": None, "ms_by_op": None}
        triton_ms = sum(r[1] for r in self.rows)
        torch_ms = sum(r[2] for r in self.rows)
        return {"triton_ms": triton_ms, "torch_ms": torch_ms, "speedup": torch_ms / triton_ms,
                "ms_by_op": ", ".join(f"{label} {a:.3g}/{b:.3g}" for label, a, b in self.rows)}


def _result(shape: str, cmp: _Compare, first: _FirstCalls, timings: _Timings) -> dict[str, Any]:
    compared = cmp.fields()
    times = timings.fields()
    return {"ok": cmp.ok, "shape": shape, "bit_exact": compared.pop("bit_exact"),
            "max_abs_err": compared.pop("max_abs_err"), "err_over_tol": compared.pop("err_over_tol"),
            "tolerance": compared.pop("tolerance"), "triton_ms": times.pop("triton_ms"),
            "torch_ms": times.pop("torch_ms"), "speedup": times.pop("speedup"), "first_call_s": first.seconds,
            **compared, **times}


# ---------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------


def _act2bit(ctx: Context, size: Size, dtype: torch.dtype, kind: str, approximate: str) -> dict[str, Any]:
    from fxshear.kernels import act2bit as ops
    from fxshear.kernels.act2bit_triton import act2bit_backward_triton, act2bit_forward_triton

    shape = (size.tokens, size.intermediate)
    x = _randn(ctx, shape, dtype, seed=1, scale=4.0)  # wide enough for all four codes
    grad = _randn(ctx, shape, dtype, seed=2)
    first, cmp, timings = _FirstCalls(ctx), _Compare(), _Timings(ctx)

    y, codes = first(lambda: act2bit_forward_triton(x, kind, approximate))
    y_ref, codes_ref = ops.act2bit(x, kind, approximate, "torch")
    dx = first(lambda: act2bit_backward_triton(grad, codes_ref, kind))
    dx_ref = ops.act2bit_backward(grad, codes_ref, kind, "torch")
    cmp.exact("codes", codes, codes_ref)
    cmp.exact("dx", dx, dx_ref)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    cmp.close("y", y, y_ref, rtol, atol)
    if ctx.device == "cuda":
        cmp.same_as_launcher(ops.act2bit(x, kind, approximate, "triton"), (y, codes))
        cmp.same_as_launcher(ops.act2bit_backward(grad, codes_ref, kind, "triton"), dx)
    timings.add("fwd", lambda: ops.act2bit(x, kind, approximate, "triton"),
                lambda: ops.act2bit(x, kind, approximate, "torch"))
    timings.add("bwd", lambda: ops.act2bit_backward(grad, codes_ref, kind, "triton"),
                lambda: ops.act2bit_backward(grad, codes_ref, kind, "torch"))
    return _result(_dims(shape), cmp, first, timings)


@functools.cache
def _eager_forward_error(kind: str, approximate: str, dtype: torch.dtype) -> float:
    """Largest |eager f(x) - f(x)| over [-12, 12] on this CPU (tests/helpers.py's bound): the
    interpreter's y is compared with CPU eager, which is itself only this accurate."""
    from fxshear.kernels.act_from_output import activation_reference

    x = torch.linspace(-12.0, 12.0, 200_001).to(dtype)
    xd = x.double()
    if kind == "silu":
        true = xd * torch.sigmoid(xd)
    elif approximate == "tanh":
        true = 0.5 * xd * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd**3)))
    else:
        true = 0.5 * xd * torch.special.erfc(-xd / math.sqrt(2.0))
    return float((activation_reference(x, kind, approximate).double() - true).abs().max())


def _act_from_output(ctx: Context, size: Size, dtype: torch.dtype, kind: str, approximate: str) -> dict[str, Any]:
    from fxshear.kernels import act_from_output as ops
    from fxshear.kernels.act_from_output_triton import (
        act_from_output_backward_triton,
        act_from_output_forward_triton,
    )

    shape = (size.tokens, size.intermediate)
    generator = _generator(ctx, 3)
    # Wide normal samples, a quarter of them packed around the minimum (the inversion's hard part).
    wide = torch.randn(shape, generator=generator, device=ctx.device) * 4.0
    near = ops.INVERSIONS[(kind, approximate)].x_min + torch.randn(shape, generator=generator, device=ctx.device) * 0.05
    x = torch.where(torch.rand(shape, generator=generator, device=ctx.device) < 0.25, near, wide).to(dtype)
    del wide, near
    grad = _randn(ctx, shape, dtype, seed=4)
    first, cmp, timings = _FirstCalls(ctx), _Compare(), _Timings(ctx)

    y, flag = first(lambda: act_from_output_forward_triton(x, kind, approximate))
    y_ref, flag_ref = ops.act_from_output(x, kind, approximate, "torch")
    dx = first(lambda: act_from_output_backward_triton(grad, y_ref, flag_ref, kind, approximate))
    dx_ref = ops.act_from_output_backward(grad, y_ref, flag_ref, kind, approximate, "torch")
    cmp.exact("flag", flag, flag_ref)
    if ctx.device == "cuda":
        cmp.ulps("y", y, y_ref, 1)
    else:
        cmp.close("y", y, y_ref, rtol=max(3e-7, torch.finfo(dtype).eps),
                  atol=max(5e-7, 1.5 * _eager_forward_error(kind, approximate, dtype)))
    if dtype == torch.float32:
        cmp.close("dx", dx, dx_ref, rtol=1e-5, atol=1e-6)
    else:
        cmp.ulps("dx", dx, dx_ref, 1)
    if ctx.device == "cuda":
        cmp.same_as_launcher(ops.act_from_output(x, kind, approximate, "triton"), (y, flag))
        cmp.same_as_launcher(ops.act_from_output_backward(grad, y_ref, flag_ref, kind, approximate, "triton"), dx)
    timings.add("fwd", lambda: ops.act_from_output(x, kind, approximate, "triton"),
                lambda: ops.act_from_output(x, kind, approximate, "torch"))
    timings.add("bwd", lambda: ops.act_from_output_backward(grad, y_ref, flag_ref, kind, approximate, "triton"),
                lambda: ops.act_from_output_backward(grad, y_ref, flag_ref, kind, approximate, "torch"))
    return _result(_dims(shape), cmp, first, timings)


def _dropout(ctx: Context, size: Size, dtype: torch.dtype, p: float) -> dict[str, Any]:
    from fxshear.kernels import dropout_bits as ops
    from fxshear.kernels.dropout_bits_triton import dropout_backward_triton, pack_bits_triton

    shape = (size.tokens, size.hidden)
    x = _randn(ctx, shape, dtype, seed=5)
    grad = _randn(ctx, shape, dtype, seed=6)
    first, cmp, timings = _FirstCalls(ctx), _Compare(), _Timings(ctx)

    torch.manual_seed(7)
    y_eager, mask = torch.ops.aten.native_dropout.default(x, p, True)  # eager's fused-path draw
    bits = first(lambda: pack_bits_triton(mask))
    bits_ref = ops.pack_bits(mask)
    y = first(lambda: dropout_backward_triton(x, bits_ref, p))  # the op is its own adjoint
    dx = dropout_backward_triton(grad, bits_ref, p)
    dx_eager = torch.ops.aten.native_dropout_backward.default(grad, mask, ops.native_scale(p))
    if ctx.device != "cuda":  # CPU eager's native_dropout rounds the scale to a 16-bit dtype first
        y_eager = torch.ops.aten.native_dropout_backward.default(x, mask, ops.native_scale(p))
    cmp.exact("bits", bits, bits_ref)
    cmp.exact("y", y, y_eager)
    cmp.exact("dx", dx, dx_eager)
    if ctx.device == "cuda":
        cmp.same_as_launcher(ops.dropout_apply(grad, bits_ref, p, "triton"), dx)
        torch.manual_seed(7)  # the op's own draw: the same generator state, the same mask
        cmp.same_as_launcher(ops.dropout_draw(x, p, "triton"), bits)
    timings.add("pack", lambda: pack_bits_triton(mask), lambda: ops.pack_bits(mask))
    timings.add("apply", lambda: ops.dropout_apply(grad, bits_ref, p, "triton"),
                lambda: ops.dropout_apply(grad, bits_ref, p, "torch"))
    return _result(f"{_dims(shape)}, p {p}", cmp, first, timings)


def _norms(ctx: Context, size: Size, dtype: torch.dtype, kind: str, looped: bool) -> dict[str, Any]:
    from fxshear.kernels import norms as ops
    from fxshear.kernels.norms_triton import MAX_BLOCK_N, normalize_backward_triton, normalize_forward_triton

    shape = (size.tokens, size.hidden)
    eps = 1e-12 if kind == "layer" else 1e-5  # BERT/MiniLM's LayerNorm, LLaMA's RMSNorm
    # "looped": a column tile of a quarter row, the path of rows wider than MAX_BLOCK_N (4096)
    block = max(16, 1 << (size.hidden - 1).bit_length()) // 4 if looped else MAX_BLOCK_N
    x = _randn(ctx, shape, dtype, seed=8, scale=2.0, offset=1.0)
    grad = _randn(ctx, shape, dtype, seed=9)
    first, cmp, timings = _FirstCalls(ctx), _Compare(), _Timings(ctx)

    z, rstd = first(lambda: normalize_forward_triton(x, kind, eps, max_block_n=block))
    z_ref, rstd_ref = ops.normalize(x, kind, eps, "torch")
    dx = first(lambda: normalize_backward_triton(grad, z_ref, rstd_ref, kind, max_block_n=block))
    dx_ref = ops.normalize_backward(grad, z_ref, rstd_ref, kind, "torch")
    tol = NORM_TOL[dtype]
    cmp.close("z", z, z_ref, rtol=tol, atol=tol)
    cmp.close("rstd", rstd, rstd_ref, rtol=1e-5, atol=0.0)
    cmp.close("dx", dx, dx_ref, rtol=tol, atol=tol)
    if looped:
        fwd = lambda: normalize_forward_triton(x, kind, eps, max_block_n=block)  # noqa: E731
        bwd = lambda: normalize_backward_triton(grad, z_ref, rstd_ref, kind, max_block_n=block)  # noqa: E731
    else:
        fwd = lambda: ops.normalize(x, kind, eps, "triton")  # noqa: E731
        bwd = lambda: ops.normalize_backward(grad, z_ref, rstd_ref, kind, "triton")  # noqa: E731
        if ctx.device == "cuda":
            cmp.same_as_launcher(fwd(), (z, rstd))
            cmp.same_as_launcher(bwd(), dx)
    timings.add("fwd", fwd, lambda: ops.normalize(x, kind, eps, "torch"))
    timings.add("bwd", bwd, lambda: ops.normalize_backward(grad, z_ref, rstd_ref, kind, "torch"))
    return _result(_dims(shape) + (f", tile {block}" if looped else ""), cmp, first, timings)


def _prune_linear(ctx: Context, size: Size, dtype: torch.dtype) -> dict[str, Any]:
    """A Linear hidden -> intermediate whose saved input is pruned: pack, weight gradient, unprune."""
    from fxshear.kernels import prune as ops
    from fxshear.kernels.prune_triton import prune_pack_triton, pruned_weight_grad_triton, unprune_triton

    samples = size.prune_samples
    rows = size.tokens // samples
    x = _randn(ctx, (samples, rows, size.hidden), dtype, seed=10)
    grad = _randn(ctx, (samples, rows, size.intermediate), dtype, seed=11)
    n = rows * size.hidden
    first, cmp, timings = _FirstCalls(ctx), _Compare(), _Timings(ctx)

    values, bits = first(lambda: prune_pack_triton(x, KEEP_RATIO))
    values_ref, bits_ref = ops.prune_pack(x, KEEP_RATIO, "torch")
    dw = first(lambda: pruned_weight_grad_triton(grad, values_ref, bits_ref, size.hidden))
    dw_ref = ops.pruned_weight_grad(grad, values_ref, bits_ref, size.hidden, "torch")
    dense = first(lambda: unprune_triton(values_ref, bits_ref, n))
    dense_ref = ops.unprune_reference(values_ref, bits_ref, n)
    cmp.exact("values", values, values_ref)
    cmp.exact("bits", bits, bits_ref)
    cmp.exact("unpruned", dense, dense_ref)
    cmp.relative("dW", dw, dw_ref, PRUNE_TOL[dtype])
    if ctx.device == "cuda":
        cmp.same_as_launcher(ops.prune_pack(x, KEEP_RATIO, "triton"), (values, bits))
        cmp.same_as_launcher(ops.pruned_weight_grad(grad, values_ref, bits_ref, size.hidden, "triton"), dw)
    timings.add("pack", lambda: ops.prune_pack(x, KEEP_RATIO, "triton"), lambda: ops.prune_pack(x, KEEP_RATIO, "torch"))
    timings.add("dW", lambda: ops.pruned_weight_grad(grad, values_ref, bits_ref, size.hidden, "triton"),
                lambda: ops.pruned_weight_grad(grad, values_ref, bits_ref, size.hidden, "torch"))
    timings.add("unprune", lambda: unprune_triton(values_ref, bits_ref, n),
                lambda: ops.unprune_reference(values_ref, bits_ref, n))
    shape = f"x {_dims(x.shape)} -> dW {size.intermediate}x{size.hidden}, keep {KEEP_RATIO}"
    return _result(shape, cmp, first, timings)


def _prune_probs(ctx: Context, size: Size, dtype: torch.dtype, check_op: bool = True) -> dict[str, Any]:
    """The pruned copy of the attention probabilities (``pruned_softmax``): pack and unprune."""
    from fxshear.kernels import prune as ops
    from fxshear.kernels.prune_triton import prune_pack_triton, unprune_triton

    shape = (size.batch, size.heads, size.seq, size.seq)
    probs = torch.softmax(_randn(ctx, shape, dtype, seed=12, scale=2.0), dim=-1)
    n = size.heads * size.seq * size.seq
    first, cmp, timings = _FirstCalls(ctx), _Compare(), _Timings(ctx)

    values, bits = first(lambda: prune_pack_triton(probs, KEEP_RATIO))
    values_ref, bits_ref = ops.prune_pack(probs, KEEP_RATIO, "torch")
    dense = first(lambda: unprune_triton(values_ref, bits_ref, n))
    dense_ref = ops.unprune_reference(values_ref, bits_ref, n)
    cmp.exact("values", values, values_ref)
    cmp.exact("bits", bits, bits_ref)
    cmp.exact("unpruned", dense, dense_ref)
    if check_op and ctx.device == "cuda":
        cmp.same_as_launcher(ops.prune_pack(probs, KEEP_RATIO, "triton"), (values, bits))
    timings.add("pack", lambda: ops.prune_pack(probs, KEEP_RATIO, "triton"),
                lambda: ops.prune_pack(probs, KEEP_RATIO, "torch"))
    timings.add("unprune", lambda: unprune_triton(values_ref, bits_ref, n),
                lambda: ops.unprune_reference(values_ref, bits_ref, n))
    return _result(f"{_dims(shape)} ({size.batch} samples), keep {KEEP_RATIO}", cmp, first, timings)


def _attention_inputs(ctx: Context, size: Size, dtype: torch.dtype, masked: bool):  # noqa: ANN202
    """q, k, v in Hugging Face's layout (``view(B, S, H, D).transpose(1, 2)``, k and v repeated
    from the kv heads as ``repeat_kv`` does), the model's additive mask in its dtype, grad_out."""
    b, s, h, kv, d = size.batch, size.seq, size.heads, size.kv_heads, size.head_dim

    def heads(seed: int, n: int) -> torch.Tensor:
        t = _randn(ctx, (b, s, n * d), dtype, seed).view(b, s, n, d).transpose(1, 2)
        return t if n == h else t[:, :, None].expand(b, n, h // n, s, d).reshape(b, h, s, d)

    q, k, v = heads(13, h), heads(14, kv), heads(15, kv)
    mask = None
    if masked and size.causal:
        mask = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype, device=ctx.device).triu(1)[None, None]
    elif masked:  # padding: sequence i keeps its first lengths[i] keys
        lengths = torch.randint(s // 2, s + 1, (b,), generator=_generator(ctx, 16), device=ctx.device)
        padded = torch.arange(s, device=ctx.device)[None, :] >= lengths[:, None]
        mask = torch.zeros(b, 1, 1, s, dtype=dtype, device=ctx.device)
        mask.masked_fill_(padded[:, None, None, :], torch.finfo(dtype).min)
    grad = _randn(ctx, (b, h, s, d), dtype, seed=17)
    return q, k, v, mask, grad


def _attention(ctx: Context, size: Size, dtype: torch.dtype, masked: bool, dropout: bool) -> dict[str, Any]:
    from fxshear.kernels import attention as ops
    from fxshear.kernels.attention_triton import attention_backward_triton, attention_forward_triton

    q, k, v, mask, grad = _attention_inputs(ctx, size, dtype, masked)
    scale = size.head_dim ** -0.5
    p = DROPOUT_P if dropout else 0.0
    bits = None
    if p:
        torch.manual_seed(18)
        bits = ops.attention_dropout_draw(q, k, p, "torch")
    first, cmp, timings = _FirstCalls(ctx), _Compare(), _Timings(ctx)

    out, lse = first(lambda: attention_forward_triton(q, k, v, mask, bits, scale, p))
    out_ref, lse_ref = ops.attention(q, k, v, mask, bits, scale, p, "torch")
    grads = first(lambda: attention_backward_triton(grad, q, k, v, mask, lse_ref, bits, scale, p))
    grads_ref = ops.attention_backward(grad, q, k, v, mask, lse_ref, bits, scale, p, "torch")
    tol = ATTENTION_TOL[dtype]
    cmp.relative("out", out, out_ref, tol)
    cmp.relative("lse", lse, lse_ref, 1e-6)
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        cmp.relative(name, actual, expected, tol)
    if ctx.device == "cuda":
        cmp.same_as_launcher(ops.attention(q, k, v, mask, bits, scale, p, "triton"), (out, lse))
        cmp.same_as_launcher(ops.attention_backward(grad, q, k, v, mask, lse_ref, bits, scale, p, "triton"), grads)
    timings.add("fwd", lambda: ops.attention(q, k, v, mask, bits, scale, p, "triton"),
                lambda: ops.attention(q, k, v, mask, bits, scale, p, "torch"))
    timings.add("bwd", lambda: ops.attention_backward(grad, q, k, v, mask, lse_ref, bits, scale, p, "triton"),
                lambda: ops.attention_backward(grad, q, k, v, mask, lse_ref, bits, scale, p, "torch"))
    shape = f"q {_dims(q.shape)}"
    if size.kv_heads != size.heads:
        shape += f" (k, v from {size.kv_heads} kv heads)"
    if mask is not None:
        shape += f", mask {_dims(mask.shape)}"
    if p:
        shape += f", dropout {p}"
    return _result(shape, cmp, first, timings)


def _cross_entropy(ctx: Context, size: Size, dtype: torch.dtype, label_smoothing: float) -> dict[str, Any]:
    from fxshear.kernels.linear_cross_entropy import cross_entropy_chunk_reference
    from fxshear.kernels.linear_cross_entropy_triton import cross_entropy_chunk_triton

    rows, vocab = size.ce_rows, size.vocab
    generator = _generator(ctx, 19)
    logits = (torch.randn(rows, vocab, generator=generator, device=ctx.device) * 4.0).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=generator, device=ctx.device)
    target[torch.rand(rows, generator=generator, device=ctx.device) < 0.1] = -100
    target[0] = -100  # at least one ignored row, and one that is not
    target[-1] = vocab - 1
    # reduction="sum": gradients at full size, so the fp32 atol of 1e-7 is not most of them
    scale = torch.ones((), dtype=torch.float32, device=ctx.device)
    first, cmp, timings = _FirstCalls(ctx), _Compare(), _Timings(ctx)

    def triton_step(buffer: torch.Tensor, loss: torch.Tensor) -> None:
        cross_entropy_chunk_triton(buffer, target, loss, scale, -100, label_smoothing, True)

    def torch_step(buffer: torch.Tensor, loss: torch.Tensor) -> None:
        cross_entropy_chunk_reference(buffer, target, loss, scale, -100, label_smoothing, True)

    grad, loss = logits.clone(), torch.full((rows,), math.nan, device=ctx.device)
    first(lambda: triton_step(grad, loss))
    grad_ref, loss_ref = logits.clone(), torch.empty(rows, device=ctx.device)
    torch_step(grad_ref, loss_ref)
    cmp.close("loss", loss, loss_ref, rtol=1e-5, atol=1e-5)
    rtol, atol = (1e-5, 1e-7) if dtype == torch.float32 else (1e-2, 1e-5)
    cmp.close("dlogits", grad, grad_ref, rtol=rtol, atol=atol)
    grad = grad_ref = None  # free them before the timed calls
    timings.add("step", triton_step, torch_step, setup=lambda: (logits.clone(), loss))
    shape = f"{rows}x{vocab}, smoothing {label_smoothing}"
    return _result(shape, cmp, first, timings)


# ---------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------


def _check(ctx: Context, family: str, variant: str, size: Size, dtype_name: str,
           body: Callable[..., dict[str, Any]], *args: Any) -> Check:
    def run() -> dict[str, Any]:
        try:
            fields = body(ctx, size, DTYPES[dtype_name], *args)
            return {"ok": fields.pop("ok"), "family": family, "variant": variant, "size": size.name,
                    "dtype": dtype_name, **fields}
        except BaseException as error:
            # The traceback keeps the check's frames (and their tensors) alive: clear them so
            # the memory is given back before the next check.
            traceback.clear_frames(error.__traceback__)
            raise
        finally:
            _free(ctx)

    return Check(f"{family} {variant} {size.name} {dtype_name}", run)


def build(ctx: Context) -> list[Check]:
    minilm, llama = (MINILM_TINY, LLAMA_TINY) if ctx.small else (MINILM, LLAMA)
    checks: list[Check] = []
    for dtype in DTYPE_ORDER:
        for family, body in (("act2bit", _act2bit), ("act_from_output", _act_from_output)):
            for kind, approximate in ACTIVATIONS:
                variant = kind if approximate == "none" else f"{kind}-{approximate}"
                for size in (minilm, llama):
                    checks.append(_check(ctx, family, variant, size, dtype, body, kind, approximate))
        for size in (minilm, llama):
            checks.append(_check(ctx, "dropout_bits", f"p {DROPOUT_P}", size, dtype, _dropout, DROPOUT_P))
        # dropout_bits' docstring example: fl32(1 / fl32(1 - p)) != fl32(1 / (1 - p)) here
        checks.append(_check(ctx, "dropout_bits", f"p {ODD_DROPOUT_P}", minilm, dtype, _dropout, ODD_DROPOUT_P))
        for size in (minilm, llama):
            for kind in ("layer", "rms"):
                checks.append(_check(ctx, "norms", kind, size, dtype, _norms, kind, False))
        if dtype == "bf16":
            for kind in ("layer", "rms"):
                checks.append(_check(ctx, "norms", f"{kind}-looped", llama, dtype, _norms, kind, True))
        for size in (minilm, llama):
            checks.append(_check(ctx, "prune", "linear", size, dtype, _prune_linear))
        checks.append(_check(ctx, "prune", "attn-probs", minilm, dtype, _prune_probs))
        checks.append(_check(ctx, "attention", "mask+dropout", minilm, dtype, _attention, True, True))
        if dtype == "bf16":
            checks.append(_check(ctx, "attention", "plain", minilm, dtype, _attention, False, False))
        if dtype == "bf16":
            checks.append(_check(ctx, "attention", "causal", llama, dtype, _attention, True, False))
        checks.append(_check(ctx, "linear_cross_entropy", "smoothing", minilm, dtype, _cross_entropy, 0.1))
        checks.append(_check(ctx, "linear_cross_entropy", "plain", llama, dtype, _cross_entropy, 0.0))
    # Last, the first to go when the section runs out of time: fp32 dots at head dim 128, and the
    # slowest check (one sample of 33.5M probabilities is one prune_pack program).
    checks.append(_check(ctx, "attention", "causal", llama, "fp32", _attention, True, False))
    checks.append(_check(ctx, "prune", "attn-probs", llama, "bf16", _prune_probs, False))
    return checks
