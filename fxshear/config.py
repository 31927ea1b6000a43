"""ShearConfig: what fxshear may rewrite, validated when it is built.

Why validate eagerly: a typo in an option must fail when the user calls ``torch.compile`` or
``fxshear.backend(...)``, not silently leave a rewrite off (or fail deep inside a compile).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .kernels.act2bit_reference import KINDS as ACT2BIT_KINDS

PRESETS = ("none", "exact", "balanced", "aggressive")
DEFAULT_PRESET = "exact"  # most fine-tuning users will not accept approximate gradients
KERNEL_CHOICES = ("auto", "torch", "triton")
ON_ERROR_CHOICES = ("fallback", "raise")
ACT_FROM_OUTPUT_CHOICES = ("off", "exact_dtypes", "all")


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
        dropout_bits: dropout keeps its mask at 1 bit per element (same masks as eager). Exact.
        attention_recompute: eager/math attention keeps q, k, v, the row log-sum-exp and a 1-bit
            dropout mask, and rebuilds the probabilities in backward. Exact.
        fused_loss: Linear(hidden -> vocab) + cross-entropy never keeps the logits. Exact.
        act2bit: GELU/SiLU keep a 2-bit code for backward (approximate; Approx-BP); applies to
            the activations ``act_from_output`` leaves alone.
        act2bit_ops: which activations ``act2bit`` rewrites.
        memory_budget: PyTorch's ``activation_memory_budget`` for fxshear regions, in [0, 1];
            None leaves the partitioner's global setting alone.
        exclude: fnmatch patterns of module paths (e.g. ``"classifier*"``) no pass touches.
        kernels: "auto" (Triton on CUDA when available, torch elsewhere), "torch" or "triton".
        on_error: "fallback" compiles the unmodified graph if fxshear fails; "raise" re-raises.
    """

    preset: str = DEFAULT_PRESET
    share_norms: bool = True
    act_from_output: str = "all"
    dropout_bits: bool = True
    attention_recompute: bool = True
    fused_loss: bool = True
    act2bit: bool = True
    act2bit_ops: tuple[str, ...] = ACT2BIT_KINDS
    memory_budget: float | None = None
    exclude: tuple[str, ...] = ()
    kernels: str = "auto"
    on_error: str = "fallback"

    def __post_init__(self) -> None:
        _check_choice("preset", self.preset, PRESETS)
        for name in ("share_norms", "dropout_bits", "attention_recompute", "fused_loss", "act2bit"):
            _check_bool(name, getattr(self, name))
        _check_choice("act_from_output", self.act_from_output, ACT_FROM_OUTPUT_CHOICES)
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
                hint = difflib.get_close_matches(key, sorted(known | {"preset"}), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(
                    f"unknown fxshear option {key!r}{suggestion} Accepted options: "
                    f"preset, {', '.join(sorted(known))}"
                )
        values = {**PRESET_FIELDS[preset], **merged}
        for name in ("act2bit_ops", "exclude"):
            if name in values:
                values[name] = _as_tuple(name, values[name])
        return cls(preset=preset, **values)

    def to_json(self) -> str:
        """Stable text form, part of every cache key fxshear contributes."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def exact(self) -> bool:
        """True when every enabled rewrite keeps gradients equal to eager."""
        return not self.act2bit and self.act_from_output != "all"


_EXACT_REWRITES: dict[str, Any] = {
    "share_norms": True, "dropout_bits": True, "attention_recompute": True, "fused_loss": True,
}
PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "none": {**{k: False for k in _EXACT_REWRITES}, "act_from_output": "off", "act2bit": False},
    "exact": {**_EXACT_REWRITES, "act_from_output": "exact_dtypes", "act2bit": False},
    "balanced": {**_EXACT_REWRITES, "act_from_output": "all", "act2bit": True},
    # Pruned saved activations join this preset when that pass lands.
    "aggressive": {**_EXACT_REWRITES, "act_from_output": "all", "act2bit": True},
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


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(value)
    raise ConfigError(f"{name} must be a string or a sequence of strings, got {value!r}")
