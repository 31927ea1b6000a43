"""What a user looks at: the HTML report opened in a real browser (headless Chromium), its size,
and the terminal summary at 80 columns."""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from rich.console import Console

import fxshear
from fxshear.inspection.groups import activation_groups, block_of, category_of
from fxshear.zoo.models import build_model

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium; "
                                                             ".ci/run installs it)")
PAGE_LIMIT = 500_000  # bytes, for MiniLM's report


@pytest.fixture(scope="module")
def report() -> fxshear.inspection.InspectionReport:
    example = build_model("llama", dropout=True)
    return fxshear.inspect(example.model, preset="aggressive", example_kwargs=example.make_batch(2, 16))


def _chromium(url: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--enable-logging=stderr", "--v=0", *flags, url],
                          capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    """The page's console messages, as Chromium logs them with --enable-logging."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


def _png_colours(path: Path) -> int:
    """How many distinct bytes the decoded image holds (1 for a blank page)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat = 8, b""
    while offset < len(data):
        (length,), kind = struct.unpack(">I", data[offset:offset + 4]), data[offset + 4:offset + 8]
        if kind == b"IDAT":
            idat += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    return len(set(zlib.decompress(idat)))


def test_groups_put_each_tensor_in_its_block_and_kind(report) -> None:  # noqa: ANN001
    assert block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert block_of("lm_head") == "lm_head" and block_of("") == "(no module)"
    groups = activation_groups(report.shear)
    assert sum(g.bytes for g in groups.values()) == report.shear.activation_bytes
    kinds = {category_of(e) for e in report.shear.entries if e.kind == "activation"}
    assert {"1-bit mask", "2-bit code", "pruned values", "shared norm output"} <= kinds, kinds


def test_page_opens_with_its_pictures(report, tmp_path: Path) -> None:  # noqa: ANN001
    page = Path(report.save_html(tmp_path / "report.html")).read_text()
    svgs = re.findall(r"<svg .*?</svg>", page, flags=re.S)
    assert len(svgs) == 2 and all(svg.count("<rect") > 5 for svg in svgs)
    assert page.index("<svg") < page.index("<h2>Totals</h2>")  # pictures first
    assert "<script" not in page and "http" not in page.split("<body>")[1]
    fxshear_part = page.split("Ledger under torch.compile, by block")[0]
    groups = re.findall(r'<details class="group"><summary><b>([^<]+)</b>: ([\d.,]+) MiB', fxshear_part)
    sizes = [float(size.replace(",", "")) for _, size in groups]
    assert groups and sizes == sorted(sizes, reverse=True)  # biggest group first
    assert not any(block.startswith("G.") for block, _ in groups)  # no Dynamo global names


def test_a_budget_is_said_on_the_picture(tmp_path: Path) -> None:
    example = build_model("llama", dropout=False)
    budgeted = fxshear.inspect(example.model, preset="exact", example_kwargs=example.make_batch(2, 16),
                               per_pass=False, memory_budget=0.5)
    page = Path(budgeted.save_html(tmp_path / "budget.html")).read_text()
    assert "memory_budget=0.5: both sides partitioned at that activation budget" in page


@needs_chromium
def test_headless_chromium_renders_the_page_without_console_errors(report, tmp_path: Path) -> None:  # noqa: ANN001
    path = Path(report.save_html(tmp_path / "report.html"))
    shot = tmp_path / "shot.png"
    done = _chromium(path.as_uri(), f"--screenshot={shot}", "--window-size=1280,1600")
    assert shot.exists(), done.stderr[-2000:]
    assert _png_colours(shot) > 16  # something was drawn, not a blank page
    assert _console_messages(done.stderr) == []
    dom = _chromium(path.as_uri(), "--dump-dom").stdout
    rendered = re.findall(r"<svg .*?</svg>", dom, flags=re.S)
    assert len(rendered) == 2 and all(svg.count("<rect") > 5 and "<title>" in svg for svg in rendered)


@needs_chromium
def test_the_console_check_sees_an_error(tmp_path: Path) -> None:
    """The check above is worth something only if a page that logs an error fails it."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('fxshear-test-error')</script></body></html>")
    messages = _console_messages(_chromium(page.as_uri(), "--dump-dom").stderr)
    assert any("fxshear-test-error" in m for m in messages)


def test_terminal_summary_reads_at_80_columns(report) -> None:  # noqa: ANN001
    out = io.StringIO()
    report.print(Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = " ".join(text.split())
    for region in report.passes:
        for r in region.reports:
            if r.skipped:  # every reason in full, as a numbered note
                assert " ".join(r.skipped[0].reason.split()) in flat
    assert "layers.0" in text and "--ledger" in text


def test_ledger_lines_are_never_cut(report) -> None:  # noqa: ANN001
    out = io.StringIO()
    report.print(Console(file=out, width=40, color_system=None), ledger=True)
    text = out.getvalue()
    for e in report.shear.entries:
        if e.kind == "activation":
            assert f"{list(e.shape)}  {e.op}  {e.module or '-'}" in text, e


@pytest.mark.slow
def test_minilm_page_stays_small(tmp_path: Path) -> None:
    example = build_model("minilm")
    heavy = fxshear.inspect(example.model, preset="aggressive", example_kwargs=example.make_batch(8, 128))
    size = Path(heavy.save_html(tmp_path / "minilm.html")).stat().st_size
    assert size < PAGE_LIMIT, size
