"""From trained runs to a models/ folder: ensemble fit, evaluation, manifest and model card."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from edge_wbc_convert.architectures import describe_classifier, describe_unet
from edge_wbc_convert.data import seg_split
from edge_wbc_convert.evaluate import (
    by_source,
    ensemble_maps,
    figure,
    fit_ensemble,
    keras_prob_fn,
    tflite_prob_fn,
)
from edge_wbc_convert.recover import agreement, float_file, float_record, map_agreement
from edge_wbc_convert.sources import DATA_CARDS, training_card

from edge_wbc.pipeline import preprocess as pp
from edge_wbc.pipeline.manifest import label_binding, sha256_file, write_manifest

log = logging.getLogger(__name__)


#: Test cells (spread over the sources) the released float classifier is compared on with its
#: int8 file.
AGREEMENT_CELLS = 200


class ReleaseError(Exception):
    """The runs cannot become a models folder; the message says why."""


def tensor_quant(path: Path) -> dict[str, Any]:
    from edge_wbc.pipeline.inference import TFLiteModel

    m = TFLiteModel(path, threads=1)

    def spec(s: Any) -> dict[str, Any]:
        return {
            "shape": [int(v) for v in s.shape],
            "dtype": str(np.dtype(s.dtype)),
            "scale": float(s.scale),
            "zero_point": int(s.zero_point),
        }

    out = {"input": spec(m.input), "output": spec(m.outputs[0])}
    if len(m.outputs) > 1:
        out["embedding"] = spec(m.outputs[1])
    return out


def embedding_spec(q: dict[str, Any]) -> dict[str, Any]:
    """The manifest's description of a classifier's output 1 (edge_wbc.pipeline.manifest)."""
    return {"output_index": 1, **q["embedding"]} | {
        "type": "embedding",
        "meaning": "pooled features: the global average pool in front of the class head "
        "(int8 as emitted; the device dequantises and averages them over the views)",
    }


def seg_release(
    members: dict[str, tuple[Path, Path | None]],
    data_root: Path,
    out_dir: Path,
    cache: Path = Path("runs/cache"),
) -> dict[str, Any]:
    """members: name -> (int8 .tflite, float .keras or None). Fit weights/threshold on val,
    then report every model and the ensemble per source on test (int8 as shipped), with the
    float-vs-int8 delta per model."""
    from edge_wbc_convert.quantize import load_keras

    val = seg_split(data_root, "val", cache)
    test = seg_split(data_root, "test", cache)
    q = {k: tflite_prob_fn(v[0]) for k, v in members.items()}
    log.info("val maps (%d images)", len(val))
    val_maps = {k: [f(p[1]) for p in val] for k, f in q.items()}
    weights, thr, val_score = fit_ensemble(
        val_maps, [p[2] for p in val], [p[0].source for p in val]
    )
    log.info("ensemble weights %s threshold %.2f (val mean IoU %.4f)", weights, thr, val_score)
    log.info("test maps (%d images)", len(test))
    srcs, gts = [p[0].source for p in test], [p[2] for p in test]
    test_maps = {k: [f(p[1]) for p in test] for k, f in q.items()}
    report: dict[str, Any] = {
        "ensemble": {"weights": weights, "threshold": thr, "val_mean_iou": val_score},
        "test": {},
        "float_vs_int8": {},
        "val_int8": {},
    }
    for k in members:
        report["test"][k] = by_source(srcs, test_maps[k], gts, 0.5)
        report["val_int8"][k] = by_source(
            [p[0].source for p in val], val_maps[k], [p[2] for p in val], 0.5
        )
    ens = ensemble_maps(test_maps, weights)
    report["test"]["ensemble"] = by_source(srcs, ens, gts, thr)
    # Equal weights, to show what the fitted vote adds.
    eq = ensemble_maps(test_maps, {k: 1.0 for k in members})
    report["test"]["ensemble_equal_weights"] = by_source(srcs, eq, gts, 0.5)
    report["float_agreement"] = {}
    for k, (_, keras_path) in members.items():
        if keras_path is None or not Path(keras_path).exists():
            continue
        fk = keras_prob_fn(load_keras(keras_path))
        float_maps = [fk(p[1]) for p in test]
        fl = by_source(srcs, float_maps, gts, 0.5)
        report["float_agreement"][k] = map_agreement(srcs, float_maps, test_maps[k], thr)
        report["float_vs_int8"][k] = {
            s: {
                "float_iou": fl[s]["iou"],
                "int8_iou": report["test"][k][s]["iou"],
                "delta": report["test"][k][s]["iou"] - fl[s]["iou"],
            }
            for s in fl
        }
    # Figure 1: a multi-cell BCCD test field if there is one, else the first.
    idx = next((i for i, p in enumerate(test) if p[0].source == "bccd" and len(p[0].boxes) > 1), 0)
    rgb, gt = test[idx][1], test[idx][2]
    fig = figure(
        pp.white_balance(rgb),
        gt,
        {k: test_maps[k][idx] >= 0.5 for k in members},
        ens[idx] >= thr,
        out_dir / "figure1_ensemble.png",
    )
    report["figure"] = fig.name
    report["figure_source"] = str(test[idx][0].image.name)
    (out_dir / "seg_eval.json").write_text(json.dumps(report, indent=2))
    return report


def classifier_entry(
    models_dir: Path,
    cls_model: dict[str, Any],
    cls_eval: dict[str, Any] | None,
    conv: dict[str, str],
    now: str,
) -> dict[str, Any]:
    """The classifier's manifest entry (without its label_binding)."""
    f = models_dir / cls_model["file"]
    q = tensor_quant(f)
    return {
        "name": cls_model["name"],
        "file": cls_model["file"],
        "sha256": sha256_file(f),
        "size_bytes": f.stat().st_size,
        "task": "classification",
        "architecture": cls_model["arch"],
        "input": q["input"],
        "output": q["output"]
        | {"type": "probabilities", "meaning": "class probabilities (softmax)"},
        "color_order": pp.COLOR_ORDER,
        "preprocessing": {
            "version": pp.PREPROCESS_VERSION,
            "white_balance": "on the whole field, before cropping",
            "crop": "square, side = crop_scale x the cell box's longer side, centred; "
            "outside the field filled with background grey",
            "crop_scale": pp.CROP_SCALE,
            "scale": "x / 255",
        },
        **({"embedding": embedding_spec(q)} if "embedding" in q else {}),
        "classes": list(cls_model["classes"]),
        # The device averages the model over this many dihedral views of each crop
        # (edge_wbc.pipeline.classify.crop_views); the calibration below was fitted on them.
        "views": int(cls_model.get("views", 1)),
        "calibration": {
            "method": "temperature scaling of log-probabilities on val",
            "temperature": cls_model["temperature"],
            "confidence_threshold": cls_model["confidence_threshold"],
            "other_threshold": cls_model.get("other_threshold"),
            **(
                {"group_thresholds": cls_model["group_thresholds"]}
                if cls_model.get("group_thresholds")
                else {}
            ),
        },
        "metrics": cls_eval or {},
        "training_data": [
            training_card(s, cls_model.get("labs", {}))
            for s in cls_model.get("sources", ("pbc", "bccd", "zheng1", "zheng2"))
        ],
        "converter": conv,
        "date": now,
        **({"float_weights": cls_model["float_weights"]} if "float_weights" in cls_model else {}),
    }


def _float_classifier(
    models_dir: Path, keep: str, int8: Path, test_cells: list[Any], size: int
) -> dict[str, Any]:
    """The manifest's float_weights of a released classifier: its float model (``keep``,
    already in ``models_dir``) compared with its int8 file on test cells spread over the
    sources."""
    from edge_wbc_convert.cls_eval import crops
    from edge_wbc_convert.quantize import load_keras

    sample = test_cells[:: max(1, len(test_cells) // AGREEMENT_CELLS)]
    ag = agreement(load_keras(models_dir / keep), int8, crops(sample, size))
    return float_record(models_dir, keep, False, ag)


def build_manifest(
    models_dir: Path,
    seg_models: dict[str, dict[str, Any]],
    seg_eval: dict[str, Any],
    cls_model: dict[str, Any] | None,
    cls_eval: dict[str, Any] | None,
) -> Path:
    """seg_models: name -> {"file", "encoder", "run", "float_weights" (optional)}; cls_model:
    {"file", "arch", "classes", "temperature", "confidence_threshold", "run", "sources" (its
    training sources), "float_weights" (optional)}."""
    from edge_wbc_convert.quantize import converter_versions

    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    conv = converter_versions() | {"tool": "edge-wbc-convert 0.1.0"}
    pre_seg = {
        "version": pp.PREPROCESS_VERSION,
        "white_balance": f"background (median of brightest 20 %) -> {pp.BACKGROUND_LEVEL:.0f} grey",
        "resize": "letterbox, aspect kept, pad with background grey",
        "scale": "x / 255",
    }
    models = []
    for name, info in seg_models.items():
        f = models_dir / info["file"]
        q = tensor_quant(f)
        models.append(
            {
                "name": name,
                "file": info["file"],
                "sha256": sha256_file(f),
                "size_bytes": f.stat().st_size,
                "task": "segmentation",
                "architecture": describe_unet(info["encoder"]),
                "input": q["input"],
                "output": q["output"]
                | {"type": "probabilities", "meaning": "leukocyte probability (sigmoid)"},
                "color_order": pp.COLOR_ORDER,
                "preprocessing": pre_seg,
                "classes": ["leukocyte"],
                "ensemble_weight": seg_eval["ensemble"]["weights"][name],
                "threshold": seg_eval["ensemble"]["threshold"],
                "metrics": {
                    "test_int8": seg_eval["test"][name],
                    "float_vs_int8": seg_eval["float_vs_int8"].get(name),
                },
                "training_data": [
                    DATA_CARDS[s] | {"split": "train"}
                    for s in ("zheng1", "zheng2", "bccd", "raabin")
                ],
                "converter": conv,
                "date": now,
                **({"float_weights": info["float_weights"]} if "float_weights" in info else {}),
            }
        )
    if cls_model is not None:
        models.append(classifier_entry(models_dir, cls_model, cls_eval, conv, now))
    for m in models:
        # Ties each file to its class list and output meaning: an edit of either after this
        # point is refused by the device's loader.
        m["label_binding"] = label_binding(m)
    raw = {
        "created": now,
        "ensemble": {
            "method": "weighted average of probability maps (weights fitted on val)",
            "threshold": seg_eval["ensemble"]["threshold"],
            "metrics": {"test_int8": seg_eval["test"]["ensemble"]},
        },
        "models": models,
    }
    return write_manifest(models_dir, raw)


def source_file(tflite: Path) -> Path:
    """The sidecar naming the float weights an int8 file was quantized from."""
    return tflite.with_name(tflite.name + ".source.json")


def quantized(
    run: Path, f: Path, data_root: Path, *, requantize: bool = False, samples: int = 200
) -> None:
    """``f`` holds the int8 version of ``run``'s best.keras: an existing file is reused only
    when its sidecar records the sha256 of these very float weights (a file left by another
    run, or by a release that failed half-way, would pair old int8 weights with new float
    ones in the manifest); otherwise the run is quantized again."""
    from edge_wbc_convert.quantize import quantize_run

    sha = sha256_file(run / "best.keras")
    side = source_file(f)
    if not requantize and f.exists() and side.exists():
        try:
            same = json.loads(side.read_text()).get("float_sha256") == sha
        except (ValueError, AttributeError):
            same = False
        if same:
            log.info("%s: reused (quantized from the same best.keras %s…)", f.name, sha[:12])
            return
    if f.exists() and not requantize:
        log.info("%s: not from %s/best.keras; quantized again", f.name, run)
    # The sidecar goes first and comes back last: a quantization that dies half-way leaves
    # no record that would let the next release reuse a partial file.
    side.unlink(missing_ok=True)
    quantize_run(run, f, data_root, samples=samples, seed=123)
    side.write_text(json.dumps({"float_sha256": sha, "run": str(run)}) + "\n")


def make_release(
    seg_runs: dict[str, Path],
    cls: Path | None,
    out: Path,
    data_root: Path,
    *,
    requantize: bool = False,
    rep_samples: int = 200,
    cls_views: int = 4,
) -> Path:
    """Quantize, gate, compile for the Edge TPU (when possible), fit the ensemble on val,
    evaluate on test, calibrate the classifier, write manifest.json and the model card (its
    path is returned). Raises ReleaseError when a model fails the op gate."""
    from edge_wbc_convert.card import write_card
    from edge_wbc_convert.edgetpu import compile_model
    from edge_wbc_convert.gate import check

    out.mkdir(parents=True, exist_ok=True)
    members: dict[str, tuple[Path, Path | None]] = {}
    seg_info: dict[str, dict[str, Any]] = {}
    gates: dict[str, Any] = {}
    tpu: dict[str, Any] = {}
    for name, run in seg_runs.items():
        f = out / f"seg_{name}.tflite"
        quantized(run, f, data_root, requantize=requantize, samples=rep_samples)
        cfg = json.loads((run / "config.json").read_text())
        members[name] = (f, run / "best.keras")
        seg_info[name] = {"file": f.name, "encoder": cfg["arch"], "run": str(run)}
    cls_model = cls_eval = None
    if cls is not None:
        from edge_wbc_convert.cells import run_cells
        from edge_wbc_convert.finetune import lab_cards

        cfg = json.loads((cls / "config.json").read_text())
        f = out / "classifier.tflite"
        quantized(cls, f, data_root, requantize=requantize, samples=rep_samples)
        size = int(cfg["input_hw"][0])
        classes, cls_eval, train_cells = evaluate_run(cls, f, out, size, cls_views)
        (out / "cls_eval.json").write_text(json.dumps(cls_eval, indent=2))
        cls_model = {
            "name": "classifier",
            "file": f.name,
            "arch": describe_classifier(cfg["arch"], cfg.get("alpha"), size),
            "classes": list(classes),
            "run": str(cls),
            "temperature": cls_eval["calibration"]["temperature"],
            "confidence_threshold": cls_eval["calibration"]["confidence_threshold"],
            "other_threshold": cls_eval["calibration"].get("other_threshold"),
            "group_thresholds": cls_eval["calibration"].get("group_thresholds") or {},
            "views": cls_views,
            "sources": sorted({c.source for c in train_cells}),
            "labs": lab_cards(cls),
        }
    for f in sorted(out.glob("*.tflite")):
        if f.stem.endswith("_edgetpu"):
            continue
        r = check(f)
        gates[f.name] = {"ok": r.ok, "problems": r.problems, "ops": r.ops}
        tpu[f.name] = compile_model(f, out)
        if not r.ok:
            raise ReleaseError(f"op gate FAILED for {f.name}: {r.problems}")
    seg_eval = seg_release(members, data_root, out)
    seg_eval["gate"], seg_eval["edgetpu"] = gates, tpu
    # The float models ship next to their int8 files (not in the wheel): what a later
    # fine-tune or re-release starts from.
    for name, (f, keras_path) in members.items():
        if keras_path is None or not keras_path.exists():
            log.warning("%s: no float model %s; its float weights are not kept", name, keras_path)
            continue
        keep = float_file(f.name)
        shutil.copyfile(keras_path, out / keep)
        seg_info[name]["float_weights"] = float_record(
            out, keep, False, seg_eval["float_agreement"][name]
        )
    if cls is not None and cls_model is not None:
        from edge_wbc_convert.cells import run_cells

        f = out / cls_model["file"]
        keep = float_file(f.name)
        shutil.copyfile(cls / "best.keras", out / keep)
        cls_model["float_weights"] = _float_classifier(out, keep, f, run_cells(cls, "test"), size)
    (out / "seg_eval.json").write_text(json.dumps(seg_eval, indent=2))
    path = build_manifest(out, seg_info, seg_eval, cls_model, cls_eval)
    write_card(out, seg_eval, cls_eval, data_root)
    return path


def evaluate_run(
    cls: Path, tflite: Path, out: Path, size: int, views: int
) -> tuple[tuple[str, ...], dict[str, Any], list[Any]]:
    """A classifier run's int8 file calibrated and evaluated on the run's own val/test cells
    (figures into ``out``): its classes, the evaluation, and its (relabelled) training cells."""
    from edge_wbc_convert.cells import run_cells
    from edge_wbc_convert.cls_eval import evaluate_classifier

    from edge_wbc.pipeline.inference import TFLiteModel

    classes, allowed, relabel = run_classes(cls)
    cls_eval = evaluate_classifier(
        tflite,
        cls / "best.keras",
        relabel(run_cells(cls, "val")),
        relabel(run_cells(cls, "test")),
        size,
        out,
        views=views,
        classes=classes,
        allowed=allowed,
    )
    emb = TFLiteModel(tflite, threads=1).outputs[1:]
    if emb:
        cls_eval["embedding_dim"] = int(emb[0].shape[-1])
    train_cells = relabel(run_cells(cls, "train"))
    cls_eval["other_sources"] = sorted(
        {c.source for c in train_cells if c.label in ("other", "bccd_other")}
    )
    return classes, cls_eval, train_cells


def run_classes(run: Path) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]] | None, Any]:
    """A classifier run's outputs, what each label allows, and how its cells are relabelled:
    the five-part classifier's six, or the fine ten (``train-cls --fine``: config ``fine``,
    or a run made before that key, told by its model's output count)."""
    from edge_wbc_convert import fine as fine_mod
    from edge_wbc_convert.cells import LABELS6

    cfg = json.loads((run / "config.json").read_text())
    fine = cfg.get("fine")
    if fine is None:
        from edge_wbc_convert.quantize import load_keras

        fine = int(load_keras(run / "best.keras").output.shape[-1]) == len(fine_mod.FINE)
    if fine:
        return fine_mod.FINE, fine_mod.ALLOWED, fine_mod.fine_cells
    return LABELS6, None, list


def release_classifier(
    cls: Path, models_dir: Path, data_root: Path, *, views: int = 4, rep_samples: int = 200
) -> Path:
    """Replace the classifier of a released models folder by a training run's, keeping the
    segmenters as released: quantize (with the embedding output), gate, calibrate and evaluate
    on the run's val/test cells, then swap the file, its manifest entry and the card's
    classifier section in. A head fitted on the old classifier's embedding (and its evaluation)
    is removed: it reads features the new model does not make. Nothing in ``models_dir``
    changes until everything has passed; the replaced files are kept beside it, in
    ``<models_dir>.previous/`` (outside the folder the wheel ships)."""
    import shutil
    import tempfile

    from edge_wbc_convert.card import write_card
    from edge_wbc_convert.cells import run_cells
    from edge_wbc_convert.finetune import lab_cards
    from edge_wbc_convert.gate import check
    from edge_wbc_convert.quantize import converter_versions, quantize_run

    raw = json.loads((models_dir / "manifest.json").read_text())
    idx = [i for i, m in enumerate(raw["models"]) if m.get("task") == "classification"]
    if len(idx) != 1:
        raise ReleaseError(f"{models_dir}/manifest.json: expected one classifier, found {len(idx)}")
    # Everything the swap needs is read before it: a folder without a readable seg_eval.json
    # (the card's segmentation section) is refused here, not after the manifest has moved.
    seg_path = models_dir / "seg_eval.json"
    try:
        seg_eval = json.loads(seg_path.read_text())
    except (OSError, ValueError) as e:
        raise ReleaseError(
            f"{seg_path}: not readable ({e}); release-classifier needs the folder's "
            "segmentation evaluation — run `release` for the whole folder instead"
        ) from e
    if not isinstance(seg_eval, dict):
        raise ReleaseError(f"{seg_path}: not a JSON object")
    cfg = json.loads((cls / "config.json").read_text())
    size = int(cfg["input_hw"][0])
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".release-") as tmpd:
        tmp = Path(tmpd)
        f = tmp / "classifier.tflite"
        quantize_run(cls, f, data_root, samples=rep_samples, seed=123)
        source_file(f).write_text(
            json.dumps({"float_sha256": sha256_file(cls / "best.keras"), "run": str(cls)}) + "\n"
        )
        gate = check(f)
        if not gate.ok:
            raise ReleaseError(f"op gate FAILED for {f.name}: {gate.problems}")
        classes, cls_eval, train_cells = evaluate_run(cls, f, tmp, size, views)
        cls_eval["run"] = str(cls)
        if cfg.get("refit_of"):
            # refit-head's run: the trunk is refit_of's, the class layer fitted on embeddings
            # (the card says so; the manifest entry carries it in its metrics).
            cls_eval["class_layer_refit"] = cfg["refit_of"]
        labs = lab_cards(cls)
        if labs:
            cls_eval["labs"] = labs
        (tmp / "cls_eval.json").write_text(json.dumps(cls_eval, indent=2))
        keep = float_file(f.name)
        shutil.copy2(cls / "best.keras", tmp / keep)
        cal = cls_eval["calibration"]
        cls_model = {
            "name": "classifier",
            "file": f.name,
            "arch": describe_classifier(cfg["arch"], cfg.get("alpha"), size),
            "classes": list(classes),
            "run": str(cls),
            "temperature": cal["temperature"],
            "confidence_threshold": cal["confidence_threshold"],
            "other_threshold": cal.get("other_threshold"),
            "group_thresholds": cal.get("group_thresholds") or {},
            "views": views,
            "sources": sorted({c.source for c in train_cells}),
            "labs": labs,
            "float_weights": _float_classifier(tmp, keep, f, run_cells(cls, "test"), size),
        }
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        conv = converter_versions() | {"tool": "edge-wbc-convert 0.1.0"}
        entry = classifier_entry(tmp, cls_model, cls_eval, conv, now)
        entry["label_binding"] = label_binding(entry)
        raw["models"][idx[0]] = entry
        raw["created"] = now
        # Everything passed: keep the old classifier, then move the new one in.
        prev = models_dir.with_name(models_dir.name + ".previous")
        prev.mkdir(exist_ok=True)
        for name in ("classifier.tflite", "classifier.keras", "cls_eval.json", "manifest.json",
                     "classifier_head.json", "classifier_head.npz", "fine_eval.json"):  # fmt: skip
            if (models_dir / name).exists():
                shutil.copy2(models_dir / name, prev / name)
        for name in ("classifier_head.json", "classifier_head.npz", "fine_eval.json"):
            (models_dir / name).unlink(missing_ok=True)
        for p in tmp.iterdir():
            if p.is_file():
                p.replace(models_dir / p.name)
        path = write_manifest(models_dir, raw)
    seg_eval.setdefault("gate", {})["classifier.tflite"] = {
        "ok": gate.ok,
        "problems": gate.problems,
        "ops": gate.ops,
    }
    (models_dir / "seg_eval.json").write_text(json.dumps(seg_eval, indent=2))
    write_card(models_dir, seg_eval, cls_eval, data_root)
    return path
