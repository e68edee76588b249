"""Classifier evaluation helpers: the 'other' threshold fit, the error contact sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from edge_wbc_convert.cls_eval import N5, fit_other_threshold


def _fit(p: np.ndarray, y: np.ndarray, thr: float, max_dropped: float) -> float:
    leuko = y < N5
    conf_other = p[leuko].max(1)[p[leuko].argmax(1) == N5]
    return fit_other_threshold(conf_other, int(leuko.sum()), thr, max_dropped)


def _probs(rows: list[tuple[int, float]]) -> np.ndarray:
    """(top class, its probability) -> six-way probability rows."""
    out = np.zeros((len(rows), N5 + 1))
    for i, (k, p) in enumerate(rows):
        out[i] = (1 - p) / N5
        out[i, k] = p
    return out


def test_threshold_leaves_at_most_the_allowed_share_of_leukocytes_out() -> None:
    # 200 leukocytes, 5 of them confidently called 'other'; 20 real 'other' cells.
    rows = [(0, 0.9)] * 195 + [(N5, c) for c in (0.99, 0.97, 0.95, 0.8, 0.7)] + [(N5, 0.9)] * 20
    y = np.array([0] * 200 + [N5] * 20)
    p = _probs(rows)
    thr = _fit(p, y, 0.5, max_dropped=0.005)  # one leukocyte may leave
    leuko_other = p[:200].max(1)[p[:200].argmax(1) == N5]
    assert np.sum(leuko_other >= thr) <= 1
    assert 0.97 < thr <= 0.99
    # More tolerance, lower bar; never below the confidence threshold.
    assert _fit(p, y, 0.5, max_dropped=0.05) == 0.5
    assert _fit(p, y, 0.75, max_dropped=0.02) >= 0.75


def test_no_leukocyte_called_other_keeps_the_confidence_threshold() -> None:
    p = _probs([(1, 0.8)] * 50 + [(N5, 0.9)] * 5)
    y = np.array([1] * 50 + [N5] * 5)
    assert _fit(p, y, 0.6, 0.005) == 0.6


def test_error_contact_sheet_is_written(tmp_path: Path) -> None:
    import cv2
    from edge_wbc_convert.cls_eval import plot_crops

    crops = [np.full((16, 16, 3), v, np.float32) for v in (0.1, 0.5, 0.9)]
    out = plot_crops(crops, ["a", "b", "c"], tmp_path / "e.png", cols=2)
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100


def test_camera_casts_are_strong_and_the_device_balance_undoes_them() -> None:
    import cv2
    from edge_wbc_convert.casts import CLASSIFIER_CASTS

    from edge_wbc.pipeline import preprocess as pp

    field = Path(__file__).parent / "fixtures" / "data" / "bccd" / "JPEGImages"
    rgb = cv2.cvtColor(cv2.imread(str(field / "BloodImage_00000.jpg")), cv2.COLOR_BGR2RGB)
    chroma = pp.stain_chroma(pp.white_balance(rgb))
    for name, cast in CLASSIFIER_CASTS.items():
        raw = cast(rgb)
        bg = pp.background_rgb(raw)
        balanced = pp.white_balance(raw)
        if name.startswith("grey"):
            assert pp.stain_chroma(raw) < 0.3 * pp.stain_chroma(rgb), name
        else:
            assert bg.max() - bg.min() > 40, (name, bg)  # a cast a technician would see
        assert np.abs(pp.background_rgb(balanced) - pp.BACKGROUND_LEVEL).max() < 12, name
        # The chroma floor brings a faded stain back, by at most MAX_CHROMA_GAIN.
        reachable = min(chroma, pp.CHROMA_FLOOR, pp.MAX_CHROMA_GAIN * pp.stain_chroma(raw))
        assert pp.stain_chroma(balanced) >= reachable - 8, name
