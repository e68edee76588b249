"""Property-based tests of the manifest loader: any JSON a manifest could be edited into loads
as a manifest whose every value is in range, or raises ManifestError naming where; never a
TypeError, KeyError or a model that would run with a NaN weight or an unknown class."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_wbc.pipeline.manifest import (
    CLASSIFIER_CLASSES,
    VIEW_COUNTS,
    ManifestError,
    label_binding,
    load_manifest,
)

FIXTURE_MODELS = Path(__file__).parent / "fixtures" / "models"
BASE = json.loads((FIXTURE_MODELS / "manifest.json").read_text())
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["int8", "float32", "probabilities", "logits", "neutrophil", "other", "../x"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            if k not in ("metrics", "training_data", "converter"):  # prose, not read
                out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


PATHS = [p for p in _paths(BASE) if p]


def _edit(raw: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    node = raw
    for k in path[:-1]:
        node = node[k]
    if delete and isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


def _check_loaded(models: Path) -> None:
    try:
        man = load_manifest(models, verify=False)
    except ManifestError as e:
        assert str(e).startswith(str(models / "manifest.json"))
        return
    assert 0 < man.seg_threshold <= 1
    assert man.segmenters and sum(m.ensemble_weight for m in man.segmenters) > 0
    for m in man.models:
        assert m.raw["label_binding"] == label_binding(m.raw)
        assert "/" not in m.file and m.file not in (".", "..")
        assert all(math.isfinite(v) for v in (m.ensemble_weight, m.temperature, m.crop_scale))
        assert 0 <= m.confidence_threshold <= 1 and m.views in VIEW_COUNTS
        if m.task == "classification":
            assert set(m.classes) <= set(CLASSIFIER_CLASSES)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(PATHS), json_values, st.booleans(), st.booleans()),
        min_size=1,
        max_size=4,
    )
)
def test_edited_manifests_load_in_range_or_fail_naming_the_key(
    tmp_path_factory: Any, edits: list[tuple[tuple[Any, ...], Any, bool, bool]]
) -> None:
    models = tmp_path_factory.mktemp("m")
    raw = copy.deepcopy(BASE)
    for path, value, delete, rebind in edits:
        try:
            _edit(raw, path, value, delete)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced the path's parent
        raw = json.loads(json.dumps(raw))  # as the file will hold it (keys are strings)
        if rebind and len(path) > 1 and path[0] == "models" and isinstance(raw["models"], list):
            # As a release would have bound it: the loader's other checks must hold alone.
            entry = raw["models"][path[1]] if path[1] < len(raw["models"]) else None
            if isinstance(entry, dict):
                with contextlib.suppress(ValueError):  # NaN in a bound key: no release has one
                    entry["label_binding"] = label_binding(entry)
    (models / "manifest.json").write_text(json.dumps(raw))
    _check_loaded(models)


@FUZZ
@given(json_values)
def test_any_json_document(tmp_path_factory: Any, doc: Any) -> None:
    models = tmp_path_factory.mktemp("m")
    (models / "manifest.json").write_text(json.dumps(doc))
    _check_loaded(models)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes(tmp_path_factory: Any, data: bytes) -> None:
    models = tmp_path_factory.mktemp("m")
    (models / "manifest.json").write_bytes(data)
    _check_loaded(models)


def test_the_fixture_itself_loads(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE_MODELS, tmp_path / "m")
    assert load_manifest(tmp_path / "m").classifier is not None


def test_nan_in_a_bound_key_is_a_manifest_error(tmp_path: Path) -> None:
    # Found by the property above: json.dumps(allow_nan=False) raised ValueError in the loader.
    shutil.copytree(FIXTURE_MODELS, tmp_path / "m")
    raw = copy.deepcopy(BASE)
    raw["models"][2]["output"] = {"type": "probabilities", "scale": float("nan")}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"models\[2\]: NaN or Infinity in"):
        load_manifest(tmp_path / "m")
