"""Keras model -> full-integer int8 TFLite (int8 input and output tensors)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def load_keras(path: str | Path) -> Any:
    import keras

    return keras.models.load_model(path, compile=False, safe_mode=False)


def to_int8(
    model: Any,
    representative: Callable[[], Iterable[np.ndarray]],
    out_path: str | Path,
) -> Path:
    """Convert with a representative dataset drawn from the training distribution.

    ``representative`` yields single float32 inputs shaped like the model input without the
    batch axis. Input and output tensors are int8 so the device never touches float tensors.
    """
    import tensorflow as tf

    def rep() -> Iterable[list[np.ndarray]]:
        for x in representative():
            yield [np.asarray(x, np.float32)[None]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    data = conv.convert()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    log.info("wrote %s (%.2f MB)", out, len(data) / 1e6)
    return out


def converter_versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__}


#: The fields a segmenter's representative inputs are drawn from (a classifier's come from its
#: run's own training cells).
SEG_REP_SOURCES = ("zheng1", "zheng2", "bccd", "raabin")


def quantize_run(
    run_dir: Path, out: Path, data_root: Path, samples: int = 200, seed: int = 123
) -> Path:
    """A training run's best.keras -> full-integer int8 ``out``, with a representative set from
    the run's training distribution."""
    import json

    from edge_wbc_convert.data import load_items

    cfg = json.loads((run_dir / "config.json").read_text())
    model = load_keras(run_dir / "best.keras")
    rep: Callable[[], Iterable[np.ndarray]]
    if cfg["task"] == "segmentation":
        from edge_wbc_convert.data import SegSampler

        items = [i for i in load_items(data_root, SEG_REP_SOURCES) if i.split == "train"]
        hw = tuple(cfg["input_hw"])
        seg = SegSampler(items, hw, run_dir.parent / "cache", seed)  # type: ignore[arg-type]
        half = samples // 2

        def seg_rep() -> Iterable[np.ndarray]:
            # Half augmented (other labs), half as the training sources look.
            for k in range(samples):
                seg.augment = k < half
                yield seg.sample()[0]

        rep = seg_rep
    else:
        from edge_wbc_convert.cells import CropSampler, run_cells

        crops = CropSampler(run_cells(run_dir, "train"), int(cfg["input_hw"][0]), seed)

        def cls_rep() -> Iterable[np.ndarray]:
            for _ in range(samples):
                yield crops.sample()[0]

        rep = cls_rep
    to_int8(model, rep, out)
    if cfg["task"] != "segmentation":
        from edge_wbc_convert.graph_edit import add_embedding_output

        # Lab adaptation and the fine-class heads read the pooled features (output 1).
        add_embedding_output(out)
    return out
