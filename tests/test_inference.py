"""Interpreter layer: runtime shim, quantisation read from the model, Edge TPU selection."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_wbc.pipeline.inference import (
    DELEGATES,
    AcceleratorError,
    ModelLoadError,
    RuntimeMissing,
    TensorSpec,
    TFLiteModel,
    compiled_variant,
    dequantize_from,
    get_runtime,
    open_accelerator,
    output_kind,
    quantize_to,
)
from edge_wbc.pipeline.inference import runtime as runtime_mod
from edge_wbc.pipeline.inference.runtime import Runtime

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def _affine(x: np.ndarray) -> np.ndarray:
    return 0.5 * x[..., 0:1] + 0.25 * x[..., 1:2] + 0.25 * x[..., 2:3] - 0.1


@pytest.mark.parametrize("kind", ["int8", "uint8", "float32"])
def test_quantisation_is_read_from_the_model(kind: str) -> None:
    m = TFLiteModel(FIXTURES / f"affine_{kind}.tflite", threads=1)
    assert m.input.dtype == np.dtype(kind)
    assert m.input.quantized == (kind != "float32")
    x = np.random.default_rng(3).random((4, 4, 3)).astype(np.float32)
    (y,) = m.infer(x)
    assert y.dtype == np.float32 and y.shape == (1, 4, 4, 1)
    # Two quantisation steps of input and output are the most int8 may be off by.
    tol = 1e-5 if kind == "float32" else 2.5 * max(m.input.scale, m.outputs[0].scale)
    np.testing.assert_allclose(y[0], _affine(x), atol=tol)


def test_wrong_input_shape_is_a_clear_error() -> None:
    m = TFLiteModel(FIXTURES / "affine_int8.tflite", threads=1)
    with pytest.raises(ValueError, match=r"expects shape \[1, 4, 4, 3\]"):
        m.infer(np.zeros((5, 4, 3), np.float32))


def test_dequantize_goes_through_int64() -> None:
    spec = TensorSpec(0, "t", (2,), np.dtype(np.int8), 0.5, 127)
    raw = np.array([-128, 127], np.int8)
    # In int8 arithmetic -128 - 127 wraps around; the real value is -127.5.
    np.testing.assert_allclose(dequantize_from(spec, raw), [-127.5, 0.0])


def test_quantize_clips_to_the_dtype() -> None:
    spec = TensorSpec(0, "t", (3,), np.dtype(np.uint8), 1 / 255, 0)
    q = quantize_to(spec, np.array([-1.0, 0.5, 2.0]))
    assert q.dtype == np.uint8 and q.tolist() == [0, 128, 255]


def test_output_kind_from_quantisation_range() -> None:
    probs = TensorSpec(0, "p", (1,), np.dtype(np.int8), 1 / 256, -128)
    logits = TensorSpec(0, "l", (1,), np.dtype(np.int8), 0.1, 0)
    assert output_kind(probs) == "probabilities"
    assert output_kind(logits) == "logits"
    assert output_kind(logits, "probabilities") == "probabilities"


def test_runtime_prefers_litert() -> None:
    rt = get_runtime()
    assert rt.name == "ai_edge_litert"


def test_runtime_falls_back_down_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_mod, "_cached", None)
    monkeypatch.setattr(
        runtime_mod,
        "_CANDIDATES",
        (
            ("no_such_litert", "no_such_litert.interpreter"),
            ("ai_edge_litert", "ai_edge_litert.interpreter"),
        ),
    )
    assert get_runtime().name == "ai_edge_litert"


def test_no_runtime_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_mod, "_cached", None)
    monkeypatch.setattr(
        runtime_mod, "_CANDIDATES", (("no_such_litert", "no_such_litert.interpreter"),)
    )
    with pytest.raises(RuntimeMissing, match="pip install ai-edge-litert"):
        get_runtime()


def test_corrupt_model_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.tflite"
    p.write_bytes(b"TFL3" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a usable TFLite model"):
        TFLiteModel(p)


def test_missing_edgetpu_falls_back_to_cpu_with_one_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    acc = open_accelerator("edgetpu", "usb")
    assert acc.kind == "cpu" and acc.requested == "edgetpu"
    assert "falling back to the CPU" in acc.message and "libedgetpu" in acc.message
    assert sum("Edge TPU" in r.message for r in caplog.records) == 1


def test_required_edgetpu_is_an_error() -> None:
    with pytest.raises(AcceleratorError, match="required"):
        open_accelerator("edgetpu", "", require=True)


@pytest.mark.parametrize("device", ["", ":0", "usb", "usb:1", "pci", "pci:0"])
def test_edgetpu_device_spellings_accepted(device: str) -> None:
    assert open_accelerator("edgetpu", device).kind in ("cpu", "edgetpu")


def test_bad_device_and_accelerator_names() -> None:
    with pytest.raises(AcceleratorError, match="not understood"):
        open_accelerator("edgetpu", "firewire")
    with pytest.raises(AcceleratorError, match="unknown accelerator"):
        open_accelerator("gpu")


class _Recorder:
    """A runtime whose delegate 'loads' and whose interpreter records what it was given,
    running the model on LiteRT's CPU underneath (no Edge TPU exists here)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.delegates: list[tuple[str, dict[str, Any]]] = []
        real = get_runtime()

        def interpreter(**kw: Any) -> Any:
            self.calls.append(kw)
            kw = {k: v for k, v in kw.items() if k != "experimental_delegates"}
            return real.interpreter_cls(**kw)

        def load_delegate(lib: str, options: dict[str, Any] | None = None) -> object:
            self.delegates.append((lib, options or {}))
            return object()

        self.runtime = Runtime("fake", "0", interpreter, load_delegate)


def test_edgetpu_uses_the_compiled_file_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    monkeypatch.setattr(ctypes, "CDLL", lambda name: None)  # pretend libedgetpu is installed
    rec = _Recorder()
    base = tmp_path / "seg.tflite"
    shutil.copy(FIXTURES / "affine_int8.tflite", base)
    acc = open_accelerator("edgetpu", "pci:0", runtime=rec.runtime)
    assert acc.kind == "edgetpu" and rec.delegates[0][1] == {"device": "pci:0"}

    # No compiled file: that model runs on the CPU, and says so.
    m = TFLiteModel(base, 2, acc, runtime=rec.runtime)
    assert m.kind == "cpu" and "seg_edgetpu.tflite" in m.note
    assert "experimental_delegates" not in rec.calls[-1]
    with pytest.raises(AcceleratorError, match="compile it"):
        TFLiteModel(base, 2, acc, require_accelerator=True, runtime=rec.runtime)

    shutil.copy(base, tmp_path / "seg_edgetpu.tflite")
    assert compiled_variant(base, DELEGATES["edgetpu"]) == tmp_path / "seg_edgetpu.tflite"
    m = TFLiteModel(base, 2, acc, runtime=rec.runtime)
    assert m.kind == "edgetpu" and m.path.name == "seg_edgetpu.tflite"
    assert rec.calls[-1]["experimental_delegates"] == [acc.delegate]
    assert rec.calls[-1]["num_threads"] == 2
    m.infer(np.zeros((4, 4, 3), np.float32))


def test_compiled_file_that_fails_on_the_tpu_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    monkeypatch.setattr(ctypes, "CDLL", lambda name: None)
    rec = _Recorder()
    base = tmp_path / "seg.tflite"
    shutil.copy(FIXTURES / "affine_int8.tflite", base)
    (tmp_path / "seg_edgetpu.tflite").write_bytes(b"TFL3 not really")
    acc = open_accelerator("edgetpu", runtime=rec.runtime)
    m = TFLiteModel(base, 1, acc, runtime=rec.runtime)
    assert m.kind == "cpu" and m.path == base and "did not load on the Edge TPU" in m.note


def test_compiled_file_not_matching_the_manifest_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    from edge_wbc.pipeline.manifest import sha256_file

    monkeypatch.setattr(ctypes, "CDLL", lambda name: None)
    rec = _Recorder()
    base = tmp_path / "seg.tflite"
    shutil.copy(FIXTURES / "affine_int8.tflite", base)
    shutil.copy(FIXTURES / "affine_uint8.tflite", tmp_path / "seg_edgetpu.tflite")
    acc = open_accelerator("edgetpu", runtime=rec.runtime)
    m = TFLiteModel(base, 1, acc, runtime=rec.runtime, compiled_sha256="0" * 64)
    assert m.kind == "cpu" and m.path == base and "does not match" in m.note
    with pytest.raises(AcceleratorError, match="does not match"):
        TFLiteModel(base, 1, acc, True, rec.runtime, compiled_sha256="0" * 64)
    good = sha256_file(tmp_path / "seg_edgetpu.tflite")
    assert TFLiteModel(base, 1, acc, runtime=rec.runtime, compiled_sha256=good).kind == "edgetpu"


@pytest.mark.parametrize("kind", ["int8", "uint8", "float32"])
def test_pixel_path_equals_the_float_path(kind: str) -> None:
    from edge_wbc.pipeline.preprocess import to_unit

    m = TFLiteModel(FIXTURES / f"affine_{kind}.tflite", threads=1)
    px = np.random.default_rng(5).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    px[0, 0] = (0, 0, 0)
    px[0, 1] = (255, 255, 255)
    np.testing.assert_array_equal(m.infer_pixels(px)[0], m.infer(to_unit(px))[0])


def test_another_accelerator_is_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delegate added to the table is opened with its own library and options, and each model
    runs the file compiled for it: no branch names it."""
    import ctypes

    from edge_wbc.accelerators import Delegate

    opened: list[str] = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: opened.append(name))
    npu = Delegate(
        name="npu", label="Test NPU", libraries={}, default_library="libtestnpu.so",
        install_hint="install it", compiled_suffix="_npu", compile_hint="compile it",
        device_pattern=r"(:[0-9]+)?", device_spellings=("", ":0"),
    )  # fmt: skip
    monkeypatch.setitem(DELEGATES, "npu", npu)
    rec = _Recorder()
    acc = open_accelerator("npu", ":1", runtime=rec.runtime)
    assert acc.kind == "npu" and opened == ["libtestnpu.so"]
    assert rec.delegates == [("libtestnpu.so", {"device": ":1"})]
    with pytest.raises(AcceleratorError, match="Test NPU device 'usb' not understood"):
        open_accelerator("npu", "usb", runtime=rec.runtime)

    base = tmp_path / "seg.tflite"
    shutil.copy(FIXTURES / "affine_int8.tflite", base)
    m = TFLiteModel(base, 1, acc, runtime=rec.runtime)
    assert m.kind == "cpu" and "seg_npu.tflite" in m.note
    shutil.copy(base, tmp_path / "seg_npu.tflite")
    m = TFLiteModel(base, 1, acc, runtime=rec.runtime)
    assert m.kind == "npu" and m.path.name == "seg_npu.tflite"
    assert rec.calls[-1]["experimental_delegates"] == [acc.delegate]
