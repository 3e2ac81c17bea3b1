"""The ultralytics backend: dataset layout (symlinks, labels), letterbox and box mapping, prediction with flip TTA."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("ultralytics", reason="needs the ultralytics extra: pip install 'cytologia[ultralytics]'")

from cytologia.detection import DetectionData, load_detector  # noqa: E402
from cytologia.detection.letterbox import letterbox, to_input  # noqa: E402
from cytologia.detection.ultralytics_backend import (  # noqa: E402
    UltralyticsDetector,
    offline_amp_check,
    write_yolo_dataset,
)
from cytologia.errors import CytologiaInputError  # noqa: E402


def _image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> DetectionData:
    images = tmp_path / "images"
    for i, (w, h) in enumerate([(100, 80), (60, 60), (50, 40), (70, 70)]):
        _image(images / f"im{i}.jpg", w, h, seed=i)
    table = pd.DataFrame(
        {
            "NAME": ["im0.jpg", "im0.jpg", "im1.jpg", "im2.jpg"],
            "x1": [10.0, -5.0, 0.0, 5.0],
            "y1": [20.0, 10.0, 0.0, 5.0],
            "x2": [30.0, 20.0, 60.0, 25.0],
            "y2": [60.0, 90.0, 30.0, 35.0],
        }
    )
    folds = pd.DataFrame({"NAME": ["im0.jpg", "im1.jpg", "im2.jpg", "im3.jpg"], "fold": [0, 0, 1, 1]})
    return DetectionData(table=table, folds=folds, image_dir=images, fold=1, cache_dir=tmp_path / "cache")


def test_dataset_links_images_and_writes_clipped_labels(tiny: DetectionData) -> None:
    data_yaml, counts = write_yolo_dataset(tiny)
    root = data_yaml.parent
    assert counts == {
        "train_images": 2,
        "val_images": 2,
        "train_boxes": 3,
        "val_boxes": 1,
        "negatives": 1,
        "skipped_empty": 0,
    }
    link = root / "images" / "train" / "im0.jpg"
    assert link.is_symlink() and Path(os.readlink(link)) == (tiny.image_dir / "im0.jpg").resolve()
    lines = (root / "labels" / "train" / "im0.txt").read_text().split("\n")
    # second box (-5, 10, 20, 90) in a 100 x 80 image clips to (0, 10, 20, 80): centre (0.1, 0.5625), size (0.2, 0.875)
    assert lines[1] == "0 0.100000 0.562500 0.200000 0.875000"
    assert lines[0] == "0 0.200000 0.500000 0.200000 0.500000"
    assert (root / "labels" / "val" / "im3.txt").read_text() == ""  # a negative: empty label file
    assert (root / "images" / "val" / "im2.jpg").is_symlink()
    # same content -> the same folder, reused as it is
    stamp = (root / "complete.txt").stat().st_mtime_ns
    again, _ = write_yolo_dataset(tiny)
    assert again == data_yaml and (root / "complete.txt").stat().st_mtime_ns == stamp


def test_dataset_errors_name_the_images(tiny: DetectionData) -> None:
    orphan = DetectionData(tiny.table, tiny.folds.iloc[1:], tiny.image_dir, 1, tiny.cache_dir)
    with pytest.raises(CytologiaInputError, match="im0.jpg"):
        write_yolo_dataset(orphan)
    bad_name = tiny.folds.assign(NAME=tiny.folds["NAME"].replace({"im3.jpg": "im3.txt"}))
    with pytest.raises(CytologiaInputError, match="im3.txt"):
        write_yolo_dataset(DetectionData(tiny.table, bad_name, tiny.image_dir, 1, tiny.cache_dir))
    (tiny.image_dir / "im3.jpg").unlink()
    with pytest.raises(CytologiaInputError, match="im3.jpg"):
        write_yolo_dataset(tiny)
    with pytest.raises(CytologiaInputError, match="fold 5"):
        write_yolo_dataset(DetectionData(tiny.table, tiny.folds, tiny.image_dir, 5, tiny.cache_dir))


def test_letterbox_and_box_mapping_round_trip() -> None:
    image = np.zeros((100, 200, 3), np.uint8)  # h=100, w=200 -> 128 x 64 inside a 128 square, 32 px above
    square, frame = letterbox(image, 128)
    assert square.shape == (128, 128, 3) and (frame.pad_x, frame.pad_y) == (0, 32)
    assert (square[:32] == 114).all() and (square[32:96] == 0).all()
    # the image box (20, 10, 60, 50) is (12.8, 38.4, 38.4, 64.0) in the square: centre (25.6, 51.2), size 25.6
    raw = torch.zeros(1, 5, 2)
    raw[0, :, 0] = torch.tensor([25.6, 51.2, 25.6, 25.6, 0.9])
    (plain,) = UltralyticsDetector.boxes_from_output(raw, [frame], 128, conf=0.5, iou=0.5, max_det=10)
    np.testing.assert_allclose(plain, [[20, 10, 60, 50, 0.9]], atol=1e-4)
    raw_mirrored = raw.clone()
    raw_mirrored[0, 0, 0] = 128 - 25.6  # what the network sees on the mirrored input
    (back,) = UltralyticsDetector.boxes_from_output(
        raw_mirrored, [frame], 128, conf=0.5, iou=0.5, max_det=10, flipped=True
    )
    np.testing.assert_allclose(back, plain, atol=1e-4)


def test_to_input_is_rgb_chw_unit_range() -> None:
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 0] = 255  # blue
    bgr[:, 0, 2] = 255  # red in the first column
    x = to_input([bgr])
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32
    assert x[0, 2].max() == 1.0 and x[0, 0, :, 0].tolist() == [1.0] * 4  # channel 0 = red, first column
    assert to_input([bgr], flip=True)[0, 0, :, 3].tolist() == [1.0] * 4  # mirrored: red in the last column


def test_amp_check_is_off_on_cpu_without_download() -> None:
    assert offline_amp_check(torch.nn.Conv2d(3, 4, 3)) is False


def test_predict_flip_pass_equals_plain_pass_on_the_mirrored_image(smoke_run, tmp_path: Path) -> None:
    detector = load_detector(smoke_run.checkpoint)
    assert detector.model == "yolo11n"
    source = sorted((smoke_run.data_dir / "images").glob("*.jpg"))[0]
    # a square at the input size: no resize, no padding, so the mirrored file gives exactly the mirrored input
    image = cv2.resize(cv2.imread(str(source)), (128, 128))
    cv2.imwrite(str(tmp_path / "a.png"), image)
    cv2.imwrite(str(tmp_path / "mirror.png"), image[:, ::-1])
    kw = {"img_size": 128, "conf": 0.0, "iou": 0.6, "max_det": 20, "device": "cpu"}
    both = detector.predict([tmp_path / "a.png"], tta_flip=True, **kw)
    assert set(both["tta"]) == {"none", "hflip"} and (both["NAME"] == "a.png").all()
    assert ((both[["x1", "x2"]] >= 0) & (both[["x1", "x2"]] <= 128)).all().all()
    flipped = both[both["tta"] == "hflip"].sort_values("score", ascending=False).reset_index(drop=True)
    mirror = detector.predict([tmp_path / "mirror.png"], **kw).sort_values("score", ascending=False)
    mirror = mirror.reset_index(drop=True)
    mapped = np.stack([128 - mirror["x2"], mirror["y1"], 128 - mirror["x1"], mirror["y2"]], axis=1)
    np.testing.assert_allclose(flipped[["x1", "y1", "x2", "y2"]].to_numpy(), mapped, atol=1e-3)
    np.testing.assert_allclose(flipped["score"], mirror["score"], atol=1e-6)


def test_predict_names_and_batches_agree(smoke_run) -> None:
    detector = load_detector(smoke_run.checkpoint)
    paths = sorted((smoke_run.data_dir / "images").glob("*.jpg"))[:3]
    kw = {"img_size": 128, "conf": 0.001, "device": "cpu"}
    one = detector.predict(paths, batch_size=1, **kw)
    three = detector.predict(paths, batch_size=3, names=["x", "y", "z"], **kw)
    assert set(one["NAME"]) == {p.name for p in paths} and set(three["NAME"]) == {"x", "y", "z"}
    # an undertrained model has many near-tied boxes whose NMS fate may flip on 1e-6: compare each image's best
    top_one = one.groupby("NAME")["score"].max().to_numpy()
    top_three = three.groupby("NAME")["score"].max().to_numpy()
    np.testing.assert_allclose(top_one, top_three, atol=1e-5)


def test_training_leaves_torch_thread_count_as_it_was(smoke_run) -> None:
    set_before, found_after = smoke_run.threads
    assert found_after == set_before  # ultralytics' select_device would leave it at cpu_count - 1


def test_training_can_start_from_registered_local_weights(smoke_run, tmp_path: Path) -> None:
    from ultralytics.nn.tasks import load_checkpoint

    from cytologia.detection import create_detector
    from cytologia.weights import add_to_manifest

    models = tmp_path / "models"
    models.mkdir()
    init = models / "init.pt"
    init.write_bytes(smoke_run.checkpoint.read_bytes())
    add_to_manifest(init, source="test", directory=models)
    yolo = create_detector("ultralytics", "yolo11n", weights=init)._new_model()
    source, _ = load_checkpoint(str(init))
    for key in ("model.0.conv.weight", "model.10.m.0.attn.qkv.conv.weight"):
        np.testing.assert_allclose(yolo.model.state_dict()[key].float(), source.state_dict()[key].float())
    init.write_bytes(init.read_bytes() + b"x")  # altered after registration
    with pytest.raises(CytologiaInputError, match="size|sha256"):
        create_detector("ultralytics", "yolo11n", weights=init)._new_model()


def test_best_of_run_takes_the_last_epoch_reaching_the_maximum(tmp_path: Path) -> None:
    from cytologia.detection.ultralytics_backend import KC_METRIC, best_of_run

    with pytest.raises(CytologiaInputError, match="without a checkpoint"):
        best_of_run(tmp_path, KC_METRIC)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "best.pt").write_bytes(b"x")
    # ultralytics pads its column names with spaces; best.pt is rewritten at every epoch equal to the best so far
    pd.DataFrame({"   epoch": [1, 2, 3, 4], f"  {KC_METRIC}": [0.5, 0.8, np.nan, 0.8]}).to_csv(
        tmp_path / "results.csv", index=False
    )
    run = best_of_run(tmp_path, KC_METRIC)
    assert (run.index, run.epoch, run.score) == (3, 4, 0.8) and len(run.history) == 4
    assert run.checkpoint == tmp_path / "weights" / "best.pt"
    none = best_of_run(tmp_path, "metrics/not_logged")  # no finite score: the last epoch, score nan
    assert (none.index, none.epoch) == (3, 4) and np.isnan(none.score)
    (tmp_path / "results.csv").unlink()
    assert best_of_run(tmp_path, KC_METRIC).epoch == 0
