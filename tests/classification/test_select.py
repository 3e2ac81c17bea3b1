"""Checkpoint selection of the OOF logits (``trainer.select``): ``last`` writes them with the last epoch's weights
(EMA ones with ``trainer.ema``) even when an earlier epoch scored better on the held-out fold; ``best_val`` with that
earlier epoch's. The mode is recorded per fold and run, refused when a resume would mix modes, and carried by
``cytologia tune`` into the ensemble (its checkpoints are those that wrote the OOF logits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from cytologia.classification import stage
from cytologia.classification.datamodule import CropDataModule, CropSource
from cytologia.classification.module import MONITOR, ClassifierModule, load_checkpoint, predict_logits
from cytologia.classification.oof import logits_of, read_oof
from cytologia.classification.stage import FoldResult, select_checkpoint
from cytologia.cli import main as cli
from cytologia.config import check_config
from cytologia.data.schema import CLASSES
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.ensemble import read_ensemble
from cytologia.errors import CytologiaInputError
from cytologia.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = "test_convnext"
TRAIN_FOLD = stage.train_fold


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, 40, seed=0, config=SynthConfig(size=96))
    return root


def _cfg(data_root: Path, out: Path, *overrides: str) -> Any:
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
                "trainer.max_epochs=3",
                "trainer.lr=3e-3",
                "ensemble.tta_flip=false",
                *overrides,
            ],
        )


class _FirstEpochBest(L.Callback):
    """Makes epoch 0 the best on the held-out fold: the monitored macro-F1 reads 1 after epoch 0 and 0 afterwards
    (set after the module logs it, before the checkpoint callbacks -- the engine runs those last -- read it)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.callback_metrics[MONITOR] = torch.tensor(1.0 if trainer.current_epoch == 0 else 0.0)


def _train(data_root: Path, out: Path, run: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> dict:
    monkeypatch.setattr(stage, "train_fold", lambda *a, **k: TRAIN_FOLD(*a, callbacks=[_FirstEpochBest()], **k))
    return train(_cfg(data_root, out, *overrides), run_dir=run)


def _logits(state: dict[str, torch.Tensor], ckpt: Path, plain: pd.DataFrame, data_root: Path) -> np.ndarray:
    """Logits of the OOF boxes from ``state`` (a module state dict) in the architecture of ``ckpt``."""
    module = ClassifierModule.from_checkpoint(ckpt)
    module.load_state_dict(state)
    truth = pd.read_csv(data_root / "train.csv").reset_index(names="box_id")
    table = plain[["NAME", "box_id"]].merge(truth[["box_id", "x1", "y1", "x2", "y2", "class"]], on="box_id")
    source = CropSource(table, data_root / "images")
    got, _, _ = predict_logits(module.model, CropDataModule([source], source, list(CLASSES), 32).predict_loader())
    return got


def test_select_checkpoint_modes(tmp_path: Path) -> None:
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    best.write_bytes(b"x")
    last.write_bytes(b"x")
    assert select_checkpoint("last", best, last) == last
    assert select_checkpoint("best_val", best, last) == best
    assert select_checkpoint("best_val", None, last) == last  # validation never saved a best one
    with pytest.raises(CytologiaInputError, match="trainer.select='peek'"):
        select_checkpoint("peek", best, last)
    with pytest.raises(CytologiaInputError, match="nothing.ckpt: no such checkpoint"):
        select_checkpoint("last", best, tmp_path / "nothing.ckpt")


def test_config_default_is_last_and_bad_values_are_refused() -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        plain = compose(config_name="train")
        demo = compose(config_name="train", overrides=["+exp=demo"])
        bad = compose(config_name="train", overrides=["trainer.select=best"])
    assert plain.trainer.select == "last" and check_config(demo).trainer.select == "last"
    with pytest.raises(CytologiaInputError, match="trainer.select='best' is not one of: last, best_val"):
        check_config(bad)


def test_result_written_before_the_option_reads_as_best_val() -> None:
    old = dict(
        fold=0,
        fold_dir="f",
        best_checkpoint="f/checkpoints/best.ckpt",
        last_checkpoint="f/checkpoints/last.ckpt",
        best_val_macro_f1=0.5,
        oof_macro_f1=0.5,
        oof_accuracy=0.5,
        epochs=3,
        global_step=9,
        n_train=1,
        n_val=1,
        train_seconds=1.0,
        ms_per_step=None,
        resumed_from=None,
    )
    result = FoldResult(**old)
    assert result.select == "best_val" and result.oof_checkpoint == old["best_checkpoint"]


def test_last_and_best_val_write_the_oof_logits_of_their_epoch(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # best_val: epoch 0 is the best on the held-out fold, so its weights write the OOF logits.
    run_b = tmp_path / "b"
    summary_b = _train(data_root, tmp_path, run_b, monkeypatch, "exp_name=b", "trainer.select=best_val")
    info = json.loads((run_b / "fold_0" / "result.json").read_text())
    ckpts = run_b / "fold_0" / "checkpoints"
    assert info["select"] == "best_val" and info["epochs"] == 3
    assert Path(info["oof_checkpoint"]) == (ckpts / "best.ckpt").resolve()
    assert load_checkpoint(ckpts / "best.ckpt")["epoch"] == 0 and load_checkpoint(ckpts / "last.ckpt")["epoch"] == 2
    plain = read_oof(run_b / "fold_0" / "oof_logits.csv")
    from_best = _logits(load_checkpoint(ckpts / "best.ckpt")["state_dict"], ckpts / "best.ckpt", plain, data_root)
    from_last = _logits(load_checkpoint(ckpts / "last.ckpt")["state_dict"], ckpts / "best.ckpt", plain, data_root)
    assert np.abs(from_best - from_last).max() > 1e-3  # the epochs differ: the check below can tell them apart
    np.testing.assert_allclose(logits_of(plain), from_best, rtol=1e-4, atol=1e-5)
    assert summary_b["select"] == "best_val"

    # last (+ EMA): the last epoch's averaged weights, though epoch 0 scored best on the held-out fold.
    monkeypatch.chdir(tmp_path)
    run_l = Path("l")  # a run folder given relative to the working directory: recorded paths are absolute all the same
    ema = ("trainer.ema=true", "trainer.ema_decay=0.5")
    summary_l = _train(data_root, tmp_path, run_l, monkeypatch, "exp_name=l", "trainer.select=last", *ema)
    info = json.loads((run_l / "fold_0" / "result.json").read_text())
    ckpts = run_l / "fold_0" / "checkpoints"
    assert info["select"] == "last" and info["oof_checkpoint"] == str((ckpts / "last.ckpt").resolve())
    assert info["best_val_macro_f1"] == 1.0 and load_checkpoint(ckpts / "best.ckpt")["epoch"] == 0
    plain = read_oof(run_l / "fold_0" / "oof_logits.csv")
    last = load_checkpoint(ckpts / "last.ckpt")
    from_ema = _logits(last["state_dict"], ckpts / "last.ckpt", plain, data_root)
    from_raw = _logits(last["current_model_state"], ckpts / "last.ckpt", plain, data_root)
    from_best = _logits(load_checkpoint(ckpts / "best.ckpt")["state_dict"], ckpts / "last.ckpt", plain, data_root)
    assert np.abs(from_ema - from_best).max() > 1e-3 and np.abs(from_ema - from_raw).max() > 1e-4
    np.testing.assert_allclose(logits_of(plain), from_ema, rtol=1e-4, atol=1e-5)
    assert summary_l["select"] == "last"
    assert json.loads((run_l / "summary.json").read_text())["select"] == "last"

    # A finished fold resumed with the other mode is refused: the run's OOF logits would mix two choices.
    with pytest.raises(CytologiaInputError, match="finished with trainer.select=last"):
        _train(
            data_root,
            tmp_path,
            run_l,
            monkeypatch,
            "exp_name=l",
            "trainer.select=best_val",
            "trainer.resume=true",
            *ema,
        )
    again = _train(data_root, tmp_path, run_l, monkeypatch, "exp_name=l", "trainer.resume=true", *ema)
    assert again["per_fold_macro_f1"] == summary_l["per_fold_macro_f1"]  # same mode: the fold is kept

    # cytologia tune: each member's checkpoints are those that wrote its OOF logits, and the modes are reported.
    ens = tmp_path / "ensemble.json"
    args = ["tune", "--oof", str(run_b), "--oof", str(run_l), "--truth", str(data_root / "train.csv")]
    capsys.readouterr()
    assert cli([*args, "--out", str(ens), "--no-heldout"]) == 0
    printed = capsys.readouterr().out
    assert "chosen by (trainer.select): b best_val, l last" in printed
    assert "the OOF figures of b and the tuned gain are optimistic" in printed
    saved = json.loads(ens.read_text())
    assert saved["tuning"]["checkpoint_selection"] == {"b": "best_val", "l": "last"}
    ensemble = read_ensemble(ens)
    members = {m.name: [ensemble.resolve(p) for p in m.checkpoints] for m in ensemble.members}
    assert members == {"b": [run_b / "fold_0" / "checkpoints" / "best.ckpt"], "l": [ckpts.resolve() / "last.ckpt"]}
    assert all(p.is_file() for paths in members.values() for p in paths)
