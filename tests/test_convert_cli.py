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


def test_an_embedding_cache_is_only_reused_for_its_own_classifier(tmp_path: Path) -> None:
    """embed-cells' cache resumes a run of the same classifier and refuses another's (its
    embeddings and probabilities would silently stand for the new model's)."""
    import numpy as np
    import pytest
    from edge_wbc_convert.fine import _extract, cached_for

    jobs = [(f"img{i}.png", "pbc:lymphocyte", "test", None) for i in range(5)]

    def embed(job: tuple) -> tuple:
        return np.ones(4, np.float32), [0.5, 0.5, 0.0], [0, 0, 9, 9]

    cache = tmp_path / "pbc"
    cs = _extract(cache, jobs[:3], embed, 4, 3, "a" * 64, save_every=1)
    assert cached_for(cache) == "a" * 64 and cs.p6.shape == (3, 3)
    cs = _extract(cache, jobs, embed, 4, 3, "a" * 64, save_every=1)  # resumes: two more
    assert len(cs.label) == 5 and cs.emb.shape == (5, 4)
    with pytest.raises(ValueError, match=r"cached for classifier aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        _extract(cache, jobs, embed, 4, 3, "b" * 64)
    with pytest.raises(ValueError, match="3 outputs, this one has 10"):
        _extract(cache, jobs, embed, 4, 10, "a" * 64)
