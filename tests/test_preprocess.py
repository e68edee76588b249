"""White balance and the chroma floor: casts and faded stains become the field the models know."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_wbc.pipeline import preprocess as pp

FIELDS = Path(__file__).parent / "fixtures" / "fields"


def _field(name: str = "BloodImage_00007.jpg") -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(FIELDS / name)), cv2.COLOR_BGR2RGB)


def _desaturate(rgb: np.ndarray, keep: float) -> np.ndarray:
    f = rgb.astype(np.float32)
    g = f.mean(axis=2, keepdims=True)
    return np.clip(g + (f - g) * keep, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("gains", [(1.0, 0.9, 0.45), (0.5, 0.75, 1.0), (0.6, 1.0, 0.55)])
def test_colour_cast_is_removed_by_white_balance(gains: tuple[float, float, float]) -> None:
    rgb = _field()
    cast = np.clip(rgb.astype(np.float32) * gains, 0, 255).astype(np.uint8)
    bg = pp.background_rgb(pp.white_balance(cast))
    assert np.all(np.abs(bg - pp.BACKGROUND_LEVEL) <= 4), bg
    ref = pp.white_balance(rgb).astype(np.float32)
    assert np.mean(np.abs(pp.white_balance(cast).astype(np.float32) - ref)) < 6.0


def test_a_normally_stained_field_is_left_as_white_balance_makes_it() -> None:
    for name in ("BloodImage_00007.jpg", "BloodImage_00015.jpg", "BloodImage_00249.jpg"):
        rgb = _field(name)
        bg = np.maximum(pp.background_rgb(rgb), 8.0)
        gains = np.clip(pp.BACKGROUND_LEVEL / bg, 0.4, 6.0)
        balanced = pp.white_balance(rgb)
        assert pp.stain_chroma(balanced) >= pp.CHROMA_FLOOR
        assert np.array_equal(pp.restore_chroma(balanced), balanced)
        # Gains only: every channel of the output is a monotone function of the same input one.
        approx = np.clip(rgb.astype(np.float32) * gains, 0, 255)
        assert np.max(np.abs(balanced.astype(np.float32) - approx)) <= 1.0


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_grey_cast_is_brought_back_to_the_chroma_floor(keep: float) -> None:
    rgb = _field()
    faded = pp.white_balance(_desaturate(rgb, keep))
    assert pp.stain_chroma(faded) >= pp.CHROMA_FLOOR - 3
    # The restored field is close to the original balanced one, far closer than the faded input.
    ref = pp.white_balance(rgb).astype(np.float32)
    raw = _desaturate(pp.white_balance(rgb), keep).astype(np.float32)
    assert np.mean(np.abs(faded - ref)) < 0.6 * np.mean(np.abs(raw - ref))
    # The background stays neutral grey.
    bg = pp.background_rgb(faded)
    assert np.max(bg) - np.min(bg) <= 4


def test_a_grey_image_is_left_grey_and_gain_is_capped() -> None:
    grey = np.repeat(cv2.cvtColor(_field(), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    out = pp.white_balance(grey)
    assert np.all(out.max(axis=2) - out.min(axis=2) <= 1)
    # Nearly grey: stretched, but no more than MAX_CHROMA_GAIN (the rest would be noise).
    nearly = _desaturate(pp.white_balance(_field()), 0.02)
    before = pp.stain_chroma(nearly)
    after = pp.stain_chroma(pp.restore_chroma(nearly))
    assert before < after <= pp.MAX_CHROMA_GAIN * before + 2 < pp.CHROMA_FLOOR


def test_restore_chroma_keeps_shape_and_dtype() -> None:
    tiny = np.full((3, 5, 3), 200, np.uint8)
    tiny[1, 2] = (180, 160, 200)
    out = pp.restore_chroma(tiny)
    assert out.shape == tiny.shape and out.dtype == np.uint8


def test_stain_chroma_is_the_quantile_of_max_minus_min_channel() -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    small = rgb[:: max(1, 300 // 160), :: max(1, 300 // 160)].reshape(-1, 3).astype(np.int16)
    ref = float(np.quantile(small.max(1) - small.min(1), 0.99))
    assert pp.stain_chroma(rgb) == ref
