"""How exact is a GELU/SiLU derivative recovered from the stored output (``fxshear::act_from_output``)?

    python benchmarks/act_inversion_error.py [--out DIR] [--fit]

For each dtype (bf16, fp16, fp32) and function (GELU erf, GELU tanh, SiLU) this measures, against
the float64 derivative f'(x) at the true x, the largest absolute error of

* ``inversion``: dx from ``act_from_output_backward(1, y, flag)`` (the torch path, fp32 math,
  rounded to the dtype), with ``(y, flag) = act_from_output(x)``;
* ``eager``: PyTorch's own ``gelu_backward`` / ``silu_backward`` in that dtype, i.e. what a
  training step computes today;
* ``floor``: half the spread of f'(x) over the x values that share one (y, flag).  No backward
  that sees only (y, flag) can have a smaller max error.  Exhaustive for bf16/fp16; for fp32 it is
  a lower bound over the sweep (the near-minimum block covers every consecutive fp32 value, so the
  groups that set it are complete).

Inputs: every finite bf16 and fp16 value; in fp32 a sweep of every 2048th bit pattern (all
magnitudes), 2M points on [-12, 12] and every consecutive fp32 value within 2^20 ulps of x_min.

Policy rule: a dtype is "exact" for a function when ``inversion <= 4 x eager`` (eager's own error
is half an ulp of f' near 1, so this is 2 ulp); the dtype is in ``EXACT_DTYPES`` when it is exact
for all three functions.  The script prints whether the measured set equals the constant.

``--fit`` recomputes the constants of ``fxshear.kernels.act_from_output.INVERSIONS_F64`` with
mpmath (about a minute) and prints them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxshear.kernels.act_from_output import (  # noqa: E402
    EXACT_DTYPES,
    EXACT_RATIO,
    INVERSIONS,
    INV_SQRT_2PI,
    SQRT_HALF,
    activation_and_derivative,
    act_from_output,
    act_from_output_backward,
)

FUNCTIONS = (("gelu", "none"), ("gelu", "tanh"), ("silu", "none"))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
AWAY = 0.25  # "away from the minimum": |x - x_min| >= AWAY
RESULTS = Path(__file__).resolve().parent / "results"


def function_name(kind: str, approximate: str) -> str:
    return kind if approximate == "none" else f"{kind} {approximate}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def true_derivative(x: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    """f'(x) in float64 (erfc for GELU's CDF; exp-only closed forms otherwise)."""
    x = x.double()
    if kind == "gelu" and approximate == "none":
        return 0.5 * torch.special.erfc(-x * SQRT_HALF) + x * torch.exp(-0.5 * x * x) * INV_SQRT_2PI
    return activation_and_derivative(x, kind, approximate)[1]


def eager_derivative(x: torch.Tensor, kind: str, approximate: str) -> torch.Tensor:
    """What eager autograd computes with grad = 1, in x's dtype."""
    ones = torch.ones_like(x)
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(ones, x, approximate=approximate)
    return torch.ops.aten.silu_backward(ones, x)


def all_finite(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x)]


def fp32_sweep(x_min: float, scale: int = 1) -> torch.Tensor:
    """Every (2048 * scale)-th fp32 bit pattern, a dense grid on [-12, 12] and every fp32 value
    within 2^20 / scale ulps of x_min."""
    stride = 2048 * scale
    bits = torch.arange(0, 2**32, stride, dtype=torch.int64)
    patterns = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    patterns = patterns[torch.isfinite(patterns)]
    grid = torch.linspace(-12.0, 12.0, 2_000_001 // scale, dtype=torch.float32)
    center = torch.tensor(x_min, dtype=torch.float32).view(torch.int32).item()
    half = 2**20 // scale
    block = (center + torch.arange(-half, half + 1, dtype=torch.int32)).view(torch.float32)
    return torch.cat([patterns, grid, block])


def inputs(dtype: torch.dtype, kind: str, approximate: str, scale: int = 1) -> torch.Tensor:
    if dtype == torch.float32:
        return fp32_sweep(INVERSIONS[(kind, approximate)].x_min, scale)
    return all_finite(dtype)


def floor_error(y: torch.Tensor, flag_bits: torch.Tensor, truth: torch.Tensor) -> float:
    """Half the largest spread of ``truth`` within one (y bit pattern, flag) group."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[y.dtype]
    key = y.view(bits).long() * 2 + flag_bits.long()
    _, group = torch.unique(key, return_inverse=True)
    count = int(group.max()) + 1
    high = torch.full((count,), -torch.inf, dtype=torch.float64).scatter_reduce(0, group, truth, "amax")
    low = torch.full((count,), torch.inf, dtype=torch.float64).scatter_reduce(0, group, truth, "amin")
    return float(((high - low) / 2).max())


@dataclass
class Measurement:
    dtype: str
    function: str
    points: int
    inversion_max: float
    inversion_max_at_x: float
    eager_max: float
    eager_max_at_x: float
    eager_nonfinite: int  # finite x where eager's derivative is NaN/inf (eager NaNs at huge |x|)
    inversion_nonfinite: int
    floor: float
    inversion_away_max: float  # |x - x_min| >= AWAY
    eager_away_max: float
    ratio: float  # inversion_max / eager_max
    exact: bool


def measure(dtype: torch.dtype, kind: str, approximate: str, scale: int = 1) -> Measurement:
    """The errors of one (dtype, function); ``scale`` > 1 thins the fp32 sweep (for tests)."""
    x = inputs(dtype, kind, approximate, scale)
    truth = true_derivative(x, kind, approximate)
    y, flag = act_from_output(x, kind, approximate, "torch")
    ours = act_from_output_backward(torch.ones_like(x), y, flag, kind, approximate, "torch").double()
    eager = eager_derivative(x, kind, approximate).double()

    ours_err = (ours - truth).abs()
    eager_ok = torch.isfinite(eager)
    eager_err = torch.where(eager_ok, (eager - truth).abs(), 0.0)
    away = (x.double() - INVERSIONS[(kind, approximate)].x_min).abs() >= AWAY
    i, j = int(ours_err.argmax()), int(eager_err.argmax())
    flag_bits = x.float() >= INVERSIONS[(kind, approximate)].x_min
    inversion_max, eager_max = float(ours_err.max()), float(eager_err.max())
    ratio = inversion_max / eager_max
    return Measurement(
        dtype=dtype_name(dtype),
        function=function_name(kind, approximate),
        points=x.numel(),
        inversion_max=inversion_max,
        inversion_max_at_x=float(x[i]),
        eager_max=eager_max,
        eager_max_at_x=float(x[j]),
        eager_nonfinite=int((~eager_ok).sum()),
        inversion_nonfinite=int((~torch.isfinite(ours)).sum()),
        floor=floor_error(y, flag_bits, truth),
        inversion_away_max=float(ours_err[away].max()),
        eager_away_max=float(eager_err[away].max()),
        ratio=ratio,
        exact=ratio <= EXACT_RATIO,
    )


def exact_dtypes(measurements: list[Measurement]) -> frozenset[torch.dtype]:
    """The dtypes exact for every function measured."""
    by_name = {dtype_name(d): d for d in DTYPES}
    names = {m.dtype for m in measurements}
    return frozenset(by_name[n] for n in names if all(m.exact for m in measurements if m.dtype == n))


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(
    measurements: list[Measurement], info: dict[str, str], measured: frozenset[torch.dtype], seconds: float
) -> str:
    lines = [
        "# GELU/SiLU derivative recovered from the stored output: error vs eager",
        "",
        f"Machine: {info['cpu']}, {info['platform']}, torch {info['torch']}, Python {info['python']}, "
        f"{info['threads']} torch thread(s); {info['date']}; {seconds:.0f} s.",
        "",
        "Reproduce: `python benchmarks/act_inversion_error.py`.  Largest |dx - f'(x)| with grad = 1, "
        "against float64 f'(x) at the true x.  bf16/fp16: every finite value; fp32: every 2048th bit "
        "pattern, 2M points on [-12, 12], every fp32 value within 2^20 ulps of x_min.",
        "",
        "* inversion: `act_from_output_backward` from `(y, flag) = act_from_output(x)` (torch path).",
        "* eager: PyTorch's `gelu_backward`/`silu_backward` in the dtype (finite results only; "
        "the NaN column counts finite x where eager returns NaN, e.g. tanh-GELU at |x| > 1e13).",
        "* floor: half the spread of f'(x) over x sharing one (y, flag): the best any backward from "
        "(y, flag) can do (fp32: a lower bound over the sweep).",
        f"* away: only |x - x_min| >= {AWAY}.  exact: inversion <= {EXACT_RATIO:g} x eager.",
        "",
        "| dtype | function | points | inversion max | at x | eager max | ratio | floor | inversion away "
        "| eager away | eager NaN | exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in measurements:
        lines.append(
            f"| {m.dtype} | {m.function} | {m.points} | {m.inversion_max:.3e} | {m.inversion_max_at_x:.6g} | "
            f"{m.eager_max:.3e} | {m.ratio:.2f} | {m.floor:.3e} | {m.inversion_away_max:.3e} | "
            f"{m.eager_away_max:.3e} | {m.eager_nonfinite} | {'yes' if m.exact else 'no'} |"
        )
    names = sorted(dtype_name(d) for d in measured)
    agree = measured == EXACT_DTYPES
    lines += [
        "",
        f"Measured exact dtypes: {{{', '.join(names)}}}; "
        f"`fxshear.kernels.act_from_output.EXACT_DTYPES` {'agrees' if agree else 'DISAGREES'}.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# --fit: the constants of INVERSIONS_F64
# ----------------------------------------------------------------------------------------------

FIT_SPEC = {  # right-guess limit, x_left, where the left polynomial stops, polynomial degrees
    ("gelu", "none"): dict(y1=2.5, x_left=-7.0, x_cut=-4.0, right_degree=5, left_degree=6),
    ("gelu", "tanh"): dict(y1=2.5, x_left=-6.0, x_cut=-6.0, right_degree=5, left_degree=7),
    ("silu", "none"): dict(y1=6.0, x_left=-30.0, x_cut=-4.0, right_degree=6, left_degree=6),
}


def fit_constants(near_radius: float = 0.12) -> dict[tuple[str, str], dict[str, object]]:
    """Refit every constant with 34-digit mpmath; least squares on Chebyshev nodes."""
    import mpmath as mp
    import numpy as np

    mp.mp.dps = 34
    c = mp.sqrt(2 / mp.pi)
    functions = {
        ("gelu", "none"): lambda x: x * mp.ncdf(x),
        ("gelu", "tanh"): lambda x: x / (1 + mp.exp(-2 * c * (x + mp.mpf("0.044715") * x**3))),
        ("silu", "none"): lambda x: x / (1 + mp.exp(-x)),
    }

    def nodes(a: float, b: float, n: int) -> np.ndarray:
        return np.cos(np.linspace(0, np.pi, n)) * (b - a) / 2 + (a + b) / 2

    out = {}
    for key, f in functions.items():
        spec = FIT_SPEC[key]
        df = lambda x, f=f: mp.diff(f, x)  # noqa: E731
        x_min = mp.findroot(df, -1.28 if key[0] == "silu" else -0.75)
        y_min = f(x_min)

        def solve(target, lo, hi, f=f):  # bisection: f is monotone on each branch
            lo, hi = mp.mpf(lo), mp.mpf(hi)
            increasing = f(hi) > f(lo)
            for _ in range(115):
                mid = (lo + hi) / 2
                if (f(mid) < target) == increasing:
                    lo = mid
                else:
                    hi = mid
            return (lo + hi) / 2

        rhos = nodes(-near_radius, near_radius, 401)
        slopes = []
        for rho in rhos:
            rho = mp.mpf(rho)
            if rho == 0:
                slopes.append(0.0)
                continue
            x = solve(y_min + rho**2, x_min, x_min + 1) if rho > 0 else solve(y_min + rho**2, x_min - 2, x_min)
            slopes.append(float(df(x)))
        powers = np.stack([rhos**k for k in range(1, 9)], 1)
        near = np.linalg.lstsq(powers, np.array(slopes), rcond=None)[0]

        rs = nodes(0.1, float(mp.sqrt(spec["y1"] - y_min)), 300)
        ts = [float(solve(y_min + mp.mpf(r) ** 2, x_min, spec["y1"] + 2) - x_min) for r in rs]
        right = np.polynomial.Polynomial.fit(rs, ts, spec["right_degree"]).convert().coef

        log_y_min = -mp.log(-y_min)
        v_lo = mp.sqrt(-mp.log(-(y_min + mp.mpf(0.01))) - log_y_min)
        v_hi = mp.sqrt(-mp.log(-f(mp.mpf(spec["x_cut"]))) - log_y_min)
        vs = nodes(float(v_lo), float(v_hi), 300)
        xs = [float(solve(-mp.exp(-(log_y_min + mp.mpf(v) ** 2)), spec["x_cut"] - 0.5, x_min)) for v in vs]
        left = np.polynomial.Polynomial.fit(vs, xs, spec["left_degree"]).convert().coef

        out[key] = dict(
            x_min=float(x_min), y_min=float(y_min), log_y_min=float(log_y_min), x_left=spec["x_left"],
            y_left=float(f(mp.mpf(spec["x_left"]))), right_guess_limit=spec["y1"], left_poly_limit=float(v_hi),
            near=tuple(float(v) for v in near), right_guess=tuple(float(v) for v in right),
            left_guess=tuple(float(v) for v in left),
            fit_error=dict(near=float(np.abs(powers @ near - slopes).max()),
                           right=float(np.abs(np.polynomial.Polynomial(right)(rs) - ts).max()),
                           left=float(np.abs(np.polynomial.Polynomial(left)(vs) - xs).max())),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the .json and .md results")
    parser.add_argument("--fit", action="store_true", help="refit and print the inversion constants instead")
    args = parser.parse_args(argv)

    if args.fit:
        for key, values in fit_constants().items():
            print(key)
            for name, value in values.items():
                print(f"    {name}={value!r},")
        return 0

    torch.set_num_threads(1)  # deterministic and unaffected by other jobs' spinning threads
    start = time.time()
    measurements = []
    for dtype in DTYPES:
        for kind, approximate in FUNCTIONS:
            m = measure(dtype, kind, approximate)
            measurements.append(m)
            print(f"{m.dtype:9s} {m.function:10s} inversion {m.inversion_max:.3e} (x={m.inversion_max_at_x:.6g})  "
                  f"eager {m.eager_max:.3e}  ratio {m.ratio:7.2f}  floor {m.floor:.3e}  "
                  f"away {m.inversion_away_max:.3e}/{m.eager_away_max:.3e}  exact {m.exact}", flush=True)
    seconds = time.time() - start
    measured = exact_dtypes(measurements)
    info = machine()

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "rule": f"exact when inversion_max <= {EXACT_RATIO:g} * eager_max, for every function",
        "measured_exact_dtypes": sorted(dtype_name(d) for d in measured),
        "EXACT_DTYPES": sorted(dtype_name(d) for d in EXACT_DTYPES),
        "seconds": round(seconds, 1),
        "measurements": [asdict(m) for m in measurements],
    }
    (args.out / "act_inversion_error.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "act_inversion_error.md").write_text(markdown(measurements, info, measured, seconds))
    print(f"measured exact dtypes {sorted(dtype_name(d) for d in measured)}; "
          f"EXACT_DTYPES {sorted(dtype_name(d) for d in EXACT_DTYPES)}; wrote {args.out}")
    return 0 if measured == EXACT_DTYPES else 1


if __name__ == "__main__":
    raise SystemExit(main())
