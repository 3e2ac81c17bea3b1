"""Per-stage inference time of the whole pipeline, ONNX Runtime vs torch in one run (:func:`bench_pipeline`; its command
is `cytologia bench pipeline`, :mod:`cytologia.commands.bench_pipeline`).

For each runtime the pipeline is built, warmed up on a few images, then run over the images with decoding *not*
overlapped with inference (so that the decode column is the real decode time); batches are ``--batch`` images (1 by
default: per-image latency). Per stage (decode, detect, crop, classify, blend) and in total, the per-image times of
the batches give p50, p95 and the mean in ms/image; images/s is images over the wall time of the run. Peak memory is
the process's peak resident set size during the run (Linux: the peak counter is reset before each runtime through
``/proc/self/clear_refs``; elsewhere it is the process's lifetime peak), plus torch's peak CUDA allocation on a GPU
(ONNX Runtime's CUDA arena is not counted there). The verdict compares the total p50 with the challenge's 500
ms/image budget and with the project's 50 ms/image target.

Compare runtimes on an idle machine: on a CPU shared with other busy processes torch's OpenMP threads spin-wait and
lose far more than ONNX Runtime's (whose sessions here do not spin) -- measured at a load of 4 on 2 cores, torch's
total went from 897 to 159 ms/image with ``OMP_WAIT_POLICY=PASSIVE`` set before start, and to 86 ms with one thread.
The header shows the load average.

``--random-models`` benchmarks a compact pipeline without trained weights (speed does not depend on the weights,
only on the architectures and sizes; NMS work does a little): a random-init detector (``--det``, ``--det-size``)
and classifier(s) (``--cls``, ``--cls-size``) are built and exported into a temporary folder.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytologia.errors import CytologiaInputError
from cytologia.runtime.inference import STAGES, Pipeline, PipelineResult

log = logging.getLogger(__name__)

BUDGET_MS = 500.0  # the challenge's limit per image
TARGET_MS = 50.0  # this project's target: detector + one compact classifier on 2 CPU cores, p50
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# -------------------------------------------------------------------------------------------------- random models
def save_random_classifier(
    name: str, img_size: int, checkpoint: Path, onnx: Path | None, seed: int = 0, background: bool = False
) -> None:
    """A randomly initialised classifier of the 23 classes (+ "background" with ``background``) as a checkpoint of
    the classification stage's format (``hyper_parameters`` + ``state_dict``) and, with ``onnx``, its graph."""
    import torch

    from cytologia.classification.export import export_classifier_onnx
    from cytologia.classification.module import ClassifierModule
    from cytologia.data.schema import labels

    torch.manual_seed(seed)
    module = ClassifierModule(name, list(labels(background)), img_size)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, checkpoint)
    if onnx is not None:
        export_classifier_onnx(module.model, onnx, img_size)


def save_random_detector(arch: str, checkpoint: Path, onnx: Path | None, img_size: int, seed: int = 0) -> str:
    """A randomly initialised single-class detector of architecture ``arch`` (``yolo11n``, ``yolox_nano`` ...: the
    registry finds its backend) as a checkpoint :func:`cytologia.detection.load_detector` reads and, with ``onnx``,
    exported through the detection stage's exporter. Returns the backend name."""
    from cytologia.detection.export import export_detector
    from cytologia.detection.registry import backend_of_model, get_backend

    backend = backend_of_model(arch)
    get_backend(backend).save_random(arch, checkpoint, img_size=img_size, seed=seed)
    if onnx is not None:
        export_detector(checkpoint, onnx, img_size)
    return backend


def build_random_ensemble(
    out_dir: str | Path,
    *,
    detector: str = "yolo11n",
    det_size: int = 320,
    classifiers: list[tuple[str, int]] | None = None,
    folds: int = 1,
    margin: float = 16.0,
    tta_flip: bool = False,
    onnx: bool = True,
    seed: int = 0,
) -> Path:
    """Random-weight models and an ``ensemble.json`` listing them in ``out_dir`` (equal weights); returns the file.

    ``classifiers``: (name, input size) per member (default resnet18 at 128 px); ``folds`` fold models per member.
    """
    from cytologia.ensemble import DetectorSpec, Ensemble, MemberSpec, write_ensemble

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classifiers = classifiers or [("resnet18", 128)]
    det_ckpt, det_onnx = out / "detector.pt", out / "detector.onnx"
    backend = save_random_detector(detector, det_ckpt, det_onnx if onnx else None, det_size, seed)
    members = []
    for i, (name, size) in enumerate(classifiers):
        ckpts, graphs = [], []
        for k in range(folds):
            ckpt, graph = out / f"{name}_{size}_fold{k}.ckpt", out / f"{name}_{size}_fold{k}.onnx"
            save_random_classifier(name, size, ckpt, graph if onnx else None, seed + 100 * i + k)
            ckpts.append(str(ckpt))
            graphs += [str(graph)] if onnx else []
        members.append(
            MemberSpec(
                f"{name}_{size}",
                arch=name,
                img_size=size,
                margin=margin,
                tta_flip=tta_flip,
                checkpoints=ckpts,
                onnx=graphs,
                weight=1.0,
            )
        )
    det = DetectorSpec(
        backend=backend,
        arch=detector,
        img_size=det_size,
        checkpoints=[str(det_ckpt)],
        onnx=[str(det_onnx)] if onnx else [],
        tta_flip=tta_flip,
    )
    return write_ensemble(
        Ensemble(members, detector=det, tuning={"note": "random weights: for timing only"}), out / "ensemble.json"
    )


# ------------------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (since the last reset on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


# -------------------------------------------------------------------------------------------------------- bench
@dataclass
class RuntimeBench:
    """One runtime's numbers: per stage (and ``total``) p50/p95/mean ms per image, throughput, memory, setup."""

    runtime: str
    stages: dict[str, dict[str, float]]
    images_per_s: float
    n_images: int
    n_boxes: int
    wall_s: float
    peak_rss_mb: float
    rss_reset: bool
    cuda_peak_mb: float | None
    info: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def stage_stats(result: PipelineResult) -> dict[str, dict[str, float]]:
    """p50/p95/mean ms per image of every stage and of the total, over the batches of a run."""
    out = {}
    per_batch = {s: np.array([t.seconds.get(s, 0.0) * 1000.0 / t.n_images for t in result.timings]) for s in STAGES}
    per_batch["total"] = sum(per_batch.values())
    for stage, ms in per_batch.items():
        out[stage] = {
            "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p95": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
            "mean": float(ms.mean()) if len(ms) else float("nan"),
        }
    return out


def bench_runtime(
    ensemble: Any,
    runtime: str,
    paths: list[Path],
    counts: pd.Series | None,
    *,
    mode: str = "known-count",
    device: str = "auto",
    threads: int | None = 2,
    batch_size: int = 1,
    warmup: int = 3,
    tta_flip: bool | None = None,
    int8: str = "off",
) -> RuntimeBench:
    """Build the pipeline on ``runtime``, warm it up, and time it over ``paths``."""
    pipe = Pipeline(
        ensemble,
        runtime=runtime,
        device=device,
        threads=threads,
        tta_flip=tta_flip,
        int8=int8,
        batch_size=batch_size,
    )
    if int8 == "measure":
        pipe.calibrate_int8(paths[: max(1, min(8, len(paths)))])
    if warmup:
        pipe.predict(paths[:warmup], counts=counts, mode=mode, prefetch=False)
    cuda = _cuda_reset(runtime, device)
    reset = reset_peak_rss()
    result = pipe.predict(paths, counts=counts, mode=mode, prefetch=False)
    return RuntimeBench(
        runtime=runtime,
        stages=stage_stats(result),
        images_per_s=len(paths) / result.wall_seconds,
        n_images=len(paths),
        n_boxes=len(result.boxes),
        wall_s=result.wall_seconds,
        peak_rss_mb=peak_rss_mb(),
        rss_reset=reset,
        cuda_peak_mb=_cuda_peak(cuda),
        info=pipe.describe(),
    )


def _cuda_reset(runtime: str, device: str) -> bool:
    import torch

    if runtime == "torch" and device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def _cuda_peak(active: bool) -> float | None:
    if not active:
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def verdict(p50_ms: float) -> str:
    budget = "within" if p50_ms <= BUDGET_MS else "OVER"
    target = "meets" if p50_ms <= TARGET_MS else "misses"
    return f"{budget} the {BUDGET_MS:.0f} ms/image budget; {target} the {TARGET_MS:.0f} ms/image target"


def format_table(results: list[RuntimeBench], header: str = "") -> str:
    """The bench table: one block per runtime, one line per stage, then throughput, memory and the verdict."""
    lines = [header] if header else []
    lines.append(f"{'runtime':<12} {'stage':<9} {'p50 ms/img':>11} {'p95 ms/img':>11} {'mean':>9}")
    for r in results:
        for i, stage in enumerate([*STAGES, "total"]):
            s = r.stages[stage]
            label = r.runtime if i == 0 else ""
            lines.append(f"{label:<12} {stage:<9} {s['p50']:>11.2f} {s['p95']:>11.2f} {s['mean']:>9.2f}")
        mem = f"peak RSS {r.peak_rss_mb:.0f} MB" + ("" if r.rss_reset else " (process lifetime)")
        if r.cuda_peak_mb is not None:
            mem += f", CUDA max allocated {r.cuda_peak_mb:.0f} MB"
        lines.append(f"{'':<12} {r.images_per_s:.1f} images/s over {r.n_images} images ({r.n_boxes} boxes); {mem}")
        lines.append(f"{'':<12} verdict: {verdict(r.stages['total']['p50'])}")
        for d in r.info.get("int8_decisions", []):
            lines.append(f"{'':<12} int8 {d['model']}: {'kept' if d['accepted'] else 'not used'} ({d['reason']})")
    by = {r.runtime: r for r in results}
    if "onnx" in by and "torch" in by:
        ratio = by["onnx"].stages["total"]["p50"] / by["torch"].stages["total"]["p50"]
        lines.append(f"ONNX Runtime / torch, total p50: {ratio:.2f} ({1 / ratio:.2f}x speed-up)")
    return "\n".join(lines)


def image_list(data: Path, limit: int | None) -> tuple[list[Path], pd.Series | None]:
    """Images of ``data`` (``test.csv`` + ``images/``, or a folder of images) and their cell counts (None without
    test.csv)."""
    from cytologia.data.io import read_test

    images = data / "images" if (data / "images").is_dir() else data
    if (data / "test.csv").is_file():
        test = read_test(data / "test.csv")
        counts = test.groupby("NAME").size()
        names = list(pd.unique(test["NAME"]))
    else:
        counts = None
        names = sorted(p.name for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise CytologiaInputError(f"{data}: no images (test.csv + images/, or image files)")
    names = names[:limit] if limit else names
    return [images / n for n in names], counts


@dataclass
class PipelineBench:
    """What :func:`bench_pipeline` measured: one :class:`RuntimeBench` per runtime, and the header naming the run."""

    header: str
    mode: str
    results: list[RuntimeBench]

    def table(self) -> str:
        return format_table(self.results, self.header)

    def as_dict(self) -> dict[str, Any]:
        return {"header": self.header, "mode": self.mode, "results": [r.as_dict() for r in self.results]}


def bench_pipeline(
    data: Path,
    ensemble: Path | None = None,
    *,
    random_models: tuple[str, int, list[tuple[str, int]]] | None = None,
    runtimes: Sequence[str] = ("onnx", "torch"),
    device: str = "cpu",
    threads: int = 2,
    images: int | None = 50,
    batch: int = 1,
    warmup: int = 3,
    mode: str | None = None,
    tta_flip: bool | None = None,
    int8: str = "off",
) -> PipelineBench:
    """Time the whole pipeline per stage on the images of ``data`` for each runtime, side by side in one process.

    The models: the ensemble file ``ensemble``, or ``random_models=(detector, det_size, [(classifier, size), ...])``
    built with random weights in a temporary folder (speed does not depend on the weights). ``mode``: known-count
    when ``data`` has ``test.csv``, else open-world."""
    from cytologia.ensemble import read_ensemble

    if threads is not None and threads < 1:
        raise CytologiaInputError(f"threads={threads} must be >= 1")
    if (ensemble is None) == (random_models is None):
        raise CytologiaInputError("give either an ensemble file or random_models, not both or neither")
    paths, counts = image_list(data, images or None)
    mode = mode or ("known-count" if counts is not None else "open-world")
    if mode == "known-count" and counts is None:
        raise CytologiaInputError(f"{data}: known-count mode needs test.csv")
    with tempfile.TemporaryDirectory(prefix="cytologia-bench-") as tmp:
        if random_models is not None:
            det, det_size, classifiers = random_models
            ensemble = build_random_ensemble(tmp, detector=det, det_size=det_size, classifiers=classifiers)
        ens = read_ensemble(ensemble)
        results = [
            bench_runtime(
                ens,
                rt,
                paths,
                counts,
                mode=mode,
                device=device,
                threads=threads,
                batch_size=batch,
                warmup=min(warmup, len(paths)),
                tta_flip=tta_flip,
                int8=int8,
            )
            for rt in runtimes
        ]
    det_spec = ens.detector
    members = ", ".join(f"{m.name}@{m.img_size}" for m in ens.cell_members)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    flip = det_spec.tta_flip if tta_flip is None else tta_flip
    passes = max(len(det_spec.onnx), len(det_spec.checkpoints))
    header = (
        f"pipeline bench: {len(paths)} images of {data}, {mode}, batch {batch}, {threads} thread(s), "
        f"device {device}, {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs visible{load})\n"
        f"detector {det_spec.arch or 'detector'}@{det_spec.img_size} x{passes}"
        f"{' +flip' if flip else ''}; classifiers {members}"
    )
    return PipelineBench(header, mode, results)
