"""Is this field worth counting? Flags the technician sees next to the result.

A flagged field is still analysed and returned; the station decides what to do with it
(warn, ask for a recapture). Measures are normalised so that one threshold works across
cameras and magnifications: focus is computed at a fixed size per cell diameter and divided by
the image's own contrast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

#: Flag names, stable: they are part of the analysis JSON.
OUT_OF_FOCUS = "out_of_focus"
UNDEREXPOSED = "underexposed"
OVEREXPOSED = "overexposed"
NO_CELLS = "no_cells"
CROWDED = "crowded"
OVERLAPPING = "overlapping"
FLAGS = (OUT_OF_FOCUS, UNDEREXPOSED, OVEREXPOSED, NO_CELLS, CROWDED, OVERLAPPING)

#: Focus is measured with the cell this many pixels across, whatever the camera.
FOCUS_DIAMETER_PX = 64.0


@dataclass(frozen=True)
class QualityParams:
    #: Below this normalised Laplacian variance the field is out of focus. BCCD's 364 fields
    #: (some already soft) score >= 0.038; a Gaussian blur of sigma 2 px brings them to
    #: 0.013-0.039.
    min_focus: float = 0.03
    #: The plasma background (80th percentile of luminance) below this is underexposed.
    min_background: float = 80.0
    #: More than this fraction of pixels clipped (any channel >= 254) is overexposed.
    max_clipped_frac: float = 0.25
    #: Leukocyte pixels above this fraction of the field: too crowded to trust the count.
    max_foreground_frac: float = 0.35
    #: More cells than this many expected-cell areas' worth of the field is crowded.
    max_cells_per_field_area: float = 0.5


def focus_score(grey_small: np.ndarray) -> float:
    """Variance of the Laplacian over the variance of the image (contrast-free sharpness)."""
    g = grey_small.astype(np.float32)
    lap = cv2.Laplacian(g, cv2.CV_32F, ksize=1)
    return float(lap.var() / (g.var() + 1e-6))


def _percentile_u8(grey: np.ndarray, q: float) -> int:
    # From the histogram: exact for uint8 and without sorting the image.
    hist = cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel()
    return int(np.searchsorted(np.cumsum(hist), q * hist.sum()))


def measure(rgb: np.ndarray, cell_diameter_px: float) -> dict[str, float]:
    """Image measures of the raw (not white-balanced) field: exposure is a camera property."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    s = min(1.0, FOCUS_DIAMETER_PX / max(cell_diameter_px, 1.0))
    small = grey if s >= 1.0 else cv2.resize(grey, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    r, g, b = cv2.split(rgb)
    brightest = cv2.max(cv2.max(r, g), b)
    # OpenCV's stubs take no scalar second operand, which cv2.compare accepts at run time.
    over = cv2.compare(brightest, 253, cv2.CMP_GT)  # type: ignore[call-overload]
    clipped = cv2.countNonZero(over) / brightest.size
    return {
        "focus": round(focus_score(small), 4),
        "background": float(_percentile_u8(small, 0.8)),
        "clipped_frac": round(float(clipped), 4),
    }


def assess(
    rgb: np.ndarray,
    n_cells: int,
    foreground_px: int,
    n_split: int,
    cell_diameter_px: float,
    params: QualityParams | None = None,
) -> dict[str, Any]:
    """The quality block of a field result: measures, flags and ``ok``."""
    p = params or QualityParams()
    m = measure(rgb, cell_diameter_px)
    h, w = rgb.shape[:2]
    fg_frac = foreground_px / float(h * w)
    expected_area = np.pi / 4.0 * cell_diameter_px**2
    crowd_limit = max(3.0, p.max_cells_per_field_area * h * w / expected_area)
    flags = []
    if m["focus"] < p.min_focus:
        flags.append(OUT_OF_FOCUS)
    if m["background"] < p.min_background:
        flags.append(UNDEREXPOSED)
    if m["clipped_frac"] > p.max_clipped_frac:
        flags.append(OVEREXPOSED)
    if n_cells == 0:
        flags.append(NO_CELLS)
    if fg_frac > p.max_foreground_frac or n_cells > crowd_limit:
        flags.append(CROWDED)
    if n_split > 0:
        flags.append(OVERLAPPING)
    return {
        "ok": not [f for f in flags if f != NO_CELLS],
        "flags": flags,
        **m,
        "foreground_frac": round(fg_frac, 4),
        "split_cells": int(n_split),
    }
