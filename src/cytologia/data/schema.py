"""The data contract: class names and the columns of every table that crosses a stage boundary.

The 23 class names are the external contract (Trustii format). The list is a tuple: nothing mutates it. A model
that wants a 24th "background" label asks for :func:`labels` with ``background=True``.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "B",
    "BA",
    "EO",
    "Er",
    "LAM3",
    "LF",
    "LGL",
    "LH_lyAct",
    "LLC",
    "LM",
    "LY",
    "LZMG",
    "LyB",
    "Lysee",
    "M",
    "MBL",
    "MM",
    "MO",
    "MoB",
    "PM",
    "PNN",
    "SS",
    "Thromb",
)
CLASS_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
BACKGROUND = "background"
NO_PREDICTION = "None"  # the label an image with no kept prediction gets in the score

# Confusable groups the winners reported; used by reports and by the synthetic generator.
HARD_GROUPS: tuple[tuple[str, ...], ...] = (
    ("B", "MBL"),
    ("M", "PM", "MM"),
    ("LY", "LGL", "LH_lyAct"),
    ("LY", "LM", "SS"),
)

BOX_COLUMNS: tuple[str, ...] = ("x1", "y1", "x2", "y2")
TRAIN_COLUMNS: tuple[str, ...] = ("NAME", *BOX_COLUMNS, "class")
TEST_COLUMNS: tuple[str, ...] = ("trustii_id", "NAME")
SUBMISSION_COLUMNS: tuple[str, ...] = ("trustii_id", "NAME", *BOX_COLUMNS, "class")
# The validated annotations table (one row per box). img_w/img_h are -1 when no image was read.
ANNOTATION_COLUMNS: tuple[str, ...] = ("NAME", "box_id", *BOX_COLUMNS, "class", "img_w", "img_h", "fixes")
FOLD_COLUMNS: tuple[str, ...] = ("NAME", "fold")


def labels(background: bool = False) -> tuple[str, ...]:
    """The label list a model trains on: the 23 classes, plus "background" last when asked for."""
    return (*CLASSES, BACKGROUND) if background else CLASSES


def class_index(name: str) -> int:
    """Index of a class name; a miss names the valid classes."""
    try:
        return CLASS_TO_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown class {name!r}; valid classes: {' '.join(CLASSES)}") from None
