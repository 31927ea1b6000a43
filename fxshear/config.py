"""ShearConfig: what fxshear may rewrite, validated when it is built.

Why validate eagerly: a typo in an option must fail when the user calls ``torch.compile`` or
``fxshear.backend(...)``, not silently leave a rewrite off (or fail deep inside a compile).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .options import (  # noqa: F401  (re-exported: fxshear.config.PRESETS and friends)
    ACT_FROM_OUTPUT_CHOICES,
    ACTIVATION_KINDS as ACT2BIT_KINDS,
    DROPOUT_RNG_CHOICES,
    KERNEL_CHOICES,
    ON_ERROR_CHOICES,
    PRESETS,
    PRUNE_OP_CHOICES,
)

DEFAULT_PRESET = "exact"  # most fine-tuning users will not accept approximate gradients
DEFAULT_PRUNE_OPS = ("linear",)
# Attention's saved tensors exist only where attention is not rebuilt in the backward.
ATTENTION_PRUNE_OPS = ("attention", "softmax")
# The reference work's opt-in targets that fxshear does not prune (a clear error, not a no-op).
UNBUILT_PRUNE_OPS = {"norm": "norm inputs; with share_norms (on in every preset but 'none') a "
                             "LayerNorm/RMSNorm keeps no input at all, only its output shared with the next Linears"}
# Heads are left dense by default, as in Back Razor: the classifier / LM head / pooler see few
# tokens or feed the loss directly, and their saved inputs are small.
DEFAULT_PRUNE_EXCLUDE = ("*classifier*", "*lm_head*", "*pooler*", "score", "*.score")


#: Each variant is a full compile of its region; more than this is a recompile storm.
MAX_FREEZE_VARIANTS = 64


class ConfigError(ValueError):
    """A bad fxshear option: names the field and the accepted values."""


@dataclass(frozen=True)
class ShearConfig:
    """Everything that decides how fxshear rewrites a graph.

    Fields:
        preset: the starting point the other fields override: "none" (plain Inductor, with
            fxshear's ledger), "exact", "balanced" or "aggressive".
        share_norms: LayerNorm/RMSNorm keep only their normalized output and rstd, and the
            Linears they feed compute their weight gradient from that same tensor (MS-LN). Exact.
        act_from_output: GELU/SiLU backward recovered from the saved output plus a 1-bit branch
            flag: "off", "exact_dtypes" (only dtypes whose inversion error is at the level of the
            dtype's rounding) or "all" (every float dtype; approximate near the minimum).
        dropout_bits: dropout keeps its mask at 1 bit per element. Exact.
        dropout_rng: "eager" (default; "fast" in "aggressive"): the masks eager PyTorch draws with
            the same seed, so runs reproduce eager exactly; "fast": any mask with keep probability
            1 - p, on CPU from a vectorized C Philox4x32-10 kernel seeded by torch's generator
            (~0.8 ns/element; eager's draw is a serial loop, ~11 ns/element, and Inductor's own
            rand ~3.5 ns/element, which is the fallback without a C compiler), elsewhere from the
            compiler's fused random numbers, like torch.compile's.
        attention_recompute: eager/math attention keeps q, k, v, the row log-sum-exp and a 1-bit
            dropout mask, and rebuilds the probabilities in backward. Exact.
        fused_loss: Linear(hidden -> vocab) + cross-entropy never keeps the logits. Exact.
        act2bit: GELU/SiLU keep a 2-bit code for backward (approximate; Approx-BP); applies to
            the activations ``act_from_output`` leaves alone.
        act2bit_ops: which activations ``act2bit`` rewrites.
        prune: the input a Linear saves for its weight gradient is pruned per sample to its
            largest ``keep_ratio`` entries (Back Razor; approximate weight gradients, exact input
            gradients).  Only where nothing else keeps that input dense.
        keep_ratio: fraction of each sample's entries kept, in (0, 1]; 1.0 is exact.
        keep_ratios: ``{module pattern: ratio}`` overrides of ``keep_ratio`` (fnmatch on the
            module path, first match wins).
        prune_ops: which saved tensors are pruned: "linear" (Linear inputs, the default),
            "attention" (the operands eager attention's matmuls keep) and "softmax" (its
            probabilities); the last two are approximate in the input gradients too and need
            ``attention_recompute=False`` (the exact rebuild keeps none of those tensors).
        prune_exclude: module patterns never pruned (default: classifier, LM head, pooler).
        memory_budget: PyTorch's ``activation_memory_budget`` for fxshear regions, in [0, 1];
            None leaves the partitioner's global setting alone.
        exclude: fnmatch patterns of module paths (e.g. ``"classifier*"``) no pass touches.
        freezing: regions honour per-step freezing (``fxshear.frozen``, ``@fxshear.train_step``):
            one compiled graph serves every freeze mask, its weight-gradient matmuls skipped at
            run time for frozen weights (which get no ``.grad``).
        freeze_variants: with ``freezing``, how many extra graphs per region may be compiled for
            the masks first seen (each drops its frozen gradients and what only they saved, so
            it saves less memory; each costs a full compile).  0: never (no recompiles at all).
        kernels: "auto" (Triton on CUDA when available; on CPU the native C kernels of pruning
            where they build, see ``fxshear/kernels/infra/native.py``; torch elsewhere), "torch" or "triton".
        on_error: "fallback" compiles the unmodified graph if fxshear fails; "raise" re-raises.
    """

    preset: str = DEFAULT_PRESET
    share_norms: bool = True
    act_from_output: str = "all"
    dropout_bits: bool = True
    dropout_rng: str = "eager"
    attention_recompute: bool = True
    fused_loss: bool = True
    act2bit: bool = True
    act2bit_ops: tuple[str, ...] = ACT2BIT_KINDS
    prune: bool = False
    keep_ratio: float = 0.1
    keep_ratios: tuple[tuple[str, float], ...] = ()
    prune_ops: tuple[str, ...] = DEFAULT_PRUNE_OPS
    prune_exclude: tuple[str, ...] = DEFAULT_PRUNE_EXCLUDE
    memory_budget: float | None = None
    exclude: tuple[str, ...] = ()
    freezing: bool = False
    freeze_variants: int = 0
    kernels: str = "auto"
    on_error: str = "fallback"

    def __post_init__(self) -> None:
        _check_choice("preset", self.preset, PRESETS)
        for name in ("share_norms", "dropout_bits", "attention_recompute", "fused_loss", "act2bit", "prune",
                     "freezing"):
            _check_bool(name, getattr(self, name))
        _check_ratio("keep_ratio", self.keep_ratio)
        for entry in self.keep_ratios:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]):
                raise ConfigError(f"keep_ratios must map module patterns to ratios, got entry {entry!r}")
            _check_ratio(f"keep_ratios[{entry[0]!r}]", entry[1])
        unbuilt = [op for op in self.prune_ops if op in UNBUILT_PRUNE_OPS]
        if unbuilt:
            raise ConfigError(
                f"prune_ops {unbuilt} (pruning {'; '.join(UNBUILT_PRUNE_OPS[o] for o in unbuilt)}) is not "
                f"built; the accepted values are {PRUNE_OP_CHOICES!r}"
            )
        _check_subset("prune_ops", self.prune_ops, PRUNE_OP_CHOICES)
        in_attention = [op for op in self.prune_ops if op in ATTENTION_PRUNE_OPS]
        if self.prune and in_attention and self.attention_recompute:
            raise ConfigError(
                f"prune_ops {in_attention} prune what eager attention saves for backward, but "
                "attention_recompute=True rebuilds attention in the backward and saves none of it; "
                "pass attention_recompute=False to prune those tensors instead"
            )
        if not all(isinstance(p, str) and p for p in self.prune_exclude):
            raise ConfigError(f"prune_exclude must be a sequence of non-empty strings, got {self.prune_exclude!r}")
        _check_choice("act_from_output", self.act_from_output, ACT_FROM_OUTPUT_CHOICES)
        _check_choice("dropout_rng", self.dropout_rng, DROPOUT_RNG_CHOICES)
        _check_subset("act2bit_ops", self.act2bit_ops, ACT2BIT_KINDS)
        if self.memory_budget is not None:
            if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, (int, float)):
                raise ConfigError(
                    f"memory_budget must be a number in [0, 1] or None, got {self.memory_budget!r}"
                )
            if not 0.0 <= float(self.memory_budget) <= 1.0:
                raise ConfigError(f"memory_budget must lie in [0, 1], got {self.memory_budget!r}")
        if not all(isinstance(p, str) and p for p in self.exclude):
            raise ConfigError(f"exclude must be a sequence of non-empty strings, got {self.exclude!r}")
        if (isinstance(self.freeze_variants, bool) or not isinstance(self.freeze_variants, int)
                or not 0 <= self.freeze_variants <= MAX_FREEZE_VARIANTS):
            raise ConfigError(f"freeze_variants must be an integer in [0, {MAX_FREEZE_VARIANTS}], "
                              f"got {self.freeze_variants!r}")
        if self.freeze_variants and not self.freezing:
            raise ConfigError("freeze_variants only applies with freezing=True")
        _check_choice("kernels", self.kernels, KERNEL_CHOICES)
        _check_choice("on_error", self.on_error, ON_ERROR_CHOICES)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **overrides: Any) -> ShearConfig:
        """Build from a preset plus overrides; unknown keys are an error with a suggestion."""
        merged = dict(options or {})
        merged.update(overrides)
        preset = merged.pop("preset", DEFAULT_PRESET)
        _check_choice("preset", preset, PRESETS)
        known = {f.name for f in dataclasses.fields(cls)} - {"preset"}
        for key in merged:
            if key not in known:
                misplaced = _misplaced_option(key, merged[key])
                if misplaced:
                    raise ConfigError(misplaced)
                hint = difflib.get_close_matches(key, sorted(known | {"preset"}), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(
                    f"unknown fxshear option {key!r}{suggestion} Accepted options: "
                    f"preset, {', '.join(sorted(known))}"
                )
        values = {**PRESET_FIELDS[preset], **merged}
        for name in ("act2bit_ops", "exclude", "prune_ops", "prune_exclude"):
            if name in values:
                values[name] = _as_tuple(name, values[name])
        if "keep_ratios" in values:
            values["keep_ratios"] = _as_pairs("keep_ratios", values["keep_ratios"])
        return cls(preset=preset, **values)

    def to_json(self) -> str:
        """Stable text form, part of every cache key fxshear contributes."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def exact(self) -> bool:
        """True when every enabled rewrite keeps gradients equal to eager."""
        return (not self.act2bit and self.act_from_output != "all"
                and not (self.prune and self.keep_ratio_range()[0] < 1.0))

    def keep_ratio_range(self) -> tuple[float, float]:
        """Smallest and largest keep ratio any module may get."""
        ratios = [self.keep_ratio, *(ratio for _, ratio in self.keep_ratios)]
        return min(ratios), max(ratios)

    def keep_ratio_for(self, module_path: str) -> float:
        """The keep ratio of a module: the first matching ``keep_ratios`` pattern, else the global."""
        for pattern, ratio in self.keep_ratios:
            if fnmatch.fnmatchcase(module_path, pattern):
                return float(ratio)
        return float(self.keep_ratio)


_EXACT_REWRITES: dict[str, Any] = {
    "share_norms": True, "dropout_bits": True, "attention_recompute": True, "fused_loss": True,
}
PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "none": {**{k: False for k in _EXACT_REWRITES}, "act_from_output": "off", "act2bit": False},
    "exact": {**_EXACT_REWRITES, "act_from_output": "exact_dtypes", "act2bit": False},
    "balanced": {**_EXACT_REWRITES, "act_from_output": "all", "act2bit": True},
    # 2-bit codes rather than output + flag for GELU/SiLU: the activation's output is then kept
    # only for the next Linear's weight gradient, so pruning it frees it.  Dropout masks come from
    # the compiler's fused RNG: users of an approximate preset trade reproducing eager's exact
    # random stream for speed (on CPU eager's draw is a serial loop, ~13% of a MiniLM step).
    "aggressive": {**_EXACT_REWRITES, "act_from_output": "off", "act2bit": True, "prune": True,
                   "keep_ratio": 0.1, "dropout_rng": "fast"},
}


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def _check_subset(name: str, values: Iterable[Any], choices: Iterable[str]) -> None:
    choices = tuple(choices)
    for value in values:
        if value not in choices:
            raise ConfigError(
                f"{name} entries must be among {', '.join(map(repr, choices))}; got {value!r}"
            )


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")


def _as_pairs(name: str, value: Any) -> tuple[tuple[str, float], ...]:
    """``{pattern: ratio}`` (or a sequence of pairs) as a tuple of pairs, in the given order."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        return tuple((pattern, ratio) for pattern, ratio in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a {{module pattern: ratio}} mapping, got {value!r}") from None


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(value)
    raise ConfigError(f"{name} must be a string or a sequence of strings, got {value!r}")


def _misplaced_option(key: str, value: Any) -> str | None:
    """The fix for an option that belongs elsewhere: Inductor's config, or torch.compile's own
    arguments, handed to fxshear (the mistake a first-time user makes most)."""
    if key in ("mode", "fullgraph", "dynamic"):
        return (f"{key!r} is an argument of torch.compile, not an fxshear option: "
                f"torch.compile(model, backend=..., {key}={value!r})")
    if _is_inductor_option(key):
        return (f"{key!r} is an Inductor option, not an fxshear one: fxshear hands its graphs to Inductor, "
                f"which reads its own global settings, so set torch._inductor.config.{key} = {value!r} "
                f"(or wrap the first call in torch._inductor.config.patch({{{key!r}: {value!r}}}))")
    return None


def _is_inductor_option(key: str) -> bool:
    try:
        import torch._inductor.config as inductor_config
    except ImportError:  # pragma: no cover - Inductor ships with torch
        return False
    target: Any = inductor_config
    for part in key.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True
