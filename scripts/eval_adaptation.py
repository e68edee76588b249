#!/usr/bin/env python3
"""Does a lab's adaptation (``edge-wbc adapt``) help on a lab it was fitted for? Leave-one-lab-out.

Each of BCCD (fields), Raabin-WBC (the blinded reads, convert/reads), Zheng 1 and Zheng 2 is in
turn "the new lab". Its cells are cropped by the device's crop rule from their reference boxes
(BCCD mask components, Raabin's read boxes, Zheng's mask) and go through the shipped int8
classifier with its views, as on the station; PBC test cells (the guard) go through the whole
device analysis with PBC's cell diameter, the cell nearest the image centre being the labelled one.

The lab's pool is its cells *outside the classifier's training split* (val + test: the shipped
model never trained on them, though val chose its checkpoint and calibration). Honest caveat:
the shipped model did train on each lab's train split, so these labs are less new to it than a
real new lab, and the shipped numbers here are better than on a lab it never saw.

For N = 25, 50, 100, 200 reviewed cells drawn at random (``--repeats`` times) the rest of the
pool is the test: top-1, the share of cells that can be named at >= 97 % precision, and the
unidentified share at the threshold in use, for the shipped head and for what the station would
use after ``adapt fit`` on those N cells (the adaptation when it was accepted, else the shipped
head). Where the pool has fewer than N + 20 cells it says so. Shuffled labels must be refused.
The guard: PBC test accuracy with each lab's adaptation active. Costs: fit time for 500 cells,
per-cell cost of the head, memory.

``--scale``: BCCD test fields shrunk to 0.4x, leukocytes found against the VOC WBC boxes with
the default cell diameter, the right one (0.4 x 170), and ``--cell-diameter auto``'s estimate.

    python scripts/eval_adaptation.py [--data-root ../shared/data] [--repeats 10]
        [--pbc-max 1000] [--scale] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_wbc_convert.casts import CASTS  # noqa: E402
from edge_wbc_convert.cells import bccd_cells, central_box, raabin_cells  # noqa: E402
from edge_wbc_convert.data import load_items, read_mask, voc_boxes  # noqa: E402

from edge_wbc import taxonomy  # noqa: E402
from edge_wbc.cli.adapt import nearest_centre  # noqa: E402
from edge_wbc.pipeline import adaptation as A  # noqa: E402
from edge_wbc.pipeline.analysis import FieldAnalyzer  # noqa: E402
from edge_wbc.pipeline.heads import LinearHead  # noqa: E402
from edge_wbc.pipeline.imageio import read_image  # noqa: E402
from edge_wbc.pipeline.postprocess import PostprocessParams  # noqa: E402
from edge_wbc.pipeline.preprocess import cell_crop, ensure_rgb_uint8, white_balance  # noqa: E402
from edge_wbc.pipeline.scale import estimate_cell_diameter  # noqa: E402

LABS = ("bccd", "raabin", "zheng1", "zheng2")
NS = (25, 50, 100, 200)
MIN_TEST = 20
PBC_DIAMETER_PX = 110.0  # scripts/eval_analyze.py
BCCD_DIAMETER_PX = 170.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- cells and their embeddings (cached) -------------------------------------------------------


def lab_cells(
    an: FieldAnalyzer, data_root: Path, cache: Path, cast: str = "none", heldout: bool = False
) -> dict[str, Any]:
    """``cast``: a camera cast of edge_wbc_convert.casts applied to each field before white
    balance (a simulated new camera); ``heldout``: only cells outside the train split."""
    if cache.is_file():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    clf = an.classifier
    assert clf is not None
    items = load_items(data_root, ("zheng1", "zheng2", "bccd", "raabin"))
    cells: list[tuple[str, Path, str, str, tuple[int, int, int, int] | None]] = []
    for it in items:
        if it.source in ("zheng1", "zheng2") and it.label and it.mask is not None:
            cells.append((it.source, it.image, it.split, it.label, central_box(read_mask(it.mask))))
    for c in bccd_cells(items) + raabin_cells(items):
        cells.append((c.source, c.image, c.split, c.label, c.box))
    if heldout:
        cells = [c for c in cells if c[2] != "train"]
    fn = CASTS[cast]
    E, meta = [], []
    balanced: dict[Path, np.ndarray] = {}
    for src, img, split, label, box in cells:
        if box is None:
            continue
        if img not in balanced:
            balanced = {img: white_balance(fn(ensure_rgb_uint8(read_image(img))))}
        p = clf.classify(cell_crop(balanced[img], box, clf.input_size, an.crop_scale))
        assert p.embedding is not None
        E.append(p.embedding)
        meta.append((src, split, label, img.name))
    out = {"E": np.asarray(E, np.float32), "meta": np.asarray(meta)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def pbc_cells(data_root: Path, models: Path, cache: Path, limit: int, seed: int = 0) -> dict:
    if cache.is_file():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    import csv

    an = FieldAnalyzer(
        models, threads=1, postprocess=PostprocessParams(cell_diameter_px=PBC_DIAMETER_PX)
    )
    with open(data_root / "pbc" / "index.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in sorted(rng.permutation(len(rows))[:limit])]
    E, meta = [], []
    for r in rows:
        rgb = read_image(data_root / "pbc" / r["image"])
        res = an.analyze(rgb, r["image"])
        c = nearest_centre(res.cells, res.width, res.height)
        if c is None or c.embedding is None:
            continue
        lab = r["label"] if r["label"] in taxonomy.FIVE_PART else "other"
        E.append(c.embedding)
        meta.append(("pbc", "test", lab, r["image"]))
    out = {"E": np.asarray(E, np.float32), "meta": np.asarray(meta), "asked": np.asarray(len(rows))}
    np.savez(cache, **out)
    return out


# --- evaluation --------------------------------------------------------------------------------


def head_probs(E: np.ndarray, W: np.ndarray, b: np.ndarray, T: float) -> np.ndarray:
    return A.softmax((E @ W.T + b) / T)


def evaluate_lab(
    E: np.ndarray, labels: list[str], keys: list[str], base: A.BaseHead, repeats: int
) -> dict[str, Any]:
    n_pool = len(labels)
    out: dict[str, Any] = {"pool": n_pool, "per_n": {}}
    for N in NS:
        if n_pool < N + MIN_TEST:
            out["per_n"][N] = {"skipped": f"pool has {n_pool} cells, fewer than N + {MIN_TEST}"}
            continue
        rows: list[dict[str, Any]] = []
        per_class: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for rep in range(repeats):
            rng = np.random.default_rng(1000 * N + rep)
            perm = rng.permutation(n_pool)
            tr, te = perm[:N], perm[N:]
            lab_tr = [labels[i] for i in tr]
            lab_te = [labels[i] for i in te]
            M_te = A.label_masks(lab_te, base)
            shipped = A.metrics(A.base_probs(E[te], base), M_te, lab_te, base.confidence_threshold)
            try:
                fit = A.fit_adaptation(E[tr], lab_tr, base, [keys[i] for i in tr], seed=rep)
            except A.AdaptationError as e:
                rows.append({"error": str(e), "shipped": shipped})
                continue
            fitted = A.metrics(
                head_probs(E[te], fit.W, fit.b, fit.temperature), M_te, lab_te,
                fit.confidence_threshold,
            )  # fmt: skip
            used = fitted if fit.accepted else shipped
            rows.append({
                "accepted": fit.accepted, "shipped": shipped, "fitted": fitted, "used": used,
                "fit_s": fit.seconds,
            })  # fmt: skip
            for c, v in used["per_class"].items():
                per_class[c]["used"].append(v["top1"])
                per_class[c]["shipped"].append(shipped["per_class"][c]["top1"])
                per_class[c]["n"].append(v["n"])
        ok = [r for r in rows if "error" not in r]

        def mean(key: str, what: str, ok: list[dict[str, Any]] = ok) -> float:
            return float(np.mean([r[what][key] for r in ok])) if ok else float("nan")

        out["per_n"][N] = {
            "tests": len(te),
            "fits": len(ok),
            "errors": sorted({r["error"] for r in rows if "error" in r}),
            "accepted": sum(r["accepted"] for r in ok),
            **{
                f"{what}_{key}": mean(key, what)
                for what in ("shipped", "fitted", "used")
                for key in ("top1", "named_at_target", "unidentified")
            },
            "per_class": {
                c: {k: float(np.mean(v)) for k, v in d.items()} for c, d in per_class.items()
            },
        }
    # Shuffled labels at the largest N the pool allows: every fit must be refused.
    N = max([n for n in NS if n + MIN_TEST <= n_pool] or [min(n_pool - MIN_TEST, 25)])
    refused = fits = 0
    for rep in range(repeats):
        rng = np.random.default_rng(7 + rep)
        tr = rng.permutation(n_pool)[:N]
        lab_tr = list(rng.permutation([labels[i] for i in tr]))
        try:
            fit = A.fit_adaptation(E[tr], lab_tr, base, [keys[i] for i in tr], seed=rep)
        except A.AdaptationError:
            continue
        fits += 1
        refused += not fit.accepted
    out["shuffled"] = {"n": N, "fits": fits, "refused": refused}
    return out


def guard(
    E_lab: np.ndarray, labels: list[str], keys: list[str], base: A.BaseHead,
    pbc: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """PBC test with this lab's adaptation (fitted on its whole pool) active."""
    fit = A.fit_adaptation(E_lab, labels, base, keys)
    lab_p = [str(m[2]) for m in pbc["meta"]]
    M = A.label_masks(lab_p, base)
    ship = A.metrics(A.base_probs(pbc["E"].astype(np.float64), base), M, lab_p,
                     base.confidence_threshold)  # fmt: skip
    adapt = A.metrics(
        head_probs(pbc["E"].astype(np.float64), fit.W, fit.b, fit.temperature), M, lab_p,
        fit.confidence_threshold,
    )  # fmt: skip
    return {"accepted": fit.accepted, "shipped_top1": ship["top1"], "adapted_top1": adapt["top1"],
            "loss_points": 100 * (ship["top1"] - adapt["top1"])}  # fmt: skip


def costs(E: np.ndarray, labels: list[str], keys: list[str], base: A.BaseHead) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(labels))[:500]
    rss0 = _peak_rss_mb()
    t = time.perf_counter()
    fit = A.fit_adaptation(E[idx], [labels[i] for i in idx], base, [keys[i] for i in idx])
    fit_s = time.perf_counter() - t
    rss1 = _peak_rss_mb()
    head = LinearHead(base.classes, fit.W.T.astype(np.float64), fit.b.astype(np.float64),
                        base.sha256, fit.temperature, fit.confidence_threshold,
                        fit.other_threshold)  # fmt: skip
    e = E[0].astype(np.float32)
    n = 5000
    t = time.perf_counter()
    for _ in range(n):
        head.predict(e)
    per_cell_ms = (time.perf_counter() - t) / n * 1000
    return {"cells": len(idx), "fit_s": fit_s, "per_cell_ms": per_cell_ms,
            "fit_peak_rss_delta_mb": rss1 - rss0,
            "head_bytes": int(head.weight.nbytes + head.bias.nbytes)}  # fmt: skip


# --- the magnification -----------------------------------------------------------------------


def scale_check(models: Path, data_root: Path, factor: float = 0.4) -> dict[str, Any]:
    d = data_root / "bccd"
    ids = (d / "splits" / "test.txt").read_text().split()
    fields = []
    for sid in ids:
        img = d / "JPEGImages" / f"{sid}.jpg"
        if not img.exists():
            continue
        rgb = read_image(img)
        small = cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        boxes = [tuple(v * factor for v in b) for b in voc_boxes(d / "Annotations" / f"{sid}.xml")]
        fields.append((small, boxes))
    est = estimate_cell_diameter(f for f, _ in fields)
    out: dict[str, Any] = {"fields": len(fields), "estimate": est.describe(),
                           "auto_px": est.leukocyte_px}  # fmt: skip
    for name, diam in (
        ("default", BCCD_DIAMETER_PX),
        ("right", BCCD_DIAMETER_PX * factor),
        ("auto", est.leukocyte_px),
    ):
        an = FieldAnalyzer(models, threads=1, postprocess=PostprocessParams(cell_diameter_px=diam))
        found = total = 0
        for small, boxes in fields:
            res = an.analyze(small)
            centres = [((c.bbox[0] + c.bbox[2]) / 2, (c.bbox[1] + c.bbox[3]) / 2)
                       for c in res.cells if c.counted]  # fmt: skip
            for x0, y0, x1, y1 in boxes:
                total += 1
                found += any(x0 <= x <= x1 and y0 <= y <= y1 for x, y in centres)
        out[name] = {"diameter_px": diam, "found": found, "boxes": total,
                     "lost": 1 - found / max(total, 1)}  # fmt: skip
    return out


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache", type=Path, default=ROOT / "artefacts" / "eval_adaptation")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--pbc-max", type=int, default=1000, help="PBC test cells for the guard")
    ap.add_argument("--scale", action="store_true", help="also the 0.4x magnification check")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument(
        "--cast",
        default="none",
        help="simulate a new camera: a cast of edge_wbc_convert.casts on every lab field "
        "(the PBC guard stays as captured)",
    )
    args = ap.parse_args()

    an = FieldAnalyzer(args.models, threads=1)
    ce = an.manifest.classifier
    assert ce is not None
    base = A.shipped_head(an.manifest.path(ce), ce.classes, ce.temperature,
                          ce.confidence_threshold, ce.other_threshold, ce.sha256,
                          an.runtime.interpreter_cls)  # fmt: skip
    tag = ce.sha256[:12]
    t0 = time.perf_counter()
    if args.cast not in CASTS:
        sys.exit(f"unknown cast {args.cast!r}; known: {', '.join(CASTS)}")
    name = "" if args.cast == "none" else "_" + "".join(ch for ch in args.cast if ch.isalnum())
    cells = lab_cells(an, args.data_root, args.cache / f"labs_{tag}{name}.npz", args.cast,
                      heldout=args.cast != "none")  # fmt: skip
    pbc = pbc_cells(args.data_root, args.models, args.cache / f"pbc_{tag}_{args.pbc_max}.npz",
                    args.pbc_max)  # fmt: skip
    print(f"embeddings: {len(cells['E'])} lab cells, {len(pbc['E'])} PBC test cells "
          f"({time.perf_counter() - t0:.0f} s, cached in {args.cache})")  # fmt: skip
    E_all = cells["E"].astype(np.float64)
    meta = cells["meta"]
    report: dict[str, Any] = {"classifier_sha256": ce.sha256, "labs": {}, "guard": {}}

    for lab in LABS:
        sel = np.nonzero((meta[:, 0] == lab) & (meta[:, 1] != "train"))[0]
        E = E_all[sel]
        labels = [str(x) for x in meta[sel, 2]]
        keys = [str(x) for x in meta[sel, 3]]
        r = evaluate_lab(E, labels, keys, base, args.repeats)
        report["labs"][lab] = r
        report["guard"][lab] = guard(E, labels, keys, base, pbc)

    print(
        "\n### Leave-one-lab-out: shipped vs what the station uses after `adapt fit` on N "
        f"reviewed cells (mean of {args.repeats} draws; pool = the lab's val + test cells"
        + ("" if args.cast == "none" else f", every lab field under the '{args.cast}' cast")
        + ")\n"
    )
    print(
        "| lab | pool | N | test | accepted | top-1 shipped → used | named ≥97 % shipped → used "
        "| unidentified shipped → used | top-1 of the fitted head (even if refused) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for lab, r in report["labs"].items():
        for N, v in r["per_n"].items():
            if "skipped" in v:
                print(f"| {lab} | {r['pool']} | {N} | – | – | {v['skipped']} | | | |")
                continue
            print(
                f"| {lab} | {r['pool']} | {N} | {v['tests']} | {v['accepted']}/{v['fits']} | "
                f"{v['shipped_top1']:.3f} → {v['used_top1']:.3f} | "
                f"{v['shipped_named_at_target']:.3f} → {v['used_named_at_target']:.3f} | "
                f"{v['shipped_unidentified']:.3f} → {v['used_unidentified']:.3f} | "
                f"{v['fitted_top1']:.3f} |"
            )
    print("\n### Per class, top-1 shipped → used (largest N each lab allows)\n")
    print("| lab | N | " + " | ".join(taxonomy.FIVE_PART) + " |")
    print("|---|---|" + "---|" * len(taxonomy.FIVE_PART))
    for lab, r in report["labs"].items():
        done = [N for N, v in r["per_n"].items() if "skipped" not in v]
        if not done:
            continue
        v = r["per_n"][max(done)]["per_class"]
        cells_txt = [
            f"{v[c]['shipped']:.2f} → {v[c]['used']:.2f} (n≈{v[c]['n']:.0f})" if c in v else "–"
            for c in taxonomy.FIVE_PART
        ]
        print(f"| {lab} | {max(done)} | " + " | ".join(cells_txt) + " |")
    print(
        "\n### Shuffled labels (must be refused), and the guard: PBC test top-1 with the lab's "
        "adaptation active\n"
    )
    print(
        "| lab | shuffled: refused / fits (N) | adaptation on the whole pool accepted | "
        "PBC top-1 shipped → with it | loss (points) |"
    )
    print("|---|---|---|---|---|")
    for lab in LABS:
        s = report["labs"][lab]["shuffled"]
        g = report["guard"][lab]
        print(
            f"| {lab} | {s['refused']}/{s['fits']} ({s['n']}) | {g['accepted']} | "
            f"{g['shipped_top1']:.4f} → {g['adapted_top1']:.4f} | {g['loss_points']:.2f} |"
        )

    c = costs(E_all, [str(x) for x in meta[:, 2]], [str(x) for x in meta[:, 3]], base)
    report["costs"] = c
    print("\n### Costs (this machine)\n")
    print("| fit of 500 cells | per-cell head | fit peak RSS increase | head in memory |")
    print("|---|---|---|---|")
    print(
        f"| {c['fit_s']:.2f} s | {c['per_cell_ms']:.3f} ms | {c['fit_peak_rss_delta_mb']:.1f} MB "
        f"| {c['head_bytes'] / 1024:.0f} KiB |"
    )
    if args.scale:
        s = scale_check(args.models, args.data_root)
        report["scale"] = s
        print(f"\n### BCCD test fields at 0.4x ({s['fields']} fields)\n\n{s['estimate']}\n")
        print("| cell diameter | px | leukocytes found | lost |")
        print("|---|---|---|---|")
        for k in ("default", "right", "auto"):
            v = s[k]
            print(
                f"| {k} | {v['diameter_px']:.0f} | {v['found']}/{v['boxes']} | "
                f"{100 * v['lost']:.0f} % |"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
