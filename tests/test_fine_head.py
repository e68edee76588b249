"""edge_wbc_convert.fine / fine_fit: labels, the partial-label fit, thresholds, the card."""

from __future__ import annotations

import numpy as np
import pytest
from edge_wbc_convert import fine_fit as ff
from edge_wbc_convert.card import fine_section
from edge_wbc_convert.fine import FINE, pbc_label
from scipy.optimize import check_grad

from edge_wbc import taxonomy


def test_fine_classes_are_the_taxonomys_model_classes() -> None:
    assert taxonomy.MODEL_CLASSES == FINE
    assert all(c in taxonomy.GROUP_OF for c in FINE)


def test_pbc_labels_come_from_the_file_name_prefix() -> None:
    assert pbc_label("neutrophil/BNE_1.jpg") == "band_neutrophil"
    assert pbc_label("neutrophil/SNE_2.jpg") == "segmented_neutrophil"
    assert pbc_label("neutrophil/NEUTROPHIL_3.jpg") == "neutrophil"
    for p in ("PMY", "MY", "MMY", "IG"):
        assert pbc_label(f"ig/{p}_4.jpg") == "immature_granulocyte"
    assert pbc_label("erythroblast/ERB_5.jpg") == "erythroblast"
    assert pbc_label("platelet/PLATELET_6.jpg") == "platelet"
    with pytest.raises(ValueError, match="unknown PBC file-name prefix 'XX'"):
        pbc_label("x/XX_1.jpg")


def test_partial_labels_allow_their_set() -> None:
    m = ff.allowed_mask(["neutrophil", "eosinophil", "bccd_other"])
    assert [FINE[k] for k in np.flatnonzero(m[0])] == ["band_neutrophil", "segmented_neutrophil"]
    assert [FINE[k] for k in np.flatnonzero(m[1])] == ["eosinophil"]
    assert [FINE[k] for k in np.flatnonzero(m[2])] == ["platelet", "other"]
    z = np.zeros((1, len(FINE)))
    # Uniform logits: P(band or segmented) = 2/10.
    assert ff.set_nll(z, m[:1])[0] == pytest.approx(-np.log(0.2))


def _toy(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Class k lights feature k; five-part 'neutrophil' cells light feature 0 or 1."""
    labels = [FINE[i % len(FINE)] for i in range(n)]
    x = rng.normal(0, 0.1, (n, len(FINE)))
    x[np.arange(n), [FINE.index(c) for c in labels]] += 1.0
    return x, labels


def test_the_flat_fit_has_the_right_gradient_and_learns_separable_classes() -> None:
    rng = np.random.default_rng(0)
    x, labels = _toy(200, rng)
    mask = ff.allowed_mask(labels)
    w0, b0 = np.zeros((x.shape[1], len(FINE))), np.zeros(len(FINE))
    wt = np.ones(len(x))

    f = ff.flat_objective(x, mask, rng.uniform(0.5, 2, len(x)), np.ones_like(w0), 0.1)
    theta = rng.normal(size=w0.size + len(FINE))
    assert check_grad(lambda t: f(t)[0], lambda t: f(t)[1], theta) < 1e-5
    w, b = ff.fit_flat(x, mask, wt, w0, b0, 1e-4)
    assert (ff.softmax(x @ w + b).argmax(1) == mask.argmax(1)).mean() == 1.0
    # Cells known only as "neutrophil" push toward band or segmented, never elsewhere.
    xn = np.zeros((40, x.shape[1]))
    xn[:, 0] = 1.0
    w2, b2 = ff.fit_flat(
        np.vstack([x, xn]), ff.allowed_mask(labels + ["neutrophil"] * 40),
        np.ones(len(x) + 40), w0, b0, 1e-4,
    )  # fmt: skip
    p = ff.softmax(xn[:1] @ w2 + b2)[0]
    assert p[FINE.index("band_neutrophil")] + p[FINE.index("segmented_neutrophil")] > 0.9


def test_thresholds_leave_at_most_the_agreed_share_unidentified() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(len(FINE)) * 0.3, 500)
    labels = [FINE[k] for k in p.argmax(1)]
    conf, other = ff.fit_thresholds(p, labels, ["pbc"] * 500, group_rule=False)
    assert (p.max(1) < conf).mean() <= 0.04 + 1 / 500
    assert other >= conf
    rep = ff.report(p, labels, conf, False, other)
    assert rep["unidentified_rate"] <= 0.05 and rep["leukocytes_dropped"] == 0.0


def test_the_card_section_says_the_trunk_was_not_retrained() -> None:
    per = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3}
    src = {"n": 3, "five_part_accuracy_top1": 1.0, "five_part_accuracy_named": 1.0,
           "unidentified_rate": 0.0, "per_class": {"band_neutrophil": per}}  # fmt: skip
    fe = {
        "method": "flat softmax",
        "calibration": {"temperature": 1.0, "confidence_threshold": 0.5, "other_threshold": 0.6},
        "train_cells": {"pbc": {"band_neutrophil": 3}},
        "selection": [{"lam": 1e-5, "val_pbc_macro_f1": 0.9, "val_pbc_five_part_named": 0.99}],
        "chosen": {"lam": 1e-5},
        "test": {"pbc": src},
        "test_shipped_five_part": {"pbc": src},
    }
    text = "\n".join(fine_section(fe))
    assert "**The trunk was not retrained.**" in text and "1e-05 (chosen)" in text
    assert "| band_neutrophil | 0.500 | 0.500 | 0.500 | 3 |" in text


def test_the_card_section_of_a_mixture_names_its_thresholds_and_selection() -> None:
    per = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3}
    src = {"n": 3, "five_part_accuracy_top1": 1.0, "five_part_accuracy_named": 1.0,
           "unidentified_rate": 0.0, "per_class": {"band_neutrophil": per}}  # fmt: skip
    row = {"shift": -1.0, "group_threshold": 0.4, "other_labs_no_worse": True,
           "val_pbc_macro_f1": 0.9, "val_pbc_five_part_named": 0.99}  # fmt: skip
    fe = {
        "method": "mixture",
        "calibration": {"temperature": 1.5, "confidence_threshold": 0.9, "other_threshold": 0.9,
                        "group_thresholds": {"immature_granulocyte": 0.4, "nrbc": 0.4}},
        "train_cells": {"pbc": {"band_neutrophil": 3}},
        "selection": [row, row | {"shift": 0.0, "other_labs_no_worse": False}],
        "chosen": row,
        "test": {"pbc": src},
        "test_shipped_five_part": {"pbc": src},
    }  # fmt: skip
    text = "\n".join(fine_section(fe))
    assert "| -1 (chosen) | 0.4 | yes |" in text and "| +0 | 0.4 | no |" in text
    assert "immature_granulocyte 0.40, nrbc 0.40" in text
    assert "no source worse" in text


def test_the_mixture_selection_refuses_a_worse_other_lab() -> None:
    from edge_wbc_convert.fine_fit import label_report, mixture_ok

    truth = ["neutrophil", "lymphocyte", "eosinophil", "neutrophil"]
    shipped = label_report(truth, ["neutrophil", "lymphocyte", "unidentified", "neutrophil"],
                           ["neutrophil", "lymphocyte", "basophil", "neutrophil"])  # fmt: skip
    band, seg, ig = "band_neutrophil", "segmented_neutrophil", "immature_granulocyte"
    same = label_report(truth, [band, "lymphocyte", "unidentified", seg],
                        [band, "lymphocyte", "basophil", band])  # fmt: skip
    assert shipped["five_part_accuracy_named"] == 1.0 and shipped["unidentified_rate"] == 0.25
    assert mixture_ok({"bccd": same}, {"bccd": shipped})
    # an immature granulocyte call on a lab without any: a wrong named cell
    worse = label_report(truth, [ig, "lymphocyte", "unidentified", band],
                         [ig, "lymphocyte", "basophil", band])  # fmt: skip
    assert worse["wrong_named"] == 1
    assert not mixture_ok({"bccd": worse}, {"bccd": shipped})
    # PBC is not a constraint (its fine classes are what the selection maximises)
    assert mixture_ok({"pbc": worse}, {"pbc": shipped})
