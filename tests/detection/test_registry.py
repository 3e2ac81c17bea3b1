"""The detector registry: names, misses that say what exists, checkpoints and the backend they record."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from cytologia.detection import (
    Detector,
    checkpoint_backend,
    create_detector,
    get_backend,
    list_detectors,
    load_detector,
)
from cytologia.detection.base import BACKEND_KEY, read_header
from cytologia.detection.registry import BACKENDS, agreed_backend, backend_of_model
from cytologia.errors import CytologiaInputError


@pytest.mark.ultralytics
def test_listed_detectors_include_the_v8_and_11_families() -> None:
    names = list_detectors()
    assert {"ultralytics/yolov8n", "ultralytics/yolo11n", "ultralytics/yolo11s", "ultralytics/yolo11x"} <= set(names)
    assert list_detectors("ultralytics") == [n for n in names if n.startswith("ultralytics/")]


@pytest.mark.ultralytics
def test_create_builds_an_untrained_detector() -> None:
    det = create_detector("ultralytics", "yolo11s")
    assert isinstance(det, Detector) and det.backend == "ultralytics" and det.model == "yolo11s"
    assert det.checkpoint is None
    with pytest.raises(CytologiaInputError, match="no trained checkpoint"):
        det.predict([], img_size=128)


def test_unknown_backend_names_the_backends() -> None:
    with pytest.raises(CytologiaInputError, match=r"closest: ultralytics.*available: ultralytics"):
        create_detector("ultralitics", "yolo11n")


@pytest.mark.ultralytics
def test_unknown_model_names_the_models() -> None:
    with pytest.raises(CytologiaInputError, match=r"'yolo11q'.*closest: yolo11.*available: .*yolov8n.*yolo11n") as err:
        create_detector("ultralytics", "yolo11q")
    assert "yolo12x" in str(err.value)


@pytest.mark.ultralytics
def test_missing_checkpoint_is_named(tmp_path) -> None:
    with pytest.raises(CytologiaInputError, match="nothing.pt"):
        load_detector(tmp_path / "nothing.pt")
    with pytest.raises(CytologiaInputError, match="nothing.pt"):
        create_detector("ultralytics", "yolo11n", checkpoint=tmp_path / "nothing.pt")


@pytest.mark.ultralytics
def test_init_weights_must_be_in_the_manifest(tmp_path) -> None:
    weights = tmp_path / "yolo11n.pt"
    weights.write_bytes(b"not registered")
    det = create_detector("ultralytics", "yolo11n", weights=weights)
    with pytest.raises(CytologiaInputError, match="not listed in"):
        det._new_model()


def test_registering_a_backend() -> None:
    from cytologia.detection.registry import BACKENDS, register_backend

    @register_backend("dummy")
    class Dummy(Detector):
        @classmethod
        def models(cls) -> list[str]:
            return ["tiny"]

        @classmethod
        def checkpoint_model(cls, checkpoint):
            return "tiny"

        @classmethod
        def save_random(cls, model, path, *, img_size, seed=0):
            raise NotImplementedError

        def train(self, data, out_dir, settings):
            raise NotImplementedError

        def load_network(self, device):
            raise NotImplementedError

        @classmethod
        def decode(cls, raw, *, conf, iou, max_det):
            raise NotImplementedError

        def write_onnx(self, path, *, img_size, opset):
            raise NotImplementedError

    try:
        assert get_backend("dummy") is Dummy and "dummy/tiny" in list_detectors()
        assert create_detector("dummy", "tiny").backend == "dummy"
    finally:
        del BACKENDS["dummy"]


def _yolox_checkpoint(path: Path, **extra: object) -> Path:
    """A (tiny) file in the layout of a YOLOX checkpoint; ``extra`` entries added or, when None, removed."""
    from cytologia.detection.yolox.checkpoint import FORMAT, VERSION

    payload = {"format": FORMAT, "version": VERSION, BACKEND_KEY: "yolox", "model": "yolox_nano", "state_dict": {}}
    payload.update(extra)
    torch.save({k: v for k, v in payload.items() if v is not None}, path)
    return path


def test_checkpoint_records_its_backend_and_loading_needs_no_name(tmp_path: Path) -> None:
    ckpt = get_backend("yolox").save_random("yolox_nano", tmp_path / "detector.pt", img_size=64)
    assert read_header(ckpt).get(BACKEND_KEY) == "yolox" and checkpoint_backend(ckpt) == "yolox"
    detector = load_detector(ckpt)
    assert detector.backend == "yolox" and detector.model == "yolox_nano"
    # a checkpoint written before checkpoints recorded their backend: recognised by its format
    old = _yolox_checkpoint(tmp_path / "old.pt", **{BACKEND_KEY: None})
    assert read_header(old).get(BACKEND_KEY) is None and checkpoint_backend(old) == "yolox"


def test_reading_the_backend_runs_no_code_from_the_file(tmp_path: Path) -> None:
    """The header is read with stand-ins for every class and function: an object whose unpickling runs code stays
    inert (and the trap is live: torch's full unpickling springs it)."""
    ran = tmp_path / "ran"

    class Trap:
        def __reduce__(self):
            return (exec, (f"open({str(ran)!r}, 'w').close()",))

    path = _yolox_checkpoint(tmp_path / "trap.pt", trap=Trap())
    header = read_header(path)
    assert not ran.exists() and any(g.endswith(".exec") for g in header.globals)
    assert checkpoint_backend(path) == "yolox" and not ran.exists()
    torch.load(path, weights_only=False)
    assert ran.exists()


def test_a_checkpoint_of_no_known_backend_is_named(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CytologiaInputError, match=r"other.pt: does not record its detector backend.*yolox"):
        load_detector(other)
    unknown = _yolox_checkpoint(tmp_path / "unknown.pt", **{BACKEND_KEY: "yolov"})
    with pytest.raises(CytologiaInputError, match=r"unknown.pt: written by detector backend 'yolov'.*closest: yolox"):
        checkpoint_backend(unknown)
    not_zip = tmp_path / "text.pt"
    not_zip.write_text("not a checkpoint")
    with pytest.raises(CytologiaInputError, match="text.pt: not a detector checkpoint"):
        checkpoint_backend(not_zip)
    no_pickle = tmp_path / "nopickle.pt"
    with zipfile.ZipFile(no_pickle, "w") as archive:
        archive.writestr("archive/version", "3")
    with pytest.raises(CytologiaInputError, match="nopickle.pt: not a detector checkpoint"):
        checkpoint_backend(no_pickle)
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(damaged, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00(X")
    with pytest.raises(CytologiaInputError, match="damaged.pt: not a readable detector checkpoint"):
        checkpoint_backend(damaged)


@pytest.mark.ultralytics
def test_ultralytics_checkpoints_record_or_are_recognised(smoke_run, tmp_path: Path) -> None:
    """The trained detector.pt records its backend; ultralytics' own file (best.pt) is recognised by its classes."""
    assert read_header(smoke_run.checkpoint).get(BACKEND_KEY) == "ultralytics"
    best = smoke_run.run_dir / "fold_0" / "ultralytics" / "weights" / "best.pt"
    assert read_header(best).get(BACKEND_KEY) is None and checkpoint_backend(best) == "ultralytics"
    assert load_detector(best).model == load_detector(smoke_run.checkpoint).model == "yolo11n"


@pytest.mark.ultralytics
def test_backend_of_model_and_agreed_backend(caplog) -> None:
    assert backend_of_model("yolox_nano") == "yolox" and backend_of_model("yolo11n") == "ultralytics"
    with pytest.raises(CytologiaInputError, match=r"no detector backend builds 'yolox_nan'.*closest: yolox_nano"):
        backend_of_model("yolox_nan")
    assert agreed_backend("yolox", {}) is get_backend("yolox")  # no file records one: the name given
    assert agreed_backend("yolox", {"a.onnx": None, "b.pt": "yolox"}) is get_backend("yolox")
    with caplog.at_level("WARNING"):  # the files' record wins over a name that disagrees
        assert agreed_backend("ultralytics", {"a.pt": "yolox"}) is get_backend("yolox")
    assert "a.pt record(s) 'yolox'" in caplog.text
    with pytest.raises(CytologiaInputError, match=r"different backends.*a.pt: yolox, b.pt: ultralytics"):
        agreed_backend("yolox", {"a.pt": "yolox", "b.pt": "ultralytics"})
    with pytest.raises(CytologiaInputError, match=r"unknown detector backend 'nope'.*available: ultralytics, yolox"):
        agreed_backend("nope", {"a.pt": "yolox"})
    assert sorted(BACKENDS) == ["ultralytics", "yolox"]


def test_detection_data_image_sizes_from_table_headers_and_repaired_copies(tmp_path: Path) -> None:
    import cv2
    import numpy as np
    import pandas as pd

    from cytologia.detection.registry import DetectionData

    images, repaired = tmp_path / "images", tmp_path / "repaired"
    images.mkdir()
    repaired.mkdir()
    cv2.imwrite(str(images / "b.jpg"), np.zeros((30, 40, 3), np.uint8))
    (images / "c.jpg").write_bytes(b"not a jpeg")  # unreadable; its repaired copy is what training reads
    cv2.imwrite(str(repaired / "c.jpg"), np.zeros((50, 60, 3), np.uint8))
    table = pd.DataFrame({"NAME": ["a.jpg", "b.jpg"], "img_w": [100, 0], "img_h": [80, 0]})  # 0: unknown
    data = DetectionData(table, pd.DataFrame(columns=["NAME", "fold"]), images, 0, tmp_path, repaired_dir=repaired)
    sizes = data.image_sizes(["c.jpg", "a.jpg", "b.jpg"])
    assert list(sizes.index) == ["c.jpg", "a.jpg", "b.jpg"]
    assert sizes.to_numpy().tolist() == [[60, 50], [100, 80], [40, 30]]
    (images / "d.jpg").write_bytes(b"")
    with pytest.raises(CytologiaInputError, match=r"1 image\(s\) cannot be read: d.jpg"):
        data.image_sizes(["a.jpg", "d.jpg"])
