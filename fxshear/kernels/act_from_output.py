"""``fxshear::act_from_output``: exact GELU/SiLU whose backward needs only the OUTPUT and 1 bit.

Why: the Linear after an activation saves the activation's output for its weight gradient anyway.
GELU (erf and tanh forms) and SiLU have a single minimum and are strictly monotone on either side
of it, so the output ``y`` plus one bit saying which side ``x`` was on determine ``x`` -- and with
it the exact derivative.  The dense pre-activation need not be saved: 1 bit per element instead.

Ops (``impl`` is "auto" | "torch" | "triton", an argument so it is part of every graph and key):
    act_from_output(x, kind, approximate, impl) -> (y, flag)
        y is ``F.gelu(x, approximate)`` / ``F.silu(x)`` in x's dtype: bitwise on the torch path,
        within an ulp on the Triton path (see ``act_from_output_triton``);
        flag is uint8[ceil(numel / 8)]: bit ``i % 8`` of byte ``i // 8`` is 1 where
        ``fp32(x[i]) >= fp32(x_min)`` (the right branch), in x's logical (row-major) order; pad
        bits are 0.  NaN inputs get flag 0.
    act_from_output_backward(grad, y, flag, kind, approximate, impl) -> dx
        dx = grad * f'(x(y, flag)), computed in fp32, returned in grad's dtype.

How the derivative is recovered (all in fp32, elementwise, with a fixed number of operations so
the same math is traceable aten code, a Triton kernel, and an Inductor CPU lowering):

* Near the minimum, ``|rho| <= NEAR_RADIUS`` with ``rho = +-sqrt(y - y_min)`` (sign = branch),
  f' is analytic in rho (f' ~ sqrt(2 f''(x_min)) rho) and is a fitted degree-8 polynomial (fit error
  2e-10); Newton would be ill-conditioned there.  ``y`` is a rounded value, so which x produced
  it is only known up to its rounding bucket ``[y - h, y + h]`` (h = half an ulp of y's dtype,
  constant over the near region).  There f' is nearly linear in x, so the average of the
  polynomial at both bucket ends is both the conditional mean and the minimax estimate of f'(x):
  in bf16 it cuts the largest error by 20-30% and lands within 5% of the best any function of
  (y, flag) can do (the "floor" column below).
* Elsewhere, NEWTON_STEPS = 3 Newton steps from a fitted initial guess (error < 1e-3): on
  ``f(x) = y`` on the right branch (guess: a polynomial in ``r = sqrt(y - y_min)``, or x = y for
  large y), on ``ln(-f(x)) = ln(-y)`` on the left branch (guess: a polynomial in
  ``v = sqrt(ln(y_min / y))``, or the asymptotic inverse in the far tail), clamped to the branch.
  For y = f(x) rounded once to fp32 the derivative is then within 5e-7 of float64 (tested).
* Limits: y >= Y_SATURATE on the right branch gives f'(Y_SATURATE) = 1 (also y = +inf; eager
  gives NaN at x = +inf); y below y_min counts as y_min (f' = 0, or the bucket average); on the
  left branch, y closer to 0 than ``f(x_left)`` (where |f'| < 1e-9; includes the y = -0.0 of an
  underflowed forward) gives 0, the x -> -inf limit.  NaN y gives NaN.

GELU's normal CDF uses the Numerical Recipes ``erfcc`` fit (relative error < 1.2e-7 everywhere),
not ``erf``: it needs only ``exp``, so the Triton kernel computes the same formula as this torch
reference (no libdevice ``erfc`` under TRITON_INTERPRET), and it stays accurate in the left tail.
The constants are refitted by ``python benchmarks/act_inversion_error.py --fit`` (mpmath).

Measured error (benchmarks/results/act_inversion_error.md; every finite bf16/fp16 value, 6.2M fp32
points dense near the minimum; largest |dx - f'(x)| for grad = 1 against float64 f'(x) at the
true x; "eager" is PyTorch's own gelu/silu backward in that dtype):

    dtype  function   inversion  eager      ratio   floor*     away**     eager away  exact
    bf16   gelu       1.081e-02  3.906e-03     2.8  1.057e-02  4.269e-03  3.906e-03   yes
    bf16   gelu tanh  1.072e-02  3.903e-03     2.7  1.056e-02  4.157e-03  3.903e-03   yes
    bf16   silu       1.192e-02  3.897e-03     3.1  1.137e-02  4.536e-03  3.897e-03   yes
    fp16   gelu       4.871e-03  4.882e-04    10.0  4.837e-03  5.571e-04  4.882e-04   no
    fp16   gelu tanh  3.554e-03  4.881e-04     7.3  3.518e-03  5.445e-04  4.881e-04   no
    fp16   silu       3.814e-03  4.885e-04     7.8  3.770e-03  5.632e-04  4.885e-04   no
    fp32   gelu       2.928e-04  2.890e-07  1013    1.676e-04  7.210e-07  2.890e-07   no
    fp32   gelu tanh  1.589e-04  1.038e-06   153    9.942e-05  1.038e-06  1.038e-06   no
    fp32   silu       1.101e-04  9.730e-07   113    7.449e-05  2.348e-07  9.730e-07   no

    *  floor: half the spread of f'(x) over the x values sharing one (y, flag): the smallest
       max error ANY backward from (y, flag) can have (fp32: a lower bound over the sweep).
    ** away: |x - x_min| >= 0.25, where the inversion is at the dtype's rounding level.  (fp32
       GELU: PyTorch's CPU forward is only accurate to ~1.5e-7 absolute, which the left tail's
       inversion amplifies to 7e-7.)

Policy: a dtype is exact when the inversion's max error is <= 4x eager's for every function
(EXACT_RATIO; eager's own max error is half an ulp of f' near 1, so 4x is 2 ulp).  Only bf16
qualifies: its coarse rounding of f' hides the sqrt-shaped error at the minimum.  In fp16 and
fp32 even the floor is 7-10x (fp16) and > 70x (fp32) eager's error, so no backward that keeps only
(y, flag) can be exact there.
"""

from __future__ import annotations


import torch

from .infra.bits import BITS_PER_BYTE, pack_bits, packed_numel, unpack_bits  # noqa: F401  (re-exported)
from .infra.dispatch import IMPLS, use_triton  # noqa: F401  (IMPLS re-exported)
from .infra.lowering import register_cpu_lowering
from .act_from_output_reference import (  # noqa: F401  (re-exported: the op's constants)
    KINDS,
    GELU_APPROXIMATIONS,
    FLAGS_PER_BYTE,
    TRITON_MODULE,
    TRITON_DTYPES,
    EXACT_DTYPES,
    EXACT_RATIO,
    NEWTON_STEPS,
    NEAR_RADIUS,
    Y_SATURATE,
    SQRT_HALF,
    INV_SQRT_2PI,
    LN_SQRT_2PI,
    TANH_SCALE2,
    TANH_CUBIC,
    ERFC_POLY,
    Inversion,
    INVERSIONS_F64,
    INVERSIONS,
    check_args,
    inversion,
    bucket_half_width,
    _f32,
)

# ----------------------------------------------------------------------------------------------
# Pure-torch reference: traceable aten math (no .item(), no branching on values).  The custom
# ops run it on CPU, the Inductor CPU lowering inlines it, and the Triton kernels mirror it.
# ----------------------------------------------------------------------------------------------


def activation_reference(x: torch.Tensor, kind: str, approximate: str = "none") -> torch.Tensor:
    """The exact forward, computed exactly as eager PyTorch computes it."""
    check_args(kind, approximate)
    if kind == "gelu":
        return torch.nn.functional.gelu(x, approximate=approximate)
    return torch.nn.functional.silu(x)


def right_branch(x: torch.Tensor, kind: str, approximate: str = "none") -> torch.Tensor:
    """bool, True where ``x >= x_min`` compared in fp32 (NaN: False)."""
    return x.float() >= inversion(kind, approximate).x_min


def forward_reference(
    x: torch.Tensor, kind: str, approximate: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(activation(x), packed branch flags)``."""
    return activation_reference(x, kind, approximate), pack_bits(right_branch(x, kind, approximate))


def _horner(v: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """sum_k coefs[k] v^k, highest degree first (the Triton kernel does the same operations)."""
    acc = v * coefs[-1] + coefs[-2]
    for c in reversed(coefs[:-2]):
        acc = acc * v + c
    return acc


def _sqrt_nonneg(d: torch.Tensor) -> torch.Tensor:
    """sqrt(max(d, 0)), keeping NaN a NaN."""
    return torch.sqrt(torch.where(d < 0, 0.0, d))


def activation_and_derivative(
    x: torch.Tensor, kind: str, approximate: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x), f'(x))`` in x's dtype (fp32 in the solver, which clamps x to a finite range),
    from ``exp`` only; float64 gives the benchmark's reference derivative for the tanh form and SiLU."""
    if kind == "gelu" and approximate == "none":
        t = 1.0 / (1.0 + (0.5 * SQRT_HALF) * x.abs())
        gauss = torch.exp(-0.5 * (x * x))
        half_erfc = (0.5 * t) * gauss * torch.exp(_horner(t, ERFC_POLY))  # Phi(-|x|)
        cdf = torch.where(x < 0, half_erfc, 1.0 - half_erfc)
        return x * cdf, cdf + x * (gauss * INV_SQRT_2PI)
    if kind == "gelu":  # tanh form: 0.5 x (1 + tanh u) = x sigmoid(2u)
        xx = x * x
        v = x * (TANH_SCALE2 + (TANH_SCALE2 * TANH_CUBIC) * xx)
        dv = TANH_SCALE2 + (3.0 * TANH_SCALE2 * TANH_CUBIC) * xx
    else:
        v = x
    e = torch.exp(-v.abs())  # sigmoid(v) and 1 - sigmoid(v) without overflow or cancellation
    p = 1.0 / (1.0 + e)
    q = e * p
    positive = v >= 0
    s = torch.where(positive, p, q)
    s_comp = torch.where(positive, q, p)
    if kind == "gelu":
        return x * s, s * (1.0 + x * s_comp * dv)
    return x * s, s * (1.0 + x * s_comp)


def derivative_from_output(
    y: torch.Tensor, right: torch.Tensor, kind: str, approximate: str = "none"
) -> torch.Tensor:
    """f'(x) in fp32 for the x with ``f(x) = y`` on the branch ``right`` (bool, y's shape).

    ``y``'s dtype sets the rounding bucket averaged over near the minimum (module docstring).
    """
    inv = inversion(kind, approximate)
    h = bucket_half_width(y.dtype, inv.y_min)
    y = y.float()

    # Near the minimum: the polynomial in rho, averaged over y's rounding bucket.
    d = y - inv.y_min
    r = _sqrt_nonneg(d)
    r_lo = torch.where(right, _sqrt_nonneg(d - h), -_sqrt_nonneg(d - h))
    r_hi = torch.where(right, _sqrt_nonneg(d + h), -_sqrt_nonneg(d + h))
    near = 0.5 * (r_lo * _horner(r_lo, inv.near) + r_hi * _horner(r_hi, inv.near))

    # Elsewhere: Newton from a fitted guess, on f(x) = y (right) or ln(-f(x)) = ln(-y) (left).
    y_right = torch.where(y > Y_SATURATE, Y_SATURATE, y)
    polynomial = inv.x_min + _horner(r, inv.right_guess)
    guess_right = torch.where(y_right < inv.right_guess_limit, polynomial, y_right)
    y_left = torch.where(y > inv.y_left, inv.y_left, y)
    y_left = torch.where(y_left < inv.y_min, inv.y_min, y_left)
    log_left = -torch.log(-y_left)
    v = _sqrt_nonneg(log_left - inv.log_y_min)
    guess_left = _horner(v, inv.left_guess)
    if inv.left_tail == "gelu":  # -y <= pdf(x), so inverting the pdf gives a guess left of x
        tail = -torch.sqrt(2.0 * (log_left - LN_SQRT_2PI))
        guess_left = torch.where(v > inv.left_poly_limit, tail, guess_left)
    elif inv.left_tail == "silu":  # y ~ x e^x: the asymptotic expansion of Lambert W_-1
        log_log = torch.log(log_left)
        tail = -log_left - log_log - log_log / log_left
        guess_left = torch.where(v > inv.left_poly_limit, tail, guess_left)

    x = torch.where(right, guess_right, guess_left)
    target = torch.where(right, y_right, y_left)
    lo = torch.where(right, inv.x_min, inv.x_left)
    hi = torch.where(right, Y_SATURATE + 1.0, inv.x_min)
    for _ in range(NEWTON_STEPS):
        f, df = activation_and_derivative(x, kind, approximate)
        residual = torch.where(right, f - target, f * torch.log(f / target))
        x = x - residual / df
        x = torch.where(x < lo, lo, x)
        x = torch.where(x > hi, hi, x)
    _, far = activation_and_derivative(x, kind, approximate)

    out = torch.where(r <= NEAR_RADIUS, near, far)
    return torch.where(~right & (y > inv.y_left), 0.0, out)  # left, y ~ 0-: x -> -inf, f' -> 0


def backward_reference(
    grad: torch.Tensor, y: torch.Tensor, flag: torch.Tensor, kind: str, approximate: str = "none"
) -> torch.Tensor:
    """``dx = grad * f'(x(y, flag))``, multiplied in fp32 and returned in grad's dtype."""
    right = unpack_bits(flag, grad.numel()).view(grad.shape)
    return (grad.float() * derivative_from_output(y, right, kind, approximate)).to(grad.dtype)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


def _use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """Triton on CUDA for the dtypes it has kernels for; ``impl="auto"`` falls back otherwise."""
    if not use_triton(tensors[0], impl, TRITON_MODULE):
        return False
    return impl == "triton" or all(t.dtype in TRITON_DTYPES for t in tensors)


def _check_backward_args(grad: torch.Tensor, y: torch.Tensor, flag: torch.Tensor) -> None:
    if y.shape != grad.shape:
        raise ValueError(f"y has shape {tuple(y.shape)} but grad has {tuple(grad.shape)}")
    expected = packed_numel(grad.numel())
    if flag.dtype != torch.uint8 or flag.numel() != expected:
        raise ValueError(f"flag must be uint8 with {expected} elements (8 flags per byte for "
                         f"{grad.numel()} elements), got {flag.dtype} with {flag.numel()}")


@torch.library.custom_op("fxshear::act_from_output", mutates_args=())
def act_from_output(
    x: torch.Tensor, kind: str, approximate: str, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact activation plus its packed 1-bit branch flags (``x >= x_min``)."""
    check_args(kind, approximate)
    if _use_triton(impl, x):
        from .act_from_output_triton import act_from_output_forward_triton

        return act_from_output_forward_triton(x, kind, approximate)
    y = torch.empty_like(x)
    y.copy_(activation_reference(x, kind, approximate))
    return y, pack_bits(right_branch(x, kind, approximate))


@act_from_output.register_fake
def _act_from_output_fake(
    x: torch.Tensor, kind: str, approximate: str, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty((packed_numel(x.numel()),), dtype=torch.uint8)


@torch.library.custom_op("fxshear::act_from_output_backward", mutates_args=())
def act_from_output_backward(
    grad: torch.Tensor, y: torch.Tensor, flag: torch.Tensor, kind: str, approximate: str, impl: str
) -> torch.Tensor:
    """``grad * f'(x)`` with x recovered from the saved output ``y`` and its branch ``flag``."""
    check_args(kind, approximate)
    _check_backward_args(grad, y, flag)
    if _use_triton(impl, grad, y):
        from .act_from_output_triton import act_from_output_backward_triton

        return act_from_output_backward_triton(grad, y, flag, kind, approximate)
    out = torch.empty_like(grad)
    out.copy_(backward_reference(grad, y, flag, kind, approximate))
    return out


@act_from_output_backward.register_fake
def _act_from_output_backward_fake(
    grad: torch.Tensor, y: torch.Tensor, flag: torch.Tensor, kind: str, approximate: str, impl: str
) -> torch.Tensor:
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library signature
    _, kind, approximate, impl = inputs
    y, flag = output
    ctx.save_for_backward(y, flag)  # the OUTPUT: the next Linear saves it anyway
    ctx.kind = kind
    ctx.approximate = approximate
    ctx.impl = impl
    ctx.mark_non_differentiable(flag)


def _backward(ctx, grad_y: torch.Tensor, grad_flag: torch.Tensor | None):  # noqa: ANN001, ANN202
    y, flag = ctx.saved_tensors
    return act_from_output_backward(grad_y, y, flag, ctx.kind, ctx.approximate, ctx.impl), None, None, None


act_from_output.register_autograd(_backward, setup_context=_setup_context)


def gelu_from_output(x: torch.Tensor, approximate: str = "none", impl: str = "auto") -> torch.Tensor:
    """GELU whose backward keeps only its output (saved by the next Linear) and 1 bit per element."""
    return act_from_output(x, "gelu", approximate, impl)[0]


def silu_from_output(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """SiLU whose backward keeps only its output (saved by the next Linear) and 1 bit per element."""
    return act_from_output(x, "silu", "none", impl)[0]


# ----------------------------------------------------------------------------------------------
# Inductor CPU lowering (see ``lowering``): after partitioning, CPU calls become the aten math
# above, so Inductor's C++ backend fuses them with their neighbours.
# ----------------------------------------------------------------------------------------------


@register_cpu_lowering(torch.ops.fxshear.act_from_output.default)
def lower_forward(
    x: torch.Tensor, kind: str, approximate: str, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_reference(x, kind, approximate)


@register_cpu_lowering(torch.ops.fxshear.act_from_output_backward.default)
def lower_backward(
    grad: torch.Tensor, y: torch.Tensor, flag: torch.Tensor, kind: str, approximate: str, impl: str
) -> torch.Tensor:
    return backward_reference(grad, y, flag, kind, approximate)
