"""The winners' whole-pipeline recipes in miniature on CPU: the same stages and wiring as ``+exp=first_place`` /
``second_place`` / ``third_place`` (member names, background and multi-label members, freezing, per-member TTA, the
crop detector, known-count prediction), with tiny backbones (timm's test_* models), 64 px detectors, one epoch, a
generated set -- so a broken link between stages fails here, not in a 100-GPU-hour run.

Slow (minutes on a 2-core CPU: 7 members x 2 folds and two detectors x 2 folds): ``pytest -m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from cytologia.classification.oof import read_oof
from cytologia.data.io import read_submission, read_test
from cytologia.train import train

# each winner backbone -> a tiny stand-in of the same family (timm's test models)
TINY = {
    "vit_large_patch16_224": "test_vit",
    "dinobloom_b": "test_vit",
    "nextvit_large": "test_convnext",
    "tiny_vit_21m_512": "test_convnext",
    "tf_efficientnetv2_m": "test_efficientnet",
}
SMALL_DETECTOR = {
    "model": "yolox_nano",
    "img_size": 64,
    "epochs": 1,
    "batch_size": 8,
    "weights": "random",
    "device": "cpu",
    "workers": 0,
    "predict_batch": 8,
    "optimizer": "AdamW",
    "lr": 0.002,
}
SMALL_TRAIN_ARGS = {"no_aug_epochs": 0, "multiscale": 0.0, "precise_bn_images": 8, "warmup_epochs": 0}


def _miniature(exp: str, tmp_path: Path, *extra: str):
    """The composed recipe with tiny sizes: every member keeps its exp name, background / multi-label / loss / TTA
    / freezing wiring; backbones become test models at 32 px, one epoch; random weights (explicitly)."""
    from cytologia.recipes import compose_experiment

    overrides = [
        "data=synthetic",
        "data.n_images=30",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "folds.k=2",
        "trainer=cpu_tiny",
        "trainer.progress_bar=false",
        *extra,
    ]
    cfg = OmegaConf.to_container(compose_experiment(exp, overrides), resolve=True)
    p = cfg["pipeline"]
    for member in p["classifiers"]:
        member["name"] = TINY.get(member["name"], member["name"])
        member.update(img_size=32, weights="random", drop_path=0.0)
        member["trainer"] = {"max_epochs": 1, "batch_size": 8, "lr": 1e-3}
        if member.get("train_last_k") is not None:
            member["train_last_k"] = 1
    if p["two_stage"]:
        cfg["detector"].update(SMALL_DETECTOR if cfg["detector"]["backend"] == "yolox" else {})
        cfg["detector"]["train_args"].update(SMALL_TRAIN_ARGS if cfg["detector"]["backend"] == "yolox" else {})
    if p["crop_detector"] is not None:
        p["crop_detector"] = {**SMALL_DETECTOR, "train_args": SMALL_TRAIN_ARGS}
    p["n_background"] = min(p["n_background"], 6)
    return OmegaConf.create(cfg)


@pytest.mark.slow
def test_first_place_miniature_runs_every_stage(tmp_path: Path) -> None:
    cfg = _miniature("first_place", tmp_path)
    run = tmp_path / "run"
    train(cfg, run_dir=run)
    members = [
        "vitl224",
        "vitl224_bg",
        "nextvit384",
        "effnetv2m512",
        "tinyvit512",
        "dinobloom224",
        "ml_effnetv2m512_bg",
    ]
    for path in ("detector/oof_boxes.csv", "crop_detector/crop_boxes.csv", "background/background.csv"):
        assert (run / path).is_file(), path
    crops = pd.read_csv(run / "crop_detector" / "crop_boxes.csv")
    train_csv = pd.read_csv(tmp_path / "data" / "synthetic" / "train.csv")  # the generated set
    assert crops.groupby("NAME").size().to_dict() == train_csv.groupby("NAME").size().to_dict()  # known count
    for m in members:
        saved = OmegaConf.load(run / f"cls_{m}" / "config.yaml")
        assert saved.exp_name == m
        models = set(read_oof(run / f"cls_{m}" / "oof_logits.csv")["model"])
        if m.startswith("ml_"):
            assert saved.classifier.multilabel and saved.classifier.boxes is None
        else:  # crop members crop the crop detector's boxes
            assert saved.classifier.boxes == str(run / "crop_detector" / "crop_boxes.csv")
            assert (f"{m}+hflip" in models) == (m not in ("effnetv2m512", "tinyvit512")), m  # per-member TTA
        assert saved.classifier.background == m.endswith("_bg")
    assert OmegaConf.load(run / "cls_dinobloom224" / "config.yaml").classifier.train_last_k == 1
    ensemble = json.loads((run / "ensemble" / "ensemble.json").read_text())
    kinds = sorted(mm["kind"] for mm in ensemble["members"])
    assert kinds == ["cell"] * 6 + ["multilabel"]
    weights = {mm["oof_model"].split("+")[0]: mm["weight"] for mm in ensemble["members"] if mm["kind"] == "cell"}
    assert weights["effnetv2m512"] == pytest.approx(0.25) and weights["vitl224"] == pytest.approx(0.25 / 3)  # groups
    data = tmp_path / "data" / "synthetic"
    sub = read_submission(run / "predict" / "submission.csv", test=read_test(data / "test.csv"))
    assert len(sub) == len(pd.read_csv(data / "test.csv"))


@pytest.mark.slow
@pytest.mark.ultralytics
def test_third_place_miniature_is_the_single_stage_model_alone(tmp_path: Path) -> None:
    extra = [
        "pipeline.single_stage.img_size=64",
        "pipeline.single_stage.epochs=1",
        "pipeline.single_stage.batch_size=8",
        "pipeline.single_stage.weights=random",
        "pipeline.single_stage.model=yolo11n",
        "detector.device=cpu",
    ]
    cfg = _miniature("third_place", tmp_path, *extra)
    run = tmp_path / "run"
    result = train(cfg, run_dir=run)
    assert (run / "baselines" / "single_stage" / "submission.csv").is_file()
    assert not (run / "detector").exists() and not list(run.glob("cls_*"))
    assert set(result["scores"]) == {"single-stage", "null"}
    assert (run / "report" / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.ultralytics
def test_second_place_miniature_runs(tmp_path: Path) -> None:
    extra = [
        "detector.model=yolo11n",
        "detector.weights=random",
        "detector.img_size=64",
        "detector.epochs=1",
        "detector.batch_size=8",
        "detector.device=cpu",
        "detector.workers=0",
        "detector.predict_batch=8",
    ]
    cfg = _miniature("second_place", tmp_path, *extra)
    run = tmp_path / "run"
    train(cfg, run_dir=run)
    for m in ("effv2m224_focal", "effv2m256_focal", "effv2m288_focal"):
        saved = OmegaConf.load(run / f"cls_{m}" / "config.yaml")
        assert saved.classifier.loss.name == "focal" and saved.classifier.augment.bbox_aware_p > 0
    assert (run / "predict" / "submission.csv").is_file()
