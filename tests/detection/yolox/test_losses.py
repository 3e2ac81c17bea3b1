"""Box geometry and the YOLOX losses on tiny hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from cytologia.detection.yolox.boxes import iou_giou, pairwise_iou
from cytologia.detection.yolox.losses import box_loss, l1_target, yolox_loss
from cytologia.detection.yolox.model import build_yolox, decode_boxes


def b(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


@pytest.mark.parametrize(
    ("other", "iou", "giou"),
    [
        (b(1, 1, 2, 2), 1.0, 1.0),  # identical
        (b(2, 1, 2, 2), 1 / 3, 1 / 3),  # half overlap: inter 2, union 6, hull 6
        (b(3, 1, 2, 2), 0.0, 0.0),  # touching: hull = union
        (b(5, 1, 2, 2), 0.0, -1 / 3),  # gap of 2: union 8, hull 12
    ],
)
def test_iou_and_giou_on_hand_cases(other: torch.Tensor, iou: float, giou: float) -> None:
    got_iou, got_giou = iou_giou(b(1, 1, 2, 2), other)
    assert got_iou.item() == pytest.approx(iou, abs=1e-6)
    assert got_giou.item() == pytest.approx(giou, abs=1e-6)


def test_box_losses() -> None:
    pred, target = torch.stack([b(1, 1, 2, 2), b(5, 1, 2, 2)]), torch.stack([b(2, 1, 2, 2), b(1, 1, 2, 2)])
    torch.testing.assert_close(box_loss(pred, target, "giou"), torch.tensor([2 / 3, 4 / 3]))
    torch.testing.assert_close(box_loss(pred, target, "iou"), torch.tensor([1 - 1 / 9, 1.0]))
    with pytest.raises(ValueError, match="giou"):
        box_loss(pred, target, "ciou")
    assert pairwise_iou(pred, target).shape == (2, 2)


def test_l1_target_is_the_raw_encoding() -> None:
    grid, strides = torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([[8.0], [16.0]])
    boxes = torch.tensor([[30.0, 38.0, 20.0, 12.0], [10.0, 20.0, 64.0, 40.0]])
    torch.testing.assert_close(decode_boxes(l1_target(boxes, grid, strides), grid, strides), boxes)


def _raw(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_yolox("yolox_nano").train()
    return model.raw(255 * torch.rand(2, 3, 64, 64))


def test_loss_without_boxes_is_objectness_only() -> None:
    raw, grid, strides = _raw()
    out = yolox_loss(raw, grid, strides, [torch.zeros(0, 5), torch.zeros(0, 5)])
    assert out.box == 0 and out.cls == 0 and out.l1 == 0 and out.num_fg == 0
    # every anchor is background: the sum of BCE(obj, 0) over the 2 x 84 anchors, divided by max(n_fg, 1) = 1
    expected = torch.nn.functional.softplus(raw[..., 4].detach().float()).sum()
    assert out.obj == pytest.approx(float(expected), rel=1e-5)
    out.total.backward()


def test_loss_with_boxes_has_every_term_and_gradients() -> None:
    raw, grid, strides = _raw()
    raw.retain_grad()
    targets = [
        torch.tensor([[0, 32.0, 32.0, 30.0, 24.0]]),
        torch.tensor([[0, 16.0, 20.0, 12.0, 12.0], [0, 44.0, 44.0, 20.0, 30.0]]),
    ]
    out = yolox_loss(raw, grid, strides, targets, kind="giou", use_l1=True)
    assert out.num_fg >= 1 and out.box > 0 and out.cls > 0 and out.obj > 0 and out.l1 > 0
    assert out.total.item() == pytest.approx(5 * out.box + out.obj + out.cls + out.l1, rel=1e-5)
    out.total.backward()
    assert raw.grad is not None and raw.grad[..., :4].abs().sum() > 0 and raw.grad[..., 5].abs().sum() > 0
    iou = yolox_loss(raw, grid, strides, targets, kind="iou")
    assert iou.l1 == 0 and iou.box != out.box
    with pytest.raises(ValueError, match="box loss"):
        yolox_loss(raw, grid, strides, targets, kind="l2")
