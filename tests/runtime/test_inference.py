"""The pipeline end to end (`cytologia predict`) on a tiny generated set with random-weight models, both runtimes,
and its known-count / open-world rules against the detection stage's table functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.cli import main
from cytologia.data.images import decode
from cytologia.data.io import read_submission, read_test
from cytologia.detection.fusion import known_count, open_world
from cytologia.ensemble import MemberSpec, write_ensemble
from cytologia.errors import CytologiaInputError
from cytologia.runtime.bench import save_random_classifier
from cytologia.runtime.inference import (
    PROB_COLUMNS,
    Pipeline,
    known_count_boxes,
    open_world_boxes,
    submission_table,
)


def _images(tiny) -> tuple[pd.DataFrame, list[Path], pd.Series]:
    test = read_test(tiny.data / "test.csv")
    names = list(pd.unique(test["NAME"]))
    return test, [tiny.data / "images" / n for n in names], test.groupby("NAME").size()


@pytest.mark.ultralytics
def test_predict_writes_a_valid_submission_that_scores(tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "submission.csv"
    code = main(
        [
            "predict",
            "--data",
            str(tiny.data),
            "--ensemble",
            str(tiny.ensemble_path),
            "--out",
            str(out),
            "--batch",
            "4",
            "--report",
            str(tmp_path / "report.json"),
        ]
    )
    assert code == 0
    test = read_test(tiny.data / "test.csv")
    sizes = {p.name: (192, 192) for p in (tiny.data / "images").iterdir()}
    sub = read_submission(out, test=test, image_sizes=sizes)  # every id once, valid class, box inside its image
    assert len(sub) == len(test) and set(sub["trustii_id"]) == set(test["trustii_id"])
    capsys.readouterr()
    assert main(["score", "--truth", str(tiny.data / "test_labels.csv"), "--pred", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_images_without_prediction"] == 0 and 0.0 <= result["score"] <= 1.0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runtime"] == "onnx" and len(report["members"]) == 2
    assert all(m["providers"][-1] == "CPUExecutionProvider" for m in report["members"][0]["models"])


@pytest.mark.ultralytics
def test_onnx_and_torch_runtimes_agree(tiny) -> None:
    test, paths, counts = _images(tiny)
    ens = tiny.ensemble()
    onnx = Pipeline(ens, runtime="onnx", device="cpu", threads=1, batch_size=5)
    torch_ = Pipeline(ens, runtime="torch", device="cpu", threads=1, batch_size=5)
    a = onnx.predict(paths[:6], counts=counts)
    b = torch_.predict(paths[:6], counts=counts)
    # known-count: as many boxes per image as test.csv lists, on both runtimes
    for r in (a, b):
        per_image = r.boxes.groupby("NAME").size()
        assert (per_image == counts.reindex(per_image.index)).all()
        np.testing.assert_allclose(r.boxes[list(PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)
    # the classifiers agree on the same crops: the networks are the only difference
    images = {p.name: decode(p) for p in paths[:6]}
    arrays, names = list(images.values()), list(images)
    image = a.boxes["NAME"].map({n: i for i, n in enumerate(names)}).to_numpy()
    xyxy = a.boxes[["x1", "y1", "x2", "y2"]].to_numpy()
    for m_onnx, m_torch in zip(onnx.members, torch_.members):
        x = onnx._crop_group(arrays, image, xyxy, m_onnx.spec.img_size, m_onnx.spec.margin)
        za, zb = onnx._classify_member(m_onnx, x), torch_._classify_member(m_torch, x)
        assert np.abs(za - zb).max() < 1e-4
    # and so do the detectors, box for box, where the scores leave no near-tie to flip
    for da, db in zip(onnx._raw_boxes(arrays, names), torch_._raw_boxes(arrays, names)):
        assert abs(len(da) - len(db)) <= 2
        assert np.abs(np.sort(da[:, 4])[-3:] - np.sort(db[:, 4])[-3:]).max() < 1e-4


@pytest.mark.ultralytics
def test_open_world_writes_per_image_outputs(tiny, tmp_path: Path) -> None:
    out = tmp_path / "sub.csv"
    code = main(
        [
            "predict",
            "--data",
            str(tiny.data),
            "--ensemble",
            str(tiny.ensemble_path),
            "--out",
            str(out),
            "--mode",
            "open-world",
            "--runtime",
            "torch",
            "--no-tta-flip",
        ]
    )
    assert code == 0 and out.is_file()  # with test.csv, the known-count submission is written too
    boxes = pd.read_csv(tmp_path / "sub_boxes.csv")
    payload = json.loads((tmp_path / "sub_boxes.json").read_text())
    names = set(pd.unique(read_test(tiny.data / "test.csv")["NAME"]))
    assert {im["NAME"] for im in payload["images"]} == names  # images without a box are listed too
    assert len(boxes) == sum(len(im["boxes"]) for im in payload["images"]) > 0
    assert (boxes["score"] >= 0.005).all() and set(boxes["class"]) <= set(payload["classes"])
    first = next(im for im in payload["images"] if im["boxes"])["boxes"][0]
    assert abs(sum(first["probabilities"].values()) - 1.0) < 1e-4 and first["class"] in first["probabilities"]

    # without test.csv: open-world only, every image of the folder
    images_only = tmp_path / "folder"
    images_only.mkdir()
    for p in sorted((tiny.data / "images").iterdir())[:3]:
        (images_only / p.name).write_bytes(p.read_bytes())
    target = tmp_path / "ow" / "pred"
    assert (
        main(
            [
                "predict",
                "--data",
                str(images_only),
                "--ensemble",
                str(tiny.ensemble_path),
                "--mode",
                "open-world",
                "--boxes-out",
                str(target),
            ]
        )
        == 0
    )
    assert len(json.loads(target.with_suffix(".json").read_text())["images"]) == 3


@pytest.mark.ultralytics
def test_multilabel_member_changes_single_cell_images_only(tiny, tmp_path: Path) -> None:
    ens = tiny.ensemble()
    ckpt = tmp_path / "ml.ckpt"
    save_random_classifier("resnet10t", 64, ckpt, None, seed=7)
    ens.members.append(MemberSpec("ml", kind="multilabel", img_size=64, checkpoints=[str(ckpt)], weight=0.0))
    ens.blend.multilabel_weight = 0.5
    path = write_ensemble(ens, tmp_path / "ml.json")
    from cytologia.ensemble import read_ensemble

    _, paths, counts = _images(tiny)
    multi = [p for p in paths if counts[p.name] > 1]
    paths = multi[:3] + [p for p in paths if counts[p.name] == 1][:5]
    with_ml = Pipeline(read_ensemble(path), runtime="torch", device="cpu").predict(paths, counts=counts)
    without = Pipeline(tiny.ensemble(), runtime="torch", device="cpu").predict(paths, counts=counts)
    assert with_ml.info["multilabel"] == "ml"
    single = with_ml.boxes["NAME"].map(counts).to_numpy() == 1
    diff = np.abs(with_ml.boxes[list(PROB_COLUMNS)].to_numpy() - without.boxes[list(PROB_COLUMNS)].to_numpy()).max(1)
    assert single.any() and (~single).any()
    assert (diff[single] > 1e-6).all() and (diff[~single] < 1e-9).all()


def test_known_count_and_open_world_rules_match_the_detection_tables() -> None:
    rng = np.random.default_rng(0)
    rows = []
    sizes = {}
    for i in range(40):
        name = f"im{i}.jpg"
        w, h = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        sizes[name] = (w, h)
        for _ in range(int(rng.integers(0, 6))):
            x1, y1 = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            score = float(rng.choice([0.3, 0.5, rng.uniform()]))  # repeated scores: ties keep the table order
            rows.append((name, x1, y1, x1 + rng.uniform(10, 40), y1 + rng.uniform(10, 40), score))
    table = pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "score"])
    table["model"] = "m"
    counts = pd.Series({n: int(rng.integers(1, 5)) for n in sizes})
    ref_kc = known_count(table, counts, sizes)
    ref_ow = open_world(table, score_thr=0.4, nms_iou=0.3)
    for name in sizes:
        d = table.loc[table["NAME"] == name, ["x1", "y1", "x2", "y2", "score"]].to_numpy()
        boxes, scores, sources = known_count_boxes(d, int(counts[name]), *sizes[name])
        ref = ref_kc[ref_kc["NAME"] == name]
        np.testing.assert_allclose(boxes, ref[["x1", "y1", "x2", "y2"]].to_numpy())
        np.testing.assert_allclose(scores, ref["score"].to_numpy())
        assert [s for s in sources if s.startswith("pad:")] == [m for m in ref["model"] if m.startswith("pad:")]
        kept = d[open_world_boxes(d, 0.4, 0.3)]
        np.testing.assert_allclose(kept[:, :4], ref_ow.loc[ref_ow["NAME"] == name, ["x1", "y1", "x2", "y2"]].to_numpy())


def test_submission_table_gives_each_id_one_box() -> None:
    test = pd.DataFrame({"trustii_id": [7, 3, 5], "NAME": ["a", "b", "a"]})
    boxes = pd.DataFrame(
        {
            "NAME": ["a", "a", "b"],
            "x1": [0.0, 5, 1],
            "y1": [0.0, 5, 1],
            "x2": [9.0, 20, 8],
            "y2": [9.0, 20, 8],
            "score": [0.2, 0.9, 0.5],
            "class": ["B", "EO", "LY"],
            "known_count": True,
        }
    )
    sub = submission_table(boxes, test)
    assert sub["trustii_id"].tolist() == [3, 5, 7]
    assert sub.set_index("trustii_id").loc[5, "class"] == "EO"  # the lowest id of an image takes its best box
    with pytest.raises(CytologiaInputError, match="not as many boxes"):
        submission_table(boxes.iloc[:2], test)


@pytest.mark.ultralytics
def test_predict_errors(tiny, tmp_path: Path) -> None:
    no_test = tmp_path / "no_test"
    (no_test / "images").mkdir(parents=True)
    p = next((tiny.data / "images").iterdir())
    (no_test / "images" / p.name).write_bytes(p.read_bytes())
    args = ["predict", "--data", str(no_test), "--ensemble", str(tiny.ensemble_path), "--out", str(tmp_path / "s.csv")]
    assert main(args) == 2  # known-count needs test.csv
    ens = tiny.ensemble()
    ens.detector = None
    assert (
        main(
            [
                *args[:2],
                str(tiny.data),
                "--ensemble",
                str(write_ensemble(ens, tmp_path / "nodet.json")),
                "--out",
                str(tmp_path / "s.csv"),
            ]
        )
        == 2
    )
    ens = tiny.ensemble()
    ens.members[0].checkpoints = []
    with pytest.raises(CytologiaInputError, match="torch runtime needs checkpoints"):
        Pipeline(ens, runtime="torch")
    ens = tiny.ensemble()
    ens.members[0].img_size = 40  # the graph was exported at 32 px
    with pytest.raises(CytologiaInputError, match="takes 32 px"):
        Pipeline(ens, runtime="onnx")
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.ultralytics
def test_yolox_detector_backend(tiny, tmp_path: Path) -> None:
    """A YOLOX detector runs through its own pre/post-processing, on both runtimes."""
    from cytologia.ensemble import read_ensemble
    from cytologia.runtime.bench import save_random_detector

    ckpt, graph = tmp_path / "yolox.pt", tmp_path / "yolox.onnx"
    assert save_random_detector("yolox_nano", ckpt, graph, 128) == "yolox"
    ens = tiny.ensemble()
    assert ens.detector is not None
    ens.detector.backend, ens.detector.arch = "yolox", "yolox_nano"
    ens.detector.checkpoints, ens.detector.onnx = [str(ckpt)], [str(graph)]
    path = write_ensemble(ens, tmp_path / "yolox.json")
    _, paths, counts = _images(tiny)
    results = {}
    for runtime in ("onnx", "torch"):
        pipe = Pipeline(read_ensemble(path), runtime=runtime, device="cpu")
        assert pipe.detector_cls.backend == "yolox"
        results[runtime] = result = pipe.predict(paths[:4], counts=counts)
        per_image = result.boxes.groupby("NAME").size()
        assert len(per_image) == 4 and (per_image == counts.reindex(per_image.index)).all()
    # the backend the files record wins over an ensemble file naming another one (e.g. a default)
    ens.detector.backend = "ultralytics"
    for runtime in ("onnx", "torch"):
        pipe = Pipeline(ens, runtime=runtime, device="cpu")
        assert pipe.detector_cls.backend == "yolox"
        boxes = pipe.predict(paths[:4], counts=counts).boxes
        pd.testing.assert_frame_equal(boxes, results[runtime].boxes)
    ens.detector.backend = "nope"
    with pytest.raises(CytologiaInputError, match=r"unknown detector backend 'nope'.*available: ultralytics, yolox"):
        Pipeline(ens)
