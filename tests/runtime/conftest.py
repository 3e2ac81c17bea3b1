"""A tiny generated test set and a random-weight ensemble (detector + two classifiers of two folds each, flip TTA),
shared by the runtime tests: building and exporting the models is the slow part (~20 s, once per session)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cytologia.ensemble import Ensemble, read_ensemble, write_ensemble


@dataclass
class Tiny:
    data: Path  # test.csv, test_labels.csv, train.csv, images/
    models: Path
    ensemble_path: Path

    def ensemble(self) -> Ensemble:
        return read_ensemble(self.ensemble_path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from cytologia.data.synthetic.generate import SynthConfig, generate
    from cytologia.runtime.bench import build_random_ensemble

    base = tmp_path_factory.mktemp("runtime")
    generate(base / "data", 20, seed=0, config=SynthConfig(size=192, test_fraction=0.9))
    path = build_random_ensemble(
        base / "models", det_size=128, classifiers=[("resnet10t", 32), ("resnet10t", 48)], folds=2, tta_flip=True
    )
    ens = read_ensemble(path)
    assert ens.detector is not None
    # a random detector scores every box ~0.001-0.01: an open-world threshold it can pass
    ens.detector.open_world_score = 0.005
    write_ensemble(ens, path)
    return Tiny(base / "data", base / "models", path)


@pytest.fixture(scope="session")
def yolox_tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """The smallest ensemble that runs every stage without the ultralytics extra: a random YOLOX-nano detector at
    64 px and one resnet10t classifier at 32 px (one fold, no TTA), ONNX files included; 12 generated images."""
    from cytologia.data.synthetic.generate import SynthConfig, generate
    from cytologia.runtime.bench import build_random_ensemble

    base = tmp_path_factory.mktemp("runtime_yolox")
    generate(base / "data", 12, seed=0, config=SynthConfig(size=160, test_fraction=0.9))
    path = build_random_ensemble(base / "models", detector="yolox_nano", det_size=64, classifiers=[("resnet10t", 32)])
    return Tiny(base / "data", base / "models", path)
