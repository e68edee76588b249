#!/usr/bin/env python3
"""Reproduce the model card's numbers through the device command, `edge-wbc analyze`.

  masks: `analyze --masks` on the Zheng 1/2 and BCCD test images, foreground IoU per source
         against the reference masks (after postprocessing: what the station counts).
  pbc:   `analyze --json` on PBC test images; the label of the detected cell nearest the image
         centre against the folder's class, accuracy per class.

Usage: scripts/eval_analyze.py masks|pbc [--data-root ../shared/data] [--models models]
       [--limit N]
Prints a table; the data never leaves the data folder (outputs go to a temp dir).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")


def analyze(paths: list[Path], models: Path, extra: list[str], work: Path) -> dict:
    lst = work / "inputs"
    lst.mkdir(exist_ok=True)
    # Unique names: Zheng's 001.png exists in both datasets.
    for i, p in enumerate(paths):
        (lst / f"{i:05d}_{p.name}").symlink_to(p.resolve())
    out = work / "analysis.json"
    cmd = [
        sys.executable,
        "-m",
        "edge_wbc.cli",
        "analyze",
        str(lst),
        "--models",
        str(models),
        "--json",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode not in (0, 1):
        sys.exit(f"analyze failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def test_split(data: Path, source: str) -> list[tuple[Path, Path]]:
    if source == "bccd":
        ids = (data / "bccd" / "splits" / "test.txt").read_text().split()
        return [
            (data / "bccd" / "JPEGImages" / f"{i}.jpg", data / "bccd" / "masks" / f"{i}.png")
            for i in ids
        ]
    d = data / "zheng2018" / f"dataset{source[-1]}"
    with open(d / "labels.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    return [(d / "images" / r["image"], d / "masks" / r["image"]) for r in rows]


#: Expected leukocyte diameter per source, as a lab sets it for its objective and camera
#: (edge-wbc analyze --cell-diameter): Zheng 1 images are ~120 px squares around one cell,
#: Zheng 2 300 px squares, BCCD 640x480 fields (the config default).
DIAMETER = {"zheng1": "80", "zheng2": "200", "bccd": "170", "pbc": "110"}


def eval_masks(data: Path, models: Path, limit: int | None) -> None:
    print(f"{'source':8} {'n':>4} {'IoU':>7} {'Dice':>7}")
    for src in ("zheng1", "zheng2", "bccd"):
        pairs = test_split(data, src)[:limit]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            analyze(
                [p for p, _ in pairs],
                models,
                ["--masks", str(work / "masks"), "--cell-diameter", DIAMETER[src]],
                work,
            )
            ious, dices = [], []
            for img, ref in pairs:
                # analyze names outputs after the file it read (the link's target).
                pred = cv2.imread(str(work / "masks" / f"{img.resolve().stem}.png"), 0)
                gt = cv2.imread(str(ref), 0)
                if pred is None:
                    ious.append(0.0)
                    dices.append(0.0)
                    continue
                p, g = pred > 0, gt > 0
                inter, union = (p & g).sum(), (p | g).sum()
                ious.append(inter / union if union else 1.0)
                dices.append(2 * inter / (p.sum() + g.sum()) if p.sum() + g.sum() else 1.0)
        print(f"{src:8} {len(pairs):4d} {np.mean(ious):7.4f} {np.mean(dices):7.4f}")


def eval_pbc(data: Path, models: Path, limit: int | None) -> None:
    with open(data / "pbc" / "index.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test" and r["label"] in CLASSES]
    if limit:
        rng = np.random.default_rng(0)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), min(limit, len(rows)), False))]
    with tempfile.TemporaryDirectory() as tmp:
        doc = analyze(
            [data / "pbc" / r["image"] for r in rows],
            models,
            ["--cell-diameter", DIAMETER["pbc"]],
            Path(tmp),
        )
    by_name = {Path(im["path"]).name: im for im in doc["images"]}
    stats = {c: [0, 0, 0] for c in CLASSES}  # correct, total, no cell / unidentified
    for r in rows:
        im = by_name.get(Path(r["image"]).name)
        st = stats[r["label"]]
        st[1] += 1
        if im is None or im["error"] or not im["cells"]:
            st[2] += 1
            continue
        cx, cy = im["width"] / 2, im["height"] / 2
        cell = min(
            im["cells"],
            key=lambda c: (
                ((c["bbox"][0] + c["bbox"][2]) / 2 - cx) ** 2
                + ((c["bbox"][1] + c["bbox"][3]) / 2 - cy) ** 2
            ),
        )
        st[0] += cell["label"] == r["label"]
        st[2] += cell["label"] == "unidentified"
    print(f"{'class':11} {'n':>5} {'accuracy':>9} {'no cell/unidentified':>21}")
    for c, (ok, n, miss) in stats.items():
        print(f"{c:11} {n:5d} {ok / max(n, 1):9.4f} {miss / max(n, 1):21.4f}")
    ok = sum(s[0] for s in stats.values())
    n = sum(s[1] for s in stats.values())
    print(f"{'all':11} {n:5d} {ok / max(n, 1):9.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("masks", "pbc"))
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    (eval_masks if a.what == "masks" else eval_pbc)(a.data_root, a.models, a.limit)


if __name__ == "__main__":
    main()
