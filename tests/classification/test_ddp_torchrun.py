"""Multi-process classifier training launched from outside, as on a cluster: ``torchrun --nproc_per_node 2`` over 2
CPU processes (gloo). Each process runs the whole command (Lightning sees the torchrun environment and starts no
process itself); the folds exist before the launch, as docs/multi_gpu.md asks. Slow (two interpreters importing
torch and Lightning: minutes on the shared 2-core VM): ``pytest -m slow tests/classification/test_ddp_torchrun.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from cytologia.classification.oof import read_oof
from cytologia.data.synthetic.generate import SynthConfig, generate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OVERRIDES = [
    "+exp=smoke",
    "data.synthetic=false",
    "classifier.name=test_convnext",
    "classifier.img_size=32",
    "folds.k=2",
    "fold=0",
    "trainer.batch_size=4",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.strategy=ddp",
    "trainer.ddp_backend=gloo",
    "ensemble.tta_flip=false",
]

SCRIPT = """
import json, sys
from hydra import compose, initialize_config_dir
from cytologia.train import train

configs, data, run, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with initialize_config_dir(config_dir=configs, version_base="1.3"):
    cfg = compose(config_name="train", overrides=[*overrides, f"data.root={data}"])
train(cfg, run_dir=run)
"""


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from cytologia.data.prepare import ensure_folds, read_train

    data = tmp_path / "data"
    generate(data, 40, seed=0, config=SynthConfig(size=96))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*OVERRIDES, f"data.root={data}"])
    ensure_folds(cfg, read_train(cfg, data), data)  # before the launch: the ranks only read it
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    cmd += [str(CONFIGS), str(data), str(run), json.dumps(OVERRIDES)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-4000:]

    result = json.loads((run / "fold_0" / "result.json").read_text())
    per_rank = -(-result["n_train"] // 2)  # each process its half of the training crops, full batches of 4
    assert result["global_step"] == per_rank // 4 and result["epochs"] == 1
    folds = pd.read_csv(data / "folds.csv")
    truth = pd.read_csv(data / "train.csv").reset_index(names="box_id").merge(folds, on="NAME")
    oof = read_oof(run / "fold_0" / "oof_logits.csv")  # rank 0 alone wrote it: every held-out box once
    assert sorted(oof["box_id"]) == sorted(truth.loc[truth["fold"] == 0, "box_id"])
