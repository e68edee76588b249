"""Segmentation sampler: source weights, and the chroma floor in the training path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from convert.data import ColorAug, SegSampler, load_items
from edge_wbc import preprocess as pp

DATA = Path(__file__).parent / "fixtures" / "data"


def _items() -> list:
    return [i for i in load_items(DATA, ("bccd",)) if i.mask is not None]


def test_source_weights_override_and_unknown_source_is_an_error(tmp_path: Path) -> None:
    s = SegSampler(_items(), (48, 64), tmp_path, weights={"bccd": 2.0, "zheng2": 0.5})
    assert s.weights["bccd"] == 2.0 and s.weights["zheng2"] == 0.5
    assert s.sources == ["bccd"] and s.p.tolist() == [1.0]  # only sources with images count
    x, y = s.batch(2)
    assert x.shape == (2, 48, 64, 3) and y.shape == (2, 48, 64, 1)
    with pytest.raises(ValueError, match="no segmentation source"):
        SegSampler(_items(), (48, 64), tmp_path, weights={"zheng3": 1.0})
    with pytest.raises(ValueError, match="no segmentation training images"):
        SegSampler(_items(), (48, 64), tmp_path, weights={"bccd": 0.0})


def test_augmented_fields_come_out_balanced_like_device_inputs() -> None:
    # Whatever cast and fading the augmentation applies, what the model sees went through the
    # device's white balance and chroma floor (up to the small residual cast added after it).
    bgr = cv2.imread(str(DATA / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rng = np.random.default_rng(0)
    aug = ColorAug(p=1.0)
    for _ in range(8):
        out = aug(rgb, rng)
        bg = pp.background_rgb(out)
        assert np.all(np.abs(bg - pp.BACKGROUND_LEVEL) < 45), bg
