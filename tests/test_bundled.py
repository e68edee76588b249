"""The installed package carries its models and sample fields; the models folder is resolved by
one rule: --models, models.dir, $EDGE_WBC_MODELS, the installed folder, then the packaged one."""

from __future__ import annotations

import json
from pathlib import Path

from edge_wbc.bundled import (
    MODELS_ENV,
    locate_models,
    packaged_models,
    packaged_samples,
)
from edge_wbc.camera import parse_source
from edge_wbc.pipeline.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_models_are_the_shipped_ones() -> None:
    man = load_manifest(packaged_models(), verify=True)
    assert man.classifier is not None and len(man.segmenters) == 3
    shipped = json.loads((ROOT / "models" / "manifest.json").read_text())
    assert [m["sha256"] for m in shipped["models"]] == [e.sha256 for e in man.models]


def test_packaged_samples_hold_the_demo_fields() -> None:
    fields = sorted(packaged_samples().glob("*.jpg"))
    assert len(fields) == len(sorted((ROOT / "samples" / "fields").glob("*.jpg"))) > 100
    assert parse_source("samples") == ("folder", str(packaged_samples()))


def test_resolution_order(tmp_path: Path) -> None:
    installed = tmp_path / "opt" / "models"
    none: dict[str, str] = {}
    env = {MODELS_ENV: str(tmp_path / "env")}
    # Nothing set and nothing installed: the packaged models.
    assert locate_models("", None, none, installed).source == "packaged"
    # An installed folder counts only when it holds a manifest (a half-done update does not).
    installed.mkdir(parents=True)
    assert locate_models("", None, none, installed).source == "packaged"
    (installed / "manifest.json").write_text("{}")
    assert locate_models("", None, none, installed).path == installed
    assert locate_models("", None, env, installed).source == MODELS_ENV
    got = locate_models(str(tmp_path / "cfg"), None, env, installed)
    assert (got.path, got.source) == (tmp_path / "cfg", "models.dir")
    got = locate_models(str(tmp_path / "cfg"), tmp_path / "flag", env, installed)
    assert (got.path, got.source) == (tmp_path / "flag", "--models")
