"""Weight files: official-layout initial weights (class head skipped by shape, strict otherwise), the manifest check,
this backend's trained checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cytologia.detection import create_detector, load_detector
from cytologia.detection.yolox.checkpoint import (
    init_from_weights,
    is_checkpoint,
    load_trained,
    read_checkpoint,
    save_checkpoint,
)
from cytologia.detection.yolox.model import build_yolox
from cytologia.errors import CytologiaInputError
from cytologia.weights import add_to_manifest


def official_file(path: Path, name: str = "yolox_nano", classes: int = 80, prefix: str = "") -> dict:
    """A file in the layout of the official release: {"model": state dict, "optimizer": ..., "start_epoch": ...}."""
    torch.manual_seed(7)
    model = build_yolox(name, num_classes=classes)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "start_epoch": 300}, path)
    return state


def test_official_layout_loads_with_the_80_class_head_skipped(tmp_path: Path) -> None:
    path = tmp_path / "yolox_nano.pth"
    state = official_file(path)
    model = build_yolox("yolox_nano")  # 1 class
    head_before = model.head.cls_preds[0].weight.clone()
    report = init_from_weights(model, path)
    assert sorted(report.skipped) == sorted(f"head.cls_preds.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    assert len(report.loaded) == len(state) - 6
    own = model.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(own[key], state[key])
    torch.testing.assert_close(model.head.cls_preds[0].weight, head_before)  # left at its init
    assert model.head.cls_preds[0].weight.shape == (1, 64, 1, 1)


def test_data_parallel_prefix_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "dp.pth"
    official_file(path, prefix="module.")
    assert init_from_weights(build_yolox("yolox_nano"), path).loaded


def test_loading_is_strict_outside_the_class_head(tmp_path: Path) -> None:
    wrong_size = tmp_path / "tiny.pth"
    official_file(wrong_size, name="yolox_tiny")
    with pytest.raises(CytologiaInputError, match=r"tiny\.pth.*(shape mismatch|missing)"):
        init_from_weights(build_yolox("yolox_nano"), wrong_size)
    partial = tmp_path / "partial.pth"
    state = official_file(partial)
    del state["backbone.lateral_conv0.bn.running_var"]
    torch.save({"model": state}, partial)
    with pytest.raises(CytologiaInputError, match="lateral_conv0.bn.running_var"):
        init_from_weights(build_yolox("yolox_nano"), partial)
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(CytologiaInputError, match="no YOLOX state dict"):
        init_from_weights(build_yolox("yolox_nano"), junk)


def test_backend_initial_weights_are_checked_against_the_manifest(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    path = models / "yolox_nano.pth"
    state = official_file(path)
    detector = create_detector("yolox", "yolox_nano", weights=path)
    with pytest.raises(CytologiaInputError, match="manifest"):
        detector.build()
    add_to_manifest(path, source="test", directory=models)
    net = detector.build()
    torch.testing.assert_close(
        net.state_dict()["backbone.backbone.stem.conv.conv.weight"], state["backbone.backbone.stem.conv.conv.weight"]
    )
    path.write_bytes(path.read_bytes()[:-10])  # altered after registration
    with pytest.raises(CytologiaInputError, match="size|sha256"):
        detector.build()


def test_trained_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_yolox("yolox_nano")
    path = save_checkpoint(
        tmp_path / "detector.pt",
        model,
        "yolox_nano",
        img_size=96,
        epoch=4,
        metrics={"metrics/known_count_giou": 0.8},
        train_args={"box_loss": "giou"},
    )
    assert is_checkpoint(path)
    loaded, info = load_trained(path)
    assert info["epoch"] == 4 and info["img_size"] == 96 and info["metrics"]["metrics/known_count_giou"] == 0.8
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    detector = load_detector(path)
    assert detector.model == "yolox_nano" and detector.backend == "yolox"


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    official = tmp_path / "yolox_nano.pth"
    official_file(official)
    assert not is_checkpoint(official)
    with pytest.raises(CytologiaInputError, match=r"yolox_nano\.pth.*detector.weights"):
        read_checkpoint(official)
    pickled = tmp_path / "object.pt"
    torch.save({"format": "cytologia-yolox", "thing": Path("x")}, pickled)  # an arbitrary Python object
    with pytest.raises(CytologiaInputError, match="refusing to unpickle"):
        read_checkpoint(pickled)
    with pytest.raises(CytologiaInputError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(CytologiaInputError, match="broken.pt"):
        read_checkpoint(broken)
