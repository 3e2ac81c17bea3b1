"""ONNX export: the graph runs in ONNX Runtime and gives torch's boxes; the CLI command; the CPU timing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cytologia.cli import main
from cytologia.data.errors import CytologiaInputError
from cytologia.detection import load_detector
from cytologia.detection.export import (
    BOX_ATOL_PX,
    OnnxDetector,
    benchmark,
    export_detector,
    generated_images,
    verify_onnx,
)


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("onnx") / "detector.onnx"
    _, path = export_detector(smoke_run.checkpoint, out, img_size=128)
    return smoke_run.checkpoint, path


@pytest.mark.ultralytics
def test_onnx_boxes_match_torch(exported, tmp_path: Path) -> None:
    weights, path = exported
    detector = load_detector(weights)
    images = generated_images(tmp_path, n=4, size=200)
    report = verify_onnx(detector, path, images, 128)
    assert report.passed, report.summary()
    assert report.n_images == 4 and report.n_boxes_torch > 0 and report.box_max_abs_px <= BOX_ATOL_PX
    # the graph has a dynamic batch and size: a batch of 4 and a 160 px input run
    onnx = OnnxDetector(path)
    assert onnx.forward(np.zeros((4, 3, 160, 160), np.float32)).shape[:2] == (4, 5)
    boxes = onnx.predict(images, img_size=128, tta_flip=True)
    assert set(boxes["tta"]) == {"none", "hflip"}


@pytest.mark.ultralytics
def test_export_command_verifies_and_benchmarks(exported, tmp_path: Path) -> None:
    weights, _ = exported
    out, report = tmp_path / "cli.onnx", tmp_path / "report.json"
    code = main(["export", "detector", "--weights", str(weights), "--out", str(out), "--img-size", "128",
                 "--n-verify", "2", "--bench", "--report", str(report)])  # fmt: skip
    assert code == 0 and out.is_file()
    results = json.loads(report.read_text())
    assert results["parity"]["passed"] is True
    assert results["bench"]["torch_ms_per_image"] > 0 and results["bench"]["onnxruntime_ms_per_image"] > 0


def test_export_errors(tmp_path: Path) -> None:
    assert main(["export", "detector", "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(CytologiaInputError, match="bad.onnx"):
        OnnxDetector(bad)


@pytest.mark.bench
def test_bench_torch_vs_onnxruntime_on_two_threads(exported, tmp_path: Path) -> None:
    """ms/image of detection (decode, letterbox, network, NMS) at 128 px on 2 threads; prints the numbers."""
    weights, path = exported
    images = generated_images(tmp_path, n=32, size=368)
    timing = benchmark(load_detector(weights), path, images, 128, threads=2, batch_size=1)
    print(timing)
    assert timing["torch_ms_per_image"] > 0
