"""Ensemble tuning on out-of-fold logits: the blend rule, the F1 it maximises, the held-out check, the file; and
prediction importing the file and the blend without the tuning code."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytologia.classification.oof import make_oof_table
from cytologia.data.schema import CLASSES
from cytologia.ensemble import (
    N_CLASSES,
    BlendSpec,
    DetectorSpec,
    Ensemble,
    MemberSpec,
    blend_probabilities,
    multilabel_probabilities,
    read_ensemble,
    write_ensemble,
)
from cytologia.ensemble.tune import apply_tuning, macro_f1_codes, predict_codes, prepare_tuning, tune
from cytologia.errors import CytologiaInputError
from cytologia.metrics import macro_f1


def _constructed(
    n_images: int = 1200, folds: int = 4, seed: int = 0, multi_cell_share: float = 0.15
) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """OOF logits of three members with complementary strengths, and the truth they are scored against.

    ``A`` separates classes 0-11 well and 12-22 badly, ``B`` the reverse, and writes its logits at 3x the scale (so
    equal weights let B dominate); ``C`` is mediocre everywhere. No member alone is good on every class: the tuned
    blend must beat the best of them on held-out folds. A multi-label image member ``ML`` (23 classes + background,
    its own table) is informative but noisy.
    """
    rng = np.random.default_rng(seed)
    names, box_ids, classes = [], [], []
    box = 0
    for i in range(n_images):
        n_cells = 2 if rng.random() < multi_cell_share else 1
        for _ in range(n_cells):
            names.append(f"img_{i:05d}.jpg")
            box_ids.append(box)
            classes.append(int(rng.integers(N_CLASSES)))
            box += 1
    y = np.array(classes)
    n = len(y)
    fold_of_image = {name: int(rng.integers(folds)) for name in dict.fromkeys(names)}
    fold = np.array([fold_of_image[nm] for nm in names])
    onehot = np.eye(N_CLASSES)[y]
    strong_a = (y < 12).astype(float)[:, None]

    def member(signal: np.ndarray, scale: float, noise: float) -> np.ndarray:
        return scale * (signal * onehot + rng.normal(0, noise, (n, N_CLASSES)))

    logits = {
        "A": member(np.where(strong_a > 0, 2.2, 0.6), 1.0, 1.0),
        "B": member(np.where(strong_a > 0, 0.6, 2.2), 3.0, 1.0),
        "C": member(np.full((n, 1), 1.3), 1.0, 1.0),
    }
    parts, ml_parts = [], []
    for model, lg in logits.items():
        for k in range(folds):
            sel = fold == k
            parts.append(make_oof_table(np.array(names)[sel], np.array(box_ids)[sel], k, model, lg[sel]))
    # multi-label image member: one row per image, logit high for the classes the image holds
    img_names = list(dict.fromkeys(names))
    holds = np.zeros((len(img_names), N_CLASSES))
    index = {nm: i for i, nm in enumerate(img_names)}
    for nm, c in zip(names, y):
        holds[index[nm], c] = 1
    ml = 4.0 * holds - 2.0 + rng.normal(0, 1.6, holds.shape)
    for k in range(folds):
        sel = np.array([fold_of_image[nm] == k for nm in img_names])
        ml_parts.append(
            make_oof_table(np.array(img_names)[sel], np.full(int(sel.sum()), -1), k, "ML", np.c_[ml[sel], ml[sel, :1]])
        )
    oof = [pd.concat(parts, ignore_index=True), pd.concat(ml_parts, ignore_index=True)]
    truth = pd.DataFrame({"NAME": names, "box_id": box_ids, "class": [CLASSES[c] for c in y]})
    truth[["x1", "y1", "x2", "y2"]] = [10.0, 10.0, 50.0, 50.0]
    return oof, truth


def test_macro_f1_codes_matches_the_score() -> None:
    rng = np.random.default_rng(3)
    true = rng.integers(0, N_CLASSES, 500)
    pred = np.where(rng.random(500) < 0.1, N_CLASSES, rng.integers(0, N_CLASSES, 500))  # some "None"
    names = np.array([*CLASSES, "None"], dtype=object)
    assert macro_f1_codes(true, pred) == pytest.approx(macro_f1(names[true], names[pred])[0], abs=1e-12)
    # a label only predicted counts with F1 0 (union of labels)
    assert macro_f1_codes(np.array([0, 0]), np.array([0, 1])) == pytest.approx((2 / 3 + 0) / 2)


def test_tuned_ensemble_beats_its_best_member_on_heldout_folds() -> None:
    oof, truth = _constructed()
    data = prepare_tuning(oof, truth, ["A", "B", "C"])
    result = tune(data)
    h = result.report["heldout"]
    singles = result.report["single_member_oof_f1"]
    assert max(singles.values()) < 0.8  # no member is good alone
    assert h["gain_over_best_member"] > 0.03, h
    assert h["gain_over_uniform"] > 0.0, h  # B's 3x scale makes equal weights worse than tuned ones
    assert len(h["per_fold"]) == 4 and all(r["ensemble_f1"] > r["best_member_f1"] for r in h["per_fold"])
    w = result.params.weights
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[1] < w[0]  # B is down-weighted to undo its scale


def _leak_bait(scheme: str, n_images: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """OOF logits of two honest members ``A``, ``B`` (noisy, independent: their blend beats either) and a bait ``L``
    that is perfect on the rows of one held-out part -- fold 0 of four, or with ``scheme="halves"`` the crc32 half 0
    of a single-fold table -- and useless on every other row, where it votes, as confidently, for a random wrong
    class (with weights >= 0 it can only hurt there). Returns the OOF table, the truth and the bait part's rows."""
    rng = np.random.default_rng(seed)
    names = np.array([f"img_{i:05d}.jpg" for i in range(n_images)], dtype=object)
    y = rng.integers(N_CLASSES, size=n_images)
    if scheme == "folds":
        fold = rng.integers(4, size=n_images)
        bait = fold == 0
    else:  # the two halves of a single-fold table (crc32 of the image name); the check holds half 0 out first
        fold = np.zeros(n_images, dtype=np.int64)
        bait = np.array([zlib.crc32(name.encode()) % 2 == 0 for name in names])
    onehot = np.eye(N_CLASSES)[y]
    wrong = np.eye(N_CLASSES)[(y + rng.integers(1, N_CLASSES, n_images)) % N_CLASSES]
    logits = {
        "A": 2.0 * onehot + rng.normal(0, 1, onehot.shape),
        "B": 2.0 * onehot + rng.normal(0, 1, onehot.shape),
        "L": np.where(bait[:, None], 20.0 * onehot, 10.0 * wrong),
    }
    parts = [
        make_oof_table(names[fold == k], np.flatnonzero(fold == k), int(k), model, lg[fold == k])
        for model, lg in logits.items()
        for k in np.unique(fold)
    ]
    truth = pd.DataFrame({"NAME": names, "box_id": np.arange(n_images), "class": [CLASSES[c] for c in y]})
    return pd.concat(parts, ignore_index=True), truth, bait


@pytest.mark.parametrize("scheme", ["folds", "halves"])
def test_heldout_check_does_not_see_the_heldout_rows(scheme: str) -> None:
    """The held-out check must tune without the held-out rows: a member that is perfect only on one held-out part
    and useless on the rows the check tunes on gets no credit there -- the part scores as the honest members' blend
    does -- while weights tuned on rows that include the part (a leak) make it near perfect."""
    oof, truth, bait = _leak_bait(scheme)
    data = prepare_tuning(oof, truth, ["A", "B", "L"])
    result = tune(data)
    h = result.report["heldout"]
    assert ("two halves" in h["scheme"]) == (scheme == "halves"), h["scheme"]
    row = next(r for r in h["per_fold"] if r["fold"] == 0)
    assert row["n_truth_boxes"] == int(bait.sum())  # the check's part 0 is the bait's part
    # the case shows a leak when there is one: weights tuned on rows that include the bait's part (the file's
    # weights, tuned on every row) exploit L there
    leaky = macro_f1_codes(data.eval_true[bait], predict_codes(data, result.params, data.eval_row[bait]))
    assert leaky > 0.9, (leaky, result.params.weights)
    # what the tuning rows justify: the same check without L
    base = tune(prepare_tuning(oof, truth, ["A", "B"])).report["heldout"]
    base_row = next(r for r in base["per_fold"] if r["fold"] == 0)
    assert leaky > base_row["ensemble_f1"] + 0.12, (leaky, base_row)
    assert row["ensemble_f1"] < base_row["ensemble_f1"] + 0.04, (row, base_row)
    # pooled over every part (not gain_over_best_member: the member best on tuning rows that include the bait's part
    # is L, which then fails on the part held out -- an honest, not a leaky, inflation of that gain)
    assert h["ensemble_f1"] < base["ensemble_f1"] + 0.02, (h["ensemble_f1"], base["ensemble_f1"])


def test_multilabel_member_blends_on_single_cell_images() -> None:
    oof, truth = _constructed(seed=1)
    without = tune(prepare_tuning(oof, truth, ["A", "B", "C"]), heldout=False)
    data = prepare_tuning(oof, truth, ["A", "B", "C"], multilabel="ML")
    assert data.image_prob is not None and data.single_cell.mean() > 0.6
    with_ml = tune(data)
    assert with_ml.params.multilabel_weight > 0
    assert with_ml.report["in_sample_f1"] > without.report["in_sample_f1"]
    assert with_ml.report["heldout"]["gain_over_best_member"] > 0
    # multi-cell images are untouched by the image member
    p_cell = blend_probabilities(data.logits[:, :5], with_ml.params.weights)
    p_all = blend_probabilities(
        data.logits[:, :5],
        with_ml.params.weights,
        image_prob=data.image_prob[:5],
        single_cell=np.zeros(5, bool),
        multilabel_weight=0.5,
    )
    np.testing.assert_allclose(p_cell, p_all)
    probs = multilabel_probabilities(np.zeros((2, N_CLASSES + 1)))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_class_bias_and_single_fold_check() -> None:
    oof, truth = _constructed(n_images=500, folds=1, seed=2)
    result = tune(prepare_tuning(oof, truth, ["A", "C"]), class_bias=True)
    assert result.params.bias is not None and result.params.bias.shape == (N_CLASSES,)
    assert "two halves" in result.report["heldout"]["scheme"]


def test_detected_boxes_take_the_best_giou_box() -> None:
    truth = pd.DataFrame(
        {
            "NAME": ["a", "a", "b"],
            "box_id": [0, 1, 2],
            "x1": [0.0, 50, 0],
            "y1": [0.0, 50, 0],
            "x2": [20.0, 80, 30],
            "y2": [20.0, 80, 30],
            "class": ["B", "EO", "LY"],
        }
    )
    boxes = pd.DataFrame({"NAME": ["a", "a"], "x1": [49.0, 1], "y1": [50.0, 0], "x2": [80.0, 20], "y2": [81.0, 21]})
    logits = np.full((2, N_CLASSES), -5.0)
    logits[0, CLASSES.index("EO")] = 5  # detected box 0 is the EO cell
    logits[1, CLASSES.index("B")] = 5
    oof = make_oof_table(["a", "a"], [0, 1], 0, "m", logits)
    assert prepare_tuning(oof, truth, boxes=boxes).eval_row.tolist() == [1, 0]  # images of the OOF table
    data = prepare_tuning(oof, truth, boxes=boxes, folds=pd.DataFrame({"NAME": ["a", "b"], "fold": [0, 0]}))
    assert data.eval_row.tolist() == [1, 0, -1]  # image b of fold 0 has no box: "None"
    assert 0.5 < data.giou < 1.0
    result = tune(data, heldout=False)
    # B and EO right, LY -> None: labels B, EO, LY, None -> F1 (1 + 1 + 0 + 0) / 4
    assert result.report["in_sample_f1"] == pytest.approx(0.5)


def test_prepare_tuning_errors() -> None:
    oof, truth = _constructed(n_images=50)
    with pytest.raises(CytologiaInputError, match="not in the OOF table"):
        prepare_tuning(oof, truth, ["A", "Z"])
    short = oof[0][~((oof[0]["model"] == "B") & (oof[0]["box_id"] == 3))]
    with pytest.raises(CytologiaInputError, match="same boxes"):
        prepare_tuning(short, truth, ["A", "B"])
    bad = truth.copy()
    bad.loc[0, "class"] = "XX"
    with pytest.raises(CytologiaInputError, match="XX"):
        prepare_tuning(oof[0], bad, ["A"])
    with pytest.raises(CytologiaInputError, match="more than one"):
        prepare_tuning([oof[0], oof[0]], truth, ["A"])


def test_ensemble_file_round_trip(tmp_path: Path) -> None:
    oof, truth = _constructed(n_images=300)
    data = prepare_tuning(oof, truth, ["A", "B"], multilabel="ML")
    result = tune(data, heldout=False)
    models = tmp_path / "models"
    specs = [
        MemberSpec("A", arch="resnet18", img_size=64, onnx=[str(models / "a0.onnx")], tta_flip=True),
        MemberSpec("B", arch="resnet18", img_size=64, checkpoints=["/elsewhere/b.ckpt"]),
        MemberSpec("ML", kind="multilabel", img_size=96),
    ]
    members, blend = apply_tuning(specs, result, data)
    ens = Ensemble(
        members, blend, DetectorSpec("ultralytics", img_size=320, onnx=[str(models / "det.onnx")]), result.report
    )
    for suffix in (".json", ".yaml"):
        path = write_ensemble(ens, tmp_path / f"ensemble{suffix}")
        back = read_ensemble(path)
        assert [m.name for m in back.members] == ["A", "B", "ML"]
        np.testing.assert_allclose(back.weights(), result.params.weights / result.params.weights.sum())
        assert back.multilabel_member is not None and back.blend.multilabel_weight == blend.multilabel_weight
        assert back.members[0].onnx == ["models/a0.onnx"]  # below the file's folder: relative
        assert back.resolve(back.members[0].onnx[0]) == models / "a0.onnx"
        assert back.members[1].checkpoints == ["/elsewhere/b.ckpt"]
        assert back.detector is not None and back.detector.img_size == 320
    text = json.loads((tmp_path / "ensemble.json").read_text())
    assert text["version"] == 1 and "tuning" in text


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["members"][0].update(kind="other"), "kind"),
        (lambda d: d["members"][0].update(colour=1), "unknown key"),
        (lambda d: d["blend"].update(class_bias=[0.0]), "class_bias"),
        (lambda d: d["blend"].update(multilabel_weight=2), "multilabel_weight"),
        (lambda d: d.update(detector={"backend": "ultralytics", "img_size": 100}), "multiple of 32"),
        (lambda d: d.update(detector={"img_size": 320}), "backend"),  # never guessed
        (lambda d: d.update(detector={"backend": "yolo9000", "img_size": 320}), "not a registered backend"),
        (lambda d: d.update(members=[]), "no member"),
    ],
)
def test_bad_ensemble_files(tmp_path: Path, change, message: str) -> None:
    ens = Ensemble([MemberSpec("A")], BlendSpec())
    data = ens.to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CytologiaInputError, match=message):
        read_ensemble(path)


# Modules that must stay out of a prediction: the tuning code and scipy's optimiser (which tuning imports lazily).
TUNING_ONLY = ("cytologia.ensemble.tune", "scipy.optimize")
# The inference side: the ensemble file, the blend rule, the runtime, `cytologia predict` and what its run imports.
INFERENCE = (
    "cytologia.ensemble",
    "cytologia.ensemble.schema",
    "cytologia.ensemble.blend",
    "cytologia.runtime.sessions",
    "cytologia.runtime.inference",
    "cytologia.commands.predict",
    "cytologia.data.io",
)


def test_prediction_does_not_import_the_tuning_code() -> None:
    """In a fresh interpreter, importing the inference side loads none of :data:`TUNING_ONLY`; importing the tuning
    module afterwards does show up in ``sys.modules`` (the check can see it)."""
    code = (
        "import importlib, sys\n"
        f"for m in {INFERENCE!r}: importlib.import_module(m)\n"
        f"print([m for m in {TUNING_ONLY!r} if m in sys.modules])\n"
        "import cytologia.ensemble.tune\n"
        "print('cytologia.ensemble.tune' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded, control = run.stdout.strip().splitlines()
    assert loaded == "[]", f"imported when predicting: {loaded}"
    assert control == "True"


def test_fixed_member_weights_are_kept_and_only_the_multilabel_weight_is_tuned() -> None:
    # the 1st place's blend: fixed group weights, the multi-label share on single-cell images found by grid search
    from cytologia.ensemble.tune import fixed_weight_vector

    oof, truth = _constructed(seed=2)
    data = prepare_tuning(oof, truth, ["A", "B", "C"], multilabel="ML")
    fixed = fixed_weight_vector(data, {"A": 3, "B": 1, "C": 0})
    np.testing.assert_allclose(fixed, [0.75, 0.25, 0.0])
    result = tune(data, fixed=fixed)
    np.testing.assert_allclose(result.params.weights, fixed)
    assert result.params.multilabel_weight > 0 and "fixed_weights" in result.report["optimiser"]
    assert all(row["weights"] == [0.75, 0.25, 0.0] for row in result.report["heldout"]["per_fold"])
    free = tune(data, heldout=False)
    assert not np.allclose(free.params.weights, fixed)  # without it the search moves the weights
    for bad, message in (({"A": 1, "B": 1}, "without a weight: C"), ({"A": 1, "B": 1, "C": 1, "Z": 1}, "no member: Z")):
        with pytest.raises(CytologiaInputError, match=message):
            fixed_weight_vector(data, bad)
    with pytest.raises(CytologiaInputError, match="positive sum"):
        fixed_weight_vector(data, {"A": 0, "B": 0, "C": 0})
