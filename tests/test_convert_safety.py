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


DATA = Path(__file__).resolve().parent / "fixtures" / "data"
TINY: dict[str, Any] = {
    "steps": 2,
    "batch": 1,
    "eval_every": 2,
    "hw": (48, 64),
    "sources": ("bccd",),
}


def test_resuming_a_run_with_another_encoder_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    from edge_wbc_convert.train import RunDirError, TrainConfig, train_segmenter

    run = tmp_path / "seg"
    run.mkdir()
    stored = TrainConfig("segmentation", "mnv3s", str(run), str(DATA), input_hw=(48, 64))
    (run / "config.json").write_text(json.dumps(stored.__dict__, indent=2))
    (run / "best.keras").write_bytes(b"an mnv3s model")
    before = (run / "config.json").read_text()
    with pytest.raises(RunDirError, match="arch 'mnv3s' -> 'rescnn'"):
        train_segmenter("rescnn", run, DATA, **TINY)
    assert (run / "config.json").read_text() == before
    assert sorted(p.name for p in run.iterdir()) == ["best.keras", "config.json"]


def test_resuming_train_cls_through_another_segmenter_is_refused(tmp_path: Path) -> None:
    from edge_wbc_convert.train import RunDirError, train_classifier

    run = tmp_path / "cls"
    run.mkdir()
    seg = tmp_path / "other_seg.tflite"
    seg.write_bytes(b"another segmenter")
    stored = {"task": "classification", "arch": "mnv2", "run_dir": str(run),
              "data_root": str(DATA), "input_hw": [48, 48], "segmenter": str(tmp_path / "s.tflite"),
              "segmenter_sha256": "0" * 64}  # fmt: skip
    (run / "config.json").write_text(json.dumps(stored))
    (run / "cells.json").write_text("[]")
    with pytest.raises(RunDirError, match="segmenter_sha256"):
        train_classifier(run, seg, DATA, size=48, steps=2, batch=2, eval_every=2)
    assert sorted(p.name for p in run.iterdir()) == ["cells.json", "config.json"]


def test_a_second_training_on_a_run_dir_in_use_is_refused(tmp_path: Path) -> None:
    import fcntl
    import os

    from edge_wbc_convert.train import RunDirError, train_segmenter

    run = tmp_path / "seg"
    run.mkdir()
    # Another process's lock: flock on its own open file description.
    fd = os.open(run / "train.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        with pytest.raises(RunDirError, match="in use by another training \\(pid 4242\\)"):
            train_segmenter("rescnn", run, DATA, **TINY)
    finally:
        os.close(fd)
    assert not (run / "metrics.csv").exists()


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    from edge_wbc_convert.train import save_atomic

    best = tmp_path / "best.keras"
    best.write_bytes(b"the last good model")

    class FullDisk:
        def save(self, path: Path) -> None:
            Path(path).write_bytes(b"half a mo")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_atomic(FullDisk(), best)
    assert best.read_bytes() == b"the last good model"
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]


def test_register_head_outside_the_models_folder_leaves_the_manifest_alone(tmp_path: Path) -> None:
    from edge_wbc_convert.fine import register_head

    models = tmp_path / "models"
    models.mkdir()
    manifest = {"models": [{"task": "classification", "file": "classifier.tflite"}]}
    (models / "manifest.json").write_text(json.dumps(manifest))
    before = (models / "manifest.json").read_bytes()
    elsewhere = tmp_path / "heads"
    elsewhere.mkdir()
    (elsewhere / "head.json").write_text("{}")
    (elsewhere / "head.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="must be saved in that folder"):
        register_head(models, elsewhere / "head.json", "linear")
    assert (models / "manifest.json").read_bytes() == before


def test_cells_json_is_read_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge_wbc_convert.cells as cells_mod
    import edge_wbc_convert.evaluate as ev

    # No segmenter needed for what is tested: the paths stored, not the boxes.
    monkeypatch.setattr(ev, "tflite_prob_fn", lambda *a, **k: None)
    monkeypatch.setattr(cells_mod, "segmented_boxes", lambda *a, **k: {})
    work = tmp_path / "work"
    (work / "runs" / "cls").mkdir(parents=True)
    (work / "data").symlink_to(DATA)
    monkeypatch.chdir(work)
    made = cells_mod.prepare_cells(Path("runs/cls"), Path("data"), Path("seg.tflite"))
    assert made
    monkeypatch.chdir(tmp_path)  # release run from elsewhere
    read = cells_mod.run_cells(work / "runs" / "cls")
    assert len(read) == len(made) and all(c.image.is_file() for c in read)
    # A cells.json from before (paths relative to train-cls's directory) is still read.
    old = json.loads((work / "runs" / "cls" / "cells.json").read_text())
    for c in old:
        c["image"] = str(Path(c["image"]).relative_to(work.resolve()))
    (work / "runs" / "cls" / "cells.json").write_text(json.dumps(old))
    assert all(c.image.is_file() for c in cells_mod.run_cells(work / "runs" / "cls"))
