#!/usr/bin/env python3
"""How detection holds up on cameras and stains the models never saw.

Proxies for the other-lab evaluation (640x480 fields at about BCCD's magnification with strong
yellow, blue, green or grey casts and several cells per field), each under every cast below:

1. ``bccd_test``: BCCD test fields (box IoU >= 0.5 against the VOC WBC boxes);
2. ``raabin_test``: Raabin-WBC test fields (other microscopes and smartphone cameras; TXL-PBC's
   test split) as they are (575x575, a leukocyte ~250 px across);
3. ``raabin_mosaic``: several cells per 640x480 field from other cameras: Raabin test fields
   rescaled so the leukocyte is BCCD-sized (170 px), four to a field (2x2 tiles centred on a
   cell, every box that lies whole in its tile is a reference). The tiles keep their own
   backgrounds, which is harder than one real smear: one white balance serves four cameras.

The casts are ``convert.casts.CASTS`` (linear light, with haze or desaturation for the grey
ones). Recall/precision count every detected cell that is not `other` (unidentified cells are
found leukocytes waiting for review).

    python scripts/eval_robustness.py [--models models] [--data-root ../shared/data] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from edge_wbc_convert.casts import CASTS  # noqa: E402
from eval_detection import match, voc_wbc_boxes  # noqa: E402

from edge_wbc.pipeline.analysis import FieldAnalyzer  # noqa: E402
from edge_wbc.pipeline.imageio import read_image  # noqa: E402

Box = tuple[float, float, float, float]
Field = tuple[np.ndarray, list[Box]]

#: BCCD's leukocyte diameter at 640x480 (the postprocess default is set for it).
BCCD_CELL_PX = 170.0


def run(analyzer: FieldAnalyzer, fields: list[Field]) -> dict[str, dict]:
    out = {}
    for name, fn in CASTS.items():
        tp = npred = nref = exact = 0
        for rgb, ref in fields:
            res = analyzer.analyze(fn(rgb))
            pred = [tuple(map(float, c.bbox)) for c in res.cells if c.label != "other"]
            tp += len(match(pred, ref))  # type: ignore[arg-type]
            npred += len(pred)
            nref += len(ref)
            exact += len(pred) == len(ref)
        out[name] = {
            "recall": tp / max(nref, 1),
            "precision": tp / max(npred, 1),
            "exact_count": exact / max(len(fields), 1),
            "n_cells": nref,
            "n_fields": len(fields),
        }
    return out


def raabin_test(data: Path) -> list[Field]:
    ann = json.loads((data / "raabin_txl" / "annotations.json").read_text())
    out = []
    for name, boxes in sorted(ann["boxes"].items()):
        if ann["split"].get(name) != "test":
            continue
        rgb = np.asarray(read_image(data / "raabin_txl" / "images" / name))
        out.append((rgb, [tuple(map(float, b)) for b in boxes]))
    return out


def mosaic(fields: list[Field], cell_px: float = BCCD_CELL_PX, grid: int = 2) -> list[Field]:
    """Fields with several cells from other cameras at BCCD's magnification (see the module
    docstring). Fields without a reference box are skipped."""
    tiles = []
    for rgb, ref in fields:
        if not ref:
            continue
        diam = float(np.median([max(b[2] - b[0], b[3] - b[1]) for b in ref]))
        s = cell_px / max(diam, 1.0)
        small = cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        tiles.append((small, [tuple(v * s for v in b) for b in ref]))
    th, tw = 480 // grid, 640 // grid
    out = []
    for k in range(0, len(tiles) - grid * grid + 1, grid * grid):
        canvas = np.full((480, 640, 3), 255, np.uint8)
        refs: list[Box] = []
        for j in range(grid * grid):
            img, boxes = tiles[k + j]
            y0, x0 = (j // grid) * th, (j % grid) * tw
            b0 = boxes[0]
            cy, cx = (b0[1] + b0[3]) / 2, (b0[0] + b0[2]) / 2
            oy = int(np.clip(cy - th / 2, 0, max(0, img.shape[0] - th)))
            ox = int(np.clip(cx - tw / 2, 0, max(0, img.shape[1] - tw)))
            h, w = min(th, img.shape[0] - oy), min(tw, img.shape[1] - ox)
            canvas[y0 : y0 + h, x0 : x0 + w] = img[oy : oy + h, ox : ox + w]
            for b in boxes:
                nb = (b[0] - ox + x0, b[1] - oy + y0, b[2] - ox + x0, b[3] - oy + y0)
                if nb[0] >= x0 and nb[1] >= y0 and nb[2] <= x0 + w and nb[3] <= y0 + h:
                    refs.append(nb)
        out.append((canvas, refs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    analyzer = FieldAnalyzer(a.models, threads=2)
    d = a.data_root
    bccd: list[Field] = []
    for sid in (d / "bccd" / "splits" / "test.txt").read_text().split():
        rgb = np.asarray(read_image(d / "bccd" / "JPEGImages" / f"{sid}.jpg"))
        ref = voc_wbc_boxes(d / "bccd" / "Annotations" / f"{sid}.xml")
        bccd.append((rgb, [tuple(map(float, b)) for b in ref]))  # type: ignore[misc]
    raabin = raabin_test(d)
    report = {
        "bccd_test": run(analyzer, bccd),
        "raabin_test": run(analyzer, raabin),
        "raabin_mosaic": run(analyzer, mosaic(raabin)),
    }
    for setname, rows in report.items():
        first = next(iter(rows.values()))
        print(f"\n{setname} ({first['n_cells']} leukocytes in {first['n_fields']} fields)")
        print(f"{'cast':24} {'recall':>7} {'precision':>9} {'exact count':>11}")
        for name, r in rows.items():
            print(f"{name:24} {r['recall']:7.3f} {r['precision']:9.3f} {r['exact_count']:11.3f}")
    summary = {
        s: round(float(np.mean([r["recall"] for r in rows.values()])), 4)
        for s, rows in report.items()
    }
    print("\nmean recall over casts:", summary)
    if a.json:
        a.json.write_text(json.dumps(report | {"mean_recall_over_casts": summary}, indent=2))


if __name__ == "__main__":
    main()
