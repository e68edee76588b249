#!/usr/bin/env python3
"""Cell *types* on another lab's stain and cameras: the classifier against blinded reads.

Raabin-WBC (TXL-PBC's part; other microscopes and smartphone cameras, a different stain) has
leukocyte boxes but no types. Its cells were read blind (``convert/reads/raabin_blinded_reads.csv``;
the train split's reads are classifier training data, val and test are only measured here
and in the release): each cell was shown as the device crops
it (white-balanced, 200 px), shuffled, with no prediction, and given a type only where the image
settles it (eosinophil: coarse orange-red granules, usually two lobes; basophil: dark purple
granules over the nucleus; neutrophil: 3-5 lobes or a band in pale cytoplasm; lymphocyte: a
round dense nucleus with a thin rim; monocyte: a large folded nucleus in grey, vacuolated
cytoplasm). Blank = not callable (ambiguous, out of focus, cut by the field edge, no cell in
the box). The reader is not a haematologist: the reads measure the classifier on cells whose
type is clear, not on the hard ones, and say nothing about the uncallable third.

Each cell goes through the device's own path: white balance of the whole field, the crop rule,
the shipped classifier with its views, calibration and threshold.

    python scripts/eval_other_lab_types.py [--models models] [--data-root ../shared/data]
        [--cell-px 170] [--casts]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_wbc_convert.casts import CASTS  # noqa: E402
from edge_wbc_convert.cells import read_reads  # noqa: E402

from edge_wbc.pipeline.analysis import FieldAnalyzer  # noqa: E402
from edge_wbc.pipeline.imageio import read_image  # noqa: E402
from edge_wbc.pipeline.preprocess import cell_crop, ensure_rgb_uint8, white_balance  # noqa: E402
from edge_wbc.pipeline.results import CLASSES  # noqa: E402

Box = tuple[float, float, float, float]


def rescale(rgb: np.ndarray, box: Box, cell_px: float) -> tuple[np.ndarray, Box]:
    """The field resized so the cell's box is ``cell_px`` across (another magnification)."""
    s = cell_px / max(box[2] - box[0], box[3] - box[1], 1.0)
    h, w = rgb.shape[:2]
    out = cv2.resize(
        rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
    )
    return out, (box[0] * s, box[1] * s, box[2] * s, box[3] * s)


def score(
    an: FieldAnalyzer,
    images: Path,
    part: list[dict[str, str]],
    cell_px: float = 0.0,
    cast: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Each read cell through the device's path: (rescale,) cast, white balance, crop, classify."""
    clf = an.classifier
    assert clf is not None
    top_ok: Counter[str] = Counter()
    per: Counter[str] = Counter()
    shown: Counter[str] = Counter()
    named = named_ok = 0
    wrong = []
    for r in part:
        rgb = ensure_rgb_uint8(read_image(images / r["image"]))
        box: Box = tuple(float(r[k]) for k in ("x0", "y0", "x1", "y1"))  # type: ignore[assignment]
        if cell_px:
            rgb, box = rescale(rgb, box, cell_px)
        if cast is not None:
            rgb = cast(rgb)
        p = clf.classify(cell_crop(white_balance(rgb), box, clf.input_size, an.crop_scale))
        shown[p.label] += 1
        if not r["read"]:
            continue
        top = max(p.probs, key=lambda k: p.probs[k])
        per[r["read"]] += 1
        top_ok[r["read"]] += top == r["read"]
        if p.label in CLASSES:
            named += 1
            named_ok += p.label == r["read"]
        if top != r["read"]:
            wrong.append(
                f"{r['image'][:8]} read {r['read']}, top {top} {p.probs[top]:.2f}"
                f" -> shown {p.label}"
            )
    n = sum(per.values())
    return {
        "n": n,
        "top_ok": sum(top_ok.values()),
        "named": named,
        "named_ok": named_ok,
        "per": per,
        "per_ok": top_ok,
        "shown": shown,
        "wrong": wrong,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument(
        "--cell-px",
        type=float,
        default=0.0,
        help="resize each field so the cell is this many px across (170: BCCD's magnification)",
    )
    ap.add_argument(
        "--casts", action="store_true", help="a table under every camera cast of convert.casts"
    )
    args = ap.parse_args()
    images = args.data_root / "raabin_txl" / "images"
    if not images.is_dir():
        sys.exit(f"Raabin images not found: {images} (see ../shared/data/README.md)")
    an = FieldAnalyzer(args.models, threads=2)
    if an.classifier is None:
        sys.exit(f"no classifier in {args.models}")
    rows = read_reads()
    mag = f", cells rescaled to {args.cell_px:g} px" if args.cell_px else ""
    if args.casts:
        print(f"split cast{mag:<24} top agrees   named right  to review")
        for split in ("test", "val"):
            part = [r for r in rows if r["split"] == split and r["read"]]
            for name, fn in CASTS.items():
                r = score(an, images, part, args.cell_px, fn)
                print(
                    f"{split:5} {name:28} {r['top_ok']:3d}/{r['n']:<3d} {r['top_ok'] / r['n']:.3f}"
                    f"  {r['named_ok']:3d}/{r['named']:<3d}  {r['n'] - r['named']:4d}"
                )
        return
    for split in ("test", "val"):
        part = [r for r in rows if r["split"] == split]
        r = score(an, images, part, args.cell_px)
        n = r["n"]
        print(f"\n{split}{mag}: {len(part)} cells, {n} callable")
        print(
            f"  top class agrees with the read: {r['top_ok']}/{n} = {r['top_ok'] / max(n, 1):.3f}"
        )
        print(
            f"  at the shipped threshold: named {r['named']}, right {r['named_ok']} "
            f"({r['named_ok'] / max(r['named'], 1):.3f}), to review {n - r['named']}"
        )
        print(
            "  per read class (top agrees / called): "
            + ", ".join(f"{c} {r['per_ok'][c]}/{r['per'][c]}" for c in CLASSES if r["per"][c])
        )
        print(
            "  all cells as the station shows them: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r["shown"].items()))
        )
        for w in r["wrong"]:
            print("   ", w)


if __name__ == "__main__":
    main()
