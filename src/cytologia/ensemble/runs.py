"""The ensemble of run folders (``cytologia tune``, the pipeline's ``ensemble`` step): out-of-fold logits in,
tuned ensemble file out. Imports the tuning code (:mod:`.tune`) when it runs, so prediction never imports it.

Each of ``oof`` is a classification run folder (its ``oof_logits.csv``, ``config.yaml``, ``summary.json`` and fold
checkpoints are read) or an OOF logits file. Every experiment becomes one member; with flip TTA logits in the table
(``<exp>+hflip``) those are used unless ``tta="none"``. A multi-label full-image run among them (OOF models
``ml:<exp>``) becomes the multi-label member, blended in on single-cell images. Weights are tuned to maximise the
challenge's F1 part on the out-of-fold logits, with the held-out check (see :mod:`cytologia.ensemble.tune`).
``detector`` adds the detector (a detection run folder or a ``detector.pt``) so that the file is ready for
:func:`cytologia.predict.predict_folder`.

The fold checkpoints put in the ensemble are those that wrote the OOF logits (``oof_checkpoint`` of the run's
``summary.json``; ``best_checkpoint`` for runs from before ``trainer.select``). Which choice that was -- ``last``, or
``best_val``, which peeked at the held-out fold and makes the OOF figures optimistic -- is kept in the ensemble file's
tuning report (``checkpoint_selection``; ``unknown`` for an OOF file without its run folder).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cytologia.errors import CytologiaInputError

if TYPE_CHECKING:
    from cytologia.ensemble import Ensemble

log = logging.getLogger(__name__)

TTA_MODES: tuple[str, ...] = ("auto", "none")  # auto: a member's +hflip logits when the table has them


@dataclass
class TunedEnsemble:
    """What :func:`tune_ensemble` returns: the ensemble (written to ``path``) and the lines ``cytologia tune``
    prints (tuning summary with the held-out check, weights, the file written)."""

    ensemble: Ensemble
    path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def report(self) -> dict[str, Any]:
        """The tuning report kept in the file: scores, held-out check, checkpoint selection."""
        return self.ensemble.tuning


# ------------------------------------------------------------------------------------------------- run folders
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def _classifier_run(oof_path: Path) -> tuple[Path, dict[str, Any], list[Path], list[Path], str]:
    """(OOF file, run config, checkpoints that wrote the OOF logits per fold, ONNX files per fold, trainer.select of
    those checkpoints: ``last``, ``best_val``, several joined by commas, or ``unknown``) of a run folder or an OOF
    file."""
    from cytologia.classification.oof import FILE_NAME

    file = oof_path / FILE_NAME if oof_path.is_dir() else oof_path
    if not file.is_file():
        raise CytologiaInputError(f"{oof_path}: no OOF logits ({FILE_NAME}) there")
    run = file.parent
    config = _read_yaml(run / "config.yaml")
    ckpts: list[Path] = []
    select = "unknown"
    summary = run / "summary.json"
    if summary.is_file():
        folds = json.loads(summary.read_text()).get("folds", [])
        ckpts = [Path(p) for f in folds if (p := f.get("oof_checkpoint") or f.get("best_checkpoint"))]
        # a fold record with a checkpoint but no select was written before trainer.select existed: best_val
        modes = sorted({str(f.get("select", "best_val")) for f in folds if "select" in f or f.get("best_checkpoint")})
        select = ",".join(modes) or select
    if not ckpts:
        ckpts = sorted(run.glob("fold_*/checkpoints/best.ckpt"))
    graphs = []
    for fold_dir in sorted(run.glob("fold_*")):  # one graph per fold: classifier.onnx, or the folder's only .onnx
        found = sorted(fold_dir.glob("*.onnx"))
        named = fold_dir / "classifier.onnx"
        if named.is_file() or len(found) == 1:
            graphs.append(named if named.is_file() else found[0])
        elif found:
            log.warning("%s: %d .onnx files and none named classifier.onnx: none used", fold_dir, len(found))
    ckpts = [p.resolve() for p in ckpts if p.is_file()]  # absolute: the ensemble file resolves relative paths
    if graphs and ckpts and len(graphs) != len(ckpts):
        log.warning(
            "%s: %d checkpoints but %d ONNX files: the onnx runtime uses the ONNX files", run, len(ckpts), len(graphs)
        )
    return file, config, ckpts, graphs, select


def _member_spec(name: str, config: dict[str, Any], ckpts: list[Path], graphs: list[Path], tta: bool) -> Any:
    from cytologia.ensemble import MemberSpec
    from cytologia.oof_names import is_multilabel_model

    c = config.get("classifier", {})
    img_size, arch = c.get("img_size"), c.get("name")
    if img_size is None and ckpts:
        from cytologia.classification.module import load_checkpoint

        hp = load_checkpoint(ckpts[0]).get("hyper_parameters", {})
        img_size, arch = hp.get("img_size"), hp.get("model_name")
    if img_size is None:
        log.warning("member %s: no run config or checkpoint found; img_size 224 written -- check the file", name)
    num = 24 if c.get("background") else 23
    kind = "multilabel" if is_multilabel_model(name) or c.get("multilabel") else "cell"
    return MemberSpec(
        name=name,
        kind=kind,
        arch=arch,
        img_size=int(img_size or 224),
        margin=float(c.get("margin", 16)),
        tta_flip=tta,
        num_labels=num,
        checkpoints=[str(p) for p in ckpts],
        onnx=[str(p) for p in graphs],
        oof_model=name,
    )


def _detector_spec(path: Path, img_size: int | None) -> Any:
    from cytologia.ensemble import DetectorSpec

    if path.is_file():
        onnx = path.with_suffix(".onnx")  # detector.pt -> detector.onnx next to it, when exported there
        ckpts, graphs, config = [path], [onnx] if onnx.is_file() else [], _read_yaml(path.parent / "config.yaml")
    elif path.is_dir():
        ckpts = sorted(path.glob("fold_*/detector.pt"))
        graphs = sorted(path.glob("fold_*/detector.onnx"))
        config = _read_yaml(path / "config.yaml")
    else:
        raise CytologiaInputError(f"{path}: no detector checkpoint or run folder there")
    if not ckpts and not graphs:
        raise CytologiaInputError(f"{path}: no fold_*/detector.pt or detector.onnx found")
    d = config.get("detector", {})
    size = img_size or d.get("img_size")
    if size is None:
        raise CytologiaInputError(f"{path}: no config.yaml with detector.img_size; give --det-img-size")
    keys = ("conf", "nms_iou", "max_det", "tta_flip")
    if ckpts:  # the checkpoint records the backend that wrote it: no default to fall back on
        from cytologia.detection.registry import checkpoint_backend

        backend = checkpoint_backend(ckpts[0])
    elif d.get("backend"):
        backend = str(d["backend"])
    else:
        raise CytologiaInputError(f"{path}: ONNX graphs only and no detector.backend in config.yaml: name the backend")
    return DetectorSpec(
        backend=backend,
        arch=d.get("model"),
        img_size=int(size),
        checkpoints=[str(p) for p in ckpts],
        onnx=[str(p) for p in graphs],
        **{k: d[k] for k in keys if k in d},
    )


def tune_ensemble(
    oof: Sequence[str | Path],
    truth: str | Path,
    out: str | Path,
    *,
    members: Sequence[str] | None = None,
    multilabel: str | None = None,
    tta: str = "auto",
    boxes: str | Path | None = None,
    folds: str | Path | None = None,
    class_bias: bool = False,
    heldout: bool = True,
    detector: str | Path | None = None,
    det_img_size: int | None = None,
    calibrate: bool = True,
    target_error: float = 0.02,
    fixed_weights: Mapping[str, float] | None = None,
) -> TunedEnsemble:
    """Tune the ensemble of the runs ``oof`` (run folders or OOF logits files) against ``truth`` (the train.csv the
    OOF boxes come from) and write it to ``out`` (.json, .yaml).

    ``members``: OOF model names to blend (default: every experiment, its ``+hflip`` logits with ``tta="auto"``);
    ``multilabel``: the OOF model of the full-image multi-label member (default: the one ``ml:`` run, if any);
    ``boxes``: the detected boxes table the crops were cut from, with ``folds`` (``folds.csv``) for the images
    without boxes; ``class_bias``: also tune one logit bias per class; ``heldout``: run the held-out check;
    ``detector``: a detection run folder or a ``detector.pt`` (input size ``det_img_size``, default its run
    config), so that the file is ready to predict with; ``calibrate``: fit the temperatures and the refer-to-expert
    threshold for at most ``target_error`` errors on the boxes kept (:func:`cytologia.calibration.fit_calibration`)
    on the same OOF boxes, reported under ``calibration`` in the tuning report; ``fixed_weights``: experiment name
    -> relative weight of each cell member, kept as given (normalised) -- only the multi-label weight (and biases)
    are tuned (the 1st place's fixed groups)."""
    from cytologia.classification.oof import read_oof
    from cytologia.classification.stage import read_box_table
    from cytologia.data.io import read_annotations
    from cytologia.data.prepare import read_folds
    from cytologia.ensemble import Ensemble, write_ensemble
    from cytologia.ensemble.tune import apply_tuning, fixed_weight_vector, prepare_tuning, summary, tune
    from cytologia.oof_names import flip_model_name, is_flip_model, plain_model_name

    if tta not in TTA_MODES:
        raise CytologiaInputError(f"tta={tta!r} is not one of {', '.join(TTA_MODES)}")
    oof = [Path(p) for p in oof]
    if not oof:
        raise CytologiaInputError("no OOF run given: tuning needs at least one run folder or OOF logits file")
    tables, specs = [], []
    selection: dict[str, str] = {}  # OOF model -> trainer.select of its run
    for given in oof:
        file, config, ckpts, graphs, select = _classifier_run(given)
        table = read_oof(file)
        tables.append(table)
        models = set(table["model"])
        selection.update({m: select for m in models})
        for model in sorted(models):
            base = plain_model_name(model)
            flipped = flip_model_name(base)
            use = flipped if tta == "auto" and flipped in models else base
            if model == use or model == multilabel:
                specs.append(_member_spec(model, config, ckpts, graphs, tta=is_flip_model(model)))
    known = {m for t in tables for m in set(t["model"])}
    if multilabel is not None and multilabel not in known:
        raise CytologiaInputError(f"--multilabel {multilabel}: not in the OOF tables ({', '.join(sorted(known))})")
    if multilabel is None:  # a multi-label run among the OOF tables ("ml:<exp>" models) takes part by itself
        found = [sp.oof_model for sp in specs if sp.kind == "multilabel"]
        if len(found) > 1:
            raise CytologiaInputError(f"several multi-label members ({', '.join(found)}): choose one with --multilabel")
        multilabel = found[0] if found else None
    if members is not None:
        wanted = list(members)
        unknown = [m for m in wanted if m not in known]
        if unknown:
            raise CytologiaInputError(
                f"--members: {', '.join(unknown)} not in the OOF tables ({', '.join(sorted(known))})"
            )
        for m in wanted:
            if m not in {sp.oof_model for sp in specs}:
                src = next(i for i, t in enumerate(tables) if m in set(t["model"]))
                _, config, ckpts, graphs, _ = _classifier_run(oof[src])
                specs.append(_member_spec(m, config, ckpts, graphs, tta=is_flip_model(m)))
    else:
        wanted = [sp.oof_model for sp in specs if sp.kind == "cell"]
    truth_table, _ = read_annotations(Path(truth), lenient=True)
    box_table = read_box_table(Path(boxes), "--boxes") if boxes is not None else None  # box_id = row, as cropped
    fold_table = read_folds(Path(folds)) if folds is not None else None
    data = prepare_tuning(
        tables,
        truth_table,
        wanted,
        multilabel=multilabel,
        boxes=box_table,
        folds=fold_table,
        source=", ".join(map(str, oof)),
    )
    fixed = fixed_weight_vector(data, fixed_weights) if fixed_weights is not None else None
    result = tune(data, class_bias=class_bias, heldout=heldout, fixed=fixed)
    used = [*data.members, *([data.multilabel] if data.multilabel else [])]
    result.report["checkpoint_selection"] = {m: selection.get(m, "unknown") for m in used}
    tuned, blend = apply_tuning(specs, result, data)
    calibration, cal_lines = None, []
    if calibrate:
        from cytologia.calibration import fit_calibration, summary_lines

        names = {m.oof_model or m.name: m.name for m in tuned}
        calibration, result.report["calibration"] = fit_calibration(
            data, result.params, target_error=target_error, member_names=names
        )
        cal_lines = summary_lines(result.report["calibration"])
    det = _detector_spec(Path(detector), det_img_size) if detector is not None else None
    ens = Ensemble(tuned, blend, det, result.report)
    if calibration is not None:
        ens.calibration = calibration
    path = write_ensemble(ens, out)
    lines = [
        summary(result.report),
        "weights: " + ", ".join(f"{m.name} {m.weight:.3f}" for m in tuned if m.kind == "cell"),
    ]
    if blend.multilabel_weight:
        lines.append(f"multi-label weight on single-cell images: {blend.multilabel_weight:.2f}")
    lines += cal_lines
    lines.append(f"wrote {path}" + ("" if det else " (no --detector: add one before cytologia predict)"))
    return TunedEnsemble(ens, path, lines)
