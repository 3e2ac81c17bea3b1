"""Box fusion: WBF on hand cases, the known-count rule and its pads, open-world threshold + NMS."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ensemble_boxes import weighted_boxes_fusion as reference_wbf

from cytologia.boxes import pairwise_iou
from cytologia.detection.fusion import (
    PAD_ORDER,
    PRIOR_REL_SIDE,
    known_count,
    nms,
    open_world,
    pad_candidates,
    pad_study,
    weighted_box_fusion,
)
from cytologia.detection.oof import BOX_TABLE_COLUMNS
from cytologia.errors import CytologiaInputError, ValidationError


def _boxes(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(BOX_TABLE_COLUMNS))


def _xyxy(frame: pd.DataFrame) -> np.ndarray:
    return frame[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)


# ------------------------------------------------------------------------------------------------------------- WBF
def test_two_agreeing_models_give_one_box_at_the_score_weighted_mean() -> None:
    table = _boxes([("a.jpg", 10, 10, 110, 110, 0.9, "m1"), ("a.jpg", 14, 12, 114, 108, 0.6, "m2")])
    out = weighted_box_fusion(table)
    assert len(out) == 1
    expect = (0.9 * np.array([10, 10, 110, 110]) + 0.6 * np.array([14, 12, 114, 108])) / 1.5
    np.testing.assert_allclose(_xyxy(out)[0], expect)
    assert out["score"].iloc[0] == pytest.approx(0.75)  # both models found it: the mean score, not rescaled
    assert out["model"].iloc[0] == "fused"


def test_disjoint_boxes_are_kept_and_a_box_one_model_of_two_sees_is_halved() -> None:
    table = _boxes(
        [
            ("a.jpg", 0, 0, 50, 50, 0.8, "m1"),
            ("a.jpg", 200, 200, 260, 260, 0.7, "m1"),
            ("a.jpg", 2, 1, 51, 50, 0.8, "m2"),
        ]
    )
    out = weighted_box_fusion(table)
    assert len(out) == 2
    top, lone = out.iloc[0], out.iloc[1]
    assert top["score"] == pytest.approx(0.8)
    assert lone["score"] == pytest.approx(0.35)  # 0.7 * min(1, 2) / 2
    np.testing.assert_allclose(_xyxy(out)[1], [200, 200, 260, 260])


def test_score_rescaling_counts_models_not_boxes() -> None:
    # three models in the ensemble; two boxes of the *same* model in one cluster count as two boxes (capped at 3)
    table = _boxes(
        [
            ("a.jpg", 0, 0, 100, 100, 0.9, "m1"),
            ("a.jpg", 1, 1, 101, 101, 0.6, "m1"),
            ("b.jpg", 0, 0, 100, 100, 0.9, "m2"),
            ("c.jpg", 0, 0, 100, 100, 0.3, "m3"),
        ]
    )
    out = weighted_box_fusion(table).set_index("NAME")
    assert out.loc["a.jpg", "score"] == pytest.approx(0.75 * 2 / 3)
    assert out.loc["b.jpg", "score"] == pytest.approx(0.9 / 3)  # the other models found nothing in b.jpg
    assert out.loc["c.jpg", "score"] == pytest.approx(0.1)


def test_weights_are_honoured() -> None:
    a, b = np.array([10, 10, 110, 110.0]), np.array([20, 10, 120, 110.0])
    table = _boxes([("a.jpg", *a, 0.5, "big"), ("a.jpg", *b, 0.8, "small")])
    out = weighted_box_fusion(table, weights={"big": 3.0, "small": 1.0})
    assert len(out) == 1
    np.testing.assert_allclose(_xyxy(out)[0], (1.5 * a + 0.8 * b) / 2.3)
    assert out["score"].iloc[0] == pytest.approx((1.5 + 0.8) / 2 * 2 / 4)
    # unweighted: the higher-scored box pulls harder
    plain = weighted_box_fusion(table)
    np.testing.assert_allclose(_xyxy(plain)[0], (0.5 * a + 0.8 * b) / 1.3)
    # a model of the weights that found nothing still counts in the rescaling
    solo = weighted_box_fusion(table[table["model"] == "big"], weights={"big": 3.0, "small": 1.0})
    assert solo["score"].iloc[0] == pytest.approx(1.5 * 1 / 4)


def test_max_conf_type() -> None:
    table = _boxes([("a.jpg", 0, 0, 10, 10, 0.9, "m1"), ("a.jpg", 0, 0, 10, 11, 0.4, "m2")])
    out = weighted_box_fusion(table, conf_type="max", weights={"m1": 1.0, "m2": 2.0})
    assert out["score"].iloc[0] == pytest.approx(0.9 / 2.0)
    with pytest.raises(ValueError, match="conf_type"):
        weighted_box_fusion(table, conf_type="median")


def test_match_needs_iou_strictly_above_the_threshold() -> None:
    # IoU of the two boxes is exactly 0.5: [0, 100] x [0, 100] vs [0, 100] x [0, 50]
    table = _boxes([("a.jpg", 0, 0, 100, 100, 0.9, "m1"), ("a.jpg", 0, 0, 100, 50, 0.8, "m2")])
    assert len(weighted_box_fusion(table, iou_thr=0.5)) == 2
    assert len(weighted_box_fusion(table, iou_thr=0.49)) == 1


def test_skip_threshold_empty_boxes_and_the_fold_column(caplog: pytest.LogCaptureFixture) -> None:
    table = _boxes(
        [
            ("a.jpg", 0, 0, 100, 100, 0.9, "m1"),
            ("a.jpg", 0, 0, 100, 100, 0.05, "m2"),
            ("a.jpg", 50, 50, 50, 80, 0.9, "m2"),  # zero width
            ("b.jpg", 0, 0, 10, 10, 0.9, "m1"),
        ]
    )
    table["fold"] = [2, 2, 2, 0]
    with caplog.at_level(logging.WARNING):
        out = weighted_box_fusion(table, skip_thr=0.1)
    assert "1 box(es) with zero or negative area" in caplog.text
    assert out.set_index("NAME").loc["a.jpg", "score"] == pytest.approx(0.45)
    assert out.set_index("NAME")["fold"].to_dict() == {"a.jpg": 2, "b.jpg": 0}


def test_with_folds_the_members_are_model_fold_pairs() -> None:
    # test time: the same model name from two folds is two members; out of fold: one fold per image, one member
    table = _boxes(
        [
            ("t.jpg", 0, 0, 100, 100, 0.8, "m"),
            ("t.jpg", 2, 0, 100, 100, 0.6, "m"),
            ("o.jpg", 0, 0, 100, 100, 0.8, "m"),
            ("u.jpg", 0, 0, 100, 100, 0.8, "m"),
            ("u.jpg", 1, 1, 99, 99, 0.4, "m"),
        ]
    )
    table["fold"] = [0, 1, 3, 3, 0]
    table.loc[len(table)] = ["u.jpg", 300, 300, 340, 340, 0.9, "m", 3]
    out = weighted_box_fusion(table).set_index(["NAME", "score"])
    assert out.loc["t.jpg"].index.tolist() == [pytest.approx(0.7)]  # both members found it
    assert out.loc["o.jpg"].index.tolist() == [pytest.approx(0.8)]
    assert sorted(out.loc["u.jpg"].index) == [pytest.approx(0.45), pytest.approx(0.6)]  # 0.9 / 2 members; 0.6
    assert out.loc["u.jpg", "fold"].tolist() == [-1, -1]


def test_bad_input_names_the_rows() -> None:
    table = _boxes([("a.jpg", 0, 0, 10, 10, 0.9, "m1"), ("a.jpg", 0, "x", 10, 10, 0.9, "m1")])
    with pytest.raises(ValidationError, match="row 2"):
        weighted_box_fusion(table, source="oof.csv")
    with pytest.raises(ValidationError, match="missing column"):
        weighted_box_fusion(table.drop(columns="score"))
    with pytest.raises(ValidationError, match="inverted"):
        weighted_box_fusion(_boxes([("a.jpg", 10, 0, 5, 10, 0.9, "m1")]))
    with pytest.raises(CytologiaInputError, match="m1"):
        weighted_box_fusion(table.iloc[:1], weights={"m2": 1.0})


def test_wbf_on_random_clusters_recovers_the_cells() -> None:
    rng = np.random.default_rng(0)
    truth = {f"{i}.jpg": np.array([[30, 40, 130, 150], [200, 180, 300, 290]], float) for i in range(20)}
    rows = []
    for name, cells in truth.items():
        for m in ("m1", "m2", "m3", "m4"):
            for c in cells:
                rows.append((name, *(c + rng.normal(0, 3, 4)), rng.uniform(0.6, 0.95), m))
    table = _boxes(rows)
    out = weighted_box_fusion(table)
    assert out.groupby("NAME").size().eq(2).all()
    fused_iou, single_iou = [], []
    for name, cells in truth.items():
        fused_iou += pairwise_iou(_xyxy(out[out["NAME"] == name]), cells).max(axis=1).tolist()
        single_iou += pairwise_iou(_xyxy(table[table["NAME"] == name]), cells).max(axis=1).tolist()
    # the weighted mean of 4 noisy boxes is closer to the cell than one box is
    assert np.mean(fused_iou) > np.mean(single_iou) + 0.02
    assert min(fused_iou) > 0.85


# ----------------------------------------------------------------------------------------------------- known count
def test_known_count_keeps_the_top_n_and_pads_the_rest() -> None:
    table = _boxes(
        [
            ("a.jpg", 0, 0, 10, 10, 0.2, "fused"),
            ("a.jpg", 20, 20, 40, 40, 0.9, "fused"),
            ("a.jpg", 50, 50, 70, 70, 0.5, "fused"),
            ("b.jpg", 5, 5, 50, 50, 0.7, "fused"),
            ("z.jpg", 5, 5, 50, 50, 0.7, "fused"),  # not in the count list
        ]
    )
    counts = pd.Series({"a.jpg": 2, "b.jpg": 3, "c.jpg": 1, "d.jpg": 4})
    sizes = {"a.jpg": (100, 100), "b.jpg": (368, 360), "c.jpg": (400, 300), "d.jpg": (368, 368)}
    out = known_count(table, counts, sizes)
    assert out.groupby("NAME").size().to_dict() == counts.to_dict()
    a = out[out["NAME"] == "a.jpg"]
    assert a["score"].tolist() == [0.9, 0.5]
    b = out[out["NAME"] == "b.jpg"]
    assert b["model"].tolist() == ["fused", "pad:full", "pad:prior"]  # some cells found: the full image first
    np.testing.assert_allclose(_xyxy(b)[1], [0, 0, 368, 360])
    c = out[out["NAME"] == "c.jpg"]
    assert c["model"].tolist() == ["pad:prior"]  # nothing found in a single-cell image: the centred prior box
    side = PRIOR_REL_SIDE * 300
    np.testing.assert_allclose(_xyxy(c)[0], [200 - side / 2, 150 - side / 2, 200 + side / 2, 150 + side / 2])
    d = out[out["NAME"] == "d.jpg"]
    assert d["model"].tolist() == [f"pad:{k}" for k in PAD_ORDER["empty_multi"][:4]]
    assert not pd.DataFrame(_xyxy(d)).duplicated().any()  # no two pads of an image are the same box
    assert (out.loc[out["model"].str.startswith("pad:"), "score"] == 0).all()
    assert list(pd.unique(out["NAME"])) == list(counts.index)  # ordered as the count list


def test_known_count_errors() -> None:
    table = _boxes([("a.jpg", 0, 0, 10, 10, 0.2, "fused")])
    with pytest.raises(CytologiaInputError, match="no image size"):
        known_count(table, pd.Series({"a.jpg": 2}), {})
    with pytest.raises(CytologiaInputError, match="integers >= 1"):
        known_count(table, pd.Series({"a.jpg": 0}), {"a.jpg": (10, 10)})
    # sizes as a table work like the mapping; no pad needed means no size needed
    out = known_count(table, pd.Series({"a.jpg": 1}), pd.DataFrame({"NAME": [], "img_w": [], "img_h": []}))
    assert len(out) == 1


def test_pad_candidates_are_distinct_and_inside_the_image() -> None:
    cands = pad_candidates(np.array([368.0, 600.0]), np.array([360.0, 400.0]), np.array([1, 11]))
    stacked = np.stack([cands[k] for k in PAD_ORDER["empty_multi"]], axis=1)  # (2, n_candidates, 4)
    for img, (w, h) in enumerate([(368, 360), (600, 400)]):
        boxes = stacked[img]
        assert len(np.unique(boxes.round(6), axis=0)) == len(boxes)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert set(PAD_ORDER["partial"]) == set(PAD_ORDER["empty_multi"])


def test_pad_study_prefers_the_prior_for_centred_single_cells() -> None:
    rng = np.random.default_rng(1)
    side = rng.uniform(0.3, 0.5, 200) * 368
    cx = 184 + rng.normal(0, 3, 200)
    truth = pd.DataFrame(
        {
            "NAME": [f"{i}.jpg" for i in range(200)],
            "x1": cx - side / 2,
            "y1": cx - side / 2,
            "x2": cx + side / 2,
            "y2": cx + side / 2,
        }
    )
    sizes = {f"{i}.jpg": (368, 368) for i in range(200)}
    study = pad_study(truth, sizes)
    first = study[(study["step"] == 1)].sort_values("value", ascending=False)
    assert first["candidate"].iloc[0] == "prior"
    full = first.set_index("candidate").loc["full", "value"]
    expect = ((side**2 / 368**2 + 1) / 2).mean()  # GIoU of the full image = IoU = area ratio
    assert full == pytest.approx(expect, rel=1e-9)


@pytest.mark.bench
def test_pad_study_on_real_geometry(real_data_dir: Path) -> None:
    """The figures in the PAD_ORDER comment of cytologia.detection.fusion."""
    t = pd.read_csv(real_data_dir / "train.csv")
    n = t.groupby("NAME").size()
    g = t.groupby("NAME").agg(x1=("x1", "min"), y1=("y1", "min"), x2=("x2", "max"), y2=("y2", "max"))
    single = (n == 1).reindex(g.index).to_numpy()
    sizes = pd.DataFrame(
        {
            "NAME": g.index,
            "img_w": np.where(single, g["x1"] + g["x2"], np.maximum(368, g["x2"])),
            "img_h": np.where(single, g["y1"] + g["y2"], np.maximum(368, g["y2"])),
        }
    )
    for miss in ("random", "border"):
        study = pad_study(t, sizes, partial_miss=miss)
        first = study[study["step"] <= 1].sort_values("value", ascending=False)
        for situation, rows in first.groupby("situation"):
            print(miss, situation, " | ".join(f"{c} {v:.3f}" for c, v in zip(rows["candidate"], rows["value"])))
        best = first.groupby("situation")["candidate"].first()
        assert best["empty_single"] == PAD_ORDER["empty_single"][0]
        assert best["empty_multi"] == PAD_ORDER["empty_multi"][0]
        if miss == "border":
            assert best["partial"] == PAD_ORDER["partial"][0]


# ------------------------------------------------------------------------------------------------------ open world
def test_open_world_threshold_then_nms_per_image() -> None:
    table = _boxes(
        [
            ("a.jpg", 0, 0, 100, 100, 0.9, "m"),
            ("a.jpg", 5, 5, 105, 105, 0.8, "m"),  # IoU 0.82 with the first: suppressed
            ("a.jpg", 200, 0, 300, 100, 0.6, "m"),
            ("a.jpg", 0, 200, 100, 300, 0.1, "m"),  # below the score threshold
            ("b.jpg", 5, 5, 105, 105, 0.3, "m"),  # same place, other image: kept
        ]
    )
    out = open_world(table, score_thr=0.25, nms_iou=0.5)
    assert out[["NAME", "score"]].values.tolist() == [["a.jpg", 0.9], ["a.jpg", 0.6], ["b.jpg", 0.3]]
    assert len(open_world(table, score_thr=0.25, nms_iou=0.9)) == 4  # IoU 0.82 < 0.9: both kept


def test_nms_matches_torchvision() -> None:
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 300, (200, 2))
    wh = rng.uniform(20, 120, (200, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 200)
    ours = nms(boxes, scores, 0.5)
    ref = tv_ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    np.testing.assert_array_equal(ours, ref)


# ------------------------------------------------------------------------------------- WBF vs ensemble-boxes
def _random_predictions(rng: np.random.Generator, n_images: int, models: list[str], size: float = 368.0):
    rows = []
    for i in range(n_images):
        cells = rng.integers(1, 4)
        centres = rng.uniform(60, size - 60, (cells, 2))
        for m in models:
            for c in centres:
                if rng.random() < 0.85:
                    half = rng.uniform(30, 60, 2)
                    box = np.concatenate([c - half, c + half]) + rng.normal(0, 6, 4)
                    rows.append((f"{i}.jpg", *np.clip(box, 0, size), rng.uniform(0.05, 1.0), m))
            if rng.random() < 0.3:  # a stray box
                xy = rng.uniform(0, size - 60, 2)
                rows.append((f"{i}.jpg", *xy, *(xy + 50), rng.uniform(0.05, 0.5), m))
    return _boxes(rows)


def _wbf_case(seed: int) -> dict:
    """A random WBF setting: 1-4 models (unit or random weights), iou_thr, skip_thr, conf_type."""
    rng = np.random.default_rng(seed)
    models = [f"m{k}" for k in range(1 + seed % 4)]  # seeds 0-7: each number of models with both conf types
    unit = rng.random() < 0.25
    weights = {m: 1.0 if unit else round(float(rng.uniform(0.3, 3.0)), 3) for m in models}
    return {
        "models": models,
        "weights": weights,
        "iou_thr": round(float(rng.uniform(0.3, 0.8)), 3),
        "skip_thr": round(float(rng.choice([0.0, rng.uniform(0.0, 0.4)])), 3),
        "conf_type": ("avg", "max")[(seed + seed // 4) % 2],
    }


@pytest.mark.parametrize("seed", range(8))
def test_wbf_matches_ensemble_boxes(seed: int) -> None:
    """Same fused boxes and scores as ensemble-boxes' weighted_boxes_fusion (the reference implementation, a dev
    dependency) on random predictions: every image is fused by both, with the same weights and thresholds."""
    case = _wbf_case(seed)
    models, weights, iou_thr, skip_thr, conf_type = (
        case[k] for k in ("models", "weights", "iou_thr", "skip_thr", "conf_type")
    )
    rng = np.random.default_rng(100 + seed)
    table = _random_predictions(rng, 80, models)
    ours = weighted_box_fusion(table, iou_thr=iou_thr, skip_thr=skip_thr, weights=weights, conf_type=conf_type)
    size = 368.0
    n_compared = n_merged = 0
    fused = {name: (_xyxy(g), g["score"].to_numpy()) for name, g in ours.groupby("NAME")}
    empty = (np.zeros((0, 4)), np.zeros(0))
    for name, group in table.groupby("NAME"):
        xyxy, score, model = _xyxy(group) / size, group["score"].to_numpy(), group["model"].to_numpy()
        b, s, _ = reference_wbf(
            [xyxy[model == m].tolist() for m in models],
            [score[model == m].tolist() for m in models],
            [[0] * int((model == m).sum()) for m in models],
            weights=[weights[m] for m in models],
            iou_thr=iou_thr,
            skip_box_thr=skip_thr,
            conf_type=conf_type,
        )
        mine_b, mine_s = fused.get(name, empty)
        assert len(mine_s) == len(s), (name, case)
        # same boxes, same scores (ensemble-boxes computes fused boxes and scores in float32)
        order = np.lexsort((b[:, 0], -np.round(s, 5)))
        mine_order = np.lexsort((mine_b[:, 0], -np.round(mine_s, 5)))
        np.testing.assert_allclose(mine_b[mine_order], b[order] * size, atol=2e-3, err_msg=f"{name} {case}")
        np.testing.assert_allclose(mine_s[mine_order], s[order], atol=1e-6, err_msg=f"{name} {case}")
        n_compared += len(s)
        n_merged += int((score >= skip_thr).sum()) - len(s)
    assert n_compared > 80 and (n_merged > 0 or len(models) == 1), case  # clusters were formed, not only copies


@pytest.mark.bench
def test_wbf_speed() -> None:
    """WBF over an out-of-fold-sized table: 48,417 images x 2 TTA variants (~1.1 boxes each) plus stray boxes."""
    rng = np.random.default_rng(0)
    n = 48_417
    models = np.array(["plain", "flip"])
    per_img = rng.choice([1, 1, 1, 2, 3], size=n)
    rows_name = np.repeat([f"{i:08x}-0.jpg" for i in range(n)], per_img * 2)
    k = len(rows_name)
    c = rng.uniform(100, 268, (k, 2))
    table = pd.DataFrame(
        {
            "NAME": rows_name,
            "x1": c[:, 0] - 70,
            "y1": c[:, 1] - 70,
            "x2": c[:, 0] + 70,
            "y2": c[:, 1] + 70,
            "score": rng.uniform(0.05, 1, k),
            "model": np.tile(models, k // 2),
        }
    )
    t0 = time.perf_counter()
    out = weighted_box_fusion(table)
    seconds = time.perf_counter() - t0
    print(f"WBF: {k} boxes over {n} images -> {len(out)} fused in {seconds:.2f} s ({1e6 * seconds / n:.0f} us/image)")
    assert seconds < 60


def test_oof_to_fusion_to_known_count_round_trip() -> None:
    """Two TTA variants of noisy boxes -> WBF -> known count -> the challenge's box term against the truth."""
    from cytologia.detection.oof import known_count_giou

    rng = np.random.default_rng(5)
    truth_rows, pred_rows = [], []
    for i in range(40):
        name = f"{i:08x}-0.jpg"
        n_cells = 1 if i % 4 else 2
        for k in range(n_cells):
            box = np.array([40 + 160 * k, 60, 180 + 160 * k, 200], float)
            truth_rows.append((name, *box))
            if i == 7:  # the detector missed this image entirely: a pad takes its place
                continue
            for variant in ("m", "m+hflip"):
                pred_rows.append((name, *(box + rng.normal(0, 4, 4)), rng.uniform(0.6, 0.9), variant))
        if i != 7:
            pred_rows.append((name, 300, 300, 340, 340, 0.05, "m"))  # a weak stray box
    truth = pd.DataFrame(truth_rows, columns=["NAME", "x1", "y1", "x2", "y2"])
    preds = _boxes(pred_rows)
    preds["fold"] = 0
    fused = weighted_box_fusion(preds)
    counts = truth.groupby("NAME").size()
    sizes = {n: (368, 368) for n in counts.index}
    kept = known_count(fused, counts, sizes)
    assert kept.groupby("NAME").size().equals(counts)
    assert not kept.loc[kept["score"] > 0, "model"].str.startswith("pad:").any()
    assert set(kept.loc[kept["NAME"] == "00000007-0.jpg", "model"]) == {"pad:prior"}
    assert not np.isclose(kept["score"], 0.05 / 2).any()  # the stray box lost to the real ones
    score = known_count_giou(kept, truth, sizes)
    assert score > 0.9  # fused boxes of 4 px noise on 140 px cells; one padded image
