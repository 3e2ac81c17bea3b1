"""The multi-label full-image classifier: letterboxed whole images with multi-hot targets, the sigmoid-loss module
and its single-cell metric, the per-box OOF table marked "ml:", and ``train(cfg)`` of the ml_effnetv2m512_bg
experiment end to end on generated images (with and without background images)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from cytologia.classification.datamodule import CropSource, FullImageDataModule
from cytologia.classification.fullimage import (
    FullImageDataset,
    background_image_table,
    build_image_transforms,
    image_table,
    letterbox,
)
from cytologia.classification.module import (
    ClassifierModule,
    average_precision,
    decay_groups,
    mean_average_precision,
    predict_logits,
)
from cytologia.classification.oof import logits_of, make_oof_table, read_oof, validate_oof, write_oof
from cytologia.classification.stage import check_supported
from cytologia.config import check_config
from cytologia.data.schema import BACKGROUND, CLASSES, labels
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = "test_convnext"  # timm's 209k-parameter test ConvNeXt: the fastest of its test networks on CPU
EXP = "ml_effnetv2m512_bg"


# ------------------------------------------------------------------------------------------------------- letterbox
def test_letterbox_pads_the_short_side_with_the_border_colour() -> None:
    image = np.full((20, 40, 3), (200, 180, 190), np.uint8)  # a wide smear: background colour everywhere ...
    image[5:15, 15:25] = (40, 30, 120)  # ... and one dark square "cell" in the middle
    out = letterbox(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # 40 px wide -> 16: the 20 px height becomes 8 rows, centred: rows 4..11 hold the image, the rest is padding.
    np.testing.assert_array_equal(out[:4], np.full((4, 16, 3), (200, 180, 190), np.uint8))
    np.testing.assert_array_equal(out[12:], np.full((4, 16, 3), (200, 180, 190), np.uint8))
    cell = out[4:12].min(axis=2) < 100
    rows, cols = np.nonzero(cell)
    # The cell keeps its square shape (4 x 4 px after the 0.4 scale), it is not stretched to 4 x 8.
    assert rows.max() - rows.min() == cols.max() - cols.min()
    square = np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(letterbox(square, 20), cv2.resize(square, (20, 20), interpolation=cv2.INTER_AREA))
    with pytest.raises(CytologiaInputError, match="non-empty"):
        letterbox(np.zeros((0, 5, 3), np.uint8), 8)


# -------------------------------------------------------------------------------------------------- image tables
def _boxes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "NAME": ["a.jpg", "b.jpg", "b.jpg", "c.jpg", "b.jpg"],
            "class": ["LY", "PNN", "LY", "EO", "PNN"],
            "fold": [0, 1, 1, 0, 1],
        }
    )


def test_image_table_is_multi_hot_with_the_single_cell_class() -> None:
    images = image_table(_boxes())
    assert images["NAME"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert images["classes"].tolist() == ["LY", "PNN LY", "EO"]
    assert images["n_cells"].tolist() == [1, 3, 1] and images["fold"].tolist() == [0, 1, 0]
    assert images["cell_class"].tolist() == ["LY", None, "EO"]

    bad = _boxes().assign(fold=[0, 1, 0, 0, 1])
    with pytest.raises(ValidationError, match=r"rows? 2.*b\.jpg.* more than one fold"):
        image_table(bad, "t.csv")
    with pytest.raises(ValidationError, match="row 4.*no class"):
        image_table(_boxes().assign(**{"class": ["LY", "PNN", "LY", None, "PNN"]}), "t.csv")

    bg = pd.DataFrame({"NAME": ["bg-x.jpg", "bg-x.jpg", "bg-y.jpg"], "fold": [1, 1, 0], "x1": 0})
    table = background_image_table(bg)
    assert table["NAME"].tolist() == ["bg-x.jpg", "bg-y.jpg"]  # one row per image, not per painted box
    assert table["classes"].tolist() == [BACKGROUND] * 2 and table["n_cells"].tolist() == [0, 0]
    assert table["cell_class"].isna().all() and table["fold"].tolist() == [1, 0]
    with pytest.raises(ValidationError, match=r"bg\.csv, rows? 1.* more than one fold"):
        background_image_table(bg.assign(fold=[1, 0, 0]), "bg.csv")


def _write_images(folder: Path, shapes: dict[str, tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, (h, w) in shapes.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_dataset_items_hold_the_whole_image_and_its_labels(tmp_path: Path) -> None:
    _write_images(tmp_path / "images", {"a.jpg": (40, 60), "b.jpg": (50, 50), "c.jpg": (30, 30)})
    names = list(labels(background=True))
    table = image_table(_boxes())
    data = FullImageDataset(table, tmp_path / "images", names, 24, cache="memory")
    item = data[1]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    target = np.zeros(24, np.float32)
    target[[CLASSES.index("PNN"), CLASSES.index("LY")]] = 1.0
    np.testing.assert_array_equal(item["target"].numpy(), target)
    assert int(item["label"]) == -1 and int(item["index"]) == 1  # three cells: no single-cell label
    assert int(data[0]["label"]) == CLASSES.index("LY") and float(data[0]["target"][23]) == 0.0
    # The first item is the letterboxed, normalised image.
    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "images" / "a.jpg")), cv2.COLOR_BGR2RGB)
    expected = (letterbox(rgb, 24).astype(np.float32) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225]
    )
    np.testing.assert_allclose(data[0]["image"].numpy(), expected.transpose(2, 0, 1), atol=1e-5)

    bg_table = background_image_table(pd.DataFrame({"NAME": ["c.jpg"], "fold": [0]}))
    bg = FullImageDataset(bg_table, tmp_path / "images", names, 24)
    assert bg[0]["target"].tolist() == [0.0] * 23 + [1.0] and int(bg[0]["label"]) == -1
    with pytest.raises(ValidationError, match=r"row 1: label 'background' is not one of the 23 labels"):
        FullImageDataset(bg_table, tmp_path / "images", list(CLASSES), 24)  # a model without background
    missing = FullImageDataset(pd.DataFrame({"NAME": ["zz.jpg"], "classes": ["LY"]}), tmp_path / "images", names, 8)
    with pytest.raises(CytologiaInputError, match=r"row 1 \(NAME='zz.jpg'\)"):
        missing[0]


def test_image_augmentation_is_image_level_and_keeps_the_size() -> None:
    train_t = build_image_transforms(32, train=True)
    kinds = [type(t).__name__ for t in train_t.transforms]
    assert kinds[:3] == ["HorizontalFlip", "VerticalFlip", "RandomRotate90"]
    assert not {"BBoxAwareRotate", "Affine", "CoarseDropout", "HueSaturationValue"} & set(kinds)
    assert "HueSaturationValue" in [type(t).__name__ for t in build_image_transforms(32, True, hue_saturation=True)]
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    train_t.set_random_seed(0)
    for _ in range(5):
        out = train_t(image=image)["image"]
        assert out.shape == image.shape and out.dtype == np.uint8
    assert build_image_transforms(32, train=False)(image=image)["image"] is image
    with pytest.raises(CytologiaInputError, match="strength"):
        build_image_transforms(32, True, strength="wild")


# ------------------------------------------------------------------------------------------------------- metrics
def test_average_precision_by_hand_and_against_scikit_learn() -> None:
    # Ranked: + - + -  -> precision 1 at recall 1/2, 2/3 at recall 1: AP = 1/2 + 1/2 * 2/3.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # A tie between a positive and a negative is one threshold: precision 1/2 there.
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert np.isnan(average_precision(np.array([0.3, 0.1]), np.array([0, 0])))
    scores = np.array([[3.0, 0.0, 1.0], [1.0, 2.0, 1.0], [0.5, 1.0, 1.0]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])  # label 2 has no positive: left out of the mean
    # label 0 ranks + - + (AP 5/6), label 1 ranks its positive first (AP 1)
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1.0) / 2)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=(60, 5)), 1)  # rounded: many ties
    y = rng.random((60, 5)) < 0.3
    for k in range(5):
        expected = sklearn_metrics.average_precision_score(y[:, k], s[:, k])
        assert average_precision(s[:, k], y[:, k]) == pytest.approx(expected)


# -------------------------------------------------------------------------------------------------------- module
def test_multilabel_module_trains_on_multi_hot_targets() -> None:
    with pytest.raises(CytologiaInputError, match="softmax loss"):
        ClassifierModule(TINY, list(CLASSES), 32, loss={"name": "cross_entropy"}, multilabel=True)
    torch.manual_seed(0)
    module = ClassifierModule(
        TINY, list(labels(True)), 32, loss={"name": "focal_multilabel", "gamma": 2.0}, multilabel=True
    )
    assert module.hparams["multilabel"] is True and module.n_cell_classes == 23
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=g), "target": torch.zeros(8, 24)}
    batch["target"][torch.arange(8), torch.arange(8) % 3] = 1.0
    batch["target"][0, 5] = 1.0  # two classes in one image
    batch["label"] = torch.full((8,), -1)
    opt = torch.optim.AdamW(decay_groups(module.model, 0.0), lr=3e-3)
    module.train()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = module.criterion(module(batch["image"]), batch["target"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        module.eval()
        probs = torch.sigmoid(module(batch["image"]))
    assert (probs[batch["target"] > 0] > probs[batch["target"] == 0].max()).float().mean() > 0.5


# ----------------------------------------------------------------------------------------------------- OOF table
def test_oof_marks_the_multilabel_member(tmp_path: Path) -> None:
    # the "ml:" naming rules are tested in tests/test_oof_names.py
    logits = np.random.default_rng(0).normal(size=(3, 24)).astype(np.float32)
    per_box = logits[[0, 0, 1]]  # two boxes of a.jpg share its image's logits
    table = make_oof_table(["a.jpg", "a.jpg", "b.jpg"], [4, 5, 6], 1, "ml:m", per_box)
    pd.testing.assert_frame_equal(read_oof(write_oof(table, tmp_path / "oof.csv")), table)
    broken = table.copy()
    broken.loc[1, "logit_3"] += 1.0
    with pytest.raises(ValidationError, match=r"oof\.csv, row 2: multi-label model ml:m: logits differ"):
        validate_oof(broken, tmp_path / "oof.csv")
    # A crop model may give two boxes of one image different logits: the check is for "ml:" models only.
    validate_oof(broken.assign(model="m"), tmp_path / "oof.csv")


# --------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 generated images of 96 px with 2 folds written beside them, and 6 background images painted from them."""
    root = tmp_path_factory.mktemp("ml_synth")
    generate(root, 40, seed=0, config=SynthConfig(size=96))
    names = sorted(pd.read_csv(root / "train.csv")["NAME"].unique())
    folds = pd.DataFrame({"NAME": names, "fold": np.arange(len(names)) % 2})
    folds.to_csv(root / "folds.csv", index=False)
    from cytologia.data.io import read_annotations
    from cytologia.detection.background import make_background_set

    table, _ = read_annotations(root / "train.csv", root / "images", lenient=True)
    make_background_set(table, root / "images", folds, root / "background", 6, workers=1)
    return root


def _cfg(data_root: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"+exp={EXP}",
                "trainer=cpu_tiny",
                f"data.root={data_root}",
                "data.synthetic=false",
                f"paths.output_dir={out}",
                f"classifier.name={TINY}",
                "classifier.weights=random",  # the recipe names pretrained weights; the test trains a tiny model
                "classifier.img_size=32",
                "folds.k=2",
                "fold=0",
                "trainer.batch_size=4",
                "trainer.max_epochs=1",
                "trainer.lr=3e-3",
                *overrides,
            ],
        )


def test_experiment_trains_with_background_images(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    bg_table = data_root / "background" / "background.csv"
    cfg = _cfg(data_root, tmp_path, f"classifier.background_table={bg_table}")
    typed = check_config(cfg)
    assert typed.classifier.multilabel and typed.classifier.loss.name == "focal_multilabel"
    result = train(cfg, run_dir=run)
    assert result["kind"] == "multilabel" and result["oof_model"] == f"ml:{EXP}" and result["folds_trained"] == [0]
    fold_dir = run / "fold_0"
    info = json.loads((fold_dir / "result.json").read_text())
    assert info["kind"] == "multilabel" and info["epochs"] == 1 and 0.0 <= info["oof_mean_ap"] <= 1.0

    # Training images: the annotated images of fold 1 plus the background images of fold 1.
    truth = pd.read_csv(data_root / "train.csv").reset_index(names="box_id")
    truth = truth.merge(pd.read_csv(data_root / "folds.csv"), on="NAME")
    background = pd.read_csv(bg_table).drop_duplicates("NAME")
    assert info["n_train"] == truth.loc[truth["fold"] == 1, "NAME"].nunique() + int((background["fold"] == 1).sum())
    held = truth[truth["fold"] == 0]
    assert info["n_val"] == held["NAME"].nunique()

    # One OOF row per held-out box and view; the boxes of one image share its 24 logits.
    oof = read_oof(fold_dir / "oof_logits.csv")
    assert set(oof["model"]) == {f"ml:{EXP}", f"ml:{EXP}+hflip"}
    plain = oof[oof["model"] == f"ml:{EXP}"].reset_index(drop=True)
    assert sorted(plain["box_id"]) == sorted(held["box_id"]) and (plain["fold"] == 0).all()
    assert logits_of(plain).shape == (len(held), 24)
    multi = plain[plain["NAME"].duplicated(keep=False)]
    assert len(multi) > 0  # the synthetic set has multi-cell images: the repetition is exercised
    for _, rows in multi.groupby("NAME"):
        assert (logits_of(rows) == logits_of(rows)[0]).all()

    # The best checkpoint rebuilds the module and gives the same logits from the letterboxed held-out images.
    module = ClassifierModule.from_checkpoint(info["best_checkpoint"])
    assert module.multilabel and module.label_names == list(labels(True))
    images = plain.drop_duplicates("NAME")[["NAME"]].assign(classes="")
    source = CropSource(images, data_root / "images")
    data = FullImageDataModule([source], source, list(labels(True)), 32, batch_size=4)
    again, _, _ = predict_logits(module.model, data.predict_loader())
    np.testing.assert_allclose(again, logits_of(plain.drop_duplicates("NAME")), rtol=1e-4, atol=1e-5)

    # The checkpoint metric is the single-cell macro-F1, and the OOF logits reproduce it.
    assert info["best_val_macro_f1"] == pytest.approx(info["oof_macro_f1"], abs=1e-6)
    metrics = pd.read_csv(fold_dir / "metrics.csv")
    assert {"val/macro_f1", "val/mean_ap", "val/loss", "train/loss_epoch"} <= set(metrics.columns)
    summary = json.loads((run / "summary.json").read_text())
    single = held.groupby("NAME").size()
    assert summary["n_scored_single_cell_images"] == int((single == 1).sum()) > 0
    assert summary["oof_macro_f1"] == pytest.approx(info["oof_macro_f1"])
    assert summary["kind"] == "multilabel" and summary["n_oof_boxes"] == len(held)


def test_without_background_the_model_has_23_labels_and_follows_detected_boxes(data_root: Path, tmp_path: Path) -> None:
    truth = pd.read_csv(data_root / "train.csv")
    detected = truth[["NAME", "x1", "y1", "x2", "y2"]].iloc[::-1].reset_index(drop=True)
    detected["score"] = 0.9
    boxes_path = tmp_path / "boxes.csv"
    detected.to_csv(boxes_path, index=False)
    cfg = _cfg(
        data_root,
        tmp_path,
        "classifier.background=false",
        "classifier.loss.name=bce",
        "ensemble.tta_flip=false",
        f"classifier.boxes={boxes_path}",
    )
    result = train(cfg, run_dir=tmp_path / "run")
    oof = read_oof(tmp_path / "run" / "fold_0" / "oof_logits.csv")
    assert set(oof["model"]) == {f"ml:{EXP}"} and logits_of(oof).shape[1] == len(CLASSES)
    folds = pd.read_csv(data_root / "folds.csv").set_index("NAME")["fold"]
    expected = np.flatnonzero(detected["NAME"].map(folds).to_numpy() == 0)  # box_id = row of the boxes table
    assert sorted(oof["box_id"]) == expected.tolist()
    assert result["oof_model"] == f"ml:{EXP}" and 0.0 <= result["oof_macro_f1"] <= 1.0


def test_multilabel_config_checks(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CytologiaInputError, match="needs a sigmoid loss"):
        check_supported(check_config(_cfg(data_root, tmp_path, "classifier.loss.name=focal")))
    with pytest.raises(CytologiaInputError, match="background_table"):
        check_supported(check_config(_cfg(data_root, tmp_path)))  # background=true without its images
    check_supported(check_config(_cfg(data_root, tmp_path, "classifier.background=false")))
