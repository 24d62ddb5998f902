"""Our packages' log records in SD.Next's log, once each.

SD.Next sends the root logger to a NullHandler, and at the end of its startup gives every logger that exists by
then its own handlers. Left alone, our records would be lost before that and printed twice after it (a module's
logger and its package's logger both holding handlers). `route()` gives each package logger a handler that
forwards to SD.Next's logger, and lets a module's logger propagate only when it has no handlers of its own.
It is called at registration and before each load, so it also repairs the state after SD.Next's startup.
"""

from __future__ import annotations

import logging

PACKAGES = (__name__.split(".")[0], "cascade", "cascade_backends")  # ours is "extension" or its SD.Next name


class ToSdnextLog(logging.Handler):
    """Hands records to SD.Next's logger at emit time (SD.Next replaces its handlers while it runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        from modules.logger import log as sdnext_log

        sdnext_log.handle(record)


def route() -> None:
    try:
        from modules.logger import log as _  # noqa: F401 - only inside SD.Next
    except ImportError:
        return
    for name in PACKAGES:
        package = logging.getLogger(name)
        if not package.handlers:
            package.addHandler(ToSdnextLog())
        package.setLevel(logging.INFO)
        package.propagate = False
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in PACKAGES and "." in name:
            logger.propagate = not logger.handlers
