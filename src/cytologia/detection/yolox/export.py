"""ONNX export of a trained YOLOX with the decoding in the graph, its ONNX Runtime runner, parity check and timing.

The graph is :class:`cytologia.detection.yolox.model.YoloxInference` (batch norm fused, input convention folded into
the stem): input ``images`` float32 (B, 3, H, W) RGB in [0, 1], output ``output0`` (B, 5, anchors) = centre-size box
in input pixels and score. Batch, height and width are dynamic (the grid is built from the feature-map shapes in the
graph). NMS stays outside, in :func:`cytologia.detection.yolox.infer.detect_images`, shared with torch, so the two
differ only in the network. Nothing here imports ultralytics.

Parity (:func:`verify_onnx`) uses the tolerances and report of :mod:`cytologia.detection.export`: raw outputs within
``RAW_BOX_ATOL_PX`` / ``RAW_SCORE_ATOL``, boxes after NMS within ``BOX_ATOL_PX`` of a box of the other side.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cytologia.data.errors import CytologiaInputError
from cytologia.data.images import decode
from cytologia.data.schema import BOX_COLUMNS
from cytologia.detection.export import BOX_ATOL_PX, RAW_BOX_ATOL_PX, RAW_SCORE_ATOL, OnnxDetector, ParityReport
from cytologia.detection.letterbox import letterbox, to_input
from cytologia.detection.registry import Detector
from cytologia.detection.yolox.infer import detect_images
from cytologia.detection.yolox.model import YoloxInference

DEFAULT_OPSET = 17


def export_onnx(net: YoloxInference, path: str | Path, img_size: int, opset: int | None = None) -> Path:
    """Write ``net`` (CPU, fp32) to ONNX at ``path`` with dynamic batch/height/width; the file is checked by
    ``onnx.checker``."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.cpu().float().eval()
    dummy = torch.zeros(1, 3, img_size, img_size)
    # The TorchScript exporter (dynamo=False) is the one ultralytics uses too; torch marks it deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net, (dummy,), str(path), dynamo=False, input_names=["images"], output_names=["output0"],
            opset_version=opset or DEFAULT_OPSET, do_constant_folding=True,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}},
        )  # fmt: skip
    onnx.checker.check_model(str(path))
    return path


class OnnxYolox(OnnxDetector):
    """An exported YOLOX run by ONNX Runtime (session set up as :class:`~cytologia.detection.export.OnnxDetector`);
    ``predict`` gives the torch detector's table for the same images, decoded without ultralytics."""

    def predict(
        self, images: Sequence[str | Path], *, img_size: int, conf: float = 0.001, iou: float = 0.6, max_det: int = 50,
        tta_flip: bool = False, batch_size: int = 16, names: Sequence[str] | None = None,
    ) -> pd.DataFrame:  # fmt: skip
        return detect_images(
            self.forward, images, names, img_size=img_size, conf=conf, iou=iou, max_det=max_det, tta_flip=tta_flip,
            batch_size=batch_size,
        )  # fmt: skip


def _nearest(a: pd.DataFrame, b: pd.DataFrame) -> tuple[int, float]:
    """(images whose box counts differ, worst L-inf distance of a box to the nearest box of the other table in the
    same image; inf when an image has boxes on one side only)."""
    mismatch, worst = 0, 0.0
    ga, gb = dict(tuple(a.groupby("NAME"))), dict(tuple(b.groupby("NAME")))
    for name in set(ga) | set(gb):
        x, y = ga.get(name), gb.get(name)
        if x is None or y is None:
            mismatch, worst = mismatch + 1, float("inf")
            continue
        mismatch += int(len(x) != len(y))
        d = np.abs(x[list(BOX_COLUMNS)].to_numpy()[:, None] - y[list(BOX_COLUMNS)].to_numpy()[None]).max(axis=2)
        worst = max(worst, float(d.min(axis=1).max()), float(d.min(axis=0).max()))
    return mismatch, worst


def verify_onnx(
    detector: Detector, onnx_path: str | Path, images: Sequence[str | Path], img_size: int, *, conf: float = 0.001,
    iou: float = 0.6, max_det: int = 50,
) -> ParityReport:  # fmt: skip
    """Compare ONNX Runtime with torch on ``images``: raw outputs of the same batch, and boxes after NMS (CPU, fp32)."""
    if not images:
        raise CytologiaInputError("ONNX verification needs at least one image")
    onnx = OnnxYolox(onnx_path)
    x = to_input([letterbox(decode(p), img_size)[0] for p in images])
    raw_t = np.asarray(detector.forward_fn("cpu")(x).cpu().numpy(), dtype=np.float64)
    raw_o = np.asarray(onnx.forward(x), dtype=np.float64)
    if raw_t.shape != raw_o.shape:
        raise CytologiaInputError(f"{onnx_path}: output shape {raw_o.shape} differs from torch's {raw_t.shape}")
    diff = np.abs(raw_t - raw_o)
    raw_box, raw_score = float(diff[:, :4].max()), float(diff[:, 4:].max())
    kw = {"img_size": img_size, "conf": conf, "iou": iou, "max_det": max_det}
    boxes_t = detector.predict(images, device="cpu", **kw)
    boxes_o = onnx.predict(images, **kw)
    mismatch, worst = _nearest(boxes_t, boxes_o)
    return ParityReport(
        n_images=len(images), raw_box_max_abs_px=raw_box, raw_score_max_abs=raw_score, n_boxes_torch=len(boxes_t),
        n_boxes_onnx=len(boxes_o), images_with_count_mismatch=mismatch, box_max_abs_px=worst,
        passed=raw_box <= RAW_BOX_ATOL_PX and raw_score <= RAW_SCORE_ATOL and worst <= BOX_ATOL_PX,
    )  # fmt: skip


def benchmark(
    detector: Detector, onnx_path: str | Path, images: Sequence[str | Path], img_size: int, *, threads: int = 2,
    batch_size: int = 1, repeats: int = 3,
) -> dict[str, float]:  # fmt: skip
    """Detection ms/image on the CPU (decode, letterbox, network, NMS), torch and ONNX Runtime on the same images with
    the same thread count; the best of ``repeats`` interleaved passes after one warm-up pass each."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    onnx = OnnxYolox(onnx_path, threads=threads)
    runners = {
        "torch": lambda: detector.predict(images, img_size=img_size, batch_size=batch_size, device="cpu"),
        "onnxruntime": lambda: onnx.predict(images, img_size=img_size, batch_size=batch_size),
    }
    best = dict.fromkeys(runners, float("inf"))
    try:
        for run in runners.values():
            run()  # warm-up: lazy initialisation, allocator, caches
        for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
            for key, run in runners.items():
                t0 = time.perf_counter()
                run()
                best[key] = min(best[key], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    out: dict[str, float] = {"threads": threads, "batch_size": batch_size, "n_images": len(images)}
    out.update({f"{k}_ms_per_image": 1000.0 * v / len(images) for k, v in best.items()})
    return out
