"""The import graph of the ``fxshear`` package, read from its source: cycles and upward imports.

    python tools/import_graph.py            # summary: modules, edges, cycles, upward imports
    python tools/import_graph.py --edges    # every edge, with the line that makes it

Why from the source rather than ``sys.modules``: a lazy import inside a function is an edge too
(it couples the two modules just as much), and only the text shows it before it runs.  Every
``import`` and ``from ... import`` counts, at any depth, except those under ``if TYPE_CHECKING:``
(annotations only; they never run).

The layers, top down (docs/design.md explains them): a module may import its own layer or a
lower one, never a higher one, and no set of modules may import each other in a circle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fxshear"

#: (layer number, module-name prefixes), top layer first.  The longest matching prefix wins, so a
#: package's modules can sit on different layers (``fxshear.freezing`` spans several).
LAYERS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (7, "public API and CLI", ("fxshear", "fxshear.__main__", "fxshear.api", "fxshear.inspection",
                               "fxshear.integrations", "fxshear.zoo")),
    (6, "backend and train_step", ("fxshear.backend", "fxshear.train_step", "fxshear.freezing.policies",
                                   "fxshear.sched", "fxshear.reversible", "fxshear.selective")),
    (5, "region", ("fxshear.region", "fxshear.freezing.dispatcher", "fxshear.measure")),
    (4, "passes and graph", ("fxshear.passes", "fxshear.graph", "fxshear.freezing.joint")),
    (3, "kernels", ("fxshear.kernels", "fxshear.freezing.gated_mm")),
    (2, "kernel infrastructure", ("fxshear.kernels.infra",)),
    (1, "compat, config and log", ("fxshear.compat", "fxshear.log", "fxshear.config", "fxshear.options", "fxshear.sources",
                                   "fxshear.blocks",
                                   "fxshear.freezing.state", "fxshear.freezing")),
)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  (line {self.line})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an import name lands in (a name inside a module lands in the module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(modules: dict[str, Path] | None = None) -> list[Edge]:
    modules = package_modules() if modules is None else modules
    found: set[Edge] = set()
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = source.split(".") if is_package else source.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import mod`` imports the submodule; ``from mod import name`` the module.
                names = [f"{base}.{alias.name}" for alias in node.names] or [base]
                names = [n if _resolve(n, modules) == n else base for n in names]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != source:
                    found.add(Edge(source, target, node.lineno))
    return sorted(found, key=lambda e: (e.source, e.target, e.line))


def layer_of(module: str) -> int:
    best, best_length = 0, -1
    for number, _, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = number, len(prefix)
    return best


def upward(all_edges: list[Edge]) -> list[Edge]:
    """Edges from a lower layer to a higher one.  A package's ``__init__`` re-exporting its own
    modules is not upward: it is the package's face, on the layer of its highest module."""
    result = []
    for edge in all_edges:
        if edge.target.startswith(edge.source + "."):
            continue  # a package importing its own submodule
        if layer_of(edge.source) < layer_of(edge.target):
            result.append(edge)
    return result


def cycles(all_edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in all_edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def unlayered(modules: dict[str, Path]) -> list[str]:
    return [name for name in modules if layer_of(name) == 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", action="store_true", help="print every edge")
    args = parser.parse_args(argv)
    modules = package_modules()
    all_edges = edges(modules)
    if args.edges:
        for edge in all_edges:
            print(edge)
    found_cycles, found_upward, missing = cycles(all_edges), upward(all_edges), unlayered(modules)
    print(f"{len(modules)} modules, {len(all_edges)} imports, {len(found_cycles)} cycles, "
          f"{len(found_upward)} upward imports, {len(missing)} modules on no layer")
    for component in found_cycles:
        print("cycle:", " <-> ".join(component))
    for edge in found_upward:
        print(f"upward: {edge}  (layer {layer_of(edge.source)} -> {layer_of(edge.target)})")
    for name in missing:
        print("no layer:", name)
    return 1 if found_cycles or found_upward or missing else 0


if __name__ == "__main__":
    sys.exit(main())
