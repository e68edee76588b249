"""The paper's encoders (and the shipped edge ones) build with weights=None, at batch 1 with
static shapes, and convert to full-int8 TFLite — at a small input so CI can afford it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from edge_wbc_convert.architectures import (
    EDGE_ENCODERS,
    PAPER_ENCODERS,
    build_classifier,
    build_unet,
)
from edge_wbc_convert.gate import check
from edge_wbc_convert.quantize import to_int8


def _convert(model, out: Path) -> Path:
    shape = tuple(int(v) for v in model.input.shape[1:])
    rng = np.random.default_rng(0)
    return to_int8(model, lambda: (rng.random(shape, np.float32) for _ in range(2)), out)


def _run_tflite(path: Path) -> np.ndarray:
    from edge_wbc.pipeline.inference import TFLiteModel

    m = TFLiteModel(path, threads=1)
    return m.infer(np.full(m.input_shape[1:], 0.5, np.float32))[0]


@pytest.mark.parametrize("encoder", EDGE_ENCODERS)
def test_edge_unet_converts_and_passes_the_gate(encoder: str, tmp_path: Path) -> None:
    model = build_unet(encoder, (96, 128))
    assert model.input.shape[0] == 1 and model.output.shape[1:] == (96, 128, 1)
    out = _convert(model, tmp_path / f"{encoder}.tflite")
    report = check(out)
    assert report.ok, report.problems
    assert "TRANSPOSE_CONV" not in report.ops and "TILE" not in report.ops
    prob = _run_tflite(out)
    assert prob.shape == (1, 96, 128, 1) and 0.0 <= prob.min() <= prob.max() <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("encoder", PAPER_ENCODERS)
def test_paper_unet_builds_and_converts(encoder: str, tmp_path: Path) -> None:
    hw = (96, 96) if encoder == "inceptionresnetv2" else (64, 64)
    model = build_unet(encoder, hw, decoder_filters=(32, 24, 16, 16, 8))
    assert model.output.shape[1:3] == hw
    out = _convert(model, tmp_path / f"{encoder}.tflite")
    assert _run_tflite(out).shape == (1, *hw, 1)


@pytest.mark.slow
def test_paper_classifier_builds_and_converts(tmp_path: Path) -> None:
    model = build_classifier("inceptionresnetv2", 96, 6)
    out = _convert(model, tmp_path / "irv2_cls.tflite")
    probs = _run_tflite(out)
    assert probs.shape == (1, 6)


def test_local_weights_file_is_required_to_exist() -> None:
    with pytest.raises(FileNotFoundError):
        build_unet("efficientnetb2", (64, 64), weights="/nonexistent/weights.h5")
