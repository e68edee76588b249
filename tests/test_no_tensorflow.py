"""The device package never imports TensorFlow or Keras (they are not installed on a Pi)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib, json, pkgutil, sys
import edge_wbc
names = sorted(m.name for m in pkgutil.walk_packages(edge_wbc.__path__, "edge_wbc."))
errors = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # reported, so a broken module cannot hide from this test
        errors[name] = f"{type(e).__name__}: {e}"
# Build the analysis pipeline too: an import inside a function would not show above.
from edge_wbc.pipeline.analysis import FieldAnalyzer
from edge_wbc.pipeline.imageio import read_image
a = FieldAnalyzer("tests/fixtures/models")
a.analyze(read_image("tests/fixtures/fields/BloodImage_00007.jpg"))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
print(json.dumps({"modules": names, "errors": errors, "heavy": heavy}))
"""


def test_no_edge_wbc_module_imports_tensorflow() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "edge_wbc.pipeline.analysis" in res["modules"]
    assert "edge_wbc.pipeline.inference.model" in res["modules"]
    assert res["errors"] == {}, res["errors"]
    assert res["heavy"] == [], f"TensorFlow/Keras imported: {res['heavy'][:5]}"
