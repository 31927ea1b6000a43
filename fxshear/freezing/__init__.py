"""Per-step freezing (Sheared Backprop), in one package.

Which weights get a gradient changes every few steps; this package holds every part of that:

* :mod:`.policies` -- who chooses: the bandit, random, round-robin and fixed policies;
* :mod:`.arms` -- what is chosen: groups of parameters (blocks, or patterns);
* :mod:`.state` -- the mask in force now (:func:`frozen`), read by compiled regions at run time;
* :mod:`.dispatcher` -- per region, the compiled graph that serves each mask;
* :mod:`.joint` -- the joint-graph edits: drop frozen gradients, gate weight-gradient matmuls;
* :mod:`.gated_mm` -- the gated ops themselves.

``@fxshear.train_step`` is the public face; the policies are importable from here (and from
the older name ``fxshear.sched``).
"""

from .policies import (
    POLICIES,
    BanditPolicy,
    BanditSettings,
    FixedPolicy,
    FreezePolicy,
    RandomPolicy,
    RoundRobinPolicy,
    project_capped_simplex,
)
from .state import frozen

__all__ = ["POLICIES", "BanditPolicy", "BanditSettings", "FixedPolicy", "FreezePolicy", "RandomPolicy",
           "RoundRobinPolicy", "frozen", "project_capped_simplex"]
