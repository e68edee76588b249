"""Just enough of the TFLite flatbuffer to gate a model: op codes with versions, tensors with
types and shapes. Uses the schema module LiteRT ships (or TensorFlow's), not an interpreter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as s
    except ImportError:  # pragma: no cover - LiteRT is a core dependency
        from tensorflow.lite.python import schema_py_generated as s
    return s


@dataclass
class Tensor:
    name: str
    type_name: str
    shape: list[int]
    shape_signature: list[int]


@dataclass
class Operator:
    opcode_index: int
    inputs: list[int]


@dataclass
class Subgraph:
    tensors: list[Tensor]
    operators: list[Operator]
    inputs: list[int]
    outputs: list[int]


@dataclass
class Model:
    op_codes: list[tuple[str, int]]  # (builtin name, version)
    subgraphs: list[Subgraph]


def read_model(buf: bytes) -> Model:
    s = _schema()
    op_names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    m = s.Model.GetRootAsModel(buf, 0)
    codes = []
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        # Newer files put codes > 127 in BuiltinCode and keep a placeholder in the deprecated
        # field; the larger of the two is the real one.
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        codes.append((op_names.get(code, f"OP_{code}"), int(oc.Version())))
    sgs = []
    for gi in range(m.SubgraphsLength()):
        g = m.Subgraphs(gi)
        tensors = []
        for ti in range(g.TensorsLength()):
            t = g.Tensors(ti)
            shape = [int(v) for v in t.ShapeAsNumpy()] if t.ShapeLength() else []
            sig = [int(v) for v in t.ShapeSignatureAsNumpy()] if t.ShapeSignatureLength() else shape
            name = t.Name().decode() if t.Name() else f"t{ti}"
            tensors.append(Tensor(name, type_names.get(t.Type(), str(t.Type())), shape, sig))
        ops = []
        for oi in range(g.OperatorsLength()):
            o = g.Operators(oi)
            ins = [int(v) for v in o.InputsAsNumpy()] if o.InputsLength() else []
            ops.append(Operator(int(o.OpcodeIndex()), [v for v in ins if v >= 0]))
        sgs.append(
            Subgraph(
                tensors,
                ops,
                [int(v) for v in g.InputsAsNumpy()],
                [int(v) for v in g.OutputsAsNumpy()],
            )
        )
    return Model(codes, sgs)
