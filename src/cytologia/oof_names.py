"""OOF model names: the ``model`` column of the out-of-fold tables, one set of rules for every stage.

- ``<exp>``: the plain pass of a run -- a classifier's experiment name, or a detector's model id;
- ``<exp>+hflip`` (:func:`flip_model_name`): its flip-TTA view -- the mean of the plain and mirrored logits
  (classification), or the boxes predicted on the mirrored image (detection);
- ``ml:<exp>`` (:func:`multilabel_model_name`): a multi-label full-image classifier, a member of kind
  ``"multilabel"`` (:func:`member_kind`) that the ensemble blends in on single-cell images only; ``ml:<exp>+hflip``
  its flip-TTA view.

The classification stage (:mod:`cytologia.classification.stage`) and the detection stage write these names;
``cytologia tune`` reads them back to pick members, their kind and their flip TTA.
"""

from __future__ import annotations

FLIP_SUFFIX = "+hflip"  # the flip-TTA view of a model
MULTILABEL_PREFIX = "ml:"  # model names of a multi-label full-image member start with this
KINDS: tuple[str, ...] = ("cell", "multilabel")  # member kinds (what member_kind returns; the ensemble file's kind)


def flip_model_name(name: str) -> str:
    """The OOF ``model`` name of the flip-TTA view of model ``name``: ``name + "+hflip"``."""
    return name + FLIP_SUFFIX


def is_flip_model(model: str) -> bool:
    """Whether an OOF ``model`` name is a flip-TTA view (it ends with ``"+hflip"``)."""
    return str(model).endswith(FLIP_SUFFIX)


def plain_model_name(model: str) -> str:
    """The plain model of an OOF ``model`` name: the name without its ``"+hflip"`` suffix (unchanged without one)."""
    return str(model).removesuffix(FLIP_SUFFIX)


def multilabel_model_name(name: str) -> str:
    """The OOF ``model`` name of a multi-label full-image model: ``name`` with the ``"ml:"`` prefix (once)."""
    return name if name.startswith(MULTILABEL_PREFIX) else MULTILABEL_PREFIX + name


def is_multilabel_model(model: str) -> bool:
    """Whether an OOF ``model`` name is a multi-label full-image member (its name starts with ``"ml:"``)."""
    return str(model).startswith(MULTILABEL_PREFIX)


def member_kind(model: str) -> str:
    """``"multilabel"`` for a multi-label full-image member's ``model`` name, ``"cell"`` for a crop model's."""
    return KINDS[1] if is_multilabel_model(model) else KINDS[0]
