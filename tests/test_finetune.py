"""`edge-wbc-convert finetune`: a lab's DIR/<class>/ cells boxed by the device's analysis, split
train/val/test, mixed with the training sources' cells, the shipped classifier fine-tuned from its
weights; `release-classifier` then gives a manifest the device loads with a row for the lab. Bad
input exits 2 and writes no run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("tensorflow")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "fixtures" / "data"
SAMPLES = ROOT / "samples" / "fields"
MODELS = ROOT / "models"
pytestmark = pytest.mark.slow


def _lab(root: Path, per_class: dict[str, int]) -> Path:
    """DIR/<class>/ from the bundled BCCD sample fields with one leukocyte of that type."""
    with open(SAMPLES / "index.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["wbc_boxes"] == "1"]
    for cls, n in per_class.items():
        picked = [r["file"] for r in rows if r["kaggle_types"] == cls][:n]
        assert len(picked) == n, f"the samples have fewer than {n} {cls} fields"
        (root / cls).mkdir(parents=True)
        for name in picked:
            shutil.copy(SAMPLES / name, root / cls / name)
    return root


def _convert(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {"PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_wbc_convert.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_a_lab_fine_tune_releases_a_classifier_with_a_lab_row(tmp_path: Path) -> None:
    import numpy as np

    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.pipeline.imageio import read_image
    from edge_wbc.pipeline.manifest import load_manifest

    lab = _lab(tmp_path / "mylab", {"neutrophil": 8, "lymphocyte": 8})
    run = tmp_path / "run"
    out = _convert(
        "finetune", "--cells", str(lab), "--out", str(run), "--models", str(MODELS),
        "--data-root", str(DATA), "--steps", "2", "--batch", "4", "--eval-every", "2",
        "--threads", "1",
    cwd=tmp_path).stdout  # fmt: skip
    assert "lab-mylab" in out and "release-classifier --cls" in out
    cells = json.loads((run / "cells.json").read_text())
    mine = [c for c in cells if c["source"] == "lab-mylab"]
    assert len(mine) == 16  # every sample field has its leukocyte found
    assert {c["split"] for c in mine} == {"train", "val", "test"}
    assert {c["label"] for c in mine if c["split"] == "test"} == {"neutrophil", "lymphocyte"}
    assert {c["source"] for c in cells} >= {"bccd", "lab-mylab"}  # the training sources too
    # Each lab image is one cell, in one split; its box lies inside the image.
    assert len({c["image"] for c in mine}) == 16
    assert all(0 <= c["box"][0] < c["box"][2] <= 640 for c in mine)
    info = json.loads((run / "finetune.json").read_text())
    assert info["labs"]["lab-mylab"]["cells"]["neutrophil"]["train"] >= 4
    man0 = load_manifest(MODELS)
    assert info["start"]["classes"] == list(man0.classifier.classes)  # type: ignore[union-attr]
    cfg = json.loads((run / "config.json").read_text())
    size = man0.classifier.input_shape[1]  # type: ignore[union-attr]
    assert cfg["steps"] == 2 and cfg["input_hw"] == [size, size]
    assert (run / "best.keras").is_file()

    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    _convert("release-classifier", "--cls", str(run), "--models", str(models),
             "--rep-samples", "4", "--data-root", str(DATA), cwd=tmp_path)  # fmt: skip
    man = load_manifest(models)
    ce = man.classifier
    assert ce is not None and ce.classes == man0.classifier.classes  # type: ignore[union-attr]
    test = ce.raw["metrics"]["test"]
    assert test["lab-mylab"]["n"] == sum(c["split"] == "test" for c in mine)
    assert "bccd" in test
    assert any("lab-mylab" in d["name"] for d in ce.raw["training_data"])
    card = (models / "README.md").read_text()
    assert "| lab-mylab |" in card and "the lab's own cells" in card
    analyzer = FieldAnalyzer(models, threads=1)
    res = analyzer.analyze(np.asarray(read_image(next(lab.glob("*/*.jpg")))), "field.jpg")
    assert res.error is None and res.cells

    # A second fine-tune starts from the float weights the release recorded (sha256-checked),
    # with the first run's cells as the training sources and another lab.
    lab2 = shutil.copytree(lab, tmp_path / "lab2")
    out2 = _convert(
        "finetune", "--cells", str(lab2), "--out", str(tmp_path / "run2"), "--models",
        str(models), "--base-cells", str(run / "cells.json"), "--steps", "1", "--batch", "4",
        "--eval-every", "1", "--threads", "1",
    cwd=tmp_path).stdout  # fmt: skip
    assert "start: float weights classifier.keras (sha256 as the manifest records)" in out2
    sources = {c["source"] for c in json.loads((tmp_path / "run2" / "cells.json").read_text())}
    assert sources >= {"lab-mylab", "lab-lab2", "bccd"}


def test_float_weights_that_do_not_match_the_manifest_are_refused(tmp_path: Path) -> None:
    from edge_wbc_convert.finetune import FinetuneError, check_start, shipped_start

    from edge_wbc.pipeline.manifest import sha256_file

    models = shutil.copytree(MODELS, tmp_path / "models")
    raw = json.loads((models / "manifest.json").read_text())
    entry = next(m for m in raw["models"] if m["task"] == "classification")
    keras = models / "classifier.keras"
    if entry.get("float_weights") is None:  # a models folder from before float weights
        shutil.copy(MODELS / "classifier.tflite", keras)  # any bytes: replaced below
        entry["float_weights"] = {"file": keras.name, "recovered_from_int8": True}
    entry["float_weights"]["sha256"] = sha256_file(keras)
    (models / "manifest.json").write_text(json.dumps(raw))
    assert shipped_start(models).keras == keras
    keras.write_bytes(b"not a keras file")
    with pytest.raises(FinetuneError, match="does not match the manifest's float_weights"):
        shipped_start(models)
    entry["float_weights"]["sha256"] = sha256_file(keras)
    (models / "manifest.json").write_text(json.dumps(raw))
    start = shipped_start(models)
    assert start.keras == keras
    with pytest.raises(FinetuneError, match=r"not the weights of a mnv2 \d+x\d+ classifier"):
        check_start(start)
    keras.unlink()  # the manifest names float weights the folder lacks (a wheel's): the int8
    start = shipped_start(models)
    assert start.keras is None and "recovered from the int8" in start.note


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ({"neutrophil": 6, "blast_cell": 0}, "blast_cell: unknown class name 'blast_cell'"),
        ({"neutrophil": 0, "lymphocyte": 0}, "no cell found in any image (no images)"),
        ({"neutrophil": 6}, "at least two classes with >= 5 cells"),
    ],
)
def test_bad_lab_input_exits_2_and_writes_no_run(
    tmp_path: Path, classes: dict[str, int], message: str
) -> None:
    from edge_wbc_convert.cli import app

    lab = _lab(tmp_path / "lab", classes)
    run = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        ["finetune", "--cells", str(lab), "--out", str(run), "--models", str(MODELS),
         "--data-root", str(DATA), "--steps", "2"],
    )  # fmt: skip
    assert r.exit_code == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert not run.exists() and not list(tmp_path.glob(".run*"))


def test_a_ten_output_classifier_is_fine_tuned_with_partial_labels(tmp_path: Path) -> None:
    """From a ten-output release (band/segmented split): ten outputs again, and a lab's
    five-part `neutrophil` folder is a partial label (band or segmented)."""
    from edge_wbc.pipeline.manifest import load_manifest
    from edge_wbc.taxonomy import MODEL_CLASSES

    models = shutil.copytree(MODELS, tmp_path / "models")
    common = ["--data-root", str(DATA), "--threads", "1"]
    if load_manifest(models).classifier.classes != MODEL_CLASSES:  # type: ignore[union-attr]
        run0 = tmp_path / "run0"
        int8, seg = str(models / "classifier.tflite"), str(models / "seg_rescnn.tflite")
        _convert("train-cls", "--run-dir", str(run0), "--segmenter", seg, "--size", "96",
                 "--alpha", "0.75", "--steps", "1", "--batch", "4", "--eval-every", "1",
                 "--fine", "--init-int8", int8, *common, cwd=tmp_path)  # fmt: skip
        _convert("release-classifier", "--cls", str(run0), "--models", str(models),
                 "--rep-samples", "4", "--data-root", str(DATA), cwd=tmp_path)  # fmt: skip
    assert load_manifest(models).classifier.classes == MODEL_CLASSES  # type: ignore[union-attr]
    lab = _lab(tmp_path / "tenlab", {"neutrophil": 6, "lymphocyte": 6})
    run = tmp_path / "run"
    out = _convert("finetune", "--cells", str(lab), "--out", str(run), "--models", str(models),
                   "--steps", "1", "--batch", "4", "--eval-every", "1", *common,
                   cwd=tmp_path).stdout  # fmt: skip
    assert "start: float weights classifier.keras" in out and "10 outputs" in out
    assert json.loads((run / "config.json").read_text())["fine"] is True
    labels = {c["label"] for c in json.loads((run / "cells.json").read_text())
              if c["source"] == "lab-tenlab"}  # fmt: skip
    assert labels == {"neutrophil", "lymphocyte"}
    # The same command with more steps resumes the run: its cells and split as they were.
    before = (run / "cells.json").read_bytes()
    out = _convert("finetune", "--cells", str(lab), "--out", str(run), "--models", str(models),
                   "--steps", "2", "--batch", "4", "--eval-every", "1", *common,
                   cwd=tmp_path).stdout  # fmt: skip
    assert f"resuming {run}" in out
    assert json.loads((run / "state.json").read_text())["step"] == 2
    assert (run / "cells.json").read_bytes() == before


def test_an_existing_out_is_resumed_only_when_it_is_the_same_fine_tune(tmp_path: Path) -> None:
    from edge_wbc_convert.cli import app

    lab = _lab(tmp_path / "lab", {"neutrophil": 5, "lymphocyte": 5})
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    args = ["finetune", "--cells", str(lab), "--out", str(run), "--models", str(MODELS)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "is not a fine-tune run: never overwritten" in r.stderr
    other = {"lab-x": {"folder": str(tmp_path / "x"), "cells": {}, "skipped": 0}}
    (run / "finetune.json").write_text(json.dumps({"labs": other, "start": {}}))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and f"is a fine-tune of ['{tmp_path / 'x'}']" in r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["finetune.json", "notes.txt"]


def test_two_labs_of_one_name_are_refused_as_one_line_before_any_analysis(
        tmp_path: Path) -> None:
    # Two sites that both export to a folder called "export": a FinetuneError traceback after
    # the first lab's analysis.
    from edge_wbc_convert.cli import app

    a = _lab(tmp_path / "siteA" / "export", {"neutrophil": 5, "lymphocyte": 5})
    b = _lab(tmp_path / "siteB" / "export", {"neutrophil": 5, "lymphocyte": 5})
    r = CliRunner().invoke(app, ["finetune", "--cells", str(a), "--cells", str(b), "--out",
                                 str(tmp_path / "run"), "--models", str(MODELS)])
    assert r.exit_code == 2 and "two labs named lab-export; rename one folder" in r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (tmp_path / "run").exists()
