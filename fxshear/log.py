"""fxshear's logger, registered with torch._logging.

Why: every skipped pattern and every fallback must leave a reason a user can read. Enable it with
``torch._logging.set_logs(modules={"fxshear": logging.INFO})`` or the standard ``logging`` API.
"""

from __future__ import annotations

import logging

LOGGER_NAME = "fxshear"
log = logging.getLogger(LOGGER_NAME)

try:
    from torch._logging._internal import register_log

    register_log(LOGGER_NAME, LOGGER_NAME)
except (ImportError, AttributeError, ValueError):  # registration is a convenience only
    pass
