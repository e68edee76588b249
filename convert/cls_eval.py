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


def keras_logits(model: Any, xs: np.ndarray, views: int = 1, batch: int = 16) -> np.ndarray:
    """The float model's logits per crop, views combined as the device combines them.

    Batched although the graph is declared with batch 1 (Keras 3 calls a functional model on
    any batch): one eager call per view cost ~0.18 s here, most of release-classifier's 31 min.
    """
    from edge_wbc.pipeline.classify import combine_views, crop_views

    rows: list[np.ndarray] = []
    for i in range(0, len(xs), batch):
        vs = [crop_views(x, views) for x in xs[i : i + batch]]
        out = np.asarray(model(np.stack([v for per in vs for v in per]), training=False))
        out = out.reshape(len(vs), len(vs[0]), -1)
        rows += [combine_views(list(o), PROBS) for o in out]
    if not rows:
        return np.zeros((0, int(model.output.shape[-1])), np.float32)
    return np.stack(rows)


def calibrate(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The device's calibrated softmax (edge_wbc.pipeline.classify.calibrated_softmax)."""
    from edge_wbc.pipeline.classify import calibrated_softmax

    return np.stack([calibrated_softmax(v, temperature) for v in logits])


def fit_other_threshold(
    conf_other: np.ndarray, n_leukocytes: int, confidence_threshold: float, max_dropped: float
) -> float:
    """Lowest confidence at which an `other` call may leave the count, such that at most
    ``max_dropped`` of the val leukocytes (every source) would be dropped. ``conf_other``: the
    scores of the val leukocytes the classifier calls `other` (not a leukocyte)."""
    allowed = int(np.floor(max_dropped * max(int(n_leukocytes), 1)))
    if len(conf_other) <= allowed:
        return float(confidence_threshold)
    # Above the (allowed+1)-th most confident wrong `other`, at most `allowed` remain.
    worst = np.sort(np.asarray(conf_other))[::-1]
    return float(min(1.0, max(confidence_threshold, np.nextafter(worst[allowed], 2.0))))


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


def five_projection(classes: Sequence[str]) -> np.ndarray:
    """(K, 5): each output's probability to its five-part type (band + segmented are the
    neutrophil); outputs of no five-part type (other, IG, erythroblast, platelet) to none."""
    from edge_wbc import taxonomy

    m = np.zeros((len(classes), N5))
    for k, c in enumerate(classes):
        g = taxonomy.GROUP_OF.get(c)
        if g in CLASSES:
            m[k, CLASSES.index(g)] = 1.0
    return m


def allowed_matrix(labels: Sequence[str], classes: Sequence[str], allowed: dict) -> np.ndarray:
    """(N, K) True where the output is one the cell's label allows."""
    ok = np.zeros((len(labels), len(classes)), bool)
    for i, lab in enumerate(labels):
        for c in allowed.get(lab, (lab,)):
            ok[i, list(classes).index(c)] = True
    return ok


def fit_temperature(logits: np.ndarray, ok: np.ndarray) -> float:
    """Temperature minimising the NLL of the allowed set (one class: the usual NLL)."""
    best_t, best_nll = 1.0, 1e18
    for t in np.exp(np.linspace(np.log(0.3), np.log(5.0), 60)):
        p = calibrate(logits, float(t))
        nll = -np.mean(np.log(np.clip((p * ok).sum(1), 1e-7, 1)))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def group_of_label(label: str) -> str:
    from edge_wbc import taxonomy

    return {"bccd_other": "non_wbc"}.get(label) or taxonomy.GROUP_OF[label]


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
    classes: Sequence[str] = LABELS6,
    allowed: dict[str, tuple[str, ...]] | None = None,
    group_precision: float = 0.9,
) -> dict[str, Any]:
    """Calibrate on val, measure on test, as the device decides (edge_wbc.pipeline.classify
    .decide: the counting group under the thresholds, its likelier class names the cell).

    ``classes``: the model's outputs (the five-part classifier's six, or the fine ten);
    ``allowed``: label -> the outputs it allows (partial labels: a five-part "neutrophil" is
    band or segmented). Five-part numbers are on the five types' group sums, so the two kinds
    of classifier read alike; a fine classifier adds a per-class table on its fine labels.
    """
    from edge_wbc import taxonomy
    from edge_wbc.pipeline.classify import decide

    classes = tuple(classes)
    allowed = allowed or {c: (c,) for c in classes}
    proj = five_projection(classes)
    fine = classes != LABELS6

    def decisions(p: np.ndarray, thr: float, other: float | None, gthr: dict) -> list:
        return [decide(v, classes, thr, other, gthr) for v in p]

    def group(label: str) -> str:
        return taxonomy.GROUP_OF.get(label, label)

    lv = [c.label for c in val]
    gv = [group_of_label(x) for x in lv]
    pv = tflite_logits(tflite, crops(val, size), views)
    temperature = fit_temperature(pv, allowed_matrix(lv, classes, allowed))
    cv = calibrate(pv, temperature)
    # The device's score is its group's probability: thresholds are fitted on that.
    score_v = np.array([d.score for d in decisions(cv, 0.0, 0.0, {})])
    pbc_v = np.array([c.source == "pbc" for c in val])
    five_v = np.array([g in CLASSES for g in gv])
    conf_v = score_v[pbc_v & five_v] if (pbc_v & five_v).any() else score_v
    threshold = float(np.quantile(conf_v, max_unidentified))
    # Leaving the count as `other` (non_wbc): at most max_dropped of val leukocytes.
    leuko = np.array([taxonomy.GROUPS.get(g, ("", ()))[0] == taxonomy.COUNTED for g in gv])
    d0 = decisions(cv, 0.0, 0.0, {})
    non = np.array([group(d.label) == "non_wbc" for d in d0])
    other_thr = fit_other_threshold(score_v[leuko & non], int(leuko.sum()), threshold, max_dropped)
    # Groups the five-part classifier had no output for: named at a lower probability where
    # val says they stay precise (group_precision), rather than sent to review.
    gthr: dict[str, float] = {}
    for g in ("immature_granulocyte", "nrbc"):
        if not any(group(c) == g for c in classes):
            continue
        for t in np.linspace(0.5, threshold, 20):
            called = np.array([group(d.label) == g and d.score >= t for d in d0])
            if called.sum() >= 10 and np.mean([gv[i] == g for i in np.flatnonzero(called)]) >= (
                group_precision
            ):
                if t < threshold:
                    gthr[g] = float(t)
                break
    log.info(
        "temperature %.3f, confidence threshold %.3f, other threshold %.3f, groups %s",
        temperature, threshold, other_thr, gthr,
    )  # fmt: skip
    report: dict[str, Any] = {
        "classes": list(classes),
        "calibration": {
            "temperature": temperature,
            "confidence_threshold": threshold,
            "other_threshold": other_thr,
            "group_thresholds": gthr,
            "views": views,
            "fitted_on": "fitted on val: at most 4 % of PBC val leukocytes unidentified, at "
            f"most {max_dropped:.1%} of val leukocytes leave the count as `other`"
            + (
                f"; a group's own threshold where val precision stays >= {group_precision:.0%}"
                if gthr
                else ""
            ),
        },
        "test": {},
        "label_error_candidates": [],
        "shifts_pbc_test": {},
    }
    xt = crops(test, size)
    lt = [c.label for c in test]
    gt = [group_of_label(x) for x in lt]
    yt = np.array([CLASSES.index(g) if g in CLASSES else N5 for g in gt])
    pt = calibrate(tflite_logits(tflite, xt, views), temperature)
    dt = decisions(pt, threshold, other_thr, gthr)
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
        y5 = yt[five]
        p5 = pt[five] @ proj
        pred5 = p5.argmax(1)
        acc = float((pred5 == y5).mean()) if five.any() else float("nan")
        dec5 = [dt[i] for i in np.flatnonzero(five)]
        named = np.array([d.label != "unidentified" for d in dec5], bool)
        right = np.array([group(d.label) == CLASSES[y] for d, y in zip(dec5, y5, strict=True)])
        conf = np.array([d.score for d in dec5])
        entry = {
            "n": int(five.sum()),
            "accuracy_5class": acc,
            "macro_f1": float(
                np.mean([v["f1"] for k, v in prf(y5, pred5, CLASSES).items() if v["support"]])
            )
            if five.any()
            else float("nan"),
            "per_class": prf(y5, pred5, CLASSES),
            "unidentified_rate": float(1 - named.mean()) if five.any() else 0.0,
            "accuracy_identified": float(right[named].mean()) if named.any() else float("nan"),
            "predicted_other_rate": float(
                np.mean([group(classes[int(v.argmax())]) not in CLASSES for v in pt[five]])
            )
            if five.any()
            else 0.0,
            # What the device does at the shipped thresholds: leukocytes that leave the count.
            "dropped_as_other_rate": float(
                np.mean([taxonomy.kind_of(d.label) == taxonomy.COUNT_ONLY for d in dec5])
            )
            if five.any()
            else 0.0,
        }
        if kt is not None:
            entry["float_accuracy_5class"] = float(
                ((calibrate(kt[five], temperature) @ proj).argmax(1) == y5).mean()
            )
        o = m & np.array([g == "non_wbc" for g in gt])
        if o.any():
            dec_o = [dt[i] for i in np.flatnonzero(o)]
            entry["other_recall"] = float(
                np.mean([group(classes[int(v.argmax())]) == "non_wbc" for v in pt[o]])
            )
            entry["other_recall_at_threshold"] = float(
                np.mean([group(d.label) == "non_wbc" for d in dec_o])
            )
            entry["n_other"] = int(o.sum())
        if fine and s == "pbc":
            entry["fine"] = fine_table(
                [lt[i] for i in np.flatnonzero(m)], [dt[i] for i in np.flatnonzero(m)], classes
            )
        report["test"][s] = entry
        if five.any():
            plot_confusion(
                confusion(y5, pred5, N5),
                CLASSES,
                f"{s} test (int8)",
                out_dir / f"confusion_{s}.png",
            )
            curves[s] = coverage_curve(p5, y5)
            thr_cov[s] = float(named.mean())
        # Confident disagreements on small public sets are often label errors: list them.
        if s != "pbc":
            idx = np.where(five)[0]
            for j, i in enumerate(idx):
                if pred5[j] != y5[j]:
                    errors.append(
                        (
                            xt[i],
                            f"{s} {Path(test[i].image).stem}\n{CLASSES[y5[j]][:5]} -> "
                            f"{CLASSES[pred5[j]][:5]} {conf[j]:.2f}",
                        )
                    )
                if pred5[j] != y5[j] and conf[j] >= 0.9:
                    report["label_error_candidates"].append(
                        {
                            "source": s,
                            "image": Path(test[i].image).name,
                            "box": list(test[i].box),
                            "label": CLASSES[y5[j]],
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
    pbc = [c for c in test if c.source == "pbc" and group_of_label(c.label) in CLASSES]
    if pbc:
        y = np.array([CLASSES.index(group_of_label(c.label)) for c in pbc])

        def five_acc(shift: Callable | None) -> float:
            p = calibrate(tflite_logits(tflite, crops(pbc, size, shift), views), temperature)
            return float(((p @ proj).argmax(1) == y).mean())

        report["shifts_pbc_test"]["clean"] = five_acc(None)
        for name, fn in SHIFTS.items():
            report["shifts_pbc_test"][name] = five_acc(fn)
            log.info("shift %s: %.4f", name, report["shifts_pbc_test"][name])
    # Clean accuracy is the test table's: only the casts need another pass.
    report["casts_test"] = {
        s: {"clean": report["test"][s]["accuracy_5class"], **row}
        for s, row in cast_accuracy(tflite, test, size, views, temperature, classes).items()
    }
    return report


def fine_table(labels: Sequence[str], decisions: Sequence[Any], classes: Sequence[str]) -> dict:
    """Per fine class, on cells with a fine label: precision / recall / F1 of the device's
    named label (a cell sent to review counts against recall), the share of the class's cells
    unidentified, and the band / segmented confusion among cells labelled either."""
    out: dict[str, Any] = {"per_class": {}}
    got = [d.label for d in decisions]
    for c in classes:
        lab = np.array([x == c for x in labels])
        if not lab.any():
            continue
        pred = np.array([g == c for g in got])
        tp = int((lab & pred).sum())
        prec = tp / int(pred.sum()) if pred.any() else 0.0
        rec = tp / int(lab.sum())
        out["per_class"][c] = {
            "precision": prec,
            "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "support": int(lab.sum()),
            "unidentified": float(
                np.mean([g == "unidentified" for g, x in zip(got, lab, strict=True) if x])
            ),
        }
    bs = ("band_neutrophil", "segmented_neutrophil")
    cols = [*bs, "other neutrophil-group", "elsewhere", "unidentified"]
    conf = {}
    for r in bs:
        row = dict.fromkeys(cols, 0)
        for x, g in zip(labels, got, strict=True):
            if x != r:
                continue
            if g in bs:
                row[g] += 1
            elif g == "unidentified":
                row["unidentified"] += 1
            elif g == "neutrophil":
                row["other neutrophil-group"] += 1
            else:
                row["elsewhere"] += 1
        conf[r] = row
    out["band_segmented_confusion"] = conf
    return out


def cast_accuracy(
    tflite: Path,
    test: list[CellItem],
    size: int,
    views: int,
    temperature: float,
    classes: Sequence[str] = LABELS6,
) -> dict[str, dict[str, float]]:
    """Five-class accuracy per test source under each of CLASSIFIER_CASTS."""
    out: dict[str, dict[str, float]] = {}
    proj = five_projection(classes)
    for s in sorted({c.source for c in test}):
        cells = [c for c in test if c.source == s and group_of_label(c.label) in CLASSES]
        if not cells:
            continue
        y = np.array([CLASSES.index(group_of_label(c.label)) for c in cells])
        out[s] = {}
        for name, fn in CLASSIFIER_CASTS.items():
            p = calibrate(tflite_logits(tflite, crops(cells, size, fn), views), temperature)
            out[s][name] = float(((p @ proj).argmax(1) == y).mean())
        log.info("casts %s: %s", s, out[s])
    return out
