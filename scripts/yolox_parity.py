"""Check our YOLOX against the official implementation on the same weights (a one-off check, not a test).

The official code is *not* a dependency; install it outside the project environment, e.g.::

    pip install --target /tmp/yoloxpkg --no-deps --no-build-isolation yolox==0.3.0 loguru tabulate thop
    python scripts/yolox_parity.py --yolox-path /tmp/yoloxpkg

For each size: the official model is built through its own experiment file (``yolox.exp.get_exp`` +
``exp.get_model()``, which sets its batch-norm constants and biases), our model with the same number of classes;
our random weights (batch-norm statistics randomised too) are copied into the official model with
``load_state_dict(strict=True)`` -- the key layout must match one to one -- and both run on the same BGR 0-255 batch:

- eval mode: decoded outputs (B, anchors, 5 + C), max |ours - official|;
- train mode: the total loss on the same targets (SimOTA + losses), for the IoU loss, the GIoU loss (the official
  head's IoU loss set to GIoU) and GIoU + L1 (its ``use_l1`` on) -- with our SimOTA in ``box_and_center`` mode,
  the prior of the 0.3.0 release (our default ``center`` prior, that of the later YOLOX code, picks other anchors
  for some boxes).

Prints one line per size and a JSON summary (``--json`` writes it to a file), then the verdict against the
tolerances (``--eval-atol``, default :data:`EVAL_ATOL`, on the eval outputs -- input pixels and probabilities --;
``--loss-atol``, default :data:`LOSS_ATOL`, on each total loss): exit status 1 when any figure is past its tolerance
(or not a number). Measured with yolox 0.3.0 (nano, tiny, s and m; 80 and 1 classes; both default shapes): eval max
|diff| 9.3e-10, loss |diff| 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cytologia.detection.yolox.losses import yolox_loss
from cytologia.detection.yolox.model import SIZES, YOLOX, build_yolox

EVAL_ATOL = 1e-4  # max |ours - official| of the decoded eval outputs (input px, probabilities); measured 9.3e-10
LOSS_ATOL = 1e-4  # |ours - official| of each total loss (~15-21 on random weights); measured 0
LOSS_KINDS = ("iou", "giou", "giou_l1")
SHAPES = ("320x320", "256x384")


def randomise_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random batch-norm affine parameters and running statistics (the init values would hide a wrong BN)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def official_model(name: str, num_classes: int) -> torch.nn.Module:
    from yolox.exp import get_exp

    exp = get_exp(exp_name=name.replace("_", "-"))
    exp.num_classes = num_classes
    return exp.get_model()


def targets_for(batch: int, size: int, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random boxes (1-6 per image, class 0): ours as a list of (n, 5), the official padded (B, 10, 5)."""
    ours, padded = [], torch.zeros(batch, 10, 5)
    for b in range(batch):
        n = int(torch.randint(1, 7, (1,), generator=gen))
        wh = size * (0.1 + 0.4 * torch.rand(n, 2, generator=gen))
        c = wh / 2 + (size - wh) * torch.rand(n, 2, generator=gen)
        t = torch.cat((torch.zeros(n, 1), c, wh), dim=1)
        ours.append(t)
        padded[b, :n] = t
    return ours, padded


def compare(name: str, num_classes: int, size: tuple[int, int], seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ours: YOLOX = build_yolox(name, num_classes)
    randomise_bn(ours, gen)
    theirs = official_model(name, num_classes)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the layout maps one to one
    x = 255.0 * torch.rand(4, 3, *size, generator=gen)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    out = {"eval_shape": list(a.shape), "eval_max_abs_diff": float((a - b).abs().max())}
    out["eval_max_rel_diff_box"] = float(((a[..., :4] - b[..., :4]).abs() / b[..., :4].abs().clamp(min=1)).max())
    # training losses: batch statistics in BN, so both must see the same weights and input in train mode
    ours_t, padded = targets_for(x.shape[0], min(size), gen)
    for kind in LOSS_KINDS:
        l1 = kind.endswith("_l1")
        ours.train()
        theirs.train()
        theirs.head.iou_loss.loss_type = kind.split("_")[0]
        theirs.head.use_l1 = l1
        raw, grid, strides = ours.raw(x)
        mine = yolox_loss(raw, grid, strides, ours_t, kind=kind.split("_")[0], use_l1=l1, assign_mode="box_and_center")
        official = theirs(x, padded)
        out[f"{kind}_total_loss_ours"] = float(mine.total.detach())
        out[f"{kind}_total_loss_official"] = float(official["total_loss"].detach())
        out[f"{kind}_num_fg_ours"] = mine.num_fg
        out[f"{kind}_loss_abs_diff"] = abs(float(mine.total.detach()) - float(official["total_loss"].detach()))
    return out


def failures(results: dict[str, dict[str, float]], eval_atol: float, loss_atol: float) -> list[str]:
    """One line per figure past its tolerance (a NaN is past any tolerance); empty when everything agrees."""
    bad = []
    for key, r in results.items():
        checks = [("eval max|diff|", r["eval_max_abs_diff"], eval_atol)]
        checks += [(f"{kind} loss |diff|", r[f"{kind}_loss_abs_diff"], loss_atol) for kind in LOSS_KINDS]
        bad += [f"{key}: {what} {value:.3e} > {tol:g}" for what, value, tol in checks if not value <= tol]
    return bad


def _shape(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 320x320") from None
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"{text!r}: sides must be positive multiples of 32")
    return h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=f"Exit status 1 when a figure is past its tolerance: eval max|diff| > --eval-atol (default "
        f"{EVAL_ATOL:g}) or a total loss |diff| > --loss-atol (default {LOSS_ATOL:g}).",
    )
    parser.add_argument("--yolox-path", type=Path, help="folder holding the official `yolox` package (pip --target)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--classes", type=int, nargs="+", default=[80, 1])
    parser.add_argument(
        "--shapes",
        type=_shape,
        nargs="+",
        default=[_shape(s) for s in SHAPES],
        help=f"input shapes HxW (default {' '.join(SHAPES)})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-atol",
        type=float,
        default=EVAL_ATOL,
        help=f"tolerance on max |ours - official| of the eval outputs ({EVAL_ATOL:g})",
    )
    parser.add_argument(
        "--loss-atol",
        type=float,
        default=LOSS_ATOL,
        help=f"tolerance on |ours - official| of each total loss ({LOSS_ATOL:g})",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.yolox_path is not None:
        sys.path.insert(0, str(args.yolox_path))
    torch.set_grad_enabled(True)
    results = {}
    for name in args.sizes:
        for c in args.classes:
            for size in args.shapes:
                r = compare(name, c, size, args.seed)
                key = f"{name}/{c}cls/{size[0]}x{size[1]}"
                results[key] = r
                print(
                    f"{key}: eval max|diff| {r['eval_max_abs_diff']:.3e} (rel box {r['eval_max_rel_diff_box']:.1e}); "
                    f"loss iou {r['iou_total_loss_ours']:.5f} vs {r['iou_total_loss_official']:.5f}, "
                    f"giou {r['giou_total_loss_ours']:.5f} vs {r['giou_total_loss_official']:.5f}, "
                    f"giou+l1 {r['giou_l1_total_loss_ours']:.5f} vs {r['giou_l1_total_loss_official']:.5f}"
                )
    worst = max(r["eval_max_abs_diff"] for r in results.values())
    worst_loss = max(r[f"{k}_loss_abs_diff"] for r in results.values() for k in LOSS_KINDS)
    bad = failures(results, args.eval_atol, args.loss_atol)
    summary = {
        "max_abs_diff_eval": worst,
        "max_abs_diff_loss": worst_loss,
        "eval_atol": args.eval_atol,
        "loss_atol": args.loss_atol,
        "passed": not bad,
        "results": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    verdict = "PASS" if not bad else f"FAIL ({len(bad)} figure(s) past tolerance)"
    print(f"tolerance: eval max|diff| <= {args.eval_atol:g}, total loss |diff| <= {args.loss_atol:g}: {verdict}")
    for line in bad:
        print(f"  {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
