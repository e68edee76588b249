"""Stage 2: from a leukocyte mask to separate, boxed, cropped cells — the paper's five steps.

1. ``open_close``: opening removes specks and thin bridges, closing fills small gaps and holes.
2. ``label_regions``: connected regions and their areas.
3. ``median_area_filter``: the median region area is the typical leukocyte at this
   magnification; regions far below it (platelets, debris, slivers) or far above it (stain
   blotches, clumps) are dropped.
4. ``split_touching``: watershed on the distance transform splits cells that touch or overlap.
5. ``measure_cells`` + ``crop_cells``: box each cell and crop it from the full-resolution
   colour field for the classifier.

Every size is a fraction of the expected cell diameter in pixels, so one setting per objective
and camera (``cell_diameter_px``) adapts all of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from edge_wbc.config import PostprocessConfig
from edge_wbc.pipeline.preprocess import CROP_SCALE, cell_crop

#: Cell diameter (pixels) at the working resolution of postprocessing.
WORK_DIAMETER_PX = 64.0


@dataclass(frozen=True)
class PostprocessParams(PostprocessConfig):
    """The ``[postprocess]`` settings with the sizes derived from them.

    Fields and defaults are the config schema's (:class:`edge_wbc.config.PostprocessConfig`, where
    each one is described), so a library caller and the station cannot drift apart.
    """

    def px(self, frac: float, scale: float = 1.0) -> float:
        return frac * self.cell_diameter_px * scale

    @property
    def expected_area(self) -> float:
        return math.pi / 4.0 * self.cell_diameter_px**2

    @classmethod
    def from_config(cls, section: PostprocessConfig) -> PostprocessParams:
        return cls(**dataclasses.asdict(section))


@dataclass
class Region:
    """One cell after postprocessing, in source-image pixels."""

    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area_px: int
    mask: np.ndarray  # bool, bbox-sized
    split: bool = False  # came out of a watershed split
    crop: np.ndarray | None = None


@dataclass
class Labels:
    """A label image (0 background, 1..n cells) and per-label bookkeeping."""

    image: np.ndarray  # int32
    split_from: dict[int, int]  # cell label -> label of the merged region it was split from
    dropped_small: int = 0
    dropped_large: int = 0
    median_area: float = 0.0
    dropped_doubtful: int = 0


def _disk(diameter: float) -> np.ndarray | None:
    d = round(diameter)
    if d < 2:
        return None
    d += 1 - d % 2  # odd, so the kernel has a centre
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def open_close(mask: np.ndarray, params: PostprocessParams, scale: float = 1.0) -> np.ndarray:
    """Step 1: opening then closing (elliptic kernels), then holes filled: a leukocyte is one
    solid region however its nucleus and cytoplasm were scored."""
    m: np.ndarray = mask.astype(np.uint8)
    k_open = _disk(params.px(params.open_frac, scale))
    if k_open is not None:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k_open)
    k_close = _disk(params.px(params.close_frac, scale))
    if k_close is not None:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, k_close)
    return fill_holes(m)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every hole: redraw each outer contour filled (much faster than iterative filling)."""
    m = (mask > 0).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(m)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out > 0


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: 8-connected regions; returns (labels int32, areas indexed by label, [0] = 0)."""
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    areas[0] = 0
    return labels.astype(np.int32), areas


def confidence_filter(lab: Labels, prob: np.ndarray, min_score: float) -> Labels:
    """Step 3b: drop regions the ensemble did not vote for with conviction (see
    ``PostprocessParams.min_region_score``)."""
    n = int(lab.image.max())
    if min_score <= 0 or n == 0:
        return lab
    keep = np.zeros(n + 1, bool)
    for region_id, sl in enumerate(ndi.find_objects(lab.image), start=1):
        if sl is None:
            continue
        vals = prob[sl][lab.image[sl] == region_id]
        keep[region_id] = float(np.percentile(vals, 90)) >= min_score
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return Labels(
        lut[lab.image],
        {},
        lab.dropped_small,
        lab.dropped_large,
        lab.median_area,
        dropped_doubtful=lab.dropped_doubtful + int(n - keep.sum()),
    )


def median_area_filter(
    labels: np.ndarray, areas: np.ndarray, params: PostprocessParams, scale: float = 1.0
) -> Labels:
    """Step 3: keep regions within [min_area_ratio, max_area_ratio] x the median area."""
    floor = params.min_cell_area_frac * params.expected_area * scale**2
    ids = np.arange(len(areas))
    candidates = ids[(ids > 0) & (areas >= floor)]
    dropped_small = int(np.sum((ids > 0) & (areas < floor)))
    if candidates.size == 0:
        return Labels(np.zeros_like(labels), {}, dropped_small, 0, 0.0)
    med = float(np.median(areas[candidates]))
    lo, hi = params.min_area_ratio * med, params.max_area_ratio * med
    keep = candidates[(areas[candidates] >= lo) & (areas[candidates] <= hi)]
    dropped_small += int(np.sum(areas[candidates] < lo))
    dropped_large = int(np.sum(areas[candidates] > hi))
    lut = np.zeros(len(areas), np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return Labels(lut[labels], {}, dropped_small, dropped_large, med)


def split_touching(lab: Labels, params: PostprocessParams, scale: float = 1.0) -> Labels:
    """Step 4: watershed of each region's distance transform, seeded at its h-maxima.

    Two touching round cells give two distance peaks with a saddle at the neck; one cell, even
    an oval one, gives a single plateau. The split is only kept if every piece is still a
    plausible cell (at least min_area_ratio x the median area); otherwise the region stays whole.
    """
    img = lab.image
    out = np.zeros_like(img)
    split_from: dict[int, int] = {}
    h = max(1.0, params.px(params.watershed_h_frac, scale))
    min_dist = max(1.0, params.px(params.watershed_min_distance_frac, scale))
    min_piece = params.min_area_ratio * lab.median_area
    objects = ndi.find_objects(img)
    nxt = 1
    for region_id, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        # One pixel of padding so the distance transform sees the region's outline everywhere.
        y0, x0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
        y1, x1 = min(sl[0].stop + 1, img.shape[0]), min(sl[1].stop + 1, img.shape[1])
        region = img[y0:y1, x0:x1] == region_id
        pieces = _watershed_region(region, h, min_dist, min_piece)
        sub = out[y0:y1, x0:x1]
        if pieces is None:
            sub[region] = nxt
            nxt += 1
            continue
        for k in range(1, int(pieces.max()) + 1):
            sel = pieces == k
            if sel.any():
                sub[sel] = nxt
                split_from[nxt] = region_id
                nxt += 1
    return Labels(
        out, split_from, lab.dropped_small, lab.dropped_large, lab.median_area, lab.dropped_doubtful
    )


def _watershed_region(
    region: np.ndarray, h: float, min_dist: float, min_piece: float
) -> np.ndarray | None:
    dist = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5)
    seeds = find_seeds(dist, h, min_dist)
    if len(seeds) < 2:
        return None
    markers = np.zeros(region.shape, np.int32)
    for k, (y, x, _) in enumerate(seeds, start=1):
        markers[y, x] = k
    pieces = watershed(-dist, markers, mask=region)
    areas = np.bincount(pieces.ravel(), minlength=len(seeds) + 1)[1:]
    if np.any(areas < min_piece):
        return None
    return pieces.astype(np.int32)


def find_seeds(dist: np.ndarray, h: float, min_dist: float) -> list[tuple[int, int, float]]:
    """Cell centres: maxima of the distance transform that are at least ``min_dist`` apart and
    rise at least ``h`` above the lowest point on the straight line to every deeper seed.

    Between two touching round cells that line crosses the neck, so the test is the h-maximum
    criterion where it matters, at a fraction of skimage.h_maxima's cost (this runs for every
    region of every field).
    """
    r = max(1, int(min_dist // 2))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    peaks = (dist >= cv2.dilate(dist, kernel)) & (dist > h)
    ys, xs = np.nonzero(peaks)
    if len(ys) < 2:
        return [(int(ys[0]), int(xs[0]), float(dist[ys[0], xs[0]]))] if len(ys) else []
    order = np.argsort(-dist[ys, xs], kind="stable")
    kept: list[tuple[int, int, float]] = []
    for i in order:
        y, x, v = int(ys[i]), int(xs[i]), float(dist[ys[i], xs[i]])
        ok = True
        for ky, kx, kv in kept:
            n = int(math.hypot(ky - y, kx - x))
            if n < min_dist:
                ok = False
                break
            line = dist[
                np.linspace(y, ky, n + 1).round().astype(int),
                np.linspace(x, kx, n + 1).round().astype(int),
            ]
            if min(v, kv) - float(line.min()) < h:
                ok = False
                break
        if ok:
            kept.append((y, x, v))
    return kept


def measure_cells(lab: Labels, src_hw: tuple[int, int], params: PostprocessParams) -> list[Region]:
    """Step 5a: box and measure each cell in source pixels.

    Each cell is brought from the working scale to the source one on its own patch: the outline
    from a bilinear upscale (no staircase of the working grid), the identity from a nearest one
    (a neighbour split off by the watershed stays out). Memory follows the cells, not the frame,
    so a 12 MP photo costs what its leukocytes cost.
    """
    sh, sw = src_hw
    wh, ww = lab.image.shape
    fy, fx = sh / wh, sw / ww
    same = (wh, ww) == (sh, sw)
    regions: list[Region] = []
    margin = int(params.border_margin_px)
    for cell_id, sl in enumerate(ndi.find_objects(lab.image), start=1):
        if sl is None:
            continue
        if same:
            sel = lab.image[sl] == cell_id
            y0, x0 = sl[0].start, sl[1].start
        else:
            # One working pixel of context so the bilinear outline is not cut at the patch edge.
            py0, px0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
            py1, px1 = min(sl[0].stop + 1, wh), min(sl[1].stop + 1, ww)
            y0, x0 = math.floor(py0 * fy), math.floor(px0 * fx)
            y1, x1 = min(sh, math.ceil(py1 * fy)), min(sw, math.ceil(px1 * fx))
            patch = lab.image[py0:py1, px0:px1]
            size = (x1 - x0, y1 - y0)
            ids = cv2.resize(patch, size, interpolation=cv2.INTER_NEAREST)
            own = (patch == cell_id).astype(np.float32)
            fg = cv2.resize(own, size, interpolation=cv2.INTER_LINEAR)
            sel = (fg >= 0.5) & (ids == cell_id)
            ys, xs = np.nonzero(sel)
            if len(ys) == 0:
                continue
            sel = sel[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            y0, x0 = y0 + int(ys.min()), x0 + int(xs.min())
        y1, x1 = y0 + sel.shape[0], x0 + sel.shape[1]
        if margin > 0 and (x0 < margin or y0 < margin or x1 > sw - margin or y1 > sh - margin):
            continue
        regions.append(
            Region(
                bbox=(int(x0), int(y0), int(x1), int(y1)),
                area_px=int(sel.sum()),
                mask=sel,
                split=cell_id in lab.split_from,
            )
        )
    return regions


def crop_cells(
    rgb_balanced: np.ndarray, regions: list[Region], size: int, crop_scale: float = CROP_SCALE
) -> None:
    """Step 5b: the classifier's view of each cell, from the white-balanced full-res field."""
    for r in regions:
        r.crop = cell_crop(rgb_balanced, r.bbox, size, crop_scale)


def work_scale(src_hw: tuple[int, int], params: PostprocessParams) -> float:
    """Scale at which to postprocess: a cell WORK_DIAMETER_PX across is plenty for shapes and
    watershed (the segmenters' own output is coarser than that on a 640x480 field), and it
    keeps morphology and watershed cheap on any camera."""
    return min(1.0, WORK_DIAMETER_PX / max(params.cell_diameter_px, 1.0))


def postprocess(
    mask: np.ndarray,
    src_hw: tuple[int, int],
    params: PostprocessParams,
    scale: float = 1.0,
    prob: np.ndarray | None = None,
) -> tuple[list[Region], Labels]:
    """Steps 1-5a on a mask at ``scale`` x the source size: the cells (source pixels) and the
    label image at working scale. ``prob`` (the ensemble map the mask was thresholded from)
    enables the confidence check."""
    cleaned = open_close(mask, params, scale)
    labels, areas = label_regions(cleaned)
    lab = median_area_filter(labels, areas, params, scale)
    if prob is not None:
        lab = confidence_filter(lab, prob, params.min_region_score)
    lab = split_touching(lab, params, scale)
    return measure_cells(lab, src_hw, params), lab


def postprocess_mask(mask: np.ndarray, params: PostprocessParams) -> tuple[list[Region], Labels]:
    """``postprocess`` for a mask at source resolution (reference masks, tests): brought to the
    working scale the way the analyzer's probability map is."""
    h, w = mask.shape[:2]
    s = work_scale((h, w), params)
    wh, ww = max(1, round(h * s)), max(1, round(w * s))
    small: np.ndarray = mask.astype(np.float32)
    if (wh, ww) != (h, w):
        small = cv2.resize(small, (ww, wh), interpolation=cv2.INTER_AREA)
    return postprocess(small >= 0.5, (h, w), params, wh / h)
