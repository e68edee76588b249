"""The anchor cells of lab adaptation: embeddings of the classifier's own PBC val cells, as the
device sees them (``embed-cells``' cache), written next to the classifier and named in its
manifest entry (``adaptation_anchors``). ``edge-wbc adapt`` keeps the shipped head's answers on
them while it fits a lab, so one lab's head does not drift on the cells the model was made for
(issue "The station learns its lab": the shipped sources lose <= 0.5 point)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from edge_wbc_convert.fine import _load, cached_for

from edge_wbc.pipeline.manifest import load_manifest, sha256_file, write_manifest

ANCHORS_FILE = "classifier_anchors.npz"


class AnchorsError(Exception):
    """The anchors cannot be made; the message says why."""


def write_anchors(
    models: Path, cache: Path, cells: int = 300, weight: float = 1.0, seed: int = 0
) -> dict[str, Any]:
    """Sample ``cells`` PBC val cells (stratified by label) from the embed-cells cache of this
    very classifier, write them as float16 ``embeddings`` and record them in the manifest.
    Val, not train: the adaptation's guard is measured on PBC test, and train cells are the
    ones the head fits best. Returns the manifest block."""
    man = load_manifest(models)
    ce = man.classifier
    if ce is None or ce.embedding_dim is None:
        raise AnchorsError(f"{models}: no classifier with an embedding")
    made_with = cached_for(cache / "pbc")
    if made_with != ce.sha256:
        raise AnchorsError(
            f"{cache / 'pbc'}: made with classifier {str(made_with)[:12]}…, the models folder "
            f"has {ce.sha256[:12]}…: run `edge-wbc-convert embed-cells --models {models} "
            f"--cache {cache}` first"
        )
    cs = _load(cache / "pbc")
    if cs is None:
        raise AnchorsError(f"{cache / 'pbc'}.npz/.json: missing or cut short")
    rows = np.flatnonzero(cs.rows("val"))
    if len(rows) == 0:
        raise AnchorsError(f"{cache / 'pbc'}: no PBC val cells with a cell found")
    labels = np.array([cs.label[i] for i in rows])
    rng = np.random.default_rng(seed)
    # stratified: each label's share of val, at least one cell each
    take: list[int] = []
    n = min(cells, len(rows))
    for lab in sorted(set(labels)):
        idx = rows[labels == lab]
        k = max(1, round(n * len(idx) / len(rows)))
        take += list(rng.choice(idx, min(k, len(idx)), replace=False))
    E = cs.emb[np.sort(take)].astype(np.float16)
    if E.shape[1] != ce.embedding_dim:
        raise AnchorsError(
            f"cache embeddings are {E.shape[1]}-d, the classifier's {ce.embedding_dim}"
        )
    buf = io.BytesIO()
    np.savez_compressed(buf, embeddings=E)
    out = models / ANCHORS_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out)
    block = {
        "file": ANCHORS_FILE,
        "sha256": sha256_file(out),
        "weight": float(weight),
        "cells": len(E),
        "source": f"PBC val as the device sees it, stratified by label, seed {seed}",
        "classifier_sha256": ce.sha256,
    }
    raw = json.loads((models / "manifest.json").read_text())
    for entry in raw["models"]:
        if entry.get("task") == "classification":
            entry["adaptation_anchors"] = block
    write_manifest(models, raw)
    load_manifest(models)  # what was written loads
    return block
