"""Fixtures of the YOLOX tests: a few generated smear images with their boxes, and checkpoints written on the spot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch


@dataclass
class TinySet:
    """Generated JPEGs and their clean boxes (``NAME, x1, y1, x2, y2, img_w, img_h``)."""

    image_dir: Path
    table: pd.DataFrame

    @property
    def names(self) -> list[str]:
        return sorted(pd.unique(self.table["NAME"]))

    @property
    def paths(self) -> list[Path]:
        return [self.image_dir / n for n in self.names]


def make_set(out_dir: Path, n: int, size: int, seed: int = 0) -> TinySet:
    """``n`` images of ``size`` px with 1-2 cells each, from the synthetic renderer."""
    from cytologia.data.schema import CLASSES
    from cytologia.data.synthetic.render import encode_jpeg, render_scene
    from cytologia.data.synthetic.sources import SOURCES

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        source = SOURCES[i % len(SOURCES)]
        classes = [str(c) for c in rng.choice(CLASSES, size=1 + i % 2)]
        scene = render_scene(rng, source, classes, size)
        name = f"img_{i:03d}.jpg"
        (out_dir / name).write_bytes(encode_jpeg(scene.image, source))
        rows += [(name, *map(float, b), size, size) for b in scene.boxes.tolist()]
    table = pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "img_w", "img_h"])
    return TinySet(out_dir, table)


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> TinySet:
    return make_set(tmp_path_factory.mktemp("yolox_images"), n=8, size=96)


@pytest.fixture(scope="session")
def confident_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A yolox_nano checkpoint with random weights that gives varied, confident scores, so that prediction, NMS and
    export have boxes to compare: class/objectness biases at probability 0.3, their weights spread (std 0.1), and
    batch-norm statistics measured on a batch of noise images (left at mean 0 / variance 1, an untrained network's
    features are nearly constant over the image, and statistics measured on flat images make it ill-conditioned)."""
    from cytologia.detection.yolox.checkpoint import save_checkpoint
    from cytologia.detection.yolox.model import build_yolox

    torch.manual_seed(0)
    model = build_yolox("yolox_nano")
    model.head.initialize_biases(0.3)
    for conv in (*model.head.cls_preds, *model.head.obj_preds):
        torch.nn.init.normal_(conv.weight, std=0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of exactly this batch
    model.train()
    with torch.no_grad():
        model.raw(255 * torch.rand(8, 3, 96, 96))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.03
    path = tmp_path_factory.mktemp("yolox_ckpt") / "detector.pt"
    return save_checkpoint(path, model.eval(), "yolox_nano", img_size=96, epoch=1, metrics={}, train_args={})
