"""DinoBloom: a checkpoint written in the public format (teacher dict, backbone./dino_head./ibot_head. keys, a
224 px position embedding) loads strictly into timm's ViT-S/14; wrong keys and shapes fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cytologia.classification.dinobloom import DINOBLOOM_ARCH, dinobloom_state_dict, load_dinobloom_weights
from cytologia.classification.models import create_classifier
from cytologia.data.errors import CytologiaInputError
from cytologia.weights import add_to_manifest


def _teacher(backbone: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """A DINOv2 training checkpoint's teacher dict around ``backbone`` (what DinoBloom-*.pth hold)."""
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher["backbone.mask_token"] = torch.zeros(1, dim)
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, dim)
    teacher["dino_head.last_layer.weight_g"] = torch.ones(16, 1)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(8, dim)
    return teacher


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """A randomly initialised DinoBloom-S backbone at 224 px (no head), standing in for the released weights."""
    model = create_classifier("dinobloom_s", 0)
    assert model.pos_embed.shape == (1, 257, 384)  # 1 + (224 / 14)^2 tokens, as DINOv2 was trained
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(source: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``source`` written as DinoBloom-S.pth in the public format and registered in a models folder."""
    folder = tmp_path_factory.mktemp("models")
    path = folder / "DinoBloom-S.pth"
    torch.save({"teacher": _teacher(source.state_dict(), 384), "iteration": 1000}, path)
    add_to_manifest(path, "unit test", folder)
    return path


def test_dinobloom_checkpoint_round_trip(checkpoint: Path, source: torch.nn.Module) -> None:
    model = create_classifier("dinobloom_s", 24, weights=checkpoint.name, models_dir=checkpoint.parent)
    assert model.head.weight.shape == (24, 384)  # new head, left at init
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert set(loaded) - set(source.state_dict()) == {"head.weight", "head.bias"}


def test_dinobloom_at_another_size_resamples_the_position_embedding(checkpoint: Path, source: torch.nn.Module) -> None:
    model = create_classifier("dinobloom_s", 23, img_size=112)
    load_dinobloom_weights(model, checkpoint)
    assert model.pos_embed.shape == (1, 65, 384)
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's embedding is kept


@pytest.fixture(scope="module")
def model23() -> torch.nn.Module:
    """A DinoBloom-S classifier with 23 classes at 224 px."""
    return create_classifier("dinobloom_s", 23)


def test_wrong_keys_and_shapes_fail_naming_the_key(
    tmp_path: Path, source: torch.nn.Module, model23: torch.nn.Module
) -> None:
    model = model23
    state = source.state_dict()

    def load(teacher: dict[str, torch.Tensor], name: str) -> None:
        path = tmp_path / name
        torch.save({"teacher": teacher}, path)
        load_dinobloom_weights(model, path)

    extra = _teacher(state, 384)
    extra["backbone.blocks.0.attn.rel_bias"] = torch.zeros(3)
    with pytest.raises(CytologiaInputError, match=r"unexpected in checkpoint: blocks\.0\.attn\.rel_bias"):
        load(extra, "extra.pth")
    shape = _teacher(state, 384)
    shape["backbone.blocks.3.mlp.fc1.weight"] = torch.zeros(10, 384)
    with pytest.raises(CytologiaInputError, match=r"blocks\.3\.mlp\.fc1\.weight \(10, 384\) vs model \(1536, 384\)"):
        load(shape, "shape.pth")
    missing = _teacher(state, 384)
    del missing["backbone.norm.weight"]
    with pytest.raises(CytologiaInputError, match=r"missing from checkpoint: norm\.weight"):
        load(missing, "missing.pth")
    stray = _teacher(state, 384)
    stray["student_head.w"] = torch.zeros(1)
    with pytest.raises(CytologiaInputError, match="unexpected teacher key 'student_head.w'"):
        load(stray, "stray.pth")
    torch.save({"student": {}}, tmp_path / "student.pth")
    with pytest.raises(CytologiaInputError, match="not a timm|no state dict"):
        load_dinobloom_weights(model, tmp_path / "student.pth")


def test_checkpoint_key_conversion() -> None:
    """FSDP block chunks (blocks.<chunk>.<i>.) flatten, SwiGLU w12/w3 become fc1/fc2, heads and mask_token go."""
    teacher = {
        "backbone.blocks.1.3.attn.qkv.weight": torch.zeros(1),
        "backbone.blocks.2.mlp.w12.weight": torch.zeros(1),
        "backbone.blocks.2.mlp.w3.bias": torch.zeros(1),
        "backbone.mask_token": torch.zeros(1),
        "backbone.cls_token": torch.zeros(1),
        "dino_head.last_layer.weight_v": torch.zeros(1),
        "ibot_head.mlp.0.bias": torch.zeros(1),
    }
    assert set(dinobloom_state_dict({"teacher": teacher})) == {
        "blocks.3.attn.qkv.weight",
        "blocks.2.mlp.fc1.weight",
        "blocks.2.mlp.fc2.bias",
        "cls_token",
    }
    with pytest.raises(CytologiaInputError, match="no 'teacher'"):
        dinobloom_state_dict({"model": teacher})
    assert set(DINOBLOOM_ARCH) == {"dinobloom_s", "dinobloom_b", "dinobloom_l"}


def test_fine_tuned_dinobloom_classifier_reloads(tmp_path: Path, model23: torch.nn.Module) -> None:
    """A plain state dict (a fine-tuned DinoBloom classifier, Lightning-style ``model.`` keys) loads through the same
    entry, head included."""
    path = tmp_path / "tuned.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model23.state_dict().items()}}, path)
    add_to_manifest(path, "unit test", tmp_path)
    again = create_classifier("dinobloom_s", 23, weights=path, models_dir=tmp_path, train_last_k=1)
    assert torch.equal(again.head.weight, model23.head.weight) and torch.equal(again.norm.bias, model23.norm.bias)
    assert not again.blocks[0].attn.qkv.weight.requires_grad and again.blocks[-1].attn.qkv.weight.requires_grad
