"""edge_wbc.pipeline.heads: linear heads on the classifier's embedding, and their files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_wbc.pipeline.heads import HEAD_SCHEMA, HeadError, LinearHead
from edge_wbc.pipeline.results import CLASSES, OTHER, UNIDENTIFIED

BASE = "ab" * 32
CLS6 = (*CLASSES, OTHER)


def _head(**kw: object) -> LinearHead:
    rng = np.random.default_rng(0)
    args: dict[str, object] = {
        "classes": CLS6,
        "weight": rng.normal(size=(5, 6)),
        "bias": rng.normal(size=6),
        "base_sha256": BASE,
        "temperature": 0.8,
        "confidence_threshold": 0.5,
        "other_threshold": 0.9,
        "info": {"cells": {"neutrophil": 3}},
    }
    return LinearHead(**(args | kw))  # type: ignore[arg-type]


def test_probs_are_the_calibrated_softmax_of_the_affine_map() -> None:
    h = _head()
    e = np.arange(5, dtype=np.float32) / 5
    z = (e.astype(np.float64) @ h.weight + h.bias) / 0.8
    want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(h.probs(e), want, rtol=1e-12)
    batch = np.stack([e, e[::-1]])
    np.testing.assert_allclose(h.probs(batch)[0], want, rtol=1e-12)
    assert h.probs(batch).shape == (2, 6)
    with pytest.raises(HeadError, match="4 features, the head reads 5"):
        h.probs(np.zeros(4))


def test_predict_applies_the_thresholds() -> None:
    w = np.zeros((2, 6))
    w[0, 0] = 10.0  # feature 0 -> neutrophil
    w[1, 5] = 2.0  # feature 1 -> other, weakly
    h = _head(weight=w, bias=np.zeros(6), temperature=1.0)
    p = h.predict(np.array([1.0, 0.0]))
    assert p.label == "neutrophil" and p.score > 0.99
    assert p.embedding is not None and p.embedding.dtype == np.float32
    assert h.predict(np.array([0.0, 0.0])).label == UNIDENTIFIED  # uniform: below 0.5
    # "other" at 0.6 clears the confidence threshold but not other_threshold: to review.
    q = h.predict(np.array([0.0, 1.5]))
    assert q.probs[OTHER] > 0.5 and q.label == UNIDENTIFIED


def test_save_load_roundtrip(tmp_path: Path) -> None:
    h = _head()
    jp = h.save(tmp_path / "head")
    assert jp == tmp_path / "head.json" and (tmp_path / "head.npz").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    doc = json.loads(jp.read_text())
    assert doc["schema"] == HEAD_SCHEMA and doc["base_sha256"] == BASE and doc["dim"] == 5
    g = LinearHead.load(jp, base_sha256=BASE)
    assert g.classes == h.classes and g.info == h.info
    assert (g.temperature, g.confidence_threshold, g.other_threshold) == (0.8, 0.5, 0.9)
    np.testing.assert_array_equal(g.weight, h.weight)
    np.testing.assert_array_equal(g.bias, h.bias)


def test_a_head_for_another_model_is_refused(tmp_path: Path) -> None:
    jp = _head().save(tmp_path / "head.json")
    with pytest.raises(HeadError, match="fitted on the classifier with sha256 ababab"):
        LinearHead.load(jp, base_sha256="cd" * 32)


def test_corrupt_heads_name_the_file(tmp_path: Path) -> None:
    jp = _head().save(tmp_path / "head.json")
    npz = tmp_path / "head.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(HeadError, match=r"head\.npz: sha256 does not match head\.json"):
        LinearHead.load(jp)
    npz.unlink()
    with pytest.raises(HeadError, match=r"weights head\.npz"):
        LinearHead.load(jp)
    npz.write_bytes(good)
    doc = json.loads(jp.read_text())
    for bad, msg in (
        ({**doc, "schema": "x"}, "schema 'x'"),
        ({k: v for k, v in doc.items() if k != "classes"}, "missing key 'classes'"),
        ({**doc, "dim": 4}, "says dim 4"),
        ({**doc, "classes": ["a", "b"]}, "do not fit 2 classes"),
        ({**doc, "temperature": -1}, "temperature must be > 0"),
        ({**doc, "confidence_threshold": 1.5}, r"confidence_threshold must lie in \[0, 1\]"),
    ):
        jp.write_text(json.dumps(bad))
        with pytest.raises(HeadError, match=msg) as ei:
            LinearHead.load(jp)
        assert "head.json" in str(ei.value)
    jp.write_text("{not json")
    with pytest.raises(HeadError, match="unreadable head"):
        LinearHead.load(jp)


def test_bad_heads_are_refused_when_built() -> None:
    with pytest.raises(HeadError, match="NaN"):
        _head(bias=np.array([np.nan, 0, 0, 0, 0, 0]))
    with pytest.raises(HeadError, match="distinct classes"):
        _head(classes=("a", "a", "b", "c", "d", "e"))
    with pytest.raises(HeadError, match="sha256 hex digest"):
        _head(base_sha256="abc")
