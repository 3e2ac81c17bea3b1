"""Class -> morphology: the one table (:data:`MORPHOLOGY`) that says how each of the 23 classes is drawn.

Every field is a distribution: a ``(lo, hi)`` pair is a uniform draw per cell, a ``(min, max)`` int pair a uniform
integer draw, a dict a categorical draw. The cell's *size* is not here: it comes from the real box sizes per class
in ``real_stats.json`` (:func:`cytologia.data.synthetic.stats.draw_box_size`).

Units. Optical densities (OD) are per stain (see :data:`STAINS`); colours come from them through the acquisition
source's stain vectors, so a "blue" cytoplasm is a methylene-blue OD, not an RGB value. ``nc`` is the nuclear
area over the cell area. Pixel sizes (``*_px``) are at the reference scale (a ~368 px image, where a neutrophil box
is ~150 px and a red cell ~90 px) and are scaled with the cell.

Haematology guide (May-Grunwald-Giemsa): PNN 3-5 lobes, fine lilac granules; EO bilobed, coarse orange granules;
BA dark purple-black granules over the nucleus; LY small, round dense nucleus, thin blue rim; MO large, folded
kidney nucleus, grey-blue vacuolated cytoplasm; blasts (B, MBL, LyB, MoB) fine chromatin and nucleoli; PM coarse
azurophil granules and a Golgi halo; M round eccentric nucleus, neutrophilic granules; MM kidney nucleus; Er very
dark round nucleus, blue to pink cytoplasm; LF deeply cleaved small cells; LLC "soccer-ball" clumped chromatin;
SS cerebriform (grooved) nucleus; LZMG polar villi; LGL azurophil granules in abundant pale cytoplasm; LH_lyAct
large hyperbasophilic cytoplasm; LAM3 hypergranular with Auer rods; Lysee smudge; Thromb platelet clump.

Hard groups are kept hard on purpose: B/MBL, M/PM/MM, LY/LGL/LH_lyAct and LY/LM/SS have overlapping ranges and
differ by probabilities (granules present or not, a notch, a groove), so no single cue separates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cytologia.data.schema import CLASSES

Range = tuple[float, float]
IntRange = tuple[int, int]

# Stains: name -> index into the per-pixel OD stack. Their colours live in the acquisition source.
STAINS: tuple[str, ...] = ("eosin", "blue", "purple", "orange")

# Granule colour as OD added per stain (eosin, blue, purple, orange) at full granule intensity.
GRANULE_OD: dict[str, tuple[float, float, float, float]] = {
    "neutrophilic": (0.45, 0.0, 0.55, 0.08),  # fine lilac-pink dust
    "azurophil": (0.45, 0.0, 1.05, 0.0),  # reddish purple
    "eosinophilic": (0.30, 0.0, 0.06, 1.10),  # orange-red, refractile
    "basophilic": (0.10, 0.25, 2.40, 0.0),  # dense purple-black
    "platelet": (0.20, 0.0, 0.90, 0.0),  # platelet granulomere
}

NUCLEUS_SHAPES: tuple[str, ...] = ("round", "kidney", "band", "bilobed", "multilobed", "cleaved", "convoluted")


@dataclass(frozen=True)
class Granules:
    """One granule population of a cell."""

    kind: str  # key of GRANULE_OD
    prob: float  # probability that a cell has this population at all
    density: Range  # granules per 100 px^2 of cytoplasm (reference scale)
    size_px: Range  # granule diameter (reference scale)
    over_nucleus: float = 0.0  # share of granules also dropped over the nucleus
    cluster: float = 0.0  # 0 spread evenly .. 1 gathered on one side of the cell


@dataclass(frozen=True)
class Morphology:
    """How one class is drawn; see the module docstring for units."""

    kind: str = "cell"  # "cell", "smudge" (lysed cell) or "platelets" (clump)
    nc: Range = (0.4, 0.6)
    aspect: Range = (0.88, 1.0)  # minor / major axis of the cell
    irregular: Range = (0.0, 0.03)  # amplitude of low-order wobble of the cell outline
    villi: Range = (0.0, 0.0)  # amplitude of fine polar projections (hairy / villous cells)
    shapes: dict[str, float] = field(default_factory=lambda: {"round": 1.0})
    nucleus_aspect: Range = (0.82, 1.0)
    offset: Range = (0.0, 0.4)  # nucleus eccentricity: 0 centred, 1 touching the membrane
    indent: Range = (0.1, 0.3)  # kidney indentation / cleft depth, 0..1 of the nucleus diameter
    lobes: IntRange = (2, 2)
    grooves: IntRange = (0, 0)  # folds drawn in a convoluted nucleus
    groove_depth: Range = (0.3, 0.6)  # how much a groove lightens the chromatin
    chromatin: Range = (1.4, 1.8)  # nuclear purple OD
    clump_px: Range = (3.0, 6.0)  # chromatin texture grain
    contrast: Range = (0.2, 0.4)  # chromatin texture contrast
    blocky: float = 0.0  # thresholded clumps separated by pale lines ("soccer ball")
    nucleoli: IntRange = (0, 0)
    nucleoli_prob: float = 0.0
    nucleolus_px: Range = (6.0, 11.0)
    cyto_blue: Range = (0.3, 0.6)  # basophilia (methylene-blue OD)
    cyto_pink: Range = (0.02, 0.06)  # acidophilia (eosin OD)
    blue_edge: Range = (0.0, 0.0)  # extra basophilia toward the cell edge
    halo: Range = (0.0, 0.0)  # pale perinuclear (Golgi) zone, fraction of cytoplasm OD removed
    granules: tuple[Granules, ...] = ()
    vacuole_prob: float = 0.0
    vacuoles: IntRange = (0, 0)
    vacuole_px: Range = (5.0, 10.0)
    auer_prob: float = 0.0
    auer_rods: IntRange = (1, 1)


_NEUTRO_FINE = Granules("neutrophilic", 1.0, (2.0, 4.0), (1.0, 1.6))

MORPHOLOGY: dict[str, Morphology] = {
    # --- myeloid, mature -------------------------------------------------------------------------------------
    "PNN": Morphology(
        nc=(0.24, 0.36),
        shapes={"multilobed": 0.82, "band": 0.18},
        lobes=(3, 5),
        offset=(0.0, 0.3),
        chromatin=(1.55, 1.95),
        clump_px=(4, 7),
        contrast=(0.3, 0.5),
        cyto_blue=(0.0, 0.06),
        cyto_pink=(0.08, 0.16),
        granules=(_NEUTRO_FINE,),
    ),
    "EO": Morphology(
        nc=(0.24, 0.36),
        shapes={"bilobed": 0.85, "multilobed": 0.15},
        lobes=(3, 3),
        offset=(0.0, 0.3),
        chromatin=(1.5, 1.9),
        clump_px=(4, 7),
        contrast=(0.3, 0.5),
        cyto_blue=(0.0, 0.05),
        cyto_pink=(0.08, 0.18),
        granules=(Granules("eosinophilic", 1.0, (4.0, 6.5), (2.8, 3.8), over_nucleus=0.04),),
    ),
    "BA": Morphology(
        nc=(0.3, 0.45),
        shapes={"bilobed": 0.45, "kidney": 0.35, "round": 0.2},
        indent=(0.2, 0.5),
        chromatin=(1.2, 1.6),
        cyto_blue=(0.05, 0.15),
        cyto_pink=(0.05, 0.12),
        granules=(Granules("basophilic", 1.0, (2.2, 4.0), (3.2, 5.2), over_nucleus=0.6),),
    ),
    "MO": Morphology(
        nc=(0.36, 0.56),
        irregular=(0.03, 0.09),
        shapes={"kidney": 0.4, "convoluted": 0.3, "band": 0.12, "round": 0.18},
        indent=(0.25, 0.6),
        grooves=(1, 2),
        groove_depth=(0.2, 0.45),
        offset=(0.1, 0.5),
        chromatin=(1.05, 1.4),
        clump_px=(3, 5),
        contrast=(0.25, 0.4),
        cyto_blue=(0.28, 0.55),
        cyto_pink=(0.05, 0.12),
        granules=(Granules("azurophil", 0.6, (0.4, 1.0), (1.0, 1.4)),),
        vacuole_prob=0.6,
        vacuoles=(1, 8),
        vacuole_px=(5, 12),
    ),
    # --- myeloid maturation: PM -> M -> MM (hard group) --------------------------------------------------------
    "PM": Morphology(
        nc=(0.38, 0.58),
        shapes={"round": 0.65, "kidney": 0.35},
        indent=(0.05, 0.25),
        offset=(0.3, 0.6),
        chromatin=(1.15, 1.55),
        clump_px=(2.5, 5),
        contrast=(0.2, 0.4),
        nucleoli=(1, 2),
        nucleoli_prob=0.45,
        cyto_blue=(0.35, 0.8),
        cyto_pink=(0.05, 0.14),
        halo=(0.15, 0.6),
        granules=(Granules("azurophil", 1.0, (0.6, 1.5), (1.8, 3.2), over_nucleus=0.2),),
    ),
    "M": Morphology(
        nc=(0.38, 0.56),
        shapes={"round": 0.6, "kidney": 0.4},
        indent=(0.05, 0.35),
        offset=(0.3, 0.6),
        chromatin=(1.3, 1.75),
        clump_px=(3.5, 6),
        contrast=(0.25, 0.5),
        nucleoli=(1, 1),
        nucleoli_prob=0.1,
        cyto_blue=(0.12, 0.5),
        cyto_pink=(0.08, 0.18),
        halo=(0.0, 0.45),
        granules=(_NEUTRO_FINE, Granules("azurophil", 0.55, (0.1, 0.4), (1.6, 3.0), over_nucleus=0.1)),
    ),
    "MM": Morphology(
        nc=(0.34, 0.5),
        shapes={"kidney": 0.82, "band": 0.08, "round": 0.1},
        indent=(0.25, 0.6),
        offset=(0.15, 0.5),
        chromatin=(1.45, 1.85),
        clump_px=(4, 6.5),
        contrast=(0.3, 0.5),
        cyto_blue=(0.04, 0.3),
        cyto_pink=(0.1, 0.2),
        halo=(0.0, 0.2),
        granules=(_NEUTRO_FINE, Granules("azurophil", 0.25, (0.05, 0.2), (1.5, 2.5))),
    ),
    "LAM3": Morphology(
        nc=(0.38, 0.6),
        irregular=(0.02, 0.06),
        shapes={"bilobed": 0.55, "kidney": 0.3, "round": 0.15},
        indent=(0.2, 0.5),
        chromatin=(1.1, 1.5),
        clump_px=(2.5, 4.5),
        contrast=(0.2, 0.35),
        nucleoli=(1, 2),
        nucleoli_prob=0.3,
        cyto_blue=(0.25, 0.6),
        cyto_pink=(0.1, 0.2),
        granules=(Granules("azurophil", 0.95, (3.5, 6.5), (2.4, 3.8), over_nucleus=0.5),),
        auer_prob=0.4,
        auer_rods=(1, 6),
    ),
    # --- blasts (B <-> MBL hard pair) ---------------------------------------------------------------------------
    "B": Morphology(
        nc=(0.72, 0.9),
        shapes={"round": 0.8, "kidney": 0.1, "cleaved": 0.1},
        indent=(0.05, 0.25),
        chromatin=(0.95, 1.3),
        clump_px=(2, 3.5),
        contrast=(0.1, 0.25),
        nucleoli=(1, 3),
        nucleoli_prob=0.85,
        nucleolus_px=(7, 14),
        cyto_blue=(0.5, 1.0),
        granules=(Granules("azurophil", 0.12, (0.02, 0.1), (1.4, 2.4)),),
        auer_prob=0.01,
    ),
    "MBL": Morphology(
        nc=(0.64, 0.84),
        shapes={"round": 0.75, "kidney": 0.25},
        indent=(0.05, 0.3),
        offset=(0.1, 0.5),
        chromatin=(0.95, 1.3),
        clump_px=(2, 3.5),
        contrast=(0.1, 0.25),
        nucleoli=(1, 4),
        nucleoli_prob=0.9,
        nucleolus_px=(7, 14),
        cyto_blue=(0.45, 0.95),
        granules=(Granules("azurophil", 0.4, (0.03, 0.15), (1.4, 2.6)),),
        auer_prob=0.08,
    ),
    "MoB": Morphology(
        nc=(0.5, 0.72),
        irregular=(0.03, 0.09),
        shapes={"round": 0.7, "kidney": 0.3},
        indent=(0.05, 0.3),
        chromatin=(0.9, 1.2),
        clump_px=(2.5, 4),
        contrast=(0.12, 0.25),
        nucleoli=(1, 2),
        nucleoli_prob=0.95,
        nucleolus_px=(11, 20),
        cyto_blue=(0.55, 1.0),
        cyto_pink=(0.02, 0.08),
        granules=(Granules("azurophil", 0.15, (0.2, 0.5), (1.0, 1.5)),),
        vacuole_prob=0.3,
        vacuoles=(1, 5),
        vacuole_px=(4, 9),
    ),
    "LyB": Morphology(
        nc=(0.82, 0.95),
        shapes={"round": 0.75, "kidney": 0.15, "cleaved": 0.1},
        indent=(0.05, 0.25),
        chromatin=(1.0, 1.35),
        clump_px=(2, 3.5),
        contrast=(0.12, 0.25),
        nucleoli=(1, 2),
        nucleoli_prob=0.4,
        nucleolus_px=(5, 9),
        cyto_blue=(0.45, 0.9),
    ),
    # --- lymphoid (LY <-> LGL <-> LH_lyAct, LY <-> LM <-> SS hard groups) ---------------------------------------
    "LY": Morphology(
        nc=(0.6, 0.85),
        shapes={"round": 0.8, "kidney": 0.12, "cleaved": 0.08},
        indent=(0.05, 0.25),
        offset=(0.1, 0.5),
        chromatin=(1.6, 2.1),
        clump_px=(4, 7),
        contrast=(0.35, 0.55),
        cyto_blue=(0.35, 0.75),
        granules=(Granules("azurophil", 0.15, (0.05, 0.15), (1.5, 2.5), cluster=0.6),),
    ),
    "LGL": Morphology(
        nc=(0.42, 0.66),
        shapes={"round": 0.65, "kidney": 0.35},
        indent=(0.05, 0.3),
        offset=(0.2, 0.6),
        chromatin=(1.5, 1.95),
        clump_px=(4, 7),
        contrast=(0.3, 0.5),
        cyto_blue=(0.25, 0.6),
        granules=(Granules("azurophil", 0.85, (0.08, 0.3), (1.6, 2.8), cluster=0.6),),
    ),
    "LH_lyAct": Morphology(
        nc=(0.4, 0.64),
        irregular=(0.03, 0.08),
        shapes={"round": 0.7, "kidney": 0.3},
        indent=(0.05, 0.3),
        offset=(0.1, 0.5),
        chromatin=(1.25, 1.75),
        clump_px=(3, 6),
        contrast=(0.25, 0.45),
        nucleoli=(1, 1),
        nucleoli_prob=0.3,
        cyto_blue=(0.6, 1.25),
        blue_edge=(0.1, 0.6),
        granules=(Granules("azurophil", 0.15, (0.03, 0.1), (1.5, 2.5)),),
    ),
    "LM": Morphology(
        nc=(0.7, 0.88),
        shapes={"cleaved": 0.55, "round": 0.25, "kidney": 0.2},
        indent=(0.1, 0.35),
        chromatin=(1.45, 1.95),
        clump_px=(3, 6),
        contrast=(0.3, 0.5),
        nucleoli=(1, 1),
        nucleoli_prob=0.2,
        nucleolus_px=(5, 9),
        cyto_blue=(0.3, 0.7),
    ),
    "SS": Morphology(
        nc=(0.74, 0.9),
        shapes={"convoluted": 0.8, "round": 0.1, "kidney": 0.1},
        grooves=(2, 6),
        groove_depth=(0.2, 0.6),
        chromatin=(1.6, 2.1),
        clump_px=(3, 6),
        contrast=(0.3, 0.5),
        cyto_blue=(0.25, 0.6),
        vacuole_prob=0.25,
        vacuoles=(1, 5),
        vacuole_px=(3, 6),
    ),
    "LLC": Morphology(
        nc=(0.74, 0.9),
        shapes={"round": 0.9, "kidney": 0.1},
        indent=(0.05, 0.2),
        chromatin=(1.7, 2.2),
        clump_px=(5, 8),
        contrast=(0.5, 0.8),
        blocky=0.7,
        cyto_blue=(0.25, 0.5),
    ),
    "LF": Morphology(
        nc=(0.82, 0.95),
        shapes={"cleaved": 0.85, "round": 0.15},
        indent=(0.4, 0.9),
        chromatin=(1.6, 2.1),
        clump_px=(3, 6),
        contrast=(0.3, 0.5),
        cyto_blue=(0.3, 0.6),
    ),
    "LZMG": Morphology(
        nc=(0.5, 0.72),
        villi=(0.06, 0.16),
        shapes={"round": 0.7, "kidney": 0.3},
        indent=(0.05, 0.3),
        offset=(0.3, 0.6),
        chromatin=(1.4, 1.9),
        clump_px=(3.5, 6),
        contrast=(0.3, 0.5),
        nucleoli=(1, 1),
        nucleoli_prob=0.15,
        cyto_blue=(0.35, 0.7),
    ),
    # --- others ------------------------------------------------------------------------------------------------
    "Er": Morphology(
        nc=(0.35, 0.75),
        aspect=(0.9, 1.0),
        shapes={"round": 0.95, "kidney": 0.05},
        nucleus_aspect=(0.9, 1.0),
        offset=(0.0, 0.5),
        chromatin=(2.0, 2.6),
        clump_px=(4, 7),
        contrast=(0.4, 0.7),
        blocky=0.4,
        cyto_blue=(0.1, 1.0),
        cyto_pink=(0.05, 0.3),
    ),
    "Thromb": Morphology(kind="platelets"),
    "Lysee": Morphology(kind="smudge", chromatin=(0.45, 0.95), irregular=(0.08, 0.2)),
}

assert set(MORPHOLOGY) == set(CLASSES), "MORPHOLOGY must cover exactly the 23 classes"
