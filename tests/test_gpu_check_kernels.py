"""The GPU check's ``kernels`` section, run on CPU tensors under TRITON_INTERPRET=1 at tiny sizes.

What it proves is the section's own logic (inputs, references, comparisons, tolerances, fields)
before the one unattended GPU run: every check must build, run and pass here.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

from conftest import _triton_interpreter_problem  # noqa: E402

from benchmarks.gpucheck import kernels  # noqa: E402
from benchmarks.gpucheck.runner import Context, Report, Section, run_sections  # noqa: E402

# The interpreter evaluates exp(-inf), 0 / 0 in discarded lanes and the like with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_every_check_passes_on_the_interpreter(tmp_path) -> None:  # noqa: ANN001
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (conftest.py sets it where there is no CUDA)")
    problem = _triton_interpreter_problem()
    if problem is not None:
        pytest.skip(problem)
    ctx = Context(device="cpu", small=True, out=tmp_path)
    checks = kernels.build(ctx)
    assert len({c.name for c in checks}) == len(checks)

    report = run_sections([Section("kernels", "self-test", 1e6, kernels.build)], ctx, Report({}))
    bad = [f"{r.check}: {r.status} {r.error or r.fields.get('outputs')}" for r in report.rows if r.status != "ok"]
    assert not bad, "\n".join(bad)
    assert len(report.rows) == len(checks)

    families = {r.fields["family"] for r in report.rows}
    assert families == {"act2bit", "act_from_output", "dropout_bits", "norms", "prune", "attention",
                        "linear_cross_entropy"}
    assert {r.fields["dtype"] for r in report.rows} == {"bf16", "fp32", "fp16"}
    keys = {tuple(r.fields) for r in report.rows}
    assert len(keys) == 1, f"the checks' fields differ: {keys}"
    for row in report.rows:
        assert row.fields["triton_ms"] is None  # no timing on CPU
        assert row.fields["bit_exact"] == (row.fields["tolerance"] == "bit-exact")
        if not row.fields["bit_exact"]:
            assert 0.0 <= row.fields["err_over_tol"] <= 1.0
    assert "| act2bit gelu minilm-tiny bf16 | ok |" in (tmp_path / "gpu_check.md").read_text()
