"""Per-step freezing (Sheared Backprop): policies choosing which weights get a gradient each step."""

from .bandit import (
    POLICIES,
    BanditPolicy,
    BanditSettings,
    FixedPolicy,
    FreezePolicy,
    RandomPolicy,
    RoundRobinPolicy,
    project_capped_simplex,
)

__all__ = ["POLICIES", "BanditPolicy", "BanditSettings", "FixedPolicy", "FreezePolicy", "RandomPolicy",
           "RoundRobinPolicy", "project_capped_simplex"]
