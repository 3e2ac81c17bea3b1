"""The winners' recipes in configs/ match RECIPES.md (the facts, read from its tables here), member by member; and
the whole-pipeline experiments wire their members as the stand-alone experiments do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import RECIPES_FILE, in_ci, require_file
from cytologia.pipeline import member_configs
from cytologia.recipes import compose_experiment

# RECIPES.md member (first column of the 1st place's classifier table) -> its stand-alone experiment
MEMBER_EXP = {
    "ViT-L": "vitl224",
    "ViT-L + background": "vitl224_bg",
    "NextViT-L": "nextvit384",
    "EfficientNetV2-M": "effnetv2m512",
    "TinyViT-21M": "tinyvit512",
    "DinoBloom-B": "dinobloom224",
    "multi-label EfficientNetV2-M": "ml_effnetv2m512_bg",
}


def _text() -> str:
    return require_file(RECIPES_FILE, "CYTOLOGIA_RECIPES", in_ci()).read_text()


def _table(text: str, after: str) -> list[dict[str, str]]:
    """The first markdown table after the line starting with ``after``, as rows keyed by header."""
    lines = text[text.index(after) :].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]  # rows[1] is the |---| line
    return [dict(zip(header, r)) for r in body]


def _first_number(cell: str) -> float:
    return float(re.search(r"\d+(?:\.\d+)?(?:e-?\d+)?", cell).group(0))


def _classifier_rows() -> list[dict[str, str]]:
    rows = _table(_text(), "### Classifiers")
    previous = ""
    for row in rows:  # "same" = the row above's backbone; the tag is in backticks
        cell = row["timm backbone (pretrained tag)"]
        tag = re.search(r"`([^`]+)`", cell)
        row["tag"] = tag.group(1) if tag else ("dinobloom_b" if "DinoBloom-B" in cell else previous)
        previous = row["tag"]
    return rows


def _check_member(cfg, row: dict[str, str]) -> None:
    c, t = cfg.classifier, cfg.trainer
    where = f"{cfg.exp_name} vs RECIPES.md row {row['member']!r}"
    assert c.weights == row["tag"], where
    assert c.name == row["tag"].split(".")[0], where
    assert c.img_size == int(_first_number(row["size"])), where
    assert (24 if c.background else 23) == int(_first_number(row["classes"])), where
    assert t.max_epochs == int(_first_number(row["epochs"])), (
        f"{where}: first stage's epochs (pseudo-label stages later)"
    )
    assert t.lr == pytest.approx(_first_number(row["lr"])), where
    assert t.batch_size == int(_first_number(row["batch"])), where
    notes = row["notes"]
    if "no TTA" in notes:
        assert cfg.ensemble.tta_flip is False, where
    if "hflip TTA" in notes:
        assert cfg.ensemble.tta_flip is True, where
    if "last 5 blocks" in notes:
        assert c.train_last_k == 5, where
    assert c.multilabel == row["member"].startswith("multi-label"), where
    if "focal BCE" in notes:
        alpha, gamma = re.search(r"α ([\d.]+) γ ([\d.]+)", notes).groups()
        assert c.loss.name == "focal_multilabel" and c.loss.gamma == float(gamma), where
        assert c.loss.alpha is None and float(alpha) == 1.0, where  # alpha None = 1 for every label
    else:
        assert c.loss.name == "cross_entropy" and c.loss.label_smoothing == 0.0, f"{where}: no label smoothing"
    # the common line: AdamW with torch's default weight decay, cosine without warm-up, crop + 16 px margin,
    # CutMix (alpha 1.0) and MixUp (alpha 0.2) on 25 % of the batches each
    common = _text()[_text().index("### Classifiers") :]
    assert "wd 0.01" in common and "no warm-up" in common and "16 px margin" in common
    assert t.weight_decay == 0.01 and t.warmup_epochs == 0 and c.margin == 16, where
    assert (c.augment.cutmix_alpha, c.augment.mixup_alpha, c.augment.mix_prob) == (1.0, 0.2, 0.5), where
    assert t.select == "best_val", f"{where}: best checkpoint by validation macro-F1"


def test_the_table_has_the_seven_members() -> None:
    assert [r["member"] for r in _classifier_rows()] == list(MEMBER_EXP)


@pytest.mark.parametrize("member", list(MEMBER_EXP))
def test_each_first_place_experiment_matches_its_row(member: str) -> None:
    row = next(r for r in _classifier_rows() if r["member"] == member)
    overrides = ["classifier.background_table=bg.csv"] if MEMBER_EXP[member].endswith("_bg") else []
    _check_member(compose_experiment(MEMBER_EXP[member], overrides), row)


def test_first_place_pipeline_members_match_their_rows_and_experiments(tmp_path: Path) -> None:
    cfg = compose_experiment("first_place")
    members = {m.exp_name: m for m in member_configs(cfg, tmp_path, tmp_path / "bg.csv", tmp_path / "crop.csv")}
    assert list(members) == list(MEMBER_EXP.values())
    for row in _classifier_rows():
        member = members[MEMBER_EXP[row["member"]]]
        _check_member(member, row)
        alone = compose_experiment(MEMBER_EXP[row["member"]], ["classifier.background_table=x.csv"])
        for key in ("name", "img_size", "weights", "drop_path", "train_last_k", "background", "multilabel", "loss"):
            assert member.classifier[key] == alone.classifier[key], (member.exp_name, key)
        assert member.ensemble.tta_flip == alone.ensemble.tta_flip, member.exp_name
        # crop members crop the crop detector's boxes; the multi-label member sees the full image
        assert member.classifier.boxes == (None if member.classifier.multilabel else str(tmp_path / "crop.csv"))
        assert (member.classifier.background_table is not None) == member.classifier.background


def test_first_place_detectors_and_background_match_the_recipe() -> None:
    text = _text()
    rows = {r[""]: r for r in _table(text, "### Detector")}
    cfg = compose_experiment("first_place")
    det, crop = cfg.detector, cfg.pipeline.crop_detector
    size, epochs = rows["input size"], rows["epochs / last epochs without augmentation"]
    assert det.img_size == int(size["test-time boxes"]) and crop["img_size"] == int(
        size["crops for classifier training"]
    )
    test_time, for_crops = (re.findall(r"\d+", epochs[k]) for k in ("test-time boxes", "crops for classifier training"))
    assert [det.epochs, det.train_args.no_aug_epochs] == [int(v) for v in test_time]
    assert [crop["epochs"], crop["train_args"]["no_aug_epochs"]] == [int(v) for v in for_crops]
    assert (det.model, det.weights, det.train_args.box_loss) == ("yolox_s", "yolox_s", "giou")
    assert "lr 0.01/64 per image (0.0025 at\nbatch 16)" in text and (det.lr, det.batch_size) == (0.0025, 16)
    assert "NMS IoU 0.30" in text and det.nms_iou == 0.30 and det.conf == 0.001
    assert det.train_args.weight_decay == 5e-4 and det.train_args.warmup_epochs == 5
    n_bg = int(
        re.search(r"^([\d,]+) single-cell images", text[text.index("### Background images") :], re.M)[1].replace(
            ",", ""
        )
    )
    assert cfg.pipeline.n_background == n_bg
    assert cfg.pipeline.clean and cfg.pipeline.two_stage and not cfg.pipeline.single_stage.enabled


def test_first_place_blend_keeps_their_groups() -> None:
    # RECIPES.md "Blend": four groups of 0.25 (EffNetV2-M; mean(ViT-L, ViT-L + background, DinoBloom-B); NextViT-L;
    # TinyViT); the multi-label share on single-cell images is tuned (theirs 0.543, by grid search on OOF)
    text = _text()[_text().index("### Blend") :]
    assert "Groups with weight 0.25 each" in text and "mean(ViT-L, ViT-L + background, DinoBloom-B)" in text
    w = dict(compose_experiment("first_place").pipeline.member_weights)
    total = sum(w.values())
    assert w["effnetv2m512"] / total == w["nextvit384"] / total == w["tinyvit512"] / total == 0.25
    assert (w["vitl224"] + w["vitl224_bg"] + w["dinobloom224"]) / total == 0.25
    assert w["vitl224"] == w["vitl224_bg"] == w["dinobloom224"]
    assert "ml_effnetv2m512_bg" not in w  # the multi-label member's share is tuned


def test_third_place_is_the_single_stage_yolo11m_at_384() -> None:
    text = _text()[_text().index("## 3rd place") :]
    assert "one `yolo11m` 384" in text
    cfg = compose_experiment("third_place")
    ss = cfg.pipeline.single_stage
    assert not cfg.pipeline.two_stage and ss.enabled
    assert (ss.model, ss.img_size, ss.weights) == ("yolo11m", 384, "yolo11m")


def test_second_place_uses_focal_loss_and_bbox_aware_augmentation(tmp_path: Path) -> None:
    text = _text()[_text().index("## 2nd place") :]
    assert "focal loss" in text and "bounding-box-aware augmentation" in text
    cfg = compose_experiment("second_place")
    members = member_configs(cfg, tmp_path, tmp_path / "bg.csv", None)
    assert len(members) * cfg.folds.k == 12  # 12 classifiers = 3 members x 4 folds
    assert "blend by equal weights" in text and set(cfg.pipeline.member_weights.values()) == {1}
    assert set(cfg.pipeline.member_weights) == {m.exp_name for m in members}
    for m in members:
        assert m.classifier.loss.name == "focal" and m.classifier.augment.bbox_aware_p > 0
        assert m.classifier.weights == "tf_efficientnetv2_m.in21k"
