"""Float weights recovered from an int8 classifier, and the ten-output (fine) training pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from edge_wbc_convert.cells import CellItem, CropSampler
from edge_wbc_convert.fine import ALLOWED, FINE, fine_cells

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_recovered_classifier_reproduces_the_shipped_int8_file() -> None:
    from edge_wbc_convert.recover import agreement, recover_classifier

    int8 = ROOT / "models" / "classifier.tflite"
    model = recover_classifier(int8, "mnv2", 96, 0.75, 6)
    rng = np.random.default_rng(0)
    # Smooth blobs on a light background: crops the int8 file gives varied answers on.
    yy, xx = np.mgrid[0:96, 0:96]
    crops = []
    for _ in range(24):
        cx, cy, r = rng.uniform(30, 66), rng.uniform(30, 66), rng.uniform(12, 30)
        col = rng.uniform(0.2, 0.8, 3)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        crops.append(np.where(blob, col, 0.88).astype(np.float32))
    rep = agreement(model, int8, np.stack(crops))
    assert rep["top1_agreement"] >= 0.95
    assert rep["mean_abs_prob_diff"] < 0.02


def test_a_recovered_model_from_another_architecture_is_refused() -> None:
    from edge_wbc_convert.recover import recover_classifier

    with pytest.raises(ValueError, match=r"does not fit|weighted"):
        recover_classifier(ROOT / "models" / "classifier.tflite", "mnv2", 96, 0.5, 6)


def test_partial_labels_allow_every_fine_class_they_cover() -> None:
    from edge_wbc_convert.train import partial_ce

    cells = [
        CellItem("pbc", Path("pbc/neutrophil/BNE_1.jpg"), "train", "neutrophil", (0, 0, 9, 9)),
        CellItem("zheng1", Path("z/1.png"), "train", "neutrophil", (0, 0, 9, 9)),
        CellItem("bccd", Path("b/1.jpg"), "train", "other", (0, 0, 9, 9)),
        CellItem("pbc", Path("pbc/ig/MMY_3.jpg"), "train", "other", (0, 0, 9, 9)),
    ]
    labels = [c.label for c in fine_cells(cells)]
    assert labels == ["band_neutrophil", "neutrophil", "bccd_other", "immature_granulocyte"]
    s = CropSampler.__new__(CropSampler)
    s.classes, s.allowed = FINE, ALLOWED
    y = s.target("neutrophil")
    assert {FINE[i] for i in np.flatnonzero(y)} == {"band_neutrophil", "segmented_neutrophil"}
    # All the mass on either allowed class is (near) no loss; on a class outside the set, a lot.
    p_band = np.full((1, len(FINE)), 1e-4, np.float32)
    p_band[0, FINE.index("segmented_neutrophil")] = 1.0
    p_eo = np.full((1, len(FINE)), 1e-4, np.float32)
    p_eo[0, FINE.index("eosinophil")] = 1.0
    lo = float(np.asarray(partial_ce(y[None], p_band))[0])
    hi = float(np.asarray(partial_ce(y[None], p_eo))[0])
    assert lo < 0.5 < 5.0 < hi


def test_an_unknown_fine_label_is_refused() -> None:
    bad = [CellItem("pbc", Path("pbc/x/XYZ_1.jpg"), "train", "other", (0, 0, 9, 9))]
    with pytest.raises(ValueError, match="prefix"):
        fine_cells(bad)
