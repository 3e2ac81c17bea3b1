"""Cross-data-set evaluation: train a classifier on one data folder, score it on another, over the classes both share.

:func:`evaluate_cross` combines the two folders into ``out/data`` (:func:`cytologia.data.combine.combine_folders`,
data sets ``train`` and ``test``), makes the test set the held-out fold 0 and the training set fold 1, and trains
fold 0 with the classifier stage itself (:func:`cytologia.classification.stage.train_fold`: the same crops, model,
engine, checkpoints and out-of-fold logits as ``python train.py``; the configuration is ``configs/`` composed with the
given overrides, e.g. ``classifier.name=resnet18 trainer.max_epochs=20``). The test boxes' logits are then scored by
:func:`shared_class_scores`:

- the predicted class is the argmax over the classes the **training** set holds (a model never trained on a class
  has only noise for it);
- only test boxes whose true class is **shared** (in both sets) are scored; a test class the training set lacks
  cannot be predicted and is reported as ``test_only``, never counted as a zero;
- per-class precision, recall and F1 over the shared classes (scikit-learn's, ``labels`` = the shared classes), and
  their macro average. A shared-class box predicted as a training-only class counts as a miss of its class.

Writes ``out/cross_eval.json`` and ``out/per_class.csv`` beside the run's ``fold_0/`` (checkpoints, metrics, OOF
logits) and ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cytologia.data.schema import BOX_COLUMNS, CLASSES
from cytologia.errors import CytologiaInputError
from cytologia.paths import require_new_folder

log = logging.getLogger(__name__)

RESULT_FILE = "cross_eval.json"
PER_CLASS_FILE = "per_class.csv"
LOG_FILE = "evaluate.log"  # the run's log: Lightning's info lines
EXP_NAME = "cross"
TEST_FOLD, TRAIN_FOLD = 0, 1


@dataclass
class CrossResult:
    """Shared-class scores of a model trained on ``train`` and tested on ``test``."""

    train: str
    test: str
    shared_classes: list[str]
    train_only: list[str]  # classes of the training set the test set lacks (predictable, never true)
    test_only: list[str]  # classes of the test set the training set lacks (not scored)
    macro_f1_shared: float
    accuracy_shared: float
    n_scored: int  # test boxes whose class is shared
    n_test: int  # every test box
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> precision, recall, f1, support
    run_dir: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """Human-readable lines: the macro-F1, then one line per shared class."""
        lines = [
            f"trained on {self.train}, tested on {self.test}: macro-F1 over {len(self.shared_classes)} shared "
            f"classes {self.macro_f1_shared:.4f} (accuracy {self.accuracy_shared:.4f}, {self.n_scored} of "
            f"{self.n_test} test boxes scored)",
            f"  not scored: test-only classes {', '.join(self.test_only) or 'none'}; training-only classes "
            f"{', '.join(self.train_only) or 'none'}",
        ]
        for name, s in self.per_class.items():
            lines.append(
                f"  {name:<9} F1 {s['f1']:.4f}  precision {s['precision']:.4f}  recall {s['recall']:.4f}  "
                f"support {int(s['support'])}"
            )
        return "\n".join(lines)


def shared_class_scores(
    truth: Sequence[str], logits: np.ndarray, label_names: Sequence[str], train_classes: Sequence[str]
) -> tuple[dict[str, dict[str, float]], float, float, int]:
    """Per-class scores over the classes of both ``truth`` and ``train_classes``: (per class precision / recall / F1 /
    support, macro-F1, accuracy, boxes scored). The prediction is the argmax of ``logits`` (columns
    ``label_names``) over ``train_classes``; boxes of a class the training set lacks are left out."""
    from sklearn.metrics import precision_recall_fscore_support

    truth = np.asarray(truth, dtype=object)
    columns = [list(label_names).index(c) for c in train_classes]
    if not columns:
        raise CytologiaInputError("the training set has no class to predict")
    pred = np.asarray(train_classes, dtype=object)[np.argmax(np.asarray(logits)[:, columns], axis=1)]
    shared = [c for c in label_names if c in set(train_classes) and c in set(truth.tolist())]
    scored = np.isin(truth, shared)
    if not scored.any():
        raise CytologiaInputError(
            f"the sets share no class (training: {', '.join(train_classes)}; test: {', '.join(sorted(set(truth)))})"
        )
    p, r, f, s = precision_recall_fscore_support(truth[scored], pred[scored], labels=shared, zero_division=0)
    per_class = {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(shared)
    }
    accuracy = float((truth[scored] == pred[scored]).mean())
    return per_class, float(np.mean(f)), accuracy, int(scored.sum())


def _train_quietly(cfg: DictConfig, items: object, out: Path, image_dir: Path, label_names: list[str]) -> None:
    """The classifier stage's fold training, its console as ``train.py``'s: Lightning's info lines and libjpeg's
    warnings go to ``out/evaluate.log`` and ``out/jpeg_warnings.csv`` (one summary line on the console)."""
    from cytologia.classification.stage import train_fold
    from cytologia.console import route_lightning_logs
    from cytologia.data.images import JPEG_WARNINGS_FILE, capture_jpeg_warnings

    root = logging.getLogger()
    handler = logging.FileHandler(out / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        route_lightning_logs()
        with capture_jpeg_warnings(out / JPEG_WARNINGS_FILE, label="cross-data-set"):
            train_fold(cfg, items, TEST_FOLD, out / f"fold_{TEST_FOLD}", image_dir, label_names)  # type: ignore[arg-type]
    finally:
        root.removeHandler(handler)
        handler.close()


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/train.yaml`` of the checkout composed with ``overrides`` (Hydra syntax), validated."""
    from hydra import compose, initialize_config_dir

    from cytologia.config import check_config
    from cytologia.paths import project_root

    root = project_root()
    if root is None:
        raise CytologiaInputError("cross-data-set evaluation composes configs/ of a source checkout: pass cfg instead")
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        return check_config(compose(config_name="train", overrides=list(overrides)))


def evaluate_cross(
    train: str | Path,
    test: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    *,
    cfg: DictConfig | None = None,
    lenient: bool = True,
) -> CrossResult:
    """Train the configured classifier on the data folder ``train`` and score it on ``test`` (see the module
    docstring). ``cfg``: a composed config (default: ``configs/`` with ``overrides``); its data, folds and fold keys
    are set here. ``lenient``: validation of both folders (clip and skip, counted)."""
    from omegaconf import OmegaConf

    from cytologia.classification.oof import logits_of, read_oof
    from cytologia.classification.stage import CropItems
    from cytologia.config import check_config
    from cytologia.data.combine import combine_folders, read_datasets
    from cytologia.data.io import read_annotations
    from cytologia.provenance import write_run_info

    train, test, out = Path(train), Path(test), Path(out)
    require_new_folder(out, "evaluate")
    data = out / "data"
    combine_folders({"train": train, "test": test}, data, lenient=lenient)
    fixed = [f"data.root={data}", "data.synthetic=false", "folds.k=2", f"fold={TEST_FOLD}", f"exp_name={EXP_NAME}"]
    if cfg is None:
        cfg = compose_config([*overrides, *fixed])
    else:
        raw = OmegaConf.to_container(cfg, resolve=True)
        cfg = check_config(OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist(fixed)))
    write_run_info(out, cfg, extra={"stage": "cross-data-set", "train": str(train), "test": str(test)})

    table, _ = read_annotations(data / "train.csv", data / "images")
    dataset = table["NAME"].map(read_datasets(data))
    boxes = table[["NAME", "box_id", *BOX_COLUMNS, "class"]].copy()
    boxes["fold"] = np.where(dataset == "test", TEST_FOLD, TRAIN_FOLD).astype(np.int64)
    label_names = list(CLASSES)
    _train_quietly(cfg, CropItems(boxes), out, data / "images", label_names)

    oof = read_oof(out / f"fold_{TEST_FOLD}" / "oof_logits.csv")
    plain = oof[oof["model"] == EXP_NAME]
    held = boxes[boxes["fold"] == TEST_FOLD].set_index("box_id")["class"]
    truth = held.reindex(plain["box_id"].to_numpy()).to_numpy()
    train_classes = [c for c in label_names if c in set(boxes.loc[boxes["fold"] == TRAIN_FOLD, "class"])]
    per_class, macro, accuracy, n_scored = shared_class_scores(truth, logits_of(plain), label_names, train_classes)
    test_classes = set(held)
    result = CrossResult(
        train=str(train),
        test=str(test),
        shared_classes=list(per_class),
        train_only=[c for c in train_classes if c not in test_classes],
        test_only=[c for c in label_names if c in test_classes and c not in set(train_classes)],
        macro_f1_shared=macro,
        accuracy_shared=accuracy,
        n_scored=n_scored,
        n_test=len(held),
        per_class=per_class,
        run_dir=str(out),
    )
    (out / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    pd.DataFrame.from_dict(per_class, orient="index").rename_axis("class").reset_index().to_csv(
        out / PER_CLASS_FILE, index=False
    )
    log.info("%s", result.summary())
    return result
