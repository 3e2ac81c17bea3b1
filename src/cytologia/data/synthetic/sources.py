"""Acquisition sources: the hospitals/scanners of the synthetic set, each with its own look and JPEG encoder.

A source fixes the image size, magnification, stain colours (hue and saturation of each stain), staining
strength, illumination (brightness, white balance, vignetting), optical blur, sensor noise and the JPEG
quantisation tables and chroma subsampling. Tables are derived from the standard IJG tables at the source's quality
and then perturbed with a per-source pattern, so each source has tables of its own, as real scanners do; a model or
a fold splitter can thus tell sources apart from the files alone (the point of ``sources.csv``).

Shares: the real set is "mostly about 360x368 px, some up to ~800"; here 87 % of images come from sources of
352-384 px and the rest from 416, 512 and 608 px sources, whose cells are also larger (higher magnification).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cytologia.data.synthetic.morphology import STAINS

# Base stain absorbance per unit OD, in BGR order (OpenCV's channel order). Transmitted light = exp(-OD . vec).
BASE_STAIN_BGR: dict[str, tuple[float, float, float]] = {
    "eosin": (0.35, 0.95, 0.06),  # absorbs green: pink-red (red cells, acidophilic cytoplasm)
    "blue": (0.08, 0.38, 0.80),  # absorbs red: sky blue (basophilic cytoplasm)
    "purple": (0.30, 0.88, 0.58),  # absorbs green and red: purple (chromatin, azurophil granules)
    "orange": (0.95, 0.50, 0.04),  # absorbs blue: orange (eosinophil granules)
}

# IJG (libjpeg) standard tables, natural (row-major) order, quality 50.
_IJG_LUMA = np.array(
    [
        16,
        11,
        10,
        16,
        24,
        40,
        51,
        61,
        12,
        12,
        14,
        19,
        26,
        58,
        60,
        55,
        14,
        13,
        16,
        24,
        40,
        57,
        69,
        56,
        14,
        17,
        22,
        29,
        51,
        87,
        80,
        62,
        18,
        22,
        37,
        56,
        68,
        109,
        103,
        77,
        24,
        35,
        55,
        64,
        81,
        104,
        113,
        92,
        49,
        64,
        78,
        87,
        103,
        121,
        120,
        101,
        72,
        92,
        95,
        98,
        112,
        100,
        103,
        99,
    ]
)
_IJG_CHROMA = np.array(
    [
        17,
        18,
        24,
        47,
        99,
        99,
        99,
        99,
        18,
        21,
        26,
        66,
        99,
        99,
        99,
        99,
        24,
        26,
        56,
        99,
        99,
        99,
        99,
        99,
        47,
        66,
        99,
        99,
        99,
        99,
        99,
        99,
        *([99] * 32),
    ]
)


@dataclass(frozen=True)
class Source:
    """One acquisition source (centre + scanner)."""

    name: str
    weight: float  # share of images
    size: tuple[int, int]  # (width, height) px
    cell_scale: float  # magnification relative to the ~368 px reference images
    hue_deg: float  # rotation of all stain colours about the grey axis
    saturation: float  # 1 = base stain colours, <1 greyer, >1 more vivid
    stain_strength: tuple[float, float, float, float]  # OD multiplier per stain (eosin, blue, purple, orange)
    brightness: float  # white level, 0..1 of 255
    white_balance: tuple[float, float, float]  # BGR gains
    vignette: float  # relative light loss at the corners
    background_od: tuple[float, float]  # plasma tint: (eosin, blue) OD everywhere
    rbc_density: tuple[float, float]  # red-cell area coverage range (can exceed 1: overlapping cells)
    blur_sigma: float  # optical blur, px at the source's size
    noise_sigma: float  # sensor noise, grey levels
    jpeg_quality: int
    subsampling: int  # PIL: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
    table_seed: int  # fixes the per-source perturbation of the quantisation tables

    @property
    def qtables(self) -> list[list[int]]:
        """The source's two quantisation tables (luma, chroma), natural order, as PIL's ``qtables`` wants."""
        return [list(t) for t in _qtables(self.jpeg_quality, self.table_seed)]

    def stain_matrix(self) -> np.ndarray:
        """(4, 3) float32: BGR absorbance of each stain of :data:`STAINS` for this source."""
        return _stain_matrix(self.hue_deg, self.saturation, self.stain_strength)


@lru_cache(maxsize=64)
def _qtables(quality: int, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality  # libjpeg's quality scaling
    rng = np.random.default_rng([seed, 7331])
    out = []
    for base in (_IJG_LUMA, _IJG_CHROMA):
        t = np.floor((base * scale + 50) / 100)
        # Vendor tweak: +-20 % per coefficient, so two sources at the same quality still differ.
        t = np.round(t * rng.uniform(0.8, 1.2, size=64))
        out.append(tuple(int(v) for v in np.clip(t, 1, 255)))
    return out[0], out[1]


def _hue_rotation(deg: float) -> np.ndarray:
    """3x3 rotation about the grey (1,1,1) axis: a hue shift in RGB/BGR space."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    k = np.ones((3, 3)) / 3.0
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3.0)
    return c * np.eye(3) + (1 - c) * k + s * cross


@lru_cache(maxsize=256)
def _stain_matrix(hue_deg: float, saturation: float, strength: tuple[float, ...]) -> np.ndarray:
    rot = _hue_rotation(hue_deg)
    rows = []
    for name, mult in zip(STAINS, strength):
        v = rot @ np.array(BASE_STAIN_BGR[name])
        v = v.mean() + saturation * (v - v.mean())
        rows.append(np.clip(v, 0.005, None) * mult)
    m = np.array(rows, dtype=np.float32)
    m.setflags(write=False)
    return m


SOURCES: tuple[Source, ...] = (
    Source(
        "S01",
        0.22,
        (368, 368),
        1.00,
        0.0,
        1.00,
        (1.0, 1.0, 1.0, 1.0),
        0.96,
        (1.0, 1.0, 1.0),
        0.10,
        (0.03, 0.02),
        (0.7, 1.3),
        0.6,
        2.0,
        90,
        2,
        11,
    ),
    Source(
        "S02",
        0.18,
        (360, 368),
        1.00,
        8.0,
        0.90,
        (1.1, 0.9, 1.05, 1.0),
        0.93,
        (1.03, 1.0, 0.96),
        0.18,
        (0.05, 0.01),
        (0.8, 1.4),
        0.9,
        2.5,
        85,
        2,
        22,
    ),
    Source(
        "S03",
        0.12,
        (368, 360),
        0.98,
        -10.0,
        1.15,
        (0.9, 1.1, 0.95, 1.0),
        0.98,
        (0.97, 1.0, 1.03),
        0.05,
        (0.02, 0.04),
        (0.5, 1.1),
        0.5,
        1.5,
        92,
        1,
        33,
    ),
    Source(
        "S04",
        0.10,
        (352, 352),
        0.96,
        15.0,
        0.80,
        (1.2, 0.85, 1.1, 0.9),
        0.90,
        (1.05, 0.98, 0.94),
        0.22,
        (0.06, 0.02),
        (0.9, 1.5),
        1.1,
        3.0,
        80,
        2,
        44,
    ),
    Source(
        "S05",
        0.10,
        (368, 368),
        1.02,
        -5.0,
        1.05,
        (0.95, 1.15, 1.0, 1.1),
        0.97,
        (0.98, 1.02, 1.0),
        0.08,
        (0.02, 0.03),
        (0.6, 1.2),
        0.7,
        1.8,
        95,
        0,
        55,
    ),
    Source(
        "S06",
        0.08,
        (384, 384),
        1.04,
        20.0,
        0.95,
        (1.0, 1.0, 1.2, 1.0),
        0.94,
        (1.02, 0.97, 1.0),
        0.14,
        (0.04, 0.02),
        (0.7, 1.2),
        0.8,
        2.2,
        88,
        2,
        66,
    ),
    Source(
        "S07",
        0.07,
        (360, 360),
        0.97,
        -18.0,
        1.25,
        (1.1, 1.05, 0.9, 1.0),
        0.95,
        (0.95, 1.0, 1.05),
        0.12,
        (0.03, 0.05),
        (0.8, 1.3),
        0.6,
        2.8,
        83,
        1,
        77,
    ),
    Source(
        "S08",
        0.05,
        (416, 416),
        1.12,
        4.0,
        0.85,
        (0.9, 0.95, 1.1, 0.95),
        0.92,
        (1.0, 1.0, 0.98),
        0.20,
        (0.05, 0.03),
        (0.6, 1.1),
        1.0,
        2.0,
        78,
        2,
        88,
    ),
    Source(
        "S09",
        0.05,
        (512, 512),
        1.30,
        -25.0,
        1.10,
        (1.05, 1.2, 1.0, 1.0),
        0.99,
        (0.96, 1.0, 1.02),
        0.06,
        (0.02, 0.02),
        (0.5, 1.0),
        1.3,
        1.5,
        94,
        0,
        99,
    ),
    Source(
        "S10",
        0.03,
        (608, 608),
        1.55,
        12.0,
        1.00,
        (1.0, 0.9, 1.15, 1.05),
        0.91,
        (1.04, 1.0, 0.95),
        0.25,
        (0.04, 0.01),
        (0.6, 1.2),
        1.6,
        3.2,
        86,
        2,
        111,
    ),
)
SOURCE_BY_NAME: dict[str, Source] = {s.name: s for s in SOURCES}


def get_source(source: Source | str) -> Source:
    """A :class:`Source` from itself or its name."""
    if isinstance(source, Source):
        return source
    try:
        return SOURCE_BY_NAME[source]
    except KeyError:
        raise KeyError(f"unknown source {source!r}; known: {' '.join(SOURCE_BY_NAME)}") from None


def source_weights() -> np.ndarray:
    """Shares of :data:`SOURCES`, normalised."""
    w = np.array([s.weight for s in SOURCES])
    return w / w.sum()


@lru_cache(maxsize=64)
def illumination(source_name: str, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float32 light field of a source: brightness x white balance x radial vignetting (read-only)."""
    s = SOURCE_BY_NAME[source_name]
    y = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / (height / 2)
    x = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / (width / 2)
    r2 = (y[:, None] ** 2 + x[None, :] ** 2) / 2.0  # 1 at the corners
    field = s.brightness * (1.0 - s.vignette * r2)
    out = field[:, :, None] * np.array(s.white_balance, dtype=np.float32)[None, None, :] * 255.0
    out = out.astype(np.float32)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=64)
def illumination_planes(source_name: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`illumination` as three contiguous (H, W) float32 planes (B, G, R), read-only."""
    field = illumination(source_name, width, height)
    planes = []
    for c in range(3):
        p = np.ascontiguousarray(field[:, :, c])
        p.setflags(write=False)
        planes.append(p)
    return planes[0], planes[1], planes[2]
