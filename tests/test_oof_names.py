"""OOF model names (cytologia.oof_names): the flip-TTA suffix and the multi-label prefix, written by the stages and
read back by ``cytologia tune``."""

from __future__ import annotations

from cytologia.oof_names import (
    flip_model_name,
    is_flip_model,
    is_multilabel_model,
    member_kind,
    multilabel_model_name,
    plain_model_name,
)

EXP = "ml_effnetv2m512_bg"


def test_flip_view_names() -> None:
    assert flip_model_name("yolo11s_512") == "yolo11s_512+hflip"
    assert is_flip_model("vitl224+hflip") and not is_flip_model("vitl224") and not is_flip_model("hflip_net")
    assert plain_model_name("vitl224+hflip") == "vitl224" and plain_model_name("vitl224") == "vitl224"
    for name in ("vitl224", "ml:vitl224", "a+b"):
        assert plain_model_name(flip_model_name(name)) == name and is_flip_model(flip_model_name(name))
    # the flip view of a multi-label member keeps its prefix, so it stays a multi-label member
    assert flip_model_name(multilabel_model_name("x")) == "ml:x+hflip"
    assert member_kind(flip_model_name(multilabel_model_name("x"))) == "multilabel"


def test_multilabel_names() -> None:
    assert multilabel_model_name(EXP) == "ml:" + EXP and multilabel_model_name("ml:x") == "ml:x"
    assert is_multilabel_model("ml:x+hflip") and not is_multilabel_model("vitl224")
    assert member_kind("ml:x") == "multilabel" and member_kind("x") == "cell"
