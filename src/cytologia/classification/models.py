"""Classifier backbones: a registry over timm (timm's own habit), random init, local weights only.

``create_classifier(name, num_classes, ...)`` builds a registered entry -- the 1st-place models and DinoBloom
S/B/L -- or any timm model name, always with ``pretrained=False``: nothing is downloaded (``import cytologia`` sets
``HF_HUB_OFFLINE=1``; no ``torch.hub``). Weights come from a local file that must be listed, with its sha256, in the
``models/`` manifest (:func:`cytologia.weights.verified_path`); they load strictly (every key and shape must
match, :func:`cytologia.weights.load_state_dict_checked`) except the classification head, which is left at its
random init when its shape differs (another number of classes) or the file has none.

Weight files are in timm's format: the ``model.safetensors`` / ``pytorch_model.bin`` of a ``timm/`` Hugging Face
repository, or a checkpoint this project wrote. Original-repository formats are not guessed at (timm's own
converters remap some of them by position, silently); DinoBloom's format has its own reader
(:mod:`cytologia.classification.dinobloom`). A ViT's absolute position embedding is resampled when the file was
trained at another image size.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cytologia.classification import dinobloom
from cytologia.classification.weight_files import (  # also importable from here, where they used to live
    head_prefixes,
    read_state_dict,
    strip_wrapper_prefixes,
    unwrap_state_dict,  # noqa: F401
)
from cytologia.errors import CytologiaInputError
from cytologia.weights import LoadReport, load_state_dict_checked
from cytologia.weights_catalog import resolve_weights

log = logging.getLogger(__name__)

Factory = Callable[..., nn.Module]  # factory(num_classes=, img_size=, drop_path=, **kwargs) -> model
WeightLoader = Callable[[nn.Module, Path], LoadReport]  # loader(model, verified path) -> report


@dataclass(frozen=True)
class ClassifierSpec:
    """A registered classifier: how to build it, its usual input size, how to load its weight files."""

    name: str
    factory: Factory
    default_img_size: int | None = None
    load_weights: WeightLoader | None = None  # None: load_timm_weights
    description: str = ""


_REGISTRY: dict[str, ClassifierSpec] = {}


def register_classifier(
    name: str, *, default_img_size: int | None = None, load_weights: WeightLoader | None = None, description: str = ""
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(num_classes, img_size, drop_path, **kwargs) -> nn.Module`` under ``name``."""

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"classifier {name!r} is already registered")
        _REGISTRY[name] = ClassifierSpec(
            name, factory, default_img_size, load_weights, description or factory.__doc__ or ""
        )
        return factory

    return decorate


def list_classifiers(pattern: str = "*", include_timm: bool = False) -> list[str]:
    """Registered classifier names matching the shell ``pattern`` (plus timm's architectures with
    ``include_timm``; any timm name works in :func:`create_classifier`)."""
    names = set(fnmatch.filter(_REGISTRY, pattern))
    if include_timm:
        names.update(timm.list_models(pattern))
    return sorted(names)


def classifier_spec(name: str) -> ClassifierSpec | None:
    """The registry entry of ``name`` (None for a plain timm name)."""
    return _REGISTRY.get(name)


def default_img_size(name: str) -> int | None:
    """The input size a classifier is usually trained at: the registry's, else timm's pretrained config."""
    spec = _REGISTRY.get(name)
    if spec is not None and spec.default_img_size is not None:
        return spec.default_img_size
    if timm.is_model(name):
        size = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
        if size is not None and getattr(size, "input_size", None):
            return int(size.input_size[-1])
    return None


def _unknown(name: str) -> CytologiaInputError:
    registered = list(_REGISTRY)
    close = list(dict.fromkeys(difflib.get_close_matches(name, registered + timm.list_models(), n=8, cutoff=0.6)))[:6]
    hint = f"close matches: {', '.join(close)}; " if close else ""
    return CytologiaInputError(
        f"unknown classifier {name!r}; {hint}registered: {', '.join(sorted(registered))}; any timm model name "
        "(timm.list_models()) also works"
    )


def create_timm_model(
    arch: str, num_classes: int, img_size: int | None = None, drop_path: float = 0.0, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, ...)``; ``img_size`` is passed where the model takes one (ViTs)
    and dropped for models that have no such argument (CNNs, TinyViT, NextViT: any input size works)."""
    if kwargs.pop("pretrained", False):
        raise CytologiaInputError("pretrained=True would download weights: pass a local file as weights= instead")
    if "pretrained_cfg_overlay" in kwargs:
        raise CytologiaInputError("pretrained_cfg_overlay is not used: pass a local file as weights= instead")
    args: dict[str, Any] = dict(pretrained=False, num_classes=num_classes, **kwargs)
    if drop_path:
        args["drop_path_rate"] = drop_path
    if img_size is not None:
        try:
            return timm.create_model(arch, img_size=img_size, **args)
        except TypeError as err:  # raised by the model class's __init__, before any weight is allocated
            if "img_size" not in str(err):
                raise
            log.debug("%s takes no img_size; built without it", arch)
    return timm.create_model(arch, **args)


def create_classifier(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    weights: str | Path | None = None,
    drop_path: float = 0.0,
    train_last_k: int | None = None,
    *,
    models_dir: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build classifier ``name`` (registered, or any timm model) with ``num_classes`` outputs.

    ``img_size`` defaults to the registered size; ``weights`` (None or ``"random"``: random init) is a catalog name
    (``vit_large_patch16_224.augreg_in21k_ft_in1k``: its file in ``models_dir``, else an error naming ``cytologia
    weights pull``) or a local file (or a bare name in ``models_dir``, default ``$CYTOLOGIA_MODELS`` or ``models/``),
    checked against the manifest and loaded strictly, the head excepted (which tensors loaded and which are new is
    logged); ``train_last_k`` freezes everything but the last k blocks, the final norm and the head
    (:func:`freeze_all_but_last`). Extra ``kwargs`` go to ``timm.create_model``. Never downloads anything.
    """
    if num_classes < 0:
        raise CytologiaInputError(f"num_classes={num_classes}: must be >= 0")
    if drop_path < 0 or drop_path >= 1:
        raise CytologiaInputError(f"drop_path={drop_path}: must be in [0, 1)")
    spec = _REGISTRY.get(name)
    if spec is not None:
        size = img_size if img_size is not None else spec.default_img_size
        model = spec.factory(num_classes=num_classes, img_size=size, drop_path=drop_path, **kwargs)
    elif timm.is_model(name):
        model = create_timm_model(name, num_classes, img_size, drop_path, **kwargs)
    else:
        raise _unknown(name)
    path = resolve_weights(str(weights), models_dir, key="weights") if weights is not None else None
    if path is not None:
        loader = spec.load_weights if spec is not None and spec.load_weights is not None else load_timm_weights
        report = loader(model, path)
        log.info("%s", describe_load(name, path, report, model))
    if train_last_k is not None:
        freeze_all_but_last(model, train_last_k)
    return model


# ---------------------------------------------------------------------------------------------------------- weights
def describe_load(name: str, path: Path, report: LoadReport, model: nn.Module) -> str:
    """One line saying which tensors came from ``path`` and which were newly initialised (the head, typically),
    grouped by module prefix so a 300-tensor backbone reads in one line."""
    loaded = set(report.loaded)
    at_init = [k for k in model.state_dict() if k not in loaded]

    def groups(keys: list[str]) -> str:
        prefixes: dict[str, int] = {}
        for k in keys:
            prefixes[k.split(".")[0]] = prefixes.get(k.split(".")[0], 0) + 1
        return ", ".join(f"{p} ({n})" for p, n in prefixes.items()) or "none"

    return (
        f"{name}: {len(loaded)} tensors loaded from {path} [{groups(sorted(loaded))}]; newly initialised: "
        f"{', '.join(at_init) or 'none'}"
    )


def adapt_pos_embed(
    state: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Resample a ViT's ``pos_embed`` in ``state`` to the model's patch grid when the file was trained at another
    image size (timm's ``resample_abs_pos_embed``, bicubic). Other mismatches are left for the strict check."""
    theirs = state.get("pos_embed")
    ours = getattr(model, "pos_embed", None)
    if theirs is None or not isinstance(ours, torch.Tensor) or theirs.shape == ours.shape:
        return state
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n_theirs = theirs.shape[1] - prefix
    side = round(n_theirs**0.5)
    if grid is None or theirs.dim() != 3 or theirs.shape[2] != ours.shape[2] or side * side != n_theirs:
        return state
    from timm.layers import resample_abs_pos_embed

    out = dict(state)
    out["pos_embed"] = resample_abs_pos_embed(
        theirs.float(), new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix
    ).to(theirs.dtype)
    log.info("%s: pos_embed resampled from a %dx%d to a %dx%d patch grid", source, side, side, *grid)
    return out


def load_timm_weights(model: nn.Module, path: Path) -> LoadReport:
    """Load a (verified) timm-format weight file into ``model``: strict, head skipped when its shape differs."""
    state = strip_wrapper_prefixes(read_state_dict(path), model)
    state = adapt_pos_embed(state, model, str(path))
    return load_state_dict_checked(model, state, skip_mismatched=head_prefixes(model), source=str(path))


# ---------------------------------------------------------------------------------------------------- freezing
def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks in forward order: ViT ``blocks``, EfficientNet ``blocks[stage][i]``, TinyViT/NextViT
    ``stages[s].blocks[i]``, ResNet ``layerN[i]``."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        out: list[nn.Module] = []
        for b in blocks:
            out.extend(b.children() if isinstance(b, nn.Sequential) else [b])
        return out
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)):
        out = []
        for s in stages:
            inner = getattr(s, "blocks", None)
            out.extend(inner if isinstance(inner, (nn.Sequential, nn.ModuleList)) else [s])
        return out
    layers = []
    i = 1
    while isinstance(getattr(model, f"layer{i}", None), nn.Sequential):
        layers.extend(getattr(model, f"layer{i}"))
        i += 1
    if layers:
        return layers
    raise CytologiaInputError(f"{type(model).__name__}: no .blocks, .stages or .layerN to count blocks in")


def freeze_all_but_last(model: nn.Module, k: int) -> int:
    """Freeze every parameter except the last ``k`` blocks and everything registered after them (final norm,
    head; also the downsampling layers between the kept stages). ``k=0`` trains the norm and head only. The
    classifier (``get_classifier()``) always stays trainable. Returns the number of trainable parameters.

    Only ``requires_grad`` changes: BatchNorm layers in frozen parts still update their running statistics in
    train mode (ViTs, which this is meant for, have none).
    """
    blocks = model_blocks(model)
    if not 0 <= k <= len(blocks):
        raise CytologiaInputError(f"train_last_k={k}: the model has {len(blocks)} blocks")
    params = list(model.named_parameters())
    index = {id(p): i for i, (_, p) in enumerate(params)}
    if k > 0:
        first = [index[id(p)] for b in blocks[-k:] for p in b.parameters()]
        start = min(first) if first else len(params)
    else:
        last = [index[id(p)] for p in blocks[-1].parameters()]
        start = max(last) + 1 if last else 0
    for i, (_, p) in enumerate(params):
        p.requires_grad_(i >= start)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier) and isinstance(get_classifier(), nn.Module):
        for p in get_classifier().parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("train_last_k=%d: %d of %d parameters trainable", k, trainable, sum(p.numel() for p in model.parameters()))
    return trainable


# ------------------------------------------------------------------------------------------------- the registry
def _timm_entry(arch: str, size: int, description: str) -> None:
    def factory(num_classes: int, img_size: int | None = None, drop_path: float = 0.0, **kwargs: Any) -> nn.Module:
        return create_timm_model(arch, num_classes, img_size, drop_path, **kwargs)

    factory.__doc__ = description
    register_classifier(arch, default_img_size=size, description=description)(factory)


# The 1st place's classifiers (sizes as they trained them).
_timm_entry("tf_efficientnetv2_m", 512, "EfficientNetV2-M (TF port, SAME padding), trained at 512 px")
_timm_entry("vit_large_patch16_224", 224, "ViT-L/16 at 224 px")
_timm_entry("tiny_vit_21m_512", 512, "TinyViT-21M, 512 px windows")
_timm_entry("nextvit_small", 384, "NextViT-S, trained at 384 px")
_timm_entry("nextvit_large", 384, "NextViT-L, trained at 384 px (the 1st place's)")


def _dinobloom_entry(name: str) -> None:
    def factory(num_classes: int, img_size: int | None = None, drop_path: float = 0.0, **kwargs: Any) -> nn.Module:
        return dinobloom.create_dinobloom(
            name, num_classes, img_size or dinobloom.DINOBLOOM_IMG_SIZE, drop_path, **kwargs
        )

    arch = dinobloom.DINOBLOOM_ARCH[name]
    register_classifier(
        name,
        default_img_size=dinobloom.DINOBLOOM_IMG_SIZE,
        load_weights=dinobloom.load_dinobloom_weights,
        description=f"DinoBloom ({arch}, DINOv2 pretrained on blood cells) at 224 px",
    )(factory)


for _name in dinobloom.DINOBLOOM_ARCH:
    _dinobloom_entry(_name)
