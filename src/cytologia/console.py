"""What third-party libraries print to the console: each log line once, through the application's handlers.

Lightning (2.x) gives its ``lightning`` logger a console handler of its own at import, and its ``lightning.pytorch``
logger propagates to it; when the application has configured the root logger (Hydra under ``train.py``,
``logging.basicConfig`` under the ``cytologia`` command) every Lightning line is then printed twice, once by each.
:func:`route_lightning_logs` removes Lightning's own console handlers so that its records reach the root handlers only
(once, in the run's format and log file), and drops Lightning's advertising tips ("💡 Tip: ... try installing
litlogger / litmodels"). Call it after Lightning is imported (importing it adds the handler) and before a Trainer is
built; calling it again does nothing more.

Neither library's INFO lines belong on the console of a run that writes a log file: ultralytics prints its model
summary table, its whole argument dump, label scans, the optimizer, a validation table per epoch...; Lightning its
"GPU available: ..." lines. :class:`RunLogOnly` sends a library's records below WARNING to the run's log file only
(the root logger's file handlers: Hydra's ``<run>/train.log`` under ``train.py``), its warnings and errors to the
console as well. :func:`route_ultralytics_logs` does this for ultralytics (its progress bars stay: they are not log
records), :func:`route_lightning_logs` for Lightning, which also silences two Lightning warnings that say nothing to
a user of this library (:data:`QUIET_WARNINGS`).

Long loops of the library itself (``cytologia predict`` over 20,751 images) show a :func:`progress_bar` on the
standard error: drawn on a terminal, absent from redirected output and log files.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
import warnings
from typing import Any

# Loggers Lightning may give a console handler of its own (the unified package and the standalone ones).
LIGHTNING_LOGGERS: tuple[str, ...] = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)
# Loggers rank_zero_info() writes through (each Lightning package points lightning_utilities' helper at its own).
RANK_ZERO_LOGGERS: tuple[str, ...] = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
TIP_PREFIX = "💡 Tip:"  # Lightning's suggestions to install its cloud services (litlogger, litmodels)
ULTRALYTICS_LOGGER = "ultralytics"  # ultralytics.utils.LOGGER: it gives it a console handler of its own at import
# (category, message regex) of third-party warnings that are not about anything a user of this library can change:
# Lightning's own use of a deprecated torch API, and its advice to log more often than once per epoch when an epoch
# has fewer batches than trainer.log_every_n_steps (the classifier logs every metric per epoch too).
QUIET_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes (ultralytics' colorstr): kept out of the log file


class DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ..." records (suggestions to install a cloud service, not information)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(TIP_PREFIX)


class RunLogOnly(logging.Handler):
    """A library's records through the root logger's handlers, its INFO lines in the run's log file only.

    Below WARNING a record goes to the root's file handlers and not to its console (stream) handlers; WARNING and
    above go to all of them. Where no root handler writes a file nothing would keep a record, so it goes to every
    root handler (the console); with no root handler at all (nothing configured logging) to ``fallback``, the
    library's own console handler, as if it had not been routed. Decided per record: logging may be configured after
    the routing. Colour codes are stripped from what goes to a file."""

    def __init__(self, fallback: logging.Handler | None = None) -> None:
        super().__init__()
        self.fallback = fallback

    def emit(self, record: logging.LogRecord) -> None:
        handlers = logging.getLogger().handlers
        if not handlers:
            if self.fallback is not None and record.levelno >= self.fallback.level:
                self.fallback.handle(record)
            return
        files = [h for h in handlers if isinstance(h, logging.FileHandler)]
        plain = None
        for handler in handlers if record.levelno >= logging.WARNING or not files else files:
            if record.levelno < handler.level:
                continue
            if isinstance(handler, logging.FileHandler):
                if plain is None:
                    plain = copy.copy(record)
                    plain.msg, plain.args = _ANSI.sub("", record.getMessage()), None
                handler.handle(plain)
            else:
                handler.handle(record)


def route_logs(name: str) -> RunLogOnly:
    """Route logger ``name`` through a :class:`RunLogOnly` (its own console handler becomes the fallback) and stop it
    propagating (the router reaches the root's handlers itself). Calling it again does nothing more, except routing
    a console handler the library added since. Returns the router."""
    logger = logging.getLogger(name)
    router = next((h for h in logger.handlers if isinstance(h, RunLogOnly)), None)
    own = [h for h in logger.handlers if type(h) is logging.StreamHandler]  # the library's console handler
    if router is None:
        router = RunLogOnly(fallback=own[0] if own else None)
        logger.addHandler(router)
    elif router.fallback is None and own:
        router.fallback = own[0]
    for handler in own:
        logger.removeHandler(handler)
    logger.propagate = False
    return router


def route_ultralytics_logs() -> None:
    """ultralytics' INFO lines (model summary, argument dump, label scans, optimizer, per-epoch validation table,
    export steps) into the run's log file only; its warnings and errors also on the console (:class:`RunLogOnly`).

    Its progress bars stay: they are not log records, and the logger keeps its INFO level, which ultralytics' TQDM
    checks before drawing. Call it right after importing ultralytics (importing it adds its console handler);
    calling it again does nothing more."""
    route_logs(ULTRALYTICS_LOGGER)


def quiet_known_warnings() -> None:
    """Ignore the third-party warnings listed in :data:`QUIET_WARNINGS` (and only those)."""
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def route_lightning_logs() -> None:
    """Lightning's log records once, through the root logger's handlers (INFO to the run's log file only, see
    :class:`RunLogOnly`), without its tips or the warnings of :data:`QUIET_WARNINGS` (see the module doc).

    With no handler on the root logger (nothing configured logging), Lightning's lines go to its own console
    handler: they would be lost otherwise. The tips are dropped in both cases."""
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropTips) for f in logger.filters):
            logger.addFilter(DropTips())
    quiet_known_warnings()
    for name in LIGHTNING_LOGGERS:
        if "." in name:  # a sub-package's logger: through its top-level logger's router
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # its own console handler (not a file handler)
                    logger.removeHandler(handler)
            logger.propagate = True
        else:
            route_logs(name)


def progress_bar(total: int, desc: str, *, unit: str = "it", enable: bool | None = None) -> Any:
    """A progress bar on the standard error for ``total`` units of work (tqdm: done/total, units per second, time
    left), updated with ``bar.update(n)`` and closed as a context manager. Progress bars are not log records: they go
    to the console only, never to a run's log file. ``enable``: True draws it, False makes it a no-op, None draws it
    only when the standard error is a terminal (a redirected or captured run gets no bar lines in its file)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=None if enable is None else not enable,
        dynamic_ncols=True,
        smoothing=0.1,  # images/s and time left follow the recent rate, not only the mean since the start
        file=sys.stderr,
    )
