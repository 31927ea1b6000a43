"""The inspection report in a terminal, readable at 80 columns.

Why this shape: a table with a free-text column squeezes that column to a few letters per line
in a narrow terminal, and a per-tensor ledger cut to the width is useless.  So every table here
holds only short cells (numbers, block and pass names); the "left alone" reasons are printed in
full as numbered notes under the pass table, and the per-tensor ledger (``--ledger``) is one line
per tensor that is never cut, whatever the width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.bar import Bar
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .groups import CATEGORIES, activation_groups, block_order, category_of, short_label
from .text import format_mib, left_alone

if TYPE_CHECKING:
    from .report import InspectionReport

MIB = 2**20
SHORT_KIND = dict(zip(CATEGORIES, ("dense", "norm", "1-bit", "2-bit", "pruned", "other")))


def _mib(n: int) -> str:
    return f"{n / MIB:,.2f}"


def summary_table(report: InspectionReport) -> Table:
    """The totals, torch.compile beside fxshear."""
    table = Table(title=f"saved for backward: torch.compile vs fxshear ({report.config.preset})")
    for column in ("", "torch.compile", "fxshear", "ratio"):
        table.add_column(column, justify="right")
    for label, attr in (("activations", "activation_bytes"), ("parameters", "parameter_bytes"),
                        ("inputs", "input_bytes")):
        before, after = getattr(report.baseline, attr), getattr(report.shear, attr)
        table.add_row(label, format_mib(before), format_mib(after), f"{after / before:.3f}" if before else "-")
    return table


def block_chart(report: InspectionReport) -> Table:
    """Per block: torch.compile's and fxshear's activation MiB, and a bar of fxshear's share of the
    largest block."""
    b_groups, s_groups = activation_groups(report.baseline), activation_groups(report.shear)
    blocks = block_order(report.baseline, report.shear)
    largest = max([g.bytes for g in (*b_groups.values(), *s_groups.values())] + [1])
    table = Table(title="activation MiB per block (bar: fxshear)", title_justify="left")
    table.add_column("block", no_wrap=True)
    table.add_column("torch.compile", justify="right")
    table.add_column("fxshear", justify="right")
    table.add_column("", ratio=1, min_width=10)
    for block in blocks:
        before = b_groups[block].bytes if block in b_groups else 0
        after = s_groups[block].bytes if block in s_groups else 0
        table.add_row(short_label(block), _mib(before), _mib(after), Bar(largest, 0, after, color="blue"))
    return table


def kinds_table(report: InspectionReport) -> Table:
    """The fxshear ledger grouped per block, MiB by kind of storage."""
    groups = activation_groups(report.shear)
    table = Table(title="fxshear's activations per block, MiB by kind", title_justify="left")
    table.add_column("block", no_wrap=True)
    table.add_column("n", justify="right")
    for kind in CATEGORIES:
        table.add_column(SHORT_KIND[kind], justify="right")
    for block in block_order(report.shear):
        group = groups[block]
        kinds = group.by_category()
        table.add_row(short_label(block), str(len(group.entries)),
                      *[_mib(kinds[k]) if kinds[k] else "-" for k in CATEGORIES])
    return table


def pass_table(report: InspectionReport) -> tuple[Table, list[str]]:
    """The passes with short cells, and the full "left alone" / error texts as numbered notes."""
    table = Table(title="what each pass did", title_justify="left")
    for column, justify in (("region", "left"), ("pass", "left"), ("rewritten", "right"),
                            ("removed MiB", "right"), ("notes", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "notes")
    removed = report.bytes_removed()
    notes: list[str] = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    for region in report.passes:
        for r in region.reports:
            refs = [note(t) for t in (left_alone(r), f"error: {r.error}" if r.error else "") if t]
            table.add_row(region.region, r.name, str(len(r.rewritten)),
                          _mib(removed[r.name]) if r.name in removed else "-", " ".join(refs))
        if region.fallback_reason:
            table.add_row(region.region, "(fallback)", "0", "", note(region.fallback_reason))
    return table, notes


def per_tensor_lines(report: InspectionReport) -> list[Text]:
    """Every saved activation, grouped per block, one unabridged line each."""
    lines: list[Text] = []
    groups = activation_groups(report.shear)
    for block in sorted(groups, key=lambda k: -groups[k].bytes):
        group = groups[block]
        lines.append(Text(f"{block}: {format_mib(group.bytes)} in {len(group.entries)} tensors", style="bold"))
        for e in sorted(group.entries, key=lambda e: -e.bytes):
            lines.append(Text(f"  {e.bytes:>12,} B  {category_of(e):<18} {e.dtype:<9} {list(e.shape)}  {e.op}  "
                              f"{e.module or '-'}{'  (' + e.introduced_by + ')' if e.introduced_by else ''}  {e.name}"))
    return lines


def print_report(report: InspectionReport, console: Console | None = None, ledger: bool = False) -> None:
    """Everything above, in order; ``ledger`` adds the per-tensor lines."""
    console = console or Console()
    console.print(summary_table(report))
    console.print(block_chart(report))
    console.print(kinds_table(report))
    table, notes = pass_table(report)
    console.print(table)
    for i, text in enumerate(notes, start=1):
        console.print(f"[{i}] {text}", markup=False, highlight=False)
    if ledger:
        console.print()
        for line in per_tensor_lines(report):
            console.print(line, soft_wrap=True, highlight=False)
    else:
        console.print("(every saved tensor: --ledger, or report.print(ledger=True))", style="dim")
