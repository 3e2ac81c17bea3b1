"""Prediction survives bad images: a test set holding one image of each kind the real data (or a user's folder) can
throw at ``cytologia predict``. Each is either decoded the way training decodes it (stored pixel array, BGR, 8 bit)
or predicted with the fallback rule (prior class, padded boxes), counted and listed; ``--strict`` stops instead, with
an error naming the file. No trustii_id is ever lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytologia.cli import main
from cytologia.data.images import decode
from cytologia.data.io import read_submission, read_test
from cytologia.detection.fusion import pad_candidates
from cytologia.errors import CytologiaInputError
from cytologia.predict import JPEG_SUFFIX, PROBLEMS_SUFFIX, predict_folder, prior_class
from cytologia.runtime.inference import FALLBACK_CLASS, FALLBACK_FRAME, Pipeline

STORED = (192, 128)  # (w, h) of the stored pixel array of the small cases (non-square: a rotation would show)
BIG = (4000, 3000)
# name -> cells (trustii_ids) of each case; the fallback ones with their expected status and frame
READ = ("ok.jpg", "gray.jpg", "cmyk.jpg", "png16.jpg", "png_named.jpg", "exif_rot90.jpg", "big.jpg", "truncated.jpg")
FALLBACK = {
    "header_only.jpg": ("unreadable", STORED),  # SOF readable, no scan: the header gives the frame
    "garbage.jpg": ("unreadable", FALLBACK_FRAME),
    "empty.jpg": ("unreadable", FALLBACK_FRAME),
    "missing.jpg": ("missing", FALLBACK_FRAME),
}
CELLS = {"big.jpg": 2, "garbage.jpg": 2, "missing.jpg": 3}


def _pixels() -> np.ndarray:
    """A BGR smear-like picture with a left/right difference (a mirrored or rotated decode is not equal to it)."""
    im = np.empty((STORED[1], STORED[0], 3), np.uint8)
    im[...] = np.linspace(150, 230, STORED[0]).astype(np.uint8)[None, :, None]  # a left-to-right gradient
    im[30:90, 20:80] = (120, 40, 140)  # a purple "cell" on the left
    return im


def build_bad_set(root: Path, source: Path) -> Path:
    """A data folder (test.csv, images/, train.csv copied from ``source``) with one image of each case."""
    images = root / "images"
    images.mkdir(parents=True)
    im = _pixels()
    cv2.imwrite(str(images / "ok.jpg"), im)
    cv2.imwrite(str(images / "gray.jpg"), cv2.cvtColor(im, cv2.COLOR_BGR2GRAY))
    Image.fromarray(im[..., ::-1]).convert("CMYK").save(images / "cmyk.jpg", quality=95)
    ok, png16 = cv2.imencode(".png", im.astype(np.uint16) * 257)  # 16-bit: 257 * v maps back to v exactly
    assert ok
    (images / "png16.jpg").write_bytes(png16.tobytes())  # a 16-bit PNG, and named .jpg
    ok, png = cv2.imencode(".png", im)
    (images / "png_named.jpg").write_bytes(png.tobytes())
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # EXIF Orientation: "rotate 90 CW to display"
    Image.fromarray(im[..., ::-1]).save(images / "exif_rot90.jpg", exif=exif.tobytes(), quality=95)
    big = np.full((BIG[1], BIG[0], 3), (200, 170, 210), np.uint8)
    big[1000:1400, 1500:1900] = (120, 40, 140)
    cv2.imwrite(str(images / "big.jpg"), big)
    data = (images / "ok.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])  # no EOI: the missing rows decode grey
    (images / "header_only.jpg").write_bytes(data[: data.index(b"\xff\xda")])  # up to the scan: header, no pixels
    (images / "garbage.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    (images / "empty.jpg").write_bytes(b"")
    rows, next_id = [], 100
    for name in (*READ, *FALLBACK):
        for _ in range(CELLS.get(name, 1)):
            rows.append((next_id, name))
            next_id += 7
    pd.DataFrame(rows[::-1], columns=["trustii_id", "NAME"]).to_csv(root / "test.csv", index=False)
    shutil.copy(source / "train.csv", root / "train.csv")
    return root


@pytest.fixture(scope="module")
def bad_set(yolox_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bad_set(tmp_path_factory.mktemp("bad") / "data", yolox_tiny.data)


def test_each_readable_case_decodes_to_the_stored_pixel_array(bad_set: Path) -> None:
    images = bad_set / "images"
    im = _pixels().astype(int)
    for name in ("ok.jpg", "gray.jpg", "cmyk.jpg", "png16.jpg", "png_named.jpg", "exif_rot90.jpg", "truncated.jpg"):
        out = decode(images / name)
        assert out.shape == (STORED[1], STORED[0], 3) and out.dtype == np.uint8, name  # EXIF rotation not applied
    assert np.array_equal(decode(images / "png16.jpg"), _pixels())  # 16 bit -> 8 bit exactly, PNG despite .jpg
    assert np.array_equal(decode(images / "png_named.jpg"), _pixels())
    gray = decode(images / "gray.jpg")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(decode(images / "cmyk.jpg").astype(int) - im).mean() < 8  # CMYK back to BGR, not inverted
    assert np.abs(decode(images / "exif_rot90.jpg").astype(int) - im).mean() < 8  # the stored frame, unrotated
    assert decode(images / "big.jpg").shape == (BIG[1], BIG[0], 3)


def test_bad_images_get_the_fallback_rule_and_no_id_is_lost(yolox_tiny, bad_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub.csv"
    report = tmp_path / "report.json"
    boxes_out = tmp_path / "boxes"
    args = ["predict", "--data", str(bad_set), "--ensemble", str(yolox_tiny.ensemble_path), "--out", str(out)]
    assert main([*args, "--report", str(report), "--boxes-out", str(boxes_out), "--batch", "3"]) == 0
    test = read_test(bad_set / "test.csv")
    sizes = {n: STORED for n in READ if n != "big.jpg"} | {"big.jpg": BIG, "header_only.jpg": STORED}
    sub = read_submission(out, test=test, image_sizes=sizes)  # every id once, its NAME, boxes inside their image
    assert len(sub) == len(test) == sum(CELLS.get(n, 1) for n in (*READ, *FALLBACK))
    prior = prior_class(bad_set)
    assert prior == pd.read_csv(bad_set / "train.csv")["class"].value_counts().idxmax()

    # the fallback images: prior class, the pads of an image without detection in their header's frame
    for name, (_, (w, h)) in FALLBACK.items():
        rows = sub[sub["NAME"] == name]
        assert len(rows) == CELLS.get(name, 1) and (rows["class"] == prior).all(), name
        pads = pad_candidates(np.array([w]), np.array([h]), np.array([len(rows)]))
        first = "prior" if len(rows) == 1 else "full"
        assert np.isclose(rows[["x1", "y1", "x2", "y2"]].to_numpy(), pads[first][0]).all(axis=1).sum() == 1, name
        assert len(rows.drop_duplicates(["x1", "y1", "x2", "y2"])) == len(rows)  # no two pads the same box
    big = sub[sub["NAME"] == "big.jpg"]
    assert (big["x2"] <= BIG[0]).all() and (big["y2"] <= BIG[1]).all() and (big["x2"] - big["x1"]).max() > 200

    # counted, listed: problems CSV, report, per-image JSON
    listed = pd.read_csv(tmp_path / f"sub{PROBLEMS_SUFFIX}")
    assert dict(zip(listed["NAME"], listed["status"])) == {n: s for n, (s, _) in FALLBACK.items()}
    assert all(n in m for n, m in zip(listed["NAME"], listed["message"]))  # each message names its file
    info = json.loads(report.read_text())
    assert info["n_fallback_images"] == len(FALLBACK) and info["fallback_class"] == prior
    per_image = {im["NAME"]: im for im in json.loads(boxes_out.with_suffix(".json").read_text())["images"]}
    assert set(per_image) == set(test["NAME"])
    assert {n for n, im in per_image.items() if im["status"] == "fallback"} == set(FALLBACK)
    assert per_image["garbage.jpg"]["width"] is None and per_image["header_only.jpg"]["width"] == STORED[0]
    assert per_image["exif_rot90.jpg"]["width"] == STORED[0]  # the stored frame: boxes are given in it


def test_the_summary_counts_the_fallback_images(yolox_tiny, bad_set: Path, tmp_path: Path) -> None:
    pred = predict_folder(bad_set, yolox_tiny.ensemble_path, tmp_path / "s.csv", fallback_class="LY")
    line = next(x for x in pred.lines if "could not be decoded" in x)
    assert line.startswith(f"{len(FALLBACK)} of {len(READ) + len(FALLBACK)} image(s)")
    assert "3 unreadable" in line and "1 missing" in line and "class LY" in line
    assert set(pred.submission.loc[pred.submission["NAME"].isin(FALLBACK), "class"]) == {"LY"}
    # the truncated JPEG is read (grey rows, as in training), and libjpeg's warning is counted and listed, not printed
    line = next(x for x in pred.lines if "decoded with JPEG warnings" in x)
    assert line.startswith("predict: ") and f"s{JPEG_SUFFIX}" in line
    assert "truncated.jpg" in " ".join(pd.read_csv(tmp_path / f"s{JPEG_SUFFIX}")["image"])
    assert "truncated.jpg" not in pred.result.problems
    fb = pred.result.boxes[pred.result.boxes["NAME"].isin(FALLBACK)]
    assert fb["source"].str.startswith("fallback:").all() and (fb["p_LY"] == 1.0).all()


def test_strict_stops_with_an_error_naming_the_file(yolox_tiny, bad_set: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "strict.csv"
    args = ["predict", "--data", str(bad_set), "--ensemble", str(yolox_tiny.ensemble_path), "--out", str(out)]
    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err
    assert "missing.jpg" in err and "garbage.jpg" in err and "empty.jpg" in err  # test.csv's check names them all
    assert not out.exists()
    # a header that reads but pixels that do not: found when decoding, in the library call too
    pipe = Pipeline(yolox_tiny.ensemble(), device="cpu")
    paths = [bad_set / "images" / n for n in ("ok.jpg", "header_only.jpg")]
    with pytest.raises(CytologiaInputError, match=r"header_only\.jpg: cannot decode.*strict"):
        pipe.predict(paths, counts={"ok.jpg": 1, "header_only.jpg": 1}, strict=True)
    result = pipe.predict(paths, counts={"ok.jpg": 1, "header_only.jpg": 1})
    assert list(result.problems) == ["header_only.jpg"] and result.sizes["header_only.jpg"] == STORED
    assert result.boxes["NAME"].tolist() == ["ok.jpg", "header_only.jpg"]  # image order kept


def test_fallback_class_default_is_the_real_prior() -> None:
    from cytologia.data.synthetic import generate as synth

    stats = json.loads((Path(synth.__file__).parent / "real_stats.json").read_text())
    assert FALLBACK_CLASS == max(stats["class_counts"], key=stats["class_counts"].get)
