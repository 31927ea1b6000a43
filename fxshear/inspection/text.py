"""Text helpers shared by the terminal report and the HTML page (which must not import each other)."""

from __future__ import annotations

from ..passes.base import PassReport


def left_alone(report: PassReport) -> str:
    """Skip reasons with their counts, then notes about patterns not matched at all."""
    reasons: dict[str, int] = {}
    for skip in report.skipped:
        reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    return "; ".join([f"{n}x {r}" for r, n in reasons.items()] + list(report.notes))


def format_mib(n: int, digits: int = 2) -> str:
    return f"{n / 2**20:,.{digits}f} MiB"
