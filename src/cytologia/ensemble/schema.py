"""The ensemble file: what :mod:`cytologia.runtime.inference` reads to predict, and what ``cytologia tune`` writes.

It holds the members (architecture, input size, margin, flip TTA, per-fold checkpoints and/or ONNX files, weight),
the blend (rule, class biases, multi-label weight; applied by :mod:`cytologia.ensemble.blend`), the detector
(per-fold checkpoints/ONNX, input size, NMS, flip TTA, weighted box fusion and open-world settings), the calibration
(temperatures, refer-to-expert threshold, OOF class shares: :mod:`cytologia.calibration`) and the tuning report. A
file without ``calibration`` (written before it existed) reads with every temperature 1 and no threshold, and the
log says so. JSON, or YAML for a ``.yaml``/``.yml`` path. Relative paths are relative to the file's folder, so a folder
holding the file and its models can be moved as one. Reading checks keys, types and ranges, and names the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from cytologia.data.schema import CLASSES
from cytologia.errors import CytologiaInputError
from cytologia.oof_names import KINDS

log = logging.getLogger(__name__)

VERSION = 1
N_CLASSES = len(CLASSES)
BLEND_RULES: tuple[str, ...] = ("logit_mean",)
# refer-to-expert scores prediction can compute from the ensemble's probabilities alone (cytologia.calibration)
REJECT_SCORES: tuple[str, ...] = ("confidence", "margin")


@dataclass
class MemberSpec:
    """One classifier of the ensemble; at prediction time its logits are the mean over its fold models (and over the
    plain and mirrored crop with ``tta_flip``)."""

    name: str
    kind: str = "cell"  # "cell": crop of a box plus margin; "multilabel": the full image, per-class sigmoids
    arch: str | None = None  # registry/timm name (informative: checkpoints and ONNX files carry their architecture)
    img_size: int = 224
    margin: float = 16.0  # px around the box (cell members)
    tta_flip: bool = False
    num_labels: int = N_CLASSES  # 23, or 24 with "background" last
    weight: float = 1.0
    checkpoints: list[str] = field(default_factory=list)  # one per fold: the classification stage's best.ckpt
    onnx: list[str] = field(default_factory=list)  # one per fold: exported graphs (input "image", output "logits")
    oof_model: str | None = None  # the OOF ``model`` name its weight was tuned on


@dataclass
class DetectorSpec:
    """The single-class detector: one or more fold models, fused by weighted box fusion when there are several
    passes (folds x flip)."""

    backend: str  # a registry name (cytologia.detection.registry.BACKENDS); written by every tool, never guessed
    arch: str | None = None
    img_size: int = 512
    checkpoints: list[str] = field(default_factory=list)
    onnx: list[str] = field(default_factory=list)
    conf: float = 0.001  # low: the known-count rule keeps the top-N whatever their score
    nms_iou: float = 0.6
    max_det: int = 50
    tta_flip: bool = False
    wbf_iou: float = 0.55
    wbf_skip: float = 0.0
    wbf_conf_type: str = "avg"
    open_world_score: float = 0.25  # open-world mode: score threshold, then class-agnostic NMS at this IoU
    open_world_iou: float = 0.5


@dataclass
class BlendSpec:
    rule: str = "logit_mean"
    class_bias: list[float] | None = None  # one per class (23), added to the blended logits
    multilabel_weight: float = 0.0  # share of the multi-label member on single-cell images


@dataclass
class RejectSpec:
    """Refer a box to an expert when its ``score`` (calibrated ``confidence`` of its class, or ``margin`` between the
    two most probable classes) is below ``threshold``, chosen on out-of-fold boxes for an error rate of at most
    ``target_error`` on the boxes kept."""

    score: str = "confidence"
    threshold: float = 0.0  # 0: nothing referred
    target_error: float = 0.02


@dataclass
class CalibrationSpec:
    """Temperature scaling fitted on out-of-fold logits (:mod:`cytologia.calibration`): ``temperature`` divides the
    ensemble's log-probabilities (for the plain blend: its blended logits), ``member_temperatures`` each member's
    logits; the refer-to-expert rule; ``class_prior``, the class shares of the out-of-fold truth the probabilities
    are calibrated for (differential counts correct for a smear's other mix). ``fitted`` is False for the identity
    (a file from before calibration)."""

    temperature: float = 1.0
    member_temperatures: dict[str, float] = field(default_factory=dict)
    reject: RejectSpec | None = None
    class_prior: list[float] | None = None
    fitted: bool = False


@dataclass
class Ensemble:
    members: list[MemberSpec]
    blend: BlendSpec = field(default_factory=BlendSpec)
    detector: DetectorSpec | None = None
    tuning: dict[str, Any] = field(default_factory=dict)  # the tuning report (held-out gain, ...)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    version: int = VERSION
    base_dir: Path | None = field(default=None, compare=False)  # folder relative paths resolve against (not saved)

    @property
    def cell_members(self) -> list[MemberSpec]:
        return [m for m in self.members if m.kind == "cell"]

    @property
    def multilabel_member(self) -> MemberSpec | None:
        found = [m for m in self.members if m.kind == "multilabel"]
        return found[0] if found else None

    def weights(self) -> np.ndarray:
        """Cell members' weights as a float64 array that sums to 1."""
        w = np.array([m.weight for m in self.cell_members], dtype=np.float64)
        return w / w.sum()

    def resolve(self, path: str) -> Path:
        """A path of the file, absolute (relative paths are relative to the file's folder)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The file's content; paths rewritten relative to ``relative_to`` where they lie below it."""
        out = asdict(self)
        out.pop("base_dir")

        def rel(path: str) -> str:
            absolute = self.resolve(path)
            if relative_to is None:
                return str(path)
            try:
                return os.path.relpath(absolute, relative_to) if absolute.is_relative_to(relative_to) else str(absolute)
            except ValueError:  # another drive on Windows
                return str(absolute)

        for member in out["members"]:
            member["checkpoints"] = [rel(p) for p in member["checkpoints"]]
            member["onnx"] = [rel(p) for p in member["onnx"]]
        if out["detector"] is not None:
            out["detector"]["checkpoints"] = [rel(p) for p in out["detector"]["checkpoints"]]
            out["detector"]["onnx"] = [rel(p) for p in out["detector"]["onnx"]]
        return {"version": out.pop("version"), **out}


def _from_dict(cls: type, data: Any, where: str, source: str) -> Any:
    """A dataclass from a mapping; unknown keys and wrong types are errors naming ``where`` in ``source``."""
    if not isinstance(data, dict):
        raise CytologiaInputError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CytologiaInputError(
            f"{source}: unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(known)}"
        )
    try:
        return cls(**data)
    except TypeError as err:
        raise CytologiaInputError(f"{source}: {where}: {err}") from None


def _check_number(value: Any, key: str, source: str, *, low: float | None = None, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer()) and (low is None or value >= low)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise CytologiaInputError(
            f"{source}: {key}={value!r} must be {what}" + (f" >= {low}" if low is not None else "")
        )


def check_ensemble(ens: Ensemble, source: str = "<ensemble>") -> Ensemble:
    """Check values and relations (kinds, sizes, weights, bias length, one multi-label member at most)."""
    if not ens.members:
        raise CytologiaInputError(f"{source}: the ensemble has no member")
    names = [m.name for m in ens.members]
    if len(set(names)) != len(names):
        raise CytologiaInputError(f"{source}: member names repeat: {names}")
    for i, m in enumerate(ens.members):
        key = f"members[{i}] ({m.name})"
        if m.kind not in KINDS:
            raise CytologiaInputError(f"{source}: {key}.kind={m.kind!r} is not one of {', '.join(KINDS)}")
        _check_number(m.img_size, f"{key}.img_size", source, low=1, integer=True)
        _check_number(m.margin, f"{key}.margin", source, low=0)
        _check_number(m.weight, f"{key}.weight", source, low=0)
        if m.num_labels not in (N_CLASSES, N_CLASSES + 1):
            raise CytologiaInputError(
                f"{source}: {key}.num_labels={m.num_labels} must be {N_CLASSES} or {N_CLASSES + 1}"
            )
        for what in ("checkpoints", "onnx"):
            value = getattr(m, what)
            if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
                raise CytologiaInputError(f"{source}: {key}.{what} must be a list of paths")
    if len([m for m in ens.members if m.kind == "multilabel"]) > 1:
        raise CytologiaInputError(f"{source}: at most one multilabel member is supported")
    cells = ens.cell_members
    if not cells:
        raise CytologiaInputError(f"{source}: the ensemble needs at least one cell member (kind: cell)")
    if sum(m.weight for m in cells) <= 0:
        raise CytologiaInputError(f"{source}: the cell members' weights sum to 0")
    b = ens.blend
    if b.rule not in BLEND_RULES:
        raise CytologiaInputError(f"{source}: blend.rule={b.rule!r} is not one of {', '.join(BLEND_RULES)}")
    if b.class_bias is not None and (
        len(b.class_bias) != N_CLASSES
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b.class_bias)
    ):
        raise CytologiaInputError(f"{source}: blend.class_bias must hold {N_CLASSES} finite numbers (or be null)")
    if not (isinstance(b.multilabel_weight, (int, float)) and 0.0 <= b.multilabel_weight <= 1.0):
        raise CytologiaInputError(f"{source}: blend.multilabel_weight={b.multilabel_weight!r} must be in [0, 1]")
    d = ens.detector
    if d is not None:
        from cytologia.detection.base import MAX_STRIDE
        from cytologia.detection.registry import BACKENDS

        if d.backend not in BACKENDS:
            raise CytologiaInputError(
                f"{source}: detector.backend={d.backend!r} is not a registered backend ({', '.join(BACKENDS)})"
            )
    if d is not None:
        _check_number(d.img_size, "detector.img_size", source, low=MAX_STRIDE, integer=True)
        if d.img_size % MAX_STRIDE:
            raise CytologiaInputError(f"{source}: detector.img_size={d.img_size} must be a multiple of {MAX_STRIDE}")
        _check_number(d.max_det, "detector.max_det", source, low=1, integer=True)
        for key in ("conf", "nms_iou", "wbf_iou", "wbf_skip", "open_world_score", "open_world_iou"):
            value = getattr(d, key)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise CytologiaInputError(f"{source}: detector.{key}={value!r} must be in [0, 1]")
        if d.wbf_conf_type not in ("avg", "max"):
            raise CytologiaInputError(f"{source}: detector.wbf_conf_type={d.wbf_conf_type!r} must be avg or max")
    _check_calibration(ens, source)
    return ens


def _check_calibration(ens: Ensemble, source: str) -> None:
    c = ens.calibration
    temps = {"calibration.temperature": c.temperature}
    if not isinstance(c.member_temperatures, dict):
        raise CytologiaInputError(f"{source}: calibration.member_temperatures must be a mapping member -> temperature")
    temps.update({f"calibration.member_temperatures[{k}]": v for k, v in c.member_temperatures.items()})
    for key, value in temps.items():
        _check_number(value, key, source)
        if value <= 0:
            raise CytologiaInputError(f"{source}: {key}={value!r} must be > 0")
    unknown = sorted(set(c.member_temperatures) - {m.name for m in ens.members})
    if unknown:
        raise CytologiaInputError(f"{source}: calibration.member_temperatures names no member: {', '.join(unknown)}")
    r = c.reject
    if r is not None:
        if r.score not in REJECT_SCORES:
            raise CytologiaInputError(
                f"{source}: calibration.reject.score={r.score!r} is not one of {', '.join(REJECT_SCORES)}"
            )
        for key in ("threshold", "target_error"):
            value = getattr(r, key)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise CytologiaInputError(f"{source}: calibration.reject.{key}={value!r} must be in [0, 1]")
    p = c.class_prior
    if p is not None and (
        len(p) != N_CLASSES
        or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in p)
        or abs(sum(p) - 1.0) > 1e-3
    ):
        raise CytologiaInputError(
            f"{source}: calibration.class_prior must hold {N_CLASSES} positive numbers summing to 1 (or be null)"
        )


def ensemble_from_dict(data: Any, source: str = "<ensemble>", base_dir: Path | None = None) -> Ensemble:
    """An :class:`Ensemble` from the file's content (see :meth:`Ensemble.to_dict`), checked."""
    if not isinstance(data, dict):
        raise CytologiaInputError(f"{source}: expected a mapping at the top level")
    data = dict(data)
    version = data.pop("version", VERSION)
    if version != VERSION:
        raise CytologiaInputError(f"{source}: ensemble file version {version!r}; this cytologia reads {VERSION}")
    unknown = sorted(set(data) - {"members", "blend", "detector", "tuning", "calibration"})
    if unknown:
        raise CytologiaInputError(f"{source}: unknown top-level key(s) {', '.join(unknown)}")
    members_raw = data.get("members")
    if not isinstance(members_raw, list):
        raise CytologiaInputError(f"{source}: members must be a list")
    members = [_from_dict(MemberSpec, m, f"members[{i}]", source) for i, m in enumerate(members_raw)]
    blend = _from_dict(BlendSpec, data.get("blend") or {}, "blend", source)
    det_raw = data.get("detector")
    detector = None if det_raw is None else _from_dict(DetectorSpec, det_raw, "detector", source)
    tuning = data.get("tuning") or {}
    cal_raw = data.get("calibration")
    if cal_raw is None:
        log.info("%s: no calibration (a file from before it): temperatures 1, nobody referred to an expert", source)
        calibration = CalibrationSpec()
    else:
        cal_raw = dict(cal_raw) if isinstance(cal_raw, dict) else cal_raw
        reject_raw = cal_raw.pop("reject", None) if isinstance(cal_raw, dict) else None
        calibration = _from_dict(CalibrationSpec, cal_raw, "calibration", source)
        if reject_raw is not None:
            calibration.reject = _from_dict(RejectSpec, reject_raw, "calibration.reject", source)
    ens = Ensemble(
        members=members,
        blend=blend,
        detector=detector,
        tuning=dict(tuning),
        calibration=calibration,
        base_dir=base_dir,
    )
    return check_ensemble(ens, source)


def read_ensemble(path: str | Path) -> Ensemble:
    """Read and check an ensemble file (``.json``, ``.yaml``/``.yml``), or an inference bundle folder
    (:func:`cytologia.ensemble.bundle.read_bundle`: its checksums verified first)."""
    path = Path(path)
    if path.is_dir():
        from cytologia.ensemble.bundle import read_bundle

        return read_bundle(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such ensemble file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (json.JSONDecodeError, ValueError) as err:
        raise CytologiaInputError(f"{path}: not a readable ensemble file: {err}") from None
    return ensemble_from_dict(data, str(path), base_dir=path.resolve().parent)


def write_ensemble(ens: Ensemble, path: str | Path) -> Path:
    """Check and write the ensemble file atomically; paths below its folder are written relative to it."""
    path = Path(path)
    check_ensemble(ens, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ens.to_dict(relative_to=path.resolve().parent)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=1) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
