"""Field quality flags: focus, exposure, empty, crowded, overlapping."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_wbc.pipeline.imageio import read_image
from edge_wbc.pipeline.quality import (
    CROWDED,
    NO_CELLS,
    OUT_OF_FOCUS,
    OVEREXPOSED,
    OVERLAPPING,
    UNDEREXPOSED,
    assess,
    focus_score,
)

FIELDS = Path(__file__).parent / "fixtures" / "fields"
D = 170.0


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return read_image(FIELDS / "BloodImage_00007.jpg")


def test_a_good_field_has_no_flags(field: np.ndarray) -> None:
    q = assess(field, n_cells=1, foreground_px=25_000, n_split=0, cell_diameter_px=D)
    assert q["flags"] == [] and q["ok"] is True
    assert 150 < q["background"] < 230


@pytest.mark.parametrize("sigma", [2.5, 4.0])
def test_blur_is_out_of_focus(field: np.ndarray, sigma: float) -> None:
    blurred = cv2.GaussianBlur(field, (0, 0), sigma)
    q = assess(blurred, 1, 25_000, 0, D)
    assert OUT_OF_FOCUS in q["flags"] and q["ok"] is False


def test_focus_does_not_depend_on_exposure(field: np.ndarray) -> None:
    grey = cv2.cvtColor(field, cv2.COLOR_RGB2GRAY).astype(np.float32)
    assert focus_score(grey * 0.6) == pytest.approx(focus_score(grey), rel=1e-3)


def test_dark_field_is_underexposed(field: np.ndarray) -> None:
    dark = (field.astype(np.float32) * 0.3).astype(np.uint8)
    q = assess(dark, 1, 25_000, 0, D)
    assert UNDEREXPOSED in q["flags"] and OVEREXPOSED not in q["flags"]


def test_bright_field_is_overexposed(field: np.ndarray) -> None:
    bright = np.clip(field.astype(np.float32) * 1.6, 0, 255).astype(np.uint8)
    q = assess(bright, 1, 25_000, 0, D)
    assert OVEREXPOSED in q["flags"] and UNDEREXPOSED not in q["flags"]


def test_no_cells_is_flagged_but_ok(field: np.ndarray) -> None:
    q = assess(field, 0, 0, 0, D)
    assert q["flags"] == [NO_CELLS] and q["ok"] is True


def test_crowded_and_overlapping(field: np.ndarray) -> None:
    h, w = field.shape[:2]
    q = assess(field, 3, int(0.5 * h * w), 2, D)
    assert CROWDED in q["flags"] and OVERLAPPING in q["flags"] and q["split_cells"] == 2
    q = assess(field, 12, 30_000, 0, D)  # more cells than fit such a field
    assert CROWDED in q["flags"]
