"""Classifier evaluation: calibration on val, then per source / per class metrics on test,
float vs int8, accuracy vs coverage, colour-shift robustness, suspected label errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from edge_wbc_convert.casts import CLASSIFIER_CASTS
from edge_wbc_convert.cells import LABELS6, CellItem

from edge_wbc.pipeline import preprocess as pp
from edge_wbc.pipeline.results import CLASSES

log = logging.getLogger(__name__)
N5 = len(CLASSES)
PROBS = "probabilities"  # what the classifiers emit (a softmax layer), float and int8 alike

#: The colour shifts of the issue: each applied to the raw image before the device chain.
SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


def _hsv(rgb: np.ndarray, dh: float = 0.0, s: float = 1.0, v: float = 1.0) -> np.ndarray:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + dh * 256) % 256
    hsv[..., 1] *= s
    hsv[..., 2] *= v
    return cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)


SHIFTS.update(
    {
        "hue +0.05": lambda x: _hsv(x, dh=0.05),
        "hue -0.05": lambda x: _hsv(x, dh=-0.05),
        "saturation x0.7": lambda x: _hsv(x, s=0.7),
        "saturation x1.3": lambda x: _hsv(x, s=1.3),
        "brightness +15%": lambda x: _hsv(x, v=1.15),
        "brightness -15%": lambda x: _hsv(x, v=0.85),
        "gaussian blur sigma=1": lambda x: cv2.GaussianBlur(x, (0, 0), 1.0),
    }
)


def crops(cells: Sequence[CellItem], size: int, shift: Callable | None = None) -> np.ndarray:
    out = np.empty((len(cells), size, size, 3), np.float32)
    cache: dict[Path, np.ndarray] = {}
    for i, c in enumerate(cells):
        img = cache.get(c.image)
        if img is None:
            from edge_wbc_convert.data import read_rgb

            img = read_rgb(c.image)
            if shift is not None:
                img = shift(img)
            img = pp.white_balance(img)
            cache = {c.image: img}  # cells of one field are adjacent; keep memory flat
        out[i] = pp.to_unit(pp.cell_crop(img, c.box, size))
    return out


def tflite_logits(path: Path, xs: np.ndarray, views: int = 1) -> np.ndarray:
    """The device's logits per crop: the int8 model on each view, combined as the device
    combines them (edge_wbc.pipeline.classify.crop_views / combine_views)."""
    from edge_wbc.pipeline.classify import combine_views, crop_views
    from edge_wbc.pipeline.inference import TFLiteModel

    m = TFLiteModel(path, threads=2)
    return np.stack(
        [
            combine_views([m.infer(v)[0].reshape(-1) for v in crop_views(x, views)], PROBS)
            for x in xs
        ]
    )


def keras_logits(model: Any, xs: np.ndarray, views: int = 1) -> np.ndarray:
    from edge_wbc.pipeline.classify import combine_views, crop_views

    def one(v: np.ndarray) -> np.ndarray:  # the shipped graph has batch 1
        return np.asarray(model(v[None], training=False))[0]

    return np.stack([combine_views([one(v) for v in crop_views(x, views)], PROBS) for x in xs])


def calibrate(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The device's calibrated softmax (edge_wbc.pipeline.classify.calibrated_softmax)."""
    from edge_wbc.pipeline.classify import calibrated_softmax

    return np.stack([calibrated_softmax(v, temperature) for v in logits])


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    best_t, best_nll = 1.0, 1e18
    for t in np.exp(np.linspace(np.log(0.3), np.log(5.0), 60)):
        p = calibrate(logits, float(t))
        nll = -np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1)))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def fit_other_threshold(
    p: np.ndarray, y: np.ndarray, confidence_threshold: float, max_dropped: float
) -> float:
    """Lowest confidence at which an `other` call may leave the count, such that at most
    ``max_dropped`` of the val leukocytes (five classes, every source) would be dropped."""
    leuko = y < N5
    conf_other = p[leuko].max(1)[p[leuko].argmax(1) == N5]
    allowed = int(np.floor(max_dropped * max(int(leuko.sum()), 1)))
    if len(conf_other) <= allowed:
        return float(confidence_threshold)
    # Above the (allowed+1)-th most confident wrong `other`, at most `allowed` remain.
    worst = np.sort(conf_other)[::-1]
    return float(min(1.0, max(confidence_threshold, np.nextafter(worst[allowed], 2.0))))


def five_class(p: np.ndarray) -> np.ndarray:
    return p[:, :N5].argmax(1)


def prf(y: np.ndarray, pred: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    out = {}
    for k, name in enumerate(labels):
        tp = int(((pred == k) & (y == k)).sum())
        fp = int(((pred == k) & (y != k)).sum())
        fn = int(((pred != k) & (y == k)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        out[name] = {"precision": p, "recall": r, "f1": f, "support": int((y == k).sum())}
    return out


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), int)
    for a, b in zip(y, pred, strict=True):
        m[a, b] += 1
    return m


def plot_confusion(m: np.ndarray, labels: Sequence[str], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(m.shape[0]), labels[: m.shape[0]], fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_crops(
    crops_: Sequence[np.ndarray], titles: Sequence[str], out: Path, cols: int = 8
) -> Path:
    """A contact sheet of crops (unit floats), each with a short title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(crops_))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.35, rows * 1.55), dpi=100)
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < len(crops_):
            ax.imshow(np.clip(crops_[k], 0, 1))
            ax.set_title(titles[k], fontsize=5.5)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_coverage(
    curves: dict[str, list[tuple[float, float]]], thr_cov: dict[str, float], out: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for name, pts in curves.items():
        cov, acc = zip(*pts, strict=True)
        ax.plot(cov, acc, label=name)
        if name in thr_cov:
            ax.axvline(thr_cov[name], ls=":", lw=0.8)
    ax.set_xlabel("coverage (cells not sent to 'unidentified')")
    ax.set_ylabel("accuracy on covered cells")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def coverage_curve(p: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
    conf = p.max(1)
    pred = p.argmax(1)
    order = np.argsort(-conf)
    correct = (pred[order] == y[order]).astype(float)
    n = len(y)
    pts = []
    for frac in np.linspace(0.5, 1.0, 26):
        k = max(1, round(frac * n))
        pts.append((float(k / n), float(correct[:k].mean())))
    return pts


def evaluate_classifier(
    tflite: Path,
    keras_path: Path | None,
    val: list[CellItem],
    test: list[CellItem],
    size: int,
    out_dir: Path,
    max_unidentified: float = 0.04,
    max_dropped: float = 0.005,
    views: int = 1,
) -> dict[str, Any]:
    yv = np.array([LABELS6.index(c.label) for c in val])
    pv = tflite_logits(tflite, crops(val, size), views)
    temperature = fit_temperature(pv, yv)
    cv = calibrate(pv, temperature)
    pbc_v = np.array([c.source == "pbc" for c in val])
    conf_v = cv.max(1)[pbc_v] if pbc_v.any() else cv.max(1)
    threshold = float(np.quantile(conf_v, max_unidentified))
    other_thr = fit_other_threshold(cv, yv, threshold, max_dropped)

    def leaves_count(p: np.ndarray) -> np.ndarray:
        """What the device drops from the differential at the shipped thresholds."""
        return (p.argmax(1) == N5) & (p.max(1) >= other_thr)

    log.info(
        "temperature %.3f, confidence threshold %.3f, other threshold %.3f",
        temperature,
        threshold,
        other_thr,
    )
    report: dict[str, Any] = {
        "calibration": {
            "temperature": temperature,
            "confidence_threshold": threshold,
            "other_threshold": other_thr,
            "views": views,
            "fitted_on": "fitted on val: at most 4 % of PBC val unidentified, at most "
            f"{max_dropped:.1%} of val leukocytes leave the count as `other`",
        },
        "test": {},
        "label_error_candidates": [],
        "shifts_pbc_test": {},
    }
    xt = crops(test, size)
    yt = np.array([LABELS6.index(c.label) for c in test])
    pt = calibrate(tflite_logits(tflite, xt, views), temperature)
    kt = None
    if keras_path is not None and keras_path.exists():
        from edge_wbc_convert.quantize import load_keras

        kt = keras_logits(load_keras(keras_path), xt, views)
    srcs = [c.source for c in test]
    curves, thr_cov = {}, {}
    errors: list[tuple[np.ndarray, str]] = []  # every error on the small sets, to look at
    for s in sorted(set(srcs)):
        m = np.array([t == s for t in srcs])
        five = m & (yt < N5)
        y5, p5 = yt[five], pt[five]
        pred5 = five_class(p5)
        acc = float((pred5 == y5).mean()) if five.any() else float("nan")
        conf = p5.max(1)
        covered = conf >= threshold
        entry = {
            "n": int(five.sum()),
            "accuracy_5class": acc,
            "macro_f1": float(
                np.mean([v["f1"] for k, v in prf(y5, pred5, CLASSES).items() if v["support"]])
            ),
            "per_class": prf(y5, pred5, CLASSES),
            "unidentified_rate": float(1 - covered.mean()) if five.any() else 0.0,
            "accuracy_identified": float((pred5[covered] == y5[covered]).mean())
            if covered.any()
            else float("nan"),
            "predicted_other_rate": float((pt[five].argmax(1) == N5).mean()) if five.any() else 0,
            # What the device does at the shipped thresholds: leukocytes that leave the count.
            "dropped_as_other_rate": float(leaves_count(pt[five]).mean()) if five.any() else 0.0,
        }
        if kt is not None:
            entry["float_accuracy_5class"] = float((five_class(kt[five]) == y5).mean())
        if (m & (yt == N5)).any():
            o = m & (yt == N5)
            entry["other_recall"] = float((pt[o].argmax(1) == N5).mean())
            entry["other_recall_at_threshold"] = float(leaves_count(pt[o]).mean())
            entry["n_other"] = int(o.sum())
        report["test"][s] = entry
        plot_confusion(
            confusion(y5, pred5, N5), CLASSES, f"{s} test (int8)", out_dir / f"confusion_{s}.png"
        )
        curves[s] = coverage_curve(p5[:, :N5], y5)
        thr_cov[s] = float(covered.mean())
        # Confident disagreements on small public sets are often label errors: list them.
        if s != "pbc":
            idx = np.where(five)[0]
            for j, i in enumerate(idx):
                if pred5[j] != y5[j]:
                    errors.append(
                        (
                            xt[i],
                            f"{s} {Path(test[i].image).stem}\n{LABELS6[yt[i]][:5]} -> "
                            f"{CLASSES[pred5[j]][:5]} {conf[j]:.2f}",
                        )
                    )
                if pred5[j] != y5[j] and conf[j] >= 0.9:
                    report["label_error_candidates"].append(
                        {
                            "source": s,
                            "image": Path(test[i].image).name,
                            "box": list(test[i].box),
                            "label": LABELS6[yt[i]],
                            "predicted": CLASSES[pred5[j]],
                            "confidence": float(conf[j]),
                        }
                    )
    plot_coverage(curves, thr_cov, out_dir / "accuracy_vs_coverage.png")
    if errors:
        err_crops, err_titles = zip(*errors, strict=True)
        plot_crops(err_crops, err_titles, out_dir / "errors_small_sets.png")
        report["errors_small_sets_figure"] = "errors_small_sets.png"
    report["coverage_curves"] = curves
    pbc = [c for c in test if c.source == "pbc" and c.label in CLASSES]
    if pbc:
        y = np.array([LABELS6.index(c.label) for c in pbc])
        clean = five_class(calibrate(tflite_logits(tflite, crops(pbc, size), views), temperature))
        report["shifts_pbc_test"]["clean"] = float((clean == y).mean())
        for name, fn in SHIFTS.items():
            p = calibrate(tflite_logits(tflite, crops(pbc, size, fn), views), temperature)
            report["shifts_pbc_test"][name] = float((five_class(p) == y).mean())
            log.info("shift %s: %.4f", name, report["shifts_pbc_test"][name])
    # Clean accuracy is the test table's: only the casts need another pass.
    report["casts_test"] = {
        s: {"clean": report["test"][s]["accuracy_5class"], **row}
        for s, row in cast_accuracy(tflite, test, size, views, temperature).items()
    }
    return report


def cast_accuracy(
    tflite: Path, test: list[CellItem], size: int, views: int, temperature: float
) -> dict[str, dict[str, float]]:
    """Five-class accuracy per test source under each of CLASSIFIER_CASTS."""
    out: dict[str, dict[str, float]] = {}
    for s in sorted({c.source for c in test}):
        cells = [c for c in test if c.source == s and c.label in CLASSES]
        if not cells:
            continue
        y = np.array([LABELS6.index(c.label) for c in cells])
        out[s] = {}
        for name, fn in CLASSIFIER_CASTS.items():
            p = calibrate(tflite_logits(tflite, crops(cells, size, fn), views), temperature)
            out[s][name] = float((five_class(p) == y).mean())
        log.info("casts %s: %s", s, out[s])
    return out
