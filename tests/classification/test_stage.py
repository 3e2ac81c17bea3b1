"""The classifier stage end to end on CPU: ``train(cfg)`` with the smoke experiment on generated crops writes
checkpoints, metrics and out-of-fold logits; a killed run resumes where its last checkpoint left it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cytologia.classification.datamodule import CropDataModule, CropSource
from cytologia.classification.module import ClassifierModule, load_checkpoint, predict_logits
from cytologia.classification.oof import logits_of, read_oof
from cytologia.classification.stage import check_supported, crop_boxes, ensure_folds, read_background, read_train
from cytologia.config import check_config
from cytologia.data.schema import CLASSES, labels
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = "test_convnext"  # timm's 209k-parameter test ConvNeXt: the fastest of its test networks on CPU


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 generated images of 96 px (~31 training boxes): seconds to make, enough for two folds."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, 40, seed=0, config=SynthConfig(size=96))
    return root


def _cfg(data_root: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "+exp=smoke",
                f"data.root={data_root}",
                "data.synthetic=false",
                f"paths.output_dir={out}",
                f"classifier.name={TINY}",
                "classifier.img_size=32",
                "folds.k=2",
                "fold=0",
                "trainer.batch_size=4",
                *overrides,
            ],
        )


def test_smoke_run_writes_checkpoints_metrics_and_oof(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(_cfg(data_root, tmp_path), run_dir=run)
    assert result["trained"] is True and result["folds_trained"] == [0]
    fold_dir = run / "fold_0"
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.csv", "oof_logits.csv", "result.json"):
        assert (fold_dir / name).is_file(), name
    assert (run / "config.yaml").is_file() and (run / "provenance.json").is_file()
    assert (data_root / "folds.csv").is_file()  # made on first use, in the data folder

    # The OOF table holds every held-out truth box once per view, with the truth's box ids.
    folds = pd.read_csv(data_root / "folds.csv")
    truth = pd.read_csv(data_root / "train.csv").reset_index(names="box_id").merge(folds, on="NAME")
    held_out = truth[truth["fold"] == 0]
    oof = read_oof(fold_dir / "oof_logits.csv")
    assert set(oof["model"]) == {"smoke", "smoke+hflip"}  # ensemble.tta_flip is on by default
    plain = oof[oof["model"] == "smoke"]
    assert sorted(plain["box_id"]) == sorted(held_out["box_id"]) and (plain["fold"] == 0).all()
    assert logits_of(plain).shape == (len(held_out), len(CLASSES))

    # The best checkpoint reloads on its own and reproduces the OOF logits.
    info = json.loads((fold_dir / "result.json").read_text())
    module = ClassifierModule.from_checkpoint(info["best_checkpoint"])
    table = plain[["NAME", "box_id"]].merge(truth[["box_id", "x1", "y1", "x2", "y2", "class"]], on="box_id")
    source = CropSource(table, data_root / "images")
    data = CropDataModule([source], source, list(CLASSES), 32, batch_size=4)
    again, _, _ = predict_logits(module.model, data.predict_loader())
    np.testing.assert_allclose(again, logits_of(plain), rtol=1e-4, atol=1e-5)

    # The engine's validation macro-F1 of the best epoch is the OOF table's: same weights, same crops.
    assert info["best_val_macro_f1"] == pytest.approx(info["oof_macro_f1"], abs=1e-6)  # logged as float32
    assert result["oof_macro_f1"] == pytest.approx(info["oof_macro_f1"])
    metrics = pd.read_csv(fold_dir / "metrics.csv")
    assert {"val/macro_f1", "val/loss", "train/loss_epoch", "epoch", "step"} <= set(metrics.columns)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["folds_trained"] == [0] and summary["n_oof_boxes"] == len(held_out)
    assert info["ms_per_step"] is None or info["ms_per_step"] > 0


def test_resume_continues_the_step_counter_and_the_ema(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ema = ("trainer.ema=true", "trainer.ema_decay=0.5", "ensemble.tta_flip=false")
    first = train(_cfg(data_root, tmp_path, "trainer.max_epochs=1", *ema), run_dir=run)
    one = json.loads((run / "fold_0" / "result.json").read_text())
    assert one["epochs"] == 1 and one["global_step"] > 0 and first["folds_trained"] == [0]

    # The same folder again without resume: refused, nothing overwritten.
    with pytest.raises(CytologiaInputError, match="trainer.resume=true"):
        train(_cfg(data_root, tmp_path, "trainer.max_epochs=2", *ema), run_dir=run)

    # "Killed" after epoch 1 of 2: resume continues from last.ckpt instead of starting over.
    train(_cfg(data_root, tmp_path, "trainer.max_epochs=2", "trainer.resume=true", *ema), run_dir=run)
    two = json.loads((run / "fold_0" / "result.json").read_text())
    assert two["resumed_from"].endswith("last.ckpt")
    assert two["epochs"] == 2 and two["global_step"] == 2 * one["global_step"]
    ckpt = load_checkpoint(run / "fold_0" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == two["global_step"]
    metrics = pd.read_csv(run / "fold_0" / "metrics.csv")
    assert sorted(metrics["restart"].unique()) == [0, 1]  # both logs kept, the first start's not overwritten
    epochs_by_restart = metrics.dropna(subset=["val/macro_f1"]).groupby("restart")["epoch"].apply(list).to_dict()
    assert epochs_by_restart == {0: [0], 1: [1]}

    # EMA: the checkpoint's weights are the average; the raw weights ride along for the next resume.
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == current.keys()
    weights = [k for k in averaged if k.startswith("model.") and averaged[k].is_floating_point()]
    assert any(not torch.equal(averaged[k], current[k]) for k in weights)

    # A finished fold is kept as it is when resumed again with the same length.
    again = train(_cfg(data_root, tmp_path, "trainer.max_epochs=2", "trainer.resume=true", *ema), run_dir=run)
    assert again["per_fold_macro_f1"] == {0: two["oof_macro_f1"]}
    assert json.loads((run / "fold_0" / "result.json").read_text()) == two


def test_unsupported_and_bad_inputs_are_clear_errors(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CytologiaInputError, match="multilabel=true needs a sigmoid loss"):
        train(_cfg(data_root, tmp_path, "classifier.multilabel=true"), run_dir=tmp_path / "a")
    with pytest.raises(CytologiaInputError, match="background_table"):
        train(_cfg(data_root, tmp_path, "classifier.background=true"), run_dir=tmp_path / "b")
    with pytest.raises(CytologiaInputError, match="train.csv: no such file"):
        train(_cfg(tmp_path / "nowhere", tmp_path), run_dir=tmp_path / "c")
    with pytest.raises(CytologiaInputError, match="alpha has 3 values"):
        train(_cfg(data_root, tmp_path, "classifier.loss.alpha=[1,1,1]"), run_dir=tmp_path / "d")
    with pytest.raises(CytologiaInputError, match="unknown classifier"):
        train(_cfg(data_root, tmp_path, "classifier.name=no_such_net"), run_dir=tmp_path / "e")


def test_folds_file_that_disagrees_with_the_config_is_refused(data_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(data_root, root, ignore=shutil.ignore_patterns("folds*"))
    names = pd.read_csv(root / "train.csv")["NAME"].unique()
    pd.DataFrame({"NAME": names, "fold": np.arange(len(names)) % 2}).to_csv(root / "folds.csv", index=False)
    with pytest.raises(CytologiaInputError, match=r"holds folds \[0, 1\], the config asks for folds.k=3"):
        train(_cfg(root, tmp_path, "folds.k=3"), run_dir=tmp_path / "a")
    pd.DataFrame({"NAME": names[1:], "fold": np.arange(len(names) - 1) % 2}).to_csv(root / "folds.csv", index=False)
    with pytest.raises(CytologiaInputError, match="without a fold"):
        train(_cfg(root, tmp_path), run_dir=tmp_path / "b")


FIRST_PLACE = ("effnetv2m512", "vitl224", "vitl224_bg", "dinobloom224", "nextvit384", "tinyvit512")


@pytest.mark.parametrize("exp", FIRST_PLACE)
def test_first_place_experiments_build_their_model(exp: str, tmp_path: Path) -> None:
    """Each 1st-place experiment composes, passes the stage's checks and builds its module -- on the meta device
    (shapes only, no memory), since a ViT-L does not train on a 2-core CPU."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        overrides = [f"+exp={exp}"]
        if exp.endswith("_bg"):
            overrides.append(f"classifier.background_table={tmp_path / 'background.csv'}")
        cfg = check_config(compose(config_name="train", overrides=overrides))
    check_supported(cfg)
    c = cfg.classifier
    with torch.device("meta"):
        module = ClassifierModule(
            c.name,
            list(labels(c.background)),
            c.img_size,
            drop_path=c.drop_path,
            loss=OmegaConf.to_container(c.loss),
            lr=cfg.trainer.lr,
        )
        logits = module(torch.zeros(2, 3, c.img_size, c.img_size))
    assert logits.shape == (2, 24 if exp.endswith("_bg") else 23)


def test_multilabel_experiment_needs_its_background_table() -> None:
    """The multi-label experiment itself is trained in test_multilabel.py; like every ``_bg`` experiment it refuses
    to start without its background images."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = check_config(compose(config_name="train", overrides=["+exp=ml_effnetv2m512_bg"]))
    with pytest.raises(CytologiaInputError, match="background_table"):
        check_supported(cfg)


def test_detected_boxes_take_their_class_from_the_truth(data_root: Path, tmp_path: Path) -> None:
    truth = pd.read_csv(data_root / "train.csv")
    detected = truth[["NAME", "x1", "y1", "x2", "y2"]].iloc[::-1].reset_index(drop=True)  # another order
    detected[["x1", "x2"]] += 2  # a slightly shifted detection of each cell
    detected["score"], detected["model"] = 0.9, "wbf"
    path = tmp_path / "boxes.csv"
    detected.to_csv(path, index=False)
    cfg = check_config(_cfg(data_root, tmp_path, f"classifier.boxes={path}"))
    table = read_train(cfg, data_root)
    boxes = crop_boxes(cfg, table, ensure_folds(cfg, table, data_root))
    assert boxes["box_id"].tolist() == list(range(len(detected)))  # ids are rows of the boxes table
    assert boxes["class"].tolist() == truth["class"].iloc[::-1].tolist()
    folds = pd.read_csv(data_root / "folds.csv").set_index("NAME")["fold"]
    assert (boxes["fold"] == boxes["NAME"].map(folds)).all()

    detected.assign(model=["a", "b"] * (len(detected) // 2) + ["a"] * (len(detected) % 2)).to_csv(path, index=False)
    with pytest.raises(CytologiaInputError, match="boxes of 2 models"):
        crop_boxes(cfg, table, ensure_folds(cfg, table, data_root))


def test_background_crops_train_as_the_24th_label(data_root: Path, tmp_path: Path) -> None:
    bg_dir = tmp_path / "background"
    shutil.copytree(data_root / "images", bg_dir / "images")  # stand-ins for cell-free images
    names = sorted(p.name for p in (bg_dir / "images").iterdir())[:4]
    table = pd.DataFrame({"NAME": names, "x1": 10, "y1": 10, "x2": 60, "y2": 60, "fold": [0, 1, 0, 1]})
    table.to_csv(bg_dir / "background.csv", index=False)
    cfg = check_config(
        _cfg(data_root, tmp_path, "classifier.background=true", f"classifier.background_table={bg_dir}/background.csv")
    )
    check_supported(cfg)
    source = read_background(cfg)
    assert source is not None and source.image_dir == bg_dir / "images"
    assert (source.table["class"] == "background").all() and source.table["fold"].tolist() == [0, 1, 0, 1]
    train_table = read_train(cfg, data_root)
    cells = crop_boxes(cfg, train_table, ensure_folds(cfg, train_table, data_root))
    data = CropDataModule([CropSource(cells, data_root / "images"), source], source, list(labels(True)), 32)
    data.setup()
    got = sorted(int(data.train_set[i]["label"]) for i in range(len(data.train_set)))  # type: ignore[arg-type]
    assert got.count(23) == 4 and len(got) == len(cells) + 4

    table.assign(fold=[0, 1, 5, 1]).to_csv(bg_dir / "background.csv", index=False)
    with pytest.raises(ValidationError, match=r"row 3: fold='5' is not in 0\.\.1"):
        read_background(cfg)
