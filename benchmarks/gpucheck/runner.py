"""Sections of checks under time limits, with a report that is always on disk.

A GPU machine here is lent for minutes, starts bare and cannot be reached again once it is
given back, so the run must survive its own failures: each check runs on its own (an exception
is recorded and the next check runs), each section stops at its time limit (the checks not
reached are recorded as skipped), and the JSON and Markdown report are rewritten after every
check, so a run cut off from outside still leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class CheckTimeout(Exception):
    """Raised inside a check that outlives what is left of its section's time."""


@dataclasses.dataclass
class Context:
    """What every check may read: where it runs and how big it may be."""

    device: str  # "cuda" on the GPU; "cpu" for the self-test under TRITON_INTERPRET=1
    small: bool  # tiny sizes: the CPU self-test of the script's own logic
    out: Path


@dataclasses.dataclass
class Check:
    """One measurement.  ``run`` returns its fields (``ok`` False marks a failed comparison);
    an exception marks it failed with the error."""

    name: str
    run: Callable[[], dict[str, Any]]


@dataclasses.dataclass
class Section:
    name: str
    description: str
    budget_s: float
    #: builds the section's checks (imports and model building happen in here, so a failure to
    #: build is the section's failure, not the run's)
    build: Callable[[Context], list[Check]]


@dataclasses.dataclass
class Row:
    section: str
    check: str
    status: str  # "ok", "failed", "error", "timeout", "skipped"
    seconds: float
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None


@dataclasses.dataclass
class Report:
    environment: dict[str, Any]
    sections: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rows: list[Row] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("failed", "error", "timeout")]

    def to_json(self) -> dict[str, Any]:
        return {"environment": self.environment, "sections": self.sections,
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "gpu_check.json", json.dumps(self.to_json(), indent=1, default=str) + "\n")
        _write_atomic(out / "gpu_check.md", render_markdown(self))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def render_markdown(report: Report) -> str:
    env = report.environment
    lines = ["# fxshear on a GPU (`make gpu-check`)", "",
             ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    counts = {s: sum(r.status == s for r in report.rows) for s in ("ok", "failed", "error", "timeout", "skipped")}
    lines += [", ".join(f"{n} {s}" for s, n in counts.items()), ""]
    for section in report.sections:
        rows = [r for r in report.rows if r.section == section["name"]]
        lines += [f"## {section['name']}", "", section["description"],
                  f"(time limit {section['budget_s']:.0f} s, took {section.get('seconds', 0.0):.0f} s)", ""]
        if not rows:
            lines += ["(no checks ran)", ""]
            continue
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r.fields if k not in keys and k != "ok"]
        lines.append("| check | status | s | " + " | ".join(keys) + " |")
        lines.append("| --- | --- | ---: |" + " ---: |" * len(keys))
        for r in rows:
            cells = [_cell(r.fields.get(k, "")) for k in keys]
            status = r.status if not r.error else f"{r.status}: {_cell(r.error)[:160]}"
            lines.append(f"| {r.check} | {status} | {r.seconds:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`CheckTimeout` in the main thread after ``seconds`` (Python code only: a
    kernel or compile in C finishes its call first).  Off the main thread: no limit."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise CheckTimeout(f"over the section's time limit ({seconds:.0f} s left when it began)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _short_error(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}"[:400] + where


def run_sections(sections: list[Section], ctx: Context, report: Report,
                 clock: Callable[[], float] = time.monotonic) -> Report:
    """Run every section's checks in order under its time limit, writing the report as it goes."""
    for section in sections:
        start = clock()
        entry = {"name": section.name, "description": section.description, "budget_s": section.budget_s}
        report.sections.append(entry)
        try:
            checks = section.build(ctx)
        except Exception as error:  # noqa: BLE001 - recorded; the next section runs
            report.rows.append(Row(section.name, "(building the section)", "error", clock() - start,
                                   error=_short_error(error)))
            checks = []
        for check in checks:
            left = section.budget_s - (clock() - start)
            if left <= 0:
                report.rows.append(Row(section.name, check.name, "skipped", 0.0,
                                       error="section time limit reached"))
                continue
            began = clock()
            try:
                with _deadline(left):
                    fields = dict(check.run())
                status = "ok" if fields.pop("ok", True) else "failed"
                row = Row(section.name, check.name, status, clock() - began, fields)
            except CheckTimeout as error:
                row = Row(section.name, check.name, "timeout", clock() - began, error=str(error))
            except Exception as error:  # noqa: BLE001 - recorded; the next check runs
                row = Row(section.name, check.name, "error", clock() - began, error=_short_error(error))
            report.rows.append(row)
            entry["seconds"] = clock() - start
            report.write(ctx.out)
        entry["seconds"] = clock() - start
        report.write(ctx.out)
    return report
