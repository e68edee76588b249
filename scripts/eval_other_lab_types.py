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
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.cells import read_reads  # noqa: E402
from edge_wbc.analysis import FieldAnalyzer  # noqa: E402
from edge_wbc.imageio import read_image  # noqa: E402
from edge_wbc.preprocess import cell_crop, ensure_rgb_uint8, white_balance  # noqa: E402

CLASSES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    images = args.data_root / "raabin_txl" / "images"
    if not images.is_dir():
        sys.exit(f"Raabin images not found: {images} (see ../shared/data/README.md)")
    an = FieldAnalyzer(args.models, threads=2)
    if an.classifier is None:
        sys.exit(f"no classifier in {args.models}")
    clf = an.classifier
    rows = read_reads()
    for split in ("test", "val"):
        part = [r for r in rows if r["split"] == split]
        called = [r for r in part if r["read"]]
        top_ok: Counter[str] = Counter()
        per: Counter[str] = Counter()
        named = named_ok = 0
        shown: Counter[str] = Counter()
        wrong = []
        for r in part:
            rgb = white_balance(ensure_rgb_uint8(read_image(images / r["image"])))
            box = tuple(float(r[k]) for k in ("x0", "y0", "x1", "y1"))
            p = clf.classify(cell_crop(rgb, box, clf.input_size, an.crop_scale))
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
        n = len(called)
        ok = sum(top_ok.values())
        print(f"\n{split}: {len(part)} cells, {n} callable")
        print(f"  top class agrees with the read: {ok}/{n} = {ok / max(n, 1):.3f}")
        print(
            f"  at the shipped threshold: named {named}, right {named_ok} "
            f"({named_ok / max(named, 1):.3f}), to review {n - named}"
        )
        print(
            "  per read class (top agrees / called): "
            + ", ".join(f"{c} {top_ok[c]}/{per[c]}" for c in CLASSES if per[c])
        )
        print(
            "  all cells as the station shows them: "
            + ", ".join(f"{k} {v}" for k, v in sorted(shown.items()))
        )
        for w in wrong:
            print("   ", w)


if __name__ == "__main__":
    main()
