"""Constants and storage format of ``fxshear::act_from_output``, shared by the op and its Triton twin.

Why a module of its own: the Triton kernels must agree with the op on every constant (the
inversion's polynomials, Newton steps, the flag bit layout) without importing the op module,
which registers the op and its CPU lowering.  The derivation is in the op module's docstring
(:mod:`fxshear.kernels.act_from_output`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from ..options import ACTIVATION_KINDS, GELU_APPROXIMATIONS, check_activation  # noqa: F401  (re-exported)
from .infra.numbers import FLOAT_DTYPES
from .infra.numbers import fp32 as _f32
from .infra.bits import BITS_PER_BYTE, packed_numel  # noqa: F401  (the flag format, re-exported)

KINDS = ACTIVATION_KINDS
FLAGS_PER_BYTE = BITS_PER_BYTE
TRITON_MODULE = "act_from_output_triton"
TRITON_DTYPES = FLOAT_DTYPES

# Dtypes whose largest recovered-derivative error is <= 4x eager PyTorch's own (module docstring).
EXACT_DTYPES: frozenset[torch.dtype] = frozenset({torch.bfloat16})
EXACT_RATIO = 4.0

NEWTON_STEPS = 3
NEAR_RADIUS = 0.12  # |rho| below which the derivative is the near-minimum polynomial
Y_SATURATE = 30.0  # right branch: x = y and f'(x) = 1 in fp32 beyond this

SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
LN_SQRT_2PI = 0.9189385332046727
TANH_SCALE2 = 1.5957691216057308  # 2 * sqrt(2 / pi): tanh(u) = 2 sigmoid(2u) - 1
TANH_CUBIC = 0.044715
# Numerical Recipes (2nd ed., 6.2) erfcc: erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0.
ERFC_POLY = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
             0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)



@dataclass(frozen=True)
class Inversion:
    """Constants of one activation's inverse (fitted by ``benchmarks/act_inversion_error.py --fit``).

    Polynomials are coefficient tuples, lowest degree first.
    """

    x_min: float  # argmin f
    y_min: float  # f(x_min)
    log_y_min: float  # -ln(-y_min)
    x_left: float  # left branch is clamped here; |f'(x_left)| < 1e-9
    y_left: float  # f(x_left)
    right_guess_limit: float  # right guess: x_min + P(r) below this y, x = y above
    left_poly_limit: float  # left guess: polynomial in v up to here, asymptotic tail beyond
    left_tail: str  # "gelu" | "silu" | "none": which asymptotic inverse the far left tail uses
    near: tuple[float, ...]  # f'(x) = rho * near(rho)
    right_guess: tuple[float, ...]  # x - x_min ~ right_guess(r)
    left_guess: tuple[float, ...]  # x ~ left_guess(v), v = sqrt(-ln(-y) - log_y_min)

    def fp32(self) -> Inversion:
        """Every number rounded to fp32 once, so torch, Triton and the lowering use equal constants."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float):
                values[field.name] = _f32(value)
            elif isinstance(value, tuple):
                values[field.name] = tuple(_f32(v) for v in value)
        return replace(self, **values)


_GELU = Inversion(
    x_min=-0.7517915246935645,
    y_min=-0.16997120747990366,
    log_y_min=1.7721262240414875,
    x_left=-7.0,
    y_left=-8.958687807200846e-12,
    right_guess_limit=2.5,
    left_poly_limit=2.68359477219753,
    left_tail="gelu",
    near=(0.9289714792412639, 1.1998157512890397, -1.4921441802041935, 0.8941957014529517,
          -1.081947343245224, 1.561446662670095, -2.759251147484533, 4.823227212471932),
    right_guess=(0.007217163028512719, 2.040071664458087, -0.769234890158375, 0.5323190141970537,
                 -0.10359415100365145, 0.03407185506316523),
    left_guess=(-0.7521002450750154, -0.8847164301923456, -0.24664269445246434, 0.07618458756911359,
                -0.014511942792814555, 0.0014333997210278936, -4.4607783759167885e-05),
)
_GELU_TANH = Inversion(
    x_min=-0.7524614220710163,
    y_min=-0.17004075057125406,
    log_y_min=1.7717171614148746,
    x_left=-6.0,
    y_left=-8.439646700762297e-11,
    right_guess_limit=2.5,
    left_poly_limit=4.628582765154705,
    left_tail="none",
    near=(0.9277931922834597, 1.2004905412663078, -1.4777569092312925, 0.8509210022963009,
          -1.0222448496040077, 1.508914437441756, -2.7564781133246594, 4.933774437553765),
    right_guess=(0.007072264093402447, 2.044799143307691, -0.7823389295660297, 0.5495106580032441,
                 -0.11346549813291812, 0.03603923787555601),
    left_guess=(-0.7517084193325418, -0.8946605874331816, -0.22207885198716995, 0.04134252357641346,
                0.011163645385249353, -0.005467273420834414, 0.000818565249754963,
                -4.410177365842111e-05),
)
_SILU = Inversion(
    x_min=-1.2784645427610737,
    y_min=-0.2784645427610738,
    log_y_min=1.2784645427610737,
    x_left=-30.0,
    y_left=-2.8072868906517896e-12,
    right_guess_limit=6.0,
    left_poly_limit=1.1633533530431952,
    left_tail="silu",
    near=(0.6600177358477927, 0.8977099214334271, -0.6744941632138121, -0.022342745412412008,
          0.0585799321830859, 0.01824052303363416, -0.03867521868034398, 0.0629918727416162),
    right_guess=(0.007257096427482068, 2.9191362552406934, -1.4596645829186636, 1.1603997935277186,
                 -0.5012915589576997, 0.16433029723172998, -0.022590418092849417),
    left_guess=(-1.2785155279303635, -1.5982828211557774, -0.5783075211653947, -0.012950954167294863,
                -0.04508222822115659, 0.010631827790437243, 0.0003513926942040047),
)

# float64 constants (what the fit produced) and their fp32 roundings (what the kernels use)
INVERSIONS_F64: dict[tuple[str, str], Inversion] = {
    ("gelu", "none"): _GELU, ("gelu", "tanh"): _GELU_TANH, ("silu", "none"): _SILU,
}
INVERSIONS: dict[tuple[str, str], Inversion] = {key: inv.fp32() for key, inv in INVERSIONS_F64.items()}


check_args = check_activation


def inversion(kind: str, approximate: str) -> Inversion:
    """The fp32 constants of ``kind``'s inverse."""
    check_args(kind, approximate)
    return INVERSIONS[(kind, approximate)]


def bucket_half_width(dtype: torch.dtype, y_min: float) -> float:
    """Half an ulp of ``dtype`` in the binade of ``y_min``: how far a stored y near the minimum
    can be from the f(x) it was rounded from.  Constant over the near region (see the tests)."""
    return 0.5 * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(y_min)))
