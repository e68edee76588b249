"""The offline tool's files on disk stay consistent when a run is reused, a release fails half-way
or a step meets a full disk (docs/hardening.md, ninth pass)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorflow")


def _fake_quantize(calls: list[Path]) -> Any:
    def quantize_run(run: Path, out: Path, data_root: Path, **_: Any) -> None:
        calls.append(run)
        out.write_bytes(b"int8 of " + (run / "best.keras").read_bytes())

    return quantize_run


def test_an_existing_tflite_is_reused_only_when_it_came_from_the_same_float_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge_wbc_convert.quantize as q
    from edge_wbc_convert.release import quantized

    calls: list[Path] = []
    monkeypatch.setattr(q, "quantize_run", _fake_quantize(calls))
    old, new = tmp_path / "old", tmp_path / "new"
    for run, text in ((old, b"old weights"), (new, b"new weights")):
        run.mkdir()
        (run / "best.keras").write_bytes(text)
    out = tmp_path / "models"
    out.mkdir()
    f = out / "seg_a.tflite"
    quantized(old, f, tmp_path)
    quantized(old, f, tmp_path)  # same weights: reused
    assert calls == [old]
    quantized(new, f, tmp_path)  # another run's weights into the same --out: quantized again
    assert calls == [old, new] and f.read_bytes() == b"int8 of new weights"
    # A file without its record (a release that died half-way, an older tool) is not trusted.
    (out / "seg_a.tflite.source.json").unlink()
    quantized(new, f, tmp_path)
    assert calls == [old, new, new]


def test_release_classifier_without_seg_eval_changes_nothing(tmp_path: Path) -> None:
    from edge_wbc_convert.release import ReleaseError, release_classifier

    models = tmp_path / "models"
    models.mkdir()
    manifest = {"models": [{"task": "classification", "file": "classifier.tflite"}]}
    (models / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    with pytest.raises(ReleaseError, match=r"seg_eval\.json"):
        release_classifier(tmp_path / "cls", models, tmp_path / "data")
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    assert not (tmp_path / "models.previous").exists()
