"""SimOTA on hand-made cases: one stride-8 level of 8 x 8 cells on a 64 px input, predicted boxes placed by hand."""

from __future__ import annotations

import torch

from cytologia.detection.yolox.assign import center_prior, in_boxes, simota

STRIDE = 8.0
FAR = torch.tensor([500.0, 500.0, 1.0, 1.0])  # a predicted box overlapping nothing (IoU 0)


def grid_8x8() -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    grid = torch.stack((xs, ys), dim=2).reshape(-1, 2)
    return grid, torch.full((64, 1), STRIDE)


def cell(x: int, y: int) -> int:
    return y * 8 + x


def run(gt: torch.Tensor, pred: torch.Tensor, mode: str = "center") -> tuple[list[int], list[int], list[float]]:
    grid, strides = grid_8x8()
    n = pred.shape[0]
    a = simota(
        gt, torch.zeros(len(gt), dtype=torch.long), pred, torch.zeros(n, 1), torch.zeros(n), grid, strides, mode=mode
    )
    fg = a.fg_mask.nonzero(as_tuple=True)[0].tolist()
    return fg, a.matched_gt.tolist(), a.matched_iou.tolist()


def test_centre_region_of_a_box() -> None:
    grid, strides = grid_8x8()
    gt = torch.tensor([[28.0, 28.0, 16.0, 16.0]])
    inside = center_prior(gt, grid, strides, 1.5)[0]
    # cell centres 4 + 8 i within 12 px of 28 on both axes: i in {2, 3, 4}
    assert sorted(inside.nonzero(as_tuple=True)[0].tolist()) == sorted(cell(x, y) for x in (2, 3, 4) for y in (2, 3, 4))
    # strictly inside the box [20, 36]: only the centre 28
    assert in_boxes(gt, grid, strides)[0].nonzero(as_tuple=True)[0].tolist() == [cell(3, 3)]


def test_dynamic_k_takes_the_cheapest_candidates() -> None:
    gt = torch.tensor([[28.0, 28.0, 16.0, 16.0]])
    pred = FAR.repeat(64, 1)
    perfect = [cell(3, 3), cell(2, 3), cell(4, 4)]
    for i in perfect:
        pred[i] = gt[0]
    pred[cell(2, 2)] = torch.tensor([28.0, 28.0, 16.0, 8.0])  # IoU 0.5
    pred[cell(0, 0)] = gt[0]  # perfect but outside the centre region: not a candidate
    for i in (cell(4, 2), cell(2, 4), cell(3, 2), cell(3, 4), cell(4, 3)):
        pred[i] = torch.tensor([28.0, 28.0, 16.0, 3.2])  # IoU 0.2
    # top-10 IoUs among the 9 candidates: 1 + 1 + 1 + 0.5 + 5 x 0.2 = 4.5 -> k = 4
    fg, matched, ious = run(gt, pred)
    assert sorted(fg) == sorted([*perfect, cell(2, 2)])
    assert matched == [0, 0, 0, 0]
    assert sorted(round(v, 4) for v in ious) == [0.5, 1.0, 1.0, 1.0]


def test_a_box_gets_at_least_one_positive() -> None:
    gt = torch.tensor([[28.0, 28.0, 16.0, 16.0]])
    fg, matched, ious = run(gt, FAR.repeat(64, 1))  # no overlap anywhere: k = max(0, 1)
    assert len(fg) == 1 and fg[0] in {cell(x, y) for x in (2, 3, 4) for y in (2, 3, 4)} and ious == [0.0]


def test_an_anchor_wanted_by_two_boxes_goes_to_the_cheaper_one() -> None:
    gt = torch.tensor([[28.0, 28.0, 16.0, 16.0], [36.0, 36.0, 16.0, 16.0]])
    pred = FAR.repeat(64, 1)
    shared = cell(3, 3)  # centre (28, 28): in both centre regions
    pred[shared] = torch.tensor([30.0, 30.0, 16.0, 16.0])  # closer to box 0 (IoU 0.62) than to box 1 (IoU 0.18)
    fg, matched, _ = run(gt, pred)
    # both boxes have k = 1 and both want the shared anchor (every other prediction has IoU 0): box 0 keeps it and
    # box 1 is left without a positive in this image -- SimOTA does not re-assign the loser
    assert fg == [shared] and matched == [0]


def test_box_and_center_mode_penalises_anchors_outside_the_box() -> None:
    gt = torch.tensor([[28.0, 28.0, 16.0, 16.0]])
    pred = FAR.repeat(64, 1)
    pred[cell(2, 3)] = gt[0]  # perfect prediction, cell centre (20, 28): in the centre region, on the box edge
    pred[cell(3, 3)] = torch.tensor([28.0, 28.0, 16.0, 4.0])  # IoU 0.25, cell centre inside the box
    fg, _, _ = run(gt, pred, mode="center")  # k = int(1.25) = 1: the perfect one
    assert fg == [cell(2, 3)]
    fg, _, _ = run(gt, pred, mode="box_and_center")  # the only anchor both in the box and its centre region
    assert fg == [cell(3, 3)]


def test_no_boxes_no_positives() -> None:
    fg, matched, _ = run(torch.zeros(0, 4), FAR.repeat(64, 1))
    assert fg == [] and matched == []
