"""Build and load fxshear's small C kernels for CPU (``*.c`` beside this file) with ctypes.

Why: a few CPU kernels (the exact per-sample top-k pack of pruning) are sequential scans that
neither aten nor Inductor's generated loops express in few passes.  They are plain C with no
Python or torch headers, built on first use with the C compiler Inductor's CPU backend already
needs (``$CC``, else ``cc``/``gcc``/``clang``), with OpenMP when the compiler has it, and cached
by a hash of source, compiler and flags under ``$FXSHEAR_CACHE_DIR`` (default
``$XDG_CACHE_HOME/fxshear`` or ``~/.cache/fxshear``).

When no compiler works, or ``FXSHEAR_NATIVE=0``, :func:`load` returns ``None`` once with a logged
reason and callers use their torch reference: the results are the same, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ...log import log

_SOURCE_DIR = Path(__file__).resolve().parent.parent  # the op families' *.c files sit in kernels/
_BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11")
_OPENMP_FLAGS = ("-fopenmp",)


def enabled() -> bool:
    """False when the user turned native kernels off (``FXSHEAR_NATIVE=0``)."""
    return os.environ.get("FXSHEAR_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    explicit = os.environ.get("FXSHEAR_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxshear"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(source: Path, compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile ``source`` into ``target`` (atomically); returns the compiler's error, or None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(source), "-o", str(partial)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-2000:]
        os.replace(partial, target)  # concurrent builders race harmlessly: same bytes
    return None


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The shared library of ``<name>.c``, built if needed; None (logged once) when unavailable."""
    if not enabled():
        log.info("native CPU kernels off (FXSHEAR_NATIVE=0): %s uses its torch reference", name)
        return None
    if sys.platform == "win32":
        log.info("native CPU kernels are not built on Windows: %s uses its torch reference", name)
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found ($CC, cc, gcc, clang): %s uses its torch reference (slower)", name)
        return None
    source = _SOURCE_DIR / f"{name}.c"
    code = source.read_bytes()
    version = _compiler_version(compiler)
    errors = []
    for flags in (_BASE_FLAGS + _OPENMP_FLAGS, _BASE_FLAGS):
        digest = hashlib.sha256(code + compiler.encode() + version.encode() + " ".join(flags).encode()).hexdigest()
        target = cache_dir() / "native" / f"{name}-{digest[:16]}.so"
        try:
            if not target.exists():
                error = _build(source, compiler, flags, target)
                if error is not None:
                    errors.append(f"{' '.join(flags)}: {error}")
                    continue
            library = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {exc}")
            continue
        if flags[-1] not in _OPENMP_FLAGS:
            log.info("%s built without OpenMP (single-threaded): %s", name, errors[-1] if errors else "")
        return library
    log.warning("could not build native CPU kernels %s, using the torch reference (slower): %s",
                name, " | ".join(errors))
    return None


def bind(name: str, signatures: Mapping[str, tuple[list[type], type]]) -> ctypes.CDLL | None:
    """:func:`load`, with each function's ctypes ``(argtypes, restype)`` set once; None as load."""
    library = load(name)
    if library is not None and not getattr(library, "_fxshear_typed", False):
        for function, (argtypes, restype) in signatures.items():
            getattr(library, function).argtypes = argtypes
            getattr(library, function).restype = restype
        library._fxshear_typed = True
    return library
