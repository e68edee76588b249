"""The offline tool's usage errors that need no TensorFlow: said on stderr, exit 2, nothing
written into the models folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edge_wbc_convert.cli import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_release_classifier_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.keras").write_bytes(b"not read")
    models = tmp_path / "models"
    models.mkdir()
    (models / "classifier.tflite").write_bytes(b"kept")
    r = CliRunner().invoke(app, ["release-classifier", "--cls", str(run), "--models", str(models)])
    assert r.exit_code == 2
    assert "no manifest.json" in r.output and str(models) in r.output
    assert _tree(models) == {"classifier.tflite": b"kept"}
    assert not (tmp_path / "models.previous").exists()


def test_release_classifier_refuses_an_unfinished_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.keras").write_bytes(b"a run stopped before its first evaluation")
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models, ignore=shutil.ignore_patterns("*.keras"))
    before = _tree(models)
    r = CliRunner().invoke(app, ["release-classifier", "--cls", str(run), "--models", str(models)])
    assert r.exit_code == 2
    assert "no best.keras" in r.output and str(run) in r.output
    assert _tree(models) == before
    assert json.loads((models / "manifest.json").read_text()) == json.loads(
        (ROOT / "models" / "manifest.json").read_text()
    )
