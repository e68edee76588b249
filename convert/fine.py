"""The fine classes as a head on the shipped classifier's embedding.

The float weights of the shipped classifier are lost, so the trunk cannot be retrained with the
new outputs here; the fine classes are learnt as a softmax head on its pooled features
(edge_wbc.pipeline.heads.LinearHead), fitted on cells as the device sees them:

* PBC single-cell images go through the device's own analysis (FieldAnalyzer: white balance,
  segmenter ensemble, postprocessing, crop, four views) with the lab's cell diameter, and the
  cell nearest the image centre is the labelled one — the rule scripts/eval_formula.py uses on
  the test split. The fine type comes from PBC's file-name prefix.
* BCCD, Zheng and Raabin cells (five types only) and BCCD red cells / platelets are cropped
  from their reference boxes with the device's crop rule (edge_wbc_convert.cells), as the
  classifier's release evaluation does.

Embeddings (mean over the views) and the shipped head's calibrated probabilities are cached
per source under the cache folder; a run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from edge_wbc_convert.cells import CellItem

from edge_wbc import taxonomy

log = logging.getLogger(__name__)

#: The fine classifier's outputs, in the manifest's order.
FINE = taxonomy.MODEL_CLASSES
#: What a coarser label allows among FINE (partial labels: a five-part "neutrophil" is band or
#: segmented; a BCCD "other" box is a red cell or a platelet).
ALLOWED: dict[str, tuple[str, ...]] = {c: (c,) for c in FINE} | {
    "neutrophil": ("band_neutrophil", "segmented_neutrophil"),
    "bccd_other": ("platelet", "other"),
}
#: Five-part type of each label (absent: not one of the five).
FIVE_OF = {
    "neutrophil": "neutrophil",
    "band_neutrophil": "neutrophil",
    "segmented_neutrophil": "neutrophil",
    "eosinophil": "eosinophil",
    "basophil": "basophil",
    "lymphocyte": "lymphocyte",
    "monocyte": "monocyte",
}
#: PBC file-name prefix -> label (NEUTROPHIL: not split into band / segmented).
PBC_PREFIX = {
    "BNE": "band_neutrophil",
    "SNE": "segmented_neutrophil",
    "NEUTROPHIL": "neutrophil",
    "EO": "eosinophil",
    "BA": "basophil",
    "LY": "lymphocyte",
    "MO": "monocyte",
    "PMY": "immature_granulocyte",
    "MY": "immature_granulocyte",
    "MMY": "immature_granulocyte",
    "IG": "immature_granulocyte",
    "ERB": "erythroblast",
    "PLATELET": "platelet",
}
#: The lab's leukocyte diameter per single-cell source (scripts/eval_analyze.py DIAMETER).
PBC_DIAMETER_PX = 110.0


def pbc_label(name: str) -> str:
    prefix = Path(name).name.split("_", 1)[0].upper()
    if prefix not in PBC_PREFIX:
        raise ValueError(f"{name}: unknown PBC file-name prefix {prefix!r}")
    return PBC_PREFIX[prefix]


@dataclass
class CellSet:
    """Cached cells of one source: embedding (N, D) float32, the shipped head's calibrated
    probabilities (N, 6), and per cell: label, split, image, box (or None: no cell found)."""

    emb: np.ndarray
    p6: np.ndarray
    label: list[str]
    split: list[str]
    image: list[str]
    box: list[list[int] | None]

    def rows(self, split: str, found: bool = True) -> np.ndarray:
        return np.array(
            [
                s == split and (not found or b is not None)
                for s, b in zip(self.split, self.box, strict=True)
            ]
        )


def _load(cache: Path) -> CellSet | None:
    meta, arr = cache.with_suffix(".json"), cache.with_suffix(".npz")
    if not (meta.exists() and arr.exists()):
        return None
    m = json.loads(meta.read_text())
    with np.load(arr) as z:
        emb, p6 = z["emb"], z["p6"]
    if len(emb) != len(m["label"]):
        return None  # a save was interrupted between the two files: redo the tail
    return CellSet(emb, p6, m["label"], m["split"], m["image"], m["box"])


def cached_for(cache: Path) -> str | None:
    """The sha256 of the classifier a cache was made with (None: made before it was recorded)."""
    meta = cache.with_suffix(".json")
    return json.loads(meta.read_text()).get("classifier_sha256") if meta.exists() else None


def _save(cache: Path, cs: CellSet, sha: str = "") -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    arr, meta = cache.with_suffix(".npz"), cache.with_suffix(".json")
    tmp = arr.with_name(arr.name + ".tmp.npz")
    np.savez(tmp, emb=cs.emb, p6=cs.p6)
    tmp.replace(arr)
    doc = {
        "classifier_sha256": sha,
        "label": cs.label,
        "split": cs.split,
        "image": cs.image,
        "box": cs.box,
    }
    tmpm = meta.with_name(meta.name + ".tmp")
    tmpm.write_text(json.dumps(doc))
    tmpm.replace(meta)


def _extract(
    cache: Path,
    jobs: Sequence[tuple[str, str, str, list[int] | None]],
    embed: callable,  # type: ignore[valid-type]
    dim: int,
    n_out: int,
    sha: str,
    save_every: int = 400,
) -> CellSet:
    """jobs: (image, label, split, box or None); embed(job) -> (emb, probabilities, box) or
    None. ``p6`` holds the classifier's calibrated probabilities, ``n_out`` of them (six for
    the six-output classifier, whose name it kept)."""
    made_for = cached_for(cache)
    if made_for is not None and made_for != sha:
        raise ValueError(f"{cache}: cached for classifier {made_for[:12]}, the models folder's is "
                         f"{sha[:12]}: use another --cache")  # fmt: skip
    cs = _load(cache) or CellSet(
        np.zeros((0, dim), np.float32), np.zeros((0, n_out), np.float32), [], [], [], []
    )
    if cs.p6.shape[1] != n_out:
        raise ValueError(f"{cache}: cached for a classifier with {cs.p6.shape[1]} outputs, this "
                         f"one has {n_out}: use another --cache")  # fmt: skip
    done = len(cs.label)
    if done:
        log.info("%s: %d of %d cached", cache.name, done, len(jobs))
    embs, p6s = [cs.emb], [cs.p6]
    for k, job in enumerate(jobs[done:], start=done):
        img, lab, split, _ = job
        r = embed(job)
        if r is None:
            embs.append(np.zeros((1, dim), np.float32))
            p6s.append(np.zeros((1, n_out), np.float32))
            cs.box.append(None)
        else:
            e, p, b = r
            embs.append(e[None].astype(np.float32))
            p6s.append(np.asarray(p, np.float32)[None])
            cs.box.append([int(v) for v in b])
        cs.label.append(lab)
        cs.split.append(split)
        cs.image.append(img)
        if (k + 1) % save_every == 0 or k + 1 == len(jobs):
            cs.emb, cs.p6 = np.concatenate(embs), np.concatenate(p6s)
            embs, p6s = [cs.emb], [cs.p6]
            _save(cache, cs, sha)
            log.info("%s: %d / %d", cache.name, k + 1, len(jobs))
    cs.emb, cs.p6 = np.concatenate(embs), np.concatenate(p6s)
    return cs


def pbc_cells(data_root: Path, models: Path, cache_dir: Path, threads: int = 1) -> CellSet:
    """Every PBC image through the device's analysis; the cell nearest the centre."""
    import csv

    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.pipeline.imageio import read_image
    from edge_wbc.pipeline.postprocess import PostprocessParams

    with open(data_root / "pbc" / "index.csv") as f:
        rows = list(csv.DictReader(f))
    jobs = [
        (str(data_root / "pbc" / r["image"]), pbc_label(r["image"]), r["split"], None) for r in rows
    ]
    analyzer = FieldAnalyzer(
        models, threads=threads, postprocess=PostprocessParams(cell_diameter_px=PBC_DIAMETER_PX)
    )
    assert analyzer.classifier is not None and analyzer.classifier.embedding_dim
    classes = analyzer.classifier.classes

    def embed(job: tuple) -> tuple | None:
        res = analyzer.analyze(read_image(job[0]), job[0])
        cell = nearest_centre(res.cells, res.width, res.height)
        if cell is None or cell.embedding is None:
            return None
        return cell.embedding, [cell.probs[c] for c in classes], cell.bbox

    sha = analyzer.manifest.classifier.sha256  # type: ignore[union-attr]
    dim = analyzer.classifier.embedding_dim
    return _extract(cache_dir / "pbc", jobs, embed, dim, len(classes), sha)


def nearest_centre(cells: Iterable, width: int, height: int):
    """The cell whose box centre is nearest the image centre (scripts/eval_analyze.py's rule)."""
    cx, cy = width / 2, height / 2
    best, best_d = None, float("inf")
    for c in cells:
        x0, y0, x1, y1 = c.bbox
        d = ((x0 + x1) / 2 - cx) ** 2 + ((y0 + y1) / 2 - cy) ** 2
        if d < best_d:
            best, best_d = c, d
    return best


def box_cells(data_root: Path, models: Path, cache_dir: Path, threads: int = 1) -> CellSet:
    """BCCD (reference mask boxes), Zheng 1/2 (reference mask, central cell), Raabin (read
    boxes) and BCCD red cells / platelets ('bccd_other'), cropped by the device's rule."""
    from edge_wbc_convert.cells import (
        CellItem,
        bccd_cells,
        bccd_other_cells,
        central_box,
        raabin_cells,
    )
    from edge_wbc_convert.data import load_items, read_mask, read_rgb

    from edge_wbc.pipeline import preprocess as pp
    from edge_wbc.pipeline.classify import CellClassifier
    from edge_wbc.pipeline.inference import TFLiteModel
    from edge_wbc.pipeline.manifest import load_manifest

    items = load_items(data_root, ("bccd", "zheng1", "zheng2", "raabin"))
    cells = bccd_cells(items)
    cells += [
        CellItem(c.source, c.image, c.split, "bccd_other", c.box) for c in bccd_other_cells(items)
    ]
    cells += raabin_cells(items)
    jobs: list[tuple[str, str, str, list[int] | None]] = [
        (str(c.image), f"{c.source}:{c.label}", c.split, list(c.box)) for c in cells
    ]
    for it in items:
        if it.source.startswith("zheng") and it.label and it.mask is not None:
            b = central_box(read_mask(it.mask))
            jobs.append(
                (str(it.image), f"{it.source}:{it.label}", it.split, None if b is None else list(b))
            )
    man = load_manifest(models)
    ce = man.classifier
    assert ce is not None
    clf = CellClassifier(
        TFLiteModel(man.path(ce), threads=threads),
        ce.classes,
        ce.temperature,
        ce.confidence_threshold,
        "probabilities",
        ce.other_threshold,
        ce.views,
        ce.embedding_dim,
    )
    size = clf.input_size
    last: dict[str, np.ndarray] = {}

    def embed(job: tuple) -> tuple | None:
        img, _, _, box = job
        if box is None:
            return None
        if img not in last:
            last.clear()
            last[img] = pp.white_balance(read_rgb(Path(img)))
        p = clf.classify(pp.cell_crop(last[img], tuple(box), size))
        return p.embedding, [p.probs[c] for c in ce.classes], box

    dim = int(ce.embedding_dim or 0)
    return _extract(cache_dir / "boxes", jobs, embed, dim, len(ce.classes), ce.sha256)


def summary_lines(rep: dict) -> list[str]:
    """One line per split of a fitted head's report: what fit-head and fit-mixture print."""
    from edge_wbc_convert import fine_fit as ff

    out = []
    for split in ("val", "test"):
        r = rep[split]["pbc"]
        out.append(
            f"{split}: PBC macro-F1 {ff.macro_f1(r):.4f}, five-part on named "
            f"{r['five_part_accuracy_named']:.4f}, unidentified {r['unidentified_rate']:.4f}"
        )
    return out


def register_head(models: Path, head_json: Path, kind: str) -> None:
    """Name a fitted head in ``models/manifest.json`` (file, sha256, classes, kind) and load the
    manifest as the device will. The head's JSON holds its calibration and the sha256 of its
    weights; the numbers are in fine_eval.json and the card."""
    from edge_wbc.pipeline.manifest import load_manifest, sha256_file, write_manifest

    # Checked before the manifest is touched: the device reads a head by its bare file name
    # from the models folder, so a head saved elsewhere would make it refuse the folder.
    if head_json.resolve().parent != models.resolve():
        raise ValueError(
            f"{head_json}: a head registered in {models}/manifest.json must be saved in that "
            f"folder (--out {models}); the manifest is unchanged"
        )
    for p in (head_json, head_json.with_suffix(".npz")):
        if not p.is_file():
            raise ValueError(f"{p}: missing; the manifest is unchanged")
    before = (models / "manifest.json").read_bytes()
    raw = json.loads(before)
    for m in raw["models"]:
        if m.get("task") == "classification":
            m["head"] = {
                "file": head_json.name,
                "sha256": sha256_file(head_json),
                "classes": list(taxonomy.MODEL_CLASSES),
                "kind": kind,
                "weights": head_json.with_suffix(".npz").name,
                "evaluation": "fine_eval.json",
            }
    write_manifest(models, raw)
    try:
        load_manifest(models)  # what the device will check
    except Exception:
        # A manifest the device refuses is not left behind: the one it accepted comes back.
        (models / "manifest.json").write_bytes(before)
        raise


def fine_cells(cells: Sequence[CellItem]) -> list[CellItem]:
    """The classifier run's cells with the fine labels a ten-output classifier learns from:
    PBC's from its file-name prefixes, BCCD's red-cell/platelet boxes as ``bccd_other`` (a red
    cell or a platelet), every other source's five-part label as it is (``neutrophil`` is a
    partial label: band or segmented)."""
    out = []
    for c in cells:
        if c.source == "pbc":
            lab = pbc_label(c.image.name)
        elif c.source == "bccd" and c.label == taxonomy.OTHER:
            lab = "bccd_other"
        else:
            lab = c.label
        if lab not in ALLOWED:
            raise ValueError(f"{c.image}: label {lab!r} names none of {list(FINE)}")
        out.append(replace(c, label=lab))
    return out


#: How often each label is drawn in a fine run (1 if absent): a five-part ``neutrophil`` is drawn
#: less than band and segmented, which together already make neutrophils the commonest draw;
#: non-leukocytes less than leukocytes (as ``other`` always was).
FINE_DRAW: dict[str, float] = {
    "neutrophil": 0.5,
    "band_neutrophil": 0.9,
    "segmented_neutrophil": 0.9,
    "platelet": 0.3,
    "other": 0.3,
    "bccd_other": 0.3,
}
