"""What third-party libraries print to the console: each log line once, through the application's handlers.

Lightning (2.x) gives its ``lightning`` logger a console handler of its own at import, and its ``lightning.pytorch``
logger propagates to it; when the application has configured the root logger (Hydra under ``train.py``,
``logging.basicConfig`` under the ``cytologia`` command) every Lightning line is then printed twice, once by each.
:func:`route_lightning_logs` removes Lightning's own console handlers so that its records reach the root handlers only
(once, in the run's format and log file), and drops Lightning's advertising tips ("💡 Tip: ... try installing
litlogger / litmodels"). Call it after Lightning is imported (importing it adds the handler) and before a Trainer is
built; calling it again does nothing more.
"""

from __future__ import annotations

import logging

# Loggers Lightning may give a console handler of its own (the unified package and the standalone ones).
LIGHTNING_LOGGERS: tuple[str, ...] = (
    "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric",
)  # fmt: skip
# Loggers rank_zero_info() writes through (each Lightning package points lightning_utilities' helper at its own).
RANK_ZERO_LOGGERS: tuple[str, ...] = (
    "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)  # fmt: skip
TIP_PREFIX = "💡 Tip:"  # Lightning's suggestions to install its cloud services (litlogger, litmodels)


class DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ..." records (suggestions to install a cloud service, not information)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(TIP_PREFIX)


def route_lightning_logs() -> None:
    """Lightning's log records once, through the root logger's handlers, without its tips (see the module doc).

    With no handler on the root logger (nothing configured logging), Lightning keeps its own console handler: its
    lines would be lost otherwise. The tips are dropped in both cases."""
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropTips) for f in logger.filters):
            logger.addFilter(DropTips())
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own console handler (not a file handler)
                logger.removeHandler(handler)
        logger.propagate = True
