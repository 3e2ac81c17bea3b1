"""Sharded prediction: 2 CPU processes (``cytologia predict --shards 2`` and ``torchrun --nproc_per_node=2 -m
cytologia predict``) write the same submission as one process, byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cytologia.cli import main
from cytologia.errors import CytologiaInputError
from cytologia.runtime.shards import shard_slices

BATCH = "2"  # images per batch: the 12 images make 6 batches, 3 per shard


def test_shard_slices_are_runs_of_whole_batches() -> None:
    assert shard_slices(11, 2, 2) == [slice(0, 6), slice(6, 11)]  # 6 batches: 3 + 3, the last one short
    assert shard_slices(3, 4, 2) == [slice(0, 0), slice(0, 3)]  # one batch: one shard is empty
    for n, b, w in ((20_751, 32, 2), (20_751, 8, 3), (5, 1, 5), (0, 8, 2)):
        parts = shard_slices(n, b, w)
        assert len(parts) == w and parts[0].start == 0 and parts[-1].stop == n
        assert all(p.stop == q.start for p, q in zip(parts, parts[1:]))  # contiguous, in order, no overlap
        assert all(p.start % b == 0 for p in parts if p.stop > p.start)  # each starts at a batch boundary
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= b
    with pytest.raises(CytologiaInputError):
        shard_slices(4, 0, 2)


@pytest.fixture(scope="module")
def data_with_a_bad_image(yolox_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test set plus an undecodable image of 2 cells (fallback rows must merge too)."""
    data = tmp_path_factory.mktemp("shards") / "data"
    shutil.copytree(yolox_tiny.data, data)
    (data / "images" / "garbage.jpg").write_bytes(b"not an image")
    test = pd.read_csv(data / "test.csv")
    extra = pd.DataFrame({"trustii_id": [9001, 9002], "NAME": ["garbage.jpg", "garbage.jpg"]})
    pd.concat([test.iloc[:3], extra, test.iloc[3:]]).to_csv(data / "test.csv", index=False)
    return data


def _args(data: Path, ensemble: Path, out: Path) -> list[str]:
    return [
        "predict",
        "--data",
        str(data),
        "--ensemble",
        str(ensemble),
        "--out",
        str(out),
        "--boxes-out",
        str(out.with_name(out.stem + "_boxes")),
        "--batch",
        BATCH,
        "--threads",
        "1",
        "--device",
        "cpu",
    ]


def _outputs(out: Path) -> dict[str, bytes]:
    files = [out, out.with_name(out.stem + "_boxes.csv"), out.with_name(out.stem + "_boxes.json")]
    files.append(out.with_name(out.stem + "_image_problems.csv"))
    return {f.name.replace(out.stem, "sub"): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def one_process(yolox_tiny, data_with_a_bad_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("one") / "one.csv"
    assert main(_args(data_with_a_bad_image, yolox_tiny.ensemble_path, out)) == 0
    return _outputs(out)


def test_local_shards_equal_one_process(yolox_tiny, data_with_a_bad_image: Path, one_process, tmp_path: Path, capsys):
    out = tmp_path / "two.csv"
    assert main([*_args(data_with_a_bad_image, yolox_tiny.ensemble_path, out), "--shards", "2"]) == 0
    assert "2 shards (processes)" in capsys.readouterr().out
    assert _outputs(out) == one_process  # submission, per-image CSV and JSON, problem list: the same bytes


def test_torchrun_two_ranks_equal_one_process(yolox_tiny, data_with_a_bad_image: Path, one_process, tmp_path: Path):
    out = tmp_path / "ranks.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cytologia"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, *_args(data_with_a_bad_image, yolox_tiny.ensemble_path, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 shards (torchrun, 2 ranks)" in done.stdout and "rank 1/2: slice sent to rank 0" in done.stdout
    assert _outputs(out) == one_process


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch) -> None:
    from cytologia.runtime.shards import _narrow_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _narrow_gpus(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    _narrow_gpus(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(CytologiaInputError, match="LOCAL_RANK 2: only 2 GPU"):
        _narrow_gpus(2)
