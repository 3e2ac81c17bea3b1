"""The classifier ensemble: the file (:mod:`.schema`), the blend rule (:mod:`.blend`) and its tuning on out-of-fold
logits (:mod:`.tune`). Only the first two are exported here: prediction imports them without the tuning code."""

from cytologia.ensemble.blend import blend_logits, blend_probabilities, multilabel_probabilities, softmax
from cytologia.ensemble.schema import (
    BLEND_RULES,
    N_CLASSES,
    REJECT_SCORES,
    BlendSpec,
    CalibrationSpec,
    DetectorSpec,
    Ensemble,
    MemberSpec,
    RejectSpec,
    check_ensemble,
    ensemble_from_dict,
    read_ensemble,
    write_ensemble,
)

__all__ = [
    "BLEND_RULES",
    "N_CLASSES",
    "REJECT_SCORES",
    "BlendSpec",
    "CalibrationSpec",
    "DetectorSpec",
    "Ensemble",
    "MemberSpec",
    "RejectSpec",
    "blend_logits",
    "blend_probabilities",
    "check_ensemble",
    "ensemble_from_dict",
    "multilabel_probabilities",
    "read_ensemble",
    "softmax",
    "write_ensemble",
]
