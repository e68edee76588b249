"""The paper's five postprocessing steps, each on its own, and touching cells split apart."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_wbc.pipeline.postprocess import (
    Labels,
    PostprocessParams,
    crop_cells,
    label_regions,
    measure_cells,
    median_area_filter,
    open_close,
    postprocess_mask,
    split_touching,
    work_scale,
)

FIELDS = Path(__file__).parent / "fixtures" / "fields"
P = PostprocessParams(cell_diameter_px=60.0)


def _disc(mask: np.ndarray, cx: int, cy: int, r: int) -> None:
    cv2.circle(mask, (cx, cy), r, 1, thickness=-1)


def _iou(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_open_close_removes_specks_and_fills_holes() -> None:
    m = np.zeros((120, 120), np.uint8)
    _disc(m, 60, 60, 30)
    m[55:65, 55:65] = 0  # a hole, like an unscored nucleus
    m[5, 5] = 1  # a speck
    params = PostprocessParams(cell_diameter_px=60.0, open_frac=0.1, close_frac=0.1)
    out = open_close(m, params)
    assert out.dtype == bool
    assert not out[5, 5]
    assert out[55:65, 55:65].all()


def test_label_regions_measures_areas() -> None:
    m = np.zeros((50, 80), bool)
    m[5:15, 5:15] = True
    m[20:40, 40:70] = True
    labels, areas = label_regions(m)
    assert sorted(areas[1:].tolist()) == [100, 600]
    assert areas[0] == 0 and labels.max() == 2


def test_median_area_filter_drops_far_outliers() -> None:
    m = np.zeros((200, 400), np.uint8)
    for cx in (40, 120, 200):  # three typical cells
        _disc(m, cx, 60, 25)
    _disc(m, 300, 60, 8)  # debris: ~0.1 x median area
    m[120:200, 0:400] = 1  # a stain blotch: ~16 x median area
    labels, areas = label_regions(m.astype(bool))
    lab = median_area_filter(labels, areas, PostprocessParams(cell_diameter_px=50.0))
    assert lab.image.max() == 3
    assert lab.dropped_small == 1 and lab.dropped_large == 1
    assert abs(lab.median_area - np.pi * 25**2) / (np.pi * 25**2) < 0.15


def test_absolute_floor_beats_a_field_of_specks() -> None:
    # Only specks: their median must not make them "typical cells".
    m = np.zeros((200, 200), bool)
    for k in range(6):
        m[10 + 30 * k : 14 + 30 * k, 20:24] = True
    labels, areas = label_regions(m)
    lab = median_area_filter(labels, areas, PostprocessParams(cell_diameter_px=50.0))
    assert lab.image.max() == 0 and lab.dropped_small == 6


def _split_one(mask: np.ndarray, params: PostprocessParams) -> Labels:
    labels, areas = label_regions(mask.astype(bool))
    lab = median_area_filter(labels, areas, params)
    # Two touching cells are one region here; the median of one region is itself, so give the
    # filter a typical single-cell area as it would have in a field with other cells.
    lab.median_area = float(np.pi / 4 * params.cell_diameter_px**2)
    return split_touching(lab, params)


@pytest.mark.parametrize("gap", [10, 0, -10])  # centres 70, 60 and 50 px apart (r = 30)
def test_watershed_splits_two_touching_discs_with_right_boxes(gap: int) -> None:
    m = np.zeros((120, 200), np.uint8)
    c1, c2 = (60, 60), (60 + 60 + gap, 60)
    _disc(m, *c1, 30)
    _disc(m, *c2, 30)
    lab = _split_one(m, P)
    cells = measure_cells(lab, m.shape, P)
    if gap > 0:
        assert len(cells) == 2 and not any(c.split for c in cells)
    else:
        assert len(cells) == 2 and all(c.split for c in cells)
    boxes = sorted(c.bbox for c in cells)
    expected = [(c1[0] - 30, 30, c1[0] + 31, 91), (c2[0] - 30, 30, c2[0] + 31, 91)]
    for got, exp in zip(boxes, expected, strict=True):
        assert _iou(got, exp) > 0.85, (got, exp)


def test_one_oval_cell_is_not_split() -> None:
    m = np.zeros((120, 200), np.uint8)
    cv2.ellipse(m, (100, 60), (42, 28), 20, 0, 360, 1, thickness=-1)
    lab = _split_one(m, P)
    assert lab.image.max() == 1 and not lab.split_from


def test_two_real_touching_leukocytes_are_split() -> None:
    """The two leukocytes of a BCCD fixture field (reference mask), moved so they overlap."""
    ref = cv2.imread(str(FIELDS / "BloodImage_00249_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    n, comp = cv2.connectedComponents(ref.astype(np.uint8))
    assert n == 3
    a, b = (comp == 1), (comp == 2)
    ya, xa = np.nonzero(a)
    yb, xb = np.nonzero(b)
    box_a = (xa.min(), ya.min(), xa.max() + 1, ya.max() + 1)
    # Slide cell b towards a along the line of their centres until they overlap a little
    # (overlap ~3 % of b's area: a typical pair of touching leukocytes in a smear).
    step = np.array([ya.mean() - yb.mean(), xa.mean() - xb.mean()])
    step /= np.linalg.norm(step)
    for t in range(0, 400):
        dy, dx = np.round(step * t).astype(int)
        moved = np.zeros_like(ref)
        moved[yb + dy, xb + dx] = True
        if (moved & a).sum() >= 0.03 * b.sum():
            break
    box_b = (xb.min() + dx, yb.min() + dy, xb.max() + 1 + dx, yb.max() + 1 + dy)
    merged = a | moved
    assert cv2.connectedComponents(merged.astype(np.uint8))[0] == 2  # they really touch
    params = PostprocessParams(cell_diameter_px=170.0)
    cells, _ = postprocess_mask(merged, params)
    assert len(cells) == 2
    got = sorted(c.bbox for c in cells)
    want = sorted([tuple(int(v) for v in box_a), tuple(int(v) for v in box_b)])
    for g, w in zip(got, want, strict=True):
        assert _iou(g, w) >= 0.8, (g, w)
    assert any(c.split for c in cells)


def test_reference_masks_give_the_annotated_cells() -> None:
    import json

    expected = json.loads((FIELDS / "expected.json").read_text())["fields"]
    params = PostprocessParams(cell_diameter_px=170.0)
    for name, exp in expected.items():
        ref = cv2.imread(str(FIELDS / f"{name}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        cells, lab = postprocess_mask(ref, params)
        assert lab.image.shape == (181, 241)
        assert len(cells) == len(exp["wbc_boxes_voc"]), name
        for box in exp["wbc_boxes_voc"]:
            assert max(_iou(c.bbox, box) for c in cells) >= 0.5, (name, box)


def test_work_scale_and_source_boxes() -> None:
    params = PostprocessParams(cell_diameter_px=170.0)
    assert work_scale((480, 640), params) == pytest.approx(64 / 170)
    assert work_scale((480, 640), PostprocessParams(cell_diameter_px=40.0)) == 1.0
    m = np.zeros((480, 640), np.uint8)
    _disc(m, 320, 240, 85)
    cells, _ = postprocess_mask(m, params)
    assert len(cells) == 1
    assert _iou(cells[0].bbox, (235, 155, 406, 326)) > 0.95
    assert cells[0].mask.shape == (
        cells[0].bbox[3] - cells[0].bbox[1],
        cells[0].bbox[2] - cells[0].bbox[0],
    )
    assert abs(cells[0].area_px - np.pi * 85**2) / (np.pi * 85**2) < 0.03


def test_border_margin_drops_cut_cells() -> None:
    m = np.zeros((200, 300), np.uint8)
    _disc(m, 150, 100, 30)
    _disc(m, 10, 100, 30)  # cut by the left edge
    cells, _ = postprocess_mask(m, PostprocessParams(cell_diameter_px=60.0))
    assert len(cells) == 2
    cells, _ = postprocess_mask(m, PostprocessParams(cell_diameter_px=60.0, border_margin_px=2))
    assert len(cells) == 1 and cells[0].bbox[0] > 100


def test_crops_come_from_the_colour_field() -> None:
    rgb = np.full((200, 300, 3), 225, np.uint8)
    cv2.circle(rgb, (150, 100), 30, (120, 40, 160), thickness=-1)
    m = np.zeros((200, 300), np.uint8)
    _disc(m, 150, 100, 30)
    cells, _ = postprocess_mask(m, PostprocessParams(cell_diameter_px=60.0))
    crop_cells(rgb, cells, 48)
    crop = cells[0].crop
    assert crop is not None and crop.shape == (48, 48, 3)
    assert tuple(crop[24, 24]) == (120, 40, 160)  # the cell is centred
    assert tuple(crop[1, 1]) == (225, 225, 225)  # with background around it (side = 1.5 x)


def test_params_from_a_config_section() -> None:
    from edge_wbc.config import load_config

    cfg = load_config(None, env={})
    p = PostprocessParams.from_config(cfg.postprocess)
    assert p.cell_diameter_px == cfg.postprocess.cell_diameter_px
    assert p.max_area_ratio == cfg.postprocess.max_area_ratio


def test_a_chain_of_three_touching_cells_gives_three() -> None:
    m = np.zeros((120, 260), np.uint8)
    for cx in (60, 112, 164):  # r = 30, centres 52 px apart: each pair overlaps
        _disc(m, cx, 60, 30)
    lab = _split_one(m, P)
    cells = measure_cells(lab, m.shape, P)
    assert len(cells) == 3
    xs = sorted((c.bbox[0] + c.bbox[2]) / 2 for c in cells)
    assert np.allclose(xs, [57, 112, 167], atol=6)


def test_library_defaults_match_the_config_defaults() -> None:
    """FieldAnalyzer(models) and FieldAnalyzer.from_config(default config) must analyse alike:
    the tuned defaults live in the config schema, the library's must not drift from them."""
    from edge_wbc.config import load_config
    from edge_wbc.pipeline.postprocess import PostprocessParams

    cfg = load_config(None, env={})
    assert PostprocessParams() == PostprocessParams.from_config(cfg.postprocess)
