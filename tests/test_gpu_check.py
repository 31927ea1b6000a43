"""The GPU check script's own logic, on the CPU: sections, time limits, failures that do not stop
the run, the report on disk after every check, --dry-run, and the skip without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpucheck.runner import Check, Context, Report, Section, render_markdown, run_sections

REPO = Path(__file__).resolve().parents[1]


def _sections(tmp_path: Path, log: list[str]) -> list[Section]:
    def ok() -> dict:
        log.append("ok")
        return {"value": 1.5, "shape": "b2 s16"}

    def wrong() -> dict:
        log.append("wrong")
        return {"ok": False, "value": 9.0}

    def broken() -> dict:
        log.append("broken")
        raise ValueError("kernel said no")

    def slow() -> dict:
        log.append("slow")
        time.sleep(5)
        return {}

    def unreachable() -> dict:
        log.append("unreachable")
        return {}

    def cannot_build(ctx: Context) -> list[Check]:
        raise ImportError("no such module")

    return [
        Section("first", "three checks, one failing, one raising", 30.0,
                lambda ctx: [Check("ok", ok), Check("wrong", wrong), Check("broken", broken), Check("after", ok)]),
        Section("timed", "a check that outlives the limit, then one never reached", 0.3,
                lambda ctx: [Check("slow", slow), Check("unreachable", unreachable)]),
        Section("unbuildable", "its build raises", 10.0, cannot_build),
        Section("last", "still runs", 10.0, lambda ctx: [Check("last ok", ok)]),
    ]


def test_sections_failures_time_limits_and_report(tmp_path: Path) -> None:
    log: list[str] = []
    report = Report({"gpu": "none (test)"})
    ctx = Context(device="cpu", small=True, out=tmp_path)
    start = time.monotonic()
    run_sections(_sections(tmp_path, log), ctx, report)
    assert time.monotonic() - start < 4, "the timed-out check was not interrupted"
    statuses = {(r.section, r.check): r.status for r in report.rows}
    assert statuses == {
        ("first", "ok"): "ok", ("first", "wrong"): "failed", ("first", "broken"): "error", ("first", "after"): "ok",
        ("timed", "slow"): "timeout", ("timed", "unreachable"): "skipped",
        ("unbuildable", "(building the section)"): "error", ("last", "last ok"): "ok",
    }
    assert "unreachable" not in log
    broken = next(r for r in report.rows if r.check == "broken")
    assert "ValueError: kernel said no" in broken.error and "test_gpu_check.py" in broken.error
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["environment"] == {"gpu": "none (test)"}
    assert [r["check"] for r in saved["rows"]] == [r.check for r in report.rows]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown == render_markdown(report)
    assert "| ok | ok |" in markdown and "## timed" in markdown and "timeout" in markdown
    assert len(report.failed) == 4


def test_report_is_on_disk_after_each_check(tmp_path: Path) -> None:
    seen: list[int] = []

    def look() -> dict:
        path = tmp_path / "gpu_check.json"
        seen.append(len(json.loads(path.read_text())["rows"]) if path.exists() else 0)
        return {}

    sections = [Section("s", "", 10.0, lambda ctx: [Check(f"c{i}", look) for i in range(3)])]
    run_sections(sections, Context("cpu", True, tmp_path), Report({}))
    assert seen == [0, 1, 2]


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=300)


def test_without_cuda_it_says_it_skipped_and_exits_0(tmp_path: Path) -> None:
    done = _script("--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here; skipped" in done.stdout
    assert not (tmp_path / "gpu_check.json").exists()


def test_dry_run_lists_every_section_and_check(tmp_path: Path) -> None:
    done = _script("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    for section in ("kernels", "end_to_end", "freezing"):
        assert f"{section} (time limit" in done.stdout
    assert "minilm fxshear exact" in done.stdout and "llama step time (interleaved)" in done.stdout
    assert "time limits add up to 440 s" in done.stdout  # within the 8 minutes the run may take


@pytest.mark.slow
def test_cpu_selftest_runs_the_real_sections(tmp_path: Path) -> None:
    """End to end and freezing at tiny sizes on the CPU: the sections' own code, not the GPU."""
    done = _script("--cpu-selftest", "--only", "end_to_end", "--only", "freezing", "--out", str(tmp_path),
                   env={"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert {r["status"] for r in rows} == {"ok"}, rows
    exact = next(r for r in rows if r["check"] == "llama fxshear exact")["fields"]
    assert exact["grad_cos"] > 0.9999 and exact["ledger_vs_runtime"] == pytest.approx(1.0, abs=0.05)
