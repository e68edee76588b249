"""Interpreter layer: runtime shim, accelerators, quantisation-aware tensors.

Everything above this package deals in real-valued numpy arrays, through :class:`Model`.
"""

from edge_wbc.accelerators import ACCELERATORS, CPU, DELEGATES, Delegate
from edge_wbc.pipeline.inference.adapters import (
    TensorSpec,
    dequantize_from,
    get_output,
    output_kind,
    quantize_to,
    set_input,
)
from edge_wbc.pipeline.inference.model import (
    Accelerator,
    AcceleratorError,
    Model,
    ModelLoadError,
    TFLiteModel,
    compiled_variant,
    make_interpreter,
    open_accelerator,
)
from edge_wbc.pipeline.inference.runtime import Runtime, RuntimeMissing, get_runtime

__all__ = [
    "ACCELERATORS",
    "CPU",
    "DELEGATES",
    "Accelerator",
    "AcceleratorError",
    "Delegate",
    "Model",
    "ModelLoadError",
    "Runtime",
    "RuntimeMissing",
    "TFLiteModel",
    "TensorSpec",
    "compiled_variant",
    "dequantize_from",
    "get_output",
    "get_runtime",
    "make_interpreter",
    "open_accelerator",
    "output_kind",
    "quantize_to",
    "set_input",
]
