"""--cell-diameter auto: red cells as the ruler."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_wbc.pipeline.scale import LEUKOCYTE_PER_RED_CELL, ScaleError, estimate_cell_diameter


def _field(diameter: float, seed: int, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    """Pink red cells with pale centres, some touching, on a grey-white background."""
    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), (214, 212, 220), np.uint8)
    r = diameter / 2
    for _ in range(int(size[0] * size[1] / (diameter * diameter) * 0.5)):
        x, y = rng.uniform(0, size[1]), rng.uniform(0, size[0])
        rr = r * rng.uniform(0.9, 1.1)
        cv2.circle(img, (int(x), int(y)), round(rr), (205, 120, 130), -1, cv2.LINE_AA)
        cv2.circle(img, (int(x), int(y)), round(rr * 0.35), (212, 170, 178), -1)
    return img


@pytest.mark.parametrize("diameter", [24.0, 60.0, 106.0])
def test_red_cell_diameter_is_measured_at_any_magnification(diameter: float) -> None:
    est = estimate_cell_diameter(_field(diameter, s) for s in range(3))
    assert est.red_cell_px == pytest.approx(diameter, rel=0.15)
    assert est.leukocyte_px == pytest.approx(LEUKOCYTE_PER_RED_CELL * est.red_cell_px)
    assert f"--cell-diameter {est.leukocyte_px:.0f}" in est.describe()


def test_shrinking_the_fields_shrinks_the_estimate() -> None:
    fields = [_field(100.0, s) for s in range(3)]
    full = estimate_cell_diameter(fields).red_cell_px
    small = estimate_cell_diameter(
        cv2.resize(f, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA) for f in fields
    ).red_cell_px
    assert small / full == pytest.approx(0.4, rel=0.1)


def test_fields_without_red_cells_are_a_clear_error() -> None:
    blank = np.full((200, 200, 3), 220, np.uint8)
    with pytest.raises(ScaleError, match="none of the 2 image"):
        estimate_cell_diameter([blank, blank])


def test_unreadable_files_are_named_when_nothing_could_be_measured(tmp_path: Path) -> None:
    from edge_wbc.pipeline.scale import estimate_from_files

    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    match = r"none of the 0 image.*1 could not be read: .*corrupt\.jpg"
    with pytest.raises(ScaleError, match=match):
        estimate_from_files([bad])
