"""The challenge score: rules by hand, scikit-learn agreement, and a randomized comparison with the loop oracle."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from cytologia import metrics
from cytologia.data.schema import CLASSES, SUBMISSION_COLUMNS
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.metrics_reference import score_loop

COLS = list(SUBMISSION_COLUMNS)


def table(rows: list[tuple]) -> pd.DataFrame:
    """A trustii_id,NAME,x1,y1,x2,y2,class frame from tuples."""
    return pd.DataFrame(rows, columns=COLS)


def both(truth: pd.DataFrame, pred: pd.DataFrame) -> metrics.ScoreResult:
    """The vectorised score, checked against the loop oracle on the way."""
    result = metrics.score(truth, pred)
    oracle = score_loop(truth, pred)
    for key in ("score", "giou", "f1"):
        assert getattr(result, key) == pytest.approx(oracle[key], abs=1e-12), key
    assert result.per_class_f1 == pytest.approx(oracle["per_class_f1"], abs=1e-12)
    return result


# Two images: img0 holds two boxes, img1 one.
TRUTH = table(
    [
        (10, "img0.jpg", 0, 0, 10, 10, "B"),
        (11, "img0.jpg", 20, 20, 30, 30, "EO"),
        (12, "img1.jpg", 5, 5, 15, 15, "B"),
    ]
)


def test_perfect_prediction_scores_one() -> None:
    truth = table([(i, f"im{i // 2}.jpg", i, i, i + 10, i + 12, CLASSES[i % 5]) for i in range(20)])
    result = both(truth, truth.iloc[::-1])
    assert (result.score, result.giou, result.f1) == (1.0, 1.0, 1.0)
    assert set(result.labels) == set(CLASSES[:5])
    assert all(v == 1.0 for v in result.per_class_f1.values())
    cm = result.confusion.to_numpy()
    assert (cm == np.diag(np.diag(cm))).all() and cm.trace() == 20
    assert result.n_pred_kept == 20 and result.n_images_without_prediction == 0


def test_class_swap_lowers_f1_as_computed_by_hand() -> None:
    truth = table(
        [
            (0, "a.jpg", 0, 0, 10, 10, "B"),
            (1, "b.jpg", 0, 0, 10, 10, "B"),
            (2, "c.jpg", 0, 0, 10, 10, "EO"),
            (3, "d.jpg", 0, 0, 10, 10, "EO"),
        ]
    )
    pred = truth.copy()
    pred.loc[0, "class"] = "EO"  # one B predicted EO
    result = both(truth, pred)
    # B: TP 1, FP 0, FN 1 -> 2/3. EO: TP 2, FP 1, FN 0 -> 4/5.
    assert result.per_class_f1 == pytest.approx({"B": 2 / 3, "EO": 4 / 5})
    assert result.f1 == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert result.score == pytest.approx(0.2 * 1.0 + 0.8 * (2 / 3 + 4 / 5) / 2)
    assert result.confusion.loc["B", "EO"] == 1


def test_image_without_prediction_costs_a_none_label() -> None:
    # Two single-box images per class, all 23 classes; every prediction perfect but one image has none.
    rows = [(i, f"im{i}.jpg", 0, 0, 10, 10, CLASSES[i // 2]) for i in range(46)]
    truth = table(rows)
    pred = truth[truth["trustii_id"] != 0]
    result = both(truth, pred)
    assert len(result.labels) == 24 and "None" in result.labels
    assert result.per_class_f1["None"] == 0.0
    assert result.per_class_f1[CLASSES[0]] == pytest.approx(2 / 3)  # TP 1, FN 1
    # 22 perfect classes, one at 2/3, and "None" at 0: macro over 24 labels (without "None" it would be /23).
    assert result.f1 == pytest.approx((22 + 2 / 3) / 24)
    assert result.giou == pytest.approx(45 / 46)
    row = result.matched.set_index("trustii_id").loc[0]
    assert (row["pred_class"], row["giou_rescaled"], row["pred_row"]) == ("None", 0.0, -1)
    assert math.isnan(row["giou"])
    assert result.n_images_without_prediction == 1


def test_every_image_empty() -> None:
    result = both(TRUTH, TRUTH.iloc[:0])
    assert (result.score, result.giou, result.f1) == (0.0, 0.0, 0.0)
    assert result.n_images_without_prediction == 2 and result.labels == ("B", "EO", "None")


def test_first_row_per_id_wins() -> None:
    pred = table(
        [
            (12, "img1.jpg", 5, 5, 15, 15, "EO"),  # first row of id 12: wrong class, kept
            (12, "img1.jpg", 5, 5, 15, 15, "B"),  # repeated id: ignored
            (10, "img0.jpg", 0, 0, 10, 10, "B"),
            (11, "img0.jpg", 20, 20, 30, 30, "EO"),
        ]
    )
    result = both(TRUTH, pred)
    assert result.matched.set_index("trustii_id").loc[12, "pred_class"] == "EO"
    assert result.matched.set_index("trustii_id").loc[12, "pred_row"] == 0
    assert result.n_pred_repeated_id == 1 and result.n_pred_kept == 3


def test_id_filter_comes_before_first_row() -> None:
    # As in the reference: rows are filtered by NAME first, so a wrong-NAME first row does not block its id.
    pred = table([(12, "img0.jpg", 5, 5, 15, 15, "EO"), (12, "img1.jpg", 5, 5, 15, 15, "B")])
    result = both(TRUTH, pred)
    assert result.matched.set_index("trustii_id").loc[12, "pred_class"] == "B"
    assert (result.n_pred_wrong_name, result.n_pred_repeated_id) == (1, 0)


def test_exact_duplicates_collapse() -> None:
    clean = table([(10, "img0.jpg", 0, 0, 10, 10, "B"), (12, "img1.jpg", 5, 5, 15, 15, "B")])
    dup = pd.concat([clean, table([(11, "img0.jpg", 0, 0, 10, 10, "B")])])  # id 11 repeats id 10's box and class
    a, b = both(TRUTH, clean), both(TRUTH, dup)
    assert (a.score, a.n_pred_kept) == (b.score, 2)
    assert b.n_pred_duplicate == 1 and b.n_pred_rows == 3
    # Same box, other class: not a duplicate.
    other = pd.concat([clean, table([(11, "img0.jpg", 0, 0, 10, 10, "EO")])])
    assert both(TRUTH, other).n_pred_kept == 3


def test_foreign_ids_and_wrong_names_are_ignored() -> None:
    clean = TRUTH.copy()
    noisy = pd.concat(
        [
            table(
                [
                    (99, "img0.jpg", 0, 0, 10, 10, "EO"),  # unknown id
                    (10, "img1.jpg", 0, 0, 10, 10, "EO"),  # id of img0 under img1's name
                    (11, "other.jpg", 0, 0, 10, 10, "EO"),  # name of no image
                    ("abc", "img0.jpg", 0, 0, 10, 10, "EO"),  # not an integer
                    (10.5, "img0.jpg", 0, 0, 10, 10, "EO"),  # not an integer value
                    (None, "img0.jpg", 0, 0, 10, 10, "EO"),  # missing
                ]
            ),
            clean,
        ]
    )
    result = both(TRUTH, noisy)
    assert result.score == 1.0
    assert (result.n_pred_unknown_id, result.n_pred_wrong_name, result.n_pred_kept) == (4, 2, 3)


def test_ids_compare_by_value() -> None:
    pred = TRUTH.copy()
    pred["trustii_id"] = ["10", 11.0, " 12"]
    assert both(TRUTH, pred).score == 1.0


def test_many_to_one_matching() -> None:
    # Both truth boxes of img0 take the only prediction (id 10's row, a box between them).
    pred = table([(10, "img0.jpg", 0, 0, 10, 10, "EO"), (12, "img1.jpg", 5, 5, 15, 15, "B")])
    result = both(TRUTH, pred)
    m = result.matched.set_index("trustii_id")
    assert m.loc[10, "pred_row"] == m.loc[11, "pred_row"] == 0
    assert list(m["pred_class"]) == ["EO", "EO", "B"]
    # Box 11 vs [0,0,10,10]: disjoint, enclosing 30x30 = 900, union 200: GIoU = -(900-200)/900.
    assert m.loc[11, "giou"] == pytest.approx(-700 / 900)
    assert result.giou == pytest.approx((1.0 + (1 - 700 / 900) / 2 + 1.0) / 3)


def test_best_giou_wins_and_ties_keep_the_earlier_row() -> None:
    truth = table(
        [
            (0, "a.jpg", 5, 0, 10, 5, "B"),
            (1, "a.jpg", 100, 100, 101, 101, "PM"),
            (2, "a.jpg", 200, 0, 201, 1, "PM"),
            (3, "a.jpg", 300, 0, 301, 1, "PM"),
        ]
    )
    pred = table(
        [
            (1, "a.jpg", 0, 0, 3, 5, "MO"),  # disjoint from box 0: never its best
            (2, "a.jpg", 4, 0, 9, 5, "EO"),  # box 0 shifted left by 1: GIoU 20/30
            (3, "a.jpg", 6, 0, 11, 5, "B"),  # shifted right by 1: the same GIoU, a later row
        ]
    )
    assert metrics.giou_pairs(truth.iloc[[0, 0], 2:6], pred.iloc[[1, 2], 2:6]).tolist() == [2 / 3, 2 / 3]
    assert both(truth, pred).matched.loc[0, "pred_class"] == "EO"
    assert both(truth, pred.iloc[[0, 2, 1]]).matched.loc[0, "pred_class"] == "B"


def test_class_absent_from_truth_adds_a_zero_label() -> None:
    pred = TRUTH.copy()
    pred.loc[2, "class"] = "MO"  # no MO in the truth
    result = both(TRUTH, pred)
    assert result.labels == ("B", "EO", "MO") and result.per_class_f1["MO"] == 0.0
    assert result.support["MO"] == 0
    # B: TP 1, FN 1 -> 2/3; EO 1; MO 0.
    assert result.f1 == pytest.approx((2 / 3 + 1 + 0) / 3)


@pytest.mark.parametrize("odd", ["None", "NA", "", "nan", "b", " B"])
def test_strings_that_are_not_classes_stay_exact(odd: str, tmp_path) -> None:
    pred = TRUTH.copy()
    pred.loc[2, "class"] = odd
    path = tmp_path / "pred.csv"
    pred.to_csv(path, index=False)
    read = metrics.read_predictions(path)
    assert read.loc[2, "class"] == odd  # keep_default_na=False: never NaN, whatever the pandas version
    result = both(TRUTH, read)
    assert odd in result.labels and result.per_class_f1[odd] == 0.0
    assert result.f1 == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_predicted_none_is_the_same_label_as_no_prediction() -> None:
    pred = table([(10, "img0.jpg", 0, 0, 10, 10, "None"), (11, "img0.jpg", 20, 20, 30, 30, "EO")])
    result = both(TRUTH, pred)  # img1 has no prediction: "None" again
    assert result.labels == ("B", "EO", "None") and result.support["None"] == 0
    assert result.confusion.loc["B", "None"] == 2


def test_missing_values_in_a_dataframe_are_empty_strings() -> None:
    pred = TRUTH.copy().astype({"class": object})
    pred.loc[2, "class"] = None
    pred.loc[1, "class"] = np.nan
    result = both(TRUTH, pred)
    assert "" in result.labels and "nan" not in result.labels and "None" not in result.labels
    assert result.confusion.loc["EO", ""] == 1 and result.confusion.loc["B", ""] == 1


def test_giou_by_hand() -> None:
    a = np.array([[0, 0, 10, 10]] * 5, dtype=float)
    b = np.array(
        [
            [20, 0, 30, 10],  # disjoint: inter 0, union 200, enclosing 300 -> -100/300
            [2, 2, 8, 8],  # nested: IoU 36/100, enclosing = union
            [0, 0, 10, 10],  # identical
            [10, 0, 20, 10],  # touching: IoU 0, enclosing = union
            [5, 5, 15, 15],  # overlap 25, union 175, enclosing 225
        ]
    )
    expected = [-1 / 3, 0.36, 1.0, 0.0, 25 / 175 - 50 / 225]
    assert metrics.giou_pairs(a, b) == pytest.approx(expected)
    assert np.isnan(metrics.giou_pairs(a[:1], [[np.nan, 0, 1, 1]]))[0]
    # The reference's formula on an inverted box (x2 < x1): areas are not clipped, so its area is negative.
    # Here: intersection 0, areas 100 and -1000, union -900, enclosing box 10 x 10 = 100 -> -(100 + 900) / 100.
    inverted = metrics.giou_pairs(np.array([[0, 0, 10, 10]]), np.array([[100, 0, 0, 10]]))
    assert inverted[0] == pytest.approx(-10.0)


def test_non_numeric_coordinates_score_zero_and_take_the_image(tmp_path) -> None:
    # As the reference: np.argmax picks the first NaN GIoU, and fillna(0) scores it 0.
    path = tmp_path / "pred.csv"
    path.write_text(
        "trustii_id,NAME,x1,y1,x2,y2,class\n"
        "10,img0.jpg,0,0,10,10,B\n"
        "11,img0.jpg,,20,30,30,MO\n"
        "12,img1.jpg,abc,5,15,15,B\n"
    )
    pred = metrics.read_predictions(path)
    result = both(TRUTH, pred)
    m = result.matched.set_index("trustii_id")
    assert list(m["pred_class"]) == ["MO", "MO", "B"]
    assert list(m["giou_rescaled"]) == [0.0, 0.0, 0.0]
    assert result.n_pred_bad_box == 2 and result.giou == 0.0


def test_f1_agrees_with_sklearn() -> None:
    rng = np.random.default_rng(3)
    n = 300
    labels = np.array([*CLASSES[:6], "None", "x"], dtype=object)
    truth = table([(i, f"im{i % 120}.jpg", 0, 0, 10, 10, rng.choice(labels[:6])) for i in range(n)])
    pred = truth.copy()
    pred["class"] = rng.choice(labels, n)
    pred = pred[rng.random(n) > 0.1]
    result = both(truth, pred)
    m = result.matched
    assert result.f1 == pytest.approx(f1_score(m["class"], m["pred_class"], average="macro"), abs=1e-12)
    per = f1_score(m["class"], m["pred_class"], average=None, labels=list(result.labels))
    assert list(result.per_class_f1.values()) == pytest.approx(list(per), abs=1e-12)
    f1, names, _, _ = metrics.macro_f1(m["class"].to_numpy(), m["pred_class"].to_numpy())
    assert (f1, names) == (pytest.approx(result.f1, abs=1e-15), result.labels)


def test_invalid_truth_names_the_rows() -> None:
    bad = table(
        [
            (0, "a.jpg", 0, 0, 10, 10, "B"),
            (0, "b.jpg", 0, 0, 10, 10, "B"),
            ("x", "c.jpg", 0, 0, 10, 10, "B"),
            (3, "d.jpg", "abc", 0, 10, 10, "B"),
            (4, "", 0, 0, 10, 10, ""),
        ]
    )
    with pytest.raises(ValidationError) as err:
        metrics.score(bad, bad)
    text = str(err.value)
    for fragment in (
        "truth, row 2: trustii_id 0 is repeated (first at row 1)",
        "truth, row 3: trustii_id is not an integer: 'x'",
        "truth, row 4: coordinate is missing, non-numeric or infinite: x1='abc'",
        "truth, row 5: NAME is empty",
        "truth, row 5: class is empty",
    ):
        assert fragment in text
    assert text.startswith("truth: 5 problem(s)")
    with pytest.raises(ValidationError, match="prediction: .*missing column"):
        metrics.score(TRUTH, TRUTH.drop(columns=["x2"]))


def test_read_truth_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "truth.csv"
    path.write_text("trustii_id,NAME,x1,y1,x2,y2,class\n1,a.jpg,0,0,10,10,B\n1,b.jpg,0,,10,10,B\n")
    with pytest.raises(ValidationError) as err:
        metrics.read_truth(path)
    assert f"{path}, row 2: trustii_id 1 is repeated" in str(err.value)
    assert f"{path}, row 2: coordinate is missing, non-numeric or infinite: y1=''" in str(err.value)
    train = tmp_path / "train.csv"
    train.write_text("NAME,x1,y1,x2,y2,class\na.jpg,0,0,10,10,NA\n")
    with pytest.raises(ValidationError, match="missing column"):
        metrics.read_truth(train)
    read = metrics.read_truth(train, assign_ids=True)
    assert read["trustii_id"].tolist() == [0] and read["class"].tolist() == ["NA"]
    with pytest.raises(CytologiaInputError, match="no such file"):
        metrics.read_predictions(tmp_path / "absent.csv")


def test_unknown_truth_classes_are_listed_with_counts_and_first_rows() -> None:
    classes = ["B", "Foo", "EO", "Foo", "None", *["Foo"] * 6, "b"]
    found = metrics.unknown_classes(classes)
    assert [(u.label, u.count) for u in found] == [("Foo", 8), ("None", 1), ("b", 1)]  # exact strings: "b" is not "B"
    assert found[0].rows == (2, 4, 6, 7, 8) and found[1].rows == (5,) and found[2].rows == (12,)
    assert metrics.unknown_classes(list(CLASSES)) == []


UNKNOWN_TRUTH = (
    "trustii_id,NAME,x1,y1,x2,y2,class\n"
    "0,a.jpg,0,0,10,10,B\n"
    "1,a.jpg,20,20,30,30,Foo\n"
    "2,b.jpg,5,5,15,15,Foo\n"
    "3,c.jpg,0,0,8,8,EO\n"
)


def test_unknown_truth_class_is_scored_by_the_reference_rule_and_logged(tmp_path, caplog) -> None:
    path = tmp_path / "truth.csv"
    path.write_text(UNKNOWN_TRUTH)
    with caplog.at_level("WARNING", logger="cytologia.metrics"):
        truth = metrics.read_truth(path)
    assert f"{path}: class 'Foo' is not one of the 23 classes: 2 row(s) (rows 2, 3)" in caplog.text
    assert truth["class"].tolist() == ["B", "Foo", "Foo", "EO"]
    pred = truth.assign(**{"class": ["B", "B", "Foo", "EO"]})
    result = both(truth, pred)  # the unknown class is one more label of the macro average, as in the reference
    assert result.labels == ("B", "EO", "Foo") and result.per_class_f1["Foo"] == pytest.approx(2 / 3)


def test_strict_read_truth_rejects_unknown_classes_naming_file_class_and_rows(tmp_path, caplog) -> None:
    path = tmp_path / "truth.csv"
    path.write_text(UNKNOWN_TRUTH + "4,d.jpg,0,0,8,8,None\n")
    with pytest.raises(ValidationError) as err:
        metrics.read_truth(path, strict=True)
    text = str(err.value)
    assert text.startswith(f"{path}: 2 problem(s)")
    assert f"{path}, row 2: class 'Foo' is not one of the 23 classes: 2 row(s) (rows 2, 3)" in text
    assert f"{path}, row 5: class 'None' is not one of the 23 classes: 1 row(s) (rows 5)" in text
    clean = tmp_path / "clean.csv"
    clean.write_text(UNKNOWN_TRUTH.replace("Foo", "MO"))
    with caplog.at_level("WARNING", logger="cytologia.metrics"):
        assert len(metrics.read_truth(clean, strict=True)) == 4
    assert "not one of the 23 classes" not in caplog.text


# ---------------------------------------------------------------- randomized comparison with the loop oracle
ODD = ["None", "NA", "", "foo", "nan"]


def pick(rng: np.random.Generator, options: list | tuple) -> object:
    """One of ``options`` as it is (``rng.choice`` would turn a mixed list into strings)."""
    return options[int(rng.integers(0, len(options)))]


def has_tie(truth: pd.DataFrame, pred: pd.DataFrame) -> bool:
    """Whether some truth box has two predictions of its image with equal best GIoU and different classes."""
    for row in truth.to_dict("records"):
        same = pred[pred["NAME"] == row["NAME"]]
        boxes = same[["x1", "y1", "x2", "y2"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        g = metrics.giou_pairs(np.repeat([[row["x1"], row["y1"], row["x2"], row["y2"]]], len(same), 0), boxes)
        if len(g) and not np.isnan(g).all():
            top = np.nanmax(g) == g
            if top.sum() > 1 and same["class"][top].nunique() > 1:
                return True
    return False


def random_case(rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random truth (1-4 boxes per image, rows of an image not adjacent) and a submission that breaks every rule."""
    pool = [str(c) for c in rng.choice(CLASSES, size=int(rng.integers(1, 5)), replace=False)]
    truth_rows = []
    ids = rng.choice(10_000, size=60, replace=False)
    for img in range(int(rng.integers(1, 9))):
        for _ in range(int(rng.integers(1, 5))):
            x1, y1 = rng.integers(0, 12, 2)
            w, h = rng.integers(1, 8, 2)  # small integer grid: equal GIoUs (ties) are frequent
            box = [int(x1), int(y1), int(x1 + w), int(y1 + h)]
            truth_rows.append([int(ids[len(truth_rows)]), f"im{img}.jpg", *box, pick(rng, pool)])
    truth = table(truth_rows).iloc[rng.permutation(len(truth_rows))].reset_index(drop=True)
    names = truth["NAME"].unique()

    pred_rows: list[list[object]] = []
    skip_image = {n for n in names if rng.random() < 0.15}
    last: dict[str, list[object]] = {}  # the last prediction row written for each image
    for row in truth.to_dict("records"):
        if row["NAME"] in skip_image or rng.random() < 0.1:
            continue
        for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):  # 2-3: repeated ids
            box: list[object] = [int(row[c]) + int(rng.integers(-2, 3)) for c in ("x1", "y1", "x2", "y2")]
            u = rng.random()
            if u < 0.05:
                box[int(rng.integers(0, 4))] = pick(rng, [np.nan, None, "abc", ""])
            elif u < 0.1:
                box = [box[2], box[1], box[0], box[3]]  # inverted in x
            elif u < 0.3:
                others = truth.loc[truth["NAME"] == row["NAME"], ["x1", "y1", "x2", "y2"]].to_numpy()
                box = list(others[int(rng.integers(0, len(others)))])  # another box's exact box: ties, duplicates
            v = rng.random()
            cls = row["class"] if v < 0.5 else pick(rng, pool) if v < 0.8 else pick(rng, CLASSES)
            cls = pick(rng, ODD) if v >= 0.9 else cls
            tid: object = row["trustii_id"]
            name = row["NAME"]
            w = rng.random()
            if w < 0.05:
                tid = pick(rng, [int(truth["trustii_id"].max()) + 7, "abc", 2.5, np.nan])
            elif w < 0.1:
                name = pick(rng, [*names, "x.jpg"])
            if row["NAME"] in last and rng.random() < 0.1:
                box, cls = last[row["NAME"]][2:6], last[row["NAME"]][6]  # an exact duplicate under another id
            pred_rows.append([tid, name, *box, cls])
            last[row["NAME"]] = pred_rows[-1]
    pred = pd.DataFrame(pred_rows, columns=COLS)
    if len(pred):
        pred = pd.concat([pred, pred.sample(frac=0.2, random_state=int(rng.integers(1 << 31)))])  # exact dups
    return truth, pred.iloc[rng.permutation(len(pred))].reset_index(drop=True)


def test_randomized_against_the_loop_oracle() -> None:
    rng = np.random.default_rng(20241125)
    seen = {"ties": 0, "nan": 0, "odd": 0, "empty": 0, "dup": 0, "repeat": 0, "foreign": 0, "wrong": 0}
    for case in range(250):
        truth, pred = random_case(rng)
        result = metrics.score(truth, pred)
        oracle = score_loop(truth, pred)
        for key in ("score", "giou", "f1"):
            assert getattr(result, key) == pytest.approx(oracle[key], abs=1e-12), (case, key)
        assert result.per_class_f1 == pytest.approx(oracle["per_class_f1"], abs=1e-12), case
        assert result.n_pred_kept == oracle["n_pred_kept"], case
        assert result.n_images_without_prediction == oracle["n_images_without_prediction"], case
        # The generator must actually exercise each rule across the run.
        seen["ties"] += int(case % 5 == 0 and has_tie(truth, pred))  # checked on every 5th case: it is slow
        seen["nan"] += result.n_pred_bad_box
        seen["odd"] += sum(label not in CLASSES for label in result.labels)
        seen["empty"] += result.n_images_without_prediction
        seen["dup"] += result.n_pred_duplicate
        seen["repeat"] += result.n_pred_repeated_id
        seen["foreign"] += result.n_pred_unknown_id
        seen["wrong"] += result.n_pred_wrong_name
    assert all(v >= 5 for v in seen.values()), seen
