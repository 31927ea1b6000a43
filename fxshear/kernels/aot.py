"""Compile every Triton kernel for real GPUs on a machine without one.

The interpreter tests (``TRITON_INTERPRET=1``) check the kernels' numbers, but the interpreter
forgives what a GPU compile does not: a tile too big for registers, a constexpr branch the
interpreter never lowers, a dtype a dot does not take.  This module finds out without a GPU:

1. :func:`record_launches` runs the real host code (the ``*_triton`` launchers) on ``meta``
   tensors of production sizes, so the launch configurations are the ones the dispatch would
   choose, and records each ``kernel[grid](...)`` instead of launching it;
2. :func:`compile_launch` hands a recorded launch to ``triton.compile`` for a ``GPUTarget``
   (sm_80, sm_90), specialised the way Triton's JIT specialises (pointers and multiples of 16
   marked divisible by 16, integers equal to 1 made constant), and reads the registers, shared
   memory and local (spill) bytes of the cubin with the bundled ``cuobjdump``.

``python -m fxshear.kernels.aot --out DIR`` writes ``aot_compile.json`` and ``aot_compile.md``
and exits non-zero on a compile error, a spill or too much shared memory; ``tests/test_aot_compile.py`` runs it in
``make test``.  The kernels must be imported with ``TRITON_INTERPRET`` unset (the interpreter
replaces them with objects ``triton.compile`` cannot take), which is why the test uses a fresh
process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """The sizes a model gives the kernels: MiniLM (the repo's real model), ViT-Base (head dim
    64) and one 8B-LLaMA layer for the large end (hidden 4096, intermediate 14336, head dim
    128, vocabulary 128256)."""

    label: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    seq: int
    vocab: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


MINILM = ModelSizes("minilm", 384, 1536, 12, 12, 32, 16, 128, 2)
VIT_BASE = ModelSizes("vit-base", 768, 3072, 12, 12, 64, 8, 197, 1000)
LLAMA_8B = ModelSizes("llama-8b", 4096, 14336, 32, 8, 128, 1, 1024, 128256)
PRODUCTION_SIZES = (MINILM, VIT_BASE, LLAMA_8B)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Compute capabilities compiled for: Ampere (A100) and Hopper (H100/H200).
DEFAULT_ARCHS = (80, 90)
#: The most dynamic shared memory one block may ask for (opt-in): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One distinct kernel launch configuration, as Triton's JIT would specialise it."""

    kernel: str  # module:function
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type or "constexpr")
    constexprs: tuple[tuple[str, Any], ...]
    divisible: tuple[int, ...]  # argument positions marked divisible by 16
    num_warps: int
    num_stages: int
    case: str  # the first production case that made it
    ones: tuple[str, ...] = ()  # integer arguments equal to 1, made constant as the JIT does

    def key(self) -> tuple:
        return (self.kernel, self.signature, self.constexprs, self.divisible, self.num_warps, self.num_stages)

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel.split(':')[1]}[{consts}; warps={self.num_warps}]"


def _triton_type(value: Any) -> str:
    """The JIT's type string for a runtime argument (``*fp32``, ``i32``, ``fp32``, ...)."""
    from triton.runtime.jit import mangle_type

    if isinstance(value, torch.Tensor):
        return "*" + mangle_type(torch.empty(0, dtype=value.dtype))[1:]
    return mangle_type(value)


def _arguments(fn: Any, args: tuple, kwargs: dict) -> tuple[list[tuple[str, str]], dict[str, Any], list[int],
                                                             list[str]]:
    """Bind a launch's arguments to the kernel's parameters and specialise them like the JIT:
    constexprs by value, integers equal to 1 as constants, pointers and multiples of 16 as
    divisible by 16 (torch allocations are 16-byte aligned)."""
    import inspect

    params = list(inspect.signature(fn.fn).parameters.values())
    bound: dict[str, Any] = {}
    for param, value in zip(params, args):
        bound[param.name] = value
    for param in params[len(args):]:
        if param.name in kwargs:
            bound[param.name] = kwargs[param.name]
        elif param.default is not inspect.Parameter.empty:
            bound[param.name] = param.default
        else:
            raise TypeError(f"{fn.fn.__name__}: no value for {param.name}")
    signature: list[tuple[str, str]] = []
    constexprs: dict[str, Any] = {}
    divisible: list[int] = []
    ones: list[str] = []
    skip_specialise = set(getattr(fn, "do_not_specialize", ()) or ())
    for i, param in enumerate(params):
        value = bound[param.name]
        constant = "constexpr" in str(param.annotation) or value is None
        if not constant and isinstance(value, int) and not isinstance(value, bool) and value == 1 \
                and param.name not in skip_specialise and i not in skip_specialise:
            constant = True
            ones.append(param.name)
        if constant:
            signature.append((param.name, "constexpr"))
            constexprs[param.name] = value
            continue
        signature.append((param.name, _triton_type(value)))
        if isinstance(value, torch.Tensor) or (isinstance(value, int) and not isinstance(value, bool)
                                               and value % 16 == 0 and param.name not in skip_specialise):
            divisible.append(i)
    return signature, constexprs, divisible, ones


class _Recorder:
    def __init__(self) -> None:
        self.launches: dict[tuple, Launch] = {}
        self.case = ""

    def record(self, fn: Any, args: tuple, kwargs: dict) -> None:
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
        signature, constexprs, divisible, ones = _arguments(fn, args, kwargs)
        launch = Launch(
            kernel=f"{fn.fn.__module__}:{fn.fn.__name__}",
            signature=tuple(signature),
            constexprs=tuple(sorted(constexprs.items())),
            divisible=tuple(divisible),
            num_warps=int(options.get("num_warps", 4)),
            num_stages=int(options.get("num_stages", 3)),
            case=self.case,
            ones=tuple(ones),
        )
        self.launches.setdefault(launch.key(), launch)


@contextlib.contextmanager
def record_launches() -> Iterator[_Recorder]:
    """Record every ``kernel[grid](...)`` made inside, launching nothing."""
    from triton.runtime.jit import JITFunction

    recorder = _Recorder()
    original = JITFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        recorder.record(self, args, dict(kwargs))

    JITFunction.run = run  # type: ignore[method-assign]
    try:
        yield recorder
    finally:
        JITFunction.run = original  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
# The production cases: each calls the real launchers on meta tensors
# ---------------------------------------------------------------------------------------------


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _act2bit(m: ModelSizes, dtype: torch.dtype) -> None:
    from fxshear.kernels import act2bit_triton as k

    x = _meta(m.tokens, m.intermediate, dtype=dtype)
    for kind, approximate in (("gelu", "none"), ("gelu", "tanh"), ("silu", "none")):
        _, packed = k.act2bit_forward_triton(x, kind, approximate)
        k.act2bit_backward_triton(x, packed, kind)


def _act_from_output(m: ModelSizes, dtype: torch.dtype) -> None:
    from fxshear.kernels import act_from_output_triton as k

    x = _meta(m.tokens, m.intermediate, dtype=dtype)
    for kind, approximate in (("gelu", "none"), ("gelu", "tanh"), ("silu", "none")):
        y, flag = k.act_from_output_forward_triton(x, kind, approximate)
        k.act_from_output_backward_triton(x, y, flag, kind, approximate)


def _dropout_bits(m: ModelSizes, dtype: torch.dtype) -> None:
    from fxshear.kernels import dropout_bits_triton as k

    packed = k.pack_bits_triton(_meta(m.tokens, m.hidden, dtype=torch.bool))
    k.dropout_backward_triton(_meta(m.tokens, m.hidden, dtype=dtype), packed, 0.1)


def _norms(m: ModelSizes, dtype: torch.dtype) -> None:
    from fxshear.kernels import norms_triton as k

    x = _meta(m.tokens, m.hidden, dtype=dtype)
    for kind in ("layer", "rms"):
        z, rstd = k.normalize_forward_triton(x, kind, 1e-5)
        k.normalize_backward_triton(x, z, rstd, kind)


def _prune(m: ModelSizes, dtype: torch.dtype) -> None:
    from fxshear.kernels import prune_triton as k

    x = _meta(m.tokens, m.hidden, dtype=dtype)
    values, bits = k.prune_pack_triton(x, 0.5)
    k.pruned_weight_grad_triton(_meta(m.tokens, m.intermediate, dtype=dtype), values, bits, m.hidden)
    k.unprune_triton(values, bits, m.hidden)


def _attention(m: ModelSizes, dtype: torch.dtype) -> None:
    from fxshear.kernels import attention_triton as k

    q = _meta(m.batch, m.heads, m.seq, m.head_dim, dtype=dtype)
    scores = (m.batch, m.heads, m.seq, m.seq)
    masks = (None, _meta(m.batch, 1, 1, m.seq, dtype=dtype))
    for mask in masks:
        for dropout_p in (0.0, 0.1):
            bits = _meta((scores[0] * scores[1] * scores[2] * scores[3] + 7) // 8, dtype=torch.uint8) \
                if dropout_p else None
            out, lse = k.attention_forward_triton(q, q, q, mask, bits, m.head_dim ** -0.5, dropout_p)
            k.attention_backward_triton(out, q, q, q, mask, lse, bits, m.head_dim ** -0.5, dropout_p)


def _cross_entropy(m: ModelSizes, dtype: torch.dtype) -> None:
    from fxshear.kernels import linear_cross_entropy_triton as k

    rows = min(m.tokens, 1024)  # the op works in row chunks
    logits = _meta(rows, m.vocab, dtype=dtype)
    target = _meta(rows, dtype=torch.int64)
    row_loss = _meta(rows)
    for smoothing, weight, scale in ((0.0, None, _meta(1)), (0.1, _meta(m.vocab), _meta(rows))):
        for grad in (True, False):
            k.cross_entropy_chunk_triton(logits, target, row_loss, scale, -100, smoothing, grad, weight)


#: family -> the function that exercises its launchers for one model size and dtype.
FAMILIES: dict[str, Callable[[ModelSizes, torch.dtype], None]] = {
    "act2bit": _act2bit,
    "act_from_output": _act_from_output,
    "dropout_bits": _dropout_bits,
    "norms": _norms,
    "prune": _prune,
    "attention": _attention,
    "linear_cross_entropy": _cross_entropy,
}


def covering(launches: list[Launch]) -> list[Launch]:
    """One launch per kernel, block sizes, warps, data dtype and the other constexprs the host
    code chooses: the one with the most boolean features on (mask, dropout, smoothing, ...) and
    optional arguments given, whose code holds the others' and needs the most registers.  What ``make test`` compiles; ``--all`` compiles all."""
    groups: dict[tuple, Launch] = {}
    for launch in launches:
        first_pointer = next((t for _, t in launch.signature if t.startswith("*")), "")
        fixed = tuple((k, v) for k, v in launch.constexprs
                      if not isinstance(v, bool) and v is not None and k not in launch.ones)
        key = (launch.kernel, first_pointer, fixed, launch.num_warps, launch.num_stages)
        best = groups.get(key)
        if best is None or _features_on(launch) > _features_on(best):
            groups[key] = launch
    return list(groups.values())


def _features_on(launch: Launch) -> tuple[int, int]:
    """(boolean constexprs that are True, runtime arguments given): compared in that order."""
    flags_on = sum(v is True for _, v in launch.constexprs)
    return flags_on, sum(1 for _, t in launch.signature if t != "constexpr")


def production_launches(families: tuple[str, ...] | None = None) -> list[Launch]:
    """Every distinct launch the launchers make at the production sizes, dtypes fp32/fp16/bf16."""
    from triton.runtime.jit import JITFunction

    from fxshear.kernels import act2bit_triton

    if not isinstance(act2bit_triton._act2bit_forward_kernel, JITFunction):
        raise RuntimeError("the Triton kernels were imported under TRITON_INTERPRET=1; "
                           "run the ahead-of-time compile in a process without it")
    with record_launches() as recorder:
        for family, exercise in FAMILIES.items():
            if families and family not in families:
                continue
            for sizes in PRODUCTION_SIZES:
                for dtype in DTYPES:
                    recorder.case = f"{family} {sizes.label} {str(dtype).removeprefix('torch.')}"
                    exercise(sizes, dtype)
    return list(recorder.launches.values())


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompileResult:
    launch: Launch
    arch: int
    seconds: float
    registers: int | None = None
    shared_bytes: int | None = None
    local_bytes: int | None = None  # spills (and any stack) live in local memory
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.local_bytes)

    @property
    def over_shared(self) -> bool:
        limit = SHARED_LIMIT.get(self.arch)
        return limit is not None and (self.shared_bytes or 0) > limit

    @property
    def ok(self) -> bool:
        return self.error is None and not self.spills and not self.over_shared

    def problem(self) -> str:
        if self.error:
            return self.error
        if self.spills:
            return f"{self.local_bytes} bytes of local memory (spills)"
        return f"{self.shared_bytes} bytes of shared memory, over sm_{self.arch}'s {SHARED_LIMIT[self.arch]}"


_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, static shared bytes, local + stack bytes) of the one kernel in a cubin."""
    import triton.backends.nvidia as nvidia

    cuobjdump = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = _RESOURCES.search(out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    regs, stack, shared, local = map(int, found.groups())
    return regs, shared, local + stack


def _kernel(launch: Launch) -> Any:
    import importlib

    module, name = launch.kernel.split(":")
    return getattr(importlib.import_module(module), name)


def compile_launch(launch: Launch, arch: int) -> CompileResult:
    """``triton.compile`` one recorded launch for ``sm_<arch>``; errors are returned, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        source = ASTSource(
            fn=_kernel(launch),
            signature=dict(launch.signature),
            constexprs=dict(launch.constexprs),
            attrs={(i,): [["tt.divisibility", 16]] for i in launch.divisible},
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        regs, _static_shared, local = _resource_usage(compiled.asm["cubin"])
        # the shared memory a launch asks for is the compiler's dynamic allocation
        shared = int(getattr(compiled.metadata, "shared", 0) or 0)
        return CompileResult(launch, arch, time.perf_counter() - start, regs, shared, local)
    except Exception as error:  # noqa: BLE001 - a compile error is the finding, reported per launch
        message = f"{type(error).__name__}: {error}".strip().splitlines()
        return CompileResult(launch, arch, time.perf_counter() - start, error=" ".join(message)[:500])


def _compile_star(job: tuple[Launch, int]) -> CompileResult:
    return compile_launch(*job)


def compile_all(launches: list[Launch], archs: tuple[int, ...], jobs: int) -> list[CompileResult]:
    work = [(launch, arch) for launch in launches for arch in archs]
    if jobs <= 1:
        return [compile_launch(*job) for job in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_star, work, chunksize=1))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _row(r: CompileResult) -> dict[str, Any]:
    return {
        "kernel": r.launch.kernel, "constexprs": {k: v for k, v in r.launch.constexprs},
        "signature": {k: v for k, v in r.launch.signature}, "num_warps": r.launch.num_warps,
        "num_stages": r.launch.num_stages, "first_case": r.launch.case, "arch": f"sm_{r.arch}",
        "registers": r.registers, "shared_bytes": r.shared_bytes, "local_bytes": r.local_bytes,
        "seconds": round(r.seconds, 3), "error": r.error,
    }


def _short_consts(launch: Launch) -> str:
    return " ".join(f"{k}={v}" for k, v in launch.constexprs if v is not None)


def write_report(results: list[CompileResult], out: Path, environment: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment, "results": [_row(r) for r in results]}
    (out / "aot_compile.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    failed = [r for r in results if not r.ok]
    lines = [
        "# Triton kernels compiled ahead of time for GPUs (no GPU used)",
        "",
        "Every launch configuration the launchers choose at production sizes (MiniLM, ViT-Base, an",
        "8B-LLaMA slice; fp32/fp16/bf16; masks and dropout on and off), compiled with",
        "`triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))`; registers, shared",
        "memory (the dynamic allocation a launch asks for) and local bytes (spills) read from each",
        "cubin with the bundled `cuobjdump`. Written by `make aot-compile` (`python -m",
        "fxshear.kernels.aot --all --fresh-cache`: seconds are cold compiles);",
        "`tests/test_aot_compile.py` fails on an error, a spill or shared memory over the limit",
        f"({', '.join(f'sm_{a}: {v} B' for a, v in SHARED_LIMIT.items())}).",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in environment.items()),
        "",
        f"{len(results)} compiles, {len(failed)} failed or spilled.",
        "",
        "| kernel | constexprs | dtypes | warps | arch | registers | shared B | spill B | s |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(results, key=lambda r: (r.launch.kernel, _short_consts(r.launch), r.launch.case, r.arch)):
        pointer_types = sorted({t[1:] for _, t in r.launch.signature if t.startswith("*")})
        name = r.launch.kernel.split(":")[1]
        if r.error:
            cells = ["error", "", "", ""]
        else:
            cells = [str(r.registers), str(r.shared_bytes), str(r.local_bytes)]
            cells.append(f"{r.seconds:.1f}")
        lines.append(f"| `{name}` | {_short_consts(r.launch)} | {'/'.join(pointer_types)} | "
                     f"{r.launch.num_warps} | sm_{r.arch} | " + " | ".join(cells[:4]) + " |")
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r.launch.describe()}` sm_{r.arch} ({r.launch.case}): {r.problem()}" for r in failed]
    (out / "aot_compile.md").write_text("\n".join(lines) + "\n")


def environment() -> dict[str, str]:
    import platform

    import triton

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "commit": commit, "machine": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for aot_compile.json/.md")
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default 80 and 90)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="compile into an empty Triton cache, so the seconds column is real compile time")
    parser.add_argument("--all", action="store_true",
                        help="every recorded launch, not only the covering set (see covering())")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    # Triton's own default (fused multiply-adds on), said out loud so Triton 3.9 does not warn.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.fresh_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxshear-aot-")
    recorded = production_launches(tuple(args.family or ()))
    launches = recorded if args.all else covering(recorded)
    start = time.perf_counter()
    results = compile_all(launches, tuple(args.arch or DEFAULT_ARCHS), args.jobs)
    write_report(results, args.out, environment())
    failed = [r for r in results if not r.ok]
    print(f"{len(launches)} of {len(recorded)} launch configurations, {len(results)} compiles in "
          f"{time.perf_counter() - start:.0f} s, {len(failed)} failed or spilled; report in {args.out}")
    for r in failed:
        print(f"  FAILED {r.launch.describe()} sm_{r.arch} ({r.launch.case}): {r.problem()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
