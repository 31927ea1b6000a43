"""One self-contained HTML page for an inspection report (no scripts, no external assets)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from ..graph.ledger import ModelLedger
from .text import format_mib, left_alone

if TYPE_CHECKING:
    from .report import InspectionReport  # noqa: F401

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f2f2f2}
pre{background:#fafafa;border:1px solid #ddd;padding:8px;overflow-x:auto;font-size:12px}
.add{background:#e6ffec}.del{background:#ffebe9}.hunk{color:#6f42c1}
details{margin:0.5em 0}summary{cursor:pointer;font-weight:600}
.big{font-size:1.4em}
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


def _ledger_table(ledger: ModelLedger) -> str:
    rows = []
    for region in ledger.regions:
        for e in sorted(region.entries, key=lambda e: (e.kind != "activation", -e.bytes)):
            rows.append([region.region, e.kind, e.name, str(list(e.shape)), e.dtype, f"{e.bytes:,}",
                         e.op, e.module, e.introduced_by or "", e.source])
    headers = ["region", "kind", "name", "shape", "dtype", "bytes", "op", "module", "pass", "source"]
    return _table(headers, rows, numeric={5})


def _diff_block(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = "add" if line.startswith("+") else "del" if line.startswith("-") else \
            "hunk" if line.startswith("@@") else ""
        escaped = html.escape(line)
        lines.append(f'<span class="{cls}">{escaped}</span>' if cls else escaped)
    return "<pre>" + "\n".join(lines) + "</pre>" if lines else "<p>(no difference)</p>"


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
            pass_rows.append([region.region, r.name, str(len(r.rewritten)), ", ".join(r.rewritten),
                              left_alone(r), r.error or ""])
        if region.fallback_reason:
            pass_rows.append([region.region, "(fallback)", "0", "", "", region.fallback_reason])
    saved_by_ops = report.pass_bytes()
    removed = report.bytes_removed()
    by_pass = _table(["pass", "activation bytes it removed (measured)", "activation bytes its ops save"],
                     [[k, f"{removed[k]:,}" if k in removed else "-", f"{saved_by_ops.get(k, 0):,}"]
                      for k in dict.fromkeys([*removed, *saved_by_ops])], numeric={1, 2})
    diffs = "".join(
        f"<details{' open' if kind == 'forward' else ''}><summary>{kind} graph diff</summary>"
        f"{_diff_block(report.diff(kind))}</details>"
        for kind in ("forward", "backward", "joint")
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fxshear inspection</title>
<style>{_STYLE}</style></head><body>
<h1>fxshear inspection</h1>
<p class="big">Activations saved for backward: <b>{_mib(s.activation_bytes)}</b> under fxshear
vs {_mib(b.activation_bytes)} under torch.compile (ratio {report.saved_ratio:.3f}).</p>
<p>Config: <code>{html.escape(report.config.to_json())}</code></p>
<h2>Totals</h2>{totals}
<h2>Passes</h2>
{_table(["region", "pass", "rewritten", "nodes", "left alone (reason)", "error"], pass_rows, numeric={2})}
{by_pass}
<h2>Ledger under fxshear</h2>{_ledger_table(s)}
<details><summary>Ledger under torch.compile</summary>{_ledger_table(b)}</details>
<h2>Graph diffs (torch.compile &rarr; fxshear)</h2>{diffs}
</body></html>
"""
