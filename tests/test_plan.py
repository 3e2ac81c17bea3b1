"""`cytologia plan`: stages in order, images seen, FLOPs-based GPU-hours, weights and resume state, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cytologia import plan as plan_mod
from cytologia.cli import main
from cytologia.plan import GPUS, ModelCost, plan_experiment, table_lines


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A data folder with 8 training images (10 boxes) and 4 test images (5 rows): counts only, no pixels."""
    root = tmp_path / "data"
    root.mkdir()
    names = [f"img{i}.jpg" for i in range(8)] + ["img0.jpg", "img1.jpg"]
    pd.DataFrame({"NAME": names, "x1": 1, "y1": 1, "x2": 9, "y2": 9, "class": "LY"}).to_csv(root / "train.csv")
    test = ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg", "t0.jpg"]
    pd.DataFrame({"trustii_id": range(5), "NAME": test}).to_csv(root / "test.csv", index=False)
    return root


@pytest.fixture
def fake_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model costs 10 GFLOPs and has 1 M parameters (half trainable with train_last_k): the arithmetic alone."""

    def classifier(name: str, img_size: int, num_classes: int, train_last_k: int | None = None) -> ModelCost:
        return ModelCost(name, img_size, 1_000_000, 500_000 if train_last_k is not None else 1_000_000, 10.0)

    def detector(backend: str, model: str, img_size: int, num_classes: int = 1) -> ModelCost:
        return ModelCost(model, img_size, 1_000_000, 1_000_000, 10.0)

    monkeypatch.setattr(plan_mod, "classifier_cost", classifier)
    monkeypatch.setattr(plan_mod, "detector_cost", detector)


def test_first_place_plan_lists_the_stages_in_order_with_their_images(
    tiny_data: Path, fake_costs: None, tmp_path: Path
) -> None:
    plan = plan_experiment(["+exp=first_place", f"data.root={tiny_data}", f"paths.models_dir={tmp_path / 'm'}"])
    names = [s.name for s in plan.stages]
    members = [
        "vitl224",
        "vitl224_bg",
        "nextvit384",
        "effnetv2m512",
        "tinyvit512",
        "dinobloom224",
        "ml_effnetv2m512_bg",
    ]
    assert names == [
        "data",
        "detector",
        "clean",
        "crop detector",
        "background",
        *(f"classifier {m}" for m in members),
        "ensemble",
        "predict",
        "report",
    ]
    assert (plan.data.train_images, plan.data.train_boxes, plan.data.test_images, plan.data.test_rows) == (8, 10, 4, 5)
    by = {s.name: s for s in plan.stages}
    det = by["detector"]  # 4 folds x 150 epochs x 6 training images (8 * 3 // 4); held-out scoring + OOF pass
    assert (det.epochs, det.folds, det.train_samples) == (150, 4, 6 * 150 * 4)
    assert det.eval_samples == 8 * 150 + 8
    flops = 10.0 * (3 * det.train_samples + det.eval_samples) * 1e9
    assert det.gpu_hours == pytest.approx(flops / (GPUS["rtx3090"][1] * 1e12 * 0.30) / 3600)
    assert "80 h" in det.reported  # the winner's own figure beside the estimate
    vit = by["classifier vitl224"]  # 10 boxes: 7 per training fold (10 * 3 // 4), 32 epochs; +flip OOF pass
    assert (vit.train_samples, vit.eval_samples, vit.tta_flip) == (7 * 32 * 4, 10 * 32 + 10 * 2, True)
    bg = by["classifier vitl224_bg"]  # + 3,469 background crops, 3/4 of them per training fold
    assert bg.train_samples == (7 + 3469 * 3 // 4) * 32 * 4
    dino = by["classifier dinobloom224"]  # half the parameters trained: 1 + 2 x 0.5 forward passes per sample
    assert dino.gpu_hours == pytest.approx(
        10.0 * (2 * dino.train_samples + dino.eval_samples) * 1e9 / (35.6e12 * 0.3) / 3600
    )
    ml = by["classifier ml_effnetv2m512_bg"]
    assert ml.full_image and ml.train_samples == (6 + 3469 * 3 // 4) * 32 * 4
    assert by["classifier effnetv2m512"].tta_flip is False
    assert set(plan.missing_weights) == {
        "yolox_s",
        "vit_large_patch16_224.augreg_in21k_ft_in1k",
        "nextvit_large.bd_ssld_6m_in1k_384",
        "tf_efficientnetv2_m.in21k",
        "tiny_vit_21m_512.dist_in22k_ft_in1k",
        "dinobloom_b",
    }
    # prediction: 4 fold models of the detector on the 4 test images, of each crop member on the 5 rows (x 2 with
    # flip), of the multi-label member on the 4 images (x 2)
    crop_passes = sum(2 if by[f"classifier {m}"].tta_flip else 1 for m in members[:-1])
    expected = 10.0 * 4 * (4 + 5 * crop_passes + 4 * 2) * 1e9
    assert by["predict"].gpu_hours == pytest.approx(expected / (35.6e12 * 0.3) / 3600)
    assert plan.gpu_hours == pytest.approx(sum(s.gpu_hours for s in plan.stages))
    text = "\n".join(table_lines(plan))
    assert "| 2 | detector | yolox_s @ 512 |" in text and "cytologia weights pull" in text and "from FLOPs" in text


def test_a_run_folder_marks_done_and_partial_stages(tiny_data: Path, fake_costs: None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for f in ("detector/oof_boxes.csv", "clean/train_clean.csv", "cls_vitl224/summary.json"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("x")
    (run / "cls_nextvit384" / "fold_1").mkdir(parents=True)
    (run / "cls_nextvit384" / "fold_1" / "result.json").write_text("{}")
    plan = plan_experiment(["+exp=first_place", f"data.root={tiny_data}"], run_dir=run)
    done = {s.name: s.done for s in plan.stages}
    assert done["detector"] == done["clean"] == done["classifier vitl224"] == "done"
    assert done["classifier nextvit384"] == "partial (1/4 folds)"
    assert done["crop detector"] == done["classifier tinyvit512"] == done["predict"] == "todo"


def test_third_place_plan_is_the_single_stage_model(tiny_data: Path, fake_costs: None) -> None:
    plan = plan_experiment(["+exp=third_place", f"data.root={tiny_data}"])
    assert [s.name for s in plan.stages] == ["data", "single-stage model", "report"]
    ss = plan.stages[1]
    assert (ss.model.arch, ss.model.img_size, ss.weights) == ("yolo11m", 384, "yolo11m")


def test_costs_are_counted_on_the_meta_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from cytologia.classification.models import create_classifier

    monkeypatch.setenv("CYTOLOGIA_CACHE", str(tmp_path / "cache"))
    plan_mod.classifier_cost.cache_clear()
    cost = plan_mod.classifier_cost("resnet10t", 64, 23)
    real = create_classifier("resnet10t", 23, img_size=64).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        real(torch.zeros(1, 3, 64, 64))
    assert cost.params == sum(p.numel() for p in real.parameters())
    assert cost.gflops == pytest.approx(counter.get_total_flops() / 1e9) and cost.gflops > 0
    assert (tmp_path / "cache" / "plan_costs.json").is_file()  # counted once, then read back
    plan_mod.classifier_cost.cache_clear()
    assert plan_mod.classifier_cost("resnet10t", 64, 23) == cost
    frozen = plan_mod.classifier_cost("resnet10t", 64, 23, train_last_k=1)
    assert 0 < frozen.trainable < frozen.params


def test_plan_command_prints_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("CYTOLOGIA_CACHE", str(tmp_path / "cache"))
    args = ["plan", "+exp=smoke", "classifier.name=resnet10t", f"paths.data_dir={tmp_path}", "--json", "--gpu", "t4"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    (stage,) = data["stages"]
    assert stage["name"] == "classifier smoke" and stage["model"]["arch"] == "resnet10t"
    assert data["gpu"].startswith("NVIDIA T4") and data["gpu_hours"] > 0 and stage["weights_state"] == "random"
    assert main(["plan", "+exp=no_such_experiment"]) == 2
