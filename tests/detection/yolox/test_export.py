"""ONNX export with the decoding in the graph: ONNX Runtime gives torch's raw outputs and boxes (batch and size
dynamic), without ultralytics; `cytologia export detector` on a YOLOX checkpoint, exit 1 past the tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
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
    verify_onnx,
)
from cytologia.errors import CytologiaInputError


@pytest.fixture(scope="module")
def exported(confident_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    detector = load_detector(confident_checkpoint)
    path = detector.export_onnx(tmp_path_factory.mktemp("onnx") / "yolox.onnx", img_size=96)
    return confident_checkpoint, path


def test_graph_holds_the_decoding_and_dynamic_axes(exported) -> None:
    _, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["output0"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "height" and dims[3] == "width"
    ops = {n.op_type for n in graph.node}
    assert {"Exp", "Sigmoid"} <= ops and "BatchNormalization" not in ops  # decoding in the graph, BN fused
    runner = OnnxDetector(path)
    assert runner.backend == "yolox"  # recorded in the graph's metadata
    for shape in ((3, 3, 96, 96), (1, 3, 128, 160)):
        out = runner.forward(np.random.default_rng(0).random(shape, dtype=np.float32))
        n_anchors = sum((shape[2] // s) * (shape[3] // s) for s in (8, 16, 32))
        assert out.shape == (shape[0], 5, n_anchors)


def test_onnx_runtime_matches_torch(exported, tiny_set) -> None:
    weights, path = exported
    detector = load_detector(weights)
    report = verify_onnx(detector, path, tiny_set.paths[:4], 96)
    assert report.passed, report.summary()
    assert report.n_boxes_torch > 0 and report.raw_box_max_abs_px <= RAW_BOX_ATOL_PX
    assert report.box_max_abs_px <= BOX_ATOL_PX and report.images_with_count_mismatch == 0
    boxes = OnnxDetector(path).predict(tiny_set.paths[:2], img_size=96, tta_flip=True)
    assert set(boxes["tta"]) == {"none", "hflip"}


@pytest.mark.parametrize("row, offset", [(0, 2 * RAW_BOX_ATOL_PX), (4, 2 * RAW_SCORE_ATOL)])
def test_parity_fails_past_the_tolerance(exported, tiny_set, monkeypatch, row: int, offset: float) -> None:
    """ONNX Runtime's raw output broken on purpose (a box coordinate or the score, twice its tolerance): not passed."""
    weights, path = exported
    run_graph = OnnxDetector.forward

    def off(self: OnnxDetector, x: np.ndarray) -> np.ndarray:
        raw = run_graph(self, x).copy()
        raw[:, row] += offset
        return raw

    monkeypatch.setattr(OnnxDetector, "forward", off)
    report = verify_onnx(load_detector(weights), path, tiny_set.paths[:2], 96)
    assert not report.passed and report.summary().endswith(": FAIL")
    measured = report.raw_box_max_abs_px if row < 4 else report.raw_score_max_abs
    assert measured == pytest.approx(offset, rel=0.05)  # the offset plus the fp32 difference of the two runtimes


def test_benchmark_reports_both_runtimes(exported, tiny_set) -> None:
    weights, path = exported
    timing = benchmark(load_detector(weights), path, tiny_set.paths[:2], 96, threads=1, repeats=1)
    assert timing["torch_ms_per_image"] > 0 and timing["onnxruntime_ms_per_image"] > 0


def test_onnx_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CytologiaInputError, match="not found"):
        OnnxDetector(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(CytologiaInputError, match="bad.onnx"):
        OnnxDetector(bad)


def test_a_graph_of_another_backend_is_refused(exported) -> None:
    _, path = exported
    with pytest.raises(CytologiaInputError, match=r"yolox.onnx: a graph of a yolox detector, not of ultralytics"):
        OnnxDetector(path, backend="ultralytics")


def _export_cli(weights: Path, tmp_path: Path, images: Path) -> tuple[int, dict]:
    report = tmp_path / "report.json"
    code = main(
        [
            "export",
            "detector",
            "--weights",
            str(weights),
            "--out",
            str(tmp_path / "cli.onnx"),
            "--img-size",
            "96",
            "--images",
            str(images),
            "--n-verify",
            "4",
            "--report",
            str(report),
        ]
    )
    return code, json.loads(report.read_text())


def test_export_command_exports_and_verifies_a_yolox_checkpoint(exported, tiny_set, tmp_path: Path, capsys) -> None:
    """The backend is read from the checkpoint: no option names it."""
    weights, _ = exported
    code, results = _export_cli(weights, tmp_path, tiny_set.image_dir)
    assert code == 0 and (tmp_path / "cli.onnx").is_file()
    assert "(yolox/yolox_nano)" in capsys.readouterr().out
    parity = results["parity"]
    assert parity["passed"] is True and parity["n_images"] == 4 and parity["n_boxes_torch"] > 0
    assert parity["raw_box_max_abs_px"] <= RAW_BOX_ATOL_PX and parity["box_max_abs_px"] <= BOX_ATOL_PX
    assert OnnxDetector(tmp_path / "cli.onnx").backend == "yolox"


@pytest.mark.parametrize("broken", ["raw boxes", "raw scores", "boxes after NMS"])
def test_export_command_exits_1_past_the_tolerance_on_a_yolox_checkpoint(
    broken: str, exported, tiny_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """ONNX Runtime's side broken on purpose, twice one tolerance: FAIL, exit status 1. ``raw boxes`` / ``raw
    scores``: one row of the raw output offset; ``boxes after NMS``: the final boxes shifted (raw outputs untouched)."""
    weights, _ = exported
    if broken.startswith("raw"):
        row, offset = (0, 2 * RAW_BOX_ATOL_PX) if broken == "raw boxes" else (4, 2 * RAW_SCORE_ATOL)
        run_graph = OnnxDetector.forward

        def forward(self: OnnxDetector, x: np.ndarray) -> np.ndarray:
            raw = run_graph(self, x).copy()
            raw[:, row] += offset
            return raw

        monkeypatch.setattr(OnnxDetector, "forward", forward)
    else:
        run_predict = OnnxDetector.predict

        def predict(self: OnnxDetector, images, **kw) -> pd.DataFrame:
            boxes = run_predict(self, images, **kw)
            return boxes.assign(x1=boxes["x1"] + 2 * BOX_ATOL_PX, x2=boxes["x2"] + 2 * BOX_ATOL_PX)

        monkeypatch.setattr(OnnxDetector, "predict", predict)
    code, results = _export_cli(weights, tmp_path, tiny_set.image_dir)
    assert code == 1 and "): FAIL" in capsys.readouterr().out
    parity = results["parity"]
    assert parity["passed"] is False
    if broken == "raw boxes":
        assert parity["raw_box_max_abs_px"] == pytest.approx(2 * RAW_BOX_ATOL_PX, rel=0.05)
        assert parity["raw_score_max_abs"] <= RAW_SCORE_ATOL
    elif broken == "raw scores":
        assert parity["raw_score_max_abs"] == pytest.approx(2 * RAW_SCORE_ATOL, rel=0.05)
        assert parity["raw_box_max_abs_px"] <= RAW_BOX_ATOL_PX
    else:
        assert parity["raw_box_max_abs_px"] <= RAW_BOX_ATOL_PX and parity["raw_score_max_abs"] <= RAW_SCORE_ATOL
        assert parity["box_max_abs_px"] == pytest.approx(2 * BOX_ATOL_PX, abs=0.01)
