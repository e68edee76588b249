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


# ----------------------------------------------------------------------------- mixture heads

FINE4 = ("band_neutrophil", "segmented_neutrophil", "immature_granulocyte", "other")
BASE2 = ("neutrophil", "other")
SPLITS = {"neutrophil": FINE4[:2], "other": FINE4[2:]}


def _mixture(**kw: object) -> LinearHead:
    w = np.zeros((2, 4))
    w[0, 0] = 2.0  # feature 0: band rather than segmented
    w[1, 2] = 3.0  # feature 1: immature granulocyte rather than other
    args: dict[str, object] = {
        "classes": FINE4,
        "weight": w,
        "bias": np.zeros(4),
        "base_sha256": BASE,
        "confidence_threshold": 0.9,
        "other_threshold": 0.95,
        "base_classes": BASE2,
        "splits": SPLITS,
        "group_thresholds": {"immature_granulocyte": 0.6},
    }
    return LinearHead(**(args | kw))  # type: ignore[arg-type]


def test_a_mixture_splits_the_classifiers_probabilities_and_keeps_their_sum() -> None:
    h = _mixture()
    e, base = np.array([1.0, 1.0]), np.array([0.7, 0.3])
    q = h.mixture_probs(e, base)
    f = h.probs(e)
    assert q.sum() == pytest.approx(1.0)
    assert q[0] + q[1] == pytest.approx(0.7)  # band + segmented = the classifier's neutrophil
    assert q[0] / q[1] == pytest.approx(f[0] / f[1])
    assert q[2] / q[3] == pytest.approx(f[2] / f[3])


def test_a_mixture_decides_on_the_group_with_the_classifiers_thresholds() -> None:
    h = _mixture()
    # Sure neutrophil, band and segmented nearly even: named (the group is sure), band.
    p = h.predict(np.array([0.2, 0.0]), np.array([0.97, 0.03]))
    assert p.label == "band_neutrophil" and p.score == pytest.approx(0.97)
    assert p.probs["band_neutrophil"] < 0.9  # a flat head would have sent it to review
    # The classifier unsure: unidentified whatever the split says.
    assert h.predict(np.array([5.0, 0.0]), np.array([0.8, 0.2])).label == UNIDENTIFIED
    # An immature granulocyte out of "other" is named at its own group's threshold ...
    ig = h.predict(np.array([0.0, 0.3]), np.array([0.05, 0.95]))
    assert ig.label == "immature_granulocyte" and 0.6 <= ig.score < 0.9
    # ... and "other" still needs other_threshold to leave the count.
    assert h.predict(np.array([0.0, -2.0]), np.array([0.06, 0.94])).label == UNIDENTIFIED
    assert h.predict(np.array([0.0, -9.0]), np.array([0.01, 0.99])).label == OTHER
    with pytest.raises(HeadError, match="pass base_probs"):
        h.predict(np.array([0.0, 0.0]))
    with pytest.raises(HeadError, match="3 base probabilities"):
        h.predict(np.array([0.0, 0.0]), np.array([0.5, 0.3, 0.2]))


def test_a_mixture_roundtrips_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    h = _mixture()
    jp = h.save(tmp_path / "mix.json")
    doc = json.loads(jp.read_text())
    assert doc["kind"] == "mixture" and doc["splits"]["other"] == list(FINE4[2:])
    g = LinearHead.load(jp, BASE)
    assert g.is_mixture and g.base_classes == BASE2 and g.group_thresholds == h.group_thresholds
    e, base = np.array([0.3, 0.4]), np.array([0.5, 0.5])
    np.testing.assert_allclose(g.mixture_probs(e, base), h.mixture_probs(e, base))
    with pytest.raises(HeadError, match="splits cover"):
        _mixture(splits={"neutrophil": FINE4[:2], "other": ("other",)})
    with pytest.raises(HeadError, match="splits name"):
        _mixture(base_classes=("neutrophil", "eosinophil", "other"))
    with pytest.raises(HeadError, match="group_thresholds"):
        _mixture(group_thresholds={"blastoid": 0.5})
    doc.pop("splits")
    jp.write_text(json.dumps(doc))
    with pytest.raises(HeadError, match="mixture head without a valid 'splits'"):
        LinearHead.load(jp)
    doc["kind"] = "cubic"
    jp.write_text(json.dumps(doc))
    with pytest.raises(HeadError, match="kind 'cubic'"):
        LinearHead.load(jp)
