"""`cytologia bench pipeline` prints its table; `cytologia tune` reads run folders and writes an ensemble file that
`cytologia predict` runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cytologia.classification.oof import make_oof_table, write_oof
from cytologia.cli import main
from cytologia.data.io import read_submission, read_test
from cytologia.data.schema import CLASSES
from cytologia.ensemble import read_ensemble
from cytologia.runtime.bench import save_random_classifier


@pytest.mark.ultralytics
def test_bench_pipeline_prints_its_table(tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "pipeline",
            "--data",
            str(tiny.data),
            "--ensemble",
            str(tiny.ensemble_path),
            "--images",
            "4",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    for word in (
        "decode",
        "detect",
        "crop",
        "classify",
        "blend",
        "total",
        "images/s",
        "peak RSS",
        "verdict",
        "ONNX Runtime / torch",
    ):
        assert word in text, word
    results = json.loads(out.read_text())["results"]
    assert [r["runtime"] for r in results] == ["onnx", "torch"]
    for r in results:
        assert r["n_images"] == 4 and r["images_per_s"] > 0 and r["peak_rss_mb"] > 0
        total = r["stages"]["total"]
        assert 0 < total["p50"] <= total["p95"]
        parts = sum(r["stages"][s]["mean"] for s in ("decode", "detect", "crop", "classify", "blend"))
        assert abs(parts - total["mean"]) < 1e-6


def _run_folder(
    root: Path, exp: str, truth: pd.DataFrame, quality: np.ndarray, scale: float, seed: int, multilabel: bool = False
) -> Path:
    """A classification run folder as the stage writes it: config.yaml, summary.json, fold checkpoints and
    oof_logits.csv (plain and +hflip), with logits that are right on the classes where ``quality`` is high. A
    multi-label run has 24 labels (with background) and ``ml:`` model names, one row per box."""
    rng = np.random.default_rng(seed)
    run = root / exp
    y = truth["class"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    onehot = np.eye(len(CLASSES))[y]
    folds = truth["fold"].to_numpy()
    tables, result_folds = [], []
    size, model_name = (48, f"ml:{exp}") if multilabel else (32, exp)
    for k in sorted(set(folds)):
        ckpt = run / f"fold_{k}" / "checkpoints" / "best.ckpt"
        save_random_classifier("resnet10t", size, ckpt, None, seed=seed + k, background=multilabel)
        result_folds.append({"fold": int(k), "best_checkpoint": str(ckpt)})
        sel = folds == k
        for model, noise in ((model_name, 1.0), (f"{model_name}+hflip", 0.8)):
            lg = scale * (quality[y[sel]][:, None] * onehot[sel] + rng.normal(0, noise, (int(sel.sum()), len(CLASSES))))
            if multilabel:
                lg = np.c_[lg - 2.0, np.full(len(lg), -3.0)]  # sigmoid scores; background last
            tables.append(make_oof_table(truth["NAME"][sel], truth["box_id"][sel], int(k), model, lg))
    write_oof(pd.concat(tables, ignore_index=True), run / "oof_logits.csv")
    (run / "summary.json").write_text(json.dumps({"folds": result_folds}))
    classifier = {
        "name": "resnet10t",
        "img_size": size,
        "margin": 16,
        "background": multilabel,
        "multilabel": multilabel,
    }
    (run / "config.yaml").write_text(yaml.safe_dump({"exp_name": exp, "classifier": classifier}))
    return run


@pytest.mark.ultralytics
def test_tune_then_predict(tiny, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    n = 600
    truth = pd.DataFrame(
        {
            "NAME": [f"t{i // 1}.jpg" for i in range(n)],
            "x1": 10,
            "y1": 10,
            "x2": 60,
            "y2": 60,
            "class": [CLASSES[c] for c in rng.integers(0, len(CLASSES), n)],
        }
    )
    train_csv = tmp_path / "train.csv"
    truth.to_csv(train_csv, index=False)
    truth["box_id"] = np.arange(n)
    truth["fold"] = rng.integers(0, 3, n)
    first_half = np.arange(len(CLASSES)) < 12
    run_a = _run_folder(tmp_path / "runs", "expA", truth, np.where(first_half, 2.2, 0.5), 1.0, 1)
    run_b = _run_folder(tmp_path / "runs", "expB", truth, np.where(first_half, 0.5, 2.2), 2.5, 2)
    run_m = _run_folder(tmp_path / "runs", "expM", truth, np.full(len(CLASSES), 1.0), 1.0, 3, multilabel=True)
    out = tmp_path / "ensemble.json"
    detector = tiny.models / "detector.pt"
    code = main(
        [
            "tune",
            "--oof",
            str(run_a),
            "--oof",
            str(run_b / "oof_logits.csv"),
            "--oof",
            str(run_m),
            "--truth",
            str(train_csv),
            "--out",
            str(out),
            "--detector",
            str(detector),
            "--det-img-size",
            "128",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed and "gain" in printed
    ens = read_ensemble(out)
    assert [m.oof_model for m in ens.members] == ["expA+hflip", "expB+hflip", "ml:expM+hflip"]  # flip TTA logits
    assert all(m.tta_flip and m.img_size == 32 and len(m.checkpoints) == 3 for m in ens.cell_members)
    ml = ens.multilabel_member
    assert ml is not None and ml.num_labels == 24 and ml.img_size == 48 and ens.blend.multilabel_weight > 0
    assert ens.detector is not None and ens.detector.onnx == [str(tiny.models / "detector.onnx")]
    h = ens.tuning["heldout"]
    assert h["gain_over_best_member"] > 0 and len(h["per_fold"]) == 3
    assert abs(sum(m.weight for m in ens.members) - 1.0) < 1e-9

    # the tuned file runs: no ONNX files for the members, so they are exported from the checkpoints (once)
    sub = tmp_path / "submission.csv"
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "predict",
                "--data",
                str(tiny.data),
                "--ensemble",
                str(out),
                "--out",
                str(sub),
                "--batch",
                "8",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    assert json.loads(report.read_text())["multilabel"] == "ml:expM+hflip"
    test = read_test(tiny.data / "test.csv")
    assert len(read_submission(sub, test=test)) == len(test)
    assert main(["tune", "--oof", str(run_a), "--truth", str(train_csv), "--out", str(out), "--members", "nope"]) == 2
