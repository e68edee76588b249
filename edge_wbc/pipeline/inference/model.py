"""One TFLite model on this device: CPU (XNNPACK) or a delegate (a Coral Edge TPU).

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
from typing import Any, Protocol

import numpy as np

from edge_wbc.accelerators import CPU, DELEGATES, Delegate
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


class AcceleratorError(RuntimeError):
    """The configuration demands an accelerator that cannot be used."""


class ModelLoadError(RuntimeError):
    """A model file could not be turned into a working interpreter."""


@dataclass
class Accelerator:
    """What the models will actually run on, and why (for logs, doctor and reports)."""

    requested: str
    kind: str  # CPU or a DELEGATES name: what is really used
    device: str = ""
    delegate: Any = None
    message: str = ""


class Model(Protocol):
    """What the segmenter, the classifier and the benchmarks need of a model: real-valued (or
    uint8 pixel) input in, float32 outputs out, whatever runs it (a TFLite interpreter here, a
    Keras model in scripts/bench_paper.py)."""

    @property
    def input(self) -> TensorSpec: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    @property
    def input_hw(self) -> tuple[int, int]: ...

    def infer(self, real: np.ndarray) -> list[np.ndarray]: ...

    def infer_pixels(self, pixels: np.ndarray) -> list[np.ndarray]: ...


def make_interpreter(
    model_path: str | Path,
    *,
    threads: int = 2,
    delegate: Any = None,
    runtime: Runtime | None = None,
) -> Any:
    """An interpreter for ``model_path`` with its tensors allocated, on ``delegate`` when one is
    given (a loaded delegate, as :attr:`Accelerator.delegate`), else on the CPU (pycoral's
    ``make_interpreter``). Raises ValueError or RuntimeError from the runtime when the file or
    the delegate refuses."""
    rt = runtime or get_runtime()
    kw: dict[str, Any] = {"model_path": str(model_path), "num_threads": threads}
    if delegate is not None:
        kw["experimental_delegates"] = [delegate]
    interp = rt.interpreter_cls(**kw)
    interp.allocate_tensors()
    return interp


def open_accelerator(
    accelerator: str = CPU,
    device: str = "",
    require: bool = False,
    runtime: Runtime | None = None,
) -> Accelerator:
    """Load the accelerator's delegate once for all models, or explain why the CPU is used.

    A missing delegate library and a missing/unplugged device both end up here: without
    ``require`` the station still counts (on the CPU, slower) and says so once; with
    ``require`` it refuses to start, because the operator asked for guaranteed throughput.
    """
    if accelerator != CPU and accelerator not in DELEGATES:
        raise AcceleratorError(
            f"unknown accelerator {accelerator!r}; choose one of {(CPU, *DELEGATES)}"
        )
    if accelerator == CPU:
        return Accelerator(CPU, CPU, message="running on the CPU")
    spec = DELEGATES[accelerator]
    if not spec.device_ok(device):
        raise AcceleratorError(
            f"{spec.label} device {device!r} not understood; use "
            + " or ".join(", ".join(repr(d) for d in spec.device_spellings).rsplit(", ", 1))
        )
    rt = runtime or get_runtime()
    lib = spec.library(platform.system())
    try:
        # Loading the library first tells "not installed" apart from "no device plugged in", and
        # spares LiteRT's half-built Delegate object (its __del__ prints a traceback).
        ctypes.CDLL(lib)
        delegate = rt.load_delegate(lib, spec.options(device))
    except (ValueError, OSError, RuntimeError) as e:
        if isinstance(e, OSError) or "cannot open" in str(e) or "not found" in str(e).lower():
            why = f"the {spec.label} runtime library {lib} is not installed ({spec.install_hint})"
        else:
            why = f"no {spec.label} found at device {device or 'any'!r} ({e}); is it plugged in?"
        if require:
            raise AcceleratorError(f"{spec.label} required by the configuration but {why}") from e
        msg = f"{spec.label} requested but {why}; falling back to the CPU"
        log.warning(msg)
        return Accelerator(accelerator, CPU, device, None, msg)
    return Accelerator(
        accelerator, accelerator, device, delegate, f"{spec.label} {device or 'default'}"
    )


def compiled_variant(path: Path, spec: Delegate) -> Path | None:
    """``seg_b0.tflite`` -> ``seg_b0_edgetpu.tflite`` (the file compiled for ``spec``) if it
    sits next to it."""
    cand = path.with_name(f"{path.stem}{spec.compiled_suffix}{path.suffix}")
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
        compiled_sha256: str | None = None,
    ) -> None:
        """``compiled_sha256``: the digest of the file compiled for the accelerator, from the
        manifest; a compiled file that does not match it is not run (the CPU file, which was
        verified, is used)."""
        self.runtime = runtime or get_runtime()
        base = Path(path)
        accel = accel or Accelerator(CPU, CPU)
        self.kind = CPU
        self.note = ""
        t0 = time.perf_counter()
        interp = None
        spec = DELEGATES.get(accel.kind)
        if spec is not None:
            compiled = compiled_variant(base, spec)
            if compiled is None:
                self.note = (
                    f"{base.name}: no {base.stem}{spec.compiled_suffix}{base.suffix} next to it; "
                    "runs on the CPU"
                )
                if require_accelerator:
                    raise AcceleratorError(
                        f"{spec.label} required but {self.note.split(';')[0]} "
                        f"({spec.compile_hint})"
                    )
                log.warning(self.note)
            elif compiled_sha256 and sha256_file(compiled) != compiled_sha256:
                self.note = (
                    f"{compiled.name} does not match the manifest's sha256; "
                    "not running it, runs on the CPU"
                )
                if require_accelerator:
                    raise AcceleratorError(f"{spec.label} required but {self.note.split(';')[0]}")
                log.warning(self.note)
            else:
                try:
                    interp = make_interpreter(
                        compiled, threads=threads, delegate=accel.delegate, runtime=self.runtime
                    )
                    base, self.kind = compiled, spec.name
                except (ValueError, RuntimeError) as e:
                    # Typically a file compiled by a compiler newer than the runtime.
                    self.note = (
                        f"{compiled.name} did not load on the {spec.label} ({e}); runs on the CPU"
                    )
                    if require_accelerator:
                        raise AcceleratorError(f"{spec.label} required but {self.note}") from e
                    log.warning(self.note)
                    interp = None
        if interp is None:
            try:
                interp = make_interpreter(base, threads=threads, runtime=self.runtime)
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
