"""The demo's command line parses and validates without training anything."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _import_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """An example script as a module, imported the way it imports its sibling (its folder on
    sys.path); its main() only runs under __main__."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module(name)


def test_demo_help_lists_its_options_and_bad_values_are_rejected(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    demo = _import_example("finetune_minilm", monkeypatch)

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


@pytest.mark.slow
def test_freeze_example_validates_and_runs(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    example = _import_example("freeze_minilm", monkeypatch)
    for bad in (["--sparsity", "1.0"], ["--freeze", "all"], ["--steps", "0"], ["--period", "0"]):
        with pytest.raises(SystemExit) as bad_exit:
            example.parse_args(bad)
        assert bad_exit.value.code == 2, bad
    assert example.main(["--steps", "2", "--batch", "2", "--seq", "16", "--period", "1"]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "freeze='bandit'" in out


@pytest.mark.slow
def test_block_selective_example_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn (the bench extra)")
    example = _import_example("block_selective_vit", monkeypatch)
    with pytest.raises(SystemExit) as bad_exit:
        example.main(["--steps", "0"])
    assert bad_exit.value.code == 2
    assert example.main(["--steps", "2", "--pretrain-steps", "1", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "1: 65 -> 34" in out and "held-out accuracy" in out
