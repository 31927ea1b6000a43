"""The steered partition: Inductor's min-cut, under fxshear's memory budget, recorded per region.

Why wrap rather than replace: Inductor's min-cut already trades recompute for memory well; fxshear
composes with it (``memory_budget`` drives ``activation_memory_budget``) and reads its result.
Its ``uuid()`` hashes fxshear's own sources and the config, because neither custom-op bodies
nor backward formulas are in Inductor's cache key.
"""

from __future__ import annotations

import contextvars
import functools
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ..compat import CustomPartitionerFn, activation_memory_budget, get_hash_for_files, min_cut_rematerialization_partition
from ..config import ShearConfig


@dataclass
class Partition:
    """What one min-cut produced, as the region needs it for its ledger and its report.

    The readable graphs are rendered at once, and the recorder must read ``forward`` before
    returning: Inductor goes on to compile (and mutate) the forward and backward modules.
    """

    forward: torch.fx.GraphModule
    num_fwd_outputs: int
    static_input_indices: list[int] | None
    readable: dict[str, str]


def readable_graph(gm: torch.fx.GraphModule) -> str:
    """The graph as annotated Python, the form used for diffs."""
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False)
    except TypeError:  # older signature
        return gm.print_readable(print_output=False)


#: Set by the backend while it compiles a region; the partitioner hands its result to it.
current_recorder: contextvars.ContextVar[Callable[[Partition], None] | None] = contextvars.ContextVar(
    "fxshear_partition_recorder", default=None
)


@functools.cache
def fxshear_source_files() -> tuple[str, ...]:
    """Every .py file of the package: any change to a pass, op or formula changes the cache key."""
    root = pathlib.Path(__file__).resolve().parent.parent
    return tuple(sorted(str(p) for p in root.rglob("*.py")))


class ShearPartitioner(CustomPartitionerFn):
    """min-cut under the config's memory budget; reports the partition to the compiling region."""

    def __init__(self, cfg: ShearConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        recorder = current_recorder.get()
        # The partitioner consumes the joint graph; render it first.
        joint_text = readable_graph(gm) if recorder is not None else ""
        with activation_memory_budget(self.cfg.memory_budget):
            forward, backward = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        if recorder is not None:
            recorder(
                Partition(
                    forward=forward,
                    num_fwd_outputs=int(kwargs["num_fwd_outputs"]),
                    static_input_indices=kwargs.get("static_lifetime_input_indices"),
                    readable={"joint": joint_text, "forward": readable_graph(forward),
                              "backward": readable_graph(backward)},
                )
            )
        return forward, backward

    def uuid(self) -> bytes:
        extra = f"{self.cfg.to_json()}|torch={torch.__version__}"
        return get_hash_for_files(fxshear_source_files(), extra=extra)

