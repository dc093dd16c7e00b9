"""The library's logger: visible by default, as Lightning does for its own messages.

``irs_callbacks`` logs through ``logging.getLogger("irs_callbacks")``. When the application has not
configured logging (the root logger has no handler), that logger gets its own stderr handler at
INFO, so that the monitor's one line per evaluation is seen without any set-up; an application
that configures logging before the monitor is imported keeps full control (nothing is added).
"""

from __future__ import annotations

import logging

__all__ = ["library_logger"]

_NAME = "irs_callbacks"
_configured = False


def library_logger() -> logging.Logger:
    """The ``irs_callbacks`` logger, given a default handler once if logging is unconfigured."""
    global _configured
    log = logging.getLogger(_NAME)
    if not _configured:
        _configured = True
        if not logging.getLogger().hasHandlers() and log.level == logging.NOTSET:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
    return log
