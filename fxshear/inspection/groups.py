"""What a saved tensor *is* and which block it belongs to: the two axes of the report's pictures.

Why a module of its own: the HTML page, its SVG charts and the terminal summary all group the
ledger the same way, and a reader comparing the page with the terminal must see the same totals.

- **Block**: the module path up to its first numbered component (``encoder.layer.3.attention``
  -> ``encoder.layer.3``), so every tensor of one transformer block lands in one group; tensors of
  modules outside the numbered blocks group by their module (``encoder.embeddings``,
  ``classifier``); tensors with no module (graph inputs, the loss) are ``(no module)``.
- **Kind of storage**: a dense activation, a shared norm output (``share_norms``), a 1-bit mask
  (any packed dropout draw), a 2-bit code (``act2bit``), pruned values (``prune``,
  ``prune_attention``: kept values and their index bits), or other (integer tensors, row
  statistics, reversible remainders).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..graph.ledger import ModelLedger, SavedTensor

NO_MODULE = "(no module)"
CATEGORIES = ("dense activation", "shared norm output", "1-bit mask", "2-bit code", "pruned values", "other")
_FLOATING = ("float", "bfloat", "half", "complex")


def block_of(module: str) -> str:
    """The block a module path belongs to (module docstring)."""
    if not module:
        return NO_MODULE
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def short_label(block: str) -> str:
    """A block's name for a chart axis: its last two components (``layer.3``)."""
    return block if block == NO_MODULE else ".".join(block.split(".")[-2:])


def category_of(entry: SavedTensor) -> str:
    """The kind of storage ``entry`` is (module docstring)."""
    op, by = entry.op, entry.introduced_by or ""
    if "dropout_draw" in op:
        return "1-bit mask"
    if by == "act2bit" or op.startswith("fxshear.act2bit"):
        return "2-bit code"
    if by.startswith("prune") or op.startswith("fxshear.prune"):
        return "pruned values"
    if op.startswith("fxshear.normalize[0]"):
        return "shared norm output"
    if entry.dtype.startswith(_FLOATING) and not op.startswith("fxshear.normalize"):
        return "dense activation"
    return "other"


@dataclass
class BlockGroup:
    """The activations one block saves, by kind of storage."""

    block: str
    entries: list[SavedTensor] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def by_category(self) -> dict[str, int]:
        totals = dict.fromkeys(CATEGORIES, 0)
        for e in self.entries:
            totals[category_of(e)] += e.bytes
        return totals


def activation_groups(ledger: ModelLedger) -> dict[str, BlockGroup]:
    """The ledger's activations grouped by block, in the order blocks first appear."""
    groups: dict[str, BlockGroup] = {}
    for entry in ledger.entries:
        if entry.kind == "activation":
            key = block_of(entry.module)
            groups.setdefault(key, BlockGroup(key)).entries.append(entry)
    return groups


def block_order(*ledgers: ModelLedger) -> list[str]:
    """Every block of the ledgers, numbered blocks in numeric order and the rest where they first
    appear (embeddings before the blocks, the head after, as a model runs)."""
    seen: list[str] = []
    for ledger in ledgers:
        for key in activation_groups(ledger):
            if key not in seen:
                seen.append(key)

    def numbered(key: str) -> tuple[str, int] | None:
        head, _, tail = key.rpartition(".")
        return (head, int(tail)) if tail.isdigit() else None

    first_numbered = next((i for i, k in enumerate(seen) if numbered(k)), len(seen))
    numbered_keys = sorted((k for k in seen if numbered(k)), key=lambda k: numbered(k))
    before = [k for k in seen[:first_numbered] if not numbered(k)]
    after = [k for k in seen[first_numbered:] if not numbered(k)]
    return before + numbered_keys + after


def totals(groups: Iterable[BlockGroup]) -> dict[str, int]:
    """Bytes per kind of storage over some groups."""
    out = dict.fromkeys(CATEGORIES, 0)
    for group in groups:
        for name, value in group.by_category().items():
            out[name] += value
    return out
