"""Distillation and leak-aware pseudo-labels: the loss by hand, teacher targets that are out-of-fold (never from a
model that trained on the image), pseudo-labels that never reach their own fold's validation, the threshold rule,
and a student trained through the stage's fold trainer that exports to ONNX with parity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cytologia.classification.datamodule import CropSource
from cytologia.classification.distill import (
    TEACHER_COLUMNS,
    TEACHER_FOLD,
    DistillItems,
    DistillSettings,
    TeacherLeakError,
    attach_teacher,
    check_out_of_fold,
    teacher_targets,
)
from cytologia.classification.losses import DistillationLoss, SoftCrossEntropyLoss
from cytologia.classification.oof import make_oof_table
from cytologia.classification.pseudo import (
    PSEUDO_BOX_ID_START,
    PseudoLabelItems,
    choose_threshold,
    count_table,
    fold_ensemble,
    select_pseudo_labels,
)
from cytologia.data.schema import CLASSES
from cytologia.ensemble import BlendSpec, DetectorSpec, Ensemble, MemberSpec, read_ensemble, softmax
from cytologia.errors import CytologiaInputError
from cytologia.runtime.inference import PROB_COLUMNS

K = len(CLASSES)


# ------------------------------------------------------------------------------------------------------ the loss
def test_distillation_loss_by_hand() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, K)
    teacher = torch.log_softmax(torch.randn(3, K), dim=1)
    labels = torch.tensor([4, -1, 7])  # the middle crop is unlabelled: soft term only
    t, a = 2.0, 0.7
    loss_fn = DistillationLoss(SoftCrossEntropyLoss(), temperature=t, kd_weight=a)
    targets = loss_fn.targets(labels, teacher)
    assert targets.shape == (3, 2 * K) and targets[1, :K].sum() == 0 and targets[0, 4] == 1
    p_t = torch.softmax(teacher / t, dim=1)
    assert torch.allclose(targets[:, K:], p_t)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits / t, dim=1))).sum(1).mean() * t * t
    ce = (F.cross_entropy(logits[[0, 2]], labels[[0, 2]], reduction="sum")) / 3  # labelled rows, over the batch
    assert loss_fn(logits, targets).item() == pytest.approx((a * kl + (1 - a) * ce).item(), rel=1e-5)
    # kd_weight 1 is pure KL, 0 the hard loss; a student equal to the teacher at T has no KL term left
    assert DistillationLoss(SoftCrossEntropyLoss(), t, 1.0)(logits, targets).item() == pytest.approx(kl.item(), 1e-5)
    assert DistillationLoss(SoftCrossEntropyLoss(), t, 0.0)(teacher, targets).item() == pytest.approx(
        (F.cross_entropy(teacher[[0, 2]], labels[[0, 2]], reduction="sum") / 3).item(), rel=1e-5
    )
    assert DistillationLoss(SoftCrossEntropyLoss(), t, 1.0)(teacher, targets).item() == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="finite teacher"):
        loss_fn.targets(labels, torch.full((3, K), float("nan")))
    with pytest.raises(ValueError, match="kd_weight"):
        DistillationLoss(SoftCrossEntropyLoss(), 2.0, 1.5)


# ----------------------------------------------------------------------------------------- teacher targets
def _oof(model: str, names: list[str], folds: list[int], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for f in sorted(set(folds)):
        rows = [i for i, g in enumerate(folds) if g == f]
        logits = rng.normal(size=(len(rows), K)).astype(np.float32)
        parts.append(make_oof_table([names[i] for i in rows], rows, f, model, logits))
    return pd.concat(parts, ignore_index=True)


def _ensemble(weights: tuple[float, float], per_fold: dict[int, list[float]] | None = None) -> Ensemble:
    members = [
        MemberSpec("a", weight=weights[0], oof_model="a", checkpoints=["ra/fold_0/x.ckpt", "ra/fold_1/x.ckpt"]),
        MemberSpec("b", weight=weights[1], oof_model="b", checkpoints=["rb/fold_0/x.ckpt", "rb/fold_1/x.ckpt"]),
    ]
    tuning = {}
    if per_fold is not None:
        tuning = {"heldout": {"per_fold": [{"fold": f, "weights": w} for f, w in per_fold.items()]}}
    det = DetectorSpec(backend="yolox", checkpoints=["d/fold_0/detector.pt", "d/fold_1/detector.pt"])
    return Ensemble(members, BlendSpec(), det, tuning, base_dir=Path("/runs"))


def test_teacher_targets_are_the_blended_out_of_fold_logits_with_held_out_weights() -> None:
    names = [f"img{i}.jpg" for i in range(6)]
    folds = [0, 1, 0, 1, 0, 1]
    a, b = _oof("a", names, folds, 1), _oof("b", names, folds, 2)
    ens = _ensemble((0.5, 0.5), per_fold={0: [1.0, 0.0], 1: [0.25, 0.75]})
    targets = teacher_targets(ens, [a, b.sample(frac=1.0, random_state=0)])  # row order of b does not matter
    assert targets[TEACHER_FOLD].tolist() == a["fold"].tolist()
    za = a.set_index("box_id")[[f"logit_{i}" for i in range(K)]].to_numpy()
    zb = b.set_index("box_id").loc[a["box_id"], [f"logit_{i}" for i in range(K)]].to_numpy()
    w = np.where(a["fold"].to_numpy()[:, None] == 0, [1.0, 0.0], [0.25, 0.75])  # the weights tuned without the fold
    expected = np.log(softmax(w[:, :1] * za + w[:, 1:] * zb))
    np.testing.assert_allclose(targets[list(TEACHER_COLUMNS)].to_numpy(), expected, atol=1e-5)
    tuned = teacher_targets(ens, [a, b], weights="tuned")
    np.testing.assert_allclose(tuned[list(TEACHER_COLUMNS)].to_numpy(), np.log(softmax(0.5 * za + 0.5 * zb)), atol=1e-5)
    with pytest.raises(ValueError, match="member b: its OOF rows"):
        teacher_targets(ens, [a, b.iloc[1:]])


def test_student_targets_never_come_from_a_model_that_trained_on_the_image() -> None:
    names = [f"img{i}.jpg" for i in range(8)]
    folds = [0, 1] * 4
    ens = _ensemble((0.5, 0.5))
    targets = teacher_targets(ens, [_oof("a", names, folds, 1), _oof("b", names, folds, 2)], weights="tuned")
    boxes = pd.DataFrame(
        {"NAME": names, "box_id": range(8), "x1": 5.0, "y1": 5.0, "x2": 40.0, "y2": 40.0, "class": "LY", "fold": folds}
    )
    items = DistillItems(boxes, targets=targets, settings=DistillSettings())
    for fold in (0, 1):
        train, val = items.split(fold, list(CLASSES))
        assert set(train["fold"]) == {1 - fold} and set(val["fold"]) == {fold}
        # each training crop's target was written by the model of its own fold: a model that never trained on it
        teacher_of = targets.set_index("box_id")[TEACHER_FOLD]
        assert (teacher_of.loc[train["box_id"]].to_numpy() == train["fold"].to_numpy()).all()
        assert (teacher_of.loc[train["box_id"]].to_numpy() != fold).all()
    # a target from a model that saw the image (the other fold's model: trained on this fold) is refused
    leaky = targets.copy()
    leaky.loc[leaky["box_id"] == 2, TEACHER_FOLD] = 1  # img2 is in fold 0; the fold-1 models trained on fold 0
    with pytest.raises(TeacherLeakError, match=r"1 row\(s\) come from models that trained on their image.*img2"):
        DistillItems(boxes, targets=leaky, settings=DistillSettings()).split(1, list(CLASSES))
    with pytest.raises(TeacherLeakError):
        check_out_of_fold(leaky, boxes.set_index("NAME")["fold"])
    with pytest.raises(ValueError, match="no teacher target"):
        attach_teacher(boxes, targets.iloc[1:], 0)


# ----------------------------------------------------------------------------------------------- pseudo-labels
def test_threshold_is_the_lowest_confidence_reaching_the_precision() -> None:
    conf = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    right = np.array([True, True, True, False, True, False])
    # above 0.8: 3/3; above 0.7: 3/4; above 0.6: 4/5 = 0.8; above 0.5: 4/6
    assert choose_threshold(conf, right, 0.8, min_count=1) == 0.6
    assert choose_threshold(conf, right, 0.9, min_count=1) == 0.8
    assert choose_threshold(conf, right, 0.9, min_count=4) == math.inf  # never 4 predictions at 90 %
    tied = np.array([0.9, 0.9, 0.5])
    assert choose_threshold(tied, np.array([True, False, True]), 1.0, min_count=1) == math.inf  # a tie keeps both


def test_oof_confidence_is_detector_score_times_blended_probability() -> None:
    from cytologia.classification.pseudo import oof_confidence

    probs = np.full((2, K), 0.01)
    probs[0, 2], probs[1, 5] = 1 - 0.01 * (K - 1), 1 - 0.01 * (K - 1)  # 0.78 on class 2 / class 5
    targets = pd.DataFrame({"NAME": ["a.jpg", "b.jpg"], "box_id": [0, 1], TEACHER_FOLD: [0, 1]})
    targets[list(TEACHER_COLUMNS)] = np.log(probs)
    truth = pd.DataFrame({"NAME": ["a.jpg", "b.jpg"], "box_id": [0, 1], "x1": 0.0, "y1": 0.0, "x2": 10.0, "y2": 10.0})
    truth["class"] = [CLASSES[2], CLASSES[0]]
    detections = pd.DataFrame(
        {
            "NAME": ["a.jpg", "a.jpg", "b.jpg"],
            "x1": [0.0, 1.0, 30.0],
            "y1": [0.0, 1.0, 30.0],
            "x2": [10.0, 11.0, 40.0],
            "y2": [10.0, 11.0, 40.0],
            "score": [0.5, 0.9, 0.99],  # a.jpg: the best-overlapping box (IoU 1) counts, not the best score
        }
    )
    conf = oof_confidence(targets, truth, detections)
    assert conf["confidence"].tolist() == pytest.approx([0.5 * 0.78, 0.0])  # b.jpg: its only box misses (IoU 0)
    assert conf["correct"].tolist() == [True, False] and conf["predicted"].tolist() == [CLASSES[2], CLASSES[5]]


def _predictions(names: list[str], teacher_fold: int, p_max: float, score: float) -> pd.DataFrame:
    probs = np.full((len(names), K), (1 - p_max) / (K - 1))
    probs[:, 3] = p_max
    rows = pd.DataFrame({"NAME": names, "x1": 5.0, "y1": 5.0, "x2": 40.0, "y2": 40.0, "score": score})
    rows["class"] = CLASSES[3]
    rows[list(PROB_COLUMNS)] = probs
    rows[TEACHER_FOLD] = teacher_fold
    return rows


def test_pseudo_labels_never_enter_their_own_folds_validation() -> None:
    boxes = pd.DataFrame(
        {"NAME": [f"tr{i}.jpg" for i in range(6)], "box_id": range(6), "x1": 5.0, "y1": 5.0, "x2": 40.0, "y2": 40.0}
    )
    boxes["class"], boxes["fold"] = "LY", [0, 1, 0, 1, 0, 1]
    preds = pd.concat(
        [
            _predictions(["te0.jpg", "te1.jpg"], 0, 0.9, 0.9),  # labelled by the fold-0 models
            _predictions(["te0.jpg", "te2.jpg"], 1, 0.9, 0.9),  # by the fold-1 models
            _predictions(["te3.jpg"], 1, 0.5, 0.9),  # not confident enough (0.45)
            _predictions(["te0.jpg", "te1.jpg"], -1, 0.9, 0.9),  # by every fold's models: the leak
        ],
        ignore_index=True,
    )
    pseudo = select_pseudo_labels(preds, 0.8)
    assert len(pseudo) == 6 and pseudo["confidence"].min() == pytest.approx(0.81)
    assert pseudo["box_id"].min() >= PSEUDO_BOX_ID_START and pseudo["box_id"].is_unique
    assert count_table(pseudo).loc[CLASSES[3]].to_dict() == {"full": 2, "fold_0": 2, "fold_1": 2}

    per_fold = pseudo[pseudo[TEACHER_FOLD] >= 0]
    items = PseudoLabelItems(boxes, pseudo=per_fold)
    for fold in (0, 1):
        train, val = items.split(fold, list(CLASSES))
        added = train[train["box_id"] >= PSEUDO_BOX_ID_START]
        assert set(added["box_id"]) == set(per_fold.loc[per_fold[TEACHER_FOLD] == fold, "box_id"])
        assert not set(added["NAME"]) & set(val["NAME"])  # never on the fold's validation images
    with pytest.raises(TeacherLeakError, match="full ensemble, whose models trained on fold 0's validation"):
        PseudoLabelItems(boxes, pseudo=pseudo).split(0, list(CLASSES))
    leaky_train, _ = PseudoLabelItems(boxes, pseudo=pseudo, allow_leak=True).split(0, list(CLASSES))
    added = leaky_train[leaky_train["box_id"] >= PSEUDO_BOX_ID_START]  # the full ensemble's only (the 1st place's)
    assert set(added["box_id"]) == set(pseudo.loc[pseudo[TEACHER_FOLD] == -1, "box_id"])
    on_val = per_fold.assign(NAME="tr0.jpg")  # a pseudo-label on a validation image of fold 0
    with pytest.raises(TeacherLeakError, match=r"fold 0: 2 pseudo-labelled crop\(s\) on the fold's own validation"):
        PseudoLabelItems(boxes, pseudo=on_val).split(0, list(CLASSES))


def test_fold_ensemble_keeps_the_folds_own_models() -> None:
    ens = _ensemble((0.5, 0.5))
    one = fold_ensemble(ens, 1)
    assert [m.checkpoints for m in one.members] == [["/runs/ra/fold_1/x.ckpt"], ["/runs/rb/fold_1/x.ckpt"]]
    assert one.detector is not None and one.detector.checkpoints == ["/runs/d/fold_1/detector.pt"]
    with pytest.raises(ValueError, match="no fold 2"):
        fold_ensemble(ens, 2)


def test_the_students_detector_keeps_the_first_detector_folds() -> None:
    from cytologia.classification.distill import absolute_detector

    ens = _ensemble((0.5, 0.5))
    ens.detector.onnx = ["d/fold_0/detector.onnx", "d/fold_1/detector.onnx"]
    every = absolute_detector(ens)
    assert every is not None and every.checkpoints == ["/runs/d/fold_0/detector.pt", "/runs/d/fold_1/detector.pt"]
    one = absolute_detector(ens, folds=1)
    assert one is not None and (one.checkpoints, one.onnx) == (
        ["/runs/d/fold_0/detector.pt"],
        ["/runs/d/fold_0/detector.onnx"],
    )
    for bad in (0, 3):
        with pytest.raises(CytologiaInputError, match=rf"detector_folds={bad}: the teacher's detector has 2 fold"):
            absolute_detector(ens, folds=bad)
    assert absolute_detector(Ensemble(ens.members, BlendSpec(), None, {}), folds=1) is None


# --------------------------------------------------------------------------------- a student, trained and exported
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 generated images of 96 px (~31 training boxes) with their folds."""
    from cytologia.data.synthetic.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, 40, seed=0, config=SynthConfig(size=96))
    return root


def _student_cfg(root: Path, out: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from cytologia.config import check_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return check_config(
            compose(
                config_name="train",
                overrides=[
                    "+exp=smoke",
                    f"data.root={root}",
                    "data.synthetic=false",
                    f"paths.output_dir={out}",
                    "folds.k=2",
                    "fold=null",
                    "trainer.batch_size=4",
                    "distill.student.name=test_convnext",  # timm's 209k-parameter test network
                    "distill.student.img_size=32",
                    *overrides,
                ],
            )
        )


def _fake_teacher(root: Path, out: Path) -> tuple[Ensemble, Path]:
    """OOF logits of two 'members' on every truth box (each row from its box's fold) and their ensemble."""
    from cytologia.classification.oof import write_oof
    from cytologia.data.io import read_annotations

    truth, _ = read_annotations(root / "train.csv", lenient=True)
    fold_of = pd.read_csv(root / "folds.csv").set_index("NAME")["fold"]
    names = truth["NAME"].tolist()
    fold = [int(fold_of[n]) for n in names]
    parts = []
    for model, seed in (("a", 1), ("b", 2)):
        rng = np.random.default_rng(seed)
        for f in sorted(set(fold)):
            rows = [i for i, g in enumerate(fold) if g == f]
            logits = rng.normal(size=(len(rows), K)).astype(np.float32) * 3
            ids = truth["box_id"].to_numpy()[rows]
            parts.append(make_oof_table([names[i] for i in rows], ids, f, model, logits))
    path = write_oof(pd.concat(parts, ignore_index=True), out / "oof_logits.csv")
    members = [MemberSpec("a", weight=0.6, oof_model="a"), MemberSpec("b", weight=0.4, oof_model="b")]
    return Ensemble(members, BlendSpec(), None, {}), path


def test_a_student_trains_on_its_targets_and_exports_to_onnx_with_parity(tiny_data: Path, tmp_path: Path) -> None:
    from cytologia.classification.distill import TARGETS_FILE, DistillDataModule, distill
    from cytologia.classification.export import check_onnx_parity, export_classifier_onnx
    from cytologia.classification.module import ClassifierModule, load_checkpoint
    from cytologia.classification.stage import crop_boxes
    from cytologia.data.prepare import ensure_folds, read_train

    cfg = _student_cfg(tiny_data, tmp_path)
    table = read_train(cfg, tiny_data)
    ensure_folds(cfg, table, tiny_data)  # folds.csv, which the fake teacher's OOF rows follow
    ens, oof = _fake_teacher(tiny_data, tmp_path)
    result = distill(cfg, ens, tmp_path / "student", oof=[oof])
    assert result.cv_macro_f1 is not None and result.ensemble_path is not None
    student = read_ensemble(result.ensemble_path)
    assert [m.name for m in student.members] == ["student"] and student.members[0].img_size == 32

    # the batches carry the targets table's teacher rows, crop by crop
    targets = pd.read_csv(tmp_path / "student" / TARGETS_FILE)
    boxes = crop_boxes(cfg, table, ensure_folds(cfg, table, tiny_data))
    train, val = DistillItems(boxes, targets=targets).split(0, list(CLASSES))
    images = tiny_data / "images"
    data = DistillDataModule([CropSource(train, images)], CropSource(val, images), list(CLASSES), 32, batch_size=64)
    data.setup()
    batch = next(iter(data.predict_loader()))  # the held-out crops: no teacher (they only validate)
    assert torch.isnan(batch["teacher"]).all()
    train_set = data.train_set
    item = train_set[3]  # type: ignore[index]
    row = targets.set_index("box_id").loc[int(item["box_id"]), list(TEACHER_COLUMNS)].to_numpy(np.float32)
    np.testing.assert_allclose(item["teacher"].numpy(), row, rtol=1e-6)

    # the final student is a crop classifier like any other: it reloads, exports and matches its ONNX graph
    ckpt = result.final_checkpoint
    assert ckpt is not None and load_checkpoint(ckpt)["hyper_parameters"]["distill"] == {
        "temperature": 2.0,
        "kd_weight": 0.7,
    }
    module = ClassifierModule.from_checkpoint(ckpt)
    path = export_classifier_onnx(module.model, tmp_path / "student.onnx", 32)
    assert check_onnx_parity(module.model, path, n=3) <= 1e-4


def test_stage2_starts_each_fold_from_its_previous_checkpoint(tmp_path: Path) -> None:
    from cytologia.classification.module import ClassifierModule

    cfg = _student_cfg(tmp_path, tmp_path, "classifier.name=test_convnext", "classifier.img_size=32")
    augment = {"mix_prob": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    torch.manual_seed(5)
    previous = ClassifierModule("test_convnext", list(CLASSES), 32)
    ckpt = tmp_path / "fold_1_last.ckpt"
    torch.save({"hyper_parameters": dict(previous.hparams), "state_dict": previous.state_dict()}, ckpt)
    items = PseudoLabelItems(pd.DataFrame(), init_from={1: ckpt})
    started = items.module(cfg, list(CLASSES), augment, 1).state_dict()
    fresh = items.module(cfg, list(CLASSES), augment, 0).state_dict()  # fold 0 has no previous checkpoint
    weights = [k for k, v in started.items() if v.is_floating_point()]
    assert all(torch.equal(started[k], previous.state_dict()[k]) for k in weights)
    assert not all(torch.equal(fresh[k], previous.state_dict()[k]) for k in weights)


def test_unlabelled_test_crops_reach_only_the_fold_whose_models_labelled_them(tiny_data: Path, tmp_path: Path) -> None:
    """Per-fold teacher predictions of the test images (random-weight models: the plumbing, not the accuracy) become
    crops with a teacher target only; student fold k gets the fold-k models' ones, the final student the whole
    ensemble's."""
    from cytologia.classification.distill import unlabelled_crops
    from cytologia.classification.pseudo import teacher_predictions
    from cytologia.runtime.bench import build_random_ensemble

    path = build_random_ensemble(
        tmp_path / "random", detector="yolox_nano", det_size=64, classifiers=[("test_convnext", 32)], folds=2
    )
    ens = read_ensemble(path)
    ens.detector.checkpoints = ens.detector.checkpoints * 2  # one detector file per fold
    ens.detector.onnx = ens.detector.onnx * 2
    preds = teacher_predictions(tiny_data, ens, [0, 1], full=True)
    n_test = len(pd.read_csv(tiny_data / "test.csv"))
    assert preds[TEACHER_FOLD].value_counts().to_dict() == {0: n_test, 1: n_test, -1: n_test}  # known count
    extra = unlabelled_crops(preds)
    np.testing.assert_allclose(np.exp(extra[list(TEACHER_COLUMNS)].to_numpy()).sum(axis=1), 1.0, rtol=1e-4)
    boxes = pd.DataFrame({"NAME": ["tr0.jpg", "tr1.jpg"], "box_id": [0, 1], "x1": 5.0, "y1": 5.0, "x2": 40.0})
    boxes = boxes.assign(y2=40.0, **{"class": "LY"}, fold=[0, 1])
    targets = pd.DataFrame({"NAME": ["tr0.jpg", "tr1.jpg"], "box_id": [0, 1], TEACHER_FOLD: [0, 1]})
    targets[list(TEACHER_COLUMNS)] = np.log(1.0 / K)
    for fold, final in ((0, False), (1, False), (-1, True)):
        items = DistillItems(boxes, targets=targets, settings=DistillSettings(extra=extra), final=final)
        train, _ = items.split(fold, list(CLASSES))
        added = train[train["box_id"] >= PSEUDO_BOX_ID_START]
        assert set(added["box_id"]) == set(extra.loc[extra[TEACHER_FOLD] == fold, "box_id"]) and len(added) == n_test
        assert added["class"].isna().all()  # no hard label: the KL term only
