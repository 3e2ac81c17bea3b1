"""``train(cfg)``: one configured experiment, as a plain importable function (``train.py`` only wraps it).

:data:`STAGES` maps a stage name to ``"module:function"`` (imported only when that stage runs, so a detector run does
not import timm); an experiment config picks one with ``stage:``. The function takes ``(cfg, run_dir)`` and returns a
dict of results. The run composes, validates the config (an unknown stage is an error there), writes it (resolved)
with the provenance into its run folder, then runs the stage. The console gets one line naming that file, not the
config itself.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from cytologia.config import check_config
from cytologia.errors import CytologiaInputError
from cytologia.provenance import CONFIG_FILE, write_run_info

log = logging.getLogger(__name__)

# stage name -> "module:function"; function(cfg, run_dir) -> dict of results.
STAGES: dict[str, str] = {
    "detector": "cytologia.detection.stage:run",
    "classifier": "cytologia.classification.stage:run",
    "pipeline": "cytologia.pipeline:run",
}


def stage_function(name: str) -> Callable[[DictConfig, Path], dict[str, object]]:
    """The function of stage ``name`` (its module is imported now). An unknown name is a :class:`CytologiaInputError`
    listing the stages."""
    if name not in STAGES:
        raise CytologiaInputError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module, _, func = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), func)


def default_run_dir(cfg: DictConfig) -> Path:
    """Hydra's run folder when running under Hydra, else ``outputs/<exp>/<timestamp>``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (tests, notebooks)
        from datetime import datetime

        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        return Path(cfg.paths.output_dir) / cfg.exp_name / stamp


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, object]:
    """Validate ``cfg``, record it, and run its stage. Returns a summary (run folder, stage, what was done)."""
    typed = check_config(cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(typed)
    # Under DDP every process re-runs this script; only the first one records the run and names its config file.
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        write_run_info(run_dir, typed, extra={"stage": typed.stage, "fold": typed.fold})
        log.info("%s: resolved config in %s", typed.exp_name, run_dir / CONFIG_FILE)
    from cytologia.recipes import check_weights

    check_weights(typed)  # named pretrained weights present and verified, before any data work (else: the pull command)
    stage = stage_function(typed.stage)
    from cytologia.console import route_lightning_logs
    from cytologia.data.images import JPEG_WARNINGS_FILE, capture_jpeg_warnings

    route_lightning_logs()  # a stage module that imported Lightning gave it a console handler of its own
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    report = run_dir / (JPEG_WARNINGS_FILE if rank == 0 else f"rank{rank}_{JPEG_WARNINGS_FILE}")
    with capture_jpeg_warnings(report, label=typed.stage):  # libjpeg's warnings: one line, not one per decode
        results = stage(typed, run_dir)
    return {"run_dir": str(run_dir), "stage": typed.stage, "trained": True, **results}
