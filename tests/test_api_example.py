"""The README's Python API example runs: the fenced block after ``<!-- api:example -->`` is executed as it stands in
a folder laid out as after the demo run (``data/demo`` and a run folder ``outputs/demo/<ts>`` with a detector, its
out-of-fold boxes and two classifier runs), on a tiny generated set with random-weight models (YOLOX: no extra)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- api:example -->"


def readme_example(text: str) -> str:
    """The fenced ``python`` block right after the marker line."""
    found = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)\n```", text, re.S)
    assert found is not None, f"README.md: no ```python block after {MARKER}"
    return found.group(1)


def _demo_layout(root: Path) -> None:
    """``root/data/demo`` (12 train + 8 test images, no defects) and ``root/outputs/demo/<ts>`` as the demo leaves
    it: ``detector/`` (config.yaml, fold_0/detector.pt + .onnx, oof_boxes.csv) and ``cls_<name>/`` (config.yaml,
    summary.json, fold checkpoints, oof_logits.csv) for two classifiers over two folds."""
    from cytologia.classification.oof import make_oof_table, write_oof
    from cytologia.data.schema import CLASSES
    from cytologia.data.synthetic.defects import DefectRates
    from cytologia.data.synthetic.generate import SynthConfig, generate
    from cytologia.runtime.bench import save_random_classifier, save_random_detector

    data = root / "data" / "demo"
    generate(data, 20, seed=1, config=SynthConfig(size=160, test_fraction=0.4, defects=DefectRates.none()))
    truth = pd.read_csv(data / "train.csv", keep_default_na=False)
    run = root / "outputs" / "demo" / "2026-01-01_00-00-00"

    det = run / "detector"
    backend = save_random_detector("yolox_nano", det / "fold_0" / "detector.pt", det / "fold_0" / "detector.onnx", 128)
    (det / "config.yaml").write_text(
        yaml.safe_dump({"detector": {"backend": backend, "model": "yolox_nano", "img_size": 128, "tta_flip": False}})
    )
    oof_boxes = truth[["NAME", "x1", "y1", "x2", "y2"]].assign(score=0.9, model="yolox_nano")
    oof_boxes.to_csv(det / "oof_boxes.csv", index=False)  # every truth box confirmed by its detection

    rng = np.random.default_rng(0)
    names = truth["NAME"].astype(str)
    fold = (pd.factorize(names)[0] % 2).astype(int)  # images alternate between two folds
    y = truth["class"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    for i, name in enumerate(("resnet10t", "test_convnext")):
        cls = run / f"cls_{name}"
        folds = []
        for k in (0, 1):
            ckpt = cls / f"fold_{k}" / "checkpoints" / "last.ckpt"
            save_random_classifier(name, 32, ckpt, None, seed=10 * i + k)
            folds.append({"fold": k, "oof_checkpoint": str(ckpt), "select": "last"})
        logits = rng.normal(0, 1, (len(truth), len(CLASSES))) + 2.0 * np.eye(len(CLASSES))[y]
        tables = [
            make_oof_table(names[fold == k], np.flatnonzero(fold == k), k, name, logits[fold == k]) for k in (0, 1)
        ]
        write_oof(pd.concat(tables, ignore_index=True), cls / "oof_logits.csv")
        (cls / "summary.json").write_text(json.dumps({"folds": folds}))
        (cls / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "exp_name": name,
                    "classifier": {
                        "name": name,
                        "img_size": 32,
                        "margin": 16,
                        "background": False,
                        "multilabel": False,
                    },
                }
            )
        )


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = readme_example(README.read_text())
    _demo_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code, f"{README}:{MARKER}", "exec"), namespace)

    from cytologia.data.io import read_submission, read_test

    test = read_test(Path("data/demo/test.csv"))
    assert len(read_submission(Path("submission.csv"), test=test)) == len(test)  # written and valid
    submission = namespace["submission"]
    assert isinstance(submission, pd.DataFrame) and len(submission) == len(test)
    boxes = namespace["boxes"]
    assert isinstance(boxes, pd.DataFrame) and {"NAME", "class", "score"} <= set(boxes.columns) and len(boxes)
    assert Path("clean/train_clean.csv").is_file() and isinstance(namespace["flags"], pd.DataFrame)
    ensemble = namespace["ensemble"]
    assert [m.oof_model for m in ensemble.cell_members] == ["resnet10t", "test_convnext"]
    assert ensemble.detector is not None and ensemble.tuning["checkpoint_selection"] == {
        "resnet10t": "last",
        "test_convnext": "last",
    }
    printed = capsys.readouterr().out.strip().splitlines()
    n_boxes = len(pd.read_csv("data/demo/train.csv"))
    assert printed[0] == f"{n_boxes} of {n_boxes} boxes kept"  # each truth box confirmed by its own detection
    assert any(line.startswith("weights: ") for line in printed) and 0.0 <= float(printed[-1]) <= 1.0


def test_readme_example_is_found_after_its_marker() -> None:
    text = f"intro\n{MARKER}\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert readme_example(text) == "x = 1"
    with pytest.raises(AssertionError, match="no ```python block"):
        readme_example("```python\nx = 1\n```\n")
