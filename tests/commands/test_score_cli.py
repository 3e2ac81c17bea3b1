"""`cytologia score`: the summary, the JSON last line, and errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cytologia import cli, metrics

TRUTH = (
    "trustii_id,NAME,x1,y1,x2,y2,class\n"
    "0,a.jpg,0,0,10,10,B\n"
    "1,a.jpg,20,20,30,30,EO\n"
    "2,b.jpg,5,5,15,15,B\n"
    "3,c.jpg,0,0,8,8,MO\n"
)
PRED = (
    "trustii_id,NAME,x1,y1,x2,y2,class\n"
    "1,a.jpg,21,20,30,31,EO\n"
    "0,a.jpg,0,0,10,10,NA\n"  # "NA" is a string, not a missing value: one more label
    "0,a.jpg,0,0,10,10,B\n"  # repeated id: ignored
    "2,a.jpg,5,5,15,15,B\n"  # id of b.jpg under a.jpg: ignored
    "9,b.jpg,5,5,15,15,B\n"  # unknown id
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_json_last_line_matches_the_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth, pred = write(tmp_path, "truth.csv", TRUTH), write(tmp_path, "pred.csv", PRED)
    assert cli.main(["score", "--truth", str(truth), "--pred", str(pred), "--json", "--per-class"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    payload = json.loads(out[-1])
    expected = metrics.score(metrics.read_truth(truth), metrics.read_predictions(pred))
    assert payload["score"] == pytest.approx(expected.score)
    assert (payload["giou"], payload["f1"]) == (pytest.approx(expected.giou), pytest.approx(expected.f1))
    assert payload["n_truth"] == 4 and payload["n_pred_rows"] == 5 and payload["n_pred_kept"] == 2
    assert payload["n_images_without_prediction"] == 2
    assert (payload["n_pred_unknown_id"], payload["n_pred_wrong_name"], payload["n_pred_repeated_id"]) == (1, 1, 1)
    assert set(payload["per_class_f1"]) == {"B", "EO", "MO", "NA", "None"}
    assert payload["per_class_f1"]["NA"] == 0.0 and payload["per_class_f1"]["EO"] == 1.0
    text = "\n".join(out[:-1])
    assert text.startswith(f"score  {expected.score:.6f}")
    assert "images without a kept prediction: 2" in text and "'NA'" in text
    assert any(line.split()[:2] == ["EO", "1"] for line in out)  # per-class table: label, truth rows, ...


def test_without_json_prints_only_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = write(tmp_path, "truth.csv", TRUTH)
    assert cli.main(["score", "--truth", str(truth), "--pred", str(truth)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("score  1.000000") and "{" not in out


@pytest.mark.parametrize("which", ["truth", "pred"])
def test_missing_column_exits_2_naming_the_file(which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {"truth": TRUTH, "pred": PRED}
    broken = good[which].replace(",class\n", ",label\n", 1)
    truth = write(tmp_path, "truth.csv", broken if which == "truth" else TRUTH)
    pred = write(tmp_path, "pred.csv", broken if which == "pred" else PRED)
    assert cli.main(["score", "--truth", str(truth), "--pred", str(pred), "--json"]) == 2
    captured = capsys.readouterr()
    bad = truth if which == "truth" else pred
    assert f"error: {bad}" in captured.err and "missing column(s) class" in captured.err
    assert captured.out == ""


def test_invalid_truth_exits_2_naming_file_and_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = write(tmp_path, "truth.csv", TRUTH + "2,d.jpg,0,0,x,10,B\n")
    pred = write(tmp_path, "pred.csv", PRED)
    assert cli.main(["score", "--truth", str(truth), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err
    assert f"{truth}, row 5: trustii_id 2 is repeated (first at row 3)" in err
    assert f"{truth}, row 5: coordinate is missing, non-numeric or infinite: x2='x'" in err


def test_absent_or_empty_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = write(tmp_path, "truth.csv", TRUTH)
    assert cli.main(["score", "--truth", str(truth), "--pred", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err
    empty = write(tmp_path, "empty.csv", "")
    assert cli.main(["score", "--truth", str(truth), "--pred", str(empty)]) == 2
    assert "empty.csv: not a readable CSV table" in capsys.readouterr().err


def test_non_numeric_prediction_coordinates_are_scored_and_logged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    truth = write(tmp_path, "truth.csv", TRUTH)
    pred = write(tmp_path, "pred.csv", TRUTH.replace("2,b.jpg,5,5,15,15,B", "2,b.jpg,five,5,15,15,B"))
    assert cli.main(["score", "--truth", str(truth), "--pred", str(pred), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["n_pred_bad_box"] == 1 and payload["f1"] == 1.0
    assert payload["giou"] == pytest.approx(3 / 4)  # that box scores 0, the three others 1
    assert "1 row(s) with a missing or non-numeric coordinate (rows 3)" in caplog.text


UNKNOWN = TRUTH.replace("3,c.jpg,0,0,8,8,MO", "3,c.jpg,0,0,8,8,Blast") + "4,d.jpg,0,0,8,8,Blast\n"


def test_unknown_truth_class_is_scored_and_named_in_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    truth = write(tmp_path, "truth.csv", UNKNOWN)
    assert cli.main(["score", "--truth", str(truth), "--pred", str(truth), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["score"] == 1.0 and set(payload["per_class_f1"]) == {"B", "EO", "Blast"}  # the reference rule
    assert f"{truth}: class 'Blast' is not one of the 23 classes: 2 row(s) (rows 4, 5)" in caplog.text
    assert [r.levelname for r in caplog.records if "Blast" in r.getMessage()] == ["WARNING"]


def test_unknown_truth_class_warning_reaches_stderr(tmp_path: Path) -> None:
    """The warning goes to the terminal: a real process, where the CLI's logging writes to stderr."""
    import subprocess
    import sys

    truth = write(tmp_path, "truth.csv", UNKNOWN)
    done = subprocess.run(
        [sys.executable, "-m", "cytologia.cli", "score", "--truth", str(truth), "--pred", str(truth)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"WARNING cytologia.metrics: {truth}: class 'Blast' is not one of the 23 classes" in done.stderr
    assert "WARNING" not in done.stdout


def test_strict_makes_an_unknown_truth_class_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth, pred = write(tmp_path, "truth.csv", UNKNOWN), write(tmp_path, "pred.csv", PRED)
    assert cli.main(["score", "--truth", str(truth), "--pred", str(pred), "--strict", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"error: {truth}: 1 problem(s)" in captured.err
    assert f"{truth}, row 4: class 'Blast' is not one of the 23 classes: 2 row(s) (rows 4, 5)" in captured.err
    clean = write(tmp_path, "clean.csv", TRUTH)
    assert cli.main(["score", "--truth", str(clean), "--pred", str(pred), "--strict"]) == 0
