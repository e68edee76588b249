"""Fitting the fine-class head on cached embeddings (edge_wbc_convert.fine).

Two candidates, chosen on val:

* ``flat``: multinomial logistic regression over the ten classes on the embedding, its weights
  pulled toward the shipped head's (neutrophil's column for band and segmented, ``other``'s for
  the four non-five-part classes) by an L2 penalty whose strength is chosen on val;
* ``hier``: the shipped six-class probabilities times a split of neutrophil into band /
  segmented and of ``other`` into immature granulocyte / erythroblast / platelet / other, each
  split a logistic regression on the embedding.

Cells with a coarse label (a five-part ``neutrophil``, a BCCD box that is a red cell or a
platelet) train with the set of fine classes they allow: the loss is -log of the summed
probability of that set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from edge_wbc_convert.fine import ALLOWED, FINE, FIVE_OF
from scipy.optimize import minimize
from scipy.special import logsumexp

if TYPE_CHECKING:
    from edge_wbc.pipeline.heads import LinearHead

log = logging.getLogger(__name__)
K = len(FINE)
SHIPPED6 = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte", "other")
#: Fine class -> the shipped class whose head column starts it.
PARENT = {
    "band_neutrophil": "neutrophil",
    "segmented_neutrophil": "neutrophil",
    "immature_granulocyte": "other",
    "erythroblast": "other",
    "platelet": "other",
} | {c: c for c in SHIPPED6 if c != "neutrophil"}
#: Fine classes that leave the count (edge_wbc.taxonomy's non_wbc group among the outputs).
NON_WBC = ("platelet", "other")
#: Class weight of a source in the loss (the classifier's CropSampler.SOURCE_WEIGHT).
SOURCE_WEIGHT = {"pbc": 0.5, "bccd": 0.25, "zheng1": 0.15, "zheng2": 0.1, "raabin": 0.2}


def allowed_mask(labels: list[str]) -> np.ndarray:
    m = np.zeros((len(labels), K), bool)
    for i, lab in enumerate(labels):
        for c in ALLOWED[lab]:
            m[i, FINE.index(c)] = True
    return m


def balanced_weights(sources: list[str], labels: list[str]) -> np.ndarray:
    """Each source gets its weight in total, split evenly over the labels it has."""
    w = np.zeros(len(labels))
    pairs: dict[tuple[str, str], int] = {}
    for s, lab in zip(sources, labels, strict=True):
        pairs[(s, lab)] = pairs.get((s, lab), 0) + 1
    n_lab = {s: sum(1 for p in pairs if p[0] == s) for s in set(sources)}
    for i, (s, lab) in enumerate(zip(sources, labels, strict=True)):
        w[i] = SOURCE_WEIGHT[s] / (n_lab[s] * pairs[(s, lab)])
    return w * len(w) / w.sum()


def prior_head(w6: np.ndarray, b6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shipped head's columns spread over the fine classes."""
    idx = [SHIPPED6.index(PARENT[c]) for c in FINE]
    return w6[:, idx].copy(), b6[idx].copy()


def set_nll(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """-log P(true class in the allowed set) per row, from logits."""
    return logsumexp(z, axis=1) - logsumexp(np.where(mask, z, -np.inf), axis=1)


def flat_objective(
    x: np.ndarray, mask: np.ndarray, weight: np.ndarray, w0: np.ndarray, lam: float
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """theta = (W ravelled, b) -> (sum_i w_i set_nll_i / sum w + lam ||W - W0||^2, gradient)."""
    d, k = w0.shape
    ws = weight / weight.sum()

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: d * k].reshape(d, k)
        b = theta[d * k :]
        z = x @ w + b
        lse = logsumexp(z, axis=1)
        zm = np.where(mask, z, -np.inf)
        lsm = logsumexp(zm, axis=1)
        loss = float(ws @ (lse - lsm)) + lam * float(((w - w0) ** 2).sum())
        p = np.exp(z - lse[:, None])
        q = np.where(mask, np.exp(zm - lsm[:, None]), 0.0)
        g = (p - q) * ws[:, None]
        gw = x.T @ g + 2 * lam * (w - w0)
        return loss, np.concatenate([gw.ravel(), g.sum(0)])

    return f


def fit_flat(
    x: np.ndarray,
    mask: np.ndarray,
    weight: np.ndarray,
    w0: np.ndarray,
    b0: np.ndarray,
    lam: float,
    maxiter: int = 400,
) -> tuple[np.ndarray, np.ndarray]:
    """argmin of flat_objective (bias free), L-BFGS from the prior. Any number of classes (the
    columns of ``w0``)."""
    d, k = w0.shape
    f = flat_objective(x, mask, weight, w0, lam)
    theta0 = np.concatenate([w0.ravel(), b0])
    r = minimize(
        f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": maxiter, "maxfun": 2 * maxiter}
    )
    log.info("%d classes, lam=%g: loss %.4f after %d iterations", k, lam, r.fun, r.nit)
    return r.x[: d * k].reshape(d, k), r.x[d * k :]


@dataclass
class Split:
    x: np.ndarray  # embeddings
    p6: np.ndarray  # shipped calibrated probabilities
    mask: np.ndarray  # allowed fine classes
    source: list[str]
    label: list[str]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(z: np.ndarray, mask: np.ndarray) -> float:
    """Temperature minimising the set NLL of softmax(z / T) (grid, as cls_eval does)."""
    best_t, best = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.3), np.log(5.0), 60)):
        v = float(set_nll(z / t, mask).mean())
        if v < best:
            best_t, best = float(t), v
    return best_t


def group_score(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top fine class, the probability of its counting group) per row: band and segmented are
    one neutrophil, platelet and other one non-leukocyte, so doubt between them is not doubt
    about what the cell counts as."""
    top = p.argmax(1)
    groups = [
        [FINE.index("band_neutrophil"), FINE.index("segmented_neutrophil")],
        [FINE.index("platelet"), FINE.index("other")],
    ]
    score = p[np.arange(len(p)), top].copy()
    for g in groups:
        s = p[:, g].sum(1)
        sel = np.isin(top, g)
        score[sel] = s[sel]
    return top, score


def prf(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, float]:
    tp = int(((pred == k) & (y == k)).sum())
    fp = int(((pred == k) & (y != k)).sum())
    fn = int(((pred != k) & (y == k)).sum())
    pr = tp / (tp + fp) if tp + fp else 0.0
    rc = tp / (tp + fn) if tp + fn else 0.0
    return {
        "precision": pr,
        "recall": rc,
        "f1": 2 * pr * rc / (pr + rc) if pr + rc else 0.0,
        "support": int((y == k).sum()),
    }


def report(
    p: np.ndarray, labels: list[str], thr: float, group_rule: bool, other_thr: float | None = None
) -> dict:
    """Per-class metrics on cells with a fine label (-1 rows: coarse labels, five-part only),
    five-part accuracy on named cells and the unidentified share under threshold ``thr``
    (and ``other_thr`` for the classes that leave the count, as the device decides)."""
    top, score = group_score(p) if group_rule else (p.argmax(1), p.max(1))
    nonw = np.isin(top, [FINE.index(c) for c in NON_WBC])
    named = (score >= thr) & (~nonw | (score >= max(thr, other_thr or 0.0)))
    y = np.array([FINE.index(lab) if lab in FINE else -1 for lab in labels])
    five_true = [FIVE_OF.get(lab, lab if lab == "neutrophil" else None) for lab in labels]
    five_pred = [FIVE_OF.get(FINE[t]) for t in top]
    # "unidentified" among leukocytes of the five types (what the differential loses to review)
    leuko = np.array([f is not None for f in five_true])
    ok5 = np.array([a == b for a, b in zip(five_true, five_pred, strict=True)])
    pred_u = np.where(named, top, -2)  # -2: unidentified
    out: dict = {
        "n": len(labels),
        "n_leukocytes": int(leuko.sum()),
        "unidentified_rate": float((~named).mean()) if len(labels) else 0.0,
        "five_part_accuracy_named": (
            float(ok5[leuko & named].mean()) if (leuko & named).any() else 0.0
        ),
        "five_part_accuracy_top1": float(ok5[leuko].mean()) if leuko.any() else 0.0,
        "leukocytes_dropped": float((leuko & named & nonw).sum() / max(int(leuko.sum()), 1)),
        "per_class": {},
    }
    fine = y >= 0
    for k, c in enumerate(FINE):
        if (y == k).any():
            out["per_class"][c] = prf(y[fine], pred_u[fine], k)
    return out


def load_splits(cache: Path) -> dict[str, Split]:
    """Train / val / test cells of every cached source (cells with no box found left out)."""
    from edge_wbc_convert.fine import _load

    out: dict[str, Split] = {}
    sets = []
    for name in ("pbc", "boxes"):
        cs = _load(cache / name)
        if cs is None:
            raise FileNotFoundError(f"no cached cells {cache / name}.npz: run embed-cells")
        sets.append((name, cs))
    for split in ("train", "val", "test"):
        xs, ps, srcs, labs = [], [], [], []
        for name, cs in sets:
            m = cs.rows(split)
            xs.append(cs.emb[m])
            ps.append(cs.p6[m])
            for lab, keep in zip(cs.label, m, strict=True):
                if not keep:
                    continue
                src, _, lab2 = lab.rpartition(":") if name == "boxes" else ("pbc", "", lab)
                srcs.append(src)
                labs.append(lab2)
        out[split] = Split(
            np.concatenate(xs).astype(np.float64),
            np.concatenate(ps).astype(np.float64),
            allowed_mask(labs),
            srcs,
            labs,
        )
    return out


def fit_thresholds(
    p: np.ndarray,
    labels: list[str],
    sources: list[str],
    group_rule: bool,
    max_unidentified: float = 0.04,
    max_dropped: float = 0.005,
) -> tuple[float, float]:
    """(confidence, other) thresholds on val, as cls_eval fits them: at most
    ``max_unidentified`` of PBC val unidentified; at most ``max_dropped`` of val leukocytes
    (every source) called platelet/other confidently enough to leave the count."""
    top, score = group_score(p) if group_rule else (p.argmax(1), p.max(1))
    pbc = np.array([s == "pbc" for s in sources])
    conf = float(np.quantile(score[pbc], max_unidentified)) if pbc.any() else 0.0
    leuko = np.array([lab in FIVE_OF or lab == "immature_granulocyte" for lab in labels])
    nonw = np.isin(top, [FINE.index(c) for c in NON_WBC])
    wrong = np.sort(score[leuko & nonw])[::-1]
    allowed = int(np.floor(max_dropped * max(int(leuko.sum()), 1)))
    if len(wrong) <= allowed:
        return conf, conf
    return conf, float(min(1.0, max(conf, np.nextafter(wrong[allowed], 2.0))))


def summary(
    p: np.ndarray, sp: Split, conf: float, group_rule: bool, other_thr: float | None = None
) -> dict:
    """Val/test numbers of one candidate: PBC per class, and five-part per source."""
    out: dict = {}
    for src in sorted(set(sp.source)):
        m = np.array([s == src for s in sp.source])
        labs = [lab for lab, k in zip(sp.label, m, strict=True) if k]
        out[src] = report(p[m], labs, conf, group_rule, other_thr)
    return out


def macro_f1(rep: dict) -> float:
    return float(np.mean([v["f1"] for v in rep["per_class"].values()]))


# ----------------------------------------------------------------------------- mixture

#: What each shipped class splits into in the mixture head: immature granulocytes and
#: erythroblasts are taken out of `other` only (hiding them also in neutrophil / lymphocyte
#: lowered Zheng 2 val five-part accuracy on named cells: runs of 2026-12-01).
MIXTURE_SPLITS: dict[str, tuple[str, ...]] = {
    "neutrophil": ("band_neutrophil", "segmented_neutrophil"),
    "eosinophil": ("eosinophil",),
    "basophil": ("basophil",),
    "lymphocyte": ("lymphocyte",),
    "monocyte": ("monocyte",),
    "other": ("immature_granulocyte", "erythroblast", "platelet", "other"),
}
#: Fine classes the shipped classifier has no output for; their groups get their own threshold.
REFINED = ("immature_granulocyte", "erythroblast")


def mixture_labels(
    head: LinearHead, x: np.ndarray, p6: np.ndarray, named: bool = True
) -> list[str]:
    """Each cell's label from a mixture head (edge_wbc.pipeline.heads.LinearHead) as the device
    decides it; ``named=False``: the top group's class whatever its probability (top-1)."""
    from dataclasses import replace

    if not named:
        head = replace(head, confidence_threshold=0.0, other_threshold=0.0,
                       group_thresholds={})  # fmt: skip
    q = head.mixture_probs(x, p6)
    return [head.decide_groups(row)[0] for row in q]


def _five(label: str) -> str | None:
    return FIVE_OF.get(label)


def label_report(truth: list[str], named: list[str], top1: list[str]) -> dict:
    """report()'s numbers from labels: per fine class (unidentified counts against recall),
    five-part top-1 and on named, the unidentified share among the five types' leukocytes."""
    t5 = [_five(t) for t in truth]
    le = [i for i, t in enumerate(t5) if t is not None]
    nm = [i for i in le if named[i] != "unidentified"]
    out: dict = {
        "n": len(truth),
        "n_leukocytes": len(le),
        "unidentified_rate": 1 - len(nm) / len(le) if le else 0.0,
        "five_part_accuracy_named": (
            float(np.mean([_five(named[i]) == t5[i] for i in nm])) if nm else 0.0
        ),
        "five_part_accuracy_top1": (
            float(np.mean([_five(top1[i]) == t5[i] for i in le])) if le else 0.0
        ),
        "wrong_named": int(sum(_five(named[i]) != t5[i] for i in nm)),
        "per_class": {},
    }
    y = np.array([FINE.index(t) if t in FINE else -1 for t in truth])
    pred = np.array([FINE.index(p) if p in FINE else -2 for p in named])
    fine = y >= 0
    for k, c in enumerate(FINE):
        if (y == k).any():
            out["per_class"][c] = prf(y[fine], pred[fine], k)
    return out


def mixture_summary(head: LinearHead, sp: Split) -> dict:
    return labels_summary(
        sp, mixture_labels(head, sp.x, sp.p6), mixture_labels(head, sp.x, sp.p6, named=False)
    )


def shipped_summary(sp: Split, conf: float, other: float | None) -> dict:
    """The shipped six-class output on the same cells, decided as the device does."""
    from edge_wbc.pipeline.classify import decide

    named = [decide(p, SHIPPED6, conf, other).label for p in sp.p6]
    return labels_summary(sp, named, [SHIPPED6[k] for k in sp.p6.argmax(1)])


def labels_summary(sp: Split, named: list[str], top1: list[str]) -> dict:
    out = {}
    for src in sorted(set(sp.source)):
        m = [i for i, s in enumerate(sp.source) if s == src]
        out[src] = label_report(
            [sp.label[i] for i in m], [named[i] for i in m], [top1[i] for i in m]
        )
    return out


def mixture_ok(mix: dict, shipped: dict) -> bool:
    """The selection constraint: on every source but PBC, five-part accuracy on named no worse
    than the shipped output's, and unidentified not lower where that accuracy would drop."""
    for src, s in shipped.items():
        if src == "pbc":
            continue
        m = mix[src]
        if m["five_part_accuracy_named"] < s["five_part_accuracy_named"] - 1e-12:
            return False
        if m["five_part_accuracy_top1"] < s["five_part_accuracy_top1"] - 1e-12:
            return False
    return True
