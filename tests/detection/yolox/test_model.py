"""The YOLOX network: sizes against the paper, output shapes and decoding, the official key layout, the inference
wrapper (fused batch norm, RGB [0, 1] input folded into the stem)."""

from __future__ import annotations

import pytest
import torch

from cytologia.detection.yolox.model import (
    SIZES,
    YoloxInference,
    build_yolox,
    decode_boxes,
    flatten_levels,
    fuse_model,
    make_grid,
)


@pytest.mark.parametrize(("name", "millions"), [("yolox_nano", 0.91), ("yolox_tiny", 5.06), ("yolox_s", 8.97)])
def test_parameter_counts_match_the_released_models(name: str, millions: float) -> None:
    """With the 80 COCO classes, the published sizes (YOLOX paper / release: Nano 0.91 M, Tiny 5.06 M, S 8.97 M)."""
    model = build_yolox(name, num_classes=80)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


def test_every_size_builds_and_unknown_names_fail() -> None:
    assert set(SIZES) == {"yolox_nano", "yolox_tiny", "yolox_s", "yolox_m", "yolox_l", "yolox_x"}
    with pytest.raises(ValueError, match="yolox_s"):
        build_yolox("yolox_q")


def test_output_shape_and_anchor_free_decoding() -> None:
    torch.manual_seed(0)
    model = build_yolox("yolox_nano").eval()
    x = 255 * torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        maps = model.head(model.backbone(x))
    # one anchor per cell of the stride 8, 16, 32 maps: 8x12 + 4x6 + 2x3
    assert out.shape == (2, 96 + 24 + 6, 6)
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 12), (4, 6), (2, 3)]
    raw = flatten_levels(maps)
    grid, strides = make_grid(maps)
    # anchor 13 is level 0, row 1, column 1: centre = (offset + 1) * 8, size = exp(log-size) * 8
    assert grid[13].tolist() == [1.0, 1.0] and strides[13].item() == 8.0
    assert grid[96 + 7].tolist() == [1.0, 1.0] and strides[96 + 7].item() == 16.0
    expected = torch.cat(((raw[0, 13, :2] + 1) * 8, raw[0, 13, 2:4].exp() * 8))
    torch.testing.assert_close(out[0, 13, :4], expected)
    torch.testing.assert_close(decode_boxes(raw, grid, strides), out[..., :4])
    torch.testing.assert_close(out[..., 4:], raw[..., 4:].sigmoid())


def test_untrained_scores_start_at_the_prior() -> None:
    model = build_yolox("yolox_nano").eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    bias = model.head.obj_preds[0].bias.item()
    assert bias == pytest.approx(-4.595, abs=1e-3)  # logit of 0.01
    assert out[..., 4].median().item() < 0.1


def test_module_names_follow_the_official_layout() -> None:
    keys = set(build_yolox("yolox_s").state_dict())
    for key in (
        "backbone.backbone.stem.conv.conv.weight",
        "backbone.backbone.dark2.0.conv.weight",
        "backbone.backbone.dark2.1.m.0.conv2.bn.running_var",
        "backbone.backbone.dark5.1.conv2.conv.weight",  # the SPP bottleneck
        "backbone.backbone.dark5.2.conv3.bn.num_batches_tracked",
        "backbone.lateral_conv0.conv.weight",
        "backbone.C3_p4.conv1.conv.weight",
        "backbone.reduce_conv1.bn.bias",
        "backbone.bu_conv2.conv.weight",
        "backbone.C3_n4.m.0.conv1.conv.weight",
        "head.stems.2.conv.weight",
        "head.cls_convs.0.1.conv.weight",
        "head.reg_convs.1.0.bn.weight",
        "head.cls_preds.0.weight",
        "head.reg_preds.2.bias",
        "head.obj_preds.1.weight",
    ):
        assert key in keys, key
    nano = set(build_yolox("yolox_nano").state_dict())
    assert "head.cls_convs.0.0.dconv.conv.weight" in nano and "backbone.bu_conv1.pconv.bn.weight" in nano


@pytest.mark.parametrize("fuse", [False, True])
def test_inference_wrapper_takes_rgb_unit_input(fuse: bool) -> None:
    """YoloxInference (BN fused or not, RGB [0, 1] folded into the stem) == the core network on BGR 0-255."""
    torch.manual_seed(1)
    model = build_yolox("yolox_nano")
    model.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for _ in range(3):
            model.raw(255 * torch.rand(4, 3, 64, 64))
    model.eval()
    rgb = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        core = model(rgb[:, [2, 1, 0]] * 255)
        wrapped = YoloxInference.from_model(model, fuse=fuse)(rgb)
    assert wrapped.shape == (2, 5, core.shape[1])
    torch.testing.assert_close(wrapped[:, :4], core[..., :4].permute(0, 2, 1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(wrapped[:, 4], core[..., 4] * core[..., 5], rtol=1e-4, atol=1e-5)
    # the original model is left untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_fuse_removes_batch_norm() -> None:
    model = fuse_model(build_yolox("yolox_nano").eval())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
