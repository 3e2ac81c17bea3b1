"""Importing cytologia sets the offline environment (users never have to) and respects values already exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cytologia.offline import OFFLINE_ENV

SNIPPET = "import json, os, cytologia; print(json.dumps({k: os.environ.get(k) for k in %r}))"


def _env_after_import(env: dict[str, str]) -> dict[str, str | None]:
    keys = [*OFFLINE_ENV, "YOLO_CONFIG_DIR"]
    out = subprocess.run([sys.executable, "-c", SNIPPET % keys], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_import_sets_offline_variables(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and k != "YOLO_CONFIG_DIR"}
    env["CYTOLOGIA_CACHE"] = str(tmp_path)
    seen = _env_after_import(env)
    assert all(seen[k] == v for k, v in OFFLINE_ENV.items())
    assert seen["YOLO_CONFIG_DIR"] == str(tmp_path / "ultralytics")


def test_user_values_are_respected() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="0", YOLO_CONFIG_DIR="/somewhere")
    seen = _env_after_import(env)
    assert seen["HF_HUB_OFFLINE"] == "0" and seen["YOLO_CONFIG_DIR"] == "/somewhere"


def test_import_makes_idle_threads_sleep_unless_the_user_chose() -> None:
    """OMP_WAIT_POLICY=PASSIVE (see cytologia.offline.THREADING_ENV): spinning threads slowed a loaded machine
    several-fold and made process CPU time, the single-stage budget, count the waiting."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    snippet = "import os, cytologia; print(os.environ.get('OMP_WAIT_POLICY'))"
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "ACTIVE"
