"""Metrics of the segmenters (single and ensemble, float and int8) and the ensemble fit.

Probability maps are computed with the device's own code path (edge_wbc.pipeline.preprocess,
edge_wbc.pipeline.inference, edge_wbc.pipeline.segment.to_probability) so that
what is measured is what ships.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_wbc.pipeline import preprocess as pp

ProbFn = Callable[[np.ndarray], np.ndarray]


def tflite_prob_fn(path: str | Path, threads: int = 1) -> ProbFn:
    """int8 model -> probability map at the source resolution, exactly as on the device."""
    from edge_wbc.pipeline.inference import TFLiteModel
    from edge_wbc.pipeline.segment import to_probability

    model = TFLiteModel(path, threads=threads)
    hw = model.input_hw

    def fn(rgb: np.ndarray) -> np.ndarray:
        x, geo = pp.segmenter_input(rgb, hw)
        return pp.unletterbox(to_probability(model.infer(x)[0]), geo)

    return fn


def keras_prob_fn(model: Any) -> ProbFn:
    hw = tuple(int(v) for v in model.input.shape[1:3])

    def fn(rgb: np.ndarray) -> np.ndarray:
        x, geo = pp.segmenter_input(rgb, hw)
        prob = np.asarray(model(x[None], training=False))[0, :, :, 0]
        return pp.unletterbox(prob, geo)

    return fn


def seg_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Foreground IoU and Dice (leukocyte = mask > 0) and the paper's two-class mean IoU."""
    p, g = pred > 0, gt > 0
    inter = float(np.logical_and(p, g).sum())
    union = float(np.logical_or(p, g).sum())
    ps, gs = float(p.sum()), float(g.sum())
    iou_fg = inter / union if union else 1.0
    dice = 2 * inter / (ps + gs) if ps + gs else 1.0
    bg_inter = float(np.logical_and(~p, ~g).sum())
    bg_union = float(np.logical_or(~p, ~g).sum())
    iou_bg = bg_inter / bg_union if bg_union else 1.0
    return {"iou": iou_fg, "dice": dice, "miou2": (iou_fg + iou_bg) / 2}


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def by_source(
    sources: Sequence[str], maps: Sequence[np.ndarray], gts: Sequence[np.ndarray], thr: float
) -> dict[str, dict[str, float]]:
    per: dict[str, list[dict[str, float]]] = {}
    for s, m, g in zip(sources, maps, gts, strict=True):
        per.setdefault(s, []).append(seg_scores(m >= thr, g))
    out = {s: mean_scores(v) | {"n": len(v)} for s, v in per.items()}
    return out


def ensemble_maps(maps: dict[str, list[np.ndarray]], weights: dict[str, float]) -> list[np.ndarray]:
    names = list(weights)
    total = sum(weights.values())
    n = len(maps[names[0]])
    return [sum(weights[k] / total * maps[k][i] for k in names) for i in range(n)]


def _small(m: np.ndarray, f: int = 4) -> np.ndarray:
    return cv2.resize(
        m, (max(1, m.shape[1] // f), max(1, m.shape[0] // f)), interpolation=cv2.INTER_AREA
    )


def fit_ensemble(
    maps: dict[str, list[np.ndarray]],
    gts: Sequence[np.ndarray],
    sources: Sequence[str],
    step: float = 0.1,
    min_weight: float = 0.1,
    thresholds: Sequence[float] = tuple(np.round(np.arange(0.3, 0.71, 0.05), 2)),
) -> tuple[dict[str, float], float, float]:
    """Weights on the simplex and a threshold maximising the mean over sources of the mean
    foreground IoU on validation data (each source counts the same, whatever its size).

    Every member keeps at least ``min_weight``: the validation splits are small (Zheng 2 has
    ten images), and an unconstrained fit silenced a member whose vote helps on test.
    """
    names = list(maps)
    small = {k: [_small(m) for m in v] for k, v in maps.items()}
    sgts = [_small(g.astype(np.float32)) > 0.5 for g in gts]
    grid = [
        w
        for w in itertools.product(np.arange(0, 1 + 1e-9, step), repeat=len(names))
        if abs(sum(w) - 1) < 1e-6 and min(w) >= min_weight - 1e-9
    ]
    best = (-1.0, {n: 1 / len(names) for n in names}, 0.5)
    for w in grid:
        ens = [
            sum(wi * small[k][i] for wi, k in zip(w, names, strict=True)) for i in range(len(gts))
        ]
        for t in thresholds:
            per: dict[str, list[float]] = {}
            for s, m, g in zip(sources, ens, sgts, strict=True):
                per.setdefault(s, []).append(seg_scores(m >= t, g)["iou"])
            score = float(np.mean([np.mean(v) for v in per.values()]))
            if score > best[0]:
                best = (
                    score,
                    {k: round(float(x), 3) for k, x in zip(names, w, strict=True)},
                    float(t),
                )
    return best[1], best[2], best[0]


def figure(
    rgb: np.ndarray,
    gt: np.ndarray,
    member_masks: dict[str, np.ndarray],
    ens_mask: np.ndarray,
    out: Path,
) -> Path:
    """The paper's Fig. 1: field, each model's mask, the ensemble (and the reference)."""
    h = 240
    scale = h / rgb.shape[0]
    w = round(rgb.shape[1] * scale)

    def tile(img: np.ndarray, title: str) -> np.ndarray:
        if img.ndim == 2:
            img = np.repeat((img > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
        t = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        t = cv2.copyMakeBorder(t, 26, 4, 4, 4, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        cv2.putText(t, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (20, 20, 20), 1, cv2.LINE_AA)
        return t

    tiles = [
        tile(rgb, "field"),
        *[tile(m, k) for k, m in member_masks.items()],
        tile(ens_mask, "ensemble"),
        tile(gt, "reference"),
    ]
    img = np.concatenate(tiles, axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return out
