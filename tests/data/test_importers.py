"""`cytologia import`: each layout (folder-per-class, Pascal VOC, COCO, YOLO) built in miniature from rendered cells,
imported, checked against what was written (round trip) and through `cytologia validate`; bad files raise errors
naming the file and element, or are counted with --lenient; the class maps match docs/datasets.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cytologia.boxes import iou_scalar
from cytologia.cli import main
from cytologia.data.importers import FORMATS, ImportOptions, import_dataset
from cytologia.data.importers.class_maps import CLASS_MAPS, get_class_map, markdown_table, read_class_map
from cytologia.data.io import read_annotations
from cytologia.data.synthetic.render import render_image
from cytologia.errors import CytologiaInputError, ValidationError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "datasets.md"


def _render(path: Path, classes: list[str], size: int | tuple[int, int] = 96, seed: int = 0) -> np.ndarray:
    """Write a rendered smear with one cell per class; returns its boxes (x1, y1, x2, y2)."""
    image, boxes = render_image(np.random.default_rng(seed), f"S0{1 + seed % 9}", classes, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return boxes.astype(np.float64)


def _validates(out: Path) -> pd.DataFrame:
    """The imported folder passes `cytologia validate` (strict) and its table reads back."""
    assert main(["validate", "--data", str(out)]) == 0
    table, report = read_annotations(out / "train.csv", out / "images")
    assert report.kept == report.rows and report.clipped == 0
    return table


# ------------------------------------------------------------------------------------------- folder per class
def _pbc(root: Path) -> dict[str, str]:
    """A PBC-like miniature: file -> expected Cytologia class ('' = not in Cytologia)."""
    files = {
        "neutrophil/SNE_1.jpg": "PNN",
        "neutrophil/BNE_2.jpg": "PNN",
        "ig/PMY_3.jpg": "PM",
        "ig/MY_4.jpg": "M",
        "ig/MMY_5.jpg": "MM",
        "ig/IG_6.jpg": "",
        "lymphocyte/LY_7.jpg": "LY",
        "platelet/PLATELET_8.jpg": "Thromb",
    }
    for k, (name, cls) in enumerate(files.items()):
        _render(root / name, [cls or "M"], size=(80 + k, 90), seed=k)
    (root / "README.txt").write_text("not an image\n")
    return files


def test_folder_pbc_round_trip_and_validate(tmp_path: Path) -> None:
    files = _pbc(tmp_path / "pbc")
    out = tmp_path / "out"
    report = import_dataset("folder", tmp_path / "pbc", out, ImportOptions(class_map="pbc"))
    assert report.skipped == {"not_image": 1, "not_in_cytologia": 1}
    assert report.boxes_kept == report.images_kept == 7 and report.dataset == "pbc"
    table = _validates(out)
    sources = pd.read_csv(out / "sources.csv", dtype=str)
    assert set(sources["dataset"]) == {"pbc"} and len(sources) == 7
    origin = sources.set_index("NAME")["origin"]
    for row in table.to_dict("records"):
        src = tmp_path / "pbc" / origin[row["NAME"]]
        assert (out / "images" / row["NAME"]).read_bytes() == src.read_bytes()  # the image itself, not a re-encode
        assert row["class"] == files[origin[row["NAME"]]]
        h, w = cv2.imread(str(src)).shape[:2]
        assert (row["x1"], row["y1"], row["x2"], row["y2"]) == (0, 0, w, h)  # one cell per image: the whole image
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped.loc[skipped["reason"] == "not_in_cytologia", "where"].tolist() == ["ig/IG_6.jpg"]
    saved = json.loads((out / "import_report.json").read_text())
    assert saved["from_source"]["ig:PMY"] == {"PM": 1} and saved["classes"]["PNN"] == 2


def test_folder_threshold_box_beats_the_whole_image(tmp_path: Path) -> None:
    truth = {}
    for k, cls in enumerate(["LY", "PNN", "MO", "EO", "LLC", "M"]):
        truth[f"cells/c{k}.jpg"] = _render(tmp_path / "src" / "cells" / f"c{k}.jpg", [cls], size=128, seed=k)[0]
    my_map = tmp_path / "map.csv"
    my_map.write_text("source_class,cytologia_class,note\ncells,LY,every cell called LY for this test\n")
    options = ImportOptions(class_map=str(my_map), box="threshold")
    report = import_dataset("folder", tmp_path / "src", tmp_path / "out", options)

    table = _validates(tmp_path / "out")
    origin = pd.read_csv(tmp_path / "out" / "sources.csv").set_index("NAME")["origin"]
    ious = [iou_scalar((r.x1, r.y1, r.x2, r.y2), tuple(truth[origin[r.NAME]])) for r in table.itertuples()]
    whole = [iou_scalar((0, 0, 128, 128), tuple(b)) for b in truth.values()]
    assert np.mean(ious) > 2 * np.mean(whole) and report.box_fallbacks <= 1


def test_folder_detector_box_through_the_registry(tmp_path: Path) -> None:
    from cytologia.detection.registry import get_backend

    ckpt = get_backend("yolox").save_random("yolox_nano", tmp_path / "det.pt", img_size=64, seed=0)
    for k in range(2):
        _render(tmp_path / "src" / "LY" / f"c{k}.jpg", ["LY"], size=96, seed=k)
    options = ImportOptions(box="detector", detector=ckpt, detector_size=64)
    report = import_dataset("folder", tmp_path / "src", tmp_path / "out", options)
    table = _validates(tmp_path / "out")
    assert len(table) == 2 and report.box == "detector"
    assert (table[["x1", "y1"]] >= 0).all().all() and (table["x2"] <= 96).all() and (table["y2"] <= 96).all()
    with pytest.raises(CytologiaInputError, match="--detector"):
        import_dataset("folder", tmp_path / "src", tmp_path / "out2", ImportOptions(box="detector"))


def test_folder_bad_files_strict_and_lenient(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _render(src / "Lymphocyte" / "a.jpg", ["LY"])
    _render(src / "loose.jpg", ["LY"])  # no class folder
    _render(src / "Weird" / "b.jpg", ["LY"])  # a class the map does not know
    (src / "Monocyte").mkdir()
    (src / "Monocyte" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValidationError) as err:
        import_dataset("folder", src, tmp_path / "out", ImportOptions(class_map="raabin"))
    msg = str(err.value)
    assert "3 problem(s)" in msg and "loose.jpg: image directly in" in msg
    assert "Weird/b.jpg: class 'Weird' is not in class map 'raabin'" in msg
    assert "Monocyte/broken.jpg: image unreadable" in msg
    assert not (tmp_path / "out").exists()  # nothing written
    report = import_dataset("folder", src, tmp_path / "out", ImportOptions(class_map="raabin", lenient=True))
    assert report.skipped == {"malformed": 1, "unknown_class": 1, "unreadable_image": 1}
    assert report.boxes_kept == 1 and len(pd.read_csv(tmp_path / "out" / "skipped.csv")) == 3
    _validates(tmp_path / "out")
    with pytest.raises(CytologiaInputError, match="not an empty folder"):
        import_dataset("folder", src, tmp_path / "out", ImportOptions(class_map="raabin", lenient=True))


# ---------------------------------------------------------------------------------------------- Pascal VOC
def _voc_xml(filename: str, objects: list[tuple[str, np.ndarray]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0] + 1:g}</xmin><ymin>{b[1] + 1:g}</ymin>"
        f"<xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
        for n, b in objects
    )
    return f"<annotation><folder>JPEGImages</folder><filename>{filename}</filename>{objs}</annotation>"


def _bccd(root: Path) -> dict[str, np.ndarray]:
    """Two BCCD-like images: 0 holds one WBC (labels.csv: NEUTROPHIL) + RBC + Platelets, 1 two WBC with two
    different subtypes (ambiguous). Returns the WBC boxes per image."""
    wbc = {}
    for k in range(2):
        name = f"BloodImage_{k:05d}"
        boxes = _render(root / "JPEGImages" / f"{name}.jpg", ["PNN", "LY", "Thromb"], size=(160, 120), seed=k)
        objects = [("WBC", boxes[0]), ("RBC", boxes[1]), ("Platelets", boxes[2])]
        if k == 1:
            objects = [("WBC", boxes[0]), ("WBC", boxes[1])]
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(f"{name}.jpg", objects))
        wbc[f"{name}.jpg"] = boxes[0]
    (root / "labels.csv").write_text(',Image,Category\n0,0,NEUTROPHIL\n1,1,"NEUTROPHIL, LYMPHOCYTE"\n')
    return wbc


def test_voc_bccd_only_wbc_with_a_subtype_become_cells(tmp_path: Path) -> None:
    wbc = _bccd(tmp_path / "BCCD")
    options = ImportOptions(class_map="bccd", image_labels=tmp_path / "BCCD" / "labels.csv")
    report = import_dataset("voc", tmp_path / "BCCD", tmp_path / "out", options)
    assert report.skipped == {"not_in_cytologia": 2, "ambiguous_class": 2} and report.boxes_kept == 1
    table = _validates(tmp_path / "out")
    row = table.iloc[0]
    assert row["class"] == "PNN" and row["NAME"] == "JPEGImages__BloodImage_00000.jpg"
    np.testing.assert_allclose(row[["x1", "y1", "x2", "y2"]].to_numpy(float), wbc["BloodImage_00000.jpg"])

    # Without the image labels no WBC box has a subtype: stated skips, an empty (but valid) table, a warning.
    report = import_dataset("voc", tmp_path / "BCCD", tmp_path / "out2", ImportOptions(class_map="bccd"))
    assert report.skipped == {"no_subtype": 3, "not_in_cytologia": 2} and report.boxes_kept == 0
    assert "no cell was imported" in report.warnings[-1]


def test_voc_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "voc"
    box = _render(src / "JPEGImages" / "a.jpg", ["LY"], size=96)[0]
    (src / "Annotations").mkdir()
    (src / "Annotations" / "a.xml").write_text(_voc_xml("a.jpg", [("LY", box), ("LY", np.array([200, 200, 240, 240]))]))
    (src / "Annotations" / "b.xml").write_text("<annotation><filename>b.jpg</filename><object>")  # truncated
    (src / "Annotations" / "c.xml").write_text(_voc_xml("missing.jpg", [("LY", box)]))
    (src / "Annotations" / "d.xml").write_text(_voc_xml("../../outside.jpg", [("LY", box)]))
    (src / "Annotations" / "e.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><name>LY</name><bndbox><xmin>x</xmin><ymin>1</ymin>"
        "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(ValidationError) as err:
        import_dataset("voc", src, tmp_path / "out")
    msg = str(err.value)
    assert "5 problem(s)" in msg
    assert "Annotations/a.xml, object 2 (LY): box (200, 200, 240, 240) lies outside its image (96 x 96 px)" in msg
    assert "Annotations/b.xml: not well-formed XML" in msg
    assert "Annotations/c.xml, object 1 (LY): image file" in msg and "missing.jpg not found" in msg
    assert "Annotations/d.xml, object 1 (LY): image path '../../outside.jpg' leads out of" in msg
    assert "Annotations/e.xml, object 1 (LY): bndbox ['x', '1', '5', '5'] holds a non-number" in msg
    report = import_dataset("voc", src, tmp_path / "out", ImportOptions(lenient=True))
    assert report.skipped == {"malformed": 2, "bad_name": 1, "missing_image": 1, "outside_image": 1}
    assert report.boxes_kept == 1
    _validates(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- COCO
def _coco(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    truth = {}
    images, annotations = [], []
    for k, classes in enumerate([["LY", "MO"], ["PNN"]]):
        name = f"img{k}.jpg"
        boxes = _render(root / "images" / name, classes, size=(140, 110), seed=k)
        truth[name] = boxes
        images.append({"id": 10 + k, "file_name": name, "width": 140, "height": 110})
        for b, c in zip(boxes, classes):
            cat = {"LY": 1, "MO": 2, "PNN": 3}[c]
            annotations.append(
                {"id": len(annotations), "image_id": 10 + k, "category_id": cat, "bbox": [*b[:2], *(b[2:] - b[:2])]}
            )
    images.append({"id": 99, "file_name": "empty.jpg"})  # no annotation: counted, not copied
    cats = [{"id": 1, "name": "LY"}, {"id": 2, "name": "mo"}, {"id": 3, "name": "PNN"}]
    data = {"images": images, "annotations": annotations, "categories": cats}
    (root / "annotations.json").write_text(json.dumps(data))
    return data, truth


def test_coco_round_trip(tmp_path: Path) -> None:
    _, truth = _coco(tmp_path / "coco")
    report = import_dataset("coco", tmp_path / "coco", tmp_path / "out", ImportOptions(dataset="MyCOCO"))
    assert report.skipped == {"no_cell": 1} and report.boxes_kept == 3 and report.dataset == "mycoco"
    table = _validates(tmp_path / "out")
    for name, boxes in truth.items():
        got = table[table["NAME"] == name].sort_values("box_id")[["x1", "y1", "x2", "y2"]].to_numpy(float)
        np.testing.assert_allclose(got, boxes)
    assert sorted(table["class"]) == ["LY", "MO", "PNN"]  # category "mo" matched case-insensitively


def test_coco_bad_files(tmp_path: Path) -> None:
    data, _ = _coco(tmp_path / "coco")
    outside = tmp_path / "secret.jpg"
    _render(outside, ["LY"])
    os.symlink(outside, tmp_path / "coco" / "images" / "link.jpg")
    data["images"] += [{"id": 50, "file_name": "link.jpg"}, {"id": 51, "file_name": "../../secret.jpg"}]
    data["annotations"] += [
        {"id": 100, "image_id": 50, "category_id": 1, "bbox": [1, 1, 20, 20]},
        {"id": 101, "image_id": 51, "category_id": 1, "bbox": [1, 1, 20, 20]},
        {"id": 102, "image_id": 10, "category_id": 7, "bbox": [1, 1, 20, 20]},
        {"id": 103, "image_id": 10, "category_id": 1, "bbox": [1, 1, 20]},
    ]
    (tmp_path / "coco" / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(ValidationError) as err:
        import_dataset("coco", tmp_path / "coco", tmp_path / "out")
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "annotations.json, annotations[3] (id 100): image path 'link.jpg' resolves to" in msg
    assert "annotations.json, annotations[4] (id 101): image path '../../secret.jpg' leads out of" in msg
    assert "annotations[5] (id 102): category_id 7 is not a category of the file" in msg
    assert "annotations[6] (id 103): bbox [1, 1, 20] is not [x, y, width, height]" in msg
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValidationError, match=r"broken.json: not valid JSON"):
        import_dataset("coco", tmp_path / "broken.json", tmp_path / "out")
    report = import_dataset("coco", tmp_path / "coco", tmp_path / "out", ImportOptions(lenient=True))
    assert report.skipped == {"malformed": 2, "bad_name": 2, "no_cell": 1} and report.boxes_kept == 3


# ---------------------------------------------------------------------------------------------------- YOLO
def _yolo(root: Path) -> dict[str, np.ndarray]:
    truth = {}
    for k, classes in enumerate([["EO", "LY"], ["EO"]]):
        boxes = _render(root / "images" / "train" / f"i{k}.png", classes, size=(150, 100), seed=k)
        truth[f"images/train/i{k}.png"] = boxes
        lines = []
        for b, c in zip(boxes, classes):
            cx, cy, w, h = (b[0] + b[2]) / 2 / 150, (b[1] + b[3]) / 2 / 100, (b[2] - b[0]) / 150, (b[3] - b[1]) / 100
            lines.append(f"{['LY', 'EO'].index(c)} {cx:.8f} {cy:.8f} {w:.8f} {h:.8f}")
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train" / f"i{k}.txt").write_text("\n".join(lines) + "\n")
    _render(root / "images" / "train" / "background.png", ["LY"])  # no label file: a background image
    (root / "data.yaml").write_text("names:\n  0: LY\n  1: EO\n")
    return truth


def test_yolo_round_trip(tmp_path: Path) -> None:
    truth = _yolo(tmp_path / "yolo")
    report = import_dataset("yolo", tmp_path / "yolo", tmp_path / "out")
    assert report.skipped == {"no_cell": 1} and report.boxes_kept == 3
    table = _validates(tmp_path / "out")
    origin = pd.read_csv(tmp_path / "out" / "sources.csv").set_index("NAME")["origin"]
    for name, group in table.groupby("NAME"):
        got = group.sort_values("box_id")[["x1", "y1", "x2", "y2"]].to_numpy(float)
        np.testing.assert_allclose(got, truth[origin[name]], atol=1e-4)


def test_yolo_bad_files(tmp_path: Path) -> None:
    _yolo(tmp_path / "yolo")
    labels = tmp_path / "yolo" / "labels" / "train"
    (labels / "i0.txt").write_text((labels / "i0.txt").read_text() + "5 0.5 0.5 0.1 0.1\n0 0.5 0.5\n")
    (labels / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValidationError) as err:
        import_dataset("yolo", tmp_path / "yolo", tmp_path / "out")
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "labels/train/i0.txt, line 3: class index 5 is not in 0..1" in msg
    assert "labels/train/i0.txt, line 4: '0 0.5 0.5' is not 'class x_centre y_centre width height'" in msg
    assert "labels/train/ghost.txt: no image images/train/ghost.* for this label file" in msg
    report = import_dataset("yolo", tmp_path / "yolo", tmp_path / "out", ImportOptions(lenient=True))
    assert report.skipped == {"no_cell": 1, "malformed": 2, "missing_image": 1} and report.boxes_kept == 3
    (tmp_path / "yolo" / "data.yaml").unlink()
    with pytest.raises(CytologiaInputError, match="--classes"):
        import_dataset("yolo", tmp_path / "yolo", tmp_path / "out2")


# ------------------------------------------------------------------------------------- command, registry, maps
def test_import_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _pbc(tmp_path / "pbc")
    assert main(["import", "folder", str(tmp_path / "pbc"), "--out", str(tmp_path / "out"), "--map", "pbc"]) == 0
    assert "7 boxes over 7 images" in capsys.readouterr().out
    assert main(["import", "folder", str(tmp_path / "pbc"), "--out", str(tmp_path / "o2"), "--map", "raabin"]) == 2
    assert "is not in class map 'raabin'" in capsys.readouterr().err
    with pytest.raises(CytologiaInputError, match="formats: folder, voc, coco, yolo"):
        import_dataset("tiff", tmp_path, tmp_path / "o3")
    assert list(FORMATS) == ["folder", "voc", "coco", "yolo"]


def test_class_maps_are_the_docs_tables(tmp_path: Path) -> None:
    text = DOCS.read_text()
    for class_map in CLASS_MAPS.values():
        if class_map.name == "cytologia":  # the identity map: the docs say so in a sentence
            continue
        assert markdown_table(class_map) in text, f"docs/datasets.md lacks the current table of {class_map.name}"
    bad = tmp_path / "map.csv"
    bad.write_text("source_class,cytologia_class\nneut,PNN\nNeut,LY\nfoo,Neutrophil\n")
    with pytest.raises(ValidationError, match=r"row 2: source class 'Neut' repeats"):
        read_class_map(bad)
    with pytest.raises(CytologiaInputError, match="built-in maps pbc, raabin, lisc, bccd, cytologia"):
        get_class_map("nope")
    assert get_class_map("pbc").entry("ig:XYZ").target is None  # an unlisted prefix falls back to the folder
    assert get_class_map("pbc").entry("IG:PMY").target == "PM"
