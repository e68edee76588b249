"""The op gate: a shipped model must run on a CPU interpreter *and* be a candidate for the
Edge TPU compiler. It reads the flatbuffer directly (no interpreter, no TensorFlow)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_wbc_convert import tflite_schema as fb

MAX_BYTES = 4 * 1024 * 1024
#: Ops that mean dynamic shapes or nearest upsampling crept in, which the Edge TPU compiler
#: rejects or maps to the CPU.
FORBIDDEN = {"SHAPE", "STRIDED_SLICE", "PACK", "TILE", "GATHER"}
CONV_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED"}
INT_TYPES = {"INT8", "UINT8"}


@dataclass
class GateReport:
    path: str
    size_bytes: int
    ops: dict[str, int] = field(default_factory=dict)
    input_shape: list[int] = field(default_factory=list)
    input_type: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(path: str | Path, max_bytes: int = MAX_BYTES) -> GateReport:
    p = Path(path)
    buf = p.read_bytes()
    rep = GateReport(str(p), len(buf))
    if len(buf) > max_bytes:
        rep.problems.append(f"file is {len(buf) / 1e6:.2f} MB > {max_bytes / 1e6:.2f} MB")
    model = fb.read_model(buf)
    codes = model.op_codes
    for sg_i, sg in enumerate(model.subgraphs):
        if sg_i == 0:
            for t_i in sg.inputs:
                t = sg.tensors[t_i]
                rep.input_shape, rep.input_type = list(t.shape), t.type_name
                if t.type_name not in INT_TYPES:
                    rep.problems.append(f"input tensor {t.name} is {t.type_name}, not int8/uint8")
                if not t.shape or t.shape[0] != 1:
                    rep.problems.append(f"input tensor {t.name} batch is {t.shape[:1]}, not 1")
                if any(d < 0 for d in t.shape_signature):
                    rep.problems.append(f"input tensor {t.name} has a dynamic dimension")
        for op in sg.operators:
            name, version = codes[op.opcode_index]
            rep.ops[name] = rep.ops.get(name, 0) + 1
            if name in FORBIDDEN:
                rep.problems.append(f"op {name} is not allowed")
            if name == "TRANSPOSE_CONV" and version >= 4:
                rep.problems.append(f"TRANSPOSE_CONV v{version} (Edge TPU compiler fails on v4+)")
            if name in CONV_OPS and op.inputs:
                t = sg.tensors[op.inputs[0]]
                if t.type_name not in INT_TYPES:
                    rep.problems.append(f"{name} runs on {t.type_name} input (float conv)")
            if name == "CUSTOM":
                rep.problems.append("custom op present")
    # One message per kind of problem is enough to act on.
    rep.problems = list(dict.fromkeys(rep.problems))
    return rep
