"""Multi-process training through the engine: DDP with 2 CPU processes on the gloo backend.

The engine's ``ddp`` strategy re-runs the launching script once per extra process, so the run goes through a small
script file (as ``python train.py ... trainer.strategy=ddp`` would), not through an in-process call.
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

SCRIPT = """
import sys
from hydra import compose, initialize_config_dir
from cytologia.train import train

configs, data, run = sys.argv[1:4]
with initialize_config_dir(config_dir=configs, version_base="1.3"):
    cfg = compose(config_name="train", overrides=[
        "+exp=smoke", f"data.root={data}", "data.synthetic=false", "classifier.name=test_convnext",
        "classifier.img_size=32", "folds.k=2", "fold=0", "trainer.batch_size=4", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.ddp_backend=gloo",
        "ensemble.tta_flip=false",
    ])
train(cfg, run_dir=run)
"""


def test_ddp_two_cpu_processes_gloo(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, 40, seed=0, config=SynthConfig(size=96))
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    out = subprocess.run(  # the engine picks a free port for the process group
        [sys.executable, str(script), str(CONFIGS), str(data), str(run)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]

    result = json.loads((run / "fold_0" / "result.json").read_text())
    # Each process trains on its half of the training crops: ceil(n / 2) crops in full batches of 4.
    per_rank = -(-result["n_train"] // 2)
    assert result["global_step"] == per_rank // 4 and result["epochs"] == 1
    # Rank 0 alone writes the OOF logits: every held-out box exactly once.
    folds = pd.read_csv(data / "folds.csv")
    truth = pd.read_csv(data / "train.csv").reset_index(names="box_id").merge(folds, on="NAME")
    oof = read_oof(run / "fold_0" / "oof_logits.csv")
    assert sorted(oof["box_id"]) == sorted(truth.loc[truth["fold"] == 0, "box_id"])
    # Validation ran sharded (and padded) over both processes; gathered and de-duplicated, it scores the whole fold
    # exactly as the single-process pass over the best checkpoint does.
    assert result["best_val_macro_f1"] == pytest.approx(result["oof_macro_f1"], abs=1e-6)  # logged as float32
    assert json.loads((run / "summary.json").read_text())["folds_trained"] == [0]
