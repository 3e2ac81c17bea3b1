"""The whole two-stage pipeline as one run (``python train.py +exp=demo``), each step resumable from its files.

Steps, in order (one folder each under the run folder; a step whose output exists is skipped, so a killed run
resumes where it stopped -- rerun with ``hydra.run.dir=<run folder>``):

1. ``data``       the data folder (generated when synthetic and absent), validated table, shared folds
2. ``detector``   single-class detector per fold -> out-of-fold boxes  (cytologia.detection.stage)
3. ``clean``      noisy-box cleaning from the OOF boxes -> ``clean/train_clean.csv`` + report
4. ``background`` cell-free images painted from training images, with the fold of their source image
5. ``cls_<name>`` each classifier of ``pipeline.classifiers`` on the cleaned boxes -> OOF logits
6. ``ensemble``   weights tuned on the OOF logits, held-out check -> ``ensemble/ensemble.json`` (``cytologia tune``)
7. ``predict``    the test set, known-count mode -> ``predict/submission.csv`` (``cytologia predict``), with the
                  calibrated probabilities and refer-to-expert flags per box (``submission_calibrated.csv``)
   ``count``      differential counts per smear of the test set -> ``counts/`` (``cytologia count``; generated sets)
8. ``baselines``  the null model and the single-stage 23-class YOLO (the 3rd place's approach), same data
9. ``report``     scores side by side, per-class F1, confusion matrix, F1 per source, error gallery, stage times,
                  reliability diagram, risk-coverage curve, per-smear counts

Steps 3-8 call the library functions behind the commands a user runs by hand, with the same files: ``clean``
:func:`cytologia.detection.cleaning.clean_folder` (``cytologia clean``), ``ensemble``
:func:`cytologia.ensemble.runs.tune_ensemble` (``cytologia tune``), ``predict`` :func:`cytologia.predict.predict_folder`
(``cytologia predict``), the baselines :func:`cytologia.baseline.null_baseline` (``cytologia baseline``) and
:func:`cytologia.single_stage.run_single_stage` (``cytologia single-stage``), and print what the commands print. This
module is orchestration only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from cytologia.clock import CLOCKS, cpu_seconds
from cytologia.data.prepare import FOLDS_FILE, FOLDS_REPORT, ensure_data, ensure_folds, read_train
from cytologia.errors import CytologiaInputError
from cytologia.paths import project_root

if TYPE_CHECKING:
    from cytologia.single_stage import SingleStageSettings

log = logging.getLogger(__name__)

TIMES_FILE = "stage_times.json"  # wall seconds per step
CPU_TIMES_FILE = "stage_cpu_seconds.json"  # process CPU seconds per step (what a busy machine does not change)
SUMMARY_FILE = "pipeline_summary.json"  # scores, times and settings of the run, for scripts (scripts/check_demo.py)
CROP_BOXES_FILE = "crop_boxes.csv"  # the crop detector's known-count OOF boxes, cropped by the classifiers


def _print(lines: list[str]) -> None:
    """A step's summary, as its command prints it."""
    print("\n".join(lines))


def _with(cfg: DictConfig, **overrides: object) -> DictConfig:
    """A copy of ``cfg`` with dotted-key overrides (the stage functions take a whole config)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in overrides.items():
        OmegaConf.update(out, key, value, merge=True)
    return out


class _Steps:
    """Runs named steps once, records their wall time in ``stage_times.json`` and their process CPU time in
    ``stage_cpu_seconds.json`` (both kept across resumed runs)."""

    def __init__(self, run_dir: Path, n_steps: int) -> None:
        self.run_dir = run_dir
        self.n = n_steps
        self.i = 0
        path, cpu_path = run_dir / TIMES_FILE, run_dir / CPU_TIMES_FILE
        self.times: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        self.cpu: dict[str, float] = json.loads(cpu_path.read_text()) if cpu_path.is_file() else {}

    def __call__(self, name: str, done: Path | None, fn: Callable[[], object]) -> None:
        self.i += 1
        if done is not None and done.exists():
            log.info("[%d/%d] %s: %s exists, skipped (resumed run)", self.i, self.n, name, done)
            return
        log.info("[%d/%d] %s ...", self.i, self.n, name)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        fn()
        self.times[name] = round(time.perf_counter() - start, 2)
        self.cpu[name] = round(cpu_seconds() - cpu_start, 2)
        (self.run_dir / TIMES_FILE).write_text(json.dumps(self.times, indent=1) + "\n")
        (self.run_dir / CPU_TIMES_FILE).write_text(json.dumps(self.cpu, indent=1) + "\n")
        log.info("[%d/%d] %s done in %.1f s", self.i, self.n, name, self.times[name])


class _QuietSteps:
    """A step runner whose steps keep libjpeg's warnings off the console: each step that decoded damaged JPEGs logs
    one line, the list of images written next to its outputs (``jpeg_warnings.csv`` in the folder of its ``done``
    file; ``jpeg_warnings_<step>.csv`` in the run folder for a step without one). Everything else is the wrapped
    runner's (its ``times``, ...)."""

    def __init__(self, steps: Callable[[str, Path | None, Callable[[], object]], None], run_dir: Path) -> None:
        self.steps = steps
        self.run_dir = run_dir

    def __getattr__(self, name: str) -> object:
        return getattr(self.steps, name)

    def __call__(self, name: str, done: Path | None, fn: Callable[[], object]) -> None:
        from cytologia.data.images import JPEG_WARNINGS_FILE, capture_jpeg_warnings

        if done is not None:
            report = done.parent / JPEG_WARNINGS_FILE
        else:
            slug = "".join(c if c.isalnum() else "_" for c in name)
            report = self.run_dir / f"{Path(JPEG_WARNINGS_FILE).stem}_{slug}.csv"

        def quiet() -> object:
            with capture_jpeg_warnings(report, label=name):
                return fn()

        self.steps(name, done, quiet)


def _clean_data_folder(root: Path, clean_dir: Path, out: Path) -> None:
    """A data folder whose train.csv is the cleaned table; images, folds and the rest are links to ``root``'s."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clean_dir / "train_clean.csv", out / "train.csv")
    for name in ("images", FOLDS_FILE, FOLDS_REPORT, "test.csv", "sources.csv"):
        src, dst = root / name, out / name
        if src.exists() and not dst.exists():
            dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def _cleaned_or_original(root: Path, clean_dir: Path, out: Path, min_kept: float) -> Path:
    """The data folder the classifiers train on: the cleaned one, unless cleaning kept less than ``min_kept`` of the
    boxes -- then the detector is too weak to tell noise from cells (a short CPU run), and removing most of the data
    would hurt far more than the noise: the original boxes are used and a warning says so."""
    counts = json.loads((clean_dir / "cleaning_summary.json").read_text())["counts"]
    kept = counts["boxes_kept"] / max(1, counts["boxes"])
    if kept < min_kept:
        log.warning(
            "cleaning would keep %.0f %% of the boxes (%d of %d; %d detections confirmed anything): the detector is "
            "too weak to clean with, so the classifiers train on the original boxes (pipeline.clean_min_kept=%.2f)",
            100 * kept,
            counts["boxes_kept"],
            counts["boxes"],
            counts.get("detections", -1),
            min_kept,
        )
        return root
    _clean_data_folder(root, clean_dir, out)
    return out


def member_configs(cfg: DictConfig, cls_root: Path, bg_table: Path, crop_boxes: Path | None) -> list[DictConfig]:
    """The validated config of each ``pipeline.classifiers`` member: the run's config with the member's ``classifier``
    keys (its ``trainer:`` dict, and ``tta_flip``: ``ensemble.tta_flip``, whether it writes flip-TTA logits) applied,
    ``exp_name`` = its ``exp`` (default its ``name``), trained on
    ``cls_root``; a ``background`` member gets ``bg_table``; with ``crop_boxes`` (the crop detector's boxes), cell
    members that set no ``boxes`` of their own crop those. A misspelt key is an error naming it."""
    from cytologia.config import check_config

    out, seen = [], set()
    for i, spec in enumerate(cfg.pipeline.classifiers):
        entry = dict(OmegaConf.to_container(spec, resolve=True))
        if "name" not in entry:
            raise CytologiaInputError(f"config key pipeline.classifiers[{i}] has no name")
        exp = str(entry.pop("exp", entry["name"]))
        if exp in seen:
            raise CytologiaInputError(f"pipeline.classifiers[{i}]: member name {exp!r} used twice (set `exp:`)")
        seen.add(exp)
        trainer = entry.pop("trainer", None) or {}
        tta = entry.pop("tta_flip", None)
        overrides = {f"classifier.{k}": v for k, v in entry.items()}
        overrides.update({f"trainer.{k}": v for k, v in dict(trainer).items()})
        if tta is not None:
            overrides["ensemble.tta_flip"] = bool(tta)
        if entry.get("background", False):
            overrides["classifier.background_table"] = str(bg_table)
        if crop_boxes is not None and not entry.get("multilabel", False) and entry.get("boxes") is None:
            overrides["classifier.boxes"] = str(crop_boxes)
        # exp_name names the member's OOF logits (the ensemble tells members apart by it)
        sub = _with(cfg, **{"data.root": str(cls_root), "stage": "classifier", "fold": None, "exp_name": exp})
        for key, value in overrides.items():
            if OmegaConf.select(sub, key, default="<absent>") == "<absent>":
                raise CytologiaInputError(f"config key pipeline.classifiers[{i}] ({exp}): unknown key {key}")
            OmegaConf.update(sub, key, value, merge=True)
        out.append(check_config(sub))
    return out


def _two_stage(cfg: DictConfig, run_dir: Path, root: Path, steps: Any, sub_path: Path) -> None:
    """Steps detector -> clean -> (crop detector) -> background -> classifiers -> ensemble -> predict."""
    p = cfg.pipeline
    det_dir = run_dir / "detector"
    steps("detector", det_dir / "oof_boxes.csv", lambda: _detector(cfg, det_dir))
    clean_dir = run_dir / "clean"
    if p.clean:
        settings = cleaning_config_path(p.cleaning_config) if p.cleaning_config else None  # None: built-in defaults
        oof_boxes = det_dir / "oof_boxes.csv"
        steps("clean", clean_dir / "train_clean.csv", lambda: _clean(root, oof_boxes, clean_dir, settings))
        cls_root = _cleaned_or_original(root, clean_dir, run_dir / "data_clean", float(p.clean_min_kept))
    else:
        steps("clean", None, lambda: None)
        cls_root = root
    crop_boxes = None
    if p.crop_detector is not None:
        crop_dir = run_dir / "crop_detector"
        crop_boxes = crop_dir / CROP_BOXES_FILE
        crop_cfg = _with(
            cfg, **{f"detector.{k}": v for k, v in p.crop_detector.items()}, **{"data.root": str(cls_root)}
        )
        steps("crop detector", crop_boxes, lambda: _crop_detector(crop_cfg, cls_root, crop_dir))
    bg_dir = run_dir / "background"
    applied = cls_root != root  # cleaning kept enough boxes to be used (else its flags are a weak detector's)
    steps("background", bg_dir / "background.csv", lambda: _background(cfg, root, clean_dir, bg_dir, applied))

    members = []
    for sub in member_configs(cfg, cls_root, bg_dir / "background.csv", crop_boxes):
        out = run_dir / f"cls_{sub.exp_name}"
        members.append(out)
        steps(f"classifier {sub.exp_name}", out / "summary.json", lambda sub=sub, out=out: _classifier(sub, out))

    ens = run_dir / "ensemble" / "ensemble.json"
    folds = cls_root / FOLDS_FILE
    fixed = OmegaConf.to_container(p.member_weights) if p.member_weights is not None else None
    steps("ensemble", ens, lambda: _tune(members, cls_root / "train.csv", det_dir, ens, crop_boxes, folds, fixed))
    report_path = run_dir / "predict" / "predict_report.json"
    steps("predict", sub_path, lambda: _predict(root, ens, sub_path, str(p.runtime), report_path))
    if p.distill or p.pseudo_label:  # docs/distillation.md
        _student_steps(cfg, run_dir, root, cls_root, det_dir, ens, steps)
    counts = run_dir / "counts"
    steps("count", counts / "counts.json", lambda: _count(root, ens, sub_path, counts))


def run(cfg: DictConfig, run_dir: Path) -> dict[str, object]:
    """Run every step of the pipeline into ``run_dir``; returns the scores and the time per step."""
    p = cfg.pipeline
    if p.two_stage and not p.classifiers:
        raise CytologiaInputError("config key pipeline.classifiers is empty: the pipeline needs at least one")
    if not p.two_stage and not p.single_stage.enabled:
        raise CytologiaInputError("pipeline.two_stage=false needs pipeline.single_stage.enabled=true: nothing to train")
    from cytologia.recipes import check_weights

    check_weights(cfg)  # every named weight file present and verified, before any data work
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    n_steps = 3 + int(p.single_stage.enabled)
    if p.two_stage:
        n_steps += 7 + len(p.classifiers) + int(p.crop_detector is not None)
    n_steps += 2 * (int(p.distill) + int(p.pseudo_label)) * int(p.two_stage)  # each: the step + its predict
    steps = _QuietSteps(_Steps(run_dir, n_steps), run_dir)
    root = Path(cfg.data.root)
    state: dict[str, object] = {}

    def data() -> None:
        ensure_data(cfg)
        state["table"] = read_train(cfg, root)
        ensure_folds(cfg, state["table"], root)

    steps("data", None, data)
    sub_path = run_dir / "predict" / "submission.csv"
    if p.two_stage:
        _two_stage(cfg, run_dir, root, steps, sub_path)
    null_path = run_dir / "baselines" / "null_submission.csv"
    steps("null baseline", null_path, lambda: _null_baseline(root, null_path))
    ss = p.single_stage
    ss_dir = run_dir / "baselines" / "single_stage"
    if ss.enabled:
        clock = resolve_clock(str(ss.clock), str(cfg.detector.device))
        budget_min = single_stage_budget(
            steps.cpu if clock == "cpu" else steps.times, float(ss.time_min), bool(ss.match_budget)
        )
        record = OmegaConf.to_container(ss, resolve=True)
        steps(
            "single-stage baseline",
            ss_dir / "submission.csv",
            lambda: _single_stage(
                root,
                ss_dir,
                single_stage_settings(record, budget_min, clock, cfg.paths.models_dir),
                int(cfg.folds.k),
            ),
        )

    truth = root / "test_labels.csv"
    subs = {"two-stage": sub_path, "single-stage": ss_dir / "submission.csv", "null": null_path}
    scores = _scores(truth, {**subs, **_student_submissions(run_dir)})
    if not p.two_stage:  # the single-stage model is the run's submission: the report shows it
        sub_path = ss_dir / "submission.csv"
    report_dir = run_dir / "report"
    steps("report", None, lambda: _report(cfg, run_dir, root, truth, sub_path, scores, report_dir))
    summary = {
        "scores": scores,
        "stage_times_s": steps.times,
        "stage_cpu_seconds": steps.cpu,
        "single_stage": _single_stage_metrics(ss_dir),
        "exp_name": str(cfg.exp_name),
        "seed": int(cfg.seed),
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    line = "  ".join(f"{k} {v['score']:.4f}" for k, v in scores.items())
    total = sum(steps.times.values())
    print(f"pipeline done in {total / 60:.1f} min (sum of stage times): score {line}; report: {report_dir}/index.html")
    return {"scores": scores, "stage_times": steps.times, "report": str(report_dir)}


def cleaning_config_path(value: str) -> Path:
    """The cleaning settings file ``pipeline.cleaning_config`` names: as given (absolute, or relative to the directory
    you run from, like every path of the configuration), else relative to the project's root, so that
    ``configs/cleaning/short_cpu.yaml`` also works from another directory."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    root = project_root()
    in_project = root / path if root is not None and not path.is_absolute() else None
    if in_project is not None and in_project.is_file():
        return in_project
    if in_project is not None:
        tried = f" and {in_project}"
    elif path.is_absolute():
        tried = ""
    else:
        tried = "; cytologia is installed, not run from a checkout, so there is no configs/ folder to look in"
    key = f"config key pipeline.cleaning_config={value!r}"
    raise CytologiaInputError(f"{key}: no such file (tried {path.resolve()}{tried})")


def resolve_clock(clock: str, device: str = "auto") -> str:
    """``pipeline.single_stage.clock``: ``wall``, ``cpu``, or ``auto`` = ``cpu`` when the two-stage models train on
    the CPU (``device``, the detector's setting, resolved by :func:`cytologia.device.resolve_device`: process CPU
    time is the compute spent, whatever else runs on the cores) and ``wall`` on a GPU (GPU work is not CPU time)."""
    if clock == "auto":
        from cytologia.device import resolve_device

        return "cpu" if resolve_device(device, key="detector.device").type == "cpu" else "wall"
    if clock not in CLOCKS:
        raise CytologiaInputError(f"config key pipeline.single_stage.clock={clock!r}; valid: auto, {', '.join(CLOCKS)}")
    return clock


def _single_stage_metrics(ss_dir: Path) -> dict[str, object]:
    """Budget, epochs and CPU time of the single-stage baseline's run (empty when it did not run)."""
    path = ss_dir / "metrics.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("budget", "epochs_run", "best_epoch", "train_cpu_seconds", "times_s")}


def single_stage_budget(times: dict[str, float], time_min: float, match: bool) -> float:
    """Training minutes of the single-stage baseline: ``time_min``, or with ``match`` the time this run spent
    training the two-stage models (the ``detector`` and ``classifier *`` steps of ``times``: wall or CPU seconds,
    whichever clock the budget counts) -- the same budget for both approaches. Without recorded training times,
    ``time_min`` (with a warning)."""
    if not match:
        return time_min
    trained = {k: v for k, v in times.items() if k == "detector" or k.startswith("classifier ")}
    if sum(trained.values()) <= 0:
        log.warning("no two-stage training times in %s: single-stage budget time_min=%s", TIMES_FILE, time_min)
        return time_min
    budget = round(sum(trained.values()) / 60.0, 3)
    log.info(
        "single-stage budget %.2f min = the two-stage training time of this run (%s)",
        budget,
        " + ".join(f"{k} {v:.0f} s" for k, v in trained.items()),
    )
    return budget


def single_stage_settings(
    record: Mapping[str, Any], time_min: float, clock: str, models_dir: str | Path | None = None
) -> SingleStageSettings:
    """The settings of the single-stage baseline from the config group ``pipeline.single_stage`` (``record``, field
    by name: :func:`cytologia.single_stage.settings_from_config`) with this run's budget ``time_min``, in minutes of
    ``clock`` (the resolved clock: :func:`single_stage_budget`, :func:`resolve_clock`), ``workers=0`` (images load in
    this process, so the CPU-time budget counts them) and its ``weights`` (``random``, a catalog name, a file) as
    the verified file in ``models_dir`` (None: random init)."""
    from cytologia.single_stage import settings_from_config
    from cytologia.weights_catalog import resolve_weights

    path = resolve_weights(record.get("weights"), models_dir, key="pipeline.single_stage.weights")
    weights = str(path) if path is not None else None
    return settings_from_config(record, time_min=time_min, clock=clock, workers=0, weights=weights)


def _clean(root: Path, boxes: Path, out: Path, settings: Path | None) -> None:
    from cytologia.detection.cleaning import CleaningConfig, clean_folder

    _print(clean_folder(root, boxes, out, CleaningConfig.from_yaml(settings) if settings is not None else None).lines)


def _tune(
    members: list[Path],
    truth: Path,
    detector: Path,
    out: Path,
    boxes: Path | None = None,
    folds: Path | None = None,
    fixed_weights: dict[str, float] | None = None,
) -> None:
    from cytologia.ensemble.runs import tune_ensemble

    kwargs: dict[str, Any] = {"boxes": boxes, "folds": folds} if boxes is not None else {}
    if fixed_weights is not None:
        kwargs["fixed_weights"] = fixed_weights
    _print(tune_ensemble(members, truth, out, detector=detector, **kwargs).lines)


def _crop_detector(cfg: DictConfig, root: Path, out: Path) -> None:
    """The crop detector (``pipeline.crop_detector``) on ``root`` (the cleaned data folder), then its out-of-fold
    boxes cut to the known count per image -- each image's number of training boxes, padded when too few found --
    as one boxes table (model ``crop:<model>``) that the crop classifiers train on (``classifier.boxes``)."""
    import numpy as np

    from cytologia.data.prepare import read_folds
    from cytologia.detection.fusion import known_count
    from cytologia.detection.oof import read_boxes, write_boxes
    from cytologia.oof_names import is_flip_model

    _detector(cfg, out)
    table = read_train(cfg, root)
    raw = read_boxes(out / "oof_boxes.csv")
    raw = raw[[not is_flip_model(str(m)) for m in raw["model"]]]  # the plain pass: one model's boxes
    sizes = table.drop_duplicates("NAME").set_index("NAME")[["img_w", "img_h"]]
    kept = known_count(raw, table.groupby("NAME").size(), sizes.reset_index(), source=str(out / "oof_boxes.csv"))
    fold_of = read_folds(root / FOLDS_FILE).set_index("NAME")["fold"]
    kept["model"] = f"crop:{cfg.detector.model}_{cfg.detector.img_size}"
    kept["fold"] = kept["NAME"].map(fold_of).astype(np.int64)
    write_boxes(kept, out / CROP_BOXES_FILE)


def _predict(root: Path, ensemble: Path, out: Path, runtime: str, report: Path) -> None:
    from cytologia.predict import predict_folder

    _print(predict_folder(root, ensemble, out, runtime=runtime, report=report).lines)


def _count(root: Path, ensemble: Path, submission: Path, out: Path) -> None:
    """Differential counts per smear of the predicted test set (``cytologia count``): a generated set's smears
    (``smears.csv``, drawn when absent), known truth beside them; a folder without smears is skipped."""
    from cytologia.calibration import calibrated_path
    from cytologia.counts import count_cells
    from cytologia.data.synthetic.smears import SMEARS_FILE, ensure_smears

    cells = calibrated_path(submission)
    if not (root / SMEARS_FILE).is_file() and (root / "synth.json").is_file():
        ensure_smears(root)
    if not (root / SMEARS_FILE).is_file() or not cells.is_file():
        log.info("count: no %s or no %s: no differential counts", root / SMEARS_FILE, cells)
        return
    truth = root / "test_labels.csv"
    done = count_cells(
        cells, out, smears=root / SMEARS_FILE, ensemble=ensemble, truth=truth if truth.is_file() else None
    )
    _print(done.lines)


def _null_baseline(root: Path, out: Path) -> None:
    from cytologia.baseline import null_baseline, summary_line

    _print([summary_line(null_baseline(root, out), out)])


def _single_stage(root: Path, out: Path, settings: SingleStageSettings, folds_k: int) -> None:
    from cytologia.single_stage import run_single_stage, summary_lines

    _print(summary_lines(run_single_stage(root, out, settings, folds_k=folds_k), out))


def _detector(cfg: DictConfig, out: Path) -> None:
    from cytologia.detection.stage import run as run_detector
    from cytologia.provenance import write_run_info

    sub = _with(cfg, stage="detector", fold=None)
    write_run_info(out, sub, extra={"stage": "detector", "pipeline_step": True})  # as a stand-alone run would
    run_detector(sub, out)


def _classifier(cfg: DictConfig, out: Path) -> None:
    from cytologia.classification.stage import run as run_classifier
    from cytologia.console import route_lightning_logs
    from cytologia.provenance import write_run_info

    route_lightning_logs()  # importing Lightning (just now, in a pipeline) gave it a console handler of its own
    write_run_info(out, cfg, extra={"stage": "classifier", "pipeline_step": True})
    run_classifier(cfg, out)


def _background(cfg: DictConfig, root: Path, clean_dir: Path, out: Path, cleaning_applied: bool = True) -> None:
    """Cell-free images from training images the cleaning did not flag (a missed cell would stay in the picture).
    When the cleaning was not applied (its detector too weak, see :func:`_cleaned_or_original`), its flags are not
    used either: they would exclude nearly every image."""
    import pandas as pd

    from cytologia.data.prepare import read_folds
    from cytologia.detection.background import make_background_set

    n = int(cfg.pipeline.n_background)
    if n <= 0:
        out.mkdir(parents=True, exist_ok=True)
        return
    exclude: list[str] = []
    report = clean_dir / "cleaning_report.csv"
    if report.is_file() and cleaning_applied:
        flagged = pd.read_csv(report, dtype={"NAME": str}, keep_default_na=False)
        if "flag" in flagged.columns:
            exclude = sorted(set(flagged.loc[flagged["flag"].astype(str) != "", "NAME"]))
    table = read_train(cfg, root)
    make_background_set(
        table,
        root / "images",
        read_folds(root / FOLDS_FILE),
        out,
        n,
        seed=int(cfg.seed),
        exclude=exclude,
        max_cells=1,
        workers=max(1, min(4, os.cpu_count() or 1)),
    )


def _scores(truth: Path, preds: dict[str, Path]) -> dict[str, dict[str, float]]:
    """``name -> {score, giou, f1}`` of every submission that exists, scored against ``truth``."""
    from cytologia.metrics import read_predictions, read_truth, score

    if not truth.is_file():
        log.warning("%s absent (not a synthetic set): no scores", truth)
        return {}
    t = read_truth(truth)
    out = {}
    for name, path in preds.items():
        if Path(path).is_file():
            r = score(t, read_predictions(path))
            out[name] = {"score": r.score, "giou": r.giou, "f1": r.f1}
    return out


def _report(
    cfg: DictConfig, run_dir: Path, root: Path, truth: Path, pred: Path, scores: dict[str, dict[str, float]], out: Path
) -> None:
    from cytologia.report import write_report

    if not truth.is_file():
        return

    def present(path: Path) -> Path | None:
        return path if path.is_file() else None

    write_report(
        out,
        truth,
        pred,
        sources=present(root / "sources.csv"),
        image_dir=root / "images",
        folds=present(root / FOLDS_FILE),
        train=present(root / "train.csv"),
        cleaning_report=present(run_dir / "clean" / "cleaning_report.csv"),
        stage_times=json.loads((run_dir / TIMES_FILE).read_text()),
        config=cfg,
        extra_scores=scores,
        name="two-stage",
        **_lab_inputs(run_dir, pred),
    )


def _lab_inputs(run_dir: Path, pred: Path) -> dict[str, Any]:
    """The report's calibration (the tuned ensemble's), per-box calibrated output and counts, where they exist."""
    from cytologia.calibration import calibrated_path

    ens, cells, counts = run_dir / "ensemble" / "ensemble.json", calibrated_path(pred), run_dir / "counts"
    calibration = json.loads(ens.read_text()).get("tuning", {}).get("calibration") if ens.is_file() else None
    return {
        "calibration": calibration,
        "calibrated": cells if calibration is not None and cells.is_file() else None,
        "counts": counts if (counts / "counts.json").is_file() else None,
    }


def _student_steps(
    cfg: DictConfig, run_dir: Path, root: Path, cls_root: Path, det_dir: Path, ens: Path, steps: Any
) -> None:
    """After the ensemble: ``distill`` (``pipeline.distill``) -> ``distill/student.json`` (one student + the detector,
    :func:`cytologia.classification.distill.distill`) and its test prediction ``distill/predict/submission.csv``;
    ``pseudo-label`` (``pipeline.pseudo_label``) -> ``pseudo_label/round_<r>/`` (leak-aware rounds,
    :func:`cytologia.classification.pseudo.pseudo_label`) and the last round's ``pseudo_label/predict/submission.csv``.
    Both train on the classifiers' data folder ``cls_root``."""
    p, runtime = cfg.pipeline, str(cfg.pipeline.runtime)
    if p.distill:
        from cytologia.classification.distill import distill

        out = run_dir / "distill"
        sub_cfg = _with(cfg, **{"data.root": str(cls_root)})
        steps("distill", out / "student.json", lambda: _print(distill(sub_cfg, ens, out, runtime=runtime).lines))
        sub, report = out / "predict" / "submission.csv", out / "predict" / "predict_report.json"
        steps("predict student", sub, lambda: _predict(root, out / "student.json", sub, runtime, report))
    if p.pseudo_label:
        from cytologia.classification.pseudo import pseudo_label, settings_from_config

        out = run_dir / "pseudo_label"
        settings = settings_from_config(cfg, runtime=runtime)
        last = out / f"round_{settings.rounds}" / "ensemble.json"
        boxes = det_dir / "oof_boxes.csv"
        steps("pseudo-label", last, lambda: _print(pseudo_label(ens, cls_root, out, settings, detections=boxes).lines))
        sub, report = out / "predict" / "submission.csv", out / "predict" / "predict_report.json"
        steps("predict pseudo-labelled", sub, lambda: _predict(root, last, sub, runtime, report))


def _student_submissions(run_dir: Path) -> dict[str, Path]:
    """The test submissions of the student and of the pseudo-labelled ensemble (scored when they exist)."""
    return {
        "student": run_dir / "distill" / "predict" / "submission.csv",
        "pseudo-labelled": run_dir / "pseudo_label" / "predict" / "submission.csv",
    }
