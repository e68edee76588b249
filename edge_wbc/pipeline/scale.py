"""A new microscope's magnification, read off the fields themselves: red cells are the ruler.

Every blood smear field is full of red cells, and a red cell is ~7.5 µm across on every
microscope; a leukocyte (the count's median cell) is ~1.6 times that (12 µm). So the
leukocyte diameter in pixels -- the one number ``postprocess.cell_diameter_px`` asks for -- is
1.6 x the red cells' diameter in pixels, whatever the objective and camera.

The red-cell diameter of a field: the white-balanced field's foreground (colour away from the
background grey; pale centres filled), its distance transform, and the maximal inscribed discs
(peaks that are the largest value within their own radius); the area-weighted median disc is a
red cell, as they outnumber everything else. Touching red cells still give one disc each.
Measured on 30 BCCD train fields: 106 px (their VOC red-cell boxes: median 108 px); the same
fields shrunk to 0.4x: 42.8 px (expected 42.4).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from edge_wbc.pipeline.preprocess import ensure_rgb_uint8, white_balance

RED_CELL_UM = 7.5
#: Leukocyte diameter / red-cell diameter. 12 µm / 7.5 µm; on BCCD (the reference of the default
#: cell_diameter_px, 170 px) the red cells measure 106 px: 170 / 106 = 1.60.
LEUKOCYTE_PER_RED_CELL = 1.6
#: Colour distance from the white-balanced background (225 grey) above which a pixel is a cell.
FOREGROUND_DISTANCE = 30.0
#: Discs smaller than this (px radius) are noise, not cells, at any usable magnification.
MIN_RADIUS_PX = 2.0
#: Fields whose foreground covers less than this share hold too few red cells to measure.
MIN_FOREGROUND = 0.02


class ScaleError(ValueError):
    """The fields do not show enough red cells to measure the magnification."""


@dataclass(frozen=True)
class CellScale:
    red_cell_px: float  # median over the fields measured
    leukocyte_px: float
    fields: int  # fields that gave a measurement
    skipped: int  # fields without enough red cells
    spread: tuple[float, float]  # red-cell px, 25th and 75th percentile over fields

    def describe(self) -> str:
        lo, hi = self.spread
        return (
            f"red cells measure {self.red_cell_px:.1f} px across ({lo:.1f}-{hi:.1f} over "
            f"{self.fields} field(s)"
            + (f"; {self.skipped} without enough red cells" if self.skipped else "")
            + f"): leukocyte diameter {self.leukocyte_px:.0f} px "
            f"(= {LEUKOCYTE_PER_RED_CELL:g} x {RED_CELL_UM:g} µm red cells). Accept it with "
            f"--cell-diameter {self.leukocyte_px:.0f} or [postprocess] cell_diameter_px"
        )


def red_cell_diameter(rgb: np.ndarray) -> float | None:
    """The field's red-cell diameter in pixels, or None when it shows too few cells."""
    wb = white_balance(ensure_rgb_uint8(rgb)).astype(np.float32)
    fg = np.linalg.norm(wb - 225.0, axis=2) > FOREGROUND_DISTANCE
    if fg.mean() < MIN_FOREGROUND:
        return None
    fg = ndi.binary_fill_holes(fg)
    fg = ndi.binary_opening(fg, iterations=1)
    dt = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    ys, xs = np.nonzero((dt == ndi.maximum_filter(dt, size=3)) & (dt >= MIN_RADIUS_PX))
    radii = []
    for y, x in zip(ys, xs, strict=True):
        v = dt[y, x]
        r = int(np.ceil(v))
        if v >= dt[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].max():
            radii.append(float(v))
    if len(radii) < 3:
        return None
    v = np.sort(np.asarray(radii))
    # Area-weighted: a speck of debris counts for less than a cell.
    c = np.cumsum(v**2)
    return float(2.0 * v[np.searchsorted(c, c[-1] / 2.0)])


def estimate_from_files(paths: Sequence[Path], limit: int = 40) -> CellScale:
    """The leukocyte diameter from up to ``limit`` of the image files, spread over the list
    (40 fields measure a magnification to a few per cent); unreadable files are passed over."""
    from edge_wbc.pipeline.imageio import ImageError, read_image

    unreadable: list[str] = []

    def images() -> Iterator[np.ndarray]:
        for p in list(paths)[:: max(1, len(paths) // limit)][:limit]:
            try:
                yield read_image(p)
            except ImageError as e:
                unreadable.append(f"{p}: {e}")

    try:
        return estimate_cell_diameter(images())
    except ScaleError as e:
        if not unreadable:
            raise
        # "none of the 0 images" alone hides that the files given could not be read at all
        raise ScaleError(
            f"{e}; {len(unreadable)} could not be read: {'; '.join(unreadable[:3])}"
            + (" ..." if len(unreadable) > 3 else "")
        ) from None


def estimate_cell_diameter(images: Iterable[np.ndarray]) -> CellScale:
    """The leukocyte diameter in pixels from fields of one microscope and camera."""
    found: list[float] = []
    skipped = 0
    for rgb in images:
        d = red_cell_diameter(rgb)
        if d is None:
            skipped += 1
        else:
            found.append(d)
    if not found:
        raise ScaleError(
            f"none of the {skipped} image(s) shows enough red cells to measure the "
            "magnification; give --cell-diameter in pixels"
        )
    a = np.asarray(found)
    red = float(np.median(a))
    return CellScale(
        red_cell_px=red,
        leukocyte_px=LEUKOCYTE_PER_RED_CELL * red,
        fields=len(found),
        skipped=skipped,
        spread=(float(np.percentile(a, 25)), float(np.percentile(a, 75))),
    )
