"""CPU-time budgets: the clock counts compute, not waiting, and ultralytics' trainer reads it inside the block."""

from __future__ import annotations

import time
import types

import pytest

from cytologia.clock import clock_fn, cpu_seconds, module_clock


def _spin(cpu_seconds_: float) -> None:
    """Compute until this process has used ``cpu_seconds_`` of CPU (read with time.process_time, an independent
    clock), however long that takes on a busy machine."""
    end = time.process_time() + cpu_seconds_
    while time.process_time() < end:
        pass


def test_cpu_clock_counts_compute_not_waiting() -> None:
    c0, w0 = cpu_seconds(), time.perf_counter()
    time.sleep(0.4)  # a busy machine: this process waits, its CPU time does not grow
    c1 = cpu_seconds()
    _spin(0.3)  # this process computes
    c2, w2 = cpu_seconds(), time.perf_counter()
    assert c1 - c0 < 0.1
    assert c2 - c1 >= 0.25  # the compute is counted (os.times ticks at 10 ms)
    assert w2 - w0 > 0.65  # wall time counted both
    assert clock_fn("wall") is time.time and clock_fn("cpu") is cpu_seconds
    with pytest.raises(ValueError, match="unknown clock"):
        clock_fn("gpu")


def test_module_clock_swaps_time_time_inside_the_block_only() -> None:
    mod = types.ModuleType("fake_trainer")
    mod.time = time  # as `import time` at the top of ultralytics.engine.trainer
    with module_clock(mod, "cpu"):
        assert abs(mod.time.time() - cpu_seconds()) < 0.05  # CPU seconds, not seconds since 1970
        assert mod.time.perf_counter is time.perf_counter  # everything else is the real module
    assert mod.time is time
    with module_clock(mod, "wall"):
        assert mod.time is time


def test_ultralytics_trainer_uses_time_time_for_its_budget() -> None:
    """module_clock relies on ultralytics' trainer doing its `time` budget arithmetic with its module's time.time():
    if a new ultralytics release changes that, this fails instead of the cpu budget silently becoming wall time."""
    ul_trainer = pytest.importorskip("ultralytics.engine.trainer")
    import inspect

    source = inspect.getsource(ul_trainer.BaseTrainer)
    assert "self.args.time * 3600" in source and "time.time() - self.train_time_start" in source
    with module_clock(ul_trainer, "cpu"):
        assert abs(ul_trainer.time.time() - cpu_seconds()) < 0.05
    assert ul_trainer.time is time
