"""The classifier's adaptation anchors (manifest ``adaptation_anchors``): described in the
manifest and checked there; the file itself is read only by a lab fit, so a station runs
without it and a fit stops naming it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from edge_wbc.pipeline.manifest import ManifestError, load_manifest, write_manifest

MODELS = Path(__file__).resolve().parent.parent / "models"
RAW = json.loads((MODELS / "manifest.json").read_text())
CLS = next(i for i, m in enumerate(RAW["models"]) if m["task"] == "classification")
GOOD = {"file": "classifier_anchors.npz", "sha256": "0" * 64, "weight": 1.0, "cells": 300,
        "classifier_sha256": RAW["models"][CLS]["sha256"]}


def _folder(tmp_path: Path, raw: dict[str, Any]) -> Path:
    """The shipped int8 files and ``raw`` as manifest; no anchors file."""
    for m in raw["models"]:
        (tmp_path / m["file"]).symlink_to(MODELS / m["file"])
    write_manifest(tmp_path, raw)
    return tmp_path


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("file", "../anchors.npz", "not a file name in the models folder"),
        ("file", "anchors.json", "not an .npz file"),
        ("sha256", "abc", "expected a sha256"),
        ("weight", -1, "weight"),
        ("weight", "heavy", "weight"),
        ("classifier_sha256", None, "expected a sha256"),
    ],
)
def test_a_bad_anchors_entry_is_refused_naming_it(
    tmp_path: Path, key: str, value: Any, message: str
) -> None:
    raw = copy.deepcopy(RAW)
    raw["models"][CLS]["adaptation_anchors"] = GOOD | {key: value}
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(_folder(tmp_path, raw))
    assert f"models[{CLS}].adaptation_anchors" in str(e.value)


def test_anchors_need_an_embedding(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    raw["models"][0]["adaptation_anchors"] = GOOD  # a segmenter: no embedding
    with pytest.raises(ManifestError, match=r"models\[0\].adaptation_anchors.*embedding"):
        load_manifest(_folder(tmp_path, raw))


def test_a_missing_anchors_file_stops_a_fit_not_the_station(tmp_path: Path) -> None:
    from edge_wbc.pipeline import adaptation as A
    from edge_wbc.pipeline.analysis import FieldAnalyzer

    raw = copy.deepcopy(RAW)
    raw["models"][CLS]["adaptation_anchors"] = GOOD
    folder = _folder(tmp_path, raw)
    an = FieldAnalyzer(folder, threads=1)  # the station loads and analyses without it
    assert an.manifest.classifier is not None and an.manifest.classifier.anchors is not None
    with pytest.raises(A.AdaptationError, match=r"classifier_anchors.npz: cannot read"):
        A.shipped_base(an)


def test_anchors_of_another_classifier_stop_a_fit(tmp_path: Path) -> None:
    from edge_wbc.pipeline import adaptation as A
    from edge_wbc.pipeline.analysis import FieldAnalyzer

    raw = copy.deepcopy(RAW)
    raw["models"][CLS]["adaptation_anchors"] = GOOD | {"classifier_sha256": "b" * 64}
    an = FieldAnalyzer(_folder(tmp_path, raw), threads=1)
    with pytest.raises(A.AdaptationError, match=r"anchors of classifier bbbbbbbbbbbb.*anchors`"):
        A.shipped_base(an)
