"""One TFLite model on this device: CPU (XNNPACK) or a Coral Edge TPU.

Interpreters are built once here and reused for every field: building one costs tens of
milliseconds and allocates its tensor arena, which a per-field build would churn.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_wbc.pipeline.inference.adapters import (
    TensorSpec,
    get_output,
    input_specs,
    output_specs,
    set_input,
    set_input_u8,
    unit_u8_lut,
)
from edge_wbc.pipeline.inference.runtime import Runtime, get_runtime
from edge_wbc.pipeline.manifest import sha256_file
from edge_wbc.pipeline.preprocess import to_unit

log = logging.getLogger(__name__)

ACCELERATORS = ("cpu", "edgetpu")

_EDGETPU_LIBRARY = {
    "Linux": "libedgetpu.so.1",
    "Darwin": "libedgetpu.1.dylib",
    "Windows": "edgetpu.dll",
}


class AcceleratorError(RuntimeError):
    """The configuration demands an accelerator that cannot be used."""


class ModelLoadError(RuntimeError):
    """A model file could not be turned into a working interpreter."""


@dataclass
class Accelerator:
    """What the models will actually run on, and why (for logs, doctor and reports)."""

    requested: str
    kind: str  # "cpu" or "edgetpu": what is really used
    device: str = ""
    delegate: Any = None
    message: str = ""


def edgetpu_device_ok(device: str) -> bool:
    # pycoral's spellings: "" (first found), ":<N>", "usb", "usb:<N>", "pci", "pci:<N>".
    if device in ("", "usb", "pci"):
        return True
    head, _, num = device.partition(":")
    return head in ("", "usb", "pci") and num.isdigit()


def open_accelerator(
    accelerator: str = "cpu",
    device: str = "",
    require: bool = False,
    runtime: Runtime | None = None,
) -> Accelerator:
    """Load the Edge TPU delegate once for all models, or explain why the CPU is used.

    A missing delegate library and a missing/unplugged TPU both end up here: without
    ``require`` the station still counts (on the CPU, slower) and says so once; with
    ``require`` it refuses to start, because the operator asked for guaranteed throughput.
    """
    if accelerator not in ACCELERATORS:
        raise AcceleratorError(f"unknown accelerator {accelerator!r}; choose one of {ACCELERATORS}")
    if accelerator == "cpu":
        return Accelerator("cpu", "cpu", message="running on the CPU")
    if not edgetpu_device_ok(device):
        raise AcceleratorError(
            f"Edge TPU device {device!r} not understood; "
            "use '', ':0', 'usb', 'usb:0', 'pci' or 'pci:0'"
        )
    rt = runtime or get_runtime()
    lib = _EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")
    options = {"device": device} if device else {}
    try:
        # Loading the library first tells "not installed" apart from "no TPU plugged in", and
        # spares LiteRT's half-built Delegate object (its __del__ prints a traceback).
        ctypes.CDLL(lib)
        delegate = rt.load_delegate(lib, options)
    except (ValueError, OSError, RuntimeError) as e:
        if isinstance(e, OSError) or "cannot open" in str(e) or "not found" in str(e).lower():
            why = (
                f"the Edge TPU runtime library {lib} is not installed "
                "(install libedgetpu1-std from Coral's apt repository)"
            )
        else:
            why = f"no Edge TPU found at device {device or 'any'!r} ({e}); is it plugged in?"
        if require:
            raise AcceleratorError(f"Edge TPU required by the configuration but {why}") from e
        msg = f"Edge TPU requested but {why}; falling back to the CPU"
        log.warning(msg)
        return Accelerator("edgetpu", "cpu", device, None, msg)
    return Accelerator("edgetpu", "edgetpu", device, delegate, f"Edge TPU {device or 'default'}")


def edgetpu_variant(path: Path) -> Path | None:
    """``seg_b0.tflite`` -> ``seg_b0_edgetpu.tflite`` if the compiled file sits next to it."""
    cand = path.with_name(f"{path.stem}_edgetpu{path.suffix}")
    return cand if cand.is_file() else None


class TFLiteModel:
    """An interpreter with its tensors' quantisation resolved once.

    ``infer`` takes the real-valued input (what the model was trained on) and returns each
    output as float32 real values: callers never see int8.
    """

    def __init__(
        self,
        path: str | Path,
        threads: int = 2,
        accel: Accelerator | None = None,
        require_accelerator: bool = False,
        runtime: Runtime | None = None,
        edgetpu_sha256: str | None = None,
    ) -> None:
        """``edgetpu_sha256``: the compiled file's digest from the manifest; a compiled file
        that does not match it is not run (the CPU file, which was verified, is used)."""
        self.runtime = runtime or get_runtime()
        base = Path(path)
        accel = accel or Accelerator("cpu", "cpu")
        self.kind = "cpu"
        self.note = ""
        t0 = time.perf_counter()
        interp = None
        if accel.kind == "edgetpu":
            compiled = edgetpu_variant(base)
            if compiled is None:
                self.note = (
                    f"{base.name}: no {base.stem}_edgetpu{base.suffix} next to it; runs on the CPU"
                )
                if require_accelerator:
                    raise AcceleratorError(
                        f"Edge TPU required but {self.note.split(';')[0]} "
                        "(compile it with edgetpu_compiler)"
                    )
                log.warning(self.note)
            elif edgetpu_sha256 and sha256_file(compiled) != edgetpu_sha256:
                self.note = (
                    f"{compiled.name} does not match the manifest's sha256; "
                    "not running it, runs on the CPU"
                )
                if require_accelerator:
                    raise AcceleratorError(f"Edge TPU required but {self.note.split(';')[0]}")
                log.warning(self.note)
            else:
                try:
                    interp = self.runtime.interpreter_cls(
                        model_path=str(compiled),
                        experimental_delegates=[accel.delegate],
                        num_threads=threads,
                    )
                    interp.allocate_tensors()
                    base, self.kind = compiled, "edgetpu"
                except (ValueError, RuntimeError) as e:
                    # Typically a file compiled by an edgetpu_compiler newer than the runtime.
                    self.note = (
                        f"{compiled.name} did not load on the Edge TPU ({e}); runs on the CPU"
                    )
                    if require_accelerator:
                        raise AcceleratorError(f"Edge TPU required but {self.note}") from e
                    log.warning(self.note)
                    interp = None
        if interp is None:
            try:
                interp = self.runtime.interpreter_cls(model_path=str(base), num_threads=threads)
                interp.allocate_tensors()
            except (ValueError, RuntimeError) as e:
                raise ModelLoadError(f"{base}: not a usable TFLite model ({e})") from e
        self.path = base
        self.threads = threads
        self.interpreter = interp
        ins = input_specs(interp)
        if len(ins) != 1:
            raise ModelLoadError(f"{base}: expected one input tensor, found {len(ins)}")
        self.input: TensorSpec = ins[0]
        self.outputs: list[TensorSpec] = output_specs(interp)
        self._u8_lut = unit_u8_lut(self.input)
        self.load_ms = (time.perf_counter() - t0) * 1000.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input.shape

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.input.shape[1]), int(self.input.shape[2])

    def infer(self, real: np.ndarray) -> list[np.ndarray]:
        set_input(self.interpreter, self.input, real)
        self.interpreter.invoke()
        return [get_output(self.interpreter, s) for s in self.outputs]

    def infer_pixels(self, pixels: np.ndarray) -> list[np.ndarray]:
        """Like ``infer(pixels / 255)`` for a uint8 image, the models' input convention
        (preprocess.to_unit), without the float round trip on quantised inputs."""
        if self._u8_lut is None:
            return self.infer(to_unit(pixels))
        set_input_u8(self.interpreter, self.input, pixels, self._u8_lut)
        self.interpreter.invoke()
        return [get_output(self.interpreter, s) for s in self.outputs]
