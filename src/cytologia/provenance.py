"""What every run writes next to its outputs: the resolved config, the git SHA and the environment
(detectron2 / dinov2 habit), so a result can be traced back to the code and settings that made it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_FILE = "config.yaml"  # the resolved config in a run folder (write_run_info)

# Packages whose versions change results; recorded when installed.
TRACKED_PACKAGES: tuple[str, ...] = (
    "cytologia",
    "torch",
    "torchvision",
    "lightning",
    "timm",
    "ultralytics",
    "albumentations",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "numpy",
    "pandas",
    "opencv-python-headless",
    "scikit-learn",
    "iterative-stratification",
    "hydra-core",
    "omegaconf",
)


def git_state(repo: Path | None = None) -> dict[str, object]:
    """SHA, branch and whether the work tree has uncommitted changes; ``sha=None`` outside a git checkout."""
    cwd = str(repo or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"sha": None, "branch": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "branch": git("rev-parse", "--abbrev-ref", "HEAD"), "dirty": bool(status)}


def environment() -> dict[str, object]:
    """Python, platform, package versions and the accelerator (without initialising CUDA when torch is absent)."""
    packages: dict[str, str] = {}
    for name in TRACKED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    env: dict[str, object] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
        "offline_env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "YOLO_OFFLINE", "NO_ALBUMENTATIONS_UPDATE")},
    }
    if "torch" in sys.modules or "torch" in packages:
        import torch

        env["cuda"] = {
            "available": torch.cuda.is_available(),
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        }
    return env


def write_run_info(run_dir: Path, cfg: DictConfig | None = None, extra: dict[str, object] | None = None) -> Path:
    """Write ``config.yaml`` (resolved) and ``provenance.json`` into ``run_dir``; returns the provenance path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "cwd": os.getcwd(),
        "git": git_state(),
        "environment": environment(),
        **(extra or {}),
    }
    path = run_dir / "provenance.json"
    path.write_text(json.dumps(info, indent=1, default=str) + "\n")
    return path
