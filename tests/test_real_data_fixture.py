"""The ``real_data_dir`` fixture's rule (tests/conftest.py): a missing real table skips the test, except in CI
(CYTOLOGIA_CI set), where it fails naming the path and the variable to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REAL_TABLES, in_ci, require_file, require_real_data


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


@pytest.mark.parametrize("ci", [False, True])
def test_a_missing_shared_file_skips_outside_ci_and_fails_in_ci(tmp_path: Path, ci: bool) -> None:
    """The rule for RECIPES.md (tests/test_recipes.py): skipped without the shared folder, a failure in CI."""
    missing = tmp_path / "shared" / "RECIPES.md"
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match="CYTOLOGIA_RECIPES") as err:
        require_file(missing, "CYTOLOGIA_RECIPES", ci)
    assert str(missing) in str(err.value)
    missing.parent.mkdir()
    missing.write_text("# recipes\n")
    assert require_file(missing, "CYTOLOGIA_RECIPES", ci) == missing


def test_ci_names_the_recipes_file_from_the_checkouts_parent() -> None:
    text = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert 'export CYTOLOGIA_RECIPES="${CYTOLOGIA_RECIPES:-$(cd "$repo/.." && pwd)/shared/RECIPES.md}"' in text
