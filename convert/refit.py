"""Refitting the released classifier's class layer on the cells as the device sees them.

The classifier's last layer was trained on augmented crops cut from the training sources' own
masks and boxes; the device classifies crops it cut itself (its segmenter, its diameter, four
views averaged). A multinomial logistic regression on the device's own embeddings of the
training cells (``embed-cells``), pulled toward the trained layer by an L2 penalty chosen on
val, fits the layer to what the device actually feeds it ("last-layer retraining"). Only the
``logits`` Dense layer changes; the trunk, and so the embedding that lab adaptation reads, are
the same. The result is a training run folder that ``release-classifier`` quantizes, gates,
calibrates and evaluates like any other.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edge_wbc_convert import fine_fit as ff
from edge_wbc_convert.fine import FINE, cached_for

from edge_wbc.pipeline.manifest import sha256_file

log = logging.getLogger(__name__)

#: Sources whose val cells take part in choosing the pull (fewer val cells: too noisy to steer).
MIN_VAL_CELLS = 30


class RefitError(ValueError):
    pass


@dataclass
class Candidate:
    lam: float | None  # None: the trained layer as it is
    weighting: str | None
    w: np.ndarray
    b: np.ndarray
    val: dict[str, float]

    @property
    def score(self) -> float:
        return float(np.mean(list(self.val.values())))


def val_top1(x: np.ndarray, w: np.ndarray, b: np.ndarray, sp: ff.Split) -> dict[str, float]:
    """Top-1 per source on val, right when the arg-max is a class the cell's label allows
    (PBC: its ten classes; a five-part source: band or segmented for its neutrophils)."""
    top = (x @ w + b).argmax(1)
    right = sp.mask[np.arange(len(top)), top]
    src = np.array(sp.source)
    out = {}
    for s in sorted(set(sp.source)):
        m = src == s
        if m.sum() >= MIN_VAL_CELLS:
            out[s] = float(right[m].mean())
    return out


def fit_layer(
    tr: ff.Split,
    va: ff.Split,
    w0: np.ndarray,
    b0: np.ndarray,
    lams: list[float],
    max_iter: int = 400,
) -> list[Candidate]:
    """The trained layer (w0, b0) and one refit per weighting and pull, each with its val top-1
    per source."""
    # Fitted on centred embeddings divided by one scale, their RMS spread (values ~0.01: L-BFGS
    # converges badly on them, and the pull's strength would mean nothing); folded back after.
    # One scale, not one per feature: most features barely vary on int8 (787 of 1280 are
    # constant), and dividing by their tiny spreads made weights of ~1000 against the trained
    # layer's <= 8, which the int8 Dense layer's per-channel scale cannot hold next to the rest.
    mu = tr.x.mean(0)
    scale = float(np.sqrt(tr.x.var(0).mean())) + 1e-12
    xs = (tr.x - mu) / scale
    ws0, bs0 = w0 * scale, b0 + mu @ w0
    cands = [Candidate(None, None, w0, b0, val_top1(va.x, w0, b0, va))]
    for name, weights in weightings(tr).items():
        for lam in lams:
            ws, bs = ff.fit_flat(xs, tr.mask, weights, ws0, bs0, lam, max_iter)
            w = ws / scale
            b = bs - mu @ w
            cands.append(Candidate(lam, name, w, b, val_top1(va.x, w, b, va)))
            log.info("%s, lam %g: val %s", name, lam, cands[-1].val)
    return cands


def weightings(tr: ff.Split) -> dict[str, np.ndarray]:
    """Two ways to weight the train cells, each source in its sampler weight: ``balanced``
    splits it evenly over the source's classes (the priors the trained layer learnt),
    ``natural`` over its cells (the priors of the sources' own smears)."""
    src = np.array(tr.source)
    natural = np.array([ff.SOURCE_WEIGHT[s] / (src == s).sum() for s in tr.source])
    return {
        "balanced": ff.balanced_weights(tr.source, tr.label),
        "natural": natural * len(natural) / natural.sum(),
    }


def check_inputs(run: Path, models: Path, cache: Path) -> str:
    """The run's float weights must be the released classifier's, and the cache made with it;
    returns their sha256."""
    from edge_wbc.pipeline.manifest import load_manifest

    best = run / "best.keras"
    for p in (best, run / "config.json", run / "cells.json"):
        if not p.exists():
            raise RefitError(f"{p}: missing (a train-cls run folder has best.keras, config.json, "
                             "cells.json)")  # fmt: skip
    ce = load_manifest(models).classifier
    fw = (ce.raw.get("float_weights") or {}) if ce is not None else {}
    if ce is None or not ce.embedding_dim or not fw.get("sha256"):
        raise RefitError(f"{models}: no classifier with an embedding output and float weights")
    if sha256_file(best) != fw["sha256"]:
        raise RefitError(f"{best}: not the float weights of {models}'s classifier (sha256 differs)")
    for name in ("pbc", "boxes"):
        made = cached_for(cache / name)
        if made is None:
            raise RefitError(f"{cache / name}.json: no cached cells: run embed-cells first")
        if made != ce.sha256:
            raise RefitError(
                f"{cache / name}.json: cached for classifier {made[:12]}, {models}'s is "
                f"{ce.sha256[:12]}: run embed-cells with another --cache"
            )
    return str(fw["sha256"])


def refit(
    run: Path, models: Path, cache: Path, out: Path, lams: list[float], max_iter: int = 400
) -> dict[str, Any]:
    """Fit the class layer for each pull in ``lams`` and keep the best on val (mean over
    sources of val top-1, sources with at least MIN_VAL_CELLS val cells); write ``out`` as a
    train-cls run with that layer, plus ``refit.json``. The trained layer itself is a candidate:
    when no fit beats it on val, nothing is written."""
    from edge_wbc_convert.quantize import load_keras

    trunk_sha = check_inputs(run, models, cache)
    if out.exists():
        raise RefitError(f"{out}: exists; give a new folder")
    model = load_keras(run / "best.keras")
    dense = model.get_layer("logits")
    w0, b0 = (np.asarray(a, np.float64) for a in dense.get_weights())
    if w0.shape[1] != len(FINE):
        raise RefitError(f"{run}: {w0.shape[1]} outputs, the refit knows the {len(FINE)} fine ones")
    sp = ff.load_splits(cache)
    tr, va = sp["train"], sp["val"]
    if tr.x.shape[1] != w0.shape[0]:
        raise RefitError(f"{cache}: embeddings of {tr.x.shape[1]} values, {run}'s layer reads "
                         f"{w0.shape[0]}")  # fmt: skip
    cands = fit_layer(tr, va, w0, b0, lams, max_iter)
    best = max(cands, key=lambda c: c.score)
    report: dict[str, Any] = {
        "method": "multinomial logistic regression on the device's embeddings of the train "
        "cells (embed-cells), partial labels as allowed sets, sources weighted as the "
        "classifier's sampler (its classes balanced within each, or its cells), on centred "
        "embeddings over their RMS spread, with an L2 pull toward the trained layer; the pull "
        "chosen on the mean over sources of val top-1",
        "run": str(run),
        "cache": str(cache),
        "train_cells": dict(sorted(Counter(tr.source).items())),
        "candidates": [
            {
                "weighting": c.weighting,
                "lam": c.lam,
                "val_top1": c.val,
                "score": c.score,
                "max_abs_weight": float(np.abs(c.w).max()),
            }
            for c in cands
        ],
        "chosen": {"weighting": best.weighting, "lam": best.lam},
    }
    if best.lam is None:
        report["written"] = False
        return report
    out.mkdir(parents=True)
    try:
        dense.set_weights([best.w.astype(np.float32), best.b.astype(np.float32)])
        model.save(out / "best.keras")
        cfg = json.loads((run / "config.json").read_text())
        cfg["run_dir"] = str(out)
        cfg["refit_of"] = {"run": str(run), "sha256": trunk_sha,
                           "weighting": best.weighting, "lam": best.lam}  # fmt: skip
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copy2(run / "cells.json", out / "cells.json")
        report["written"] = True
        (out / "refit.json").write_text(json.dumps(report, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return report
