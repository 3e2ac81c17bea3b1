"""Clocks for compute budgets. Wall time depends on what else the machine runs; process CPU time mostly does not,
so budgets that must mean "the same compute" on a shared machine (the single-stage baseline's) count CPU seconds."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

CLOCKS = ("wall", "cpu")


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished child processes (e.g. data-loading workers,
    counted when they exit): the compute spent, which another job on the same cores does not change."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def clock_fn(clock: str) -> Callable[[], float]:
    """The function that reads ``clock`` (``wall`` or ``cpu``) in seconds."""
    if clock == "wall":
        return time.time
    if clock == "cpu":
        return cpu_seconds
    raise ValueError(f"unknown clock {clock!r}; valid: {', '.join(CLOCKS)}")


class _TimeModule:
    """Stands in for the ``time`` module inside another module: ``time()`` reads the given clock, the rest is real."""

    def __init__(self, fn: Callable[[], float]) -> None:
        self._fn = fn

    def time(self) -> float:
        return self._fn()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextmanager
def module_clock(module: ModuleType, clock: str) -> Iterator[None]:
    """Within the block, ``module``'s ``time.time()`` reads ``clock``. Used to run ultralytics' time-budget logic
    (which re-plans epochs and the schedule from ``time.time()``) on process CPU time instead of wall time."""
    if clock == "wall":
        yield
        return
    saved = module.time
    module.time = _TimeModule(clock_fn(clock))
    try:
        yield
    finally:
        module.time = saved
