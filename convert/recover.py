"""Float weights recovered from the shipped int8 models.

The float Keras weights of the 2026-11-28 models were lost with a machine. Each int8 file still
holds every weight (per-channel int8, BatchNorm folded into the convolutions by the converter),
so a float model can be rebuilt from it: every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED of
the graph is dequantised into the matching Keras layer of the same architecture (a
SeparableConv2D is a DEPTHWISE_CONV_2D followed by a 1x1 CONV_2D), and each BatchNormalization
is set to the identity plus the folded bias (gamma 1, mean 0, variance 1 - epsilon,
beta = bias). The rebuilt model reproduces the int8 file's outputs up to quantisation error
(measured by ``agreement`` and ``seg_agreement``) and, unlike the int8 file, can be trained
again, with those BatchNorm layers frozen (train.py ``_init_from_int8`` says why).

Ops are matched to layers by where they sit in the graph, not by their position in the list:
TFLite's execution order need not follow Keras' layer order once a graph has skips or
branches. Each weighted op is described by the nearest weighted ops upstream of it (through
adds, concatenations, resizes, activations...), and so is each Keras layer; walking the Keras
layers in order, a layer takes the one unmatched op of its kind whose upstream ops are the
ones its own upstream layers took, and whose kernel has its shape. The Keras layer name the
converter leaves in the tensor names must agree. Anything that does not fit exactly is an
error: a wrong float model would be worse than none.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
#: Stands for the graph's input among the upstream ops of an op or layer.
INPUT = -1
#: A bias this small (relative to the kernel) is the converter's zero bias of a layer without one.
_ZERO_BIAS = 1e-6


@dataclass(frozen=True)
class WeightedOp:
    """One weighted op of an int8 graph, dequantised."""

    position: int  # among the weighted ops, in execution order
    op: str
    kernel: np.ndarray  # float, as TFLite lays it out
    bias: np.ndarray
    upstream: frozenset[int]  # positions of the nearest weighted ops feeding it; INPUT
    names: tuple[str, ...]  # its tensors' names (kernel, bias, output)


def _interpreter(path: Path) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without the default delegate: XNNPACK would fuse the graph into DELEGATE nodes and hide
    # the ops (and their weights) this reads one by one.
    it = Interpreter(
        str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    it.allocate_tensors()
    return it


def _dequant(it: Any, index: int, details: dict[int, dict[str, Any]]) -> np.ndarray:
    t = details[index]
    q = t["quantization_parameters"]
    raw = it.get_tensor(index).astype(np.float64)
    scales, zps = np.asarray(q["scales"]), np.asarray(q["zero_points"])
    if scales.size == 0:
        return raw.astype(np.float32)
    shape = [1] * raw.ndim
    if scales.size > 1:
        shape[q["quantized_dimension"]] = -1
    return ((raw - zps.reshape(shape)) * scales.reshape(shape)).astype(np.float32)


def read_graph(path: Path) -> list[WeightedOp]:
    """Every weighted op of the int8 file at ``path``, in execution order, with the weighted
    ops upstream of it. Raises ValueError when another op carries weights (an unfolded
    BatchNormalization, a layer kind this recovery does not know)."""
    it = _interpreter(path)
    details = {t["index"]: t for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    producer = {int(t): k for k, op in enumerate(ops) for t in op["outputs"]}
    inputs = {int(d["index"]) for d in it.get_input_details()}
    position = {
        k: n for n, k in enumerate(k for k, op in enumerate(ops) if op["op_name"] in _WEIGHTED)
    }
    memo: dict[int, frozenset[int]] = {}

    def upstream(t: int) -> frozenset[int]:
        if t in inputs:
            return frozenset({INPUT})
        k = producer.get(t)
        if k is None:  # a constant
            return frozenset()
        if k in position:
            return frozenset({position[k]})
        if k not in memo:
            memo[k] = frozenset().union(*(upstream(int(i)) for i in ops[k]["inputs"] if i >= 0))
        return memo[k]

    out = []
    for k, op in enumerate(ops):
        ins = [int(i) for i in op["inputs"]]
        if op["op_name"] not in _WEIGHTED:
            for i in ins:
                if i < 0 or i in inputs or i in producer:
                    continue
                t = details[i]
                # int32 constants are shapes, sizes and axes; a scalar is an activation's constant.
                if (
                    np.dtype(t["dtype"]) not in (np.int32, np.int64)
                    and int(np.prod(t["shape"])) > 1
                ):
                    raise ValueError(
                        f"{path}: op {k} {op['op_name']} carries {int(np.prod(t['shape']))} "
                        f"weights ({t['name']!r:.80}) that no Keras layer here takes: an "
                        "unfolded BatchNormalization or a layer kind this recovery does not know"
                    )
            continue
        x, w = ins[0], ins[1]
        kernel = _dequant(it, w, details)
        has_bias = len(ins) > 2 and ins[2] >= 0
        n_out = kernel.shape[-1] if op["op_name"] == "DEPTHWISE_CONV_2D" else kernel.shape[0]
        bias = _dequant(it, ins[2], details) if has_bias else np.zeros(n_out, np.float32)
        names = [details[w]["name"], *([details[ins[2]]["name"]] if has_bias else [])]
        names += [details[int(o)]["name"] for o in op["outputs"]]
        out.append(WeightedOp(position[k], op["op_name"], kernel, bias, upstream(x), tuple(names)))
    return out


@dataclass(frozen=True)
class _Slot:
    """One weighted piece of a Keras layer: the layer itself, or the depthwise or pointwise
    half of a SeparableConv2D."""

    layer: Any
    part: str  # "conv", "depthwise", "pointwise", "dense"
    upstream: frozenset[int]  # indices of the slots feeding it; INPUT


_OP_OF = {"conv": "CONV_2D", "pointwise": "CONV_2D", "depthwise": "DEPTHWISE_CONV_2D",
          "dense": "FULLY_CONNECTED"}  # fmt: skip


def _keras_slots(model: Any) -> tuple[list[_Slot], dict[str, Any]]:
    """The weighted slots of ``model`` in layer order (topological), and its BatchNormalization
    layers by name (each must be accounted for)."""
    import keras

    L = keras.layers
    slots: list[_Slot] = []
    out_slot: dict[int, int] = {}  # id(layer) -> slot whose output is the layer's output
    memo: dict[int, frozenset[int]] = {}

    def of_layer(layer: Any) -> frozenset[int]:
        if id(layer) in out_slot:
            return frozenset({out_slot[id(layer)]})
        if isinstance(layer, L.InputLayer):
            return frozenset({INPUT})
        if id(layer) not in memo:
            memo[id(layer)] = feeding(layer)
        return memo[id(layer)]

    def feeding(layer: Any) -> frozenset[int]:
        nodes = layer._inbound_nodes
        if len(nodes) != 1:
            raise ValueError(f"layer {layer.name} is called {len(nodes)} times; expected once")
        srcs = [t._keras_history.operation for t in nodes[0].input_tensors]
        return frozenset().union(*(of_layer(s) for s in srcs))

    bns = {}
    for layer in model.layers:
        if isinstance(layer, L.InputLayer):
            continue
        if isinstance(layer, L.SeparableConv2D):
            slots.append(_Slot(layer, "depthwise", feeding(layer)))
            slots.append(_Slot(layer, "pointwise", frozenset({len(slots) - 1})))
        elif isinstance(layer, L.DepthwiseConv2D):
            slots.append(_Slot(layer, "depthwise", feeding(layer)))
        elif isinstance(layer, L.Conv2D) and type(layer).__name__ == "Conv2D":
            slots.append(_Slot(layer, "conv", feeding(layer)))
        elif isinstance(layer, L.Dense):
            slots.append(_Slot(layer, "dense", feeding(layer)))
        elif isinstance(layer, L.BatchNormalization):
            bns[layer.name] = layer
            continue
        elif layer.weights:
            raise ValueError(
                f"layer {layer.name} ({type(layer).__name__}) has weights this recovery does "
                "not know how to take from an int8 file"
            )
        else:
            continue
        out_slot[id(layer)] = len(slots) - 1
    return slots, bns


def _keras_kernel(slot: _Slot, op: WeightedOp) -> np.ndarray:
    """The op's kernel laid out as the slot's Keras weight."""
    w = op.kernel
    if op.op == "CONV_2D":  # TFLite (out, kh, kw, in) -> Keras (kh, kw, in, out)
        return w.transpose(1, 2, 3, 0)
    if op.op == "DEPTHWISE_CONV_2D":  # (1, kh, kw, c*m) -> (kh, kw, c, m)
        mult = int(slot.layer.depth_multiplier)
        return w[0].reshape(w.shape[1], w.shape[2], -1, mult)
    return w.T  # FULLY_CONNECTED (out, in) -> (in, out)


def _want_shape(slot: _Slot) -> tuple[int, ...]:
    lyr = slot.layer
    if slot.part == "pointwise":
        return tuple(lyr.pointwise_kernel.shape)
    if slot.part == "depthwise":
        return tuple(
            (lyr.depthwise_kernel if hasattr(lyr, "depthwise_kernel") else lyr.kernel).shape
        )
    return tuple(lyr.kernel.shape)


def _base_name(name: str) -> str:
    """A layer name without the counter Keras appends (conv2d_12 -> conv2d): the counter of a
    model built here need not be the one of the model that was converted."""
    return re.sub(r"(_\d+)+$", "", name) or name


def _named(layer_name: str, names: Sequence[str]) -> bool:
    """Whether the op's tensor names carry the Keras layer's name (as a name scope)."""
    base = _base_name(layer_name)
    parts = (p for n in names for piece in n.split(";") for p in piece.split("/"))
    return any(p.startswith(base) for p in parts)


def match(model: Any, ops: list[WeightedOp], where: str) -> list[tuple[_Slot, WeightedOp]]:
    """Each weighted slot of ``model`` with its op; ValueError on anything that does not fit."""
    slots, _ = _keras_slots(model)
    if len(slots) != len(ops):
        raise ValueError(
            f"{where}: {len(ops)} weighted ops, the architecture has {len(slots)} weighted "
            "layers (a SeparableConv2D counts twice)"
        )
    taken: dict[int, int] = {}  # slot index -> op position
    used: set[int] = set()
    for i, s in enumerate(slots):
        want = frozenset(p if p == INPUT else taken[p] for p in s.upstream)
        shape = _want_shape(s)
        kind = [o for o in ops if o.position not in used and o.op == _OP_OF[s.part]]
        placed = [o for o in kind if o.upstream == want]
        fits = [o for o in placed if _keras_kernel(s, o).shape == shape]
        if len(fits) > 1:  # parallel branches of one shape: the names decide
            fits = [o for o in fits if _named(s.layer.name, o.names)]
        if len(fits) != 1:
            got = ", ".join(str(_keras_kernel(s, o).shape) for o in placed) or "none"
            raise ValueError(
                f"{where}: layer {s.layer.name} ({s.part}, kernel {shape}) has "
                f"{'no' if not fits else 'more than one'} matching {_OP_OF[s.part]} in the int8 "
                f"graph (ops in its place have kernels: {got}): not this architecture"
            )
        o = fits[0]
        if any("/" in n for n in o.names) and not _named(s.layer.name, o.names):
            raise ValueError(
                f"{where}: layer {s.layer.name} would take op {o.position} {o.op}, whose tensors "
                f"are named for another layer ({o.names[0]!r:.100}): not this architecture"
            )
        taken[i] = o.position
        used.add(o.position)
    by_pos = {o.position: o for o in ops}
    return [(s, by_pos[taken[i]]) for i, s in enumerate(slots)]


def load_into(model: Any, path: Path) -> Any:
    """Set ``model``'s weights from the int8 file at ``path`` (same architecture); returns it."""
    pairs = match(model, read_graph(path), str(path))
    _, bns = _keras_slots(model)
    bn_after = _bn_after(model)
    parts: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    layers: dict[str, Any] = {}
    for s, o in pairs:
        parts.setdefault(s.layer.name, {})[s.part] = (_keras_kernel(s, o), o.bias)
        layers[s.layer.name] = s.layer
    done_bn = set()
    for name, p in parts.items():
        lyr = layers[name]
        if "pointwise" in p:
            (dw, dw_b), (pw, pw_b) = p["depthwise"], p["pointwise"]
            # A depthwise bias passes through the 1x1 pointwise kernel: fold it into its bias.
            kernels, bias = [dw, pw], pw_b + dw_b @ pw[0, 0]
        else:
            ((k, bias),) = p.values()
            kernels = [k]
        bn = bn_after.get(name)
        if bn is not None:
            _set_bn(bn, bias)
            done_bn.add(bn.name)
            bias = np.zeros_like(bias)
        elif not lyr.use_bias and np.abs(bias).max(initial=0.0) > _ZERO_BIAS * max(
            1.0, float(np.abs(kernels[-1]).max())
        ):
            raise ValueError(f"{path}: {name}: a bias in the int8 file, no bias and no "
                             "BatchNormalization in the architecture to carry it")  # fmt: skip
        lyr.set_weights([*kernels, bias] if lyr.use_bias else kernels)
    left = sorted(set(bns) - done_bn)
    if left:
        raise ValueError(
            f"{path}: BatchNormalization {left} not right after a weighted layer: the int8 file "
            "cannot have folded it, and this recovery cannot rebuild it"
        )
    return model


def _set_bn(bn: Any, bias: np.ndarray) -> None:
    """Identity plus ``bias``: what is left of a BatchNormalization once folded."""
    if not bn.center:
        raise ValueError(f"{bn.name}: no beta (center=False) to carry the folded bias")
    eps = float(bn.epsilon)
    ones = np.ones_like(bias)
    w = [ones] if bn.scale else []
    bn.set_weights([*w, bias, np.zeros_like(bias), ones - eps])


def _bn_after(model: Any) -> dict[str, Any]:
    """Weighted layer name -> the BatchNormalization that consumes its output directly."""
    import keras

    out = {}
    for lyr in model.layers:
        if not isinstance(lyr, keras.layers.BatchNormalization):
            continue
        src = lyr.input._keras_history.operation
        out[src.name] = lyr
    return out


def recover_classifier(int8: Path, arch: str, size: int, alpha: float, n_classes: int) -> Any:
    from edge_wbc_convert.architectures import build_classifier

    return load_into(build_classifier(arch, size, n_classes, None, alpha), int8)


def recover_unet(int8: Path, encoder: str, input_hw: tuple[int, int]) -> Any:
    from edge_wbc_convert.architectures import build_unet

    return load_into(build_unet(encoder, input_hw), int8)


def agreement(model: Any, int8: Path, crops: np.ndarray) -> dict[str, Any]:
    """How closely the float model reproduces the int8 file on ``crops`` (N, S, S, 3 in [0, 1]):
    top-1 agreement and the largest probability difference."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(int8))
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    outd = it.get_output_details()[0]
    s_in, z_in = inp["quantization"]
    s_out, z_out = outd["quantization"]
    q, f = [], []
    for x in crops:
        xi = np.clip(np.round(x / s_in + z_in), -128, 127).astype(np.int8)[None]
        it.set_tensor(inp["index"], xi)
        it.invoke()
        q.append((it.get_tensor(outd["index"])[0].astype(np.float32) - z_out) * s_out)
        f.append(np.asarray(model(x[None].astype(np.float32), training=False))[0])
    qa, fa = np.array(q), np.array(f)
    return {
        "n": len(crops),
        "top1_agreement": float((qa.argmax(1) == fa.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.abs(qa - fa).max()),
        "mean_abs_prob_diff": float(np.abs(qa - fa).mean()),
    }


def map_agreement(
    sources: Sequence[str],
    float_maps: Sequence[np.ndarray],
    int8_maps: Sequence[np.ndarray],
    threshold: float,
) -> dict[str, Any]:
    """Float vs int8 probability maps of the same fields: IoU of the masks thresholded at
    ``threshold`` (1 when both are empty), overall and per source, and |dp|."""
    ious, per = [], {}
    dmax, dsum, npx = 0.0, 0.0, 0
    for s, f, q in zip(sources, float_maps, int8_maps, strict=True):
        a, b = f >= threshold, q >= threshold
        union = int(np.logical_or(a, b).sum())
        iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
        ious.append(iou)
        per.setdefault(s, []).append(iou)
        d = np.abs(f.astype(np.float64) - q)
        dmax, dsum, npx = max(dmax, float(d.max())), dsum + float(d.sum()), npx + d.size
    return {
        "n": len(ious),
        "threshold": threshold,
        "mean_iou": float(np.mean(ious)),
        "min_iou": float(np.min(ious)),
        "max_abs_prob_diff": dmax,
        "mean_abs_prob_diff": dsum / npx,
        "by_source": {s: {"n": len(v), "mean_iou": float(np.mean(v))} for s, v in per.items()},
    }


def seg_agreement(
    model: Any, int8: Path, fields: Sequence[tuple[str, np.ndarray]], threshold: float
) -> dict[str, Any]:
    """Float vs int8 segmenter on ``fields`` ((source, raw RGB) pairs), both through the
    device's preprocessing (white balance, letterbox, x/255) and back to the field's size."""
    from edge_wbc_convert.evaluate import keras_prob_fn, tflite_prob_fn

    fk, fq = keras_prob_fn(model), tflite_prob_fn(int8)
    return map_agreement(
        [s for s, _ in fields], [fk(r) for _, r in fields], [fq(r) for _, r in fields], threshold
    )


# ----------------------------------------------------------------------------- models folder


class RecoveryError(Exception):
    """A float model could not be recovered faithfully; nothing was written."""


def float_file(int8_file: str) -> str:
    """The float model's file name next to its int8 file: seg_mnv2.tflite -> seg_mnv2.keras."""
    return Path(int8_file).stem + ".keras"


def float_record(
    models_dir: Path, file: str, recovered_from_int8: bool, agreement: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's ``float_weights`` of a model (edge_wbc.pipeline.manifest validates it;
    the device never loads the file)."""
    from edge_wbc.pipeline.manifest import sha256_file

    return {
        "file": file,
        "sha256": sha256_file(models_dir / file),
        "recovered_from_int8": recovered_from_int8,
        "agreement": agreement,
    }


def cell_crops(pairs: Sequence[tuple[Any, np.ndarray, np.ndarray]], size: int) -> np.ndarray:
    """Every leukocyte of the masked fields ``pairs`` ((item, RGB, mask)), cropped by the
    device's rule (edge_wbc.pipeline.preprocess.cell_crop on the white-balanced field)."""
    from edge_wbc_convert.cells import CellItem
    from edge_wbc_convert.cls_eval import crops
    from edge_wbc_convert.data import mask_boxes

    cells = [
        CellItem(it.source, it.image, it.split, "other", box)
        for it, _rgb, mask in pairs
        for box in mask_boxes(mask)
    ]
    return crops(cells, size)


def recover_models(
    models_dir: Path,
    pairs: Sequence[tuple[Any, np.ndarray, np.ndarray]],
    min_iou: float = 0.97,
    min_top1: float = 0.97,
) -> list[dict[str, Any]]:
    """Rebuild the float model of every int8 file in the manifest of ``models_dir``, compare
    each with its int8 file on the fields ``pairs`` ((item, RGB, mask): segmenters on the
    fields, the classifier on their leukocytes), then write each next to its int8 file and
    record it as ``float_weights`` in the manifest. The int8 files are not touched. Raises
    RecoveryError, having written nothing, when a model agrees less than ``min_iou`` (mean
    mask IoU) or ``min_top1``."""
    import json

    from edge_wbc_convert.architectures import parse_architecture

    from edge_wbc.pipeline.manifest import MANIFEST_NAME, load_manifest, write_manifest

    man = load_manifest(models_dir)  # every int8 file present and matching its sha256
    raw = json.loads((models_dir / MANIFEST_NAME).read_text())
    fields = [(it.source, rgb) for it, rgb, _mask in pairs]
    if not fields:
        raise RecoveryError("no fields to compare the float and int8 models on")
    splits = "/".join(sorted({it.split for it, _, _ in pairs}))
    sources = ", ".join(sorted({s for s, _ in fields}))
    on = {
        "segmentation": f"{len(fields)} {splits} fields ({sources}) through the device's "
        "preprocessing; masks at the ensemble threshold",
        "classification": f"every leukocyte (mask box) of {len(fields)} {splits} fields "
        f"({sources}), cropped by the device's rule; output 0",
    }
    done, bad = [], []
    for entry, m in zip(raw["models"], man.models, strict=True):
        int8 = models_dir / m.file
        arch = parse_architecture(str(entry.get("architecture", "")), m.task)
        if m.task == "segmentation":
            model = recover_unet(int8, arch["encoder"], m.input_hw)
            ag = seg_agreement(model, int8, fields, man.seg_threshold)
            ok = ag["mean_iou"] >= min_iou
        else:
            n_out = int(entry["output"]["shape"][-1])
            model = recover_classifier(int8, arch["arch"], arch["size"], arch["alpha"], n_out)
            ag = agreement(model, int8, cell_crops(pairs, arch["size"]))
            ok = ag["top1_agreement"] >= min_top1
        ag["measured_on"] = on[m.task]
        log.info("%s: %s", m.name, ag)
        done.append({"name": m.name, "entry": entry, "model": model, "agreement": ag})
        if not ok:
            bad.append(m.name)
    if bad:
        raise RecoveryError(
            f"float models of {bad} do not reproduce their int8 files closely enough "
            f"(mean mask IoU < {min_iou} or top-1 agreement < {min_top1}): nothing written; "
            + "; ".join(f"{d['name']}: {d['agreement']}" for d in done if d["name"] in bad)
        )
    for d in done:
        keep = float_file(d["entry"]["file"])
        # Keras wants the .keras suffix; the rename makes each file appear whole or not at all.
        tmp = models_dir / f".{keep}.tmp.keras"
        d["model"].save(tmp)
        tmp.replace(models_dir / keep)
        d["entry"]["float_weights"] = float_record(models_dir, keep, True, d["agreement"])
        d["file"] = keep
    write_manifest(models_dir, raw)
    load_manifest(models_dir)  # what was written is a manifest the device accepts
    return [{k: v for k, v in d.items() if k not in ("entry", "model")} for d in done]
