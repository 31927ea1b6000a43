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
