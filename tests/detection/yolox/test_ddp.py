"""YOLOX on several processes: 2 CPU processes over gloo (``train_args.ddp_processes``), spawned by ``fit``, train a
tiny fold (slow: ``pytest -m slow tests/detection/yolox/test_ddp.py``); rank 0 evaluates and writes, every rank ends
with the same weights (``fit`` checks it and fails otherwise: without the DDP wrapper, or with the ranks sharing one
copy of the weights, it did), and the plan of processes refuses ambiguous or impossible settings."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from cytologia.detection import DetectionData, TrainSettings, create_detector
from cytologia.detection.yolox.checkpoint import load_trained
from cytologia.detection.yolox.train import KC_METRIC, ddp_plan
from cytologia.errors import CytologiaInputError


def _folds(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"NAME": names, "fold": [i % 2 for i in range(len(names))]})


@pytest.mark.slow  # two spawned interpreters: 2 min on the shared 2-core VM (each imports torch and the library)
def test_two_cpu_processes_train_a_fold(tiny_set, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned processes inherit it
    data = DetectionData(
        table=tiny_set.table,
        folds=_folds(tiny_set.names),
        image_dir=tiny_set.image_dir,
        fold=0,
        cache_dir=tmp_path / "cache",
    )
    settings = TrainSettings(
        epochs=2,
        img_size=64,
        batch_size=4,
        lr=1e-3,
        optimizer="AdamW",
        device="cpu",
        workers=0,
        extra={"no_aug_epochs": 1, "warmup_epochs": 1, "multiscale": 0.0, "ddp_processes": 2},
    )
    detector = create_detector("yolox", "yolox_nano")
    result = detector.train(data, tmp_path / "fold_0", settings)
    assert result.weights == tmp_path / "fold_0" / "detector.pt" and result.weights.is_file()
    assert result.n_train_images == 4 and len(result.history) == 2
    assert all(0.0 <= row[KC_METRIC] <= 1.0 for row in result.history)
    _, info = load_trained(result.weights)
    assert info["epoch"] == result.best_epoch and info["train_args"]["ddp_processes"] == 2
    # rank 0 alone wrote the run folder: one history, one args file
    run_dir = tmp_path / "fold_0" / "yolox"
    assert len(pd.read_csv(run_dir / "results.csv")) == 2 and (run_dir / "args.yaml").is_file()
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_ddp_plan() -> None:
    assert ddp_plan("cpu", 0) == [] and ddp_plan("cpu", 1) == [] and ddp_plan("auto", 0) == []
    assert ddp_plan("cpu", 3) == ["cpu", "cpu", "cpu"]
    with pytest.raises(CytologiaInputError, match="give one of them"):
        ddp_plan("0,1", 2)
    with pytest.raises(CytologiaInputError, match="must name CUDA devices"):
        ddp_plan("cpu,cpu", 0)
    import torch

    if torch.cuda.device_count() < 2:
        with pytest.raises(CytologiaInputError, match="GPU"):
            ddp_plan("0,1", 0)
