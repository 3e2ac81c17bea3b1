"""Is the synthetic data learnable, and hard where the real data is hard? A tiny CNN on CPU answers.

    python scripts/synth_learnability.py [--per-class 60] [--minutes 3] [--seed 0] [--out result.json]
    python scripts/synth_learnability.py --data DIR     # crop the boxes of a `cytologia synth` folder instead

Crops of all 23 classes (the cell's box plus a 16 px margin, the 1st place's classifier input, squared and resized
to ``--crop`` px) are rendered with :func:`cytologia.data.synthetic.render.render_scene` from all acquisition
sources, JPEG-encoded with each source's tables and decoded, as a classifier would see them. A small CNN
(~80 k parameters) is trained for a fixed time budget on 2 CPU threads, then evaluated on held-out crops: macro-F1
(the challenge's classification term), accuracy, chance level (1/23), and the confusion matrices inside the hard
groups of the real data (B/MBL, M/PM/MM, LY/LGL/LH_lyAct, LY/LM/SS). The goal for the generator is "clearly above
chance, not perfect, errors concentrated in the hard groups". Prints a report and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn

from cytologia.data.schema import CLASS_TO_INDEX, CLASSES, HARD_GROUPS
from cytologia.data.synthetic.render import encode_jpeg, render_scene
from cytologia.data.synthetic.sources import SOURCES
from cytologia.errors import CytologiaInputError

log = logging.getLogger("synth_learnability")
CROP_MARGIN_PX = 16  # the 1st place's classifiers saw the box plus 16 px


def crop_square(image: np.ndarray, box: Sequence[float], size: int, margin: int = CROP_MARGIN_PX) -> np.ndarray:
    """Square crop around ``box`` plus ``margin`` (border-replicated where it leaves the image), resized to
    ``size`` px."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1, 1.0) / 2 + margin
    a, b, side = int(round(cx - half)), int(round(cy - half)), max(1, int(round(2 * half)))
    pad = max(0, -a, -b, a + side - w, b + side - h)
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    crop = image[b + pad : b + pad + side, a + pad : a + pad + side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def rendered_crops(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_class`` crops of every class, one cell per image, sources drawn uniformly: (crops (N, size, size, 3)
    uint8 BGR, labels (N,), source index (N,))."""
    rng = np.random.default_rng(seed)
    crops, labels, sources = [], [], []
    for cls in CLASSES:
        for _ in range(per_class):
            s = int(rng.integers(len(SOURCES)))
            scene = render_scene(rng, SOURCES[s], [cls])
            # Through each source's JPEG encoder: compression artefacts are part of what a classifier sees.
            image = cv2.imdecode(np.frombuffer(encode_jpeg(scene.image, SOURCES[s]), np.uint8), cv2.IMREAD_COLOR)
            crops.append(crop_square(image, scene.boxes[0], size))
            labels.append(CLASS_TO_INDEX[cls])
            sources.append(s)
    return np.stack(crops), np.array(labels), np.array(sources)


def folder_crops(data: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops of every box of ``data/train.csv`` from ``data/images``: (crops, labels, image index per crop).
    Unreadable images are skipped with a logged count; unknown class names are an error."""
    table = pd.read_csv(data / "train.csv", dtype={"NAME": str, "class": str}, keep_default_na=False)
    unknown = sorted(set(table["class"]) - set(CLASSES))
    if unknown:
        rows = (table.index[table["class"].isin(unknown)] + 1).tolist()[:5]
        raise CytologiaInputError(f"{data / 'train.csv'}: unknown class(es) {unknown} (rows {rows} ...)")
    crops, labels, groups = [], [], []
    skipped: list[str] = []
    for g, (name, rows) in enumerate(table.groupby("NAME", sort=True)):
        image = cv2.imread(str(data / "images" / name), cv2.IMREAD_COLOR)
        if image is None:
            skipped.append(name)
            continue
        for box, cls in zip(rows[["x1", "y1", "x2", "y2"]].to_numpy(float), rows["class"]):
            crops.append(crop_square(image, box, size))
            labels.append(CLASS_TO_INDEX[cls])
            groups.append(g)
    if skipped:
        log.warning(
            "%d image(s) of %s could not be read and were skipped: %s", len(skipped), data, ", ".join(skipped[:5])
        )
    if not crops:
        raise CytologiaInputError(f"{data}: no readable image with a box")
    return np.stack(crops), np.array(labels), np.array(groups)


def split_by_group(labels: np.ndarray, groups: np.ndarray, test_frac: float, seed: int) -> np.ndarray:
    """Boolean test mask: whole groups (images) held out, ~``test_frac`` of each class (by the group's first box)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    first = pd.DataFrame({"g": groups, "y": labels}).groupby("g")["y"].first()
    for _, gs in first.groupby(first):
        ids = rng.permutation(gs.index.to_numpy())
        n_test = int(round(test_frac * len(ids))) if len(ids) > 1 else 0
        test |= np.isin(groups, ids[:n_test])
    return test


class TinyCNN(nn.Module):
    """A stride-2 stem and three conv-BN-ReLU-maxpool blocks (16-32-64-96 channels, ~80 k parameters), global
    average pooling, linear head. ~13 M multiply-adds per 64 px crop: a 32-crop training step takes ~0.3-0.5 s on
    2 shared CPU threads (a 4-block 32-128 channel net without the stride-2 stem took ~3 s per 64 crops)."""

    def __init__(self, n_classes: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        chans = [width, 2 * width, 4 * width, 6 * width]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(chans[-1], n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 BGR -> (N, 3, H, W) float RGB in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations (cells have no orientation), per batch; brightness/contrast jitter
    of +-10 % per image, a mild stand-in for stain variation."""
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(3)
    x = torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), dims=(2, 3))
    gain = 1 + 0.1 * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
    shift = 0.1 * (2 * torch.rand(len(x), 1, 1, 1, generator=gen) - 1)
    return x * gain + shift


def train(
    x: torch.Tensor, y: torch.Tensor, seconds: float, seed: int, batch: int = 32, lr: float = 3e-3
) -> tuple[TinyCNN, int, int]:
    """Train for ``seconds`` of wall time, the learning rate following a cosine of the elapsed time (so the
    schedule ends on time however busy the shared CPU is). Returns the model, epochs (fractional ones count) and
    steps run."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyCNN(len(CLASSES)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    start = time.perf_counter()
    epoch = steps = 0
    last_loss = float("nan")
    done = False
    model.train()
    while not done:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 1, batch):  # a last batch of one would break BatchNorm
            frac = (time.perf_counter() - start) / seconds
            if frac >= 1.0:
                done = True
                break
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
            idx = order[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(model(augment(x[idx], gen).contiguous(memory_format=torch.channels_last)), y[idx])
            loss.backward()
            opt.step()
            steps += 1
            last_loss = loss.item()
        epoch += 1
        log.info("epoch %d: %d steps, last loss %.3f, %.0f s", epoch, steps, last_loss, time.perf_counter() - start)
    return model, epoch, steps


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Predicted class index per crop (one pass, no test-time augmentation)."""
    model.eval()
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()


def hard_group_confusions(y_true: np.ndarray, y_pred: np.ndarray) -> list[dict[str, object]]:
    """For each hard group: confusion counts among its classes (rows true, columns predicted, plus "other")."""
    out = []
    for group in HARD_GROUPS:
        idx = [CLASS_TO_INDEX[c] for c in group]
        mat = []
        for t in idx:
            pred = y_pred[y_true == t]
            mat.append([int((pred == p).sum()) for p in idx] + [int((~np.isin(pred, idx)).sum())])
        total = sum(sum(r) for r in mat)
        inside = sum(mat[i][j] for i in range(len(idx)) for j in range(len(idx)) if i != j)
        out.append({"group": list(group), "matrix": mat, "confused_within": inside, "n": total})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="crop the boxes of this data folder instead")
    parser.add_argument("--per-class", type=int, default=60, help="rendered crops per class (default 60)")
    parser.add_argument("--test-frac", type=float, default=1 / 3, help="held-out share (default 1/3)")
    parser.add_argument("--crop", type=int, default=64, help="crop side in px (default 64)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall-time budget (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0 < args.test_frac < 1:
        raise SystemExit(f"--test-frac must be in (0, 1), got {args.test_frac}")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.data is not None:
        crops, labels, groups = folder_crops(args.data, args.crop)
        origin = str(args.data)
    else:
        crops, labels, _ = rendered_crops(args.per_class, args.crop, args.seed)
        groups = np.arange(len(labels))  # one crop per image
        origin = f"render_scene, {args.per_class} per class, {len(SOURCES)} sources"
    data_s = time.perf_counter() - start
    test = split_by_group(labels, groups, args.test_frac, args.seed)
    x, y = to_tensor(crops), torch.from_numpy(labels).long()
    log.info("%d crops (%d train, %d test) in %.1f s", len(y), int((~test).sum()), int(test.sum()), data_s)

    model, epochs, steps = train(x[~test], y[~test], args.minutes * 60, args.seed)
    train_s = time.perf_counter() - start - data_s
    y_true, y_pred = labels[test], predict(model, x[test])
    present = sorted(set(y_true.tolist()))
    macro_f1 = float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
    per_class = f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    groups_conf = hard_group_confusions(y_true, y_pred)
    # Share of all errors that stay inside some hard group (a pair of classes that co-occur in a group).
    hard_pairs = {(CLASS_TO_INDEX[a], CLASS_TO_INDEX[b]) for g in HARD_GROUPS for a in g for b in g if a != b}
    errors = y_true != y_pred
    in_hard = sum((int(t), int(p)) in hard_pairs for t, p in zip(y_true[errors], y_pred[errors]))
    result = {
        "origin": origin,
        "crops": len(y),
        "train": int((~test).sum()),
        "test": int(test.sum()),
        "crop_px": args.crop,
        "epochs": epochs,
        "steps": steps,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "threads": args.threads,
        "macro_f1": round(macro_f1, 4),
        "accuracy": round(float((~errors).mean()), 4),
        "chance": round(1 / len(CLASSES), 4),
        "errors": int(errors.sum()),
        "errors_within_hard_groups": int(in_hard),
        "per_class_f1": {CLASSES[c]: round(float(f), 3) for c, f in zip(present, per_class)},
        "hard_groups": groups_conf,
        "confusion": confusion_matrix(y_true, y_pred, labels=list(range(len(CLASSES)))).tolist(),
    }
    print(f"data: {origin}; {result['train']} train / {result['test']} test crops at {args.crop} px")
    print(f"training: {steps} steps ({epochs} epochs) in {train_s:.0f} s on {args.threads} thread(s)")
    print(f"macro-F1 {macro_f1:.3f}   accuracy {result['accuracy']:.3f}   chance {result['chance']:.3f}")
    print(f"errors: {result['errors']}, of which {in_hard} inside a hard group")
    print("per-class F1: " + "  ".join(f"{c} {f:.2f}" for c, f in result["per_class_f1"].items()))
    for g in groups_conf:
        names = g["group"]
        print(
            f"hard group {'/'.join(names)}: {g['confused_within']} of {g['n']} confused within (rows true, "
            f"columns predicted {' '.join(names)} other)"
        )
        for name, row in zip(names, g["matrix"]):
            print(f"  {name:<9}" + "".join(f"{v:6d}" for v in row))
    line = json.dumps(result)
    if args.out is not None:
        args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
