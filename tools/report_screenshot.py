"""Render the README's picture of the inspection report: MiniLM (real weights), headless Chromium.

    python tools/report_screenshot.py [--preset aggressive] [--out docs/inspection_report.png]

Writes the HTML report to ``/tmp/fxshear_inspection_report.html`` (not committed) and the top of
the page as a PNG; needs Debian's ``chromium`` (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import fxshear
from fxshear.zoo.models import build_model

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="aggressive")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "inspection_report.png")
    parser.add_argument("--size", default="1280,1500", help="window width,height in pixels")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("no chromium on PATH (Debian: apt-get install chromium)")
    example = build_model("minilm")
    report = fxshear.inspect(example.model, preset=args.preset, example_kwargs=example.make_batch(8, 128))
    page = Path(report.save_html(Path("/tmp") / "fxshear_inspection_report.html"))
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={args.size}", f"--screenshot={args.out.resolve()}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    print(f"{args.out} (from {page}, {page.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
