"""DinoBloom: a checkpoint written in the public format (teacher dict, backbone./dino_head./ibot_head. keys, a
224 px position embedding) loads strictly into timm's ViT-S/14; wrong keys and shapes fail naming the key. At other
input sizes the features equal those of DINOv2's own forward (its position-embedding interpolation, reimplemented
here from facebookresearch/dinov2's ``interpolate_pos_encoding``), and the model still exports to ONNX."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cytologia.classification.dinobloom import (
    DINOBLOOM_ARCH,
    dinobloom_state_dict,
    load_dinobloom_weights,
    resample_pos_embed_dinov2,
)
from cytologia.classification.export import check_onnx_parity, export_classifier_onnx
from cytologia.classification.models import create_classifier
from cytologia.errors import CytologiaInputError
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


# ------------------------------------------------------------------------------- other input sizes: DINOv2's rule
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # a DinoBloom-S with tiny widths: seconds on a CPU


def _dinov2_pos_embed(pos_embed: torch.Tensor, tokens: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """DINOv2's ``DinoVisionTransformer.interpolate_pos_encoding`` (facebookresearch/dinov2, with DinoBloom's
    settings ``interpolate_offset=0.1``, ``interpolate_antialias=False``), step by step. As there, ``w`` is the
    image's dim 2 (its height) and ``h`` its dim 3, and the first scale factor applies to dim 2 of the grid."""
    n_stored = pos_embed.shape[1] - 1
    if tokens.shape[1] - 1 == n_stored and w == h:
        return pos_embed
    side = int(math.sqrt(n_stored))
    assert side * side == n_stored
    dim = tokens.shape[-1]
    table = pos_embed.float()
    factors = (float(w // patch + 0.1) / side, float(h // patch + 0.1) / side)
    grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=factors, mode="bicubic", antialias=False)
    assert tuple(grid.shape[-2:]) == (w // patch, h // patch)
    grid = grid.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((table[:, 0].unsqueeze(0), grid), dim=1).to(tokens.dtype)


def _dinov2_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """DINOv2's ``forward_features`` (normalised tokens, class token first) with ``backbone``'s weights (the 224 px
    model the checkpoint came from): conv patch embedding, class token, the position embedding by
    :func:`_dinov2_pos_embed`, the blocks, the final norm. DINOv2 takes whole patches only (it asserts so)."""
    _, _, w, h = images.shape
    patch = backbone.patch_embed.proj.kernel_size[0]
    assert w % patch == 0 and h % patch == 0
    tokens = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)
    tokens = torch.cat((backbone.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
    tokens = tokens + _dinov2_pos_embed(backbone.pos_embed, tokens, w, h, patch)
    for block in backbone.blocks:
        tokens = block(tokens)
    return backbone.norm(tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A tiny random DinoBloom-S backbone at 224 px and its teacher checkpoint. The position embedding is N(0, 1),
    not timm's N(0, 0.02) init, so that it weighs in the features and any other resampling shows in them."""
    torch.manual_seed(0)
    model = create_classifier("dinobloom_s", 0, **TINY).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    path = tmp_path_factory.mktemp("tiny") / "DinoBloom-tiny.pth"
    torch.save({"teacher": _teacher(model.state_dict(), TINY["embed_dim"])}, path)
    return model, path


# (our input size, the part of the image DINOv2 sees): 112 x 448 has 8 x 32 = 256 patches, as many as the stored
# 16 x 16 grid; 300 px is no multiple of 14 (DINOv2 refuses it) -- the patch embedding sees the top-left 21 x 21
# patches, which is DINOv2 on the 294 px crop.
SIZES = {
    "112": (112, (112, 112)),
    "224": (224, (224, 224)),
    "448": (448, (448, 448)),
    "112x448": ((112, 448), (112, 448)),
    "300": (300, (294, 294)),
}


@pytest.mark.parametrize("size, seen", list(SIZES.values()), ids=list(SIZES))
def test_features_at_other_sizes_equal_dinov2s(
    tiny: tuple[torch.nn.Module, Path], size: int | tuple[int, int], seen: tuple[int, int]
) -> None:
    source, path = tiny
    model = create_classifier("dinobloom_s", 0, img_size=size, **TINY).eval()
    load_dinobloom_weights(model, path)
    shape = (size, size) if isinstance(size, int) else size
    images = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.forward_features(images)
        theirs = _dinov2_features(source, images[:, :, : seen[0], : seen[1]])
    assert ours.shape == theirs.shape == (2, 1 + (seen[0] // 14) * (seen[1] // 14), TINY["embed_dim"])
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, f"{size}: max |ours - DINOv2| = {diff:.2e} (patch tokens and class token)"
    if size == 224:
        assert torch.equal(model.pos_embed, source.pos_embed)


def test_plain_state_dicts_resample_by_dinov2s_rule_or_keep_their_own_shape(
    tiny: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    """A plain (fine-tuned) state dict at 224 px loads at 448 px by DINOv2's rule; one of a 112 x 448 model (256
    patches, the token count of a 16 x 16 grid) reloads into that model unchanged: only a DinoBloom checkpoint's grid
    is known to be square."""
    source, path = tiny
    plain = tmp_path / "tuned224.pt"
    torch.save(source.state_dict(), plain)
    big = create_classifier("dinobloom_s", 0, img_size=448, **TINY)
    load_dinobloom_weights(big, plain)
    expected = _dinov2_pos_embed(source.pos_embed, torch.zeros(1, 1 + 32 * 32, TINY["embed_dim"]), 448, 448, 14)
    assert (big.pos_embed - expected).abs().max().item() < 1e-6

    wide = create_classifier("dinobloom_s", 3, img_size=(112, 448), **TINY)
    load_dinobloom_weights(wide, path)
    tuned = tmp_path / "tuned112x448.pt"
    torch.save(wide.state_dict(), tuned)
    again = create_classifier("dinobloom_s", 3, img_size=(112, 448), **TINY)
    load_dinobloom_weights(again, tuned)
    assert torch.equal(again.pos_embed, wide.pos_embed)
    with pytest.raises(CytologiaInputError, match="square grid"):
        resample_pos_embed_dinov2(torch.zeros(1, 1 + 15, 8), (4, 4))


def test_export_at_448_px(tiny: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    """The position embedding is resampled when the weights load, so the graph holds a constant, no resize."""
    _, path = tiny
    model = create_classifier("dinobloom_s", 5, img_size=448, **TINY)
    load_dinobloom_weights(model, path)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight)  # logits of a trained model's scale (~5), not init's ~0.01
    onnx_path = export_classifier_onnx(model, tmp_path / "dinobloom448.onnx", 448)
    assert check_onnx_parity(model, onnx_path, n=2) < 1e-4
