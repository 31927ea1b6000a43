"""The report's two pictures as inline SVG: bytes per block (torch.compile beside fxshear, stacked
by kind of storage) and a waterfall of the bytes each pass removed.

Why hand-written SVG: the page must open offline, with no script and no plotting library (the
report is written on training machines that have neither a network nor matplotlib).  Each bar
carries a ``<title>``, which browsers show on hover, so exact byte counts are one pointer away.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from .groups import CATEGORIES

MIB = 2**20
COLOURS = dict(zip(CATEGORIES, ("#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#e15759", "#9c9c9c")))
BASELINE_COLOUR = "#bab0ac"
REMOVED_COLOUR = "#59a14f"
ADDED_COLOUR = "#e15759"
_FONT = 'font-family="system-ui,sans-serif" font-size="12"'


def _mib(n: float) -> str:
    return f"{n / MIB:,.2f} MiB"


def _nice_max(value: float) -> float:
    """A round axis end at or above ``value`` (1, 2 or 5 times a power of ten, in MiB)."""
    mib = max(value / MIB, 1e-3)
    step = 10 ** int(f"{mib:e}".split("e")[1])
    for factor in (1, 1.2, 1.6, 2, 2.4, 3.2, 4, 6, 8, 10):  # quarter ticks stay round
        if mib <= factor * step:
            return factor * step * MIB
    return 10 * step * MIB


def _axis(x0: float, width: float, top: float, bottom: float, end: float) -> list[str]:
    parts = []
    for k in range(5):
        x = x0 + width * k / 4
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{end * k / 4 / MIB:,.3g}</text>')
    parts.append(f'<text x="{x0 + width / 2:.1f}" y="{bottom + 30}" text-anchor="middle">MiB saved for backward</text>')
    return parts


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    # no xmlns: inline SVG in an HTML page needs none (standalone() adds it for a file of its own)
    return (f'<svg role="img" aria-label="{html.escape(label)}" '
            f'class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" {_FONT}>'
            + "".join(body) + "</svg>")


def bytes_per_block(rows: Sequence[tuple[str, Mapping[str, int], Mapping[str, int]]], note: str = "",
                    width: int = 900) -> str:
    """Per block two bars: torch.compile's total (grey) and fxshear's, stacked by kind of storage.

    ``rows``: (label, torch.compile bytes by kind, fxshear bytes by kind); ``note``: a line under
    the legend (e.g. that a memory budget or freezing applied).
    """
    label_w, bar_h, gap = 150, 11, 8
    top = 48 if note else 34
    plot_w = width - label_w - 30
    end = _nice_max(max([sum(b.values()) for _, b, _ in rows] + [sum(s.values()) for _, _, s in rows] + [1]))
    height = top + len(rows) * (2 * bar_h + gap) + 40
    body = [f'<rect width="{width}" height="{height}" fill="white"/>']
    x = 4.0
    for name, colour in [("torch.compile (total)", BASELINE_COLOUR)] + list(COLOURS.items()):
        body.append(f'<rect x="{x:.0f}" y="8" width="10" height="10" fill="{colour}"/>'
                    f'<text x="{x + 14:.0f}" y="17">{html.escape(name)}</text>')
        x += 24 + 7 * len(name)
    if note:
        body.append(f'<text x="4" y="36" fill="#a04000">{html.escape(note)}</text>')
    bottom = top + len(rows) * (2 * bar_h + gap)
    body += _axis(label_w, plot_w, top - 4, bottom, end)
    for i, (label, baseline, shear) in enumerate(rows):
        y = top + i * (2 * bar_h + gap)
        body.append(f'<text x="{label_w - 6}" y="{y + bar_h + 4}" text-anchor="end">{html.escape(label)}</text>')
        total = sum(baseline.values())
        body.append(f'<rect x="{label_w}" y="{y}" width="{plot_w * total / end:.2f}" height="{bar_h}" '
                    f'fill="{BASELINE_COLOUR}"><title>{html.escape(label)}, torch.compile: {_mib(total)}</title></rect>')
        x = float(label_w)
        for category in CATEGORIES:
            value = shear.get(category, 0)
            if value <= 0:
                continue
            w = plot_w * value / end
            body.append(f'<rect x="{x:.2f}" y="{y + bar_h}" width="{w:.2f}" height="{bar_h}" '
                        f'fill="{COLOURS[category]}"><title>{html.escape(label)}, fxshear, {category}: '
                        f'{_mib(value)}</title></rect>')
            x += w
    return _svg(width, height, body, "activation bytes per block, torch.compile beside fxshear")


def waterfall(start: int, steps: Sequence[tuple[str, int]], end_bytes: int, width: int = 900) -> str:
    """torch.compile's bytes, then one floating bar per pass (what it removed, or added), then
    fxshear's bytes."""
    label_w, bar_h, gap, top = 150, 16, 6, 12
    plot_w = width - label_w - 30
    levels = [start]
    for _, removed in steps:
        levels.append(levels[-1] - removed)
    end = _nice_max(max(levels + [start, end_bytes, 1]))
    rows = len(steps) + 2
    bottom = top + rows * (bar_h + gap)
    height = bottom + 40
    body = [f'<rect width="{width}" height="{height}" fill="white"/>'] + _axis(label_w, plot_w, top - 4, bottom, end)

    def bar(i: int, name: str, lo: float, hi: float, colour: str, tip: str) -> None:
        y = top + i * (bar_h + gap)
        x0, x1 = label_w + plot_w * min(lo, hi) / end, label_w + plot_w * max(lo, hi) / end
        body.append(f'<text x="{label_w - 6}" y="{y + bar_h - 4}" text-anchor="end">{html.escape(name)}</text>')
        body.append(f'<rect x="{x0:.2f}" y="{y}" width="{max(x1 - x0, 0.5):.2f}" height="{bar_h}" fill="{colour}">'
                    f'<title>{html.escape(tip)}</title></rect>')

    bar(0, "torch.compile", 0, start, BASELINE_COLOUR, f"torch.compile saves {_mib(start)}")
    for i, (name, removed) in enumerate(steps, start=1):
        before, after = levels[i - 1], levels[i]
        verb = "removed" if removed >= 0 else "added"
        bar(i, name, after, before, REMOVED_COLOUR if removed >= 0 else ADDED_COLOUR,
            f"{name} {verb} {_mib(abs(removed))} ({_mib(before)} -> {_mib(after)})")
    bar(rows - 1, "fxshear", 0, end_bytes, COLOURS["dense activation"], f"fxshear saves {_mib(end_bytes)}")
    return _svg(width, height, body, "bytes each pass removed")


def standalone(svg: str) -> str:
    """An inline chart as a file of its own (an ``.svg`` needs the namespace)."""
    return svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
