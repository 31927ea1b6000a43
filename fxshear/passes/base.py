"""What every fxshear pass is: a small object that rewrites the Dynamo graph and says what it did.

Why a report and not side effects: the backend records reports per compiled region, so the
inspection tool can show them, and a warm cache (where Inductor skips our hooks) changes nothing.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Protocol

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
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _clean_module_path(path)


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
