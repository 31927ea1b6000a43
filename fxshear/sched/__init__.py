"""The former name of :mod:`fxshear.freezing` (kept so existing code keeps working).

``fxshear.sched.FreezePolicy`` and friends, and the submodules ``fxshear.sched.bandit``,
``.arms`` and ``.state``, are the same objects as in :mod:`fxshear.freezing`.
"""

import sys

from ..freezing import arms, state
from ..freezing import policies as bandit
from ..freezing.policies import (
    POLICIES,
    BanditPolicy,
    BanditSettings,
    FixedPolicy,
    FreezePolicy,
    RandomPolicy,
    RoundRobinPolicy,
    project_capped_simplex,
)

for _name, _module in (("bandit", bandit), ("arms", arms), ("state", state)):
    sys.modules[f"{__name__}.{_name}"] = _module

__all__ = ["POLICIES", "BanditPolicy", "BanditSettings", "FixedPolicy", "FreezePolicy", "RandomPolicy",
           "RoundRobinPolicy", "project_capped_simplex"]
