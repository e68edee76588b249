"""Readers for the shared data layout and the augmentations that matter for other labs.

Everything is numpy/OpenCV so this module can also feed evaluation without TensorFlow. The
pixel path into the models is edge_wbc.pipeline.preprocess (white balance, letterbox,
crop): the same functions the device runs.
"""

from __future__ import annotations

import csv
import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np

from edge_wbc.pipeline import preprocess as pp
from edge_wbc.pipeline.results import CLASSES

log = logging.getLogger(__name__)

SOURCES = ("zheng1", "zheng2", "bccd", "raabin", "pbc")
OTHER_FOLDERS = ("ig", "erythroblast", "platelet")


@dataclass
class Item:
    """One image of a data set: where it is, its split, its labels."""

    source: str
    image: Path
    split: str
    mask: Path | None = None  # 8-bit, >0 = leukocyte
    label: str | None = None  # classification label (one of CLASSES or "other")
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # WBC boxes, x1/y1 excl.
    labels: list[str] = field(default_factory=list)  # per-box types where known


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise OSError(f"cannot read mask {path}")
    return (m > 0).astype(np.uint8)


def _zheng(root: Path, n: int) -> list[Item]:
    d = root / "zheng2018" / f"dataset{n}"
    out = []
    with open(d / "labels.csv") as f:
        for row in csv.DictReader(f):
            out.append(
                Item(
                    source=f"zheng{n}",
                    image=d / "images" / row["image"],
                    mask=d / "masks" / row["image"],
                    split=row["split"],
                    label=row["label"],
                )
            )
    return out


def voc_boxes(xml_path: Path, name: str = "WBC") -> list[tuple[int, int, int, int]]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        if obj.findtext("name", "").strip() != name:
            continue
        bb = obj.find("bndbox")
        if bb is None:
            continue
        x0, y0, x1, y1 = (int(float(bb.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x0, y0, x1 + 1, y1 + 1))
    return boxes


def _bccd(root: Path) -> list[Item]:
    d = root / "bccd"
    types: dict[str, list[str]] = {}
    with open(d / "wbc_types.csv") as f:
        for row in csv.DictReader(f):
            t = [s.strip().lower() for s in (row["types"] or "").split(",") if s.strip()]
            types[Path(row["image"]).stem] = t
    out = []
    for split in ("train", "val", "test"):
        for sid in (d / "splits" / f"{split}.txt").read_text().split():
            img = d / "JPEGImages" / f"{sid}.jpg"
            mask = d / "masks" / f"{sid}.png"
            if not img.exists():
                continue
            out.append(
                Item(
                    source="bccd",
                    image=img,
                    mask=mask if mask.exists() else None,
                    split=split,
                    boxes=voc_boxes(d / "Annotations" / f"{sid}.xml"),
                    labels=types.get(sid, []),
                )
            )
    return out


def _raabin(root: Path) -> list[Item]:
    d = root / "raabin_txl"
    ann = json.loads((d / "annotations.json").read_text())
    out = []
    for name, boxes in ann["boxes"].items():
        out.append(
            Item(
                source="raabin",
                image=d / "images" / name,
                split=ann["split"].get(name, "train"),
                boxes=[(int(b[0]), int(b[1]), int(b[2]), int(b[3])) for b in boxes],
            )
        )
    return out


def _pbc(root: Path) -> list[Item]:
    d = root / "pbc"
    out = []
    with open(d / "index.csv") as f:
        for row in csv.DictReader(f):
            lab = row["label"]
            out.append(
                Item(
                    source="pbc",
                    image=d / row["image"],
                    split=row["split"],
                    label=lab if lab in CLASSES else "other",
                )
            )
    return out


def load_items(data_root: str | Path, sources: tuple[str, ...] = SOURCES) -> list[Item]:
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} not found")
    readers = {
        "zheng1": lambda: _zheng(root, 1),
        "zheng2": lambda: _zheng(root, 2),
        "bccd": lambda: _bccd(root),
        "raabin": lambda: _raabin(root),
        "pbc": lambda: _pbc(root),
    }
    folders = {
        "zheng1": "zheng2018/dataset1",
        "zheng2": "zheng2018/dataset2",
        "bccd": "bccd",
        "raabin": "raabin_txl",
        "pbc": "pbc",
    }
    items: list[Item] = []
    for s in sources:
        if s not in readers:
            raise ValueError(f"unknown source {s!r}; known: {SOURCES}")
        if not (root / folders[s]).is_dir():
            # A partial data folder (a workstation with only some sets, the test fixture) is
            # fine: the source is skipped and says so.
            log.warning("source %s: %s not found, skipped", s, root / folders[s])
            continue
        items.extend(readers[s]())
    if not items:
        raise FileNotFoundError(f"none of the sources {sources} found under {root}")
    return items


def grabcut_mask(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pseudo-mask of a leukocyte from its box (Raabin has boxes only).

    GrabCut seeded with the box, then the largest component, filled. Where GrabCut fails (tiny
    result), the inscribed ellipse is used: a rough but honest shape prior.
    """
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
    mask = np.zeros((h, w), np.uint8)
    ellipse = np.zeros((h, w), np.uint8)
    cv2.ellipse(
        ellipse,
        ((x0 + x1) // 2, (y0 + y1) // 2),
        (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2)),
        0,
        0,
        360,
        1,
        -1,
    )
    try:
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(
            cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
            mask,
            (x0, y0, max(1, x1 - x0), max(1, y1 - y0)),
            bgd,
            fgd,
            4,
            cv2.GC_INIT_WITH_RECT,
        )
        fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(fg)
        if n > 1:
            k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            fg = (lab == k).astype(np.uint8)
            cnts, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            fg = cv2.drawContours(np.zeros_like(fg), cnts, -1, 1, -1)
        if fg.sum() > 0.3 * ellipse.sum():
            return fg
    except cv2.error:
        pass
    return ellipse


def raabin_mask(item: Item, cache_dir: Path) -> np.ndarray:
    cache_dir.mkdir(parents=True, exist_ok=True)
    p = cache_dir / (item.image.stem + ".png")
    if p.exists():
        return read_mask(p)
    rgb = read_rgb(item.image)
    m = np.zeros(rgb.shape[:2], np.uint8)
    for b in item.boxes:
        m |= grabcut_mask(rgb, b)
    cv2.imwrite(str(p), m * 255)
    return m


def mask_boxes(mask: np.ndarray, min_area: int = 30) -> list[tuple[int, int, int, int]]:
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
    out = []
    for i in range(1, n):
        x, y, w, h, a = stats[i]
        if a >= min_area:
            out.append((int(x), int(y), int(x + w), int(y + h)))
    return out


def median_cell_diameter(mask: np.ndarray) -> float:
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
    if n <= 1:
        return float(max(mask.shape)) / 2
    areas = stats[1:, cv2.CC_STAT_AREA]
    areas = areas[areas >= max(30, 0.1 * areas.max())]
    return float(2.0 * np.sqrt(np.median(areas) / np.pi))


# --------------------------------------------------------------------------- augmentation


#: Ruifrok & Johnston's haematoxylin / eosin / DAB optical densities (rows), as in
#: skimage.color: a Romanowsky stain's azure (purple) and eosin (pink) separate along the first
#: two closely enough to vary them apart.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)


def mix_stains(rgb: np.ndarray, azure: float, eosin: float) -> np.ndarray:
    """Scale the optical density of the purple (azure/haematoxylin) and pink (eosin) dyes."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    c = od.reshape(-1, 3) @ HED_FROM_RGB
    c *= np.array([azure, eosin, 1.0], np.float32)
    od = (c @ RGB_FROM_HED).reshape(rgb.shape)
    return np.clip(256.0 * np.exp(-od) - 1.0 + 0.5, 0, 255).astype(np.uint8)


@dataclass
class ColorAug:
    """Stain, camera-cast, exposure and optics variation.

    Strength is deliberately heavy: the product must hold up on labs whose fields carry strong
    yellow, blue, green or grey casts. Casts are applied *before* white balance (as a camera
    would), with a small residual cast after it so the models do not depend on a perfect balance.
    """

    p: float = 0.9
    #: Half-range of the independent gain on each stain's optical density (``stain_mix``).
    stain_gain: float = 0.35
    #: Share of fields drained of all colour before white balance (a monochrome camera, or a
    #: grey cast past what the chroma floor can restore). The grey casts alone stop at 97 %
    #: desaturation and left the segmenters blind to fully grey fields (recall 0.6).
    mono_p: float = 0.0

    def stain_mix(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Vary the amount of each dye independently (HED jitter, Tellez et al. 2018).

        A hue rotation moves every colour together; a smear stained longer in eosin, or in
        azure, is pinker or bluer *relative to its nuclei*. The classifier's commonest error on
        BCCD is such a stain's neutrophil read as an eosinophil, having learnt mostly PBC's
        ratio (this variation lifted val, not yet BCCD test: see the README).
        """
        g = self.stain_gain
        return mix_stains(rgb, rng.uniform(1 - g, 1 + g), rng.uniform(1 - g, 1 + g))

    def stain(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.stain_gain > 0 and rng.random() < 0.7:
            rgb = self.stain_mix(rgb, rng)
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18)) % 256
        hsv[..., 1] *= rng.uniform(0.55, 1.5)
        hsv[..., 2] *= rng.uniform(0.85, 1.15)
        hsv = np.clip(hsv, 0, 255).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)

    def cast(
        self, rgb: np.ndarray, rng: np.random.Generator, strength: float, mono_p: float = 0.0
    ) -> np.ndarray:
        gains = np.exp(rng.uniform(-strength, strength, 3)).astype(np.float32)
        gains /= max(gains.max(), 1e-6) if rng.random() < 0.5 else 1.0
        out = rgb.astype(np.float32) * gains
        if mono_p > 0 and rng.random() < mono_p:  # no draw otherwise: older runs replay
            out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2)
        elif rng.random() < 0.3:  # grey cast: faded, desaturated stain, down to nearly grey
            g = out.mean(axis=2, keepdims=True)
            a = rng.uniform(0.2, 0.97)
            out = out * (1 - a) + g * a
        return np.clip(out, 0, 255).astype(np.uint8)

    def exposure(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = rgb.astype(np.float32) / 255.0
        x = x ** rng.uniform(0.7, 1.4)
        x = (x - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.15, 0.15)
        return np.clip(x * 255.0, 0, 255).astype(np.uint8)

    def optics(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = rgb
        if rng.random() < 0.4:
            out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 2.0))
        if rng.random() < 0.4:
            noise = rng.normal(0, rng.uniform(1, 8), out.shape).astype(np.float32)
            out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        if rng.random() < 0.3:
            q = int(rng.integers(35, 95))
            ok, enc = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok:
                out = cv2.imdecode(enc, cv2.IMREAD_UNCHANGED)
        return out

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Raw field -> augmented, white-balanced field (uint8 RGB)."""
        out = rgb
        if rng.random() < self.p:
            out = self.stain(out, rng)
            out = self.cast(out, rng, 0.6, self.mono_p)
            out = self.exposure(out, rng)
            out = self.optics(out, rng)
        out = pp.white_balance(out)
        if rng.random() < self.p * 0.5:
            out = self.cast(out, rng, 0.12)
        return out


def geometric(
    img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    k = int(rng.integers(0, 4))
    if k:
        img = np.rot90(img, k)
        mask = None if mask is None else np.rot90(mask, k)
    if rng.random() < 0.5:
        img = img[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    return np.ascontiguousarray(img), None if mask is None else np.ascontiguousarray(mask)


def scaled_view(
    img: np.ndarray,
    mask: np.ndarray,
    out_hw: tuple[int, int],
    target_diam: float,
    src_diam: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A 4:3 view of the image at a chosen magnification.

    Zooming out past the image edge mirrors the image (and its mask): single-cell pictures then
    become fields with several cells, as other labs' fields are.
    """
    oh, ow = out_hw
    s = target_diam / max(src_diam, 1.0)
    h, w = img.shape[:2]
    nh, nw = max(8, round(h * s)), max(8, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    py, px = max(0, oh - nh), max(0, ow - nw)
    if py or px:
        t = int(rng.integers(0, py + 1))
        lft = int(rng.integers(0, px + 1))
        b, r = py - t, px - lft
        border = cv2.BORDER_REFLECT_101 if rng.random() < 0.7 else cv2.BORDER_CONSTANT
        val = [int(v) for v in pp.background_rgb(img)]
        # Reflection cannot reach further than the image's own size: pad in passes.
        while t or b or lft or r:
            h, w = img.shape[:2]
            dt, db, dl, dr = min(t, h - 1), min(b, h - 1), min(lft, w - 1), min(r, w - 1)
            img = cv2.copyMakeBorder(img, dt, db, dl, dr, border, value=val)
            mask = cv2.copyMakeBorder(mask, dt, db, dl, dr, border, value=0)
            t, b, lft, r = t - dt, b - db, lft - dl, r - dr
    h, w = img.shape[:2]
    y = int(rng.integers(0, h - oh + 1))
    x = int(rng.integers(0, w - ow + 1))
    return img[y : y + oh, x : x + ow], mask[y : y + oh, x : x + ow]


class SegSampler:
    """Endless stream of (image float32 HxWx3 in [0,1], mask float32 HxWx1) training pairs."""

    #: sampling weight per source: other cameras are worth more than the last point on Zheng.
    WEIGHTS: ClassVar[dict[str, float]] = {
        "zheng1": 0.22,
        "zheng2": 0.18,
        "bccd": 0.4,
        "raabin": 0.2,
    }

    def __init__(
        self,
        items: list[Item],
        out_hw: tuple[int, int],
        cache_dir: Path,
        seed: int = 0,
        augment: bool = True,
        native_p: float = 0.0,
        weights: dict[str, float] | None = None,
        mono_p: float = 0.0,
    ) -> None:
        unknown = set(weights or {}) - set(self.WEIGHTS)
        if unknown:
            known = list(self.WEIGHTS)
            raise ValueError(f"no segmentation source {sorted(unknown)}; known: {known}")
        self.weights = {**self.WEIGHTS, **(weights or {})}
        self.out_hw = out_hw
        self.native_p = native_p
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.color = ColorAug(mono_p=mono_p)
        self.by_source: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
        for it in items:
            if it.source not in self.weights or self.weights[it.source] <= 0:
                continue
            img = read_rgb(it.image)
            if it.mask is not None:
                m = read_mask(it.mask)
            elif it.source == "raabin":
                m = raabin_mask(it, cache_dir / "raabin_masks")
            else:
                continue
            self.by_source.setdefault(it.source, []).append((img, m, median_cell_diameter(m)))
        present = [s for s in self.weights if self.by_source.get(s)]
        if not present:
            raise ValueError("no segmentation training images in the given items")
        w = np.array([self.weights[s] for s in present])
        self.sources, self.p = present, w / w.sum()
        log.info("seg sampler: %s", {s: len(v) for s, v in self.by_source.items()})

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        src = self.sources[int(rng.choice(len(self.sources), p=self.p))]
        img, m, d = self.by_source[src][int(rng.integers(len(self.by_source[src])))]
        img, m = geometric(img, m, rng)
        if rng.random() < self.native_p:
            # Exactly what the device sees: the whole image letterboxed (single-cell pictures
            # then sit in background grey at their own magnification).
            pad = pp.background_rgb(img)
            img, _ = pp.letterbox(img, self.out_hw, pad=0)
            img[:] = np.where(
                pp.letterbox(np.ones_like(m), self.out_hw, pad=0)[0][..., None] > 0,
                img,
                pad.astype(np.uint8),
            )
            m, _ = pp.letterbox(m, self.out_hw, pad=0)
            img = self.color(img, rng) if self.augment else pp.white_balance(img)
            return pp.to_unit(img), (m > 0)[..., None].astype(np.float32)
        # Magnification: mostly around BCCD's (a leukocyte ~40 px across at 256x192), with a
        # wide log-uniform spread for other objectives and cameras.
        target = float(np.exp(rng.uniform(np.log(22), np.log(150))))
        if rng.random() < 0.4:
            target = float(rng.uniform(32, 60))
        img, m = scaled_view(img, m, self.out_hw, target, d, rng)
        img = self.color(img, rng) if self.augment else pp.white_balance(img)
        return pp.to_unit(img), m[..., None].astype(np.float32)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*(self.sample() for _ in range(n)), strict=True)
        return np.stack(xs), np.stack(ys)


def seg_eval_pairs(items: list[Item], cache_dir: Path) -> list[tuple[Item, np.ndarray, np.ndarray]]:
    """(item, raw RGB, mask) for evaluation; Raabin masks are pseudo-masks, so it is left out."""
    out = []
    for it in items:
        if it.mask is None:
            continue
        out.append((it, read_rgb(it.image), read_mask(it.mask)))
    return out


#: Sources with drawn masks: what segmenters are verified and released on.
SEG_EVAL_SOURCES = ("zheng1", "zheng2", "bccd")


def seg_split(
    data_root: Path, split: str, cache: Path
) -> list[tuple[Item, np.ndarray, np.ndarray]]:
    """The evaluation pairs of one split (val, test) over SEG_EVAL_SOURCES."""
    items = load_items(data_root, SEG_EVAL_SOURCES)
    return seg_eval_pairs([i for i in items if i.split == split], cache)
