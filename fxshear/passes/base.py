"""What every fxshear pass is: a small object that rewrites the Dynamo graph and says what it did.

Why a report and not side effects: the backend records reports per compiled region, so the
inspection tool can show them, and a warm cache (where Inductor skips our hooks) changes nothing.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch.fx

from ..config import ShearConfig
from ..log import log

PASS_META_KEY = "fxshear_pass"


@dataclass
class Skip:
    """A matched node a pass left alone, and why."""

    node: str
    reason: str
    module: str = ""  # the user's module path, when the node came from one


@dataclass
class PassReport:
    """What one pass changed in one region."""

    name: str
    rewritten: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def skip(self, node: torch.fx.Node, reason: str) -> None:
        """Record and log a pattern the pass leaves alone."""
        module = module_path(node)
        self.skipped.append(Skip(node.name, reason, module))
        log.info("fxshear %s: left %s%s alone: %s", self.name, node.name, f" ({module})" if module else "", reason)

    def note(self, message: str) -> None:
        """Record and log something the pass could not match at all."""
        self.notes.append(message)
        log.info("fxshear %s: %s", self.name, message)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "rewritten": list(self.rewritten),
            "skipped": [{"node": s.node, "module": s.module, "reason": s.reason} for s in self.skipped],
            "notes": list(self.notes),
            "error": self.error,
        }


class GraphPass(Protocol):
    """A rewrite of the torch-IR graph Dynamo hands the backend."""

    name: str

    def applies(self, cfg: ShearConfig) -> bool:
        """Whether the config turns this pass on."""

    def run(self, gm: torch.fx.GraphModule, cfg: ShearConfig) -> PassReport:
        """Rewrite ``gm`` in place and report what changed."""


Found = TypeVar("Found")


@dataclass
class Walk:
    """One run of a pass over one graph: what its hooks share (passes are stateless singletons)."""

    gm: torch.fx.GraphModule
    cfg: ShearConfig
    report: PassReport
    phase: str = ""
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph


class RewritePass(Generic[Found]):
    """A pass as three answers; the base owns the walk, the report, the lint and the recompile.

    For every node still in the graph (in order, once per entry of ``phases``):
    :meth:`match` says whether it is this pass's pattern (``None``: not ours; a string: ours, but
    unusable, and why); :meth:`why_not` gives the reasons the config or the context forbid the
    rewrite; :meth:`rewrite` makes it and returns the line for the report (``None`` when the
    rewrite is left to :meth:`finish`, e.g. a group rewritten once for several nodes).  Why a
    base: every pass repeated that loop, and a skipped node then had one reason in one pass and
    none in another.
    """

    name: str = ""
    phases: tuple[str, ...] = ("",)

    def applies(self, cfg: ShearConfig) -> bool:
        return True

    def match(self, walk: Walk, node: torch.fx.Node) -> Found | str | None:
        raise NotImplementedError

    def why_not(self, walk: Walk, node: torch.fx.Node, found: Found) -> str | None:
        return None

    def rewrite(self, walk: Walk, node: torch.fx.Node, found: Found) -> str | None:
        raise NotImplementedError

    def finish(self, walk: Walk) -> None:
        """After the walk: rewrites collected across nodes, notes about what never matched."""

    def reported_node(self, node: torch.fx.Node, found: Found | str) -> torch.fx.Node:
        """The node a skip is reported against (the pattern's visible output, by default the match)."""
        return node

    def run(self, gm: torch.fx.GraphModule, cfg: ShearConfig) -> PassReport:
        walk = Walk(gm, cfg, PassReport(self.name))
        for phase in self.phases:
            walk.phase = phase
            for node in list(gm.graph.nodes):
                if node.graph is not gm.graph or getattr(node, "_erased", False):
                    continue  # removed by an earlier rewrite of this walk
                found = self.match(walk, node)
                if found is None:
                    continue
                reason = found if isinstance(found, str) else self.why_not(walk, node, found)
                if reason:
                    walk.report.skip(self.reported_node(node, found), reason)
                    continue
                line = self.rewrite(walk, node, found)
                if line:
                    walk.report.rewritten.append(line)
        self.finish(walk)
        gm.graph.lint()
        gm.recompile()
        return walk.report


def module_types(node: torch.fx.Node) -> list[tuple[str, str]]:
    """(path, class name) of every module enclosing a node, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    result = []
    for path, module_type in stack.values():
        name = module_type if isinstance(module_type, str) else getattr(module_type, "__name__", str(module_type))
        result.append((_clean_module_path(path), name.rsplit(".", 1)[-1]))
    return result


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost user module a node came from ('' at top level)."""
    # entries rooted at a global (``G['__import_...']``: a module object Dynamo reached through a
    # module-level name, such as a kernel-hub wrapper of a function) are not the user's module tree
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if not path.startswith("G[")]
    return _clean_module_path(paths[-1]) if paths else ""


_DYNAMO_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\](\[\d+\])*\.?")


def _clean_module_path(path: str) -> str:
    """The user's dotted module path from Dynamo's source spelling.

    Dynamo names the root after how the module reached it (``L['self']``, ``L['mod']``, or, for a
    compiled ``nn.Module`` on newer releases, ``L['args'][0]``) and may spell children with
    subscripts (``layer[0]``); exclude patterns are written against ``model.named_modules()``.
    """
    path = _DYNAMO_ROOT.sub("", path, count=1)
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return _MODULE_DICT_ACCESS.sub(r"\1", path)


# Dynamo spells a child reached through the module dict (PEFT's wrappers) as
# ``__dict__['_modules']['base_model']``: not part of the path named_modules() gives.
_MODULE_DICT_ACCESS = re.compile(r"(^|\.)(?:__dict__\.)?_modules\.")


def excluded(node: torch.fx.Node, cfg: ShearConfig) -> str | None:
    """The exclude pattern that covers this node's module, if any."""
    path = module_path(node)
    for pattern in cfg.exclude:
        if fnmatch.fnmatchcase(path, pattern):
            return pattern
    return None


def example_value(node: torch.fx.Node) -> object:
    """The value Dynamo recorded for a node (a fake tensor for tensors)."""
    return node.meta.get("example_value", node.meta.get("val"))
