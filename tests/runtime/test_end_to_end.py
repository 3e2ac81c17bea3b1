"""From training to a scored submission with the real stages (1 epoch each on CPU, two classifier experiments):
detector stage -> classifier stage -> `cytologia tune` on their run folders -> `cytologia predict` (both runtimes)
-> `cytologia score`. Slow (a few minutes on 2 cores): run with ``pytest -m slow``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cytologia.cli import main
from cytologia.data.io import read_submission, read_test
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.ensemble import read_ensemble
from cytologia.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.slow
def test_train_tune_predict_score(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    generate(data, 60, seed=0, config=SynthConfig(size=160, test_fraction=0.3))
    common = [
        f"data.root={data}",
        "data.synthetic=false",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "folds.k=2",
        "fold=0",
    ]
    det_run = tmp_path / "det"
    train(_compose("+exp=det_smoke", *common), run_dir=det_run)
    runs = []
    for exp, arch in (("cls_a", "test_convnext"), ("cls_b", "resnet10t")):
        run = tmp_path / exp
        overrides = (
            "+exp=smoke",
            *common,
            f"exp_name={exp}",
            f"classifier.name={arch}",
            "classifier.img_size=32",
            "trainer.batch_size=4",
        )
        train(_compose(*overrides), run_dir=run)
        runs.append(run)

    ensemble = tmp_path / "ensemble.json"
    code = main(
        [
            "tune",
            "--oof",
            str(runs[0]),
            "--oof",
            str(runs[1]),
            "--truth",
            str(data / "train.csv"),
            "--out",
            str(ensemble),
            "--detector",
            str(det_run),
        ]
    )
    assert code == 0
    ens = read_ensemble(ensemble)
    assert len(ens.cell_members) == 2 and ens.detector is not None and ens.detector.img_size == 128
    assert "two halves" in ens.tuning["heldout"]["scheme"]  # one trained fold: the halves check

    test = read_test(data / "test.csv")
    for runtime in ("onnx", "torch"):
        sub = tmp_path / f"submission_{runtime}.csv"
        assert (
            main(["predict", "--data", str(data), "--ensemble", str(ensemble), "--out", str(sub), "--runtime", runtime])
            == 0
        )
        assert len(read_submission(sub, test=test)) == len(test)
        capsys.readouterr()
        assert main(["score", "--truth", str(data / "test_labels.csv"), "--pred", str(sub), "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["n_images_without_prediction"] == 0 and result["giou"] > 0.4
