"""ONNX export: the graph runs in ONNX Runtime and gives torch's boxes; the CLI command; the CPU timing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.cli import main
from cytologia.detection import load_detector
from cytologia.detection.export import (
    BOX_ATOL_PX,
    RAW_BOX_ATOL_PX,
    RAW_SCORE_ATOL,
    OnnxDetector,
    benchmark,
    export_detector,
    generated_images,
    verify_onnx,
)
from cytologia.errors import CytologiaInputError


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
    code = main(
        [
            "export",
            "detector",
            "--weights",
            str(weights),
            "--out",
            str(out),
            "--img-size",
            "128",
            "--n-verify",
            "2",
            "--bench",
            "--report",
            str(report),
        ]
    )
    assert code == 0 and out.is_file()
    results = json.loads(report.read_text())
    assert results["parity"]["passed"] is True
    assert results["bench"]["torch_ms_per_image"] > 0 and results["bench"]["onnxruntime_ms_per_image"] > 0


@pytest.mark.ultralytics
@pytest.mark.parametrize("broken", ["raw boxes", "boxes after NMS"])
def test_export_command_exits_1_when_onnx_and_torch_differ(
    broken: str, exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ONNX Runtime's side broken on purpose, twice one tolerance and within the other: FAIL, exit status 1.
    ``raw boxes``: every raw box shifted 2 * RAW_BOX_ATOL_PX (the boxes after NMS move less than BOX_ATOL_PX);
    ``boxes after NMS``: the final boxes shifted 2 * BOX_ATOL_PX (raw outputs untouched)."""
    weights, _ = exported
    if broken == "raw boxes":
        run_graph = OnnxDetector.forward

        def forward(self: OnnxDetector, x: np.ndarray) -> np.ndarray:
            raw = run_graph(self, x).copy()
            raw[:, 0] += 2 * RAW_BOX_ATOL_PX  # centre x, network input px
            return raw

        monkeypatch.setattr(OnnxDetector, "forward", forward)
    else:
        run_predict = OnnxDetector.predict

        def predict(self: OnnxDetector, images, **kw) -> pd.DataFrame:
            boxes = run_predict(self, images, **kw)
            return boxes.assign(x1=boxes["x1"] + 2 * BOX_ATOL_PX, x2=boxes["x2"] + 2 * BOX_ATOL_PX)

        monkeypatch.setattr(OnnxDetector, "predict", predict)
    report = tmp_path / "report.json"
    code = main(
        [
            "export",
            "detector",
            "--weights",
            str(weights),
            "--out",
            str(tmp_path / "m.onnx"),
            "--img-size",
            "128",
            "--n-verify",
            "2",
            "--report",
            str(report),
        ]
    )
    assert code == 1
    assert "): FAIL" in capsys.readouterr().out
    parity = json.loads(report.read_text())["parity"]
    assert parity["passed"] is False and parity["raw_score_max_abs"] <= RAW_SCORE_ATOL
    if broken == "raw boxes":
        assert parity["raw_box_max_abs_px"] == pytest.approx(2 * RAW_BOX_ATOL_PX, rel=0.05)
        assert parity["box_max_abs_px"] <= BOX_ATOL_PX  # only the raw check catches it
    else:
        assert parity["raw_box_max_abs_px"] <= RAW_BOX_ATOL_PX
        assert parity["box_max_abs_px"] == pytest.approx(2 * BOX_ATOL_PX, abs=0.01)


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
