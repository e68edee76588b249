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


def _fake_cache(cache: Path, sha: str, dim: int, n: int = 40) -> None:
    import numpy as np
    from edge_wbc_convert.fine import CellSet, _save

    rng = np.random.default_rng(0)
    labels = ["lymphocyte", "eosinophil", "band_neutrophil", "erythroblast"] * (n // 4)
    cs = CellSet(
        rng.normal(size=(n, dim)).astype(np.float32), np.zeros((n, 10), np.float32), labels,
        ["val"] * (n - 4) + ["train"] * 4, [f"i{i}.jpg" for i in range(n)],
        [[0, 0, 9, 9]] * (n - 1) + [None],
    )  # fmt: skip
    _save(cache / "pbc", cs, sha)


def test_anchors_are_written_for_their_own_classifier_only(tmp_path: Path) -> None:
    """`anchors` samples PBC val cells of the embed-cells cache into the models folder and the
    manifest; a cache of another classifier is refused (exit 2) and nothing is written."""
    import numpy as np

    from edge_wbc.pipeline.adaptation import load_anchors
    from edge_wbc.pipeline.manifest import load_manifest

    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models, ignore=shutil.ignore_patterns("*.keras"))
    man = load_manifest(models)
    ce = man.classifier
    assert ce is not None and ce.embedding_dim is not None
    before = _tree(models)
    _fake_cache(tmp_path / "other", "b" * 64, ce.embedding_dim)
    r = CliRunner().invoke(app, ["anchors", "--models", str(models), "--cache",
                                 str(tmp_path / "other")])  # fmt: skip
    assert r.exit_code == 2 and "bbbbbbbbbbbb" in r.output and "embed-cells" in r.output
    assert _tree(models) == before

    _fake_cache(tmp_path / "own", ce.sha256, ce.embedding_dim)
    r = CliRunner().invoke(app, ["anchors", "--models", str(models), "--cache",
                                 str(tmp_path / "own"), "--cells", "20"])  # fmt: skip
    assert r.exit_code == 0, r.output
    ce2 = load_manifest(models).classifier
    assert ce2 is not None and ce2.anchors is not None and ce2.anchors.weight == 1.0
    E = load_anchors(models / ce2.anchors.file, ce2.anchors.sha256, ce.embedding_dim)
    # val cells with a cell found only (35 of 40), about 20 of them, each label kept
    assert 16 <= len(E) <= 24 and np.isfinite(E).all()
    # the classifier's own entry is otherwise untouched: the station loads it as before
    assert ce2.sha256 == ce.sha256 and ce2.classes == ce.classes


def test_the_console_entry_keeps_exit_status_and_output(tmp_path: Path) -> None:
    """`main` ends the process without the interpreter's teardown (TensorFlow's thread pools
    once aborted it there): the command's exit status and its last lines still come out."""
    import os
    import subprocess
    import sys

    env = os.environ | {"PYTHONPATH": str(ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "edge_wbc_convert.cli", *args]
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    ok = run("anchors", "--help")
    assert ok.returncode == 0 and "anchor cells" in ok.stdout
    bad = run("anchors", "--models", str(tmp_path / "nowhere"), "--cache", str(tmp_path))
    assert bad.returncode == 2 and "anchors: " in bad.stderr and "manifest.json" in bad.stderr
    usage = run("anchors", "--cells", "3")
    assert usage.returncode == 2 and "--cells" in usage.stderr
    # A file that is not what it should be is one line and exit 2 (1 is "a check failed"):
    # a .tflite that is no flatbuffer gave a struct.error traceback, exit 1.
    (tmp_path / "bad.tflite").write_bytes(b"not a model")
    junk = run("gate", str(tmp_path / "bad.tflite"))
    assert junk.returncode == 2 and "Traceback" not in junk.stderr, junk.stderr
    assert junk.stderr.startswith("error: ") and "EDGE_WBC_CONVERT_DEBUG=1" in junk.stderr
    missing = run("edgetpu", str(tmp_path / "nowhere.tflite"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
