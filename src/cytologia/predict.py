"""Predict a data folder with a tuned ensemble (``cytologia predict``): detect, crop, classify, blend, submit.

The folder holds ``test.csv`` (``trustii_id,NAME``) and ``images/``. Known-count mode (the default) keeps exactly as
many boxes per image as ``test.csv`` lists and makes a submission that is validated before it is written: every
``trustii_id`` exactly once with its image's NAME, a valid class, a box inside its image (a single empty image would
cost the macro-F1 a factor 23/24). Open-world mode thresholds the detections instead; with a ``test.csv`` the
known-count submission is made too. Without ``test.csv`` (open-world only) every image in ``images/`` (or the folder
itself) is predicted. The network work is :class:`cytologia.runtime.inference.Pipeline`'s.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from cytologia.errors import CytologiaInputError

if TYPE_CHECKING:
    from cytologia.ensemble import Ensemble
    from cytologia.runtime.inference import PipelineResult

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MODES: tuple[str, ...] = ("known-count", "open-world")


@dataclass
class Prediction:
    """What :func:`predict_folder` returns: the runtime's result (every box, image sizes, timings, what ran), the
    known-count submission (None without ``test.csv``), the rule's boxes, and the lines ``cytologia predict``
    prints."""

    result: PipelineResult
    mode: str
    submission: pd.DataFrame | None
    lines: list[str] = field(default_factory=list)

    @property
    def boxes(self) -> pd.DataFrame:
        """The classified boxes of the mode's rule, one row per box (NAME, box, class, score, probabilities...)."""
        return self.result.rows(self.mode)


def folder_inputs(data: Path, check_images: bool = True) -> tuple[Path, pd.DataFrame | None, list[str]]:
    """(image folder, ``test.csv`` table or None, image names in order) of a data folder: ``data/images`` when it
    exists (else ``data``), the names of ``test.csv`` when it is there, else every image file. ``check_images``:
    ``test.csv`` 's images must exist and have a readable header (a strict prediction's first check: every bad file
    named at once); off, a missing image is found when it is decoded (and predicted with the fallback rule)."""
    from cytologia.data.io import read_test

    images = data / "images" if (data / "images").is_dir() else data
    if not images.is_dir():
        raise CytologiaInputError(f"{data}: no such folder")
    if (data / "test.csv").is_file():
        test = read_test(data / "test.csv", images, check_images=check_images)
        return images, test, list(pd.unique(test["NAME"]))
    names = sorted(p.name for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise CytologiaInputError(f"{data}: no test.csv and no image files")
    return images, None, names


def prior_class(data: Path) -> str:
    """The fallback rule's class for a data folder: the most frequent valid class of ``data/train.csv`` when it is
    there (ties: the first in class order), else :data:`~cytologia.runtime.inference.FALLBACK_CLASS` (the real
    train set's)."""
    from cytologia.data.io import read_raw_csv
    from cytologia.data.schema import CLASSES
    from cytologia.runtime.inference import FALLBACK_CLASS

    if not (data / "train.csv").is_file():
        return FALLBACK_CLASS
    classes = read_raw_csv(data / "train.csv", ("class",))["class"]
    counts = classes[classes.isin(CLASSES)].value_counts().reindex(list(CLASSES), fill_value=0)
    return str(counts.idxmax()) if counts.max() > 0 else FALLBACK_CLASS


def predict_folder(
    data: str | Path,
    ensemble: str | Path | Ensemble,
    out: str | Path | None = None,
    *,
    mode: str = "known-count",
    runtime: str = "onnx",
    device: str = "auto",
    tta_flip: bool | None = None,
    batch_size: int = 8,
    threads: int | None = None,
    workers: int | None = None,
    int8: str = "off",
    boxes_out: str | Path | None = None,
    report: str | Path | None = None,
    strict: bool = False,
    fallback_class: str | None = None,
    progress: bool | None = False,
    shards: int = 1,
) -> Prediction:
    """Predict every image of the folder ``data`` with ``ensemble`` (an :class:`~cytologia.ensemble.Ensemble` or
    the file :func:`~cytologia.ensemble.read_ensemble` reads) in ``mode`` (``known-count``, which needs
    ``data/test.csv``, or ``open-world``).

    Writes, when given: ``out``, the validated known-count submission (with a ``test.csv``); ``boxes_out``, the
    per-image output of the mode's rule as ``boxes_out.csv`` and ``boxes_out.json``; ``report``, what ran and how
    long it took (JSON). ``runtime`` (``onnx`` | ``torch``), ``device``, ``tta_flip`` (None: as the ensemble file
    says), ``batch_size`` (images per batch), ``threads`` (per session), ``workers`` (decoding threads) and ``int8``
    (``off`` | ``on`` | ``measure``) are :class:`~cytologia.runtime.inference.Pipeline`'s.

    An image that cannot be decoded is predicted with the fallback rule (``fallback_class``, default
    :func:`prior_class`; padded boxes: :meth:`~cytologia.runtime.inference.Pipeline.predict`), counted in the
    printed lines and listed in ``<out>_image_problems.csv``, the report and the per-image output; ``strict``: the
    first such image stops the prediction with an error naming it (and test.csv's missing or unreadable images are
    all named before any model is loaded). ``progress``: a progress bar (None: on a terminal only).

    ``shards`` > 1 predicts in that many local processes, or under ``torchrun`` (``WORLD_SIZE`` > 1) each rank
    predicts its slice: :mod:`cytologia.runtime.shards`; the outputs are written once (by rank 0), the same bytes as
    one process."""
    from cytologia.data.images import capture_jpeg_warnings
    from cytologia.data.io import write_submission
    from cytologia.ensemble import read_ensemble
    from cytologia.runtime.inference import submission_table, write_per_image

    if mode not in MODES:
        raise CytologiaInputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    data = Path(data)
    images, test, names = folder_inputs(data, check_images=strict)
    fallback = prior_class(data) if fallback_class is None else fallback_class
    if mode == "known-count" and test is None:
        raise CytologiaInputError(f"{data / 'test.csv'}: known-count mode needs it (or use --mode open-world)")
    ens = read_ensemble(ensemble) if isinstance(ensemble, (str, Path)) else ensemble
    job = PredictJob(
        ens,
        dict(
            runtime=runtime,
            device=device,
            threads=threads,
            tta_flip=tta_flip,
            int8=int8,
            batch_size=batch_size,
            workers=workers,
        ),
        [images / n for n in names],
        names,
        test.groupby("NAME").size() if test is not None else None,
        dict(mode=mode, strict=strict, fallback_class=fallback, progress=progress),
    )
    rank, world = distributed_rank()
    if world > 1 or shards > 1:
        if int8 == "measure":
            raise CytologiaInputError("--int8 measure decides per process: with shards use --int8 on or off")
    # libjpeg's warnings (truncated, corrupt JPEGs: decoded, damaged) kept off the console, counted and listed
    jpeg_path = _side_path(out, boxes_out, report, data, JPEG_SUFFIX)
    with capture_jpeg_warnings(jpeg_path if rank == 0 else None, label="predict") as jpeg:
        if world > 1 or shards > 1:
            from cytologia.runtime.shards import predict_sharded

            result = predict_sharded(job, shards, rank, world)
            if result is None:  # a torchrun rank other than 0: its slice went to rank 0, which writes the outputs
                return Prediction(job.empty_result(), mode, None, [f"rank {rank}/{world}: slice sent to rank 0"])
            lines: list[str] = [f"{result.info['shards']} shards ({result.info['shard_mode']}), gathered in one table"]
        else:
            result, lines = job.run()
    ms = 1000.0 * result.wall_seconds / max(len(names), 1)
    rate = len(names) / max(result.wall_seconds, 1e-9)
    lines.append(
        f"{len(names)} images in {result.wall_seconds:.1f} s ({ms:.1f} ms/image, {rate:.1f} images/s, {runtime}, "
        f"{mode})"
    )
    if result.problems:
        problems_path = _side_path(out, boxes_out, report, data, PROBLEMS_SUFFIX)
        write_problems(result, problems_path)
        lines.append(problem_summary(result, fallback, problems_path))
    if jpeg.n_messages:
        lines.append(jpeg.summary("predict", jpeg_path))
    table = None
    if test is not None:
        table = submission_table(result.rows("known-count"), test)
        if out is not None:
            write_submission(table, Path(out), test=test, image_sizes=result.sizes)
            lines.append(f"wrote {out}: {len(table)} rows, every trustii_id of {data / 'test.csv'} once")
            from cytologia.calibration import write_calibrated  # per-box calibrated probabilities, refer flags

            lines += write_calibrated(result.rows("known-count"), test, ens.calibration, Path(out))
    if boxes_out is not None:
        rows = result.rows(mode)
        csv_path, json_path = Path(boxes_out).with_suffix(".csv"), Path(boxes_out).with_suffix(".json")
        write_per_image(rows, result.sizes, csv_path, json_path, problems=result.problems, names=result.names)
        lines.append(f"wrote {csv_path} and {json_path}: {len(rows)} boxes over {len(result.names)} images")
    if report is not None:
        report = Path(report)
        report.parent.mkdir(parents=True, exist_ok=True)
        info = {
            **result.info,
            "n_images": len(names),
            "wall_seconds": result.wall_seconds,
            "images_per_second": rate,
            "mode": mode,
            "fallback_class": fallback,
            "n_fallback_images": len(result.problems),
            "image_problems": [p.as_dict() for p in result.problems.values()],
            "jpeg_warnings": {Path(k).name: v for k, v in jpeg.per_image.items()},
        }
        report.write_text(json.dumps(info, indent=1, default=str) + "\n")
    return Prediction(result, mode, table, lines)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of a process started by ``torchrun`` (its ``RANK`` and ``WORLD_SIZE``), else (0, 1)."""
    import os

    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CytologiaInputError("RANK / WORLD_SIZE must be integers (as torchrun sets them)") from None


@dataclass
class PredictJob:
    """One prediction, picklable: what a shard process needs to build the pipeline and predict its slice."""

    ensemble: Ensemble
    pipeline: dict[str, Any]  # Pipeline keyword arguments
    paths: list[Path]
    names: list[str]
    counts: pd.Series | None
    predict: dict[str, Any]  # Pipeline.predict keyword arguments

    def run(self, part: slice = slice(None), progress: bool | None = None) -> tuple[PipelineResult, list[str]]:
        """Build the pipeline and predict the images of ``part``; returns the result and the int8 lines."""
        from cytologia.runtime.inference import Pipeline

        pipe = Pipeline(self.ensemble, **self.pipeline)
        lines = []
        paths, names = self.paths[part], self.names[part]
        if self.pipeline.get("int8") == "measure":
            for d in pipe.calibrate_int8(paths[: min(8, len(paths))]):
                lines.append(f"int8 {d['model']}: {'kept' if d['accepted'] else 'not used'} -- {d['reason']}")
        kwargs = dict(self.predict) if progress is None else {**self.predict, "progress": progress}
        return pipe.predict(paths, names, counts=self.counts, **kwargs), lines

    def empty_result(self) -> PipelineResult:
        from cytologia.runtime.inference import OUTPUT_COLUMNS, PipelineResult

        return PipelineResult(pd.DataFrame(columns=list(OUTPUT_COLUMNS)), {}, [], 0.0)


PROBLEMS_SUFFIX = "_image_problems.csv"  # the list of fallback images, next to the submission
JPEG_SUFFIX = "_jpeg_warnings.csv"  # the images libjpeg warned about (decoded), next to the submission


def _side_path(
    out: str | Path | None, boxes_out: str | Path | None, report: str | Path | None, data: Path, suffix: str
) -> Path:
    """Where a list of images goes: next to the first of the submission, the per-image output and the report that is
    written (``<stem><suffix>``), else in the data folder's parent."""
    for target in (out, boxes_out, report):
        if target is not None:
            target = Path(target)
            return target.with_name(target.stem + suffix)
    return data.parent / ("predictions" + suffix)


def write_problems(result: PipelineResult, path: Path) -> Path:
    """The images predicted with the fallback rule as a CSV: NAME, status (missing | unreadable), message, action."""
    from cytologia.data.io import write_csv

    rows = [p.as_dict() for p in result.problems.values()]
    return write_csv(pd.DataFrame(rows, columns=["NAME", "status", "message", "action"]), path)


def problem_summary(result: PipelineResult, fallback: str, path: Path) -> str:
    """The printed line that counts the images predicted with the fallback rule."""
    statuses = pd.Series([p.status for p in result.problems.values()]).value_counts()
    parts = ", ".join(f"{n} {s}" for s, n in statuses.items())
    return (
        f"{len(result.problems)} of {len(result.names)} image(s) could not be decoded ({parts}): predicted with the "
        f"fallback rule (class {fallback}, padded boxes); listed in {path}"
    )
