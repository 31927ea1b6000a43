"""The fxshear ops whose outputs are saved, never recomputed in the backward.

Read by the partitioner (which pins them MUST_SAVE) and by the reversible rebuild (which never
copies them into the backward).
"""

from __future__ import annotations

import torch


def never_recomputed(target: object) -> bool:
    """fxshear ops no partition may move into the backward.

    Random ops: recomputing a dropout draw in the backward draws a *new* mask (and moves the
    generator), so the gradient would belong to a different mask than the forward used.
    ``linear_cross_entropy``: its recompute repeats the three vocabulary matmuls of the whole
    loss, a cost the partitioner's estimate of a custom op does not see.  ``prune_pack``: its
    point is that the dense input is not kept; recomputing it in the backward needs that input
    back (or what made it) plus a per-sample top-k, which the flop count prices at zero (MiniLM
    at budget 0.1 recomputed 9 of its 12 packs and ran 1.5x slower than without them).
    """
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "fxshear":
        return False
    return (torch.Tag.nondeterministic_seeded in target.tags
            or target in (torch.ops.fxshear.linear_cross_entropy.default, torch.ops.fxshear.prune_pack.default))
