"""The offline tool end to end on a tiny model: train -> quantize -> verify -> release
(gate, ensemble fit, classifier calibration, manifest, card), then the device loads the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

from edge_wbc_convert.casts import CLASSIFIER_CASTS

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "fixtures" / "data"
pytestmark = pytest.mark.slow


def convert(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # This checkout first, then whatever the caller had (a worktree's path to its convert/).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {"PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_wbc_convert.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("convert")
    seg = work / "runs" / "seg"
    cls = work / "runs" / "cls"
    models = work / "models"
    common = ["--data-root", str(DATA)]
    tiny = ["--encoder", "rescnn", "--run-dir", str(seg), "--batch", "2", "--eval-every", "2",
            "--height", "48", "--width", "64", "--sources", "bccd", *common]  # fmt: skip
    convert("train-seg", *tiny, "--steps", "4", cwd=work)
    metrics = (seg / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("step,loss") and len(metrics) == 3  # one row per eval
    # Resume: a second call with more steps continues from step 4, not from scratch.
    convert("train-seg", *tiny, "--steps", "6", cwd=work)
    assert json.loads((seg / "state.json").read_text())["step"] == 6
    assert len((seg / "metrics.csv").read_text().splitlines()) == 4
    tfl = work / "seg.tflite"
    convert(
        "quantize", "--run-dir", str(seg), "--out", str(tfl), "--samples", "4", *common, cwd=work
    )
    out = convert(
        "verify",
        "--keras",
        str(seg / "best.keras"),
        "--tflite",
        str(tfl),
        "--split",
        "val",
        "--max-delta",
        "1.0",
        *common,
        cwd=work,
    ).stdout
    assert "float IoU" in out and "bccd" in out
    convert(
        "train-cls",
        "--run-dir",
        str(cls),
        "--segmenter",
        str(tfl),
        "--size",
        "48",
        "--steps",
        "4",
        "--batch",
        "4",
        "--eval-every",
        "2",
        *common,
        cwd=work,
    )
    convert(
        "release",
        "--seg",
        f"a={seg}",
        "--seg",
        f"b={seg}",
        "--cls",
        str(cls),
        "--out",
        str(models),
        "--rep-samples",
        "4",
        *common,
        cwd=work,
    )
    return models


def test_release_writes_a_manifest_the_device_accepts(released: Path) -> None:
    from edge_wbc.pipeline.manifest import load_manifest

    man = load_manifest(released)
    assert [m.name for m in man.segmenters] == ["a", "b"]
    assert man.classifier is not None
    assert man.classifier.input_shape == (1, 48, 48, 3)
    assert 0.0 <= man.classifier.confidence_threshold <= 1.0
    # An 'other' call must be at least as sure as any call to leave the count.
    assert man.classifier.other_threshold is not None
    assert man.classifier.confidence_threshold <= man.classifier.other_threshold <= 1.0
    # Calibrated with the views the device averages (release's default), and the card says so.
    assert man.classifier.views == 4
    assert man.classifier.raw["metrics"]["calibration"]["views"] == 4
    raw = json.loads((released / "manifest.json").read_text())
    for m in raw["models"]:
        assert m["input"]["dtype"] == "int8" and m["input"]["shape"][0] == 1
        assert m["converter"]["tensorflow"] and m["training_data"]
    card = (released / "README.md").read_text()
    assert "Segmentation ensemble" in card and "Cell classifier" in card
    assert "classified in 4 orientations" in card
    casts = man.classifier.raw["metrics"]["casts_test"]
    assert casts and all(set(r) == {"clean", *CLASSIFIER_CASTS} for r in casts.values())
    assert "### Camera casts" in card and "yellow, strong" in card
    assert (released / "figure1_ensemble.png").stat().st_size > 1000


def test_released_models_pass_the_gate_and_run_on_the_device(released: Path) -> None:
    import numpy as np
    from edge_wbc_convert.gate import check

    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.pipeline.imageio import read_image

    for f in released.glob("*.tflite"):
        r = check(f)
        assert r.ok, r.problems
    analyzer = FieldAnalyzer(released, threads=1)
    rgb = read_image(DATA / "bccd" / "JPEGImages" / "BloodImage_00019.jpg")
    res = analyzer.analyze(np.asarray(rgb), "field.jpg")
    assert res.error is None and res.width == 640 and res.height == 480


def test_tampered_model_is_refused(released: Path, tmp_path: Path) -> None:
    import shutil

    from edge_wbc.pipeline.manifest import ManifestError, load_manifest

    copy = tmp_path / "models"
    shutil.copytree(released, copy)
    f = next(copy.glob("seg_*.tflite"))
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        load_manifest(copy)


def test_release_keeps_each_float_model_next_to_its_int8_file(released: Path) -> None:
    from edge_wbc.pipeline.manifest import load_manifest, sha256_file

    man = load_manifest(released)
    for m in man.models:
        fw = m.raw["float_weights"]
        assert fw["file"] == Path(m.file).stem + ".keras"
        assert sha256_file(released / fw["file"]) == fw["sha256"]
        assert fw["recovered_from_int8"] is False
        key = "mean_iou" if m.task == "segmentation" else "top1_agreement"
        assert 0.0 <= fw["agreement"][key] <= 1.0 and fw["agreement"]["n"] > 0


def test_float_weights_recovered_from_a_released_unet_match_the_trained_ones(
    released: Path, tmp_path: Path
) -> None:
    import shutil

    import numpy as np
    from edge_wbc_convert.data import load_items, seg_eval_pairs
    from edge_wbc_convert.evaluate import keras_prob_fn, tflite_prob_fn
    from edge_wbc_convert.quantize import load_keras
    from edge_wbc_convert.recover import cell_crops, recover_classifier, recover_unet

    trained = load_keras(released / "seg_a.keras")
    recovered = recover_unet(released / "seg_a.tflite", "rescnn", (48, 64))
    pairs = seg_eval_pairs(load_items(DATA, ("bccd",)), DATA)
    maps = {
        k: [f(rgb) for _, rgb, _ in pairs]
        for k, f in (
            ("trained", keras_prob_fn(trained)),
            ("recovered", keras_prob_fn(recovered)),
            ("int8", tflite_prob_fn(released / "seg_a.tflite")),
        )
    }

    def gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return float(np.mean([np.abs(x - y).mean() for x, y in zip(a, b, strict=True)]))

    # Only the weights' int8 rounding separates the recovered model from the trained one; the
    # int8 file rounds its activations too.
    assert gap(maps["trained"], maps["recovered"]) < 0.03
    assert gap(maps["trained"], maps["recovered"]) <= gap(maps["trained"], maps["int8"])
    # The classifier (its int8 file has the embedding as a second output) the same way.
    cls_trained = load_keras(released / "classifier.keras")
    cls = recover_classifier(released / "classifier.tflite", "mnv2", 48, 0.5, 6)
    crops = cell_crops(pairs, 48)
    d = [np.abs(np.asarray(cls_trained(c[None], training=False)) - cls(c[None], training=False))
         for c in crops]  # fmt: skip
    assert len(crops) >= 6 and float(np.mean(d)) < 0.03, float(np.mean(d))

    # recover-float on a copy of the release: every model gets its recovered float file.
    copy = tmp_path / "models"
    shutil.copytree(released, copy)
    for k in copy.glob("*.keras"):
        k.unlink()
    before = {f.name: f.read_bytes() for f in copy.glob("*.tflite")}
    out = convert(
        "recover-float", "--models", str(copy), "--data-root", str(DATA), "--split", "val",
        "--min-iou", "0", "--min-top1", "0", cwd=tmp_path,
    ).stdout  # fmt: skip
    assert "seg_a.keras" in out and "classifier.keras" in out
    raw = json.loads((copy / "manifest.json").read_text())
    assert all(m["float_weights"]["recovered_from_int8"] is True for m in raw["models"])
    assert {f.name: f.read_bytes() for f in copy.glob("*.tflite")} == before
    # A model that agrees too little is not written.
    (copy / "seg_a.keras").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "edge_wbc_convert.cli", "recover-float", "--models", str(copy),
         "--data-root", str(DATA), "--split", "val", "--min-iou", "1.01"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)},
    )  # fmt: skip
    assert proc.returncode == 1 and "nothing written" in proc.stderr
    assert not (copy / "seg_a.keras").exists()


def test_a_fine_classifier_from_the_recovered_weights_replaces_the_released_one(
    released: Path, tmp_path: Path
) -> None:
    """train-cls --fine from the int8 file's recovered weights, then release-classifier swaps
    it into a released folder: ten classes, segmenters untouched, the old files kept aside,
    the device analyses a field with it."""
    import shutil

    import numpy as np

    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.pipeline.imageio import read_image
    from edge_wbc.pipeline.manifest import load_manifest
    from edge_wbc.taxonomy import MODEL_CLASSES

    models = tmp_path / "models"
    shutil.copytree(released, models)
    before = json.loads((models / "manifest.json").read_text())
    seg_sha = {m["name"]: m["sha256"] for m in before["models"] if m["task"] == "segmentation"}
    run = tmp_path / "cls_fine"
    shutil.copytree(released.parent / "runs" / "cls", run)
    for stale in ("last.keras", "state.json", "metrics.csv", "best.keras", "final.keras"):
        (run / stale).unlink(missing_ok=True)
    common = ["--data-root", str(DATA)]
    convert("train-cls", "--run-dir", str(run), "--segmenter", "unused.tflite", "--size", "48",
            "--steps", "2", "--batch", "4", "--eval-every", "2", "--fine",
            "--init-int8", str(models / "classifier.tflite"), *common, cwd=tmp_path)  # fmt: skip
    assert json.loads((run / "config.json").read_text())["fine"] is True
    convert("release-classifier", "--cls", str(run), "--models", str(models),
            "--rep-samples", "4", *common, cwd=tmp_path)  # fmt: skip
    man = load_manifest(models)
    assert man.classifier is not None and man.classifier.classes == MODEL_CLASSES
    assert {s.name: s.sha256 for s in man.segmenters} == seg_sha
    raw = json.loads((models / "manifest.json").read_text())
    cls = next(m for m in raw["models"] if m["task"] == "classification")
    assert cls["float_weights"]["file"] == "classifier.keras"
    assert 0.0 <= cls["float_weights"]["agreement"]["top1_agreement"] <= 1.0
    assert (models / "classifier.keras").is_file()
    assert cls["embedding"]["shape"][1] > 0  # lab adaptation still reads the pooled features
    assert "Ten outputs" in (models / "README.md").read_text()
    kept = tmp_path / "models.previous"
    old = (released / "classifier.tflite").read_bytes()
    assert (kept / "classifier.tflite").read_bytes() == old
    analyzer = FieldAnalyzer(models, threads=1)
    rgb = read_image(DATA / "bccd" / "JPEGImages" / "BloodImage_00019.jpg")
    res = analyzer.analyze(np.asarray(rgb), "field.jpg")
    assert res.error is None
    assert all(c.label in (*MODEL_CLASSES, "unidentified") for c in res.cells)
