"""The demo's command line parses and validates without training anything."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "finetune_minilm.py"


def test_demo_help_lists_its_options_and_bad_values_are_rejected(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = importlib.util.spec_from_file_location("finetune_minilm", DEMO)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, demo)  # dataclasses look their module up
    spec.loader.exec_module(demo)  # main() only runs under __main__

    with pytest.raises(SystemExit) as help_exit:
        demo.parse_args(["--help"])
    assert help_exit.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--steps", "--batch", "--seq", "--preset", "--html", "--lr"):
        assert flag in help_text

    defaults = demo.parse_args([])
    assert (defaults.steps, defaults.batch, defaults.seq, defaults.preset, defaults.lr) == (
        30, 16, 64, "exact", 5e-5)
    assert defaults.html == "out/fxshear-inspect.html"

    for bad in (["--steps", "0"], ["--seq", "1"], ["--preset", "nope"], ["--lr", "-1"]):
        with pytest.raises(SystemExit) as bad_exit:
            demo.parse_args(bad)
        assert bad_exit.value.code == 2, bad


FREEZE_EXAMPLE = DEMO.parent / "freeze_minilm.py"


def _load(path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_freeze_example_validates_and_runs(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    example = _load(FREEZE_EXAMPLE, monkeypatch)
    for bad in (["--sparsity", "1.0"], ["--freeze", "all"], ["--steps", "0"], ["--period", "0"]):
        with pytest.raises(SystemExit) as bad_exit:
            example.parse_args(bad)
        assert bad_exit.value.code == 2, bad
    assert example.main(["--steps", "2", "--batch", "2", "--seq", "16", "--period", "1"]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "freeze='bandit'" in out
