"""The former name of :mod:`fxshear.freezing` (kept so existing code keeps working).

``fxshear.sched.FreezePolicy`` and friends, and the submodules ``fxshear.sched.bandit``,
``.arms`` and ``.state``, are the same objects as in :mod:`fxshear.freezing`.
"""

import sys

from .. import freezing as _freezing
from ..freezing import arms, policies, state

__all__ = [name for name in _freezing.__all__ if name != "frozen"]
globals().update({name: getattr(_freezing, name) for name in __all__})
for _name, _module in (("bandit", policies), ("arms", arms), ("state", state)):
    sys.modules[f"{__name__}.{_name}"] = _module
