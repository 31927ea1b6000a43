"""The inspection tool: ledger comparison, per-pass summary, graph diffs, HTML report."""

from .report import InspectionReport, inspect

__all__ = ["InspectionReport", "inspect"]
