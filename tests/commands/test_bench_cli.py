"""`cytologia bench`: the dispatcher, and the score benchmark on a small table (real table: marked bench)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia import cli, metrics, metrics_reference
from cytologia.commands import bench, bench_score
from cytologia.data.schema import CLASSES

ROOT = Path(__file__).resolve().parents[2]


def small_train(tmp_path: Path, n_images: int = 150, seed: int = 0) -> Path:
    """A train.csv-like table (no trustii_id): 1-3 boxes per image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = rng.integers(0, 200, 2)
            w, h = rng.integers(20, 120, 2)
            rows.append((f"img{i:04d}.jpg", x1, y1, x1 + w, y1 + h, CLASSES[int(rng.integers(0, len(CLASSES)))]))
    path = tmp_path / "train.csv"
    pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "class"]).to_csv(path, index=False)
    return path


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_bench_score_on_a_small_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = small_train(tmp_path)
    argv = ["bench", "score", "--truth", str(truth), "--repeats", "2", "--loop-repeats", "1", "--seed", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    payload = last_json(out)
    assert payload["agree"] is True and payload["max_abs_diff"] < 1e-9
    assert payload["n_truth"] == len(pd.read_csv(truth))
    assert len(payload["vectorised_runs_s"]) == 2 and len(payload["loop_runs_s"]) == 1
    assert payload["n_pred_rows"] > payload["n_pred_kept"] > 0
    assert payload["score"] < 1.0 and payload["speedup"] > 0
    assert "vectorised (median of 2)" in out and "per-image loop (median of 1)" in out


@pytest.mark.parametrize("key", ["score", "giou", "f1"])
def test_bench_score_exits_1_when_the_implementations_disagree(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One side broken on purpose (the loop's figure offset by 1e-6): the verdict is DISAGREE and the exit 1."""
    real_loop = metrics_reference.score_loop

    def off_by_a_little(truth: pd.DataFrame, pred: pd.DataFrame) -> dict[str, object]:
        out = dict(real_loop(truth, pred))
        out[key] = float(out[key]) + 1e-6
        return out

    monkeypatch.setattr(metrics_reference, "score_loop", off_by_a_little)
    truth = small_train(tmp_path, n_images=40)
    argv = ["bench", "score", "--truth", str(truth), "--repeats", "1", "--loop-repeats", "1"]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    payload = last_json(out)
    assert payload["agree"] is False and payload["max_abs_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert f"(must be < {bench_score.TOLERANCE:g}): DISAGREE" in out
    assert cli.main([*argv, "--tolerance", "1e-5"]) == 0  # within a stated looser tolerance it passes
    assert last_json(capsys.readouterr().out)["tolerance"] == 1e-5


def test_perturb_breaks_every_rule(tmp_path: Path) -> None:
    truth = metrics.read_truth(small_train(tmp_path, n_images=400), assign_ids=True)
    result = metrics.score(truth, bench_score.perturb(truth, seed=1))
    assert result.n_pred_unknown_id > 0 and result.n_pred_wrong_name > 0
    assert result.n_pred_repeated_id > 0 and result.n_pred_duplicate > 0
    assert result.n_images_without_prediction > 0
    assert 0.5 < result.f1 < 0.95 and 0.5 < result.giou < 1.0


def test_bench_score_with_a_given_prediction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth_path = small_train(tmp_path)
    truth = metrics.read_truth(truth_path, assign_ids=True)
    pred_path = tmp_path / "pred.csv"
    truth.to_csv(pred_path, index=False)
    assert cli.main(["bench", "score", "--truth", str(truth_path), "--pred", str(pred_path)]) == 0
    payload = last_json(capsys.readouterr().out)
    assert payload["score"] == 1.0 and payload["pred"] == str(pred_path)


def test_bench_score_script_is_the_same_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = small_train(tmp_path, n_images=30)
    argv = sys.argv
    sys.argv = ["bench_score.py", "--truth", str(truth), "--repeats", "1"]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "scripts" / "bench_score.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    assert last_json(capsys.readouterr().out)["agree"] is True


def test_missing_default_table_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CYTOLOGIA_REAL_DATA", str(tmp_path / "nowhere"))
    assert cli.main(["bench", "score"]) == 2
    err = capsys.readouterr().err
    assert "nowhere/train.csv: no such file" in err and "CYTOLOGIA_REAL_DATA" in err


def test_bench_help_lists_the_benchmark_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "score", "--help"])
    assert done.value.code == 0
    assert "--truth" in capsys.readouterr().out


def test_unknown_bench_name_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "nope"])
    assert done.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_bench_whose_module_is_missing_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(bench.BENCHES, "ghost", ("cytologia.no_such_bench", "not installed"))
    assert cli.main(["bench", "ghost"]) == 2
    assert "benchmark 'ghost' is not available in this installation" in capsys.readouterr().err


def test_missing_dependency_inside_a_bench_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_bench_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(bench.BENCHES, "broken", ("broken_bench_mod", "imports a missing package"))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        bench.load("broken")


def test_every_registered_bench_has_the_module_interface() -> None:
    for name in bench.BENCHES:
        try:
            module = bench.load(name)
        except Exception as err:  # a bench another engineer has not landed yet
            assert "not available in this installation" in str(err)
            continue
        assert callable(module.add_arguments) and callable(module.run)


@pytest.mark.bench
def test_real_table_score_bench(real_data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("CYTOLOGIA_REAL_DATA", str(real_data_dir))
    assert cli.main(["bench", "score", "--repeats", "5", "--loop-repeats", "3"]) == 0
    payload = last_json(capsys.readouterr().out)
    assert payload["n_truth"] == 52748 and payload["agree"] is True
    assert payload["vectorised_s"] < bench_score.TARGET_SECONDS
    # Best-of runs: on a shared machine other processes inflate single runs (the median is printed too).
    assert payload["speedup_best"] >= bench_score.TARGET_SPEEDUP, payload
