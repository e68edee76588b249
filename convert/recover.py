"""Float weights recovered from a shipped int8 classifier.

The float Keras weights of the 2026-11-28 classifier were lost with a machine. Its int8 file still
holds every weight (per-channel int8, BatchNorm folded into the convolutions by the converter),
so a float model can be rebuilt from it: each CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED of
the graph, in execution order, is dequantised into the matching Keras layer of the same
architecture, and each BatchNormalization is set to the identity plus the folded bias
(gamma 1, mean 0, variance 1 - epsilon, beta = bias). The rebuilt model reproduces the int8
file's outputs up to quantisation error (measured by ``agreement``) and, unlike the int8 file,
can be trained again: the BatchNorm layers start as the identity and learn from there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


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


def weighted_ops(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(op, float kernel as TFLite lays it out, float bias) of every weighted op, in order."""
    it = _interpreter(path)
    details = {t["index"]: t for t in it.get_tensor_details()}
    out = []
    for op in it._get_ops_details():
        if op["op_name"] not in _WEIGHTED:
            continue
        _x, w, b = (int(i) for i in op["inputs"][:3])
        out.append((op["op_name"], _dequant(it, w, details), _dequant(it, b, details)))
    return out


def load_into(model: Any, path: Path) -> Any:
    """Set ``model``'s weights from the int8 file at ``path`` (same architecture); returns it."""
    import keras

    L = keras.layers
    ops = weighted_ops(path)
    layers = [
        lyr for lyr in model.layers if isinstance(lyr, (L.Conv2D, L.DepthwiseConv2D, L.Dense))
    ]
    if len(layers) != len(ops):
        raise ValueError(
            f"{path}: {len(ops)} weighted ops, the architecture has {len(layers)} weighted layers"
        )
    bn_after = _bn_after(model)
    for lyr, (name, w, b) in zip(layers, ops, strict=True):
        if name == "CONV_2D":  # TFLite (out, kh, kw, in) -> Keras (kh, kw, in, out)
            kernel = w.transpose(1, 2, 3, 0)
        elif name == "DEPTHWISE_CONV_2D":  # (1, kh, kw, c) -> (kh, kw, c, 1)
            kernel = w[0][..., None]
        else:  # FULLY_CONNECTED (out, in) -> (in, out)
            kernel = w.T
        want = tuple(lyr.kernel.shape)
        if kernel.shape != want:
            raise ValueError(f"{path}: {name} kernel {kernel.shape} does not fit {lyr.name} {want}")
        bn = bn_after.get(lyr.name)
        if lyr.use_bias:
            lyr.set_weights([kernel, b])
        elif bn is not None:
            lyr.set_weights([kernel])
            eps = float(bn.epsilon)
            ones = np.ones_like(b)
            bn.set_weights([ones, b, np.zeros_like(b), ones - eps])
        else:
            raise ValueError(f"{lyr.name}: no bias and no BatchNormalization to carry it")
    return model


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


def agreement(model: Any, int8: Path, crops: np.ndarray) -> dict[str, float]:
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
        "n": float(len(crops)),
        "top1_agreement": float((qa.argmax(1) == fa.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.abs(qa - fa).max()),
        "mean_abs_prob_diff": float(np.abs(qa - fa).mean()),
    }
