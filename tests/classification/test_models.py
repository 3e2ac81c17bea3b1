"""Classifier registry: timm names, the 1st-place entries built offline, verified local weights, partial freezing."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cytologia.classification.models import (
    create_classifier,
    default_img_size,
    freeze_all_but_last,
    list_classifiers,
    model_blocks,
    register_classifier,
)
from cytologia.errors import CytologiaInputError
from cytologia.weights import add_to_manifest

FIRST_PLACE = (
    "tf_efficientnetv2_m",
    "vit_large_patch16_224",
    "tiny_vit_21m_512",
    "nextvit_small",
    "nextvit_large",
    "dinobloom_s",
    "dinobloom_b",
    "dinobloom_l",
)


def _save(model: nn.Module, folder: Path, name: str, state: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(model.state_dict() if state is None else state, path)
    add_to_manifest(path, "unit test", folder)
    return path


def test_registry_lists_the_first_place_models() -> None:
    assert set(FIRST_PLACE) == set(list_classifiers())
    assert list_classifiers("dinobloom*") == ["dinobloom_b", "dinobloom_l", "dinobloom_s"]
    assert "resnet10t" in list_classifiers("resnet1*", include_timm=True)
    assert default_img_size("tf_efficientnetv2_m") == 512 and default_img_size("dinobloom_b") == 224
    assert default_img_size("resnet10t") == 176  # timm's pretrained config (c3 recipe)
    with pytest.raises(ValueError, match="already registered"):
        register_classifier("dinobloom_s")(lambda **kw: nn.Identity())


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every way of opening a connection raises; returns the list of attempts."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(OSError, match="disabled"):  # the guard works
        socket.create_connection(("example.org", 80))
    attempts.clear()
    return attempts


@pytest.mark.parametrize("name", list_classifiers())
def test_registered_models_build_without_network(name: str, no_network: list[object]) -> None:
    """Each 1st-place model and DinoBloom S/B/L builds with sockets disabled, on the meta device (shapes only, no
    memory); a forward on meta tensors at the registered size checks the head. (TinyViT-512 takes ~3 s: timm
    builds its attention-bias index in Python.)"""
    with torch.device("meta"):
        model = create_classifier(name, 23, drop_path=0.1)
        size = default_img_size(name)
        logits = model(torch.empty(1, 3, size, size))
    assert logits.shape == (1, 23)
    assert sum(p.numel() for p in model.parameters()) > 5_000_000
    assert no_network == []


def test_timm_names_build_small_and_forward() -> None:
    model = create_classifier("resnet10t", 5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    vit = create_classifier("test_vit", 3, img_size=32, drop_path=0.1)
    assert vit.pos_embed.shape == (1, 1 + 2 * 2, 64) and vit(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert type(vit.blocks[-1].drop_path1).__name__ == "DropPath"
    cnn = create_classifier("resnet10t", 4, img_size=64)  # img_size is dropped for models without one
    assert cnn(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_unknown_names_and_downloads_are_refused() -> None:
    with pytest.raises(CytologiaInputError, match=r"close matches: .*vit_large_patch16_224"):
        create_classifier("vit_large_patch16_22", 3)
    with pytest.raises(CytologiaInputError, match="download"):
        create_classifier("resnet10t", 3, pretrained=True)
    with pytest.raises(CytologiaInputError, match="drop_path"):
        create_classifier("resnet10t", 3, drop_path=1.5)


def test_local_weights_are_verified_and_loaded_strictly(tmp_path: Path) -> None:
    models = tmp_path / "models"
    source = create_classifier("test_vit", 5, img_size=32)
    path = _save(source, models, "vit5.pt")
    same = create_classifier("test_vit", 5, img_size=32, weights="vit5.pt", models_dir=models)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), same.state_dict().values()))
    # Another number of classes: the head stays at its init, everything else loads.
    other = create_classifier("test_vit", 7, img_size=32, weights=path, models_dir=models)
    assert other.head.weight.shape == (7, 64)
    assert torch.equal(other.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    # Trained at 32 px, used at 48 px: the position embedding is resampled to the 3x3 grid.
    bigger = create_classifier("test_vit", 5, img_size=48, weights=path, models_dir=models)
    assert bigger.pos_embed.shape == (1, 10, 64)
    # A DDP-wrapped checkpoint ("module." on every key) loads too.
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    _save(source, models, "wrapped.pt", {"state_dict": wrapped})
    create_classifier("test_vit", 5, img_size=32, weights="wrapped.pt", models_dir=models)


def test_bad_weight_files_fail_naming_the_problem(tmp_path: Path) -> None:
    models = tmp_path / "models"
    source = create_classifier("resnet10t", 5)
    unlisted = models / "unlisted.pt"
    models.mkdir()
    torch.save(source.state_dict(), unlisted)
    with pytest.raises(CytologiaInputError, match="not listed"):
        create_classifier("resnet10t", 5, weights=unlisted, models_dir=models)
    state = source.state_dict()
    state["layer1.0.conv1.extra"] = torch.zeros(1)
    _save(source, models, "extra.pt", state)
    with pytest.raises(CytologiaInputError, match=r"unexpected in checkpoint: layer1\.0\.conv1\.extra"):
        create_classifier("resnet10t", 5, weights="extra.pt", models_dir=models)
    state = source.state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    _save(source, models, "shape.pt", state)
    with pytest.raises(CytologiaInputError, match=r"layer2\.0\.conv1\.weight \(3, 3, 1, 1\) vs model"):
        create_classifier("resnet10t", 5, weights="shape.pt", models_dir=models)
    _save(source, models, "not_weights.pt", {"epoch": 3})
    with pytest.raises(CytologiaInputError, match="no state dict"):
        create_classifier("resnet10t", 5, weights="not_weights.pt", models_dir=models)


def test_safetensors_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    models = tmp_path / "models"
    models.mkdir()
    source = create_classifier("resnet10t", 3)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(models / "r.safetensors"))
    add_to_manifest(models / "r.safetensors", "unit test", models)
    loaded = create_classifier("resnet10t", 3, weights="r.safetensors", models_dir=models)
    assert torch.equal(loaded.fc.weight, source.fc.weight)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_train_last_k_blocks() -> None:
    vit = create_classifier("test_vit", 3, img_size=32, train_last_k=2)
    names = _trainable(vit)
    assert {n.split(".")[1] for n in names if n.startswith("blocks.")} == {"4", "5"}
    assert {"norm.weight", "head.weight", "head.bias"} <= names
    assert not {"cls_token", "pos_embed", "patch_embed.proj.weight"} & names
    head_only = freeze_all_but_last(vit, 0)
    assert _trainable(vit) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert head_only == sum(p.numel() for n, p in vit.named_parameters() if n in _trainable(vit))
    loss = vit(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert vit.blocks[0].attn.qkv.weight.grad is None and vit.head.weight.grad is not None
    with pytest.raises(CytologiaInputError, match="6 blocks"):
        freeze_all_but_last(vit, 7)


def test_train_last_k_on_cnn_layouts() -> None:
    resnet = create_classifier("resnet10t", 3)
    assert len(model_blocks(resnet)) == 4  # resnet10t: one block per layerN
    freeze_all_but_last(resnet, 1)
    assert {n.split(".")[0] for n in _trainable(resnet)} == {"layer4", "fc"}
    mobile = create_classifier("mobilenetv3_small_050", 3)  # blocks = stages of blocks, like EfficientNet
    freeze_all_but_last(mobile, 1)
    last_stage = len(mobile.blocks) - 1
    assert {n.split(".")[0] for n in _trainable(mobile)} == {"blocks", "conv_head", "classifier"}
    assert all(n.startswith(f"blocks.{last_stage}.") for n in _trainable(mobile) if n.startswith("blocks."))
    with pytest.raises(CytologiaInputError, match="no .blocks"):
        freeze_all_but_last(nn.Sequential(nn.Linear(2, 2)), 1)


@pytest.mark.bench
def test_bench_cpu_train_step() -> None:
    """CPU forward + backward + AdamW step of resnet18 at 64 px, batch 16 (prints the median time)."""
    model = create_classifier("resnet18", 23)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 23, (16,))
    times = []
    for _ in range(8):
        t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    median = sorted(times[2:])[len(times[2:]) // 2]
    print(f"resnet18 64px batch 16: {median * 1000:.0f} ms/step on {torch.get_num_threads()} threads")
    assert median > 0
