"""The measurements of `cytologia bench synth` (:mod:`cytologia.commands.bench_synth`): generation speed, per core
and with several worker processes.

Measures :func:`~cytologia.data.synthetic.generate.generate` end to end (render, JPEG encode, defects, file writes,
tables) into a temporary folder: once in one process with OpenCV held to one thread, then with ``workers``
processes. Images/s *per core* divides by the CPU time the process used (``time.process_time``), so it holds on a
machine shared with other jobs; the wall-clock rates are reported beside it, with the load average, to show how busy
the machine was.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from cytologia.data.schema import CLASSES
from cytologia.data.synthetic.generate import SynthConfig, cpu_count, generate
from cytologia.data.synthetic.render import encode_jpeg, render_scene
from cytologia.data.synthetic.sources import SOURCES

TARGET_PER_CORE = 100.0  # images/s per core at 368 px (issue #3)


def render_only_per_s(n: int, size: int, seed: int = 0) -> float:
    """Images per CPU-second of render_scene + encode_jpeg alone (one thread, no files), single-cell images."""
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        rng = np.random.default_rng(seed)
        render_scene(rng, SOURCES[0], ["PNN"], size)  # warm caches (illumination, stain matrices)
        c0 = time.process_time()
        for i in range(n):
            src = SOURCES[i % len(SOURCES)]
            encode_jpeg(render_scene(rng, src, [CLASSES[i % len(CLASSES)]], size).image, src)
        return n / max(time.process_time() - c0, 1e-9)
    finally:
        cv2.setNumThreads(prev)


def bench_synth(
    n_images: int = 300, size: int = 368, workers: int = 0, seed: int = 0, tmp_dir: Path | None = None
) -> dict[str, object]:
    """Run the measurements; returns the JSON-able result."""
    workers = cpu_count() if workers <= 0 else workers
    cfg = SynthConfig(size=size)
    with tempfile.TemporaryDirectory(prefix="cytologia_bench_synth_", dir=tmp_dir) as tmp:
        generate(Path(tmp) / "warm", min(n_images, 20), seed, cfg)  # imports, caches
        c0 = time.process_time()
        single = generate(Path(tmp) / "run", n_images, seed, cfg, workers=1)
        cpu = time.process_time() - c0
    per_core = n_images / max(cpu, 1e-9)
    out: dict[str, object] = {
        "bench": "synth",
        "images": n_images,
        "size": size,
        "per_core_images_per_s": round(per_core, 1),
        "single_process_wall_images_per_s": round(single.images_per_s, 1),
        "render_encode_per_core_images_per_s": round(render_only_per_s(min(n_images, 200), size, seed), 1),
        "target_per_core": TARGET_PER_CORE,
        "meets_target": per_core >= TARGET_PER_CORE,
        "cpus": cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "machine": platform.processor() or platform.machine(),
        "dir": str(tmp_dir or tempfile.gettempdir()),
    }
    if workers > 1:
        with tempfile.TemporaryDirectory(prefix="cytologia_bench_synth_", dir=tmp_dir) as tmp:
            par = generate(tmp, n_images, seed, cfg, workers=workers)
        out.update(workers=workers, parallel_images_per_s=round(par.images_per_s, 1))
    return out
