"""Triton kernels for ``fxshear::act_from_output`` (GELU/SiLU backward from the saved output).

Forward: one pass over ``x`` writes the activation and the packed branch flags (8 per byte).
Backward: reads ``grad``, ``y`` and the flags, recovers the derivative and multiplies, never
touching ``x``.  Both mirror :mod:`fxshear.kernels.act_from_output`'s torch reference operation
for operation:

* flags are the same fp32 comparison, so they are bitwise equal;
* ``y`` uses PyTorch's own formulas in its CUDA kernels' operation order, with libdevice
  ``erf``/``tanh``/``exp`` on a GPU (expected to match PyTorch's CUDA result; not verified on a GPU
  here).  Under TRITON_INTERPRET there is no libdevice: ``erf`` is ``math.erf``, ``exp`` numpy's and
  ``tanh`` is built from ``exp``, while PyTorch's CPU kernels use their own vectorized
  approximations, so y differs from CPU eager by up to an ulp (about 1e-7 absolute in the left
  tail, where ``1 + erf`` cancels);
* the backward's fp32 math is the reference's, operation for operation, with the same fp32
  constants (one table built from ``INVERSIONS``).  Near the minimum, where the derivative is a
  polynomial in ``sqrt(y - y_min)``, results agree to 2 ulp; elsewhere exp/log implementations
  (and FMA contraction on a GPU) differ in the last bit and Newton carries that through: measured
  under the interpreter, within 3.3e-7 absolute (a few ulp where |f'| ~ 1, up to ~70 ulp where f'
  is tiny in the left tail).  After rounding to bf16/fp16 the outputs differ by at most 1 ulp.
  The tests check these bounds (fp32: rtol 1e-5, atol 1e-6).

Every program owns ``BLOCK_BYTES`` flag bytes, i.e. a ``[BLOCK_BYTES, 8]`` tile of consecutive
elements (element ``8 * byte + lane`` is bit ``lane`` of ``byte``), loaded as one contiguous run.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fxshear.kernels.infra.triton_helpers import SUPPORTED_DTYPES, cast_fp32_to
from fxshear.kernels.act_from_output_reference import (
    ERFC_POLY,
    FLAGS_PER_BYTE,
    INV_SQRT_2PI,
    LN_SQRT_2PI,
    NEAR_RADIUS,
    NEWTON_STEPS,
    SQRT_HALF,
    TANH_CUBIC,
    TANH_SCALE2,
    Y_SATURATE,
    bucket_half_width,
    check_args,
    inversion,
    packed_numel,
)

FORWARD_BLOCK_BYTES = 512  # 4096 elements per program, 16 per thread
FORWARD_WARPS = 8
BACKWARD_BLOCK_BYTES = 128  # the backward is ~100 flops per element: fewer per thread
BACKWARD_WARPS = 4
KIND_CODES = {("gelu", "none"): 0, ("gelu", "tanh"): 1, ("silu", "none"): 2}
LEFT_TAIL_CODES = {"none": 0, "gelu": 1, "silu": 2}

# Globals read inside @triton.jit functions must be constexpr.  Keep them on the right of a
# tensor operand: under the interpreter ``constexpr * tensor`` stays a constexpr and breaks tl.where.
_SQRT_HALF = tl.constexpr(SQRT_HALF)
_HALF_SQRT_HALF = tl.constexpr(0.5 * SQRT_HALF)
_INV_SQRT_2PI = tl.constexpr(INV_SQRT_2PI)
_LN_SQRT_2PI = tl.constexpr(LN_SQRT_2PI)
_BETA = tl.constexpr(TANH_SCALE2 / 2)  # sqrt(2 / pi), PyTorch's kBeta
_KAPPA = tl.constexpr(TANH_CUBIC)
_SCALE2 = tl.constexpr(TANH_SCALE2)
_SCALE2_CUBIC = tl.constexpr(TANH_SCALE2 * TANH_CUBIC)
_SCALE2_CUBIC3 = tl.constexpr(3.0 * TANH_SCALE2 * TANH_CUBIC)
_NEAR_RADIUS = tl.constexpr(NEAR_RADIUS)
_Y_SATURATE = tl.constexpr(Y_SATURATE)
_X_CEILING = tl.constexpr(Y_SATURATE + 1.0)
_NEWTON_STEPS = tl.constexpr(NEWTON_STEPS)
_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9 = (tl.constexpr(c) for c in ERFC_POLY)

# Layout of the per-activation fp32 constant table (see _constant_table).
_X_MIN, _Y_MIN, _LOG_Y_MIN, _X_LEFT, _Y_LEFT, _RIGHT_LIMIT, _LEFT_LIMIT = (tl.constexpr(i) for i in range(7))
_NEAR_AT = tl.constexpr(7)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _abs(v):
    """|v| (sign of zero aside); tl.abs fails in some interpreted call chains."""
    return tl.where(v < 0, -v, v)


@triton.jit
def _exp(v, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(v)
    else:
        return tl.exp(v)


@triton.jit
def _log(v, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.log(v)
    else:
        return tl.log(v)


@triton.jit
def _tanh(v, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(v)
    else:  # the interpreter has no tanh: (1 - e) / (1 + e), e = exp(-2|v|), sign restored
        e = tl.exp(-2.0 * _abs(v))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(v < 0, -t, t)


@triton.jit
def _activation(x, KIND: tl.constexpr, LIBDEVICE: tl.constexpr):
    """PyTorch's forward formulas, in its CUDA kernels' operation order."""
    if KIND == 0:
        y = x * 0.5 * (1.0 + tl.erf(x * _SQRT_HALF))
    elif KIND == 1:
        x_cube = x * x * x
        y = 0.5 * x * (1.0 + _tanh((x + x_cube * _KAPPA) * _BETA, LIBDEVICE))
    else:
        y = x / (1.0 + _exp(-x, LIBDEVICE))
    return y


@triton.jit
def _horner(v, coef_ptr, OFFSET: tl.constexpr, N: tl.constexpr):
    """sum_k c[k] v^k for the N table entries from OFFSET, as the reference's ``_horner``."""
    acc = v * tl.load(coef_ptr + (OFFSET + N - 1)) + tl.load(coef_ptr + (OFFSET + N - 2))
    for i in tl.static_range(3, N + 1):
        acc = acc * v + tl.load(coef_ptr + (OFFSET + N - i))
    return acc


@triton.jit
def _sqrt_nonneg(d):
    return tl.sqrt_rn(tl.where(d < 0, 0.0, d))


@triton.jit
def _f_and_df(x, KIND: tl.constexpr, LIBDEVICE: tl.constexpr):
    """(f(x), f'(x)) in fp32: the reference's ``activation_and_derivative``."""
    if KIND == 0:
        t = 1.0 / (1.0 + _abs(x) * _HALF_SQRT_HALF)
        gauss = _exp((x * x) * -0.5, LIBDEVICE)
        p = t * _E9 + _E8
        p = p * t + _E7
        p = p * t + _E6
        p = p * t + _E5
        p = p * t + _E4
        p = p * t + _E3
        p = p * t + _E2
        p = p * t + _E1
        p = p * t + _E0
        half_erfc = (0.5 * t) * gauss * _exp(p, LIBDEVICE)
        cdf = tl.where(x < 0, half_erfc, 1.0 - half_erfc)
        f = x * cdf
        df = cdf + x * (gauss * _INV_SQRT_2PI)
    else:
        if KIND == 1:
            xx = x * x
            v = x * (xx * _SCALE2_CUBIC + _SCALE2)
            dv = xx * _SCALE2_CUBIC3 + _SCALE2
        else:
            v = x
            dv = 1.0
        e = _exp(-_abs(v), LIBDEVICE)
        p = 1.0 / (1.0 + e)
        q = e * p
        s = tl.where(v >= 0, p, q)
        s_comp = tl.where(v >= 0, q, p)
        f = x * s
        if KIND == 1:
            df = s * (1.0 + x * s_comp * dv)
        else:
            df = s * (1.0 + x * s_comp)
    return f, df


@triton.jit
def _derivative(y, right, coef_ptr, h, KIND: tl.constexpr, LEFT_TAIL: tl.constexpr,
                N_NEAR: tl.constexpr, N_RIGHT: tl.constexpr, N_LEFT: tl.constexpr,
                LIBDEVICE: tl.constexpr):
    """f'(x(y, branch)) in fp32: the reference's ``derivative_from_output``, step for step."""
    x_min = tl.load(coef_ptr + _X_MIN)
    y_min = tl.load(coef_ptr + _Y_MIN)
    log_y_min = tl.load(coef_ptr + _LOG_Y_MIN)
    x_left = tl.load(coef_ptr + _X_LEFT)
    y_left = tl.load(coef_ptr + _Y_LEFT)
    right_limit = tl.load(coef_ptr + _RIGHT_LIMIT)
    left_limit = tl.load(coef_ptr + _LEFT_LIMIT)
    RIGHT_AT: tl.constexpr = _NEAR_AT + N_NEAR
    LEFT_AT: tl.constexpr = RIGHT_AT + N_RIGHT

    # near the minimum: the polynomial in rho, averaged over y's rounding bucket
    d = y - y_min
    r = _sqrt_nonneg(d)
    r_lo = _sqrt_nonneg(d - h)
    r_hi = _sqrt_nonneg(d + h)
    r_lo = tl.where(right, r_lo, -r_lo)
    r_hi = tl.where(right, r_hi, -r_hi)
    near_lo = r_lo * _horner(r_lo, coef_ptr, _NEAR_AT, N_NEAR)
    near = 0.5 * (near_lo + r_hi * _horner(r_hi, coef_ptr, _NEAR_AT, N_NEAR))

    # elsewhere: Newton from the fitted guesses
    y_right = tl.where(y > _Y_SATURATE, _Y_SATURATE, y)
    guess_right = tl.where(y_right < right_limit, x_min + _horner(r, coef_ptr, RIGHT_AT, N_RIGHT), y_right)
    y_lft = tl.where(y > y_left, y_left, y)
    y_lft = tl.where(y_lft < y_min, y_min, y_lft)
    log_left = -_log(-y_lft, LIBDEVICE)
    v = _sqrt_nonneg(log_left - log_y_min)
    guess_left = _horner(v, coef_ptr, LEFT_AT, N_LEFT)
    if LEFT_TAIL == 1:
        guess_left = tl.where(v > left_limit, -tl.sqrt_rn(2.0 * (log_left - _LN_SQRT_2PI)), guess_left)
    elif LEFT_TAIL == 2:
        log_log = _log(log_left, LIBDEVICE)
        guess_left = tl.where(v > left_limit, -log_left - log_log - log_log / log_left, guess_left)

    x = tl.where(right, guess_right, guess_left)
    target = tl.where(right, y_right, y_lft)
    lo = tl.where(right, x_min, x_left)
    hi = tl.where(right, _X_CEILING, x_min)
    for _ in tl.static_range(_NEWTON_STEPS):
        f, df = _f_and_df(x, KIND, LIBDEVICE)
        residual = tl.where(right, f - target, f * _log(f / target, LIBDEVICE))
        x = x - residual / df
        x = tl.where(x < lo, lo, x)
        x = tl.where(x > hi, hi, x)
    f, far = _f_and_df(x, KIND, LIBDEVICE)

    out = tl.where(r <= _NEAR_RADIUS, near, far)
    return tl.where((right == 0) & (y > y_left), 0.0, out)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, flag_ptr, numel, num_bytes, x_min,
                    KIND: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """y = activation(x) in x's dtype; flag[b] = sum_j [fp32(x[8b + j]) >= x_min] << j."""
    byte_idx = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lane = tl.arange(0, 8)
    elem_idx = byte_idx[:, None] * 8 + lane[None, :]
    in_bounds = elem_idx < numel

    x = tl.load(x_ptr + elem_idx, mask=in_bounds, other=0.0).to(tl.float32)
    y = _activation(x, KIND, LIBDEVICE)
    tl.store(y_ptr + elem_idx, cast_fp32_to(y, y_ptr.dtype.element_ty), mask=in_bounds)

    bit = ((x >= x_min) & in_bounds).to(tl.int32)  # pad lanes of the last byte stay zero
    packed = tl.sum(bit << lane[None, :], axis=1)  # disjoint bits: the sum is the OR
    tl.store(flag_ptr + byte_idx, packed.to(tl.uint8), mask=byte_idx < num_bytes)


@triton.jit
def _backward_kernel(grad_ptr, y_ptr, flag_ptr, dx_ptr, coef_ptr, numel, num_bytes, h,
                     KIND: tl.constexpr, LEFT_TAIL: tl.constexpr, N_NEAR: tl.constexpr,
                     N_RIGHT: tl.constexpr, N_LEFT: tl.constexpr, LIBDEVICE: tl.constexpr,
                     BLOCK_BYTES: tl.constexpr):
    """dx = grad * f'(x(y, flag)), multiplied in fp32, stored in grad's dtype."""
    byte_idx = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lane = tl.arange(0, 8)
    elem_idx = byte_idx[:, None] * 8 + lane[None, :]
    in_bounds = elem_idx < numel

    packed = tl.load(flag_ptr + byte_idx, mask=byte_idx < num_bytes, other=0).to(tl.int32)
    right = ((packed[:, None] >> lane[None, :]) & 1) != 0
    y = tl.load(y_ptr + elem_idx, mask=in_bounds, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + elem_idx, mask=in_bounds, other=0.0).to(tl.float32)
    slope = _derivative(y, right, coef_ptr, h, KIND, LEFT_TAIL, N_NEAR, N_RIGHT, N_LEFT, LIBDEVICE)
    tl.store(dx_ptr + elem_idx, cast_fp32_to(grad * slope, dx_ptr.dtype.element_ty), mask=in_bounds)


@functools.cache
def _constant_table(kind: str, approximate: str, device: torch.device) -> torch.Tensor:
    """The fp32 constants of the inverse, laid out as the ``_X_MIN``.. / ``_NEAR_AT`` indices say."""
    inv = inversion(kind, approximate)
    values = [inv.x_min, inv.y_min, inv.log_y_min, inv.x_left, inv.y_left, inv.right_guess_limit,
              inv.left_poly_limit, *inv.near, *inv.right_guess, *inv.left_guess]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _check_float_tensor(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, got {t.dtype}")


def act_from_output_forward_triton(
    x: torch.Tensor, kind: str, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(activation(x), packed flags)`` from one pass over ``x``.

    ``y`` is laid out like ``torch.empty_like(x)``; the flags follow x's logical (row-major)
    element order whatever its strides.
    """
    check_args(kind, approximate)
    _check_float_tensor(x, "x")
    numel = x.numel()
    num_bytes = packed_numel(numel)
    y = torch.empty_like(x)
    flag = torch.empty(num_bytes, dtype=torch.uint8, device=x.device)
    if numel == 0:
        return y, flag
    x_contiguous = x.contiguous()
    y_out = y if y.is_contiguous() else torch.empty_like(x_contiguous)
    _forward_kernel[(triton.cdiv(num_bytes, FORWARD_BLOCK_BYTES),)](
        x_contiguous, y_out, flag, numel, num_bytes, inversion(kind, approximate).x_min,
        KIND=KIND_CODES[(kind, approximate)], LIBDEVICE=not _interpreted(),
        BLOCK_BYTES=FORWARD_BLOCK_BYTES, num_warps=FORWARD_WARPS,
    )
    if y_out is not y:
        y.copy_(y_out)
    return y, flag


def act_from_output_backward_triton(
    grad: torch.Tensor, y: torch.Tensor, flag: torch.Tensor, kind: str, approximate: str
) -> torch.Tensor:
    """``grad * f'(x(y, flag))`` laid out like ``torch.empty_like(grad)``.

    ``y`` (any supported dtype, grad's shape) and ``flag`` are in logical element order.
    """
    check_args(kind, approximate)
    _check_float_tensor(grad, "grad")
    _check_float_tensor(y, "y")
    numel = grad.numel()
    num_bytes = packed_numel(numel)
    if y.shape != grad.shape:
        raise ValueError(f"y has shape {tuple(y.shape)} but grad has {tuple(grad.shape)}")
    if flag.dtype != torch.uint8 or flag.numel() != num_bytes:
        raise ValueError(f"flag must be uint8 with {num_bytes} elements ({FLAGS_PER_BYTE} flags per byte "
                         f"for {numel} gradients), got {flag.dtype} with {flag.numel()}")
    if flag.device != grad.device or y.device != grad.device:
        raise ValueError(f"grad, y and flag must share a device, got {grad.device}, {y.device}, {flag.device}")

    dx = torch.empty_like(grad)
    if numel == 0:
        return dx
    inv = inversion(kind, approximate)
    grad_contiguous = grad.contiguous()
    dx_out = dx if dx.is_contiguous() else torch.empty_like(grad_contiguous)
    _backward_kernel[(triton.cdiv(num_bytes, BACKWARD_BLOCK_BYTES),)](
        grad_contiguous, y.contiguous(), flag.contiguous(), dx_out,
        _constant_table(kind, approximate, grad.device), numel, num_bytes,
        bucket_half_width(y.dtype, inv.y_min),
        KIND=KIND_CODES[(kind, approximate)], LEFT_TAIL=LEFT_TAIL_CODES[inv.left_tail],
        N_NEAR=len(inv.near), N_RIGHT=len(inv.right_guess), N_LEFT=len(inv.left_guess),
        LIBDEVICE=not _interpreted(), BLOCK_BYTES=BACKWARD_BLOCK_BYTES, num_warps=BACKWARD_WARPS,
    )
    if dx_out is not dx:
        dx.copy_(dx_out)
    return dx
