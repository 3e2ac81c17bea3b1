"""The ``real_data_dir`` fixture's rule (tests/conftest.py): a missing real table skips the test, except in CI
(CYTOLOGIA_CI set), where it fails naming the path and the variable to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REAL_TABLES, in_ci, require_real_data


def _tables(folder: Path, names: tuple[str, ...] = REAL_TABLES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("NAME\n")
    return folder


def _outcome(folder: Path, ci: bool) -> tuple[str, str]:
    """("ok" | "skip" | "fail", message): a skip or failure raised by the helper is caught here, so that a wrong
    outcome fails this test instead of skipping it."""
    try:
        return "ok", str(require_real_data(folder, ci=ci))
    except pytest.skip.Exception as err:
        return "skip", str(err)
    except pytest.fail.Exception as err:
        return "fail", str(err)


@pytest.mark.parametrize("ci", [False, True])
def test_present_tables_give_the_folder(tmp_path: Path, ci: bool) -> None:
    folder = _tables(tmp_path / "data")
    assert _outcome(folder, ci) == ("ok", str(folder))


def test_missing_table_skips_outside_ci(tmp_path: Path) -> None:
    outcome, message = _outcome(tmp_path / "nowhere", ci=False)
    assert outcome == "skip", message
    assert str(tmp_path / "nowhere" / "train.csv") in message and "CYTOLOGIA_REAL_DATA" in message


def test_missing_table_fails_in_ci_naming_path_and_variable(tmp_path: Path) -> None:
    folder = _tables(tmp_path / "half", ("train.csv",))  # test.csv missing
    outcome, message = _outcome(folder, ci=True)
    assert outcome == "fail", message
    assert str(folder / "test.csv") in message and str(folder / "train.csv") not in message
    assert "CYTOLOGIA_REAL_DATA" in message and "CYTOLOGIA_CI" in message


@pytest.mark.parametrize(
    "value, expected", [(None, False), ("", False), ("0", False), ("false", False), ("1", True), ("yes", True)]
)
def test_ci_flag(value: str | None, expected: bool) -> None:
    assert in_ci({} if value is None else {"CYTOLOGIA_CI": value}) is expected
