#!/usr/bin/env python3
"""The paper's models vs the shipped edge models, through the same field pipeline.

Edge side: ``edge-wbc bench`` (LiteRT, int8, the shipped models/), run in a subprocess so its
peak RSS is its own. Paper side, in this process: float Keras models of the paper's
architectures — U-Nets with EfficientNetB2, EfficientNetB7 and InceptionResNetV2 encoders and
an InceptionResNetV2 classifier, untrained (weights=None: the timing does not depend on the
weight values) — plugged into the SAME FieldAnalyzer (white balance, ensemble vote,
postprocess, crops, quality), so only the models differ. Both sides use the same number of
threads and the same input sizes (the shipped models' inputs), so the ratio is the cost of the
models themselves.

Needs TensorFlow (the ``convert`` extra); the device package never imports it.

    python scripts/bench_paper.py --runs 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class KerasModel:
    """An ``edge_wbc.pipeline.inference.Model`` (real-valued or uint8 pixels in, list of float32
    outputs) backed by a float Keras model run through one tf.function."""

    def __init__(self, model: Any, name: str) -> None:
        import tensorflow as tf

        from edge_wbc.pipeline.inference.adapters import TensorSpec

        self.keras_model = model
        self.name = name
        shape = tuple(int(v) for v in model.input.shape)
        self.input = TensorSpec(0, name, shape, np.dtype(np.float32), 0.0, 0)
        out_shape = tuple(int(v) for v in model.output.shape)
        self.outputs = [TensorSpec(1, name, out_shape, np.dtype(np.float32), 0.0, 0)]
        self.kind = "cpu"
        self.path = Path(f"{name}.keras")
        self._fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self._tf = tf

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input.shape

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.input.shape[1]), int(self.input.shape[2])

    def infer_pixels(self, pixels: np.ndarray) -> list[np.ndarray]:
        from edge_wbc.pipeline.preprocess import to_unit

        return self.infer(to_unit(pixels))

    def infer(self, real: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(real, np.float32)
        if x.ndim == 3:
            x = x[None]
        return [np.asarray(self._fn(self._tf.constant(x)), np.float32)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def edge_command(args: argparse.Namespace, out: Path) -> list[str]:
    """``edge-wbc bench`` with this run's settings (the same warm-up on both sides: a different
    one would time a colder or warmer edge pipeline than the paper's)."""
    cmd = [
        sys.executable, "-c", "from edge_wbc.cli import app; app()", "bench",
        "--models", str(args.models), "--threads", str(args.threads),
        "--runs", str(args.edge_runs), "--warmup", str(args.warmup), "--json", str(out),
    ]  # fmt: skip
    if args.image:
        cmd += ["--image", str(args.image)]
    return cmd


def run_edge(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "edge.json"
        # Not check=True: the edge bench has said what is wrong (models missing, a bad image)
        # on stderr; a CalledProcessError traceback after it would only bury that line.
        done = subprocess.run(edge_command(args, out), cwd=ROOT, check=False)
        if done.returncode != 0:
            raise SystemExit(done.returncode)
        return json.loads(out.read_text())


def _unet_nearest_features(encoder: str, input_hw: tuple[int, int]) -> Any:
    """Fallback U-Net for encoders whose 'valid' padding puts no feature map within
    convert.architectures' tolerance of a stride (InceptionResNetV2 at 192x256: 21 px rows at
    stride 8, not 24). Same decoder as convert.architectures.build_unet; each skip is the
    deepest feature map nearest its stride, resized to the decoder's grid."""
    import keras

    L = keras.layers
    inp = keras.Input(shape=(*input_hw, 3), batch_size=1)
    apps = {
        "inceptionresnetv2": keras.applications.InceptionResNetV2,
        "efficientnetb2": keras.applications.EfficientNetB2,
        "efficientnetb7": keras.applications.EfficientNetB7,
    }
    enc = apps[encoder](include_top=False, input_tensor=inp, weights=None)
    maps = [
        layer.output
        for layer in enc.layers
        if len(getattr(getattr(layer, "output", None), "shape", ())) == 4
    ]
    feats = []
    for stride in (2, 4, 8, 16, 32):
        want = input_hw[0] / stride
        best = min(abs(int(m.shape[1]) - want) for m in maps)
        feats.append([m for m in maps if abs(int(m.shape[1]) - want) == best][-1])
    x = feats[-1]
    for skip, f in zip(feats[:-1][::-1], (96, 64, 40, 24), strict=True):
        x = L.UpSampling2D(2, interpolation="bilinear")(x)
        if tuple(skip.shape[1:3]) != tuple(x.shape[1:3]):
            skip = L.Resizing(int(x.shape[1]), int(x.shape[2]), interpolation="bilinear")(skip)
        x = L.Concatenate()([x, skip])
        x = L.SeparableConv2D(f, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.ReLU(6.0)(x)
    x = L.UpSampling2D(2, interpolation="bilinear")(x)
    if tuple(x.shape[1:3]) != tuple(input_hw):
        x = L.Resizing(*input_hw, interpolation="bilinear")(x)
    x = L.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    out = L.Conv2D(1, 1, activation="sigmoid")(x)
    return keras.Model(inp, out, name=f"unet_{encoder}_nearest")


def _unet(encoder: str, input_hw: tuple[int, int]) -> Any:
    from edge_wbc_convert.architectures import build_unet

    try:
        return build_unet(encoder, input_hw)
    except ValueError as e:
        print(f"  convert.architectures.build_unet({encoder!r}, {input_hw}) failed ({e}); "
              "using this script's nearest-feature U-Net", flush=True)  # fmt: skip
        return _unet_nearest_features(encoder, input_hw)


def build_paper(
    args: argparse.Namespace, analyzer: Any
) -> tuple[dict[str, float], list[KerasModel]]:
    """Build (and save + reload, to time a realistic load) the paper's four models."""
    import keras
    from edge_wbc_convert.architectures import build_classifier

    seg_hw = analyzer.segmenter.members[0].model.input_hw
    cls_size = analyzer.classifier.input_size if analyzer.classifier else 96
    # The paper's IRV2 needs >= 75 px inputs; the shipped crop size is used when it allows.
    cls_size = max(cls_size, 75)
    n_classes = len(analyzer.classifier.classes) if analyzer.classifier else 5
    specs = [
        ("unet_efficientnetb2", lambda: _unet("efficientnetb2", seg_hw)),
        ("unet_efficientnetb7", lambda: _unet("efficientnetb7", seg_hw)),
        ("unet_inceptionresnetv2", lambda: _unet("inceptionresnetv2", seg_hw)),
        (
            "cls_inceptionresnetv2",
            lambda: build_classifier("inceptionresnetv2", cls_size, n_classes),
        ),
    ]
    times: dict[str, float] = {}
    models = []
    with tempfile.TemporaryDirectory() as td:
        for name, make in specs:
            m = make()
            params = m.count_params()
            path = Path(td) / f"{name}.keras"
            m.save(path)
            size_mb = path.stat().st_size / 2**20
            del m
            t = time.perf_counter()
            m = keras.models.load_model(path, compile=False)
            times[name] = (time.perf_counter() - t) * 1000.0
            print(f"  {name}: {params / 1e6:.1f} M parameters, {size_mb:.0f} MB file, "
                  f"load {times[name]:.0f} ms", flush=True)  # fmt: skip
            models.append(KerasModel(m, name))
    return times, models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument(
        "--image", type=Path, default=None, help="field (default: the bundled bench field)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10, help="timed runs of the paper pipeline")
    ap.add_argument("--edge-runs", type=int, default=50, help="timed runs of the edge pipeline")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    # The edge bench runs with cwd=ROOT: a path relative to where this script was started
    # would name another file there (or none), so both sides get the same absolute one.
    args.models = args.models.expanduser().absolute()
    if args.image is not None:
        args.image = args.image.expanduser().absolute()
    return args


def main() -> None:
    args = parse_args()

    print(f"edge pipeline (edge-wbc bench, LiteRT int8, {args.threads} threads):", flush=True)
    edge = run_edge(args)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from edge_wbc.cli.analyze import BENCH_FIELD
    from edge_wbc.config import load_config
    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.pipeline.classify import CellClassifier
    from edge_wbc.pipeline.imageio import read_image
    from edge_wbc.pipeline.results import CLASSES
    from edge_wbc.pipeline.segment import EnsembleSegmenter, Member

    cfg = load_config(None, env={}).replace(
        models_dir=str(args.models), models_threads=args.threads
    )
    analyzer = FieldAnalyzer.from_config(cfg)
    print(
        f"\npaper pipeline (float Keras, TensorFlow {tf.__version__}, {args.threads} threads):",
        flush=True,
    )
    rss0 = peak_rss_mb()
    load_times, (b2, b7, irv2, cls) = build_paper(args, analyzer)
    # The paper averages its three U-Nets; the shipped weights belong to the shipped models
    # (one may be 0 and skipped), so the paper side votes with equal weights: all three run.
    weights = [1.0, 1.0, 1.0]
    analyzer.segmenter = EnsembleSegmenter(
        [
            Member(b2.name, b2, weights[0], "probabilities"),
            Member(b7.name, b7, weights[1], "probabilities"),
            Member(irv2.name, irv2, weights[2], "probabilities"),
        ],
        analyzer.segmenter.threshold,
    )
    classes = analyzer.classifier.classes if analyzer.classifier else CLASSES
    analyzer.classifier = CellClassifier(cls, classes, 1.0, 0.0, "probabilities")

    rgb = read_image(args.image or BENCH_FIELD)
    # Untrained segmenters output noise, which would make the postprocess and classify times
    # depend on that noise. So the paper's ensemble is timed on the field, and its classifier
    # on the crops of the cells the shipped ensemble finds (the same number of crops on both
    # sides); the model-free stages are the shared code's.
    stages: dict[str, list[float]] = {}
    ref = FieldAnalyzer.from_config(cfg)
    n_cells = len(ref.analyze(rgb).cells)
    for i in range(args.warmup + args.runs):
        t = time.perf_counter()
        res = ref.analyze(rgb)  # pipeline minus models, with real cells
        seg_t = time.perf_counter()
        analyzer.segmenter.probability(rgb)  # the paper ensemble on this field
        seg_ms = (time.perf_counter() - seg_t) * 1000.0
        cls_t = time.perf_counter()
        for c in res.cells:
            analyzer.classifier.classify(c.crop)  # type: ignore[arg-type]
        cls_ms = (time.perf_counter() - cls_t) * 1000.0
        total = (
            (time.perf_counter() - t) * 1000.0
            - res.timing_ms["segment"]
            - res.timing_ms["classify"]
        )
        if i >= args.warmup:
            for k, v in (
                ("preprocess", res.timing_ms["preprocess"]),
                ("segment", seg_ms),
                ("postprocess", res.timing_ms["postprocess"]),
                ("classify", cls_ms),
                ("quality", res.timing_ms["quality"]),
                ("total", total),
            ):
                stages.setdefault(k, []).append(v)
    for m in (b2, b7, irv2):
        x = np.random.default_rng(0).random((*m.input_hw, 3)).astype(np.float32)
        for _ in range(args.runs):
            t = time.perf_counter()
            m.infer(x)
            stages.setdefault(f"  segmenter {m.name}", []).append(
                (time.perf_counter() - t) * 1000.0
            )
    x = np.random.default_rng(0).random((*cls.input_hw, 3)).astype(np.float32)
    for _ in range(args.runs):
        t = time.perf_counter()
        cls.infer(x)
        stages.setdefault(f"  classifier {cls.name} (1 crop)", []).append(
            (time.perf_counter() - t) * 1000.0
        )
    paper_rss = peak_rss_mb()

    def med(v: list[float]) -> tuple[float, float]:
        return float(np.median(v)), float(np.percentile(v, 90))

    print(
        f"\nfield: {(args.image or BENCH_FIELD).name}, {n_cells} cell(s); "
        f"paper side {args.runs} runs, edge side {args.edge_runs} runs"
    )
    print(
        f"{'stage (edge model / paper model)':<72} {'edge int8 med':>13} "
        f"{'paper float med':>15} {'ratio':>7}"
    )
    print("-" * 110)
    edge_st = edge["stages_ms"]
    rows = []
    for k in ("preprocess", "segment", "postprocess", "classify", "quality", "total"):
        e = edge_st.get(k, {}).get("median", float("nan"))
        p = med(stages[k])[0]
        rows.append((k, e, p))
    for (ek, ev), (pk, pv) in zip(
        [(k, v) for k, v in edge_st.items() if k.startswith("  ")],
        [(k, v) for k, v in stages.items() if k.startswith("  ")],
        strict=False,
    ):
        rows.append((f"{ek.strip()} / {pk.strip().split(' ', 1)[1]}", ev["median"], med(pv)[0]))
    for name, e, p in rows:
        print(f"{name:<72} {e:>13.2f} {p:>15.2f} {p / e if e else float('nan'):>6.1f}x")
    print("-" * 110)
    edge_load = edge["load_ms"]
    paper_load = sum(load_times.values())
    print(
        f"{'model load (ms)':<72} {edge_load:>13.0f} {paper_load:>15.0f} "
        f"{paper_load / edge_load:>6.1f}x"
    )
    print(
        f"{'peak RSS (MB, whole process)':<72} {edge['peak_rss_mb']:>13.0f} {paper_rss:>15.0f} "
        f"{paper_rss / edge['peak_rss_mb']:>6.1f}x"
    )
    print(
        f"(paper side RSS before building its models: {rss0:.0f} MB: TensorFlow + the edge "
        "analyzers used for the non-model stages)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "edge": edge,
                    "paper": {
                        "stages_ms": {
                            k: {"median": med(v)[0], "p90": med(v)[1]} for k, v in stages.items()
                        },
                        "load_ms": load_times,
                        "peak_rss_mb": paper_rss,
                        "tensorflow": tf.__version__,
                    },
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
