"""Reading and validating train.csv, test.csv and submissions: strict errors name file + row, lenient counts."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cytologia.data.io import (
    MAX_SHOWN,
    read_annotations,
    read_raw_csv,
    read_submission,
    read_test,
    validate_annotations,
    validate_submission,
    write_submission,
)
from cytologia.data.schema import ANNOTATION_COLUMNS, CLASSES, SUBMISSION_COLUMNS, TEST_COLUMNS
from cytologia.errors import CytologiaInputError, ValidationError

HEADER = "NAME,x1,y1,x2,y2,class"
GOOD_ROWS = ["a.jpg,10,10,50,50,PNN", "b.jpg,5,6,40,44,LY"]


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def train_csv(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    return write_csv(tmp_path / "train.csv", [header, *rows])


def make_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h) in sizes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(folder / name), np.full((h, w, 3), 200, np.uint8))
    return folder


# -------------------------------------------------------------------------------------------------- annotations
def test_reads_a_valid_table_without_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = train_csv(tmp_path, [*GOOD_ROWS, "c.jpg,-3,-2,30,30,NA"[:-2] + "EO"])
    with caplog.at_level(logging.WARNING):
        table, report = read_annotations(path)
    assert tuple(table.columns) == ANNOTATION_COLUMNS
    assert table["box_id"].tolist() == [0, 1, 2]
    assert table["class"].tolist() == ["PNN", "LY", "EO"]
    assert table[["x1", "y1", "x2", "y2"]].dtypes.unique().tolist() == [np.dtype("float64")]
    assert table["img_w"].tolist() == [-1, -1, -1] and table["fixes"].tolist() == ["", "", ""]
    assert not report.images_checked and report.mode == "strict"
    assert "image checks" in caplog.text and "skipped" in caplog.text
    # a negative corner is not an error without images (no size to clip to), but it is counted
    assert report.negative_corners == 1 and report.negative_x1 == 1 and report.negative_y1 == 1
    assert table.loc[2, "x1"] == -3.0
    assert report.to_dict()["rows"] == 3 and "negative corner" in report.summary()


def test_class_names_like_none_stay_strings(tmp_path: Path) -> None:
    path = train_csv(tmp_path, [GOOD_ROWS[0], "b.jpg,1,1,9,9,None", "c.jpg,1,1,9,9,NA", "d.jpg,1,1,9,9,"])
    with pytest.raises(ValidationError) as err:
        read_annotations(path)
    text = str(err.value)
    assert f"{path}, row 2: unknown class 'None'" in text
    assert f"{path}, row 3: unknown class 'NA'" in text
    assert f"{path}, row 4: unknown class ''" in text
    assert "valid classes: B, BA, EO" in text and err.value.problems[0][0] == 2


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ("x.jpg,,10,50,50,PNN", "missing or non-numeric coordinate x1=''"),
        ("x.jpg,10,abc,50,50,PNN", "missing or non-numeric coordinate y1='abc'"),
        ("x.jpg,10,10,NaN,50,PNN", "missing or non-numeric coordinate x2='NaN'"),
        ("x.jpg,10,10,50,inf,PNN", "y2='inf'"),
        ("x.jpg,50,10,50,60,PNN", "empty box (50, 10, 50, 60): needs x2 > x1"),
        ("x.jpg,10,60,50,20,PNN", "empty box (10, 60, 50, 20)"),
        ("x.jpg,10,10,50,50,pnn", "unknown class 'pnn'"),
        ("../x.jpg,10,10,50,50,PNN", "NAME '../x.jpg' escapes the image folder"),
        ("a/../../b.jpg,10,10,50,50,PNN", "NAME 'a/../../b.jpg' escapes the image folder"),
        ("..\\x.jpg,10,10,50,50,PNN", "escapes the image folder"),
        ("/etc/x.jpg,10,10,50,50,PNN", "NAME '/etc/x.jpg' is an absolute path"),
        ("C:/x.jpg,10,10,50,50,PNN", "is an absolute path"),
        (",10,10,50,50,PNN", "empty NAME"),
    ],
)
def test_strict_errors_name_file_and_row(tmp_path: Path, bad_row: str, expected: str) -> None:
    path = train_csv(tmp_path, [GOOD_ROWS[0], bad_row, GOOD_ROWS[1]])
    with pytest.raises(ValidationError) as err:
        read_annotations(path)
    lines = [line for line in str(err.value).splitlines() if f"{path}, row 2: " in line]
    assert len(lines) == 1 and expected in lines[0], str(err.value)
    assert err.value.path == str(path) and len(err.value.problems) == 1
    assert isinstance(err.value, CytologiaInputError)


def test_harmless_parent_segment_is_allowed(tmp_path: Path) -> None:
    table, _ = read_annotations(train_csv(tmp_path, ["sub/../a.jpg,1,1,9,9,B"]))
    assert table["NAME"].tolist() == ["sub/../a.jpg"]


def test_missing_columns_and_unreadable_files(tmp_path: Path) -> None:
    path = train_csv(tmp_path, ["a.jpg,1,1,9,9"], header="NAME,x1,y1,x2,y2")
    with pytest.raises(ValidationError, match=r"missing column\(s\) class"):
        read_annotations(path)
    with pytest.raises(CytologiaInputError, match="no such file"):
        read_annotations(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValidationError, match="empty.csv.*empty file"):
        read_annotations(tmp_path / "empty.csv")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(("\ufeff" + HEADER + "\n" + GOOD_ROWS[0] + "\n").encode("utf-8"))
    assert len(read_annotations(bom)[0]) == 1  # an Excel byte-order mark is not part of the first column name


def test_all_problems_collected_and_capped(tmp_path: Path) -> None:
    rows = [f"img{i}.jpg,1,1,9,9,XX" if i % 2 else f"img{i}.jpg,1,1,9,9,B" for i in range(300)]
    rows[0] = "img0.jpg,9,1,1,9,B"  # row 1: empty box too
    with pytest.raises(ValidationError) as err:
        read_annotations(train_csv(tmp_path, rows))
    assert len(err.value.problems) == MAX_SHOWN
    assert f"... and {151 - MAX_SHOWN} more" in str(err.value)
    assert "151 problem(s)" in str(err.value)
    assert [r for r, _ in err.value.problems[:3]] == [1, 2, 4]  # in row order


def test_validate_in_memory_typed_table() -> None:
    raw = pd.DataFrame(
        {"NAME": ["a.jpg", None], "x1": [1, 2.5], "y1": [1, 2], "x2": [9, 9], "y2": [9, 9], "class": ["B", "LY"]}
    )
    with pytest.raises(ValidationError, match="<annotations>, row 2: empty NAME"):
        validate_annotations(raw)
    table, report = validate_annotations(raw, lenient=True)
    assert table["NAME"].tolist() == ["a.jpg"] and report.skipped == {"bad_name": 1}


def test_lenient_skips_and_counts_every_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        "a.jpg,10,10,50,50,PNN",  # 1 kept
        "a.jpg,x,10,50,50,PNN",  # 2 bad coordinate
        "b.jpg,10,10,50,50,None",  # 3 unknown class
        "../c.jpg,10,10,50,50,LY",  # 4 bad name
        "d.jpg,60,10,50,50,LY",  # 5 empty box
        "e.jpg,1,2,3,4,B",  # 6 kept
        "f.jpg,,,,,Foo",  # 7 several problems: counted once, under its first reason
    ]
    with caplog.at_level(logging.WARNING):
        table, report = read_annotations(train_csv(tmp_path, rows), lenient=True)
    assert table["box_id"].tolist() == [0, 5]
    assert report.kept == 2 and report.rows == 7 and report.mode == "lenient"
    assert report.skipped == {"bad_name": 1, "bad_coordinate": 2, "empty_box": 1, "unknown_class": 1}
    assert sum(report.skipped.values()) + report.kept == report.rows
    assert [(r["row"], r["reason"], r["action"]) for r in report.records] == [
        (2, "bad_coordinate", "skipped"),
        (3, "unknown_class", "skipped"),
        (4, "bad_name", "skipped"),
        (5, "empty_box", "skipped"),
        (7, "bad_coordinate", "skipped"),
    ]
    assert report.records[1]["NAME"] == "b.jpg" and "'None'" in str(report.records[1]["message"])
    assert "5 of 7 rows not kept" in caplog.text


# ------------------------------------------------------------------------------------------------------- images
def test_clipping_with_header_sizes(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", {"a.jpg": (100, 80), "b.jpg": (60, 50)})
    rows = [
        "a.jpg,10,10,50,50,PNN",  # inside
        "a.jpg,-5,-3,120,90,LY",  # past every border
        "b.jpg,70,10,90,40,B",  # right of the image: nothing inside
        "b.jpg,0,0,60,50,B",  # exactly the image
    ]
    path = train_csv(tmp_path, rows)
    with pytest.raises(ValidationError) as err:
        read_annotations(path, images)
    assert f"{path}, row 3: box (70, 10, 90, 40) lies outside its image (60 x 50 px)" in str(err.value)
    assert len(err.value.problems) == 1

    table, report = read_annotations(path, images, lenient=True, workers=2)
    assert report.images_checked and report.image_dir == str(images)
    assert table["box_id"].tolist() == [0, 1, 3]
    assert table[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[10, 10, 50, 50], [0, 0, 100, 80], [0, 0, 60, 50]]
    assert table["fixes"].tolist() == ["", "clipped", ""]
    assert table["img_w"].tolist() == [100, 100, 60] and table["img_h"].tolist() == [80, 80, 50]
    assert report.clipped == 1 and report.past_border == 1 and report.negative_corners == 1
    assert report.dropped == {"outside_image": 1} and report.skipped == {}
    assert report.records == [
        {
            "row": 3,
            "NAME": "b.jpg",
            "action": "dropped",
            "reason": "outside_image",
            "message": "box (70, 10, 90, 40) lies outside its image (60 x 50 px)",
        }
    ]
    # strict mode clips too (clipping is not a contract violation); only rows that cannot be kept are errors
    strict, _ = read_annotations(train_csv(tmp_path, rows[:2]), images)
    assert strict["fixes"].tolist() == ["", "clipped"] and strict.loc[1, "x2"] == 100.0


def test_missing_and_unreadable_images(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", {"a.jpg": (100, 80), "sub/n.jpg": (30, 30)})
    (images / "junk.jpg").write_bytes(b"not an image")
    rows = ["a.jpg,1,1,9,9,B", "missing.jpg,1,1,9,9,B", "junk.jpg,1,1,9,9,B", "sub/n.jpg,1,1,9,9,B"]
    path = train_csv(tmp_path, rows)
    with pytest.raises(ValidationError) as err:
        read_annotations(path, images)
    text = str(err.value)
    assert f"{path}, row 2: image file {images / 'missing.jpg'} not found" in text
    assert f"{path}, row 3: image unreadable" in text and "junk.jpg" in text
    assert len(err.value.problems) == 2
    table, report = read_annotations(path, images, lenient=True)
    assert table["NAME"].tolist() == ["a.jpg", "sub/n.jpg"]
    assert report.skipped == {"missing_image": 1, "unreadable_image": 1}


def test_absent_image_folder_skips_image_checks(tmp_path: Path) -> None:
    path = train_csv(tmp_path, ["missing.jpg,-1,1,9,9,B"])
    table, report = read_annotations(path, tmp_path / "no_such_folder")
    assert len(table) == 1 and not report.images_checked
    assert any("does not exist" in w for w in report.warnings)


# --------------------------------------------------------------------------------------------------------- test
def test_read_test(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "test.csv", ["trustii_id,NAME", "7,a.jpg", "3,b.jpg", "9,a.jpg"])
    test = read_test(path)
    assert tuple(test.columns) == TEST_COLUMNS
    assert test["trustii_id"].dtype == np.int64 and test["trustii_id"].tolist() == [7, 3, 9]


def test_test_list_errors(tmp_path: Path) -> None:
    lines = ["trustii_id,NAME", "7,a.jpg", "3,b.jpg", "7,c.jpg", "x,d.jpg", "4.5,e.jpg", "5,/abs.jpg", ",f.jpg"]
    path = write_csv(tmp_path / "test.csv", lines)
    with pytest.raises(ValidationError) as err:
        read_test(path)
    text = str(err.value)
    assert f"{path}, row 3: duplicated trustii_id 7 (first at row 1)" in text
    assert f"{path}, row 4: trustii_id 'x' is not an integer" in text
    assert f"{path}, row 5: trustii_id '4.5' is not an integer" in text
    assert f"{path}, row 6: NAME '/abs.jpg' is an absolute path" in text
    assert f"{path}, row 7: trustii_id '' is not an integer" in text
    images = make_images(tmp_path / "images", {"a.jpg": (10, 10)})
    ok = write_csv(tmp_path / "ok.csv", ["trustii_id,NAME", "1,a.jpg", "2,gone.jpg"])
    with pytest.raises(ValidationError, match=r"ok.csv, row 2: image file .*gone.jpg not found"):
        read_test(ok, images)


# --------------------------------------------------------------------------------------------------- submission
@pytest.fixture()
def test_list() -> pd.DataFrame:
    return pd.DataFrame({"trustii_id": [10, 11, 12], "NAME": ["a.jpg", "a.jpg", "b.jpg"]})


SUB_HEADER = ",".join(SUBMISSION_COLUMNS)
SUB_ROWS = ["11,a.jpg,1,2,30,40,LY", "10,a.jpg,5,5,50,50,PNN", "12,b.jpg,0,0,20,20.5,B"]


def test_read_valid_submission(tmp_path: Path, test_list: pd.DataFrame) -> None:
    path = write_csv(tmp_path / "sub.csv", [SUB_HEADER, *SUB_ROWS])
    sub = read_submission(path, test_list, {"a.jpg": (100, 100), "b.jpg": (30, 30)})
    assert tuple(sub.columns) == SUBMISSION_COLUMNS
    assert sub["trustii_id"].tolist() == [11, 10, 12] and sub["y2"].tolist() == [40.0, 50.0, 20.5]
    assert sub["class"].tolist() == ["LY", "PNN", "B"]


def test_submission_errors(tmp_path: Path, test_list: pd.DataFrame) -> None:
    rows = [
        "11,b.jpg,1,2,30,40,LY",  # 1 wrong image for id 11
        "11,a.jpg,1,2,30,40,LY",  # 2 duplicated id
        "99,a.jpg,1,2,30,40,LY",  # 3 not a test id
        "12,b.jpg,1,2,30,40,None",  # 4 "None" is not a class; box past b.jpg's 30 x 30
        "12x,b.jpg,1,2,3,4,B",  # 5 id not an integer
        "13,b.jpg,5,2,3,4,B",  # 6 empty box (and not a test id)
    ]
    path = write_csv(tmp_path / "sub.csv", [SUB_HEADER, *rows])
    with pytest.raises(ValidationError) as err:
        read_submission(path, test_list, pd.DataFrame({"NAME": ["b.jpg"], "img_w": [30], "img_h": [30]}))
    text = str(err.value)
    assert f"{path}: trustii_id 10 (NAME 'a.jpg') of the test list has no row" in text
    assert f"{path}, row 1: NAME 'b.jpg' is not trustii_id 11's image 'a.jpg'" in text
    assert f"{path}, row 2: duplicated trustii_id 11 (first at row 1)" in text
    assert f"{path}, row 3: trustii_id 99 is not in the test list" in text
    assert f"{path}, row 4: unknown class 'None'; valid classes:" in text
    assert f"{path}, row 4: box (1, 2, 30, 40) is not inside the image (30 x 30)" in text
    assert f"{path}, row 5: trustii_id '12x' is not an integer" in text
    assert f"{path}, row 6: empty box (5, 2, 3, 4)" in text
    assert err.value.problems[0][0] is None  # file-level problems (missing ids) come first


def test_submission_without_test_list_and_in_memory(tmp_path: Path) -> None:
    typed = pd.DataFrame(
        {
            "trustii_id": [1, 2],
            "NAME": ["a.jpg", "b.jpg"],
            "x1": [0.5, 1],
            "y1": [0, 1],
            "x2": [10.25, 5],
            "y2": [3, 4],
            "class": ["B", CLASSES[-1]],
        }
    )
    valid, report = validate_submission(typed)
    assert valid["x2"].tolist() == [10.25, 5.0] and report.kept == 2
    broken = typed.assign(**{"class": ["B", None]})
    with pytest.raises(ValidationError, match=r"<submission>, row 2: unknown class ''"):
        validate_submission(broken)
    out = tmp_path / "sub.csv"
    with pytest.raises(ValidationError):
        write_submission(broken, out)
    assert not out.exists()  # nothing written when invalid
    write_submission(typed, out)
    assert out.read_text().splitlines() == [SUB_HEADER, "1,a.jpg,0.5,0,10.25,3,B", "2,b.jpg,1,1,5,4,Thromb"]
    with pytest.raises(ValidationError, match="missing column"):
        validate_submission(typed.drop(columns=["class"]))


# -------------------------------------------------------------------------------------------------------- real
def test_real_train_and_test_load_without_images(real_data_dir: Path) -> None:
    start = time.perf_counter()
    table, report = read_annotations(real_data_dir / "train.csv")
    test = read_test(real_data_dir / "test.csv")
    seconds = time.perf_counter() - start
    assert len(table) == report.rows == 52_748 and report.images == 48_417
    assert not report.images_checked and report.image_dir is None
    assert report.negative_x1 == 187 and report.negative_y1 == 193
    assert set(table["class"]) == set(CLASSES)
    assert len(test) == 22_689 and test["trustii_id"].is_unique and test["NAME"].nunique() == 20_751
    assert seconds < 10, f"loading the real tables took {seconds:.1f} s"
    raw = read_raw_csv(real_data_dir / "train.csv", ("NAME",))
    assert (raw["NAME"].to_numpy() == table["NAME"].to_numpy()).all()
