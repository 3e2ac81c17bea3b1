"""The out-of-fold logits table: exact round trip, schema errors that name the file and row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.classification.oof import (
    labels_for,
    logit_columns,
    logits_of,
    make_oof_table,
    read_oof,
    validate_oof,
    write_oof,
)
from cytologia.data.schema import BACKGROUND, CLASSES
from cytologia.errors import CytologiaInputError, ValidationError


def _table(n: int = 7, k: int = 23, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # Values across magnitudes, including ones float32 cannot hold exactly in few decimal digits.
    logits = (rng.normal(size=(n, k)) * 10.0 ** rng.integers(-6, 4, size=(n, k))).astype(np.float32)
    return make_oof_table([f"{i:08x}-a.jpg" for i in range(n)], np.arange(n) * 3, 2, "vitl224", logits)


def test_csv_round_trip_is_bit_exact(tmp_path: Path) -> None:
    table = _table()
    path = write_oof(table, tmp_path / "oof_logits.csv")
    back = read_oof(path)
    assert list(back.columns) == ["NAME", "box_id", "fold", "model", *logit_columns(23)]
    assert back["box_id"].dtype == np.int64 and back["fold"].dtype == np.int64
    assert back[logit_columns(23)].dtypes.eq(np.float32).all()
    np.testing.assert_array_equal(logits_of(back), logits_of(table))  # bit for bit, not approximately
    pd.testing.assert_frame_equal(back, table)


def test_background_model_has_24_labels(tmp_path: Path) -> None:
    table = _table(k=24)
    back = read_oof(write_oof(table, tmp_path / "bg.csv"))
    assert logits_of(back).shape == (7, 24)
    assert labels_for(24)[-1] == BACKGROUND and labels_for(23) == CLASSES
    with pytest.raises(CytologiaInputError, match="25 logit columns"):
        labels_for(25)


def test_names_that_look_like_numbers_or_na_stay_text(tmp_path: Path) -> None:
    logits = np.zeros((2, 23), np.float32)
    table = make_oof_table(["00001234.jpg", "NA"], [0, 1], 0, "None", logits)
    back = read_oof(write_oof(table, tmp_path / "t.csv"))
    assert back["NAME"].tolist() == ["00001234.jpg", "NA"] and back["model"].tolist() == ["None", "None"]


def test_schema_errors_name_the_file_and_row(tmp_path: Path) -> None:
    good = _table(n=4)
    path = tmp_path / "bad.csv"

    dup = pd.concat([good, good.iloc[[1]]], ignore_index=True)
    dup.to_csv(path, index=False)
    with pytest.raises(ValidationError, match=r"bad\.csv, row 5: repeats \(NAME, box_id, model\)"):
        read_oof(path)

    gap = good.drop(columns=["logit_3"])
    with pytest.raises(ValidationError, match="without gaps"):
        validate_oof(gap, path)

    missing = good.drop(columns=["fold"])
    with pytest.raises(ValidationError, match="missing column"):
        validate_oof(missing, path)

    text = good.astype({"box_id": object})
    text.loc[2, "box_id"] = "x"
    with pytest.raises(ValidationError, match=r"row 3: box_id='x' is not an integer"):
        validate_oof(text, path)

    nan = good.copy()
    nan.loc[0, "logit_5"] = np.nan
    with pytest.raises(ValidationError, match="row 1: a logit is missing"):
        validate_oof(nan, path)

    extra = good.assign(score=1.0)
    with pytest.raises(ValidationError, match="unexpected column"):
        validate_oof(extra, path)

    with pytest.raises(ValueError, match="do not match"):
        make_oof_table(["a.jpg"], [0, 1], 0, "m", np.zeros((1, 23)))


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(CytologiaInputError, match="no such file"):
        read_oof(tmp_path / "absent.csv")
    with pytest.raises(CytologiaInputError, match=r"\.csv or \.parquet"):
        write_oof(_table(), tmp_path / "oof.txt")


def test_parquet_round_trip_or_clear_error(tmp_path: Path) -> None:
    table = _table()
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(CytologiaInputError, match="pyarrow"):
            write_oof(table, tmp_path / "oof.parquet")
        assert not (tmp_path / "oof.parquet").exists()
    else:
        pd.testing.assert_frame_equal(read_oof(write_oof(table, tmp_path / "oof.parquet")), table)
