"""edge_wbc_convert.refit: the class layer refitted on the device's embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from edge_wbc_convert import fine_fit as ff
from edge_wbc_convert import refit as rf
from edge_wbc_convert.fine import FINE

REPO = Path(__file__).resolve().parents[1]


def _split(n: int, rng: np.random.Generator, shift: float, src: str = "pbc") -> ff.Split:
    """Class k lights feature k (tiny values, as the int8 embedding's), plus a shift that moves
    every cell along feature 0: what a layer trained on other crops never saw."""
    labels = [FINE[i % len(FINE)] for i in range(n)]
    x = rng.normal(0.01, 0.002, (n, len(FINE)))
    x[np.arange(n), [FINE.index(c) for c in labels]] += 0.01
    x[:, 0] += shift
    return ff.Split(x, np.zeros((n, len(FINE))), ff.allowed_mask(labels), [src] * n, labels)


def test_a_layer_that_misreads_shifted_cells_is_refitted_and_folded_back() -> None:
    rng = np.random.default_rng(0)
    tr, va = _split(400, rng, 0.02), _split(200, rng, 0.02)
    # The "trained" layer: right on unshifted cells, so a shift along feature 0 reads as band.
    w0, b0 = np.eye(len(FINE)) * 500.0, -np.full(len(FINE), 5.0)
    cands = rf.fit_layer(tr, va, w0, b0, [1e-3, 1e-1])
    assert cands[0].lam is None and cands[0].val["pbc"] < 0.3
    best = max(cands, key=lambda c: c.score)
    assert best.lam is not None and best.val["pbc"] > 0.95
    # The fold back to raw embeddings gives the same logits the standardised fit had, so the
    # Dense layer it goes into reads the embedding as the device emits it.
    z = va.x @ best.w + best.b
    assert (z.argmax(1) == va.mask.argmax(1)).mean() == best.val["pbc"]


def test_val_top1_allows_either_neutrophil_and_skips_small_sources() -> None:
    labels = ["neutrophil"] * 30 + ["eosinophil"] * 5
    sp = ff.Split(np.zeros((35, 2)), np.zeros((35, 10)), ff.allowed_mask(labels),
                  ["bccd"] * 30 + ["zheng2"] * 5, labels)  # fmt: skip
    w = np.zeros((2, len(FINE)))
    b = np.zeros(len(FINE))
    b[FINE.index("segmented_neutrophil")] = 1.0
    assert rf.val_top1(sp.x, w, b, sp) == {"bccd": 1.0}


def _run(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    shutil.copy2(REPO / "models" / "classifier.keras", run / "best.keras")
    (run / "config.json").write_text(json.dumps({"input_hw": [128, 128], "fine": True}))
    (run / "cells.json").write_text("[]")
    return run


def test_inputs_must_be_the_released_classifier_and_its_cache(tmp_path: Path) -> None:
    run = _run(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(rf.RefitError, match=r"pbc.json: no cached cells: run embed-cells"):
        rf.check_inputs(run, REPO / "models", cache)
    for name in ("pbc", "boxes"):
        (cache / f"{name}.json").write_text(json.dumps({"classifier_sha256": "ab" * 32}))
    with pytest.raises(rf.RefitError, match=r"pbc.json: cached for classifier abababababab"):
        rf.check_inputs(run, REPO / "models", cache)
    (run / "best.keras").write_bytes(b"not the released weights")
    with pytest.raises(rf.RefitError, match=r"best.keras: not the float weights"):
        rf.check_inputs(run, REPO / "models", cache)
    (run / "cells.json").unlink()
    with pytest.raises(rf.RefitError, match=r"cells.json: missing"):
        rf.check_inputs(run, REPO / "models", cache)


def test_the_command_names_the_problem_and_writes_nothing(tmp_path: Path) -> None:
    from edge_wbc_convert.cli import app
    from typer.testing import CliRunner

    run = _run(tmp_path)
    out = tmp_path / "new"
    r = CliRunner().invoke(app, ["refit-head", "--run", str(run), "--models",
                                 str(REPO / "models"), "--cache", str(tmp_path / "none"),
                                 "--out", str(out)])  # fmt: skip
    assert r.exit_code == 2
    assert "no cached cells" in r.output
    assert not out.exists()


def test_features_that_barely_vary_get_no_outsized_weights() -> None:
    """Most int8 embedding features are (nearly) constant; a refit that standardised each
    feature gave them weights ~1000 (the trained layer's are <= 8), which the int8 Dense
    layer's scale cannot hold next to the rest."""
    rng = np.random.default_rng(1)
    k = len(FINE)

    def split(n: int) -> ff.Split:
        labels = [FINE[i % k] for i in range(n)]
        y = np.array([FINE.index(c) for c in labels])
        x = rng.normal(0.1, 0.1, (n, k))
        x[np.arange(n), y] += 0.5
        # Five near-constant features that carry a trace of the label.
        faint = 1e-4 * (y[:, None] == np.arange(5)[None]) + rng.normal(0, 1e-5, (n, 5))
        return ff.Split(np.hstack([x, faint]), np.zeros((n, k)), ff.allowed_mask(labels),
                        ["pbc"] * n, labels)  # fmt: skip

    tr, va = split(400), split(200)
    w0 = np.vstack([np.eye(k) * 2.0, np.zeros((5, k))])
    b0 = np.zeros(k)
    for c in rf.fit_layer(tr, va, w0, b0, [1e-3, 1e-1])[1:]:
        assert np.abs(c.w).max() < 20 * np.abs(w0).max()
        assert c.val["pbc"] > 0.9


def test_the_card_says_when_the_class_layer_was_refitted() -> None:
    from edge_wbc_convert.card import cls_section

    ev = json.loads((REPO / "models" / "cls_eval.json").read_text())
    ev["class_layer_refit"] = {"run": "r", "sha256": "ab" * 32, "weighting": "natural", "lam": 1.0}
    text = "\n".join(cls_section(ev))
    assert "refitted on the device's own embeddings" in text
    assert "cells weighted natural, pull 1 toward" in text and "abababababab…" in text
    del ev["class_layer_refit"]
    assert "refitted" not in "\n".join(cls_section(ev))
