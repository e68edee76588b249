"""``edge-wbc-convert finetune``: the shipped classifier fine-tuned on a lab's labelled cells.

A lab exports its cells as ``DIR/<class>/<image>`` (one leukocyte per image, the one nearest the
centre is the labelled one: ``edge-wbc adapt export``, CellaVision-like exports). Each image goes
through the device's own analysis (the released segmenters, the lab's cell diameter) and the
box of the region nearest the centre becomes a cell of source ``lab-<name>``; each lab's cells
are split train/val/test with near-identical images in one split. They join the training
sources' cells in a ``train-cls`` run that starts from the shipped classifier (its float
weights when the models folder has them, else the weights recovered from the int8 file) and
trains every convolution and the class layer; ``release-classifier`` then makes the int8 model
(gate, calibration, a card row per lab).

Everything that can be wrong with the input is checked before the run folder appears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edge_wbc_convert.cells import LAB_PREFIX, LABELS6, CellItem, is_lab_source, read_cells

from edge_wbc import taxonomy

log = logging.getLogger(__name__)

#: Share of each lab's cells per split (whole near-duplicate groups, stratified by class):
#: folds 0-2 of five train, 3 val, 4 test.
SPLIT_OF_FOLD = ("train", "train", "train", "val", "test")
#: Written into the run: what the lab cells are and where the weights started.
RUN_INFO = "finetune.json"


class FinetuneError(Exception):
    """Bad input for a fine-tune; the message names the file or folder. Nothing was written."""


@dataclass
class Start:
    """Where the fine-tune starts: the shipped classifier's float weights, or its int8 file."""

    classes: tuple[str, ...]
    fine: bool
    arch: str
    alpha: float
    size: int
    keras: Path | None
    int8: Path
    sha256: str  # of the file the weights come from
    note: str


@dataclass
class Lab:
    source: str
    folder: Path
    cells: list[CellItem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    too_few: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """class -> split -> cells."""
        out: dict[str, dict[str, int]] = {}
        for c in self.cells:
            row = out.setdefault(c.label, {"train": 0, "val": 0, "test": 0})
            row[c.split] += 1
        return dict(sorted(out.items()))


def lab_source(folder: Path) -> str:
    """``lab-<folder name>``: the source name a lab's cells carry (a card row, a metrics key,
    file names such as confusion_<source>.png, so only [A-Za-z0-9_.-])."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name).strip("_.") or "cells"
    return f"{LAB_PREFIX}{name}"


def shipped_start(models: Path) -> Start:
    """The shipped classifier of ``models`` as a starting point. Its float weights
    (``float_weights`` in the manifest, else ``classifier.keras``) are preferred; when the
    manifest records their sha256 the file must match it."""
    from edge_wbc.pipeline.manifest import ManifestError, load_manifest, sha256_file

    try:
        man = load_manifest(models)
    except ManifestError as e:
        raise FinetuneError(str(e)) from None
    ce = man.classifier
    if ce is None:
        raise FinetuneError(f"{models}/manifest.json: no classifier to fine-tune")
    classes = tuple(ce.classes)
    if classes == tuple(taxonomy.MODEL_CLASSES):
        fine = True
    elif classes == LABELS6:
        fine = False
    else:
        raise FinetuneError(
            f"{models}/manifest.json: classifier classes {list(classes)} are neither the six "
            f"{list(LABELS6)} nor the ten {list(taxonomy.MODEL_CLASSES)}"
        )
    from edge_wbc_convert.architectures import parse_architecture

    try:
        built = parse_architecture(str(ce.raw.get("architecture", "")), "classification")
    except ValueError as e:
        raise FinetuneError(f"{models}/manifest.json: {e}") from None
    arch, size, alpha = built["arch"], built["size"], built["alpha"]
    int8 = man.path(ce)
    fw = ce.raw.get("float_weights") or {}
    keras = models / str(fw.get("file") or "classifier.keras")
    if keras.is_file():
        sha = sha256_file(keras)
        if fw.get("sha256") and fw["sha256"] != sha:
            raise FinetuneError(
                f"{keras}: sha256 {sha[:12]}… does not match the manifest's float_weights "
                f"({str(fw['sha256'])[:12]}…): not the shipped classifier's weights"
            )
        note = (
            f"float weights {keras.name} (sha256 as the manifest records)"
            if fw.get("sha256")
            else f"float weights {keras.name} (the manifest records no sha256 for them)"
        )
        return Start(classes, fine, arch, alpha, size, keras, int8, sha, note)
    note = f"weights recovered from the int8 {int8.name} (no float weights in {models})"
    return Start(classes, fine, arch, alpha, size, None, int8, ce.sha256, note)


def check_start(start: Start) -> None:
    """Load the start weights into the architecture once, as training will, so a file of
    another architecture or class count is a clear error before anything is written."""
    from edge_wbc_convert.architectures import build_classifier

    model = build_classifier(start.arch, start.size, len(start.classes), None, start.alpha)
    if start.keras is not None:
        from edge_wbc_convert.quantize import load_keras

        try:
            model.set_weights(load_keras(start.keras).get_weights())
        except Exception as e:  # unreadable, or weights of another shape: one message
            raise FinetuneError(
                f"{start.keras}: not the weights of a {start.arch} {start.size}x{start.size} "
                f"classifier with {len(start.classes)} outputs ({e})"
            ) from None
        return
    from edge_wbc_convert.recover import load_into

    try:
        load_into(model, start.int8)
    except ValueError as e:
        raise FinetuneError(str(e)) from None


def label_rule(fine: bool) -> Callable[[str], str]:
    """A class folder's name -> the label its cells train with, for the shipped outputs; raises
    AdaptationError (what ``edge_wbc.cli.adapt.class_folders`` reports) for any other name.
    Ten outputs: the ten, or ``neutrophil`` (band or segmented, a partial label); six: the six,
    band or segmented as ``neutrophil``."""
    from edge_wbc_convert import fine as fine_mod

    from edge_wbc.pipeline.adaptation import AdaptationError

    if fine:
        names = {c: c for c in fine_mod.ALLOWED if c != "bccd_other"}
    else:
        names = {c: c for c in LABELS6}
        names |= {c: g for c, g in taxonomy.GROUP_OF.items() if g in LABELS6 and c != g}

    def rule(name: str) -> str:
        if name not in names:
            raise AdaptationError(
                f"unknown class name {name!r}; the classifier "
                f"({len(fine_mod.FINE) if fine else len(LABELS6)} outputs) learns {sorted(names)}"
            )
        return names[name]

    return rule


def box_labs(
    dirs: Sequence[Path],
    analyzer: Any,
    rule: Callable[[str], str],
    seed: int = 0,
) -> list[Lab]:
    """Every lab's cells boxed by the device's analysis and split train/val/test."""
    from edge_wbc_convert.fine import nearest_centre

    from edge_wbc.cli.adapt import class_folders
    from edge_wbc.pipeline.adaptation import MIN_CELLS_PER_CLASS, near_duplicate_groups
    from edge_wbc.pipeline.imageio import ImageError, list_images, read_field

    labs: list[Lab] = []
    for d in dirs:
        src = lab_source(d)
        if any(lab.source == src for lab in labs):
            other = next(lab.folder for lab in labs if lab.source == src)
            raise FinetuneError(f"{d} and {other}: two labs named {src}; rename one folder")
        lab = Lab(src, d.resolve())
        embs, keys = [], []
        for name, folder in class_folders([d], rule):  # exits 2 naming an unknown folder
            label = rule(name)
            for p in list_images([folder]):
                try:
                    f = read_field(p)
                    res = analyzer.analyze(f.rgb, str(p), scale=f.scale)
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                except (ImageError, OSError) as e:
                    lab.skipped.append(f"{p}: {e}")
                    continue
                # Any region the segmenters keep, whatever the shipped classifier calls it: a
                # lab cell it misreads as a non-leukocyte is what fine-tuning is for.
                cell = nearest_centre(res.cells, res.width, res.height)
                if cell is None:
                    lab.skipped.append(f"{p}: no leukocyte found")
                    continue
                # Boxes in the file's pixels: the trainer reads the file at full size.
                x0, y0, x1, y1 = (round(v / f.scale) for v in cell.bbox)
                lab.cells.append(CellItem(src, p.resolve(), "train", label, (x0, y0, x1, y1)))
                embs.append(cell.embedding)
                keys.append(digest)  # identical files are one cell, whatever the folder
        if lab.cells:
            # Near-identical cells (re-captures) by the shipped embedding when the classifier
            # emits one; identical files always.
            if all(e is not None for e in embs):
                groups = near_duplicate_groups(np.stack(embs), keys)
            else:
                _, groups = np.unique(np.asarray(keys), return_inverse=True)
            _split(lab, groups, seed, MIN_CELLS_PER_CLASS)
        labs.append(lab)
    return labs


def _split(lab: Lab, groups: np.ndarray, seed: int, min_cells: int) -> None:
    """Whole groups to five folds balanced per class; a class with fewer than ``min_cells``
    cells trains only (one or two held-out cells would measure nothing) and is named."""
    from edge_wbc.pipeline.adaptation import grouped_folds

    labels = [c.label for c in lab.cells]
    n = Counter(labels)
    lab.too_few = {c: k for c, k in sorted(n.items()) if k < min_cells}
    fold = grouped_folds(groups, labels, len(SPLIT_OF_FOLD), seed)
    small_groups = {int(g) for g, lb in zip(groups, labels, strict=True) if lb in lab.too_few}
    for i, c in enumerate(lab.cells):
        c.split = "train" if int(groups[i]) in small_groups else SPLIT_OF_FOLD[int(fold[i])]


def validate_labs(labs: Sequence[Lab], min_cells: int) -> None:
    for lab in labs:
        n = Counter(c.label for c in lab.cells)
        enough = [c for c, k in n.items() if k >= min_cells]
        if not lab.cells:
            raise FinetuneError(
                f"{lab.folder}: no cell found in any image"
                + (f" ({len(lab.skipped)} skipped)" if lab.skipped else " (no images)")
            )
        if len(enough) < 2:
            raise FinetuneError(
                f"{lab.folder}: at least two classes with >= {min_cells} cells are needed "
                f"(found {dict(sorted(n.items()))})"
            )
        for split in ("val", "test"):
            if not any(c.split == split for c in lab.cells):
                raise FinetuneError(
                    f"{lab.folder}: no {split} cells after grouping near-identical images "
                    f"({len(lab.cells)} cells): export more distinct cells"
                )


def base_cells_from(path: Path) -> list[CellItem]:
    try:
        cells = read_cells(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"{path}: not a run's cells.json ({e})") from None
    if not cells:
        raise FinetuneError(f"{path}: no cells")
    return cells


def write_run(
    out: Path,
    labs: Sequence[Lab],
    base: Callable[[Path], list[CellItem]],
    info: dict[str, Any],
) -> list[CellItem]:
    """The run folder with cells.json (base + labs) and finetune.json, made in a sibling folder
    and renamed into place, so a failure leaves no half run. ``base(run_dir)`` gives the training
    sources' cells (it may cache files in the folder)."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        cells = base(tmp)
        if not cells:
            raise FinetuneError("no cells of the training sources (check --data-root)")
        clash = sorted({c.source for c in cells} & {lab.source for lab in labs})
        if clash:
            raise FinetuneError(f"the training sources' cells already have {clash}")
        cells = [*cells, *(c for lab in labs for c in lab.cells)]
        rows = [asdict(c) | {"image": str(c.image), "box": list(c.box)} for c in cells]
        (tmp / "cells.json").write_text(json.dumps(rows))
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cells


def lab_info(labs: Sequence[Lab]) -> dict[str, Any]:
    return {
        lab.source: {
            "folder": str(lab.folder),
            "cells": lab.counts(),
            "skipped": len(lab.skipped),
            "train_only": lab.too_few,
        }
        for lab in labs
    }


def split_table(labs: dict[str, Any]) -> list[str]:
    """Per lab (``lab_info``'s form), cells per class and split."""
    lines = []
    for source, lab in labs.items():
        counts = lab["cells"]
        w = max(12, *(len(c) for c in counts))
        tot = {s: sum(r[s] for r in counts.values()) for s in ("train", "val", "test")}
        lines += [
            f"{source} ({lab['folder']}): {sum(tot.values())} cells, {lab['skipped']} skipped",
            f"  {'class':<{w}} {'train':>6} {'val':>5} {'test':>5}",
        ]
        for c, row in counts.items():
            lines.append(f"  {c:<{w}} {row['train']:>6} {row['val']:>5} {row['test']:>5}")
        lines.append(f"  {'all':<{w}} {tot['train']:>6} {tot['val']:>5} {tot['test']:>5}")
    return lines


def resume_info(out: Path, dirs: Sequence[Path], start: Start) -> dict[str, Any]:
    """An existing ``out``: continued only when it is a fine-tune of the same lab folders from
    the same start weights (its cells, split and settings as they were; ``--steps`` may extend
    it). Anything else there is never overwritten."""
    p = out / RUN_INFO
    if not p.is_file():
        raise FinetuneError(f"--out {out} exists and is not a fine-tune run: never overwritten")
    try:
        info = json.loads(p.read_text())
        have = sorted(v["folder"] for v in info["labs"].values())
        started = info["start"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FinetuneError(f"{p}: damaged ({e!r}); start a new run") from None
    want = sorted(str(d.resolve()) for d in dirs)
    if want != have:
        raise FinetuneError(f"--out {out} is a fine-tune of {have}, not of {want}")
    if started.get("sha256") != start.sha256:
        raise FinetuneError(
            f"--out {out} started from {started.get('weights')}; the models folder's classifier "
            "has changed since: start a new run"
        )
    return dict(info)


def lab_cards(run: Path) -> dict[str, dict[str, Any]]:
    """source -> what the model card and manifest say of a lab's cells (empty for a run that
    is not a fine-tune)."""
    p = run / RUN_INFO
    if not p.is_file():
        return {}
    labs = json.loads(p.read_text()).get("labs", {})
    return {s: v for s, v in labs.items() if is_lab_source(s)}


def segmenter_of(models: Path) -> Path:
    """The released segmenter that boxes the training sources' single-cell images (rescnn, as
    the shipped classifier's cells were boxed; else the first)."""
    from edge_wbc.pipeline.manifest import load_manifest

    man = load_manifest(models)
    segs = man.segmenters
    if not segs:
        raise FinetuneError(f"{models}/manifest.json: no segmenter to box the training cells")
    return man.path(next((s for s in segs if s.name == "rescnn"), segs[0]))
