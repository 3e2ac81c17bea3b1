"""``cytologia plan +exp=NAME``: what an experiment will cost before it runs -- stages in order, per model its
parameters and GFLOPs per image at its input size, the images it will see, GPU-hours on a named GPU, weights present
or missing, disk for its outputs, and which stages a run folder already holds. Nothing is trained or downloaded.

How each figure is made (the output says it per row):

- **Parameters and GFLOPs**: the model is built on PyTorch's ``meta`` device (shapes only: no memory, no weights
  read) and one forward pass of a 1-image batch at the configured input size is counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (GFLOPs = 2 x multiply-adds; convolutions, matmuls, attention).
  Ultralytics models compute their strides with a real forward when built, so they are built on the CPU (seconds).
- **Images seen**: training samples (per fold: the boxes or images of the other folds, plus background images for
  background members, times the epochs, times the folds), validation passes (the held-out fold once per epoch) and
  prediction passes (out-of-fold boxes, the test set; x 2 with flip TTA). Counts come from the data folder's
  ``train.csv``/``test.csv``, else the real tables (``CYTOLOGIA_REAL_DATA`` / ``shared/data/cytologia``), else the
  synthetic set's size; before cleaning.
- **GPU-hours**: this project has measured no GPU training throughput (its CI has no GPU), so every estimate is from
  FLOPs: training costs ``(1 + 2 f)`` forward passes per sample (backward ~ 2 forwards over the trainable share
  ``f`` of the parameters: 1 for a fully trained model), validation and prediction one; divided by the GPU's peak
  dense fp16/bf16 tensor throughput with fp32 accumulation (mixed precision) times ``utilisation`` (default 0.30,
  a typical share for vision training with data loading; override it once you measured). Where RECIPES.md reports
  the winner's own time for the same stage, it is shown beside the estimate.
- **Disk**: from parameter counts -- classifier fold: ``last.ckpt`` + ``best.ckpt`` with AdamW's two moments
  (24 B/parameter) plus an fp32 ONNX graph (4 B/parameter); detector fold: 16 B/parameter (its checkpoints and
  EMA); plus out-of-fold tables (about 12 B per value).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

# Peak dense fp16/bf16 tensor-core TFLOPS with fp32 accumulation (what mixed-precision training uses), from the
# vendors' data sheets (GeForce cards: the fp32-accumulate rate, half the fp16-accumulate one).
GPUS: dict[str, tuple[str, float]] = {
    "rtx3090": ("NVIDIA GeForce RTX 3090", 35.6),
    "rtx4090": ("NVIDIA GeForce RTX 4090", 165.2),
    "t4": ("NVIDIA T4", 65.0),
    "l4": ("NVIDIA L4", 121.0),
    "a100": ("NVIDIA A100 SXM", 312.0),
    "h100": ("NVIDIA H100 SXM", 989.0),
    "h200": ("NVIDIA H200", 989.0),
}
DEFAULT_GPU = "rtx3090"  # the 1st place's GPU
DEFAULT_UTILISATION = 0.30
CLASSIFIER_BYTES_PER_PARAM = 24 + 4  # two checkpoints with AdamW moments + an fp32 ONNX graph, per fold
DETECTOR_BYTES_PER_PARAM = 16  # per fold: selected checkpoint, last/EMA copies
BYTES_PER_TABLE_VALUE = 12  # a float written in a CSV
# The 1st place's own training times (RECIPES.md, 1st place, Detector table; RTX 3090, 4 folds), by
# (model, input size, epochs): shown beside the FLOPs estimate of a stage with the same settings.
REPORTED_HOURS: dict[tuple[str, int, int], tuple[float, str]] = {
    ("yolox_s", 512, 150): (80.0, "RECIPES.md: ~80 h on an RTX 3090, 4 folds"),
    ("yolox_s", 640, 110): (70.0, "RECIPES.md: ~70 h on an RTX 3090, 4 folds"),
}


@dataclass
class ModelCost:
    """A model at its input size: parameters (total and trainable) and forward GFLOPs per image."""

    arch: str
    img_size: int
    params: int
    trainable: int
    gflops: float


@dataclass
class DataCounts:
    train_images: int
    train_boxes: int
    test_images: int
    test_rows: int
    source: str


@dataclass
class PlanStage:
    """One step of the run, in order."""

    name: str
    kind: str  # data | detector | clean | background | classifier | ensemble | predict | single_stage | report
    model: ModelCost | None = None
    folds: int = 0
    epochs: int = 0
    train_samples: int = 0  # training samples over every fold and epoch
    eval_samples: int = 0  # validation + prediction forward passes
    gpu_hours: float = 0.0
    estimate: str = "CPU step (no GPU)"
    reported: str = ""  # the winner's own time for this stage, where RECIPES.md gives one
    weights: str | None = None
    weights_state: str = ""  # present | missing | unregistered | random | file
    disk_bytes: int = 0
    done: str = "unknown"  # done | partial (i/k folds) | todo | unknown (no run folder given)
    notes: str = ""
    tta_flip: bool = False  # a flip pass at prediction (x 2 forward passes)
    full_image: bool = False  # the model sees whole images (detectors, the multi-label member), not crops


@dataclass
class Plan:
    exp_name: str
    stage: str
    gpu: str
    utilisation: float
    data: DataCounts
    stages: list[PlanStage] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def disk_bytes(self) -> int:
        return sum(s.disk_bytes for s in self.stages)

    @property
    def missing_weights(self) -> list[str]:
        return sorted({str(s.weights) for s in self.stages if s.weights_state in ("missing", "unregistered")})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(gpu_hours=self.gpu_hours, disk_bytes=self.disk_bytes, missing_weights=self.missing_weights)
        return out


# ---------------------------------------------------------------------------------------------- model costs
def _count(model: Any, x: Any) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def _cache_file() -> Path:
    """Where counted model costs are kept between runs: ``$CYTOLOGIA_CACHE/plan_costs.json`` (default
    ``~/.cache/cytologia``). Counting is local work (no download); the key holds torch's and timm's versions."""
    return Path(os.environ.get("CYTOLOGIA_CACHE", str(Path.home() / ".cache" / "cytologia"))) / "plan_costs.json"


def _cached(kind: str, *key: Any) -> Any:
    """Decorator body: the cost of ``key`` from the cache file, else counted by the wrapped function and stored."""

    def wrap(count: Any) -> ModelCost:
        from importlib.metadata import version  # not the packages themselves: importing torch + timm takes seconds

        path = _cache_file()
        full = "|".join(map(str, (kind, *key, version("torch"), version("timm"))))
        try:
            cache = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            cache = {}
        if full in cache:
            return ModelCost(**cache[full])
        cost = count()
        cache[full] = asdict(cost)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0))
            tmp.replace(path)
        except OSError as err:  # a read-only home: counted again next time
            log.debug("plan: cost cache not written (%s)", err)
        return cost

    return wrap


@functools.lru_cache(maxsize=64)
def classifier_cost(name: str, img_size: int, num_classes: int, train_last_k: int | None = None) -> ModelCost:
    """Parameters and forward GFLOPs of classifier ``name`` at ``img_size`` (built on the meta device; kept in the
    cost cache file, :func:`_cache_file`, and per process: a recipe builds the same backbone for several members)."""
    return _cached("classifier", name, img_size, num_classes, train_last_k)(
        lambda: _count_classifier(name, img_size, num_classes, train_last_k)
    )


def _count_classifier(name: str, img_size: int, num_classes: int, train_last_k: int | None) -> ModelCost:
    import torch

    from cytologia.classification.models import create_classifier, freeze_all_but_last

    with torch.device("meta"):
        model = create_classifier(name, num_classes, img_size=img_size)
        params = sum(p.numel() for p in model.parameters())
        trainable = freeze_all_but_last(model, train_last_k) if train_last_k is not None else params
        gflops = _count(model.eval(), torch.empty(1, 3, img_size, img_size))
    return ModelCost(name, img_size, int(params), int(trainable), gflops)


@functools.lru_cache(maxsize=16)
def detector_cost(backend: str, model: str, img_size: int, num_classes: int = 1) -> ModelCost:
    """Parameters and forward GFLOPs of a detector (YOLOX on the meta device; ultralytics on the CPU; cached as
    :func:`classifier_cost`)."""
    return _cached("detector", backend, model, img_size, num_classes)(
        lambda: _count_detector(backend, model, img_size, num_classes)
    )


def _count_detector(backend: str, model: str, img_size: int, num_classes: int) -> ModelCost:
    import torch

    if backend == "yolox":
        from cytologia.detection.yolox.model import build_yolox

        with torch.device("meta"):
            net = build_yolox(model, num_classes).eval()
            gflops = _count(net, torch.empty(1, 3, img_size, img_size))
    elif backend == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel

        net = DetectionModel(f"{model}.yaml", nc=num_classes, verbose=False).eval()
        gflops = _count(net, torch.zeros(1, 3, img_size, img_size))
    else:
        raise CytologiaInputError(f"plan: unknown detector backend {backend!r}")
    params = int(sum(p.numel() for p in net.parameters()))
    return ModelCost(model, img_size, params, params, gflops)


# ---------------------------------------------------------------------------------------------------- data
def data_counts(cfg: DictConfig) -> DataCounts:
    """Images and boxes the run will read: its data folder's tables, else the real ones, else the synthetic size."""
    import pandas as pd

    from cytologia.paths import real_data_dir

    candidates = [Path(cfg.data.root)]
    real = real_data_dir()
    if not cfg.data.synthetic and real is not None:
        candidates.append(real)
    for folder in candidates:
        train, test = folder / "train.csv", folder / "test.csv"
        if train.is_file():
            t = pd.read_csv(train, usecols=["NAME"], dtype=str)
            s = pd.read_csv(test, usecols=["NAME"], dtype=str) if test.is_file() else t.iloc[:0]
            return DataCounts(t["NAME"].nunique(), len(t), s["NAME"].nunique(), len(s), str(folder))
    if cfg.data.synthetic:
        n = int(cfg.data.n_images)
        n_test = int(round(0.3 * n))  # the synthetic set's test share (cytologia synth)
        return DataCounts(n - n_test, n - n_test, n_test, n_test, f"synthetic set of {n} images (not generated yet)")
    raise CytologiaInputError(f"plan: no train.csv in {', '.join(map(str, candidates))}: give data.root=FOLDER")


# ---------------------------------------------------------------------------------------------- the stages
def _hours(flops_g: float, gpu: str, utilisation: float) -> float:
    return flops_g * 1e9 / (GPUS[gpu][1] * 1e12 * utilisation) / 3600.0


def _weights(value: Any, models_dir: str) -> tuple[str | None, str]:
    from cytologia.weights_catalog import CATALOG, RANDOM, weight_status

    if value is None:
        return None, "null (an error at run time)"
    value = str(value)
    if value == RANDOM:
        return value, "random"
    if value in CATALOG:
        return value, weight_status(value, models_dir)["state"]
    path = Path(value) if Path(value).is_file() else Path(models_dir) / value
    return value, "file" if path.is_file() else "missing"


def _folds_done(folder: Path, k: int, marker: str) -> int:
    return sum((folder / f"fold_{i}" / marker).exists() for i in range(k))


def _state(run_dir: Path | None, done_file: str | None, folder: str | None = None, marker: str = "", k: int = 0) -> str:
    if run_dir is None:
        return "unknown"
    if done_file is not None and (run_dir / done_file).exists():
        return "done"
    if folder is not None and k:
        n = _folds_done(run_dir / folder, k, marker)
        if n:
            return f"partial ({n}/{k} folds)"
    return "todo"


def _detector_stage(
    name: str, det: Any, counts: DataCounts, k: int, gpu: str, util: float, models_dir: str
) -> PlanStage:
    cost = detector_cost(str(det["backend"]), str(det["model"]), int(det["img_size"]))
    epochs = int(det["epochs"])
    per_fold = counts.train_images * (k - 1) // k
    train = per_fold * epochs * k
    passes = 2 if det["tta_flip"] else 1
    evals = counts.train_images * epochs + counts.train_images * passes  # per-epoch held-out scoring + OOF boxes
    flops = cost.gflops * (3 * train + evals)
    weights, state = _weights(det["weights"], models_dir)
    stage = PlanStage(
        name,
        "detector",
        cost,
        k,
        epochs,
        train,
        evals,
        _hours(flops, gpu, util),
        f"FLOPs: 3 x {cost.gflops:.1f} GFLOPs x {train:,} training + {evals:,} evaluation images",
        weights=weights,
        weights_state=state,
        disk_bytes=k * DETECTOR_BYTES_PER_PARAM * cost.params
        + counts.train_images * int(det["max_det"]) * passes * 8 * BYTES_PER_TABLE_VALUE,
        tta_flip=bool(det["tta_flip"]),
        full_image=True,
    )
    reported = REPORTED_HOURS.get((cost.arch, cost.img_size, epochs))
    if reported is not None:
        stage.reported = reported[1]
    return stage


def _member_stage(
    sub: DictConfig, counts: DataCounts, n_background: int, k: int, gpu: str, util: float, models_dir: str
) -> PlanStage:
    c, t = sub.classifier, sub.trainer
    n_labels = 24 if c.background else 23
    cost = classifier_cost(str(c.name), int(c.img_size), n_labels, c.train_last_k)
    samples = counts.train_images if c.multilabel else counts.train_boxes
    extra = n_background if c.background else 0
    per_fold = samples * (k - 1) // k + extra * (k - 1) // k
    epochs = int(t.max_epochs)
    train = per_fold * epochs * k
    passes = 2 if sub.ensemble.tta_flip else 1
    evals = samples * epochs + samples * passes  # validation once per epoch on the held-out fold + OOF logits
    share = cost.trainable / max(cost.params, 1)
    flops = cost.gflops * ((1 + 2 * share) * train + evals)
    weights, state = _weights(c.weights, models_dir)
    what = "full images" if c.multilabel else "crops"
    note = f"{what}; batch {t.batch_size}, lr {t.lr:g}" + (
        f"; last {c.train_last_k} blocks trained" if share < 1 else ""
    )
    return PlanStage(
        f"classifier {sub.exp_name}",
        "classifier",
        cost,
        k,
        epochs,
        train,
        evals,
        _hours(flops, gpu, util),
        f"FLOPs: (1 + 2 x {share:.2f}) x {cost.gflops:.1f} GFLOPs x {train:,} training + {evals:,} evaluation",
        weights=weights,
        weights_state=state,
        disk_bytes=k * CLASSIFIER_BYTES_PER_PARAM * cost.params
        + samples * passes * (n_labels + 8) * BYTES_PER_TABLE_VALUE,
        notes=note,
        tta_flip=bool(sub.ensemble.tta_flip),
        full_image=bool(c.multilabel),
    )


def make_plan(
    cfg: DictConfig,
    run_dir: str | Path | None = None,
    gpu: str = DEFAULT_GPU,
    utilisation: float = DEFAULT_UTILISATION,
) -> Plan:
    """The plan of the composed, validated config ``cfg`` (see the module docstring); ``run_dir``: a run folder
    whose finished stages are marked done."""
    from cytologia.pipeline import CROP_BOXES_FILE, member_configs

    if gpu not in GPUS:
        raise CytologiaInputError(f"plan: unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if not 0 < utilisation <= 1:
        raise CytologiaInputError(f"plan: utilisation {utilisation} must be in (0, 1]")
    start = time.perf_counter()
    run = Path(run_dir) if run_dir is not None else None
    counts = data_counts(cfg)
    k = int(cfg.folds.k) if cfg.fold is None else 1
    models_dir = str(cfg.paths.models_dir)
    plan = Plan(str(cfg.exp_name), str(cfg.stage), f"{GPUS[gpu][0]} ({GPUS[gpu][1]:g} TFLOPS)", utilisation, counts)
    add = plan.stages.append
    stage = str(cfg.stage)
    if stage == "detector":
        det = _detector_stage("detector", cfg.detector, counts, k, gpu, utilisation, models_dir)
        det.done = _state(run, "oof_boxes.csv", ".", "metrics.json", k)
        add(det)
    elif stage == "classifier":
        member = _member_stage(cfg, counts, 0, k, gpu, utilisation, models_dir)
        member.done = _state(run, "summary.json", ".", "result.json", k)
        add(member)
    else:
        _pipeline_stages(cfg, plan, run, counts, k, gpu, utilisation, models_dir, member_configs, CROP_BOXES_FILE)
    plan.seconds = round(time.perf_counter() - start, 2)
    return plan


def _pipeline_stages(
    cfg: DictConfig,
    plan: Plan,
    run: Path | None,
    counts: DataCounts,
    k: int,
    gpu: str,
    util: float,
    models_dir: str,
    member_configs: Any,
    crop_boxes_file: str,
) -> None:
    p = cfg.pipeline
    add = plan.stages.append
    add(PlanStage("data", "data", notes=f"validate, folds (k={k}); {counts.train_images:,} train images"))
    if p.two_stage:
        det = _detector_stage("detector", cfg.detector, counts, k, gpu, util, models_dir)
        det.done = _state(run, "detector/oof_boxes.csv", "detector", "metrics.json", k)
        add(det)
        add(PlanStage("clean", "clean", done=_state(run, "clean/train_clean.csv") if p.clean else "skipped"))
        crop = None
        if p.crop_detector is not None:
            spec = {**dict(cfg.detector), **dict(p.crop_detector)}
            spec["train_args"] = {**dict(cfg.detector.train_args), **dict(p.crop_detector.get("train_args", {}))}
            crop = _detector_stage("crop detector", spec, counts, k, gpu, util, models_dir)
            crop.done = _state(run, f"crop_detector/{crop_boxes_file}", "crop_detector", "metrics.json", k)
            crop.notes = "trained on the cleaned boxes; its OOF boxes (known count) are the crops"
            add(crop)
        bg = int(p.n_background)
        add(
            PlanStage(
                "background",
                "background",
                notes=f"{bg:,} cell-free images",
                done=_state(run, "background/background.csv"),
            )
        )
        crops = Path("crop_detector") / crop_boxes_file if crop is not None else None
        for sub in member_configs(cfg, Path(cfg.data.root), Path("background/background.csv"), crops):
            member = _member_stage(sub, counts, bg, k, gpu, util, models_dir)
            member.done = _state(run, f"cls_{sub.exp_name}/summary.json", f"cls_{sub.exp_name}", "result.json", k)
            add(member)
        add(
            PlanStage(
                "ensemble", "ensemble", notes="weights tuned on OOF logits", done=_state(run, "ensemble/ensemble.json")
            )
        )
        add(_predict_stage(plan, counts, k, gpu, util, run))
    ss = p.single_stage
    if ss.enabled:
        cost = detector_cost("ultralytics", str(ss.model), int(ss.img_size), num_classes=23)
        epochs = int(ss.epochs)
        train = counts.train_images * (k - 1) // k * epochs  # one model: every fold but one
        evals = counts.train_images // k * epochs + counts.test_images
        weights, state = _weights(ss.weights, models_dir)
        add(
            PlanStage(
                "single-stage model",
                "single_stage",
                cost,
                1,
                epochs,
                train,
                evals,
                _hours(cost.gflops * (3 * train + evals), gpu, util),
                f"FLOPs: 3 x {cost.gflops:.1f} GFLOPs x {train:,} training + {evals:,} evaluation images"
                + (f"; capped by time_min={ss.time_min:g} min" if not ss.match_budget else "; budget = two-stage time"),
                weights=weights,
                weights_state=state,
                disk_bytes=DETECTOR_BYTES_PER_PARAM * cost.params,
                done=_state(run, "baselines/single_stage/submission.csv"),
            )
        )
    add(PlanStage("report", "report", done=_state(run, "report/index.html")))


def _predict_stage(plan: Plan, counts: DataCounts, k: int, gpu: str, util: float, run: Path | None) -> PlanStage:
    """The test set through every fold model: the detector (per pass) and each member (per crop / image)."""
    flops = 0.0
    parts = []
    for s in plan.stages:
        if s.model is None or s.name == "crop detector":
            continue
        passes = 2 if s.tta_flip else 1
        n = counts.test_images if s.full_image else counts.test_rows
        flops += s.model.gflops * n * k * passes
        parts.append(s.name)
    return PlanStage(
        "predict",
        "predict",
        folds=k,
        eval_samples=counts.test_rows,
        gpu_hours=_hours(flops, gpu, util),
        estimate=f"FLOPs: {k} fold models of {len(parts)} models over {counts.test_images:,} test images",
        done=_state(run, "predict/submission.csv"),
    )


# ------------------------------------------------------------------------------------------------ printing
def table_lines(plan: Plan) -> list[str]:
    """The plan as a markdown table plus totals."""
    gb = 1e9
    lines = [
        f"plan of {plan.exp_name} (stage {plan.stage}); data: {plan.data.train_images:,} train images / "
        f"{plan.data.train_boxes:,} boxes, {plan.data.test_images:,} test images / {plan.data.test_rows:,} rows "
        f"({plan.data.source})",
        f"GPU-hours on {plan.gpu} at {plan.utilisation:.0%} utilisation, from FLOPs (no measured GPU throughput in "
        "this project; see cytologia.plan)",
        "",
        "| # | stage | model @ px | params M | GFLOPs/img | epochs x folds | images seen | GPU-h | weights | disk GB "
        "| done |",
        "|---|---|---|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for i, s in enumerate(plan.stages, 1):
        m = s.model
        model = f"{m.arch} @ {m.img_size}" if m else ""
        params = ""
        if m is not None:
            params = f"{m.params / 1e6:.1f}" + (f" ({m.trainable / 1e6:.1f} trained)" if m.trainable < m.params else "")
        seen = f"{s.train_samples + s.eval_samples:,}" if (s.train_samples or s.eval_samples) else ""
        hours = f"{s.gpu_hours:.1f}" if s.gpu_hours else ("0" if s.kind in ("clean", "background", "ensemble") else "")
        weights = f"{s.weights} ({s.weights_state})" if s.weights else ""
        lines.append(
            f"| {i} | {s.name} | {model} | {params} | {f'{m.gflops:.1f}' if m else ''} | "
            f"{f'{s.epochs} x {s.folds}' if s.epochs else ''} | {seen} | {hours} | {weights} | "
            f"{s.disk_bytes / gb:.1f} | {s.done} |"
        )
    lines.append(f"| | **total** | | | | | | **{plan.gpu_hours:.0f}** | | **{plan.disk_bytes / gb:.0f}** | |")
    lines.append("")
    for s in plan.stages:
        if s.gpu_hours or s.reported:
            extra = f"; winner's own: {s.reported}" if s.reported else ""
            lines.append(f"- {s.name}: {s.estimate}{extra}" + (f" ({s.notes})" if s.notes else ""))
    if plan.missing_weights:
        from cytologia.weights_catalog import pull_command

        lines.append(f"weights missing: {', '.join(plan.missing_weights)} -> {pull_command(plan.missing_weights)}")
    lines.append(f"(planned in {plan.seconds:.1f} s)")
    return lines


def plan_experiment(
    args: Sequence[str],
    run_dir: str | Path | None = None,
    gpu: str = DEFAULT_GPU,
    utilisation: float = DEFAULT_UTILISATION,
) -> Plan:
    """The plan of ``python train.py ARGS`` (``+exp=NAME`` and ``key=value`` overrides, as train.py takes them)."""
    from cytologia.recipes import compose_experiment

    exp = next((a.split("=", 1)[1] for a in args if a.startswith("+exp=")), None)
    overrides = [a for a in args if not a.startswith("+exp=")]
    return make_plan(compose_experiment(exp, overrides), run_dir, gpu, utilisation)


def to_json(plan: Plan) -> str:
    return json.dumps(
        plan.to_dict(), indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)
    )
