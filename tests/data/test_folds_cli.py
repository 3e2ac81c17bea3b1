"""`cytologia folds` and `cytologia bench folds` end to end on small rendered sets."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cytologia.cli import main
from cytologia.commands import bench_folds
from cytologia.data.folds_bench import render_source_set
from cytologia.data.prepare import FOLDS_REPORT as REPORT_NAME

SIX = ["S01", "S02", "S03", "S04", "S05", "S07"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 images from 6 sources (8 each), Trustii layout: images/, train.csv, sources.csv."""
    out = tmp_path_factory.mktemp("data")
    render_source_set(out, 48, seed=2, sources=SIX)
    return out


def test_folds_end_to_end(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run" / "folds.csv"
    src_out = tmp_path / "run" / "sources.csv"
    code = main(
        [
            "folds",
            "--data",
            str(data_dir),
            "--k",
            "3",
            "--seed",
            "7",
            "--out",
            str(out),
            "--sources-out",
            str(src_out),
            "--workers",
            "1",
        ]
    )
    assert code == 0
    folds = pd.read_csv(out)
    train = pd.read_csv(data_dir / "train.csv")
    assert list(folds.columns) == ["NAME", "fold"]
    assert sorted(folds["NAME"]) == sorted(train["NAME"].unique())
    assert set(folds["fold"]) == {0, 1, 2}
    report = json.loads((out.parent / REPORT_NAME).read_text())
    assert report["k"] == 3 and report["seed"] == 7 and report["mode"] == "stratified"
    assert report["images_used"] and report["n_images"] == 48 and report["n_sources"] == len(SIX)
    inferred = pd.read_csv(src_out)
    assert list(inferred.columns) == ["NAME", "source"] and len(inferred) == 48
    assert "max deviation" in capsys.readouterr().out
    # Same command, same file.
    again = tmp_path / "again.csv"
    main(["folds", "--data", str(data_dir), "--k", "3", "--seed", "7", "--out", str(again), "--workers", "1"])
    assert again.read_bytes() == out.read_bytes()


def test_group_source_mode(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "folds.csv"
    code = main(["folds", "--data", str(data_dir), "--k", "3", "--mode", "group-source", "--out", str(out)])
    assert code == 0
    folds = pd.read_csv(out).merge(pd.read_csv(data_dir / "sources.csv"), on="NAME")
    assert (folds.groupby("source")["fold"].nunique() == 1).all()  # leave-source-out
    assert folds["fold"].nunique() == 3


def test_group_source_too_few_sources(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["folds", "--data", str(data_dir), "--k", "8", "--mode", "group-source", "--out", str(tmp_path / "f.csv")]
    )
    assert code == 2
    assert "at least k=8 separable sources, found 6" in capsys.readouterr().err
    assert not (tmp_path / "f.csv").exists()


def test_table_without_images_warns(tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copy(data_dir / "train.csv", tmp_path / "train.csv")
    with caplog.at_level(logging.WARNING):
        code = main(["folds", "--data", str(tmp_path), "--k", "4", "--out", str(tmp_path / "folds.csv")])
    assert code == 0
    assert "no images/ folder" in caplog.text
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    assert not report["images_used"] and report["n_sources"] is None
    assert len(pd.read_csv(tmp_path / "folds.csv")) == 48


def test_bad_inputs_exit_2(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "f.csv")
    assert main(["folds", "--data", str(tmp_path), "--out", out]) == 2
    assert "train.csv: no such file" in capsys.readouterr().err
    assert main(["folds", "--data", str(data_dir), "--k", "1", "--out", out]) == 2
    assert "k must be an integer >= 2" in capsys.readouterr().err
    assert main(["folds", "--data", str(data_dir), "--images", str(tmp_path / "nope"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown mode
        main(["folds", "--data", str(data_dir), "--mode", "random", "--out", out])
    bad = tmp_path / "bad"
    bad.mkdir()
    table = pd.read_csv(data_dir / "train.csv").astype({"x1": object, "class": object})
    table.loc[2, "x1"] = "12a"
    table.loc[4, "class"] = ""
    table.to_csv(bad / "train.csv", index=False)
    assert main(["folds", "--data", str(bad), "--no-images", "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'train.csv'}: 2 problem(s)" in err
    assert "row 3: x1='12a' is not a number" in err and "row 5: empty class" in err
    table.drop(columns="y2").to_csv(bad / "train.csv", index=False)
    assert main(["folds", "--data", str(bad), "--out", out]) == 2
    assert "missing column(s) y2" in capsys.readouterr().err
    assert not Path(out).exists()


def test_duplicates_grouped_and_missing_hygiene_warns(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Copy the set and add an exact duplicate of one image under a new name.
    work = tmp_path / "data"
    shutil.copytree(data_dir, work)
    train = pd.read_csv(work / "train.csv")
    first = train.iloc[0]
    shutil.copy(work / "images" / first["NAME"], work / "images" / "dup-copy.jpg")
    pd.concat([train, first.to_frame().T.assign(NAME="dup-copy.jpg")]).to_csv(work / "train.csv", index=False)
    out = tmp_path / "folds.csv"
    assert main(["folds", "--data", str(work), "--k", "4", "--out", str(out)]) == 0
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    if importlib.util.find_spec("cytologia.data.hygiene") is not None:
        folds = pd.read_csv(out).set_index("NAME")["fold"]
        assert report["n_duplicate_groups"] >= 1
        assert folds["dup-copy.jpg"] == folds[first["NAME"]]

    # Without the hygiene module the split still runs, with a warning.
    real_import = importlib.import_module

    def no_hygiene(name: str, *a: object, **kw: object) -> object:
        if name == "cytologia.data.hygiene":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", no_hygiene)
    with caplog.at_level(logging.WARNING):
        from cytologia.commands import folds as folds_command

        parser = argparse.ArgumentParser()
        folds_command.add_arguments(parser)
        assert folds_command.run(parser.parse_args(["--data", str(work), "--k", "4", "--out", str(out)])) == 0
    assert "hygiene is not available" in caplog.text
    assert json.loads((tmp_path / REPORT_NAME).read_text())["n_duplicate_groups"] == 0


def test_bench_folds_prints_table_and_json(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(data_dir / "train.csv", real / "train.csv")  # stands in for the real table
    parser = argparse.ArgumentParser()
    bench_folds.add_arguments(parser)
    args = parser.parse_args(
        ["--real", str(real), "--data", str(data_dir), "--k", "3", "--json", str(tmp_path / "b.json")]
    )
    assert bench_folds.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result == json.loads((tmp_path / "b.json").read_text())
    assert result["real"]["images"] == 48 and result["real"]["k"] == 3
    assert result["sources"]["true_sources"] == len(SIX)
    assert result["sources"]["ari_jpeg"] == pytest.approx(1.0)
    assert 0.0 <= result["real"]["max_dev_boxes"] <= 100.0
    assert any("ARI with JPEG tables" in line for line in lines)


@pytest.mark.parametrize("installed", [False, True])
def test_bench_without_real_table_renders_a_set(
    installed: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force the render_source_set fallback (the generator may or may not be installed). installed: no --real and no
    # default folder (an installed package without $CYTOLOGIA_REAL_DATA, cytologia.paths.real_data_dir() is None).
    def rendered(out: Path, n_images: int, seed: int) -> str:
        render_source_set(out, n_images, seed, sources=SIX, size=96)
        return "render"

    monkeypatch.setattr(bench_folds, "_generated_set", rendered)
    if installed:
        monkeypatch.setattr(bench_folds, "DEFAULT_REAL_DIR", None)
    parser = argparse.ArgumentParser()
    bench_folds.add_arguments(parser)
    real = [] if installed else ["--real", str(tmp_path)]
    assert bench_folds.run(parser.parse_args([*real, "--images", "24"])) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["real"] is None and "skipped" in out
    assert ("no folder (an installed package)" in out) == installed
    assert result["sources"]["images"] == 24 and result["sources"]["origin"] == "render"
