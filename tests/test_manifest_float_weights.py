"""The manifest's float_weights (the float Keras model kept next to each int8 file): the device
checks how it is described, never needs the file (the wheel leaves it out), never loads it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from edge_wbc.pipeline.manifest import ManifestError, load_manifest, write_manifest

MODELS = Path(__file__).resolve().parent.parent / "models"
RAW = json.loads((MODELS / "manifest.json").read_text())


def _folder(tmp_path: Path, raw: dict[str, Any]) -> Path:
    """The shipped int8 files and ``raw`` as manifest, without any .keras file."""
    for m in raw["models"]:
        (tmp_path / m["file"]).symlink_to(MODELS / m["file"])
        head = m.get("head")
        if head:
            (tmp_path / head["file"]).symlink_to(MODELS / head["file"])
    write_manifest(tmp_path, raw)
    return tmp_path


def test_every_shipped_model_records_its_float_weights() -> None:
    for m in RAW["models"]:
        fw = m["float_weights"]
        assert fw["file"] == Path(m["file"]).stem + ".keras"
        assert (MODELS / fw["file"]).is_file()
        # The segmenters' were recovered from their int8 files; the ten-output classifier was
        # trained from its recovered weights and released with its own float model.
        assert fw["recovered_from_int8"] is (m["task"] == "segmentation")
        assert fw["agreement"]["n"] >= 100


def test_the_models_load_without_the_float_files(tmp_path: Path) -> None:
    man = load_manifest(_folder(tmp_path, copy.deepcopy(RAW)))
    assert not list(tmp_path.glob("*.keras"))
    assert {e.raw["float_weights"]["file"] for e in man.models} == {
        "seg_mnv2.keras", "seg_mnv3s.keras", "seg_rescnn.keras", "classifier.keras"
    }  # fmt: skip


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("file", "../classifier.keras", "not a file name in the models folder"),
        ("file", "seg_mnv2.tflite", "not a .keras file"),
        ("file", "seg_mnv2.h5", "not a .keras file"),
        ("sha256", "abc", "expected a sha256"),
        ("recovered_from_int8", "yes", "expected true or false"),
        ("agreement", [0.99], "expected an object"),
    ],
)
def test_a_bad_float_weights_entry_is_refused_naming_it(
    tmp_path: Path, key: str, value: Any, message: str
) -> None:
    raw = copy.deepcopy(RAW)
    raw["models"][0]["float_weights"][key] = value
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(_folder(tmp_path, raw))
    assert f"models[0].float_weights.{key}" in str(e.value)


@pytest.mark.parametrize("key", ["file", "sha256", "recovered_from_int8"])
def test_a_float_weights_entry_missing_a_key_is_refused(tmp_path: Path, key: str) -> None:
    raw = copy.deepcopy(RAW)
    del raw["models"][3]["float_weights"][key]
    with pytest.raises(ManifestError, match=f"models\\[3\\].float_weights: missing key '{key}'"):
        load_manifest(_folder(tmp_path, raw))


def test_float_weights_is_optional(tmp_path: Path) -> None:
    raw = copy.deepcopy(RAW)
    for m in raw["models"]:
        del m["float_weights"]
    assert len(load_manifest(_folder(tmp_path, raw)).models) == 4
