"""`cytologia validate`: outputs, JSON report and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cytologia.cli import main
from cytologia.data.schema import ANNOTATION_COLUMNS


def smooth(seed: int, w: int = 80, h: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """DATA/ with train.csv, test.csv and images/ (one image with junk before EOI, one exact duplicate)."""
    root = tmp_path / "data"
    images = root / "images"
    images.mkdir(parents=True)
    for k, name in enumerate(["a.jpg", "b.jpg", "t1.jpg", "t2.jpg"]):
        assert cv2.imwrite(str(images / name), smooth(k))
    jpeg = (images / "b.jpg").read_bytes()
    (images / "b.jpg").write_bytes(jpeg[:-2] + bytes(range(1, 33)) + jpeg[-2:])  # corrupt: extraneous bytes
    (images / "t2.jpg").write_bytes((images / "a.jpg").read_bytes())  # a test image duplicating a train image
    (root / "train.csv").write_text("NAME,x1,y1,x2,y2,class\na.jpg,-4,10,50,70,PNN\nb.jpg,5,5,30,30,LY\n")
    (root / "test.csv").write_text("trustii_id,NAME\n1,t1.jpg\n2,t2.jpg\n3,t1.jpg\n")
    return root


def run(*argv: str | Path) -> int:
    return main(["validate", *map(str, argv)])


def test_validate_writes_tables_and_report(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run("--data", data, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "train, strict: 2 rows -> 2 kept" in printed and "images checked: yes" in printed
    table = pd.read_csv(out / "annotations.csv", keep_default_na=False)
    assert tuple(table.columns) == ANNOTATION_COLUMNS
    assert table["x1"].tolist() == [0, 5] and table["fixes"].tolist() == ["clipped", ""]
    assert table["img_w"].tolist() == [80, 80]
    report = json.loads((out / "validation_report.json").read_text())
    assert report["train"]["clipped"] == 1 and report["train"]["images_checked"] is True
    assert report["test"]["rows"] == 3
    assert pd.read_csv(out / "test.csv")["trustii_id"].tolist() == [1, 2, 3]


def test_validate_without_images(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--data", data, "--no-images") == 0
    assert "images checked: no" in capsys.readouterr().out


def test_strict_failure_exits_2_naming_file_and_row(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with (data / "train.csv").open("a") as f:
        f.write("c.jpg,1,1,9,9,None\n")
    assert run("--data", data, "--no-images") == 2
    err = capsys.readouterr().err
    assert f"{data / 'train.csv'}, row 3: unknown class 'None'" in err


def test_lenient_counts_in_the_report(data: Path, tmp_path: Path) -> None:
    with (data / "train.csv").open("a") as f:
        f.write("missing.jpg,1,1,9,9,B\na.jpg,90,1,99,9,B\n")
    out = tmp_path / "out"
    assert run("--data", data, "--out", out) == 2  # strict: missing image, box outside the image
    assert run("--data", data, "--out", out, "--lenient") == 0
    report = json.loads((out / "validation_report.json").read_text())["train"]
    assert report["skipped"] == {"missing_image": 1} and report["dropped"] == {"outside_image": 1}
    assert [r["row"] for r in report["records"]] == [3, 4]
    assert len(pd.read_csv(out / "annotations.csv")) == 2


def test_submission(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "sub.csv"
    good.write_text(
        "trustii_id,NAME,x1,y1,x2,y2,class\n1,t1.jpg,0,0,10,10,B\n2,t2.jpg,0,0,80,64,LY\n3,t1.jpg,1,1,5,5,B\n"
    )
    assert run("--data", data, "--submission", good) == 0
    assert "submission, strict: 3 rows" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("trustii_id,NAME,x1,y1,x2,y2,class\n1,t1.jpg,0,0,10,10,B\n2,t2.jpg,0,0,81,64,LY\n")
    assert run("--data", data, "--submission", bad) == 2
    err = capsys.readouterr().err
    assert "trustii_id 3 (NAME 't1.jpg') of the test list has no row" in err
    assert f"{bad}, row 2: box (0, 0, 81, 64) is not inside the image (80 x 64)" in err


def test_check_jpeg_repair_and_duplicates(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    original = (data / "images" / "b.jpg").read_bytes()
    assert run("--data", data, "--out", out, "--check-jpeg", "--repair-cache", cache, "--duplicates") == 0
    printed = capsys.readouterr().out
    assert "corrupt-extraneous-bytes 1" in printed and "repaired 1 images" in printed
    scan = pd.read_csv(out / "jpeg_check.csv", keep_default_na=False).set_index("NAME")
    assert scan.loc["b.jpg", "status"] == "corrupt-extraneous-bytes" and scan.loc["a.jpg", "status"] == "ok"
    assert (cache / "b.jpg").is_file() and (data / "images" / "b.jpg").read_bytes() == original
    dups = pd.read_csv(out / "duplicates.csv", keep_default_na=False).set_index("NAME")
    assert dups.loc["a.jpg", "dup_group"] == dups.loc["t2.jpg", "dup_group"] >= 0
    assert dups.loc["a.jpg", "group_split"] == "train-test"
    report = json.loads((out / "validation_report.json").read_text())
    assert report["duplicates"]["train_test_groups"] == 1 and report["jpeg"]["repaired"] == 1


def test_bad_arguments_exit_2(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--data", data, "--images", tmp_path / "nowhere") == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert run("--data", tmp_path / "nodata") == 2
    assert run("--data", data, "--no-images", "--check-jpeg") == 2


def test_unreadable_image(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (data / "images" / "a.jpg").write_bytes(b"broken")
    assert run("--data", data, "--check-jpeg") == 2
    assert f"{data / 'train.csv'}, row 1: image unreadable" in capsys.readouterr().err
    out = tmp_path / "out"
    assert run("--data", data, "--check-jpeg", "--lenient", "--out", out) == 0  # skipped, counted
    report = json.loads((out / "validation_report.json").read_text())
    assert report["train"]["skipped"] == {"unreadable_image": 1}
    # the JPEG scan covers the images of the kept rows and of the test list
    assert report["jpeg"] == {"images": 3, "status": {"ok": 2, "corrupt-extraneous-bytes": 1}}
