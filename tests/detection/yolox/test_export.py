"""ONNX export with the decoding in the graph: ONNX Runtime gives torch's raw outputs and boxes (batch and size
dynamic), without ultralytics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from cytologia.data.errors import CytologiaInputError
from cytologia.detection import load_detector
from cytologia.detection.export import BOX_ATOL_PX, RAW_BOX_ATOL_PX, RAW_SCORE_ATOL, OnnxDetector
from cytologia.detection.yolox.export import OnnxYolox, benchmark, verify_onnx


@pytest.fixture(scope="module")
def exported(confident_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    detector = load_detector(confident_checkpoint, backend="yolox")
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
    runner = OnnxYolox(path)
    for shape in ((3, 3, 96, 96), (1, 3, 128, 160)):
        out = runner.forward(np.random.default_rng(0).random(shape, dtype=np.float32))
        n_anchors = sum((shape[2] // s) * (shape[3] // s) for s in (8, 16, 32))
        assert out.shape == (shape[0], 5, n_anchors)


def test_onnx_runtime_matches_torch(exported, tiny_set) -> None:
    weights, path = exported
    detector = load_detector(weights, backend="yolox")
    report = verify_onnx(detector, path, tiny_set.paths[:4], 96)
    assert report.passed, report.summary()
    assert report.n_boxes_torch > 0 and report.raw_box_max_abs_px <= RAW_BOX_ATOL_PX
    assert report.box_max_abs_px <= BOX_ATOL_PX and report.images_with_count_mismatch == 0
    boxes = OnnxYolox(path).predict(tiny_set.paths[:2], img_size=96, tta_flip=True)
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
    report = verify_onnx(load_detector(weights, backend="yolox"), path, tiny_set.paths[:2], 96)
    assert not report.passed and report.summary().endswith(": FAIL")
    measured = report.raw_box_max_abs_px if row < 4 else report.raw_score_max_abs
    assert measured == pytest.approx(offset, rel=0.05)  # the offset plus the fp32 difference of the two runtimes


def test_benchmark_reports_both_runtimes(exported, tiny_set) -> None:
    weights, path = exported
    timing = benchmark(load_detector(weights, backend="yolox"), path, tiny_set.paths[:2], 96, threads=1, repeats=1)
    assert timing["torch_ms_per_image"] > 0 and timing["onnxruntime_ms_per_image"] > 0


def test_onnx_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CytologiaInputError, match="not found"):
        OnnxYolox(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(CytologiaInputError, match="bad.onnx"):
        OnnxYolox(bad)
