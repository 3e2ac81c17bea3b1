"""The YOLOX network (Ge et al., "YOLOX: Exceeding YOLO Series in 2021", arXiv:2107.08430), written for this project.

Architecture, as the paper and the public model descriptions give it:

- **backbone** -- CSPDarknet: a space-to-depth stem (:class:`Focus`: the four pixel phases of each 2x2 block stacked
  as channels, then a 3x3 conv), four stages ``dark2..dark5`` (a stride-2 conv then a CSP layer; ``dark5`` adds an
  SPP bottleneck of 5/9/13 max-pools before its CSP layer, whose bottlenecks have no shortcut);
- **neck** -- PAFPN: top-down path (1x1 lateral conv, nearest upsampling, concat, CSP) then bottom-up path (stride-2
  conv, concat, CSP), giving features at strides 8, 16 and 32;
- **head** -- decoupled per level: a 1x1 stem conv, then two 3x3 convs for classification and two for regression;
  the regression branch feeds both the box (4) and the objectness (1) predictions;
- **decoding** -- anchor-free: one prediction per feature-map cell; centre ``(offset + cell) * stride``, size
  ``exp(log-size) * stride``.

Module and parameter names follow the layout of the official Megvii release (``backbone.backbone.stem.conv.conv.
weight``, ``backbone.lateral_conv0...``, ``head.cls_preds.0.weight``...), so its checkpoints load one to one
(:mod:`cytologia.detection.yolox.checkpoint`). Input convention of the core network: BGR, 0-255, no normalisation
(that of the release); :class:`YoloxInference` adapts the pipeline's RGB [0, 1] input.

Batch norm uses eps 1e-3 and momentum 0.03, the values the released models were trained with (PyTorch's defaults,
1e-5 / 0.1, would give different outputs on the same weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03
STRIDES: tuple[int, int, int] = (8, 16, 32)
IN_CHANNELS: tuple[int, int, int] = (256, 512, 1024)  # dark3, dark4, dark5 at width 1.0
HEAD_CHANNELS = 256  # head width at width 1.0
PRIOR_PROB = 0.01  # initial foreground probability of the cls/obj biases (focal-loss style init)


@dataclass(frozen=True)
class YoloxSize:
    """Depth and width multipliers of one model size; ``depthwise``: 3x3 convs as depthwise + pointwise (nano)."""

    depth: float
    width: float
    depthwise: bool = False


# The sizes of the YOLOX family (paper, Table 3/4 and the released configurations).
SIZES: dict[str, YoloxSize] = {
    "yolox_nano": YoloxSize(0.33, 0.25, depthwise=True),
    "yolox_tiny": YoloxSize(0.33, 0.375),
    "yolox_s": YoloxSize(0.33, 0.50),
    "yolox_m": YoloxSize(0.67, 0.75),
    "yolox_l": YoloxSize(1.0, 1.0),
    "yolox_x": YoloxSize(1.33, 1.25),
}


# ---------------------------------------------------------------------------------------------------- blocks
class BaseConv(nn.Module):
    """Conv2d (no bias, "same" padding) -> BatchNorm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, ksize: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, ksize, stride, padding=(ksize - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DWConv(nn.Module):
    """Depthwise ``ksize`` conv then pointwise 1x1 conv, each with BN and SiLU (the nano model's 3x3 convs)."""

    def __init__(self, c_in: int, c_out: int, ksize: int, stride: int = 1) -> None:
        super().__init__()
        self.dconv = BaseConv(c_in, c_in, ksize, stride, groups=c_in)
        self.pconv = BaseConv(c_in, c_out, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pconv(self.dconv(x))


def _conv(depthwise: bool) -> type[BaseConv] | type[DWConv]:
    return DWConv if depthwise else BaseConv


class Focus(nn.Module):
    """Space to depth: (B, C, H, W) -> (B, 4C, H/2, W/2), the four pixel phases as channels, then a conv.

    Channel order of the phases: (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)
    -- the order the released weights expect.
    """

    def __init__(self, c_in: int, c_out: int, ksize: int = 3) -> None:
        super().__init__()
        self.conv = BaseConv(c_in * 4, c_out, ksize, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phases = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(torch.cat(phases, dim=1))


class Bottleneck(nn.Module):
    """1x1 conv to ``c_out * expansion`` channels, 3x3 conv back to ``c_out``; residual when shapes allow."""

    def __init__(
        self, c_in: int, c_out: int, shortcut: bool = True, expansion: float = 0.5, depthwise: bool = False
    ) -> None:
        super().__init__()
        hidden = int(c_out * expansion)
        self.conv1 = BaseConv(c_in, hidden, 1, 1)
        self.conv2 = _conv(depthwise)(hidden, c_out, 3, 1)
        self.use_add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nn.Module):
    """Cross-stage partial layer: two 1x1 branches of half width, ``n`` bottlenecks on the first, concat, 1x1 conv."""

    def __init__(
        self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, expansion: float = 0.5, depthwise: bool = False
    ) -> None:
        super().__init__()
        hidden = int(c_out * expansion)
        self.conv1 = BaseConv(c_in, hidden, 1, 1)
        self.conv2 = BaseConv(c_in, hidden, 1, 1)
        self.conv3 = BaseConv(2 * hidden, c_out, 1, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, hidden, shortcut, 1.0, depthwise) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat((self.m(self.conv1(x)), self.conv2(x)), dim=1))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: 1x1 conv to half width, stride-1 max-pools (5, 9, 13) concatenated with the input of
    the pools, 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = c_in // 2
        self.conv1 = BaseConv(c_in, hidden, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes])
        self.conv2 = BaseConv(hidden * (len(kernel_sizes) + 1), c_out, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x, *(pool(x) for pool in self.m)], dim=1))


# ------------------------------------------------------------------------------------------- backbone and neck
class CSPDarknet(nn.Module):
    """CSPDarknet-53 scaled by ``depth``/``width``; returns the features of ``dark3``, ``dark4``, ``dark5``."""

    def __init__(self, depth: float, width: float, depthwise: bool = False) -> None:
        super().__init__()
        conv = _conv(depthwise)
        c = int(width * 64)
        n = max(round(depth * 3), 1)
        self.stem = Focus(3, c, ksize=3)
        self.dark2 = nn.Sequential(conv(c, c * 2, 3, 2), CSPLayer(c * 2, c * 2, n=n, depthwise=depthwise))
        self.dark3 = nn.Sequential(conv(c * 2, c * 4, 3, 2), CSPLayer(c * 4, c * 4, n=n * 3, depthwise=depthwise))
        self.dark4 = nn.Sequential(conv(c * 4, c * 8, 3, 2), CSPLayer(c * 8, c * 8, n=n * 3, depthwise=depthwise))
        self.dark5 = nn.Sequential(
            conv(c * 8, c * 16, 3, 2),
            SPPBottleneck(c * 16, c * 16),
            CSPLayer(c * 16, c * 16, n=n, shortcut=False, depthwise=depthwise),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.dark2(self.stem(x))
        c3 = self.dark3(x)
        c4 = self.dark4(c3)
        return c3, c4, self.dark5(c4)


class YOLOPAFPN(nn.Module):
    """CSPDarknet + path-aggregation FPN; returns features at strides 8, 16, 32 with ``IN_CHANNELS * width``
    channels."""

    def __init__(self, depth: float, width: float, depthwise: bool = False) -> None:
        super().__init__()
        conv = _conv(depthwise)
        c3, c4, c5 = (int(c * width) for c in IN_CHANNELS)
        n = round(3 * depth)
        self.backbone = CSPDarknet(depth, width, depthwise)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_conv0 = BaseConv(c5, c4, 1, 1)
        self.C3_p4 = CSPLayer(2 * c4, c4, n, shortcut=False, depthwise=depthwise)
        self.reduce_conv1 = BaseConv(c4, c3, 1, 1)
        self.C3_p3 = CSPLayer(2 * c3, c3, n, shortcut=False, depthwise=depthwise)
        self.bu_conv2 = conv(c3, c3, 3, 2)
        self.C3_n3 = CSPLayer(2 * c3, c4, n, shortcut=False, depthwise=depthwise)
        self.bu_conv1 = conv(c4, c4, 3, 2)
        self.C3_n4 = CSPLayer(2 * c4, c5, n, shortcut=False, depthwise=depthwise)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x3, x4, x5 = self.backbone(x)
        top5 = self.lateral_conv0(x5)  # stride 32, c4 channels
        p4 = self.C3_p4(torch.cat((self.upsample(top5), x4), dim=1))
        top4 = self.reduce_conv1(p4)  # stride 16, c3 channels
        out3 = self.C3_p3(torch.cat((self.upsample(top4), x3), dim=1))  # stride 8
        out4 = self.C3_n3(torch.cat((self.bu_conv2(out3), top4), dim=1))  # stride 16
        out5 = self.C3_n4(torch.cat((self.bu_conv1(out4), top5), dim=1))  # stride 32
        return out3, out4, out5


# ------------------------------------------------------------------------------------------------------- head
class YOLOXHead(nn.Module):
    """Decoupled head: per level, raw maps (B, 4 + 1 + C, H, W) -- box offsets/log-sizes, objectness logit, class
    logits."""

    def __init__(self, num_classes: int, width: float, depthwise: bool = False) -> None:
        super().__init__()
        conv = _conv(depthwise)
        hidden = int(HEAD_CHANNELS * width)
        self.num_classes = num_classes
        self.strides = STRIDES
        self.stems = nn.ModuleList()
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        self.cls_preds = nn.ModuleList()
        self.reg_preds = nn.ModuleList()
        self.obj_preds = nn.ModuleList()
        for c in IN_CHANNELS:
            self.stems.append(BaseConv(int(c * width), hidden, 1, 1))
            self.cls_convs.append(nn.Sequential(conv(hidden, hidden, 3, 1), conv(hidden, hidden, 3, 1)))
            self.reg_convs.append(nn.Sequential(conv(hidden, hidden, 3, 1), conv(hidden, hidden, 3, 1)))
            self.cls_preds.append(nn.Conv2d(hidden, num_classes, 1))
            self.reg_preds.append(nn.Conv2d(hidden, 4, 1))
            self.obj_preds.append(nn.Conv2d(hidden, 1, 1))

    def initialize_biases(self, prior_prob: float = PRIOR_PROB) -> None:
        """Class and objectness biases so that every prediction starts at probability ``prior_prob``."""
        value = -math.log((1 - prior_prob) / prior_prob)
        for conv in (*self.cls_preds, *self.obj_preds):
            nn.init.constant_(conv.bias, value)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        out = []
        for k, x in enumerate(feats):
            x = self.stems[k](x)
            reg = self.reg_convs[k](x)
            cls = self.cls_preds[k](self.cls_convs[k](x))
            out.append(torch.cat((self.reg_preds[k](reg), self.obj_preds[k](reg), cls), dim=1))
        return out


# ------------------------------------------------------------------------------------------------ decoding
def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-level maps (B, K, H, W) -> (B, anchors, K), levels in order, cells row-major."""
    return torch.cat([m.flatten(start_dim=2) for m in maps], dim=2).permute(0, 2, 1)


def make_grid(maps: list[torch.Tensor], strides: tuple[int, ...] = STRIDES) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell indices (anchors, 2) as (x, y), and the stride of each anchor (anchors, 1), for maps of these shapes.

    Built from the maps' shapes, so an ONNX graph traced through it keeps a dynamic input size.
    """
    grids, steps = [], []
    for m, s in zip(maps, strides):
        h, w = m.shape[-2:]
        ys = torch.arange(h, device=m.device, dtype=torch.float32)
        xs = torch.arange(w, device=m.device, dtype=torch.float32)
        yv, xv = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((xv, yv), dim=2).reshape(-1, 2)
        grids.append(grid)
        steps.append(torch.full_like(grid[:, :1], float(s)))
    return torch.cat(grids, dim=0), torch.cat(steps, dim=0)


def decode_boxes(raw: torch.Tensor, grid: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Raw box outputs (..., 4) -> centre-size boxes in input pixels: ``(offset + cell) * stride``, ``exp * stride``."""
    return torch.cat(((raw[..., :2] + grid) * strides, torch.exp(raw[..., 2:4]) * strides), dim=-1)


class YOLOX(nn.Module):
    """Backbone + PAFPN neck (``backbone``) and decoupled head (``head``).

    ``forward(x)`` on a BGR 0-255 batch returns the decoded predictions (B, anchors, 5 + C): centre-size box in input
    pixels, objectness probability, class probabilities -- the layout of the official model's inference output.
    :meth:`raw` returns what training needs: undecoded outputs with the grid.
    """

    def __init__(self, depth: float, width: float, num_classes: int = 1, depthwise: bool = False) -> None:
        super().__init__()
        self.backbone = YOLOPAFPN(depth, width, depthwise)
        self.head = YOLOXHead(num_classes, width, depthwise)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, anchors, 5 + C) undecoded outputs (logits, offsets, log-sizes), the grid (anchors, 2) and strides
        (anchors, 1)."""
        maps = self.head(self.backbone(x))
        grid, strides = make_grid(maps, self.head.strides)
        return flatten_levels(maps), grid, strides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw, grid, strides = self.raw(x)
        return torch.cat((decode_boxes(raw, grid, strides), raw[..., 4:].sigmoid()), dim=-1)


def build_yolox(name: str, num_classes: int = 1) -> YOLOX:
    """A randomly initialised YOLOX of size ``name`` (a key of :data:`SIZES`), biases set to :data:`PRIOR_PROB`."""
    if name not in SIZES:
        raise ValueError(f"unknown YOLOX size {name!r}; sizes: {', '.join(SIZES)}")
    size = SIZES[name]
    model = YOLOX(size.depth, size.width, num_classes, size.depthwise)
    model.head.initialize_biases()
    return model


# ----------------------------------------------------------------------------------------------- inference
def _fuse_conv_bn(block: BaseConv) -> None:
    """Fold ``block.bn`` into ``block.conv`` (eval-mode statistics) and replace the BN by an identity."""
    conv, bn = block.conv, block.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        groups=conv.groups,
        bias=True,
    ).to(conv.weight.device)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    block.conv, block.bn = fused, nn.Identity()


def fuse_model(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm of a YOLOX into its conv, in place (inference only: call on an eval-mode copy)."""
    for module in model.modules():
        if isinstance(module, BaseConv) and isinstance(module.bn, nn.BatchNorm2d):
            _fuse_conv_bn(module)
    return model


def fold_rgb01_input(model: YOLOX) -> None:
    """Make the network take RGB in [0, 1] instead of BGR in 0-255, exactly, by rewriting the stem conv's weights.

    The stem conv sees 4 phases x 3 colour channels; channel ``3k + c`` of the RGB input is channel ``3k + 2 - c`` of
    the BGR input, scaled by 1/255. The weights are permuted and multiplied by 255 accordingly (no extra op in the
    graph).
    """
    conv = model.backbone.backbone.stem.conv.conv
    perm = torch.tensor([3 * k + 2 - c for k in range(4) for c in range(3)], device=conv.weight.device)
    with torch.no_grad():
        conv.weight.copy_(conv.weight[:, perm] * 255.0)


class YoloxInference(nn.Module):
    """The pipeline's view of a trained YOLOX: RGB [0, 1] input (B, 3, S, S) -> (B, 5, anchors) = centre-size box in
    input pixels and the score ``objectness * class probability`` (the best class when there are several) -- the raw
    output layout the ultralytics backend exports too, so the same NMS and ONNX tooling serve both.

    Built from a YOLOX by :meth:`from_model`: a fused copy with the input convention folded into the stem.
    """

    def __init__(self, model: YOLOX) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_model(cls, model: YOLOX, fuse: bool = True) -> YoloxInference:
        import copy

        net = copy.deepcopy(model).eval()
        if fuse:
            fuse_model(net)
        fold_rgb01_input(net)
        return cls(net).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        score = out[..., 4:5] * out[..., 5:].amax(dim=-1, keepdim=True)
        return torch.cat((out[..., :4], score), dim=-1).permute(0, 2, 1)
