"""``train(cfg)``: one configured experiment, as a plain importable function (``train.py`` only wraps it).

Stages register themselves in :data:`STAGES`; an experiment config picks one with ``stage:``. Until the detector and
classifier stages land (issues #4 and #5), no stage is registered: a run composes, validates and prints the resolved
config and writes it with the provenance into its run folder, and says that nothing was trained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cytologia.config import check_config
from cytologia.provenance import write_run_info

log = logging.getLogger(__name__)

# stage name -> function(cfg, run_dir) -> dict of results. Filled by the stage modules as they land.
STAGES: dict[str, Callable[[DictConfig, Path], dict[str, object]]] = {}


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
    write_run_info(run_dir, typed, extra={"stage": typed.stage, "fold": typed.fold})
    print(OmegaConf.to_yaml(typed, resolve=True), end="")
    stage = STAGES.get(typed.stage)
    if stage is None:
        log.warning(
            "stage %r has no trainer yet (detector: issue #4, classifier: issue #5): config validated and written to "
            "%s, nothing trained", typed.stage, run_dir,
        )  # fmt: skip
        return {"run_dir": str(run_dir), "stage": typed.stage, "trained": False}
    return {"run_dir": str(run_dir), "stage": typed.stage, "trained": True, **stage(typed, run_dir)}
