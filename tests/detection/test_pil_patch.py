"""Importing the ultralytics backend must not change how unreadable images fail anywhere else in the process."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("ultralytics", reason="needs the ultralytics extra: pip install 'cytologia[ultralytics]'")

import cytologia.detection.ultralytics_backend  # noqa: E402, F401  (imports ultralytics, which patches PIL.Image.open)
from cytologia.data.images import image_size  # noqa: E402
from cytologia.errors import CytologiaInputError  # noqa: E402


def test_unidentified_image_still_raises_pillow_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(Image.UnidentifiedImageError):  # not ModuleNotFoundError('pi_heif') after a pip attempt
        Image.open(junk)
    with pytest.raises(CytologiaInputError, match="junk.jpg"):
        image_size(junk)
