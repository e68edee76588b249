"""The lab head: fit, held-out validation, refusal, and the versioned folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_wbc.pipeline import adaptation as A

CLASSES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte", "other")
D = 24


def _prototypes(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, (len(CLASSES), D))


def _head(
    protos: np.ndarray, sha: str = "a" * 64, groups: dict[str, str] | None = None
) -> A.BaseHead:
    # nearest prototype: the shipped head is right on cells that look as it learnt them
    W = 5.0 * protos
    b = -0.5 * np.sum(W * protos, axis=1)
    return A.BaseHead(CLASSES, W, b, 1.0, 0.9, 0.9, sha, groups or {})


def _lab(
    rng: np.random.Generator, protos: np.ndarray, per_class: dict[str, int], shift: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Cells of a lab whose stain makes basophils look like lymphocytes and lymphocytes like
    monocytes to the shipped head, but keeps a lab-specific feature that tells them apart."""
    E, y = [], []
    for c, n in per_class.items():
        k = CLASSES.index(c)
        mu = protos[k].copy()
        if shift and c == "basophil":
            mu = 0.3 * mu + 0.7 * protos[CLASSES.index("lymphocyte")]
            mu[0] += 0.8
        if shift and c == "lymphocyte":
            mu = 0.4 * mu + 0.6 * protos[CLASSES.index("monocyte")]
            mu[1] += 0.8
        E.append(mu + rng.normal(0, 0.12, (n, D)))
        y += [c] * n
    return np.concatenate(E), y


COUNTS = {"neutrophil": 40, "eosinophil": 20, "basophil": 20, "lymphocyte": 40, "monocyte": 20}


def test_fit_on_a_shifted_lab_is_accepted_and_better_held_out() -> None:
    rng = np.random.default_rng(1)
    protos = _prototypes(rng)
    head = _head(protos)
    E, y = _lab(rng, protos, COUNTS)
    fit = A.fit_adaptation(E, y, head)
    v = fit.validation
    assert fit.accepted, fit.reason
    assert v["adapted"]["top1"] > v["shipped"]["top1"] + 0.1
    assert (
        v["adapted"]["per_class"]["basophil"]["top1"]
        > v["shipped"]["per_class"]["basophil"]["top1"]
    )
    # new cells of the same lab: the fitted head carries over
    E2, y2 = _lab(np.random.default_rng(2), protos, COUNTS)
    M2 = A.label_masks(y2, head)
    p = A.softmax((E2 @ fit.W.T + fit.b) / fit.temperature)
    assert (
        A.metrics(p, M2, y2, fit.confidence_threshold, head=head)["top1"]
        > A.metrics(A.base_probs(E2, head), M2, y2, head.confidence_threshold, head=head)["top1"]
    )


def test_shuffled_labels_are_refused() -> None:
    rng = np.random.default_rng(3)
    protos = _prototypes(rng)
    head = _head(protos)
    E, y = _lab(rng, protos, COUNTS)
    refused = 0
    for seed in range(5):
        shuffled = list(np.random.default_rng(seed).permutation(y))
        fit = A.fit_adaptation(E, shuffled, head)
        refused += not fit.accepted
        if not fit.accepted:
            assert any(
                w in fit.reason for w in ("not better", "agrees with only", "class by class")
            ), fit.reason
    assert refused == 5


def test_no_shift_means_nothing_to_gain() -> None:
    rng = np.random.default_rng(4)
    protos = _prototypes(rng)
    head = _head(protos)
    E, y = _lab(rng, protos, COUNTS, shift=False)
    fit = A.fit_adaptation(E, y, head)
    assert not fit.accepted
    assert "not better" in fit.reason


def test_bad_labels_are_clear_errors() -> None:
    rng = np.random.default_rng(5)
    protos = _prototypes(rng)
    head = _head(protos)
    E, y = _lab(rng, protos, {"neutrophil": 10, "basophil": 10})
    with pytest.raises(A.AdaptationError, match=r"unknown class name.*'blast'"):
        A.fit_adaptation(E, [*y[:-1], "blast"], head)
    with pytest.raises(A.AdaptationError, match="two classes"):
        A.fit_adaptation(E[:10], y[:10], head)
    with pytest.raises(A.AdaptationError, match="needs 24"):
        A.fit_adaptation(E[:, :10], y, head)


def test_review_only_classes_teach_their_group_and_blasts_are_left_out() -> None:
    from edge_wbc import taxonomy

    rng = np.random.default_rng(12)
    K = len(taxonomy.MODEL_CLASSES)
    head = A.BaseHead(taxonomy.MODEL_CLASSES, rng.normal(size=(K, 6)), np.zeros(K), 1.0, 0.5,
                      0.5, "x")  # fmt: skip
    M = A.label_masks(["myelocyte", "reactive_lymphocyte", "smudge_cell"], head)
    named = [{c for c, m in zip(head.classes, row, strict=True) if m} for row in M]
    assert named == [{"immature_granulocyte"}, {"lymphocyte"}, {"platelet", "other"}]
    why = A.unlearnable("blast", head)
    assert why is not None and "no output for" in why and "abnormal_wbc" in why
    assert A.unlearnable("myelocyte", head) is None
    assert A.unlearnable("blasts", head) is None  # unknown: label_masks names it
    lab = A.LabCells([np.zeros(6)] * 3, ["blast", "neutrophil", "plasma_cell"],
                     ["f1", "f2", "f3"], ["earlier"])  # fmt: skip
    kept = lab.learnable(head)
    assert kept.labels == ["neutrophil"] and kept.keys == ["f2"] and len(kept.embeddings) == 1
    assert kept.skipped[0] == "earlier"
    assert kept.skipped[1].startswith("f1: reviewed as blast") and kept.skipped[2].startswith("f3")
    # the five-part classifier has no immature granulocyte output: a myelocyte teaches it nothing
    five = A.BaseHead(taxonomy.LEGACY_MODEL_CLASSES, rng.normal(size=(6, 6)), np.zeros(6), 1.0,
                      0.5, 0.5, "y")  # fmt: skip
    assert A.unlearnable("myelocyte", five) is not None


def test_too_few_cells_of_a_class_are_said_and_left_as_shipped() -> None:
    rng = np.random.default_rng(6)
    protos = _prototypes(rng)
    head = _head(protos)
    E, y = _lab(rng, protos, {**COUNTS, "eosinophil": 3})
    fit = A.fit_adaptation(E, y, head)
    assert fit.too_few == {"eosinophil": 3}
    k = CLASSES.index("eosinophil")
    np.testing.assert_allclose(fit.W[k], head.W[k], atol=1e-5)
    assert "eosinophil" not in fit.validation["adapted"]["per_class"]


def test_labels_teaching_the_same_class_count_together_toward_the_minimum() -> None:
    rng = np.random.default_rng(7)
    protos = _prototypes(rng)
    head = _head(protos)
    for n, few in ((6, {}), (4, {"lymphocyte+reactive_lymphocyte": 4})):
        E, y = _lab(rng, protos, {**COUNTS, "lymphocyte": n})
        i = y.index("lymphocyte")
        y[i: i + n // 2] = ["reactive_lymphocyte"] * (n // 2)  # a technician's finer call
        fit = A.fit_adaptation(E, y, head)
        assert fit.too_few == few
        assert fit.cells["reactive_lymphocyte"] == n // 2
        assert ("reactive_lymphocyte" in fit.validation["adapted"]["per_class"]) == (not few)


def test_group_name_uses_the_summed_probability_of_its_classes() -> None:
    fine = ("band", "segmented", "eosinophil", "lymphocyte", "other")
    groups = {"band": "neutrophil", "segmented": "neutrophil"}
    head = A.BaseHead(fine, np.zeros((5, 3)), np.zeros(5), 1.0, 0.9, 0.9, "x", groups)
    M = A.label_masks(["neutrophil", "band", "lymphocyte"], head)
    assert M.tolist() == [
        [True, True, False, False, False],
        [True, False, False, False, False],
        [False, False, False, True, False],
    ]
    # the loss of a group label is -log(p_band + p_segmented): uniform logits -> -log(2/5)
    X, z0 = np.ones((1, 3)), np.zeros((1, 5))
    scale = np.ones(4)
    loss, _ = A._loss_grad(
        np.zeros(20), X, z0, M[:1].astype(float), np.ones(1), 0.0, np.eye(5), scale
    )
    assert loss == pytest.approx(-np.log(2 / 5))
    # numerical gradient check on a random point, preconditioned
    rng = np.random.default_rng(0)
    u = rng.normal(size=20)
    args = (
        rng.normal(size=(4, 3)),
        rng.normal(size=(4, 5)),
        M[[0, 1, 2, 0]].astype(float),
        np.full(4, 0.25),
        0.3,
        np.eye(5),  # no rows frozen or tied: the plain gradient
        rng.uniform(0.5, 2.0, 4),
    )
    _, g = A._loss_grad(u, *args)
    eps = 1e-6
    num = np.array(
        [
            (A._loss_grad(u + eps * e, *args)[0] - A._loss_grad(u - eps * e, *args)[0]) / (2 * eps)
            for e in np.eye(len(u))
        ]
    )
    np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-6)


def test_classes_the_labels_never_tell_apart_keep_their_shipped_split() -> None:
    fine = ("band", "segmented", "eosinophil", "lymphocyte", "other")
    groups = {"band": "neutrophil", "segmented": "neutrophil"}
    rng = np.random.default_rng(8)
    W0, b0 = rng.normal(size=(5, 6)), rng.normal(size=5)
    head = A.BaseHead(fine, W0, b0, 1.0, 0.5, 0.5, "x", groups)
    labels = ["neutrophil"] * 20 + ["lymphocyte"] * 20 + ["eosinophil"] * 10
    M = A.label_masks(labels, head)
    tie = A.tie_projection(M, M.any(axis=0))
    # band and segmented move together; "other" (no label allows it) is frozen
    np.testing.assert_allclose(tie[:2, :2], 0.5)
    assert not tie[4].any() and not tie[:, 4].any()
    np.testing.assert_allclose(tie[2:4, 2:4], np.eye(2))
    E = rng.normal(size=(len(labels), 6)) + np.repeat(rng.normal(size=(3, 6)), [20, 20, 10], 0)
    ((W, b),) = A.fit_head(E, M, W0, b0, [1e-2], M.any(axis=0), balanced=False)
    np.testing.assert_allclose(W[0] - W[1], W0[0] - W0[1], atol=1e-8)
    np.testing.assert_allclose(b[0] - b[1], b0[0] - b0[1], atol=1e-8)
    np.testing.assert_allclose(W[4], W0[4])
    assert np.abs(W[3] - W0[3]).max() > 1e-3  # a class the labels name does move


def test_grouped_folds_keep_groups_and_near_duplicates_together() -> None:
    rng = np.random.default_rng(7)
    E = rng.uniform(size=(40, 8))
    E[5] = E[4] * 1.0001  # the same cell captured twice
    keys = [f"field{i // 2}" for i in range(40)]  # two cells per field
    groups = A.near_duplicate_groups(E, keys)
    assert groups[4] == groups[5]
    assert groups[0] == groups[1] and groups[0] != groups[2]
    fold = A.grouped_folds(groups, ["a", "b"] * 20, 4)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    assert sorted(np.bincount(fold).tolist())[0] >= 8


def test_named_at_precision() -> None:
    score = np.array([0.99, 0.98, 0.97, 0.6, 0.5])
    correct = np.array([True, True, True, False, True])
    share, thr = A.named_at_precision(score, correct, 0.97)
    assert share == pytest.approx(0.6) and thr == pytest.approx(0.97)
    assert A.named_at_precision(score, ~correct, 0.97)[0] == 0.0


def _fit(tmp_path: Path) -> tuple[A.FitResult, A.BaseHead]:
    rng = np.random.default_rng(8)
    protos = _prototypes(rng)
    head = _head(protos)
    E, y = _lab(rng, protos, COUNTS)
    return A.fit_adaptation(E, y, head), head


def test_folder_round_trip_and_refusals(tmp_path: Path) -> None:
    fit, head = _fit(tmp_path)
    out = tmp_path / "lab1"
    ad = A.write_adaptation(out, fit, head, {"dirs": ["x"]})
    assert sorted(p.name for p in out.iterdir()) == ["adaptation.json", "head.json", "head.npz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    doc = json.loads((out / "adaptation.json").read_text())
    assert doc["base_model"]["sha256"] == head.sha256
    assert doc["cells"] == COUNTS and doc["validation"]["adapted"]["n"] == 140
    again = A.load_adaptation(out, head.sha256)
    np.testing.assert_allclose(again.head.weight.T, fit.W, rtol=1e-6)
    assert again.sha256 == ad.sha256 and again.id == doc["id"]
    assert again.describe() == {"id": doc["id"], "sha256": ad.sha256}
    e = np.ones(D, np.float32)
    np.testing.assert_allclose(
        again.head.probs(e),
        A.softmax((e @ fit.W.T + fit.b) / fit.temperature),
        rtol=1e-4,
        atol=1e-9,
    )
    with pytest.raises(A.AdaptationError, match="never overwritten"):
        A.write_adaptation(out, fit, head)
    with pytest.raises(A.AdaptationError, match="made for classifier sha256 aaaaaaaaaaaa"):
        A.load_adaptation(out, "b" * 64)


def test_corrupt_folders_name_the_file(tmp_path: Path) -> None:
    fit, head = _fit(tmp_path)
    out = tmp_path / "lab1"
    A.write_adaptation(out, fit, head)
    w = out / "head.npz"
    good = w.read_bytes()
    data = bytearray(good)
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(A.AdaptationError, match=r"head\.npz: sha256 does not match"):
        A.load_adaptation(out, head.sha256)
    w.write_bytes(good)
    h = out / "head.json"
    h.write_text(h.read_text().replace('"temperature"', '"temperature" ', 1))
    with pytest.raises(A.AdaptationError, match=r"head\.json: sha256 does not match"):
        A.load_adaptation(out, head.sha256)
    (out / "adaptation.json").write_text("{not json")
    with pytest.raises(A.AdaptationError, match=r"adaptation\.json: not valid JSON"):
        A.load_adaptation(out, head.sha256)
    (out / "adaptation.json").write_text(json.dumps({"schema": "edge-wbc/adaptation/1"}))
    with pytest.raises(A.AdaptationError, match=r"adaptation\.json: missing or malformed"):
        A.load_adaptation(out, head.sha256)
    with pytest.raises(A.AdaptationError, match="no such adaptation folder"):
        A.load_adaptation(tmp_path / "nope", head.sha256)


def test_shipped_head_is_the_classifier_s_own_last_layer() -> None:
    """The head read from the int8 graph reproduces the classifier's own probabilities."""
    from edge_wbc.pipeline.analysis import FieldAnalyzer
    from edge_wbc.pipeline.classify import calibrated_softmax, combine_views, crop_views

    an = FieldAnalyzer(threads=1)
    clf = an.classifier
    assert clf is not None
    ce = an.manifest.classifier
    assert ce is not None
    head = A.shipped_head(
        an.manifest.path(ce),
        ce.classes,
        ce.temperature,
        ce.confidence_threshold,
        ce.other_threshold,
        ce.sha256,
        an.runtime.interpreter_cls,
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        crop = rng.integers(120, 230, (clf.input_size, clf.input_size, 3), dtype=np.uint8)
        pred = clf.classify(crop)
        assert pred.embedding is not None
        outs = [clf.model.infer_pixels(v)[0] for v in crop_views(crop, clf.views)]
        ref = calibrated_softmax(combine_views(outs, clf.output_type), clf.temperature)
        np.testing.assert_allclose(A.base_probs(pred.embedding[None], head)[0], ref, atol=0.03)


def test_a_head_file_can_be_the_base() -> None:
    """A classifier shipped with a head on its embedding (the fine classes) is adapted from it."""
    rng = np.random.default_rng(9)
    protos = _prototypes(rng)
    base = _head(protos)
    lin = A.LinearHead(CLASSES, base.W.T, base.b, base.sha256, 0.8, 0.9, 0.95)
    again = A.base_head_from_linear(lin)
    np.testing.assert_allclose(again.W, base.W)
    assert (again.temperature, again.confidence_threshold, again.other_threshold) == (
        0.8,
        0.9,
        0.95,
    )
    E, y = _lab(rng, protos, COUNTS)
    assert A.fit_adaptation(E, y, again).accepted


def test_a_mixture_head_is_adapted_from_its_flat_head_with_the_flat_thresholds() -> None:
    """The shipped fine-class head refines the six-class output (a mixture); a lab head is
    linear, so it starts from the mixture's flat head and that head's own thresholds."""
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(4, 2)), rng.normal(size=2)
    kw = {"base_classes": ("neutrophil", "other"),
          "splits": {"neutrophil": ("band_neutrophil",), "other": ("other",)}}  # fmt: skip
    cls2 = ("band_neutrophil", "other")
    flat = {"flat": {"confidence_threshold": 0.5, "other_threshold": 0.6}}
    mix = A.LinearHead(cls2, w, b, "ab" * 32, 1.2, 0.9, 0.95, flat, **kw)  # type: ignore[arg-type]
    base = A.base_head_from_linear(mix)
    np.testing.assert_allclose(base.W, w.T)
    assert (base.temperature, base.confidence_threshold, base.other_threshold) == (1.2, 0.5, 0.6)
    bare = A.LinearHead(cls2, w, b, "ab" * 32, 1.2, 0.9, 0.95, **kw)  # type: ignore[arg-type]
    with pytest.raises(A.AdaptationError, match=r"info\.flat"):
        A.base_head_from_linear(bare)


def test_metrics_name_and_score_cells_as_the_device_decides_them() -> None:
    """A neutrophil split between band and segmented is a sure neutrophil on the device
    (classify.decide): it is named, not unidentified, and it is right for a lab that says
    `neutrophil`; a cell whose top fine class is not in its top group is named by the group."""
    from edge_wbc.pipeline.classify import decide

    fine = ("band_neutrophil", "segmented_neutrophil", "lymphocyte", "monocyte", "other")
    head = A.BaseHead(fine, np.zeros((5, 3)), np.zeros(5), 1.0, 0.8, 0.8, "x")
    p = np.array(
        [
            [0.50, 0.45, 0.02, 0.02, 0.01],  # sure neutrophil, unsure band vs segmented
            [0.30, 0.30, 0.00, 0.40, 0.00],  # top class monocyte, top group neutrophil
            [0.05, 0.05, 0.85, 0.05, 0.00],
        ]
    )
    labels = ["neutrophil", "neutrophil", "monocyte"]
    M = A.label_masks(labels, head)
    named, score = A.group_decisions(p, head)
    for row, k, s in zip(p, named, score, strict=True):
        d = decide(row, fine, 0.0)
        assert (fine[k], s) == (d.label, pytest.approx(d.score))
    m = A.metrics(p, M, labels, 0.8, head=head)
    assert m["top1"] == pytest.approx(2 / 3)  # the two neutrophils right, the third wrong
    assert m["unidentified"] == pytest.approx(1 / 3)  # only the 0.60 neutrophil is below 0.8
    assert m["named_at_target"] == pytest.approx(1 / 3)  # the 0.95 neutrophil, then a 0.85 error


def test_the_binomial_test_is_scipy_s() -> None:
    """binom_greater_p gives what scipy.stats gives (it replaces it to keep scipy.stats out of a
    station's memory)."""
    from scipy import stats

    for k, n in [(0, 1), (3, 3), (5, 9), (12, 20), (40, 70), (1, 10)]:
        want = stats.binomtest(k, n, 0.5, alternative="greater").pvalue
        assert A.binom_greater_p(k, n) == pytest.approx(want, rel=1e-9, abs=1e-15)


def _m(top1: float, named: float, n: int = 100, balanced: float | None = None) -> dict:
    return {"n": n, "top1": top1, "balanced_top1": top1 if balanced is None else balanced,
            "named_at_target": named}  # fmt: skip


def test_judge_accepts_a_better_ranking_without_a_top1_gain() -> None:
    """Named share up by >= 0.05 (and 3 cells' worth) with no cell broken: a lab calibration that
    ranks the errors lower is accepted though top-1 is unchanged; the same gain with more cells
    broken than fixed, too small a gain, or a gain of under 3 cells on a small lab is not."""
    same = np.ones(100, bool)
    same[:6] = False
    ok, why = A.judge(_m(0.94, 0.70), _m(0.94, 0.90), same, same, "pull 0.01")
    assert ok, why
    assert "0.700 -> 0.900" in why
    broke = same.copy()
    broke[50] = False
    ok, why = A.judge(_m(0.94, 0.70), _m(0.93, 0.90), same, broke, "pull 0.01")
    assert not ok and "not better" in why and "1 broken" in why
    ok, why = A.judge(_m(0.94, 0.70), _m(0.94, 0.74), same, same, "pull 0.01")
    assert not ok and "needs" in why
    small = np.ones(40, bool)
    ok, why = A.judge(_m(1.0, 0.70, 40), _m(1.0, 0.765, 40), small, small, "bias")
    assert not ok and "0.075" in why  # 3 cells of 40
    # top-1 significantly better (McNemar) still suffices, named share flat
    base = np.zeros(100, bool)
    base[:80] = True
    new = np.ones(100, bool)
    ok, why = A.judge(_m(0.80, 0.60), _m(1.0, 0.60), base, new, "pull 0.1")
    assert ok, why
    # ... unless a class is given up for it, or fewer cells can be named
    ok, why = A.judge(_m(0.80, 0.60, balanced=0.8), _m(1.0, 0.6, balanced=0.7), base, new, "x")
    assert not ok and "class by class" in why
    ok, why = A.judge(_m(0.80, 0.60), _m(1.0, 0.50), base, new, "x")
    assert not ok and "fewer cells can be named" in why
    # labels the shipped head mostly disagrees with, class by class: refused whatever the gain
    ok, why = A.judge(_m(0.80, 0.60, balanced=0.4), _m(1.0, 0.9), base, new, "x")
    assert not ok and "agrees with only" in why


def test_anchors_keep_the_shipped_answers_on_its_own_cells() -> None:
    """A lab (no lymphocytes in it) whose basophils look like the shipped source's lymphocytes:
    without anchors the fit calls the source's own lymphocytes basophils too. With anchor cells
    of the source the fitted head keeps the shipped answers on other cells of that source,
    at a small price on the lab."""
    import dataclasses

    rng = np.random.default_rng(11)
    protos = _prototypes(rng)
    head = _head(protos)
    E, y = [], []
    for c, n in {"neutrophil": 40, "eosinophil": 20, "basophil": 20, "monocyte": 20}.items():
        mu = protos[CLASSES.index(c)]
        if c == "basophil":
            mu = 0.1 * mu + 0.9 * protos[CLASSES.index("lymphocyte")]
        E.append(mu + rng.normal(0, 0.12, (n, D)))
        y += [c] * n
    E_lab = np.concatenate(E)
    source, _ = _lab(rng, protos, dict.fromkeys(CLASSES[:5], 60), shift=False)
    anchors, held = source[::2], source[1::2]
    ship = A.base_probs(held, head).argmax(1)

    def agreement(h: A.BaseHead) -> tuple[float, float]:
        M = A.label_masks(y, h)
        W, b = A.fit_head(E_lab, M, h.W, h.b, [1e-2], balanced=False, anchors=h.anchors,
                          anchor_weight=h.anchor_weight)[0]  # fmt: skip
        lab_top1 = float(np.mean(M[np.arange(len(y)), (E_lab @ W.T + b).argmax(1)]))
        return float(np.mean((held @ W.T + b).argmax(1) == ship)), lab_top1

    anchored = dataclasses.replace(head, anchors=anchors, anchor_weight=1.0)
    free, free_top1 = agreement(head)
    kept, kept_top1 = agreement(anchored)
    assert free < 0.9 and kept > free + 0.08, (free, kept)
    assert kept_top1 >= free_top1 - 0.1, (free_top1, kept_top1)
    fit = A.fit_adaptation(E_lab, y, anchored)
    assert fit.validation["anchors"] == {"cells": len(anchors), "weight": 1.0}


def test_damaged_anchors_stop_the_fit_with_the_file_named(tmp_path: Path) -> None:
    import hashlib
    import io

    E = np.ones((5, 8), np.float16)
    buf = io.BytesIO()
    np.savez(buf, embeddings=E)
    p = tmp_path / "classifier_anchors.npz"
    p.write_bytes(buf.getvalue())
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    assert A.load_anchors(p, sha, 8).shape == (5, 8)
    with pytest.raises(A.AdaptationError, match=r"classifier_anchors.npz.*5, 8.*x 16"):
        A.load_anchors(p, sha, 16)
    with pytest.raises(A.AdaptationError, match=r"classifier_anchors.npz.*sha256"):
        A.load_anchors(p, "0" * 64, 8)
    p.write_bytes(b"PK\x03\x04 not a zip")
    bad = hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(A.AdaptationError, match=r"classifier_anchors.npz: unreadable"):
        A.load_anchors(p, bad, 8)
    with pytest.raises(A.AdaptationError, match=r"missing.npz: cannot read"):
        A.load_anchors(tmp_path / "missing.npz", sha, 8)
