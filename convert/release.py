"""From trained runs to a models/ folder: ensemble fit, evaluation, manifest and model card."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from edge_wbc_convert.evaluate import (
    by_source,
    ensemble_maps,
    figure,
    fit_ensemble,
    keras_prob_fn,
    tflite_prob_fn,
)

from edge_wbc.pipeline import preprocess as pp
from edge_wbc.pipeline.manifest import label_binding, sha256_file, write_manifest

log = logging.getLogger(__name__)

DATA_CARDS = {
    "zheng1": {
        "name": "Zheng et al. 2018, dataset 1 (Jiangxi Tecom, rapid stain)",
        "licence": "GPL-3.0",
        "url": "github.com/zxaoyou/segmentation_WBC",
    },
    "zheng2": {
        "name": "Zheng et al. 2018, dataset 2 (CellaVision)",
        "licence": "GPL-3.0",
        "url": "github.com/zxaoyou/segmentation_WBC",
    },
    "bccd": {
        "name": "BCCD fields with Banik et al. 2020 WBC masks",
        "licence": "MIT",
        "url": "github.com/Shenggan/BCCD_Dataset",
    },
    "raabin": {
        "name": "Raabin-WBC part of TXL-PBC (boxes; GrabCut pseudo-masks)",
        "licence": "MIT",
        "url": "github.com/lugan113/TXL-PBC_Dataset",
    },
    "pbc": {
        "name": "PBC (Acevedo et al. 2020), CellaVision DM96, WBCAtt split",
        "licence": "CC BY 4.0",
        "url": "data.mendeley.com/datasets/snkd93bnjr/1",
    },
}

#: What a source gives the classifier where it differs from what it gives the segmenters.
CLS_DATA_NOTES: dict[str, dict[str, str]] = {
    "raabin": {
        "name": "Raabin-WBC part of TXL-PBC (boxes; GrabCut pseudo-masks for the segmenters; "
        "for the classifier, types from blinded reads in convert/reads/, cells whose type the "
        "image does not settle left out)"
    },
}


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
    from edge_wbc_convert.cli import _seg_split
    from edge_wbc_convert.quantize import load_keras

    val = _seg_split(data_root, "val", cache)
    test = _seg_split(data_root, "test", cache)
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
    for k, (_, keras_path) in members.items():
        if keras_path is None or not Path(keras_path).exists():
            continue
        fk = keras_prob_fn(load_keras(keras_path))
        fl = by_source(srcs, [fk(p[1]) for p in test], gts, 0.5)
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


def build_manifest(
    models_dir: Path,
    seg_models: dict[str, dict[str, Any]],
    seg_eval: dict[str, Any],
    cls_model: dict[str, Any] | None,
    cls_eval: dict[str, Any] | None,
) -> Path:
    """seg_models: name -> {"file", "encoder", "run"}; cls_model: {"file", "arch", "classes",
    "temperature", "confidence_threshold", "run", "sources" (its training sources)}."""
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
                "architecture": f"U-Net, {info['encoder']} encoder, bilinear decoder",
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
            }
        )
    if cls_model is not None:
        f = models_dir / cls_model["file"]
        q = tensor_quant(f)
        models.append(
            {
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
                },
                "metrics": cls_eval or {},
                "training_data": [
                    DATA_CARDS[s] | CLS_DATA_NOTES.get(s, {}) | {"split": "train"}
                    for s in cls_model.get("sources", ("pbc", "bccd", "zheng1", "zheng2"))
                ],
                "converter": conv,
                "date": now,
            }
        )
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
