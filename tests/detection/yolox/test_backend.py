"""The ``yolox`` registry entry: names, prediction (boxes in each image's pixels, flip TTA), and the detector stage run
end to end in a process where ultralytics cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cytologia.detection import create_detector, list_detectors, load_detector
from cytologia.detection.registry import PREDICT_COLUMNS
from cytologia.errors import CytologiaInputError

ROOT = Path(__file__).resolve().parents[3]


def test_registry_lists_every_size() -> None:
    assert list_detectors("yolox") == [f"yolox/yolox_{s}" for s in ("nano", "tiny", "s", "m", "l", "x")]
    detector = create_detector("yolox", "yolox_s")
    assert detector.backend == "yolox" and detector.model == "yolox_s"
    with pytest.raises(CytologiaInputError, match="closest: yolox_s"):
        create_detector("yolox", "yolox_ss")
    with pytest.raises(CytologiaInputError, match="no trained checkpoint"):
        detector.predict([], img_size=64)


def test_predict_maps_boxes_to_each_image(confident_checkpoint: Path, tiny_set) -> None:
    detector = load_detector(confident_checkpoint)
    boxes = detector.predict(
        tiny_set.paths[:3],
        img_size=96,
        conf=0.05,
        max_det=20,
        tta_flip=True,
        device="cpu",
        names=["a.jpg", "b.jpg", "c.jpg"],
    )
    assert tuple(boxes.columns) == PREDICT_COLUMNS
    assert set(boxes["NAME"]) <= {"a.jpg", "b.jpg", "c.jpg"} and set(boxes["tta"]) == {"none", "hflip"}
    assert (boxes["score"] > 0.05).all() and boxes.groupby(["NAME", "tta"]).size().max() <= 20
    xyxy = boxes[["x1", "y1", "x2", "y2"]].to_numpy()
    assert (xyxy >= 0).all() and (xyxy <= 96).all() and (xyxy[:, 2] >= xyxy[:, 0]).all()
    raw = detector.forward_fn("cpu")(np.zeros((1, 3, 96, 96), np.float32))
    assert tuple(raw.shape) == (1, 5, 12 * 12 + 6 * 6 + 3 * 3)
    with pytest.raises(CytologiaInputError, match="2 names for 3 images"):
        detector.predict(tiny_set.paths[:3], img_size=96, names=["a", "b"])


# Runs in a fresh interpreter: ultralytics blocked before anything is imported, then the detector stage trains a
# yolox_nano fold on generated data, writes out-of-fold boxes, and the trained detector is exported and run by ONNX
# Runtime. Prints a JSON summary on the last line.
BLOCKED_RUN = textwrap.dedent(
    """
    import importlib.abc, json, sys
    from pathlib import Path

    class BlockUltralytics(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ultralytics" or name.startswith("ultralytics."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockUltralytics())
    from hydra import compose, initialize_config_dir
    from cytologia.train import train
    from cytologia.detection import load_detector
    from cytologia.detection.export import OnnxDetector

    base = Path(sys.argv[1])
    with initialize_config_dir(config_dir=sys.argv[2], version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "+exp=det_smoke", "detector=yolox_nano", "detector.model=yolox_nano", "detector.img_size=64",
            "detector.optimizer=AdamW", "detector.lr=0.001", "detector.batch_size=4", "data.n_images=16",
            "detector.train_args.no_aug_epochs=0", f"paths.data_dir={base / 'data'}",
            f"paths.output_dir={base / 'out'}", f"paths.cache_dir={base / 'cache'}", "fold=0",
        ])
    result = train(cfg, run_dir=base / "run")
    ckpt = base / "run" / "fold_0" / "detector.pt"
    detector = load_detector(ckpt)
    onnx_path = detector.export_onnx(base / "yolox.onnx", img_size=64)
    images = sorted((base / "data" / "synthetic" / "images").glob("*.jpg"))[:2]
    n_onnx = len(OnnxDetector(onnx_path).predict(images, img_size=64, conf=0.0))
    blocked = [m for m in sys.modules if m == "ultralytics" or m.startswith("ultralytics.")]
    from cytologia.errors import CytologiaInputError
    from cytologia.detection import get_backend, list_detectors
    try:
        get_backend("ultralytics")
        hint = ""
    except CytologiaInputError as err:
        hint = str(err)
    print(json.dumps({"oof": result["oof_known_count_giou"], "n_onnx": n_onnx, "loaded": blocked,
                      "listed": sorted({n.split("/")[0] for n in list_detectors()}), "hint": hint}))
    """
)


def test_stage_runs_with_ultralytics_not_importable(tmp_path: Path) -> None:
    """An Apache-only install: the detector stage, prediction and export of YOLOX never import ultralytics."""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(tmp_path), str(ROOT / "configs")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["loaded"] == []
    assert summary["listed"] == ["yolox"]  # the absent backend is not listed ...
    assert "pip install 'cytologia[ultralytics]'" in summary["hint"]  # ... and asking for it says how to install it
    assert set(summary["oof"]) == {"yolox_nano_64", "yolox_nano_64+hflip"}
    assert all(0.0 <= v <= 1.0 for v in summary["oof"].values())
    assert summary["n_onnx"] > 0
    assert (tmp_path / "run" / "oof_boxes.csv").is_file()
    assert (tmp_path / "run" / "fold_0" / "yolox" / "best.pt").is_file()
