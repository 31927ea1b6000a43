"""Every option's accepted values, declared once.

Why here, at the bottom of the package: the config validates user options against these, and
the ops validate their own arguments against the same tuples, so a value cannot be accepted by
one and refused by the other.  This module imports nothing of fxshear.
"""

from __future__ import annotations

PRESETS = ("none", "exact", "balanced", "aggressive")
#: ``kernels=`` and every op's ``impl`` argument.
KERNEL_CHOICES = ("auto", "torch", "triton")
ON_ERROR_CHOICES = ("fallback", "raise")
ACT_FROM_OUTPUT_CHOICES = ("off", "exact_dtypes", "all")
#: ``dropout_rng=`` and the dropout ops' ``rng`` argument.
DROPOUT_RNG_CHOICES = ("eager", "fast")
PRUNE_OP_CHOICES = ("linear", "attention", "softmax")
#: Activations with a 2-bit backward code (``act2bit``), and with an exact inversion (``act_from_output``).
ACTIVATION_KINDS = ("gelu", "silu")
GELU_APPROXIMATIONS = ("none", "tanh")


def check_activation(kind: str, approximate: str) -> None:
    """An activation op's ``kind`` and ``approximate`` arguments, or a ValueError naming the choices."""
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"kind must be one of {ACTIVATION_KINDS}, got {kind!r}")
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    if kind == "silu" and approximate != "none":
        raise ValueError("SiLU has no approximate form")
