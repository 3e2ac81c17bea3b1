"""ONNX export of a trained detector of any backend, checked against torch, and a torch vs ONNX Runtime timing.

The graph holds the network only (NMS outside; each backend writes it, :meth:`Detector.write_onnx`), input ``images``
float32 (B, 3, S, S) RGB in [0, 1], output ``output0`` (B, 5, anchors): centre-size boxes in input pixels and the
score; its metadata records the backend (:data:`~cytologia.detection.base.BACKEND_KEY`). :class:`OnnxDetector` runs it
with the *same* letterbox, decoding (the backend's NMS) and box mapping as the torch detector
(:meth:`Detector.detect_images`), so the two differ only in the network.

Parity (:func:`verify_onnx`), on the same letterboxed batch:

- raw outputs: max |torch - ORT| <= :data:`RAW_BOX_ATOL_PX` on box coordinates (input pixels) and
  <= :data:`RAW_SCORE_ATOL` on scores (fp32 on both sides differs by ~1e-4 px on a 512 px input: kernel order);
- boxes after NMS: every box of either side within :data:`BOX_ATOL_PX` image pixels (each coordinate) of a box of
  the other side in the same image. Counts are reported, not required equal: boxes of (near-)equal score that
  overlap at about the NMS threshold -- an undertrained model makes many -- can flip in or out on a 1e-5 difference.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytologia.data.schema import BOX_COLUMNS
from cytologia.detection.base import BACKEND_KEY, Detector
from cytologia.detection.registry import get_backend, load_detector
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

RAW_BOX_ATOL_PX = 0.05  # px of the network input
RAW_SCORE_ATOL = 1e-4  # score (probability) units
BOX_ATOL_PX = 1.0  # px of the image, after NMS and mapping back


def export_detector(
    weights: str | Path, out: str | Path, img_size: int, opset: int | None = None
) -> tuple[Detector, Path]:
    """Export the trained checkpoint ``weights`` (of the backend it records) to ONNX at ``out``; returns the (torch)
    detector and the path."""
    detector = load_detector(weights)
    path = detector.export_onnx(out, img_size=img_size, opset=opset)
    log.info(
        "exported %s (%s/%s) to %s (%.1f MB)",
        weights,
        detector.backend,
        detector.model,
        path,
        path.stat().st_size / 1e6,
    )
    return detector, path


def record_backend(path: Path, backend: str) -> Path:
    """Record ``backend`` in the metadata of the ONNX graph at ``path`` (:data:`BACKEND_KEY`, replacing an earlier
    value); returns ``path``."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props[BACKEND_KEY] = backend
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def graph_backend(session: Any) -> str | None:
    """The backend an ONNX Runtime session's graph records (:data:`BACKEND_KEY`); None for a graph that records none
    (exported before graphs did)."""
    return session.get_modelmeta().custom_metadata_map.get(BACKEND_KEY)


class OnnxDetector:
    """An exported detector run by ONNX Runtime: ``predict`` gives the torch detector's table for the same images.

    ``backend``: the backend whose decoding ``predict`` uses; None = the one the graph records. A graph recording
    another backend than ``backend`` is an error; one recording none needs ``backend`` to predict."""

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        backend: str | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise CytologiaInputError(f"{self.path}: ONNX file not found")
        options = ort.SessionOptions()
        # ORT's worker threads busy-wait between runs by default; on a 2-core CPU that steals the cores from image
        # decoding and from anything else in the process (torch ran 5-40x slower interleaved with a spinning session)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise CytologiaInputError(f"{self.path}: not a loadable ONNX model ({err})") from err
        self.input_name = self.session.get_inputs()[0].name
        recorded = graph_backend(self.session)
        if backend is not None and recorded is not None and recorded != backend:
            raise CytologiaInputError(f"{self.path}: a graph of a {recorded} detector, not of {backend}")
        self.backend = recorded or backend

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Network input (float32 (B, 3, S, S)) -> raw output (B, 5, anchors)."""
        return self.session.run(None, {self.input_name: x})[0]

    def predict(
        self,
        images: Sequence[str | Path],
        *,
        img_size: int,
        conf: float = 0.001,
        iou: float = 0.6,
        max_det: int = 50,
        tta_flip: bool = False,
        batch_size: int = 16,
        names: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Boxes of ``images`` as :meth:`Detector.predict` gives them, with the graph in place of the torch network."""
        if self.backend is None:
            raise CytologiaInputError(
                f"{self.path}: the graph does not record its detector backend ({BACKEND_KEY}); "
                "give OnnxDetector(..., backend=NAME)"
            )
        return get_backend(self.backend).detect_images(
            self.forward,
            images,
            names,
            img_size=img_size,
            conf=conf,
            iou=iou,
            max_det=max_det,
            tta_flip=tta_flip,
            batch_size=batch_size,
        )


@dataclass
class ParityReport:
    """How close ONNX Runtime is to torch on the same images (see the module docstring for the tolerances)."""

    n_images: int
    raw_box_max_abs_px: float
    raw_score_max_abs: float
    n_boxes_torch: int
    n_boxes_onnx: int
    images_with_count_mismatch: int
    box_max_abs_px: float  # after NMS: worst distance of a box to the nearest box of the other side, image px
    passed: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"ONNX vs torch on {self.n_images} images: raw max |diff| boxes {self.raw_box_max_abs_px:.2e} px "
            f"(tol {RAW_BOX_ATOL_PX}), scores {self.raw_score_max_abs:.2e} (tol {RAW_SCORE_ATOL}); after NMS "
            f"{self.n_boxes_torch} vs {self.n_boxes_onnx} boxes, {self.images_with_count_mismatch} image(s) with a "
            f"different count, max |diff| {self.box_max_abs_px:.3f} px (tol {BOX_ATOL_PX}): "
            f"{'PASS' if self.passed else 'FAIL'}"
        )


def _nearest_box_diff(a: pd.DataFrame, b: pd.DataFrame) -> tuple[int, float]:
    """(images whose box counts differ, worst L-infinity distance from any box of either table to the nearest box of
    the other table in the same image; inf when an image has boxes on one side only)."""
    mismatch, worst = 0, 0.0
    groups_a, groups_b = dict(tuple(a.groupby("NAME"))), dict(tuple(b.groupby("NAME")))
    for name in set(groups_a) | set(groups_b):
        ga, gb = groups_a.get(name), groups_b.get(name)
        if ga is None or gb is None or len(ga) != len(gb):
            mismatch += 1
        if ga is None or gb is None:
            worst = float("inf")
            continue
        pa, pb = ga[list(BOX_COLUMNS)].to_numpy(), gb[list(BOX_COLUMNS)].to_numpy()
        dist = np.abs(pa[:, None, :] - pb[None, :, :]).max(axis=2)
        worst = max(worst, float(dist.min(axis=1).max()), float(dist.min(axis=0).max()))
    return mismatch, worst


def verify_onnx(
    detector: Detector,
    onnx_path: str | Path,
    images: Sequence[str | Path],
    img_size: int,
    *,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 50,
) -> ParityReport:
    """Compare ONNX Runtime with torch on ``images`` (raw outputs and boxes after NMS), CPU, fp32."""
    from cytologia.data.images import decode
    from cytologia.detection.letterbox import letterbox, to_input

    if not images:
        raise CytologiaInputError("ONNX verification needs at least one image")
    onnx = OnnxDetector(onnx_path, backend=detector.backend)
    torch_forward = detector.forward_fn("cpu")
    x = to_input([letterbox(decode(p), img_size)[0] for p in images])
    raw_t = np.asarray(torch_forward(x).cpu().numpy(), dtype=np.float64)
    raw_o = np.asarray(onnx.forward(x), dtype=np.float64)
    if raw_t.shape != raw_o.shape:
        raise CytologiaInputError(f"{onnx_path}: output shape {raw_o.shape} differs from torch's {raw_t.shape}")
    diff = np.abs(raw_t - raw_o)
    raw_box, raw_score = float(diff[:, :4].max()), float(diff[:, 4:].max())
    kw = {"img_size": img_size, "conf": conf, "iou": iou, "max_det": max_det}
    boxes_t = detector.predict(images, device="cpu", **kw)
    boxes_o = onnx.predict(images, **kw)
    mismatch, worst = _nearest_box_diff(boxes_t, boxes_o)
    passed = raw_box <= RAW_BOX_ATOL_PX and raw_score <= RAW_SCORE_ATOL and worst <= BOX_ATOL_PX
    return ParityReport(
        n_images=len(images),
        raw_box_max_abs_px=raw_box,
        raw_score_max_abs=raw_score,
        n_boxes_torch=len(boxes_t),
        n_boxes_onnx=len(boxes_o),
        images_with_count_mismatch=mismatch,
        box_max_abs_px=worst,
        passed=passed,
    )


def generated_images(out_dir: str | Path, n: int = 8, size: int = 368, seed: int = 0) -> list[Path]:
    """``n`` synthetic smear JPEGs (1-3 cells each) written to ``out_dir``: verification images needing no data."""
    from cytologia.data.schema import CLASSES
    from cytologia.data.synthetic.render import encode_jpeg, render_scene
    from cytologia.data.synthetic.sources import SOURCES

    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        source = SOURCES[i % len(SOURCES)]
        classes = [str(c) for c in rng.choice(CLASSES, size=int(rng.integers(1, 4)))]
        scene = render_scene(rng, source, classes, size)
        path = out_dir / f"verify_{i:03d}.jpg"
        path.write_bytes(encode_jpeg(scene.image, source))
        paths.append(path)
    return paths


def benchmark(
    detector: Detector,
    onnx_path: str | Path,
    images: Sequence[str | Path],
    img_size: int,
    *,
    threads: int = 2,
    batch_size: int = 1,
    repeats: int = 3,
) -> dict[str, float]:
    """Detection ms/image on the CPU (decode, letterbox, network, NMS), torch and ONNX Runtime on the same images
    with the same thread count: the best pass of two rounds of (one warm-up + ``repeats`` timed passes) each."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    onnx = OnnxDetector(onnx_path, threads=threads, backend=detector.backend)
    runners = {
        "torch": lambda: detector.predict(images, img_size=img_size, batch_size=batch_size, device="cpu"),
        "onnxruntime": lambda: onnx.predict(images, img_size=img_size, batch_size=batch_size),
    }
    out: dict[str, float] = {"threads": threads, "batch_size": batch_size, "n_images": len(images)}
    best = dict.fromkeys(runners, float("inf"))
    try:
        # Blocks of passes per runtime, twice in turn: both face the same outside load, and the untimed first pass of
        # a block absorbs the other runtime's threads still spinning (OpenMP and ORT pools busy-wait after work).
        for _ in range(2):
            for name, run in runners.items():
                run()
                for _ in range(repeats):
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    for name, seconds in best.items():
        out[f"{name}_ms_per_image"] = 1000.0 * seconds / len(images)
    return out


def export_and_verify(
    weights: str | Path,
    out: str | Path,
    img_size: int,
    *,
    images: Sequence[str | Path] | None = None,
    n_verify: int = 8,
    opset: int | None = None,
) -> tuple[Path, ParityReport]:
    """Export, then verify on ``images`` (default: ``n_verify`` generated images); returns the path and the report."""
    detector, path = export_detector(weights, out, img_size, opset=opset)
    with tempfile.TemporaryDirectory(prefix="cytologia-verify-") as tmp:
        sample = list(images) if images else generated_images(tmp, n_verify)
        report = verify_onnx(detector, path, sample, img_size)
    return path, report
