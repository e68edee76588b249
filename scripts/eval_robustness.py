#!/usr/bin/env python3
"""How detection holds up on cameras and stains the models never saw.

Two proxies for the other-lab evaluation (640x480 fields at about BCCD's magnification with
strong yellow, blue, green or grey casts and several cells per field):

1. BCCD test fields with strong synthetic colour casts and defocus, recall/precision of the
   leukocyte boxes (box IoU >= 0.5 against VOC WBC boxes), per cast;
2. Raabin-WBC test fields (other microscopes and smartphone cameras; TXL-PBC's test split), as
   they are and rescaled to BCCD's magnification (a leukocyte ~100 px across), per cast too.

    python scripts/eval_robustness.py [--models models] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_wbc.analysis import FieldAnalyzer  # noqa: E402
from edge_wbc.imageio import read_image  # noqa: E402

Box = tuple[float, float, float, float]


def _gains(r: float, g: float, b: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        return np.clip(x.astype(np.float32) * (r, g, b), 0, 255).astype(np.uint8)

    return f


def _grey(x: np.ndarray) -> np.ndarray:
    f = x.astype(np.float32)
    g = f.mean(axis=2, keepdims=True)
    return np.clip((0.3 * f + 0.7 * g) * 0.85, 0, 255).astype(np.uint8)


CASTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "yellow": _gains(1.0, 0.92, 0.5),
    "blue": _gains(0.55, 0.75, 1.0),
    "green": _gains(0.65, 1.0, 0.6),
    "grey": _grey,
    "dark + blur": lambda x: cv2.GaussianBlur((x * 0.6).astype(np.uint8), (0, 0), 1.5),
}


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(pred: list[Box], ref: list[Box], thr: float = 0.5) -> int:
    """Greedy one-to-one matching by IoU; returns true positives."""
    pairs = sorted(
        ((iou(p, r), i, j) for i, p in enumerate(pred) for j, r in enumerate(ref)), reverse=True
    )
    used_p, used_r, tp = set(), set(), 0
    for v, i, j in pairs:
        if v < thr:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            tp += 1
    return tp


def voc(path: Path) -> list[Box]:
    out = []
    for o in ET.parse(path).getroot().iter("object"):
        if (o.findtext("name") or "").strip() == "WBC":
            b = o.find("bndbox")
            out.append(tuple(float(b.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")))
    return out


def run(analyzer: FieldAnalyzer, fields: list[tuple[np.ndarray, list[Box]]]) -> dict[str, dict]:
    out = {}
    for name, cast in CASTS.items():
        tp = npred = nref = exact = 0
        for rgb, ref in fields:
            res = analyzer.analyze(cast(rgb))
            pred = [tuple(map(float, c.bbox)) for c in res.cells if c.label != "other"]
            tp += match(pred, ref)
            npred += len(pred)
            nref += len(ref)
            exact += len(pred) == len(ref)
        out[name] = {
            "recall": tp / max(nref, 1),
            "precision": tp / max(npred, 1),
            "exact_count": exact / max(len(fields), 1),
            "n_cells": nref,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    analyzer = FieldAnalyzer(a.models, threads=2)
    d = a.data_root
    bccd = []
    for sid in (d / "bccd" / "splits" / "test.txt").read_text().split():
        bccd.append(
            (
                np.asarray(read_image(d / "bccd" / "JPEGImages" / f"{sid}.jpg")),
                voc(d / "bccd" / "Annotations" / f"{sid}.xml"),
            )
        )
    ann = json.loads((d / "raabin_txl" / "annotations.json").read_text())
    raabin, raabin_scaled = [], []
    for name, boxes in ann["boxes"].items():
        if ann["split"].get(name) != "test":
            continue
        rgb = np.asarray(read_image(d / "raabin_txl" / "images" / name))
        ref = [tuple(map(float, b)) for b in boxes]
        raabin.append((rgb, ref))
        # To BCCD's magnification: the leukocyte about 100 px across.
        # A field without a leukocyte keeps a typical Raabin scale (a cell ~250 px across).
        diam = float(np.median([max(b[2] - b[0], b[3] - b[1]) for b in ref])) if ref else 250.0
        s = 100.0 / max(diam, 1.0)
        small = cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        raabin_scaled.append((small, [tuple(v * s for v in b) for b in ref]))
    report = {
        "bccd_test": run(analyzer, bccd),
        "raabin_test": run(analyzer, raabin),
        "raabin_test_at_bccd_scale": run(analyzer, raabin_scaled),
    }
    for setname, rows in report.items():
        n = next(iter(rows.values()))["n_cells"]
        print(f"\n{setname} ({n} leukocytes)")
        print(f"{'cast':12} {'recall':>7} {'precision':>9} {'exact count':>11}")
        for cast, r in rows.items():
            print(f"{cast:12} {r['recall']:7.3f} {r['precision']:9.3f} {r['exact_count']:11.3f}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
