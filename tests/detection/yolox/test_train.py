"""Training: options, schedule, EMA, multi-scale sides, a few steps on generated images lowering the loss, and a
whole (tiny) fold trained through the backend with checkpoint selection on the box term."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cytologia.detection import DetectionData, TrainSettings, create_detector
from cytologia.detection.yolox.augment import AugmentConfig, DetectionDataset, Sample, collate
from cytologia.detection.yolox.checkpoint import load_trained
from cytologia.detection.yolox.losses import yolox_loss
from cytologia.detection.yolox.model import build_yolox
from cytologia.detection.yolox.train import (
    KC_METRIC,
    ModelEMA,
    WarmCosine,
    build_optimizer,
    make_split,
    multiscale_sides,
    parse_train_args,
    precise_bn,
    resize_batch,
)
from cytologia.errors import CytologiaInputError

NO_AUG = AugmentConfig(mosaic_prob=0.0, mixup_prob=0.0, flip_lr=0.0, flip_ud=0.0, hsv_prob=0.0)


def test_train_args_are_checked() -> None:
    args = parse_train_args({"box_loss": "iou", "mosaic_scale": [0.3, 1.2], "no_aug_epochs": 2.0, "l1_loss": False})
    assert args.box_loss == "iou" and args.augment.mosaic_scale == (0.3, 1.2) and args.no_aug_epochs == 2
    assert parse_train_args({}).box_loss == "giou"  # the default
    with pytest.raises(CytologiaInputError, match=r"train_args\.mosaic_prb .*closest: mosaic_prob"):
        parse_train_args({"mosaic_prb": 0.5})
    with pytest.raises(CytologiaInputError, match="box_loss"):
        parse_train_args({"box_loss": "ciou"})
    with pytest.raises(CytologiaInputError, match="l1_loss"):
        parse_train_args({"l1_loss": "yes"})
    with pytest.raises(CytologiaInputError, match="mosaic_scale"):
        parse_train_args({"mosaic_scale": [1.0]})
    with pytest.raises(CytologiaInputError, match=r"flip_ud=1\.5"):
        parse_train_args({"flip_ud": 1.5})
    with pytest.raises(CytologiaInputError, match="assign_mode"):
        parse_train_args({"assign_mode": "topk"})


def test_warm_cosine_schedule() -> None:
    s = WarmCosine(lr=0.01, total_iters=100, warmup_iters=10, flat_iters=20, min_lr_ratio=0.05)
    assert s(5) == pytest.approx(0.01 * 0.25)  # quadratic warm-up
    assert s(10) == pytest.approx(0.01)
    assert s(45) == pytest.approx(0.0005 + 0.5 * 0.0095)  # half-way through the cosine
    assert s(80) == s(100) == pytest.approx(0.0005)  # flat tail
    values = [s(i) for i in range(10, 81)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_multiscale_sides_and_batch_resize() -> None:
    assert multiscale_sides(640, 0.25) == list(range(480, 801, 32))  # YOLOX's +-5 x 32 px at 640 px
    assert multiscale_sides(512, 0.25) == list(range(384, 641, 32))
    assert multiscale_sides(64, 0.25) == [64]
    images = torch.zeros(2, 3, 64, 64)
    out, targets = resize_batch(images, [torch.tensor([[0, 32.0, 32.0, 10.0, 20.0]]), torch.zeros(0, 5)], 96)
    assert out.shape == (2, 3, 96, 96)
    torch.testing.assert_close(targets[0], torch.tensor([[0, 48.0, 48.0, 15.0, 30.0]]))


def test_ema_ramps_up() -> None:
    model = torch.nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.9998, tau=2000)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    d = 0.9998 * (1 - math.exp(-1 / 2000))  # tiny at first: the EMA follows the model
    expected = d * (model.weight - 1.0) + (1 - d) * model.weight
    torch.testing.assert_close(ema.module.weight, expected)


def test_precise_bn_measures_the_statistics_of_the_weights(tiny_set) -> None:
    """After precise BN on one batch, every running mean / variance is that batch's statistics of the layer's input
    (stale values before are gone), and the momentum is restored."""
    samples = [
        Sample(p, g[["x1", "y1", "x2", "y2"]].to_numpy(np.float32))
        for p, (_, g) in zip(tiny_set.paths, tiny_set.table.groupby("NAME", sort=True))
    ]
    ds = DetectionDataset(samples, 64, NO_AUG)
    model = build_yolox("yolox_nano")
    bns = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in bns.values():
        m.running_mean.add_(5.0)  # stale statistics
    precise_bn(model, ds, torch.device("cpu"), n_images=len(ds), batch_size=len(ds))
    assert all(m.momentum == 0.03 for m in bns.values())
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
        for name, m in bns.items()
    ]
    images, _ = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        model.train().raw(images.float())  # the same inputs, layer by layer (weights unchanged)
    for h in hooks:
        h.remove()
    for name, m in bns.items():
        x = seen[name]
        torch.testing.assert_close(m.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(m.running_var, x.var(dim=(0, 2, 3)), rtol=1e-3, atol=1e-4, msg=name)


def test_a_few_steps_on_generated_images_lower_the_loss(tiny_set) -> None:
    samples = [
        Sample(p, g[["x1", "y1", "x2", "y2"]].to_numpy(np.float32))
        for p, (_, g) in zip(tiny_set.paths, tiny_set.table.groupby("NAME", sort=True))
    ]
    images, targets = collate([DetectionDataset(samples, 64, NO_AUG)[i] for i in range(len(samples))])
    torch.manual_seed(0)
    model = build_yolox("yolox_nano").train()
    optimizer = build_optimizer(model, "AdamW", 3e-3, 0.9, 5e-4)
    losses = []
    for _ in range(12):
        raw, grid, strides = model.raw(images.float())
        loss = yolox_loss(raw, grid, strides, targets)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        losses.append(float(loss.total.detach()))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses  # measured: 10.26 -> 8.58


def _folds(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"NAME": names, "fold": [i % 2 for i in range(len(names))]})


def test_a_fold_trains_and_selects_on_the_box_term(tiny_set, tmp_path: Path) -> None:
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
        extra={"no_aug_epochs": 1, "warmup_epochs": 1, "multiscale": 0.5},
    )
    detector = create_detector("yolox", "yolox_nano")
    result = detector.train(data, tmp_path / "fold_0", settings)
    assert result.weights == tmp_path / "fold_0" / "detector.pt" and detector.checkpoint == result.weights
    assert result.n_train_images == 4 and result.n_val_images == 4 and len(result.history) == 2
    scores = [row[KC_METRIC] for row in result.history]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert result.best_epoch == max(range(1, 3), key=lambda e: (scores[e - 1], e))
    assert result.metrics[KC_METRIC] == max(scores)
    run_dir = tmp_path / "fold_0" / "yolox"
    assert {"best.pt", "last.pt", "results.csv", "args.yaml"} <= {p.name for p in run_dir.iterdir()}
    assert len(pd.read_csv(run_dir / "results.csv")) == 2
    _, info = load_trained(result.weights)
    assert info["epoch"] == result.best_epoch and info["train_args"]["no_aug_epochs"] == 1
    assert json.dumps(result.history)  # plain floats, as the stage writes them to metrics.json
    boxes = detector.predict(tiny_set.paths[:2], img_size=64, conf=0.0, device="cpu")
    assert len(boxes) > 0


def test_split_errors_name_the_images(tiny_set, tmp_path: Path) -> None:
    names = tiny_set.names
    kw = {"image_dir": tiny_set.image_dir, "cache_dir": tmp_path}
    split = make_split(DetectionData(table=tiny_set.table, folds=_folds(names), fold=1, **kw))
    assert len(split.train) == 4 and split.val_names == names[1::2]
    assert set(split.val_truth["NAME"]) <= set(names[1::2])
    with pytest.raises(CytologiaInputError, match=f"have no fold: {names[0]}"):
        make_split(DetectionData(table=tiny_set.table, folds=_folds(names)[1:], fold=1, **kw))
    with pytest.raises(CytologiaInputError, match="fold 5 holds no image"):
        make_split(DetectionData(table=tiny_set.table, folds=_folds(names), fold=5, **kw))
    extra = pd.concat([_folds(names), pd.DataFrame({"NAME": ["ghost.jpg"], "fold": [0]})])
    with pytest.raises(CytologiaInputError, match="ghost.jpg"):
        make_split(DetectionData(table=tiny_set.table, folds=extra, fold=1, **kw))


def test_time_limit_replans_the_run(tiny_set, tmp_path: Path) -> None:
    data = DetectionData(
        table=tiny_set.table,
        folds=_folds(tiny_set.names),
        image_dir=tiny_set.image_dir,
        fold=0,
        cache_dir=tmp_path / "cache",
    )
    settings = TrainSettings(
        epochs=5,
        img_size=64,
        batch_size=4,
        lr=1e-3,
        optimizer="AdamW",
        device="cpu",
        workers=0,
        extra={"time_limit_s": 0.01, "multiscale": 0.0},
    )
    result = create_detector("yolox", "yolox_nano").train(data, tmp_path / "fold_0", settings)
    assert len(result.history) == 1 and result.best_epoch == 1  # the first epoch alone overruns 0.01 s
