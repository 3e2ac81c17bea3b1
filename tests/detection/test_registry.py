"""The detector registry: names, misses that say what exists, checkpoints."""

from __future__ import annotations

import pytest

from cytologia.data.errors import CytologiaInputError
from cytologia.detection import Detector, create_detector, get_backend, list_detectors, load_detector


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

        def train(self, data, out_dir, settings):
            raise NotImplementedError

        def forward_fn(self, device="auto"):
            raise NotImplementedError

        def predict(self, images, **kwargs):
            raise NotImplementedError

        def export_onnx(self, path, **kwargs):
            raise NotImplementedError

    try:
        assert get_backend("dummy") is Dummy and "dummy/tiny" in list_detectors()
        assert create_detector("dummy", "tiny").backend == "dummy"
    finally:
        del BACKENDS["dummy"]
