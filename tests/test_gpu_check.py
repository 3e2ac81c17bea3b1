"""scripts/gpu_check.py keeps working without a GPU: ``--cpu`` runs every section at toy sizes and writes the JSON and
the markdown table; the budget guard skips what does not fit; an isolated section comes back from its own process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up while the class is made
_spec.loader.exec_module(gpu_check)  # stdlib imports only at module level: cheap

# What --cpu must skip, each with its reason; everything else must run and give numbers.
CPU_SKIPS = {("gpu_tests", "needs CUDA"), ("ddp", "needs CUDA"), ("pipeline_tensorrt", "needs CUDA")}


def _run(tmp_path: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--work", str(tmp_path / "work"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    payload = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else {}
    return proc, payload


def test_cpu_run_writes_every_section(tmp_path: Path) -> None:
    # a generous guard: on a loaded CI machine the sections take longer, and the point here is that each one runs
    proc, payload = _run(tmp_path, "--budget-s", "900")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = payload["rows"]
    assert {r["section"] for r in rows} == set(gpu_check.SECTIONS)
    bad = [(r["section"], r["check"], r["note"]) for r in rows if r["status"] not in ("ok", "skipped")]
    assert not bad, bad
    skipped = {(r["section"], r["note"].split(";")[0]) for r in rows if r["status"] == "skipped"}
    assert skipped == CPU_SKIPS
    ok = [r for r in rows if r["status"] == "ok"]
    train = [r for r in ok if r["section"].startswith("train_")]
    assert len(train) == 4 and all(r["data"]["images_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in train)
    # the configs are what the rows are built from: the experiment's batch and size, replaced only by --cpu's
    assert all("--cpu" in r["note"] for r in train)
    (ddp,) = [r for r in ok if r["section"] == "ddp"]
    ranks = ddp["data"]["ranks"]
    assert len(ranks) == 2 and all(r["allreduce_ok"] and r["weights_in_sync"] for r in ranks)
    pipeline = [r for r in ok if r["section"].startswith("pipeline_")]
    assert [r["check"] for r in pipeline] == ["torch eager fp32", "torch bf16 autocast", "ONNX Runtime CPU fp32"]
    for r in pipeline:
        assert r["data"]["b1_ms_p50"] > 0 and r["data"]["batch_images_per_s"] > 0 and r["data"]["boxes"] > 0
    # the markdown table: one line per JSON row, in the same order, statuses included
    table = [line for line in (tmp_path / "out" / "gpu_check.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| section | check | status")
    body = table[2:]
    assert len(body) == len(rows)
    assert [line.split(" | ")[2] for line in body] == [r["status"] for r in rows]


def test_budget_guard_skips_what_does_not_fit(tmp_path: Path) -> None:
    proc, payload = _run(tmp_path, "--budget-s", "0.5", "--only", "env,train_yolox_s", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = payload["rows"]
    assert [(r["section"], r["status"]) for r in rows] == [("env", "skipped"), ("train_yolox_s", "skipped")]
    assert all(r["note"].startswith("budget:") for r in rows)


def test_isolated_section_and_unknown_section(tmp_path: Path) -> None:
    proc, payload = _run(tmp_path, "--isolate", "--only", "env", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = payload["rows"]
    assert row["status"] == "ok" and row["data"]["torch"] and row["data"]["cuda_available"] in (True, False)
    proc, _ = _run(tmp_path, "--only", "nope", timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


def test_a_failing_section_is_recorded_and_the_rest_runs(tmp_path: Path, monkeypatch) -> None:
    def boom(ctx: object) -> list:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fine(ctx: object) -> list:
        return [gpu_check.Row("fine", "fine", "ok", "1.0 images/s")]

    monkeypatch.setattr(gpu_check, "SECTIONS", {"boom": boom, "fine": fine})
    monkeypatch.setattr(gpu_check, "ESTIMATES", {"boom": (0, 0), "fine": (0, 0)})
    out = tmp_path / "out"
    assert gpu_check.main(["--cpu", "--out", str(out), "--work", str(tmp_path / "work")]) == 1
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert [(r["section"], r["status"]) for r in rows] == [("boom", "error"), ("fine", "ok")]
    assert "illegal memory access" in rows[0]["note"] and "boom" in rows[0]["data"]["traceback"]
    assert "| boom | boom | error |" in (out / "gpu_check.md").read_text()


def test_a_missing_provider_costs_no_budget() -> None:
    from cytologia.runtime.sessions import TENSORRT, available_providers

    assert gpu_check.section_estimate("pipeline_torch", cpu=False) == gpu_check.ESTIMATES["pipeline_torch"][0]
    if TENSORRT not in available_providers():  # the CI machine: the TensorRT row is a skip with its reason
        assert gpu_check.section_estimate("pipeline_tensorrt", cpu=False) == 0.0
