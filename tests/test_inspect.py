"""fxshear.inspect, its HTML page and the CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import fxshear
from fxshear.__main__ import main
from fxshear.zoo.models import build_model


@pytest.fixture(scope="module")
def llama_report() -> fxshear.inspection.InspectionReport:
    example = build_model("llama", dropout=False)
    return fxshear.inspect(example.model, preset="balanced", example_kwargs=example.make_batch(2, 16))


def test_report_compares_ledgers_and_passes(llama_report) -> None:  # noqa: ANN001
    report = llama_report
    assert report.baseline.activation_bytes > 0 and report.shear.activation_bytes > 0
    rewritten = {r.name: len(r.rewritten) for p in report.passes for r in p.reports}
    assert rewritten == {"gelu_formula": 0, "fused_loss": 1, "attention": 2, "share_norms": 4, "act_from_output": 0,
                         "act2bit": 2, "dropout_bits": 0}
    # Each pass that rewrote something is listed with the bytes it removed (measured).
    removed = report.bytes_removed()
    assert {name for name, count in rewritten.items() if count} <= set(removed)
    assert sum(removed.values()) == report.baseline.activation_bytes - report.shear.activation_bytes
    codes = [e for e in report.ledger.entries if e.introduced_by == "act2bit"]
    assert codes and all(e.source for e in codes)
    assert not any(e.introduced_by for e in report.baseline.entries)
    assert report.pass_bytes()["act2bit"] == sum(e.bytes for e in codes if e.kind == "activation")


def test_diff_shows_the_rewrite(llama_report) -> None:  # noqa: ANN001
    forward = llama_report.diff("forward")
    assert "+" in forward and "fxshear.act2bit" in forward
    assert "fxshear.act2bit_backward" in llama_report.diff("backward")
    with pytest.raises(ValueError, match="kind must be one of"):
        llama_report.diff("sideways")


def test_html_is_one_readable_page(llama_report, tmp_path: Path) -> None:  # noqa: ANN001
    path = llama_report.save_html(str(tmp_path / "report.html"))
    page = Path(path).read_text()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert "<script" not in page and "http" not in page.split("<body>")[1]  # self-contained
    for needle in ("Ledger under fxshear", "act2bit", "forward graph diff", "fxshear.act2bit_backward"):
        assert needle in page


@pytest.mark.slow
def test_cli_inspect_builtin_model(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    html, data = tmp_path / "out.html", tmp_path / "out.json"
    code = main(["inspect", "--model", "llama", "--batch", "2", "--seq", "16", "--html", str(html),
                 "--json", str(data), "--option", "memory_budget=0.5"])
    assert code == 0 and html.exists() and data.exists()
    assert "HTML report" in capsys.readouterr().out


def test_cli_inspect_user_model(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch

        def factory():
            model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
            return model, (torch.randn(4, 8),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "--model", "my_models:factory", "--html", str(tmp_path / "u.html")]) == 0


def test_cli_rejects_bad_options(capsys) -> None:  # noqa: ANN001
    assert main(["inspect", "--model", "llama", "--option", "memroy_budget=0.5"]) == 2
    assert "did you mean 'memory_budget'" in capsys.readouterr().out
    assert main(["inspect", "--model", "bert-large"]) == 2


@pytest.mark.slow
def test_inspect_leaves_the_users_compiled_model_alone() -> None:
    example = build_model("llama", dropout=False)
    batch = example.make_batch(2, 16)
    backend = fxshear.ShearBackend(fxshear.ShearConfig.from_options(), codegen=False)
    compiled = torch.compile(example.model, backend=backend)
    example.loss(compiled, batch).backward()
    fxshear.inspect(example.model, example_kwargs=batch)
    example.loss(compiled, batch).backward()
    assert len(backend.regions) == 1  # no recompile of the user's model after inspecting it
