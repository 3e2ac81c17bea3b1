"""cytologia.boxes: hand-computed overlaps, shapes, eps, numpy vs torch, and agreement with two references
(metrics_reference's per-box GIoU and torchvision.ops)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision.ops

from cytologia import boxes
from cytologia.metrics_reference import _giou as reference_giou

A = (0.0, 0.0, 10.0, 10.0)
# (other box, IoU against A, GIoU against A), worked out by hand
HAND = [
    ((0, 0, 10, 10), 1.0, 1.0),  # identical
    ((20, 0, 30, 10), 0.0, -1 / 3),  # disjoint: inter 0, union 200, enclosing 30 x 10 = 300 -> -100/300
    ((2, 2, 6, 6), 0.16, 0.16),  # nested: inter 16, union 100 = enclosing
    ((5, 0, 15, 10), 1 / 3, 1 / 3),  # half overlap: inter 50, union 150 = enclosing
    ((5, 5, 15, 15), 25 / 175, 25 / 175 - 50 / 225),  # corner overlap: enclosing 15 x 15
    ((10, 0, 20, 10), 0.0, 0.0),  # touching along an edge: enclosing = union
    ((10, 10, 20, 20), 0.0, -0.5),  # touching at a corner: union 200, enclosing 400
    ((5, 5, 5, 5), 0.0, 0.0),  # zero-area point inside: inter 0, union 100 = enclosing
    ((0, 20, 10, 20), 0.0, -0.5),  # zero-height segment 10 px below: union 100, enclosing 10 x 20 = 200
    ((100, 0, 0, 10), 0.0, -10.0),  # inverted (x2 < x1): area -1000 (not clipped), union -900, enclosing 100
]


def _kind(kind: str, values: object) -> object:
    return torch.tensor(values, dtype=torch.float64) if kind == "torch" else np.asarray(values, dtype=np.float64)


def _np(x: object) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_hand_computed_cases(kind: str) -> None:
    others = _kind(kind, [o for o, _, _ in HAND])
    a = _kind(kind, A)  # one box against k boxes: broadcasting
    iou, giou = boxes.iou_giou(a, others)
    np.testing.assert_allclose(_np(iou), [v for _, v, _ in HAND], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(_np(giou), [g for _, _, g in HAND], rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(_np(boxes.iou(a, others)), _np(iou))
    np.testing.assert_array_equal(_np(boxes.giou(a, others)), _np(giou))
    # symmetric
    np.testing.assert_array_equal(_np(boxes.giou(others, a)), _np(giou))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_degenerate_boxes(kind: str) -> None:
    point = _kind(kind, [3, 3, 3, 3])
    # two equal points: union 0 and enclosing 0, both floored at eps -> 0 / eps = 0, not NaN
    assert float(boxes.iou(point, point)) == 0.0 and float(boxes.giou(point, point)) == 0.0
    # two distinct points: enclosing 3 x 3 = 9, union 0 -> GIoU -1
    assert float(boxes.giou(_kind(kind, [0, 0, 0, 0]), point)) == -1.0
    # a NaN coordinate gives NaN, on either side, silently (numpy: no RuntimeWarning); so does inf - inf
    nan_box = _kind(kind, [math.nan, 0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(float(boxes.giou(_kind(kind, A), nan_box)))
        assert math.isnan(float(boxes.iou(nan_box, _kind(kind, A))))
        assert math.isnan(float(boxes.giou(_kind(kind, [0, 0, math.inf, 1]), _kind(kind, A))))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_eps_is_a_floor_on_the_union(kind: str) -> None:
    tiny = _kind(kind, [0, 0, 1e-4, 1e-4])  # area 1e-8 px^2
    assert float(boxes.iou(tiny, tiny)) == pytest.approx(0.1)  # 1e-8 / max(1e-8, 1e-7)
    assert float(boxes.iou(tiny, tiny, eps=1e-12)) == pytest.approx(1.0)
    assert float(boxes.giou(tiny, tiny, eps=1e-12)) == pytest.approx(1.0)
    # the enclosing area has the same floor: disjoint tiny boxes, union 2e-8, enclosing 3e-8
    apart = _kind(kind, [2e-4, 0, 3e-4, 1e-4])
    assert float(boxes.giou(tiny, apart, eps=1e-12)) == pytest.approx(-1 / 3)
    assert float(boxes.giou(tiny, apart)) == pytest.approx(-0.1)  # -(3e-8 - 2e-8) / max(3e-8, 1e-7)
    # an area far above eps is divided as it is (eps is not added)
    unit = _kind(kind, [0, 0, 1, 1])
    assert float(boxes.iou(unit, _kind(kind, [0, 0, 1, 0.5]), eps=0.25)) == 0.5


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_shapes(kind: str) -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (7, 2))
    a = _kind(kind, np.concatenate([xy, xy + rng.uniform(1, 30, (7, 2))], 1))
    b = _kind(kind, np.concatenate([xy[::-1], xy[::-1] + 20], 1))
    assert tuple(boxes.iou(a, b).shape) == (7,)
    pair = boxes.pairwise_giou(a, b[:5])
    assert tuple(pair.shape) == (7, 5)
    # pairwise is the aligned function broadcast (7, 1, 4) x (1, 5, 4)
    np.testing.assert_array_equal(_np(pair), _np(boxes.giou(a[:, None, :], b[None, :5, :])))
    np.testing.assert_array_equal(_np(boxes.pairwise_iou(a, b[:5])), _np(boxes.iou(a[:, None, :], b[None, :5, :])))
    # leading dimensions are kept: (2, 3, 4) x (2, 3, 4) -> (2, 3)
    assert tuple(boxes.giou(a[:6].reshape(2, 3, 4), b[:6].reshape(2, 3, 4)).shape) == (2, 3)
    # row i of pairwise is box i against every box
    np.testing.assert_array_equal(_np(pair[3]), _np(boxes.giou(a[3], b[:5])))
    # one box given as (4,) in pairwise counts as one row; empty sets give empty matrices
    assert tuple(boxes.pairwise_iou(a[0], b).shape) == (1, 7)
    assert tuple(boxes.pairwise_iou(a[:0], b).shape) == (0, 7)
    assert tuple(boxes.iou(a[:0], b[:0]).shape) == (0,)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"last dimension of 4.*\(5, 3\)"):
        boxes.iou(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"b: .*last dimension of 4"):
        boxes.pairwise_giou(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="last dimension of 4"):
        boxes.area(np.float64(3.0))
    with pytest.raises(TypeError, match="two torch tensors or two numpy arrays"):
        boxes.giou(torch.zeros(4), np.zeros(4))


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Valid boxes of mixed sizes, a share of them identical, nested, touching or zero-area."""
    xy = rng.uniform(-20, 300, (n, 2))
    out = np.concatenate([xy, xy + rng.exponential(40, (n, 2))], 1)
    out[: n // 10, 2] = out[: n // 10, 0]  # zero width
    return np.round(out, int(rng.integers(0, 3)))  # rounded: touching edges and ties happen


def test_matches_the_reference_loop_bit_for_bit() -> None:
    # metrics_reference._giou is the oracle of the score; inverted boxes and NaN included
    rng = np.random.default_rng(1)
    a, b = _random_boxes(rng, 3000), _random_boxes(rng, 3000)
    b[::5] = a[::5]
    b[1::7] = b[1::7][:, [2, 1, 0, 3]]  # inverted in x
    b[2::50, 1] = np.nan
    expected = [reference_giou(tuple(x), tuple(y)) for x, y in zip(a.tolist(), b.tolist())]
    np.testing.assert_array_equal(boxes.giou(a, b), expected)
    np.testing.assert_array_equal(boxes.giou_columns(*a.T, *b.T), expected)
    np.testing.assert_array_equal(boxes.iou_giou(a, b)[1], expected)


def test_matches_torchvision() -> None:
    rng = np.random.default_rng(2)
    a, b = _random_boxes(rng, 60)[6:], _random_boxes(rng, 80)[8:]
    for x in (a, b):  # torchvision divides by the union as it is: give every box an area
        x[:, 2:] = np.maximum(x[:, 2:], x[:, :2] + 1)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    expected_iou = torchvision.ops.box_iou(ta, tb).numpy()
    expected_giou = torchvision.ops.generalized_box_iou(ta, tb).numpy()
    for kind in ("numpy", "torch"):
        x, y = (ta, tb) if kind == "torch" else (a, b)
        np.testing.assert_allclose(_np(boxes.pairwise_iou(x, y)), expected_iou, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(_np(boxes.pairwise_giou(x, y)), expected_giou, rtol=1e-12, atol=1e-15)
    # float32 tensors stay float32 and agree to float32 precision
    got = boxes.pairwise_giou(ta.float(), tb.float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected_giou, rtol=1e-5, atol=1e-6)


def test_numpy_and_torch_agree_exactly() -> None:
    rng = np.random.default_rng(3)
    a, b = _random_boxes(rng, 500), _random_boxes(rng, 500)
    for fn in (boxes.iou, boxes.giou, boxes.pairwise_iou, boxes.pairwise_giou):
        np.testing.assert_array_equal(fn(torch.from_numpy(a), torch.from_numpy(b)).numpy(), fn(a, b))


def test_iou_scalar_is_iou() -> None:
    rng = np.random.default_rng(4)
    a, b = _random_boxes(rng, 2000), _random_boxes(rng, 2000)
    b[::3] = a[::3] + rng.integers(-3, 4, (len(b[::3]), 4))
    got = [boxes.iou_scalar(x, y) for x, y in zip(a.tolist(), b.tolist())]
    np.testing.assert_array_equal(got, boxes.iou(a, b))
    got = [boxes.iou_scalar(x, y, eps=1e-12) for x, y in zip(a.tolist(), b.tolist())]
    np.testing.assert_array_equal(got, boxes.iou(a, b, eps=1e-12))
    # integer boxes (the synthetic generator's): exact Python arithmetic, a float out
    value = boxes.iou_scalar((0, 0, 10, 10), (5, 0, 15, 10))
    assert value == 1 / 3 and type(value) is float
    assert boxes.iou_scalar((0, 0, 10, 10), (20, 0, 30, 10)) == 0.0
    assert boxes.iou_scalar((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0


def test_best_overlap() -> None:
    rng = np.random.default_rng(6)
    a, b = _random_boxes(rng, 300), _random_boxes(rng, 300)
    b[::4] = a[::4] + rng.integers(-3, 4, (len(b[::4]), 4))
    for i in range(0, 290, 3):
        others = b[i : i + 9]
        ious = boxes.iou(a[i], others, eps=1e-12)
        assert boxes.best_overlap(a[i].tolist(), others.tolist(), eps=1e-12) == (int(np.argmax(ious)), ious.max())
    # strictly above the threshold, the first of equals; nothing above it -> (-1, above)
    box = (0, 0, 10, 10)
    others = [(20, 0, 30, 10), (5, 0, 15, 10), (0, 0, 10, 10), (0, 0, 10, 10)]
    assert boxes.best_overlap(box, others) == (2, 1.0)
    assert boxes.best_overlap(box, others[:2], above=0.3) == (1, 1 / 3)
    assert boxes.best_overlap(box, others[:2], above=1 / 3) == (-1, 1 / 3)
    assert boxes.best_overlap(box, others[:1]) == (0, 0.0)  # no overlap, IoU 0, still above the default -1
    assert boxes.best_overlap(box, others[:1], above=0.0) == (-1, 0.0)
    assert boxes.best_overlap(box, []) == (-1, -1.0)


def test_torch_keeps_dtype_and_gradient() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]], requires_grad=True)
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [6.0, 0.0, 8.0, 4.0]])
    iou, giou = boxes.iou_giou(a, b)
    assert iou.dtype == torch.float32 and giou.dtype == torch.float32
    (1 - giou).sum().backward()
    # pair 0: GIoU = IoU = 50 / 150 = enclosing / union; moving a's x2 right by d: inter 50 + 10 d, union stays 150
    # (a grows by 10 d, all of it inside b) -> dGIoU/dx2 = 10/150. Pair 1 (disjoint, gap 2): GIoU = -(enclose -
    # union) / enclose with enclose 8 x 4 = 32, union 24 -> d/dx2 [-(32 - (24 + 4 d)) / 32] = 4/32
    assert a.grad[0, 2].item() == pytest.approx(-10 / 150)
    assert a.grad[1, 2].item() == pytest.approx(-4 / 32)
    # float64 gradients against finite differences, on valid boxes
    rng = np.random.default_rng(5)
    x = torch.from_numpy(_random_boxes(rng, 12)[2:]).requires_grad_(True)
    y = torch.from_numpy(_random_boxes(rng, 12)[2:] + 0.123456)  # no coordinate tie with x: no kink at x
    assert torch.autograd.gradcheck(lambda p: boxes.giou(p, y), (x,))


def test_given_areas_replace_the_corner_areas() -> None:
    # centre-size boxes know w * h exactly; the union then uses these areas
    a, b = np.array([0.0, 0.0, 10.0, 10.0]), np.array([5.0, 0.0, 15.0, 10.0])
    iou, giou = boxes.iou_giou(a, b, area_a=100.0, area_b=250.0)  # a pretend area for b
    assert iou == pytest.approx(50 / 300) and giou == pytest.approx(50 / 300 - (150 - 300) / 150)
    t_iou, _ = boxes.iou_giou(torch.from_numpy(a), torch.from_numpy(b), area_a=torch.tensor(100.0), area_b=250.0)
    assert t_iou.item() == pytest.approx(50 / 300)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_area_and_clip(kind: str) -> None:
    b = _kind(kind, [[-5, 2, 20, 30], [10, 10, 4, 12], [1, 1, 2, 2]])
    np.testing.assert_array_equal(_np(boxes.area(b)), [25 * 28, -12, 1])
    np.testing.assert_array_equal(_np(boxes.clip(b, 15, 25)), [[0, 2, 15, 25], [10, 10, 4, 12], [1, 1, 2, 2]])
    # one size per box
    per_box = boxes.clip(b, _kind(kind, [15, 3, 100]), _kind(kind, [25, 11, 100]))
    np.testing.assert_array_equal(_np(per_box), [[0, 2, 15, 25], [3, 10, 3, 11], [1, 1, 2, 2]])
