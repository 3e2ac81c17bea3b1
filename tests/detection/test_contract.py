"""Every registered detector backend through the same contract (:class:`cytologia.detection.base.Detector`): a random
checkpoint that records its backend -> loaded by file alone -> predict on a few generated images (columns, counts,
boxes in each image's own pixels, the mirrored pass) -> ONNX export recording the backend -> ONNX Runtime vs torch
parity, through the API and through `cytologia export detector`.

A new backend (one module + one line in ``BACKENDS``) is picked up here without editing this file; one whose package
is optional is marked ``ultralytics`` when that is the package, else skipped when the package is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cytologia.cli import main
from cytologia.detection.base import BACKEND_KEY, PREDICT_COLUMNS, read_header
from cytologia.detection.registry import (
    BACKENDS,
    OPTIONAL_PACKAGES,
    backend_available,
    checkpoint_backend,
    get_backend,
    load_detector,
)

SIZE = 64  # network input: 8x8 + 4x4 + 2x2 = 84 anchors at strides 8, 16, 32
IMAGE_SIDE = 96  # generated images: letterboxed down, so boxes come back scaled up by 1.5


def _marks(backend: str) -> list[pytest.MarkDecorator]:
    """``ultralytics`` for the backend that needs that package (tests/conftest.py skips it when absent); a skip for
    another backend whose optional package is absent."""
    need = OPTIONAL_PACKAGES.get(backend)
    if need is None:
        return []
    if need[0] == "ultralytics":
        return [pytest.mark.ultralytics]
    return [pytest.mark.skipif(not backend_available(backend), reason=f"needs the {need[0]} package")]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from cytologia.detection.export import generated_images

    folder = tmp_path_factory.mktemp("contract_images")
    paths = generated_images(folder, n=3, size=IMAGE_SIDE)
    # a square image at the input size (no resize, no padding) and its mirror: the flip pass of the one is the
    # plain pass of the other, bit for bit
    square = cv2.resize(cv2.imread(str(paths[0])), (SIZE, SIZE))
    cv2.imwrite(str(folder / "square.png"), square)
    cv2.imwrite(str(folder / "mirror.png"), square[:, ::-1])
    return paths


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_marks(b)) for b in sorted(BACKENDS)])
def test_backend_meets_the_detector_contract(backend: str, images: list[Path], tmp_path: Path) -> None:
    cls = get_backend(backend)
    model = cls.models()[0]  # the first (smallest) architecture it lists

    # a random checkpoint records its backend; loading it needs the file only
    ckpt = cls.save_random(model, tmp_path / "detector.pt", img_size=SIZE, seed=0)
    assert read_header(ckpt).get(BACKEND_KEY) == backend and checkpoint_backend(ckpt) == backend
    detector = load_detector(ckpt)
    assert type(detector) is cls and detector.backend == backend and detector.model == model

    # the network: (B, 3, S, S) -> (B, 5, anchors)
    raw = detector.forward_fn("cpu")(np.zeros((2, 3, SIZE, SIZE), np.float32))
    assert tuple(raw.shape) == (2, 5, 84)

    # prediction: the table, at most max_det boxes per pass, best first, inside each image
    names = ["a.jpg", "b.jpg", "c.jpg"]
    kw = {"img_size": SIZE, "conf": 0.0, "iou": 0.6, "max_det": 7, "device": "cpu"}
    boxes = detector.predict(images, tta_flip=True, names=names, **kw)
    assert tuple(boxes.columns) == PREDICT_COLUMNS
    per_pass = boxes.groupby(["NAME", "tta"], sort=False)
    assert set(per_pass.groups) == {(n, t) for n in names for t in ("none", "hflip")} and per_pass.size().max() <= 7
    assert all((g["score"].diff().dropna() <= 0).all() for _, g in per_pass)
    xyxy = boxes[["x1", "y1", "x2", "y2"]].to_numpy()
    assert (xyxy >= 0).all() and (xyxy <= IMAGE_SIDE).all() and (xyxy[:, 2:] >= xyxy[:, :2]).all()

    # the mirrored pass is the plain pass of the mirrored image, mapped back
    folder = images[0].parent
    both = detector.predict([folder / "square.png"], tta_flip=True, **kw)
    flipped = both[both["tta"] == "hflip"].reset_index(drop=True)
    mirror = detector.predict([folder / "mirror.png"], **kw).reset_index(drop=True)
    assert len(flipped) == len(mirror) > 0
    unmirrored = np.stack([SIZE - mirror["x2"], mirror["y1"], SIZE - mirror["x1"], mirror["y2"]], axis=1)
    np.testing.assert_allclose(flipped[["x1", "y1", "x2", "y2"]].to_numpy(), unmirrored, atol=1e-3)
    np.testing.assert_allclose(flipped["score"], mirror["score"], atol=1e-6)

    # ONNX export records the backend; ONNX Runtime gives torch's raw output and, with every candidate kept (random
    # weights score many boxes alike: NMS among near-ties could keep different ones on a 1e-9 difference), its boxes
    from cytologia.detection.export import OnnxDetector

    graph = detector.export_onnx(tmp_path / "detector.onnx", img_size=SIZE)
    assert OnnxDetector(graph).backend == backend
    report = detector.verify_onnx(graph, images, SIZE, conf=0.0, iou=1.0, max_det=1000)
    assert report.passed, report.summary()
    assert report.n_boxes_torch == report.n_boxes_onnx == 3 * 84 and report.images_with_count_mismatch == 0

    # the command line: the backend read from the checkpoint, the parity check at its tolerances, exit 0
    out = tmp_path / "report.json"
    code = main(
        [
            "export",
            "detector",
            "--weights",
            str(ckpt),
            "--out",
            str(tmp_path / "cli.onnx"),
            "--img-size",
            str(SIZE),
            "--images",
            str(folder),
            "--n-verify",
            "3",
            "--report",
            str(out),
        ]
    )
    assert code == 0
    parity = json.loads(out.read_text())["parity"]
    assert parity["passed"] is True and parity["n_images"] == 3
    assert OnnxDetector(tmp_path / "cli.onnx").backend == backend
