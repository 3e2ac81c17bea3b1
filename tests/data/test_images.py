"""Images: header size, decoding, corrupt/truncated JPEG detection and repair (on JPEGs the tests corrupt)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cytologia.data.images import (
    CORRUPT,
    EXTRANEOUS,
    OK,
    SCAN_COLUMNS,
    TRUNCATED,
    UNREADABLE,
    check_jpeg,
    decode,
    image_size,
    image_sizes,
    repair_images,
    repair_jpeg,
    resolve_image,
    scan_images,
)
from cytologia.errors import CytologiaInputError

W, H = 96, 72
GARBAGE = bytes(range(1, 41))  # 40 bytes without 0xFF: no marker inside


def smooth_image(seed: int, w: int = W, h: int = H) -> np.ndarray:
    """A smooth random colour image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    return write(tmp_path / "good.jpg", jpeg_bytes(smooth_image(0)))


def with_extraneous(data: bytes) -> bytes:
    """Junk between the end of the entropy-coded data and the EOI marker (what the real set has)."""
    assert data[-2:] == b"\xff\xd9"
    return data[:-2] + GARBAGE + data[-2:]


def test_image_size_reads_the_header_only(tmp_path: Path, good: Path) -> None:
    assert image_size(good) == (W, H)
    # A file cut right after its headers still has a size: nothing but the header is read.
    data = good.read_bytes()
    cut = write(tmp_path / "cut.jpg", data[: data.index(b"\xff\xda") + 20])
    assert image_size(cut) == (W, H)
    sizes, errors = image_sizes([good, cut, tmp_path / "nope.jpg"], workers=2)
    assert sizes.tolist() == [[W, H], [W, H], [-1, -1]]
    assert errors[:2] == [None, None] and "nope.jpg" in str(errors[2])


def test_image_size_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CytologiaInputError, match="missing.jpg.*not found"):
        image_size(tmp_path / "missing.jpg")
    with pytest.raises(CytologiaInputError, match="text.jpg"):
        image_size(write(tmp_path / "text.jpg", b"hello, not an image"))


def test_decode_is_bgr(tmp_path: Path) -> None:
    blue = np.zeros((H, W, 3), np.uint8)
    blue[..., 0] = 255  # BGR: channel 0 is blue
    path = tmp_path / "blue.png"
    assert cv2.imwrite(str(path), blue)
    image = decode(path)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert np.array_equal(image, blue)


def test_decode_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CytologiaInputError, match="missing.jpg.*not found"):
        decode(tmp_path / "missing.jpg")
    with pytest.raises(CytologiaInputError, match="junk.jpg.*cannot decode"):
        decode(write(tmp_path / "junk.jpg", b"\xff\xd8 definitely not a jpeg"))


def test_decode_tolerates_corrupt_and_truncated(tmp_path: Path, good: Path) -> None:
    data = good.read_bytes()
    ref = decode(good)
    assert np.array_equal(decode(write(tmp_path / "x.jpg", with_extraneous(data))), ref)
    assert decode(write(tmp_path / "t.jpg", data[: len(data) * 2 // 3])).shape == ref.shape


def test_check_clean_jpeg(good: Path) -> None:
    check = check_jpeg(good)
    assert check.status == OK and check.ok and check.message == ""
    assert (check.width, check.height) == (W, H)


def test_check_detects_extraneous_bytes(tmp_path: Path, good: Path) -> None:
    path = write(tmp_path / "extra.jpg", with_extraneous(good.read_bytes()))
    check = check_jpeg(path)
    assert check.status == EXTRANEOUS, check
    assert "extraneous bytes before marker 0xd9" in check.message
    # libjpeg's Huffman decoder reads a few bytes ahead, so it reports slightly fewer than were inserted.
    assert len(GARBAGE) - 8 <= check.extraneous_bytes <= len(GARBAGE)
    assert check.decodable and not check.ok


@pytest.mark.parametrize("keep", [0.4, 0.9, -2])
def test_check_detects_truncation(tmp_path: Path, good: Path, keep: float) -> None:
    data = good.read_bytes()
    n = len(data) + keep if keep < 0 else int(len(data) * keep)  # -2: only the EOI marker is missing
    check = check_jpeg(write(tmp_path / "trunc.jpg", data[: int(n)]))
    assert check.status == TRUNCATED, check
    assert check.decodable and (check.width, check.height) == (W, H)


def test_check_detects_corrupt_entropy_data(tmp_path: Path, good: Path) -> None:
    data = bytearray(good.read_bytes())
    sos = data.index(b"\xff\xda")
    start = sos + 2 + (data[sos + 2] << 8 | data[sos + 3])
    data[start + 10 : start + 40] = b"\x00" * 30  # wipe part of the entropy-coded data
    data[start + 60] = 0xFF  # and plant a bogus marker (0xFF followed by a non-zero byte)
    data[start + 61] = 0x12
    check = check_jpeg(write(tmp_path / "bad.jpg", bytes(data)))
    assert check.status == CORRUPT, check
    assert "Corrupt JPEG data" in check.message


def test_check_unreadable(tmp_path: Path, good: Path) -> None:
    assert check_jpeg(tmp_path / "missing.jpg").status == UNREADABLE
    assert check_jpeg(write(tmp_path / "empty.jpg", b"")).status == UNREADABLE
    assert check_jpeg(write(tmp_path / "text.jpg", b"not an image at all")).status == UNREADABLE
    head = check_jpeg(write(tmp_path / "head.jpg", good.read_bytes()[:60]))
    assert head.status == UNREADABLE and "head.jpg" in head.message


def test_check_non_jpeg_that_decodes_is_ok(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), smooth_image(1))
    check = check_jpeg(path)
    assert check.status == OK and "not a JPEG" in check.message


def test_repair_reencodes_into_cache_and_never_touches_original(tmp_path: Path, good: Path) -> None:
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    original = write(images / "cell.jpg", with_extraneous(good.read_bytes()))
    before = original.read_bytes()
    repaired = repair_jpeg(original, cache)
    assert repaired == cache / "cell.jpg"
    assert original.read_bytes() == before  # byte for byte
    assert check_jpeg(original).status == EXTRANEOUS
    assert check_jpeg(repaired).status == OK
    diff = np.abs(decode(repaired).astype(int) - decode(original).astype(int))
    assert diff.mean() < 2.0  # quality 95 re-encoding: visually the same pixels
    assert resolve_image(original, cache) == repaired
    assert resolve_image(images / "other.jpg", cache) == images / "other.jpg"
    assert resolve_image(original, None) == original


def test_repair_truncated_gives_a_clean_file(tmp_path: Path, good: Path) -> None:
    data = good.read_bytes()
    cut = write(tmp_path / "cut.jpg", data[: len(data) * 2 // 3])
    repaired = repair_jpeg(cut, tmp_path / "cache", name="sub/cut.jpg")
    assert repaired == tmp_path / "cache" / "sub" / "cut.jpg"
    assert check_jpeg(repaired).status == OK and cut.read_bytes() == data[: len(data) * 2 // 3]


def test_repair_refuses_unreadable_and_own_folder(tmp_path: Path, good: Path) -> None:
    with pytest.raises(CytologiaInputError, match="junk.jpg"):
        repair_jpeg(write(tmp_path / "junk.jpg", b"junk"), tmp_path / "cache")
    with pytest.raises(CytologiaInputError, match="own folder"):
        repair_jpeg(good, good.parent)
    with pytest.raises(CytologiaInputError, match="missing.jpg"):
        repair_jpeg(tmp_path / "missing.jpg", tmp_path / "cache")


def test_scan_and_repair_a_folder(tmp_path: Path, good: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    data = good.read_bytes()
    write(folder / "a.jpg", data)
    write(folder / "b.jpg", with_extraneous(data))
    write(folder / "c.jpg", data[: len(data) // 2])
    write(folder / "d.jpg", b"junk")
    write(folder / "notes.txt", b"ignored: not a .jpg")
    scan = scan_images(folder, workers=2)
    assert tuple(scan.columns) == SCAN_COLUMNS
    assert scan.set_index("NAME")["status"].to_dict() == {
        "a.jpg": OK,
        "b.jpg": EXTRANEOUS,
        "c.jpg": TRUNCATED,
        "d.jpg": UNREADABLE,
    }
    assert scan["img_w"].tolist() == [W, W, W, -1]
    # names given: that order, missing files reported, not skipped
    named = scan_images(folder, ["c.jpg", "a.jpg", "zz.jpg"], workers=1)
    assert named["NAME"].tolist() == ["c.jpg", "a.jpg", "zz.jpg"]
    assert named["status"].tolist() == [TRUNCATED, OK, UNREADABLE]
    repaired = repair_images(folder, scan, tmp_path / "cache")
    assert sorted(repaired["NAME"]) == ["b.jpg", "c.jpg"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["b.jpg", "c.jpg"]
    with pytest.raises(CytologiaInputError, match="does not exist"):
        scan_images(tmp_path / "nowhere")
