"""Interpreter layer: runtime shim, accelerator, quantisation-aware tensors.

Everything above this package deals in real-valued numpy arrays.
"""

from edge_wbc.pipeline.inference.adapters import (
    TensorSpec,
    dequantize_from,
    get_output,
    output_kind,
    quantize_to,
    set_input,
)
from edge_wbc.pipeline.inference.model import (
    ACCELERATORS,
    Accelerator,
    AcceleratorError,
    ModelLoadError,
    TFLiteModel,
    edgetpu_variant,
    open_accelerator,
)
from edge_wbc.pipeline.inference.runtime import Runtime, RuntimeMissing, get_runtime

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "AcceleratorError",
    "ModelLoadError",
    "Runtime",
    "RuntimeMissing",
    "TFLiteModel",
    "TensorSpec",
    "dequantize_from",
    "edgetpu_variant",
    "get_output",
    "get_runtime",
    "open_accelerator",
    "output_kind",
    "quantize_to",
    "set_input",
]
