"""One self-contained HTML page for an inspection report (no scripts, no external assets).

Order, most telling first: the headline ratio; two inline SVG pictures (bytes per block, stacked
by kind of storage, torch.compile beside fxshear; the bytes each pass removed); the totals; the
passes; then the ledger grouped by block, each group collapsed with its total and the groups
sorted by bytes; the graph diffs last.  The page says each thing once: parameters and inputs
appear as a summary, the diffs keep one line of context, with
source paths cut to the package and FX's ``x = None`` frees dropped, and the joint-graph diff, which repeats
the forward and backward ones, is left to ``report.diff("joint")``.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING

from ..graph.ledger import ModelLedger, SavedTensor
from . import svg
from .groups import activation_groups, block_order, category_of, short_label
from .text import format_mib, left_alone

if TYPE_CHECKING:
    from .report import InspectionReport  # noqa: F401

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:0.5em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f2f2f2}
pre{background:#fafafa;border:1px solid #ddd;padding:8px;overflow-x:auto;font-size:12px}
.add{background:#e6ffec}.del{background:#ffebe9}.hunk{color:#6f42c1}
details{margin:0.3em 0}summary{cursor:pointer}
details.group>summary{font-variant-numeric:tabular-nums}
.big{font-size:1.4em}.note{color:#a04000}
svg.chart{display:block;margin:0.5em 0;max-width:100%;height:auto}
"""


def _mib(n: int) -> str:
    return format_mib(n, digits=3)


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{html.escape(c)}</td>' if i in numeric else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _entry_rows(entries: list[SavedTensor], prefix: str) -> list[list[str]]:
    """One row per tensor, biggest first; module paths shown below the group's own prefix."""
    rows = []
    for e in sorted(entries, key=lambda e: -e.bytes):
        module = e.module[len(prefix):].lstrip(".") if prefix and e.module.startswith(prefix) else e.module
        rows.append([e.name, str(list(e.shape)), e.dtype, f"{e.bytes:,}", category_of(e), e.op, module or "-",
                     e.introduced_by or ""])
    return rows


def grouped_ledger(ledger: ModelLedger, other: ModelLedger | None, side: str, other_side: str) -> str:
    """The ledger's activations as one collapsed group per block, biggest group first."""
    groups = activation_groups(ledger)
    others = activation_groups(other) if other is not None else {}
    parts = []
    for group in sorted(groups.values(), key=lambda g: -g.bytes):
        compare = f" (under {other_side}: {_mib(others[group.block].bytes)})" if group.block in others else ""
        rows = _entry_rows(group.entries, group.block)
        parts.append(
            f'<details class="group"><summary><b>{html.escape(group.block)}</b>: {_mib(group.bytes)} in '
            f"{len(group.entries)} tensors{html.escape(compare)}</summary>"
            + _table(["name", "shape", "dtype", "bytes", "kind", "op", "module (below the block)", "pass"], rows,
                     numeric={3})
            + "</details>")
    return "".join(parts) or f"<p>({side} saves no activations)</p>"


def _non_activations(baseline: ModelLedger, shear: ModelLedger) -> str:
    rows = []
    for kind in ("parameter", "input"):
        row = [kind + "s"]
        for ledger in (baseline, shear):
            entries = [e for e in ledger.entries if e.kind == kind]
            row.append(f"{len(entries)} tensors, {_mib(sum(e.bytes for e in entries))}")
        rows.append(row)
    return _table(["saved", "torch.compile", "fxshear"], rows, numeric={1, 2})


_SITE_PACKAGES = re.compile(r"/\S*?/(?:site|dist)-packages/")
_FREED = re.compile(r";  (?:\w+ = )+None$", re.MULTILINE)  # "x = y = None": when FX frees a value


def _diff_block(diff: str) -> str:
    lines = []
    for line in _FREED.sub("", _SITE_PACKAGES.sub("", diff)).splitlines():
        cls = "add" if line.startswith("+") else "del" if line.startswith("-") else \
            "hunk" if line.startswith("@@") else ""
        escaped = html.escape(line)
        lines.append(f'<span class="{cls}">{escaped}</span>' if cls else escaped)
    return "<pre>" + "\n".join(lines) + "</pre>" if lines else "<p>(no difference)</p>"


def chart_note(report: InspectionReport) -> str:
    """What the pictures' numbers depend on besides the passes (budget, freezing)."""
    cfg = report.config
    notes = []
    if cfg.memory_budget is not None and cfg.memory_budget < 1.0:
        notes.append(f"memory_budget={cfg.memory_budget:g}: both sides partitioned at that activation budget "
                     "(recompute instead of saving)")
    if cfg.freezing:
        notes.append("freezing on: the bytes are those of this trace's graph, which serves every freeze mask")
    return "; ".join(notes)


def charts(report: InspectionReport) -> str:
    """The two pictures (module docstring)."""
    b_groups, s_groups = activation_groups(report.baseline), activation_groups(report.shear)
    empty: dict[str, int] = {}
    rows = [(short_label(block),
             b_groups[block].by_category() if block in b_groups else empty,
             s_groups[block].by_category() if block in s_groups else empty)
            for block in block_order(report.baseline, report.shear)]
    parts = ["<h2>Saved bytes per block</h2><p>Per block, the upper bar is torch.compile, the lower fxshear, "
             "stacked by kind of storage (hover a bar for its bytes).</p>",
             svg.bytes_per_block(rows, note=chart_note(report))]
    steps = [(name, removed) for name, removed in report.removed_by_pass if removed]
    if steps:
        parts += ["<h2>What each pass removed</h2>",
                  svg.waterfall(report.baseline.activation_bytes, steps, report.shear.activation_bytes)]
    return "".join(parts)


def render_html(report: InspectionReport) -> str:
    """The whole page as a string."""
    b, s = report.baseline, report.shear
    totals = _table(
        ["", "torch.compile", "fxshear", "fxshear / torch.compile"],
        [[label, _mib(getattr(b, a)), _mib(getattr(s, a)),
          f"{getattr(s, a) / getattr(b, a):.3f}" if getattr(b, a) else "-"]
         for label, a in (("activations", "activation_bytes"), ("parameters", "parameter_bytes"),
                          ("inputs", "input_bytes"))],
        numeric={1, 2, 3},
    )
    pass_rows = []
    for region in report.passes:
        for r in region.reports:
            pass_rows.append([region.region, r.name, str(len(r.rewritten)), left_alone(r), r.error or ""])
        if region.fallback_reason:
            pass_rows.append([region.region, "(fallback)", "0", "", region.fallback_reason])
    saved_by_ops = report.pass_bytes()
    removed = report.bytes_removed()
    by_pass = _table(["pass", "activation bytes it removed (measured)", "activation bytes its ops save"],
                     [[k, f"{removed[k]:,}" if k in removed else "-", f"{saved_by_ops.get(k, 0):,}"]
                      for k in dict.fromkeys([*removed, *saved_by_ops])], numeric={1, 2})
    diffs = "".join(
        f"<details><summary>{kind} graph diff</summary>{_diff_block(report.diff(kind, context=1))}</details>"
        for kind in ("forward", "backward")
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fxshear inspection</title>
<style>{_STYLE}</style></head><body>
<h1>fxshear inspection</h1>
<p class="big">Activations saved for backward: <b>{_mib(s.activation_bytes)}</b> under fxshear
vs {_mib(b.activation_bytes)} under torch.compile (ratio {report.saved_ratio:.3f}).</p>
<p>Config: <code>{html.escape(report.config.to_json())}</code></p>
{charts(report)}
<h2>Totals</h2>{totals}
<h2>Passes</h2>
{_table(["region", "pass", "rewritten", "left alone (reason)", "error"], pass_rows, numeric={2})}
{by_pass}
<h2>Ledger under fxshear, by block</h2>
<p>Activations, one group per block, biggest first (open a group for its tensors). Besides them,
parameters and inputs:</p>{_non_activations(b, s)}
{grouped_ledger(s, b, "fxshear", "torch.compile")}
<details><summary>Ledger under torch.compile, by block</summary>{grouped_ledger(b, s, "torch.compile", "fxshear")}</details>
<h2>Graph diffs (torch.compile &rarr; fxshear)</h2>{diffs}
<p>The joint graph's diff repeats these two: <code>report.diff("joint")</code>.</p>
</body></html>
"""
