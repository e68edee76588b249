"""Cell crops for the classifier, made by the same crop rule the device uses.

Boxes come from segmentation: for PBC and Zheng (single centred cells) the segmenter's component
nearest the image centre; for BCCD fields the ground-truth mask components (the device crops
from mask boxes too), on fields whose type list can be matched to their cells; for Raabin-WBC
(another lab's stain and cameras, boxes without types) the boxed cells whose type a blinded
read settled (``reads/raabin_blinded_reads.csv``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from edge_wbc_convert.data import ColorAug, Item, mask_boxes, read_mask, read_rgb, voc_boxes

from edge_wbc.pipeline import preprocess as pp
from edge_wbc.pipeline.results import CLASSES

log = logging.getLogger(__name__)
LABELS6 = (*CLASSES, "other")

Box = tuple[int, int, int, int]

#: Blinded reads of Raabin-WBC's boxed leukocytes: split, sheet_no, image, x0, y0, x1, y1, read
#: (blank: the image does not settle the type). See scripts/eval_other_lab_types.py.
RAABIN_READS = Path(__file__).resolve().parent / "reads" / "raabin_blinded_reads.csv"


@dataclass
class CellItem:
    source: str
    image: Path
    split: str
    label: str
    box: Box


def central_box(mask: np.ndarray, min_frac: float = 0.01) -> Box | None:
    """Box of the mask component nearest the image centre (single-cell images)."""
    m = (mask > 0).astype(np.uint8)
    n, _lab, stats, cents = cv2.connectedComponentsWithStats(m)
    if n <= 1:
        return None
    h, w = m.shape
    best, best_d = None, 1e18
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < min_frac * h * w:
            continue
        x, y, bw, bh = stats[i, :4]
        inside = x <= w / 2 <= x + bw and y <= h / 2 <= y + bh
        d = 0.0 if inside else float(np.hypot(cents[i, 0] - w / 2, cents[i, 1] - h / 2))
        d -= stats[i, cv2.CC_STAT_AREA] * 1e-9  # ties: the larger component
        if d < best_d:
            best, best_d = (int(x), int(y), int(x + bw), int(y + bh)), d
    return best


def segmented_boxes(
    items: list[Item], predict_mask: Callable[[np.ndarray], np.ndarray], cache: Path
) -> dict[str, Box | None]:
    """Centre-cell box of each single-cell image, through the segmenter (cached on disk)."""
    done: dict[str, Box | None] = {}
    if cache.exists():
        done = {k: (tuple(v) if v else None) for k, v in json.loads(cache.read_text()).items()}
    todo = [it for it in items if str(it.image) not in done]
    try:
        from tqdm import tqdm

        it_iter = tqdm(todo, desc="segment cells", mininterval=30)
    except ImportError:  # pragma: no cover
        it_iter = todo
    for k, it in enumerate(it_iter):
        rgb = read_rgb(it.image)
        done[str(it.image)] = central_box(predict_mask(rgb))
        if k % 500 == 499:
            cache.write_text(json.dumps(done))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(done))
    return done


def bccd_cells(items: list[Item]) -> list[CellItem]:
    """BCCD cells whose type is unambiguous: one mask component per listed type, all one type
    when there are several."""
    out = []
    for it in items:
        if it.source != "bccd" or it.mask is None or not it.labels:
            continue
        boxes = mask_boxes(read_mask(it.mask), min_area=400)
        types = [t for t in it.labels if t in CLASSES]
        if not boxes or not types:
            continue
        if len(set(types)) == 1 and (len(boxes) == len(types) or len(types) == 1):
            out.extend(CellItem("bccd", it.image, it.split, types[0], b) for b in boxes)
    return out


def read_reads(path: Path = RAABIN_READS) -> list[dict[str, str]]:
    """Rows of a reads file (lines starting with # are comments); a misspelt type is an error,
    not a silently dropped cell."""
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    bad = sorted({r["read"] for r in rows if r["read"] and r["read"] not in CLASSES})
    if bad:
        raise ValueError(f"{path}: unknown type(s) {bad}; known: {CLASSES}")
    return rows


def raabin_cells(items: list[Item], reads: Path = RAABIN_READS) -> list[CellItem]:
    """Raabin cells with a settled type, in their image's own split (TXL-PBC's)."""
    by_name = {it.image.name: it for it in items if it.source == "raabin"}
    if not by_name:
        return []
    out = []
    for r in read_reads(reads):
        it = by_name.get(r["image"])
        if it is None or not r["read"]:
            continue
        box = (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"]))
        out.append(CellItem("raabin", it.image, it.split, r["read"], box))
    return out


#: Red cells and platelets from BCCD fields as `other`, per split: the device classifies every
#: region the segmenters keep, and on grey fields some of those are red cells.
FIELD_OTHER_PER_SPLIT: dict[str, int] = {"train": 500, "val": 120}


def bccd_other_cells(
    items: list[Item], per_split: dict[str, int] | None = None, seed: int = 7
) -> list[CellItem]:
    """A fixed random sample of BCCD's VOC red-cell and platelet boxes (>= 12 px a side)."""
    per_split = FIELD_OTHER_PER_SPLIT if per_split is None else per_split
    rng = np.random.default_rng(seed)
    out: list[CellItem] = []
    for split, n in per_split.items():
        cand = []
        for it in items:
            if it.source != "bccd" or it.split != split:
                continue
            xml = it.image.parent.parent / "Annotations" / f"{it.image.stem}.xml"
            if not xml.exists():
                continue
            for name in ("RBC", "Platelets"):
                for b in voc_boxes(xml, name):
                    if b[2] - b[0] >= 12 and b[3] - b[1] >= 12:
                        cand.append(CellItem("bccd", it.image, split, "other", b))
        out.extend(cand[i] for i in rng.permutation(len(cand))[:n])
    return out


def cell_items(items: list[Item], boxes: dict[str, Box | None]) -> tuple[list[CellItem], dict]:
    """All labelled cells; returns (cells, counts of images without a usable box per source)."""
    cells: list[CellItem] = []
    missing: dict[str, int] = {}
    for it in items:
        if it.source in ("pbc", "zheng1", "zheng2") and it.label:
            b = boxes.get(str(it.image))
            if it.source != "pbc" and it.mask is not None and b is None:
                b = central_box(read_mask(it.mask))
            if b is None:
                missing[it.source] = missing.get(it.source, 0) + 1
                continue
            cells.append(CellItem(it.source, it.image, it.split, it.label, b))
    cells.extend(bccd_cells(items))
    cells.extend(raabin_cells(items))
    cells.extend(bccd_other_cells(items))
    return cells, missing


#: Context patch side / cell box side: room for the scale (x1.2) and offset jitter of the crop
#: window (1.5 x the box) and enough background around the cell for white balance.
CONTEXT_SCALE = 2.4
#: Cells are stored with their box at most this many pixels across per pixel of the crop side
#: (never upscaled): the crop window (1.5 x the box) then still comes from more pixels than it
#: keeps (84 px for a 96-px crop, 112 for 128).
PATCH_BOX_PER_CROP_PX = 84 / 96


def context_patch(rgb: np.ndarray, box: Box, crop_px: int = 96) -> tuple[np.ndarray, Box]:
    """The raw (unbalanced) surroundings of a cell and the cell's box inside them.

    Outside the field the patch is filled with the field's own background colour, so white
    balance of the patch sees what white balance of the field sees.
    """
    window = pp.crop_window(box, CONTEXT_SCALE)
    wx0, wy0 = window[:2]
    canvas = pp.window_canvas(rgb, window, pp.background_rgb(rgb).astype(np.uint8))
    side = max(box[2] - box[0], box[3] - box[1], 1)
    s = min(1.0, crop_px * PATCH_BOX_PER_CROP_PX / side)
    if s < 1.0:
        canvas = cv2.resize(
            canvas,
            (max(1, round(canvas.shape[1] * s)), max(1, round(canvas.shape[0] * s))),
            interpolation=cv2.INTER_AREA,
        )
    b = (
        round((box[0] - wx0) * s),
        round((box[1] - wy0) * s),
        round((box[2] - wx0) * s),
        round((box[3] - wy0) * s),
    )
    return canvas, b


#: Source names of a lab's own cells (``edge-wbc-convert finetune``): ``lab-<name>``.
LAB_PREFIX = "lab-"


def is_lab_source(source: str) -> bool:
    return source.startswith(LAB_PREFIX) and len(source) > len(LAB_PREFIX)


class CropSampler:
    """Balanced stream of (crop float32 SxSx3 in [0,1], one-hot label)."""

    SOURCE_WEIGHT: ClassVar[dict[str, float]] = {
        "pbc": 0.5,
        "bccd": 0.25,
        "zheng1": 0.15,
        "zheng2": 0.1,
        "raabin": 0.2,
    }
    CLASS_WEIGHT: ClassVar[dict[str, float]] = {c: 1.0 for c in CLASSES} | {"other": 0.5}

    def __init__(
        self,
        cells: list[CellItem],
        size: int,
        seed: int = 0,
        augment: bool = True,
        source_weights: dict[str, float] | None = None,
        classes: tuple[str, ...] = LABELS6,
        allowed: dict[str, tuple[str, ...]] | None = None,
        class_weights: dict[str, float] | None = None,
    ):
        """``classes``: the model's outputs; ``allowed``: a label -> the outputs it allows (a
        partial label such as a five-part "neutrophil" for a band/segmented model: its target
        marks both); ``class_weights``: how often each label is drawn (default 1)."""
        unknown = {
            s for s in source_weights or {} if s not in self.SOURCE_WEIGHT and not is_lab_source(s)
        }
        if unknown:
            known = [*self.SOURCE_WEIGHT, f"{LAB_PREFIX}<name>"]
            raise ValueError(f"no classifier source {sorted(unknown)}; known: {known}")
        self.source_weight = {**self.SOURCE_WEIGHT, **(source_weights or {})}
        self.size, self.augment = size, augment
        self.rng = np.random.default_rng(seed)
        self.color = ColorAug()
        self.images: dict[Path, np.ndarray] = {}
        self.patches: dict[int, tuple[np.ndarray, Box]] = {}
        self.index: dict[str, dict[str, list[CellItem]]] = {}
        for c in cells:
            if c.image not in self.images:
                self.images[c.image] = read_rgb(c.image)
            self.index.setdefault(c.label, {}).setdefault(c.source, []).append(c)
        self.classes = classes
        self.allowed = allowed or {c: (c,) for c in classes}
        unknown_labels = sorted(set(self.index) - set(self.allowed))
        if unknown_labels:
            raise ValueError(f"labels {unknown_labels} name none of the outputs {list(classes)}")
        weights = class_weights if class_weights is not None else self.CLASS_WEIGHT
        self.labels = sorted(self.index, key=lambda lab: (lab not in classes, lab))
        w = np.array([weights.get(lab, 1.0) for lab in self.labels])
        self.p = w / w.sum()

    def target(self, label: str) -> np.ndarray:
        """Multi-hot over the outputs: 1 for each output the label allows."""
        y = np.zeros(len(self.classes), np.float32)
        for c in self.allowed[label]:
            y[self.classes.index(c)] = 1.0
        return y

    def crop(self, c: CellItem, rng: np.random.Generator | None, augment: bool) -> np.ndarray:
        """Exactly the device's crop when not augmenting; otherwise colour, optics, scale,
        offset and rotation applied to the cell's context patch."""
        if not (augment and rng is not None):
            img = self.images.get(c.image)
            if img is None:
                img = read_rgb(c.image)
            return pp.to_unit(pp.cell_crop(pp.white_balance(img), c.box, self.size))
        if id(c) not in self.patches:
            # Augmenting a whole 640x480 field to train on one 96-px crop cost 3/4 of every
            # training step; the cell's surroundings are all the crop (and white balance) need.
            img = self.images.get(c.image)
            self.patches[id(c)] = context_patch(
                read_rgb(c.image) if img is None else img, c.box, self.size
            )
        patch, box = self.patches[id(c)]
        img = self.color(patch, rng)
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        s = rng.uniform(0.85, 1.2)
        cx = (x0 + x1) / 2 + rng.uniform(-0.08, 0.08) * w
        cy = (y0 + y1) / 2 + rng.uniform(-0.08, 0.08) * h
        crop = pp.cell_crop(
            img, (cx - w * s / 2, cy - h * s / 2, cx + w * s / 2, cy + h * s / 2), self.size
        )
        m = cv2.getRotationMatrix2D((self.size / 2, self.size / 2), rng.uniform(0, 360), 1.0)
        crop = cv2.warpAffine(crop, m, (self.size, self.size), borderMode=cv2.BORDER_REFLECT_101)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return pp.to_unit(np.ascontiguousarray(crop))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        lab = self.labels[int(rng.choice(len(self.labels), p=self.p))]
        srcs = list(self.index[lab])
        w = np.array([self.source_weight.get(s, 0.1) for s in srcs])
        src = srcs[int(rng.choice(len(srcs), p=w / w.sum()))]
        pool = self.index[lab][src]
        c = pool[int(rng.integers(len(pool)))]
        return self.crop(c, rng, self.augment), self.target(lab)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*(self.sample() for _ in range(n)), strict=True)
        return np.stack(xs), np.stack(ys)


def _old_base(run_dir: Path, rel: Path) -> Path | None:
    """Where a cells.json written with paths relative to train-cls's working directory (before
    they were stored absolute) was made: the current directory when the image is there, else
    the nearest folder above the run folder that holds it (the run folder was usually given
    relative to the same directory). None when neither does."""
    for base in (Path.cwd(), *run_dir.resolve().parents):
        if (base / rel).is_file():
            return base
    return None


def read_cells(path: Path) -> list[CellItem]:
    """A run's cells.json. Image paths are absolute since the paths relative to the training's
    working directory could not be read from another one; an older file's relative paths are
    resolved against the folder they were made in (``_old_base``) when it can be found."""
    raw = json.loads(path.read_text())
    rel = next((Path(c["image"]) for c in raw if not Path(c["image"]).is_absolute()), None)
    base = _old_base(path.parent, rel) if rel is not None else None

    def image(p: str) -> Path:
        q = Path(p)
        return base / q if base is not None and not q.is_absolute() else q

    return [
        CellItem(c["source"], image(c["image"]), c["split"], c["label"], tuple(c["box"]))
        for c in raw
    ]


def run_cells(run_dir: Path, split: str | None = None) -> list[CellItem]:
    """The labelled cells of a classifier run (boxes fixed when the run started)."""
    cells = read_cells(run_dir / "cells.json")
    return [c for c in cells if split is None or c.split == split]


def prepare_cells(run_dir: Path, data_root: Path, segmenter: Path) -> list[CellItem]:
    """Boxes of every labelled cell, single-cell images cropped through the segmenter; written
    to the run so later stages and the release see the same cells."""
    from dataclasses import asdict

    from edge_wbc_convert.data import load_items
    from edge_wbc_convert.evaluate import tflite_prob_fn

    items = load_items(data_root, ("pbc", "zheng1", "zheng2", "bccd", "raabin"))
    prob = tflite_prob_fn(segmenter, threads=1)
    singles = [i for i in items if i.source in ("pbc", "zheng1", "zheng2")]
    boxes = segmented_boxes(
        singles, lambda rgb: prob(rgb) >= 0.5, run_dir / f"boxes_{segmenter.stem}.json"
    )
    cells, missing = cell_items(items, boxes)
    log.info("cells: %d; images without a segmented cell: %s", len(cells), missing)
    # Absolute (links kept as named): release, refit and finetune read these from any
    # working directory.
    rows = [asdict(c) | {"image": os.path.abspath(c.image)} for c in cells]
    (run_dir / "cells.json").write_text(json.dumps(rows))
    (run_dir / "cells_missing.json").write_text(json.dumps(missing))
    return cells
