"""Edits of a converted TFLite flatbuffer that the converter cannot be asked for.

The classifier's pooled features (the 1280-d global average pool in front of the Dense head)
are what lab adaptation and the fine-class heads read. The converter keeps that tensor anyway
(the Dense head consumes it); listing it as a second subgraph output makes the interpreter
hand it out without touching a single weight or op, so output 0 stays bit-identical.
Uses the schema's object API from the LiteRT package (no TensorFlow needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The Keras layer whose output is the embedding (tensor names carry the layer name).
EMBEDDING_LAYER = "global_average_pooling2d"
#: The name the embedding output gets in the model's serving signature.
EMBEDDING_SIGNATURE_NAME = "embedding"
_TFLITE_FILE_ID = b"TFL3"


class GraphEditError(ValueError):
    """The model cannot be edited as asked; the message says why."""


def _schema() -> Any:
    from edge_wbc_convert.tflite_schema import _schema as s

    return s()


def _name(t: Any) -> str:
    n = t.name
    return n.decode() if isinstance(n, bytes) else str(n or "")


def embedding_tensor(model: Any, layer: str = EMBEDDING_LAYER) -> int:
    """Index in subgraph 0 of the pooled-features tensor: the output of a MEAN op whose tensor
    name holds ``layer`` and whose shape is [1, D]."""
    s = _schema()
    g = model.subgraphs[0]
    found = []
    for op in g.operators or []:
        oc = model.operatorCodes[op.opcodeIndex]
        if max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)) != s.BuiltinOperator.MEAN:
            continue
        for ti in op.outputs:
            t = g.tensors[int(ti)]
            shape = [int(v) for v in (t.shape if t.shape is not None else [])]
            if layer in _name(t) and len(shape) == 2 and shape[0] == 1:
                found.append(int(ti))
    if len(found) != 1:
        raise GraphEditError(
            f"expected one MEAN output named *{layer}* shaped [1, D], found {len(found)}"
        )
    return found[0]


def with_embedding_output(buf: bytes, layer: str = EMBEDDING_LAYER) -> bytes:
    """The model with its pooled features appended as the last subgraph output (and to its
    serving signature). A model that already emits them is returned unchanged."""
    s = _schema()
    import flatbuffers

    model = s.ModelT.InitFromPackedBuf(bytearray(buf), 0)
    if len(model.subgraphs) != 1:
        raise GraphEditError(f"expected one subgraph, found {len(model.subgraphs)}")
    g = model.subgraphs[0]
    ti = embedding_tensor(model, layer)
    outs = [int(v) for v in g.outputs]
    if ti in outs:
        return bytes(buf)
    if len(outs) != 1:
        raise GraphEditError(f"expected one output before the edit, found {len(outs)}")
    g.outputs = [*outs, ti]
    for sd in model.signatureDefs or []:
        if sd.subgraphIndex == 0:
            tm = s.TensorMapT()
            tm.name, tm.tensorIndex = EMBEDDING_SIGNATURE_NAME.encode(), ti
            sd.outputs = [*(sd.outputs or []), tm]
    b = flatbuffers.Builder(len(buf) + 4096)
    b.Finish(model.Pack(b), file_identifier=_TFLITE_FILE_ID)
    return bytes(b.Output())


def add_embedding_output(src: Path, dst: Path | None = None) -> Path:
    """Rewrite ``src`` (or write ``dst``) with the embedding output; atomic."""
    dst = src if dst is None else dst
    data = with_embedding_output(src.read_bytes())
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dst)
    return dst


def add_embedding_checked(
    model: Path, out: Path, data_root: Path, check_images: int = 200
) -> tuple[list[list[int]], int]:
    """Write ``out`` as ``model`` with the embedding output, only when the op gate passes and
    output 0 is bit-identical on ``check_images`` real crops; returns the edited model's output
    shapes and the number of crops checked. Raises GraphEditError (or OSError reading
    ``model``) with nothing written."""
    import numpy as np
    from edge_wbc_convert.data import load_items, read_rgb
    from edge_wbc_convert.gate import check

    from edge_wbc.pipeline import preprocess as pp
    from edge_wbc.pipeline.inference import TFLiteModel

    data = with_embedding_output(model.read_bytes())
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    try:
        gate_rep = check(tmp)
        if not gate_rep.ok:
            raise RuntimeError(f"op gate fails: {gate_rep.problems}")
        a, b = TFLiteModel(model, threads=2), TFLiteModel(tmp, threads=2)
        if len(b.outputs) != 2:
            raise RuntimeError(f"edited model has {len(b.outputs)} outputs, not 2")
        items = load_items(data_root, ("pbc", "bccd", "zheng1", "zheng2", "raabin"))
        rng = np.random.default_rng(0)
        picked = [items[i] for i in rng.permutation(len(items))[:check_images]]
        if not picked:
            raise RuntimeError(f"no images under {data_root} to check output 0 on")
        size = a.input_hw[0]
        for it in picked:
            rgb = pp.white_balance(read_rgb(it.image))
            h, w = rgb.shape[:2]
            box = it.boxes[0] if it.boxes else (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
            crop = pp.cell_crop(rgb, box, size)
            if not np.array_equal(a.infer_pixels(crop)[0], b.infer_pixels(crop)[0]):
                raise RuntimeError(f"output 0 differs on {it.image}")
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise GraphEditError(f"not written: {e}") from e
    tmp.replace(out)
    return [list(o.shape) for o in b.outputs], len(picked)


def dense_head(buf: bytes) -> tuple[Any, Any, list[str]]:
    """The float weights (D, K) and bias (K,) of the FULLY_CONNECTED op that reads the
    embedding, dequantised from the int8 graph, and the names of its weight tensors."""
    import numpy as np

    s = _schema()
    model = s.ModelT.InitFromPackedBuf(bytearray(buf), 0)
    g = model.subgraphs[0]
    ti = embedding_tensor(model)
    for op in g.operators or []:
        oc = model.operatorCodes[op.opcodeIndex]
        code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
        if code != s.BuiltinOperator.FULLY_CONNECTED or int(op.inputs[0]) != ti:
            continue
        wt, bt = g.tensors[int(op.inputs[1])], g.tensors[int(op.inputs[2])]
        wq = np.frombuffer(bytes(model.buffers[wt.buffer].data), np.int8).reshape(wt.shape)
        bq = np.frombuffer(bytes(model.buffers[bt.buffer].data), np.int32)

        def deq(q: Any, t: Any, axis: int) -> Any:
            sc = np.asarray(t.quantization.scale, np.float64)
            zp = np.asarray(t.quantization.zeroPoint, np.int64)
            if sc.size > 1:  # per channel along the output axis
                shape = [1] * q.ndim
                shape[axis] = -1
                sc, zp = sc.reshape(shape), zp.reshape(shape)
            return (q.astype(np.int64) - zp) * sc

        # TFLite keeps FC weights as (K, D): one row per output class.
        w = deq(wq, wt, 0).T
        b = deq(bq, bt, 0)
        return w.astype(np.float64), b.astype(np.float64), [_name(wt), _name(bt)]
    raise GraphEditError("no FULLY_CONNECTED op reads the embedding")
