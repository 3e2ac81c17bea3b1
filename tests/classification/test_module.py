"""The LightningModule and its helpers: schedule, precision choice, parameter groups, metric, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cytologia.classification.module import (
    MONITOR,
    ClassifierModule,
    checkpoint_callbacks,
    cosine_with_warmup,
    decay_groups,
    load_checkpoint,
    predict_logits,
    resolve_precision,
    score_logits,
)
from cytologia.data.schema import CLASSES, labels

TINY = "test_convnext"  # timm's 209k-parameter test ConvNeXt: the fastest of its test networks on CPU


def test_cosine_with_linear_warmup() -> None:
    f = cosine_with_warmup(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear, reaching 1 at the last step
    assert f(4) == pytest.approx(1.0)  # the cosine starts at the peak
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)  # floor, also past the end
    values = [f(s) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    g = cosine_with_warmup(0, 10, 0.0)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)


def test_precision_choice() -> None:
    assert resolve_precision("32", "cpu") == "32-true"
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cuda") == "bf16-mixed"
    expected = "32-true"
    if torch.cuda.is_available():
        expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert resolve_precision("auto", "auto") == expected


def test_no_weight_decay_on_biases_norms_and_tokens() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    model[0].weight.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [model[3].weight.shape]
    assert len(no_decay["params"]) == 4  # conv bias, bn weight + bias, linear bias


def test_macro_f1_on_the_23_classes_only() -> None:
    names = list(labels(background=True))
    logits = np.zeros((4, 24), np.float32)
    logits[:, 23] = 10.0  # background wins overall, but a box must get a cell class
    logits[[0, 1], 0] = 1.0
    logits[[2, 3], 5] = 1.0
    y = np.array([0, 0, 5, -1])  # the last box has no known label: not scored
    f1, acc = score_logits(logits, y, names, n_cell_classes=len(CLASSES))
    assert f1 == 1.0 and acc == 1.0
    y2 = np.array([0, 5, 5, -1])  # B->B, LF->B (wrong), LF->LF: per-label F1 B 2/3, LF 2/3
    assert score_logits(logits, y2, names)[0] == pytest.approx(2 / 3)
    assert score_logits(logits, np.full(4, -1), names) == (0.0, 0.0)


class _Constant(L.LightningModule):
    """Learns nothing useful and reports the same validation metric every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def training_step(self, batch: torch.Tensor, idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, idx: int) -> None:
        self.log(MONITOR, 0.5)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_follows_every_epoch_even_without_improvement(tmp_path: Path) -> None:
    data = DataLoader(torch.randn(8, 2), batch_size=4)
    best, last = checkpoint_callbacks(tmp_path)
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[best, last],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(_Constant(), data, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    read = lambda name: load_checkpoint(tmp_path / name)  # noqa: E731
    assert read("last.ckpt")["global_step"] == 6  # 3 epochs x 2 steps: the resume point is the latest epoch
    assert read("best.ckpt")["global_step"] == 2  # 0.5 never improves on itself after epoch 1


class _Crops(Dataset):
    """Random 32 px "crops" with fixed labels, as CropDataset items."""

    def __init__(self, n: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = torch.arange(n) % 4

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "box_id": torch.tensor(i), "index": torch.tensor(i)}


def _module(**kwargs: object) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(TINY, list(CLASSES), 32, lr=3e-3, warmup_epochs=0, **kwargs)  # type: ignore[arg-type]


def test_a_few_steps_fit_a_fixed_batch() -> None:
    module = _module(loss={"name": "cross_entropy", "label_smoothing": 0.0})
    batch = next(iter(DataLoader(_Crops(), batch_size=8)))
    opt = torch.optim.AdamW(decay_groups(module.model, 0.0), lr=3e-3)
    module.train()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = module.criterion(module(batch["image"]), batch["label"])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_mixed_batches_give_soft_targets() -> None:
    module = _module(mix={"mix_prob": 1.0, "mixup_alpha": 0.4, "cutmix_alpha": 0.0})
    batch = next(iter(DataLoader(_Crops(), batch_size=8)))
    images, targets = module._mixed(batch["image"], batch["label"])
    assert targets.shape == (8, len(CLASSES)) and torch.allclose(targets.sum(1), torch.ones(8))
    assert not torch.equal(images, batch["image"])
    off = _module(mix={"mix_prob": 0.0, "mixup_alpha": 0.4, "cutmix_alpha": 1.0})
    same, hard = off._mixed(batch["image"], batch["label"])
    assert same is batch["image"] and hard is batch["label"]


def test_predict_logits_with_flip_and_order() -> None:
    module = _module()
    data = _Crops(6)
    plain, flipped, index = predict_logits(module.model, DataLoader(data, batch_size=4), hflip=True)
    assert plain.shape == flipped.shape == (6, len(CLASSES)) and index.tolist() == list(range(6))
    with torch.no_grad():
        module.model.eval()
        expected = module.model(torch.flip(data.images, dims=(3,))).numpy()
    np.testing.assert_allclose(flipped, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_mixed_precision_steps_on_cuda(tmp_path: Path) -> None:
    precision = resolve_precision("auto", "cuda")
    module = _module()
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=list(checkpoint_callbacks(tmp_path)),
        enable_model_summary=False,
    )
    loader = DataLoader(_Crops(16), batch_size=8)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics[MONITOR]))
