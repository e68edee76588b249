"""FieldAnalyzer: the pipeline on fixture models, and golden fields on the shipped models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_wbc.pipeline.analysis import FieldAnalyzer, draw_overlay
from edge_wbc.pipeline.classify import (
    CellClassifier,
    calibrated_softmax,
    combine_views,
    crop_views,
    decide,
)
from edge_wbc.pipeline.imageio import read_image
from edge_wbc.pipeline.inference import TFLiteModel
from edge_wbc.pipeline.manifest import ManifestError
from edge_wbc.pipeline.postprocess import PostprocessParams
from edge_wbc.pipeline.results import CLASSES, OTHER, UNIDENTIFIED

TESTS = Path(__file__).parent
FIXTURE_MODELS = TESTS / "fixtures" / "models"
FIELDS = TESTS / "fixtures" / "fields"
SHIPPED = TESTS.parent / "models"
EXPECTED = json.loads((FIELDS / "expected.json").read_text())["fields"]
BCCD_D = PostprocessParams(cell_diameter_px=170.0)


def _iou(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def analyzer() -> FieldAnalyzer:
    return FieldAnalyzer(FIXTURE_MODELS, threads=2, postprocess=BCCD_D)


@pytest.fixture(scope="module")
def two_cells() -> np.ndarray:
    return read_image(FIELDS / "BloodImage_00249.jpg")


def test_result_carries_cells_crops_masks_and_timing(
    analyzer: FieldAnalyzer, two_cells: np.ndarray
) -> None:
    res = analyzer.analyze(two_cells, "f.jpg")
    assert (res.width, res.height, res.path, res.error) == (640, 480, "f.jpg", None)
    assert len(res.cells) == 2
    for c in res.cells:
        x0, y0, x1, y1 = c.bbox
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        assert c.mask is not None and c.mask.shape == (y1 - y0, x1 - x0) and c.mask.dtype == bool
        assert c.area_px == int(c.mask.sum())
        assert c.crop is not None and c.crop.shape == (32, 32, 3) and c.crop.dtype == np.uint8
        assert c.label in (*CLASSES, UNIDENTIFIED, OTHER)
        assert set(c.probs) == {*CLASSES, OTHER} and abs(sum(c.probs.values()) - 1) < 1e-3
    assert res.mask is not None and res.mask.shape == (480, 640) and res.mask.dtype == np.uint8
    assert set(np.unique(res.mask)) <= {0, 255}
    assert int((res.mask == 255).sum()) == sum(c.area_px for c in res.cells if c.label != OTHER)
    assert set(res.timing_ms) == {
        "preprocess",
        "segment",
        "postprocess",
        "classify",
        "quality",
        "total",
    }
    assert res.quality["flags"] == []
    doc = res.to_json()
    assert json.loads(json.dumps(doc)) == doc


def test_interpreters_are_built_once(
    monkeypatch: pytest.MonkeyPatch, two_cells: np.ndarray
) -> None:
    built: list[Path] = []
    real_init = TFLiteModel.__init__

    def counting_init(self: TFLiteModel, path: str | Path, *a: object, **kw: object) -> None:
        built.append(Path(path))
        real_init(self, path, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(TFLiteModel, "__init__", counting_init)
    an = FieldAnalyzer(FIXTURE_MODELS, postprocess=BCCD_D)
    assert len(built) == 3  # two segmenters + classifier
    interps = [m.interpreter for m in an.models]
    for _ in range(3):
        an.analyze(two_cells)
    assert len(built) == 3 and [m.interpreter for m in an.models] == interps


def test_odd_arrays_are_converted(analyzer: FieldAnalyzer, two_cells: np.ndarray) -> None:
    grey = cv2.cvtColor(two_cells, cv2.COLOR_RGB2GRAY)
    assert analyzer.analyze(grey).width == 640
    rgba = np.dstack([two_cells, np.full(two_cells.shape[:2], 255, np.uint8)])
    assert len(analyzer.analyze(rgba).cells) == len(analyzer.analyze(two_cells).cells)
    tiny = analyzer.analyze(np.full((3, 5, 3), 200, np.uint8))
    assert (tiny.width, tiny.height, tiny.cells) == (5, 3, [])
    blank = analyzer.analyze(np.full((480, 640, 3), 225, np.uint8))
    assert blank.cells == [] and "no_cells" in blank.quality["flags"]


def test_other_cells_are_not_in_the_mask(
    analyzer: FieldAnalyzer, two_cells: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_wbc.pipeline.classify import Prediction

    clf = analyzer.classifier
    assert clf is not None
    monkeypatch.setattr(clf, "classify", lambda crop: Prediction(OTHER, 0.9, {OTHER: 0.9}))
    res = analyzer.analyze(two_cells)
    assert len(res.cells) == 2 and all(not c.counted for c in res.cells)
    assert res.mask is not None and not res.mask.any()
    assert "no_cells" in res.quality["flags"]


def test_overlay_is_drawn(analyzer: FieldAnalyzer, two_cells: np.ndarray) -> None:
    res = analyzer.analyze(two_cells)
    ov = draw_overlay(two_cells, res)
    assert ov.shape == two_cells.shape and (ov != two_cells).any()


def test_calibration_and_unidentified() -> None:
    logits = np.array([2.0, 1.0, 0.0, 0.0, 0.0])
    p1 = calibrated_softmax(logits, 1.0)
    p2 = calibrated_softmax(logits, 2.0)
    assert p2.max() < p1.max() and abs(p2.sum() - 1) < 1e-9  # temperature softens
    probs = calibrated_softmax(np.log([0.5, 0.2, 0.1, 0.1, 0.1]), 1.0)
    np.testing.assert_allclose(
        calibrated_softmax([0.5, 0.2, 0.1, 0.1, 0.1], 1.0, "probabilities"), probs
    )
    assert decide(probs, CLASSES, 0.4).label == "neutrophil"
    low = decide(probs, CLASSES, 0.6)
    assert low.label == UNIDENTIFIED and low.score == pytest.approx(0.5)
    six = (*CLASSES, OTHER)
    assert decide(np.array([0.1, 0, 0, 0, 0, 0.9]), six, 0.5).label == OTHER
    # An unsure "other" is not dropped from the count: it goes to review.
    assert decide(np.array([0.25, 0.2, 0.1, 0.1, 0.05, 0.3]), six, 0.5).label == UNIDENTIFIED
    # Every class of the taxonomy keeps its name (the formula decides where it counts); a
    # platelet is "not a leukocyte" like other and needs the same higher bar.
    assert decide(np.array([0.1, 0, 0, 0, 0, 0, 0.9]), (*six, "platelet"), 0.5).label == "platelet"
    assert decide(np.array([0.1, 0, 0, 0, 0, 0, 0.9]), (*six, "platelet"), 0.5,
                  other_threshold=0.95).label == UNIDENTIFIED
    for extra in ("immature_granulocyte", "erythroblast"):
        assert decide(np.array([0.1, 0, 0, 0, 0, 0, 0.9]), (*six, extra), 0.5).label == extra
    # A class the table does not know goes to review, never out of the count.
    assert decide(np.array([0.1, 0, 0, 0, 0, 0, 0.9]), (*six, "mystery"), 0.5).label == UNIDENTIFIED
    # "other" has its own, higher bar: below it the cell is reviewed, never silently dropped;
    # a leukocyte call at the same confidence is counted as usual.
    p_other = np.array([0.1, 0.05, 0, 0, 0, 0.85])
    assert decide(p_other, six, 0.5, other_threshold=0.9).label == UNIDENTIFIED
    assert decide(p_other, six, 0.5, other_threshold=0.8).label == OTHER
    assert decide(np.array([0.85, 0, 0, 0, 0.05, 0.1]), six, 0.5, 0.9).label == "neutrophil"
    # A lower other_threshold never lets a cell below the confidence threshold out.
    assert decide(np.array([0.3, 0.2, 0.1, 0.05, 0.05, 0.3]), six, 0.5, 0.2).label == UNIDENTIFIED


def test_other_threshold_is_read_from_the_manifest(tmp_path: Path) -> None:
    from edge_wbc.pipeline.manifest import load_manifest

    for f in FIXTURE_MODELS.iterdir():
        shutil.copy(f, tmp_path / f.name)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    cls = next(m for m in raw["models"] if m["task"] == "classification")
    assert load_manifest(tmp_path).classifier.other_threshold is None
    cls.setdefault("calibration", {})["other_threshold"] = 0.93
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(tmp_path).classifier.other_threshold == pytest.approx(0.93)
    assert FieldAnalyzer(tmp_path, threads=1).classifier.other_threshold == pytest.approx(0.93)


def test_the_counting_group_decides_and_its_likelier_class_names_the_cell() -> None:
    from edge_wbc.taxonomy import MODEL_CLASSES

    def p(**kw: float) -> np.ndarray:
        return np.array([kw.get(c, 0.0) for c in MODEL_CLASSES])

    # Surely a neutrophil, unsure band or segmented: counted, named by the likelier one.
    split = decide(p(band_neutrophil=0.48, segmented_neutrophil=0.5, lymphocyte=0.02),
                   MODEL_CLASSES, 0.9)  # fmt: skip
    assert split.label == "segmented_neutrophil" and split.score == pytest.approx(0.98)
    # Platelet + other are one "not a leukocyte" group, under the stricter threshold.
    non = p(platelet=0.5, other=0.45, monocyte=0.05)
    assert decide(non, MODEL_CLASSES, 0.9, 0.9).label == "platelet"
    assert decide(non, MODEL_CLASSES, 0.9, 0.97).label == UNIDENTIFIED
    # A group's own threshold: an immature granulocyte named at a lower probability.
    ig = p(immature_granulocyte=0.7, band_neutrophil=0.2, monocyte=0.1)
    assert decide(ig, MODEL_CLASSES, 0.9).label == UNIDENTIFIED
    got = decide(ig, MODEL_CLASSES, 0.9, None, {"immature_granulocyte": 0.6})
    assert got.label == "immature_granulocyte"
    # A lower threshold for a group never lets "not a leukocyte" below the other threshold.
    assert decide(non, MODEL_CLASSES, 0.9, 0.97, {"non_wbc": 0.5}).label == UNIDENTIFIED


def test_a_ten_class_classifier_and_group_thresholds_load_from_the_manifest(
    tmp_path: Path,
) -> None:
    from edge_wbc.pipeline.manifest import ManifestError, label_binding, load_manifest
    from edge_wbc.taxonomy import MODEL_CLASSES

    for f in FIXTURE_MODELS.iterdir():
        shutil.copy(f, tmp_path / f.name)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    cls = next(m for m in raw["models"] if m["task"] == "classification")
    cls.setdefault("calibration", {})["group_thresholds"] = {"immature_granulocyte": 0.6}
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(tmp_path).classifier.group_thresholds == {"immature_granulocyte": 0.6}
    cls["calibration"]["group_thresholds"] = {"myeloid": 0.6}
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="group_thresholds: 'myeloid' is not a group"):
        load_manifest(tmp_path)
    del cls["calibration"]["group_thresholds"]
    # The fine outputs are a classifier's classes (bound anew, as a release would bind them);
    # without any neutrophil output the five-part differential is impossible: refused.
    cls["classes"] = list(MODEL_CLASSES)
    cls["label_binding"] = label_binding(cls)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(tmp_path).classifier.classes == MODEL_CLASSES
    no_neutrophil = [c for c in MODEL_CLASSES if "neutrophil" not in c]
    cls["classes"] = no_neutrophil
    cls["label_binding"] = label_binding(cls)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"no output for \['neutrophil'\]"):
        load_manifest(tmp_path)


def test_crop_views_are_the_dihedral_orientations() -> None:
    crop = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    assert crop_views(crop, 1)[0] is crop
    two = crop_views(crop, 2)
    np.testing.assert_array_equal(two[1], crop[:, ::-1])
    eight = crop_views(crop, 8)
    assert len({v.tobytes() for v in eight}) == 8  # all distinct for an asymmetric crop
    assert all(v.flags["C_CONTIGUOUS"] for v in eight)
    np.testing.assert_array_equal(crop_views(crop, 4)[2], crop[::-1, ::-1])
    with pytest.raises(ValueError, match="views must be one of"):
        crop_views(crop, 3)


class _HalfModel:
    """A fake classifier that sees which half of the crop is red: not orientation-invariant."""

    class _Out:
        shape = (1, 6)

    outputs = (_Out(),)

    def __init__(self) -> None:
        self.calls = 0

    def infer_pixels(self, crop: np.ndarray) -> list[np.ndarray]:
        self.calls += 1
        left = crop[:, : crop.shape[1] // 2, 0].mean() / 255.0
        return [np.array([[4 * left, 1.0, 0.0, 0.0, 0.0, 0.0]])]


def test_classifier_averages_logits_over_its_views() -> None:
    crop = np.zeros((8, 8, 3), np.uint8)
    crop[:, :4, 0] = 255  # red on the left only
    one = CellClassifier(_HalfModel(), (*CLASSES, OTHER), 1.0, 0.0)  # type: ignore[arg-type]
    two_model = _HalfModel()
    two = CellClassifier(two_model, (*CLASSES, OTHER), 1.0, 0.0, views=2)  # type: ignore[arg-type]
    p1, p2 = one.classify(crop), two.classify(crop)
    assert two_model.calls == 2
    # Mirrored, the red is on the right: the mean of the two views' logits is [2, 1, 0, ...].
    want = calibrated_softmax(np.array([2.0, 1.0, 0, 0, 0, 0]), 1.0)
    np.testing.assert_allclose([p2.probs[c] for c in (*CLASSES, OTHER)], want, atol=1e-9)
    assert p1.probs["neutrophil"] > p2.probs["neutrophil"]
    # One view of a probability output is exactly the single-view calibrated softmax.
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(
        calibrated_softmax(combine_views([p], "probabilities"), 1.7),
        calibrated_softmax(p, 1.7, "probabilities"),
    )
    with pytest.raises(ValueError, match="views must be one of"):
        CellClassifier(_HalfModel(), (*CLASSES, OTHER), views=5)  # type: ignore[arg-type]


def test_classifier_views_are_read_from_the_manifest(tmp_path: Path) -> None:
    from edge_wbc.pipeline.manifest import load_manifest

    for f in FIXTURE_MODELS.iterdir():
        shutil.copy(f, tmp_path / f.name)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    cls = next(m for m in raw["models"] if m["task"] == "classification")
    assert load_manifest(tmp_path).classifier.views == 1  # manifests before views: one view
    cls["views"] = 4
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert FieldAnalyzer(tmp_path, threads=1).classifier.views == 4
    cls["views"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="views 3 is not one of"):
        load_manifest(tmp_path)


def test_from_config() -> None:
    from edge_wbc.config import load_config

    cfg = load_config(None, env={}).replace(
        models_dir=str(FIXTURE_MODELS), postprocess_cell_diameter_px=150.0
    )
    an = FieldAnalyzer.from_config(cfg)
    assert an.params.cell_diameter_px == 150.0 and an.threads == cfg.models.threads
    assert an.describe()["accelerator"] == "cpu" and an.describe()["runtime"].startswith(
        "ai_edge_litert"
    )


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE_MODELS, tmp_path / "m")
    p = tmp_path / "m" / "cls_colour.tflite"
    p.write_bytes(p.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        FieldAnalyzer(tmp_path / "m")
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        FieldAnalyzer(tmp_path)


def test_manifest_that_lies_about_the_input(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE_MODELS, tmp_path / "m")
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    man["models"][0]["input"]["shape"] = [1, 192, 256, 3]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestError, match=r"input is \[1, 96, 128, 3\]"):
        FieldAnalyzer(tmp_path / "m")


# ---------------------------------------------------------------- golden fields, shipped models

shipped = pytest.mark.skipif(
    not (SHIPPED / "manifest.json").is_file(),
    reason="no shipped models in models/ (manifest.json absent)",
)


@pytest.fixture(scope="module")
def shipped_analyzer() -> FieldAnalyzer:
    from edge_wbc.config import load_config

    # The shipped defaults, as the station runs them.
    cfg = load_config(None, env={}).replace(models_dir=str(SHIPPED))
    return FieldAnalyzer.from_config(cfg)


@shipped
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_field(shipped_analyzer: FieldAnalyzer, name: str) -> None:
    exp = EXPECTED[name]
    res = shipped_analyzer.analyze(read_image(FIELDS / f"{name}.jpg"), name)
    boxes = exp["wbc_boxes_voc"]
    assert len(res.cells) == len(boxes), [c.bbox for c in res.cells]
    for box in boxes:
        assert max(_iou(c.bbox, box) for c in res.cells) >= 0.5, (box, [c.bbox for c in res.cells])
    # The mask agrees with the reference mask of the field (rough polygons: IoU >= 0.7).
    ref = cv2.imread(str(FIELDS / f"{name}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    got = res.mask > 0
    assert (got & ref).sum() / (got | ref).sum() >= 0.7


GOLDEN = FIELDS / "golden_shipped.json"


def _golden_for_shipped() -> str | None:
    """Why the recorded answers cannot be checked (None: they can)."""
    if not (SHIPPED / "manifest.json").is_file():
        return "no shipped models in models/ (manifest.json absent)"
    if not GOLDEN.is_file():
        return "no recorded answers; run tests/fixtures/fields/record_golden.py"
    man = json.loads((SHIPPED / "manifest.json").read_text())
    now = {m["file"]: m["sha256"] for m in man.get("models", [])} | {
        m["head"]["file"]: m["head"]["sha256"] for m in man.get("models", []) if m.get("head")
    }
    if now != json.loads(GOLDEN.read_text())["models"]:
        return "models changed since the answers were recorded; rerun record_golden.py and review"
    return None


@pytest.mark.skipif(_golden_for_shipped() is not None, reason=str(_golden_for_shipped()))
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_answers_of_the_shipped_models(shipped_analyzer: FieldAnalyzer, name: str) -> None:
    """The shipped models' recorded answer on each fixture field, labels included: a change in
    preprocessing, quantisation or postprocessing that alters it fails here. (Whether the
    answers are right is measured above for boxes and by scripts/eval_detection.py for types:
    the shipped models leave BloodImage_00007's neutrophil unidentified.)"""
    golden = json.loads(GOLDEN.read_text())["fields"][name]
    res = shipped_analyzer.analyze(read_image(FIELDS / f"{name}.jpg"), name)
    assert len(res.cells) == len(golden)
    for g in golden:
        c = max(res.cells, key=lambda c: _iou(c.bbox, g["bbox"]))
        assert _iou(c.bbox, g["bbox"]) >= 0.9, (c.bbox, g["bbox"])
        assert c.label == g["label"]
        assert abs(c.score - g["score"]) <= 0.05


def test_zero_weight_members_are_not_run(analyzer: FieldAnalyzer, two_cells: np.ndarray) -> None:
    from edge_wbc.pipeline.segment import EnsembleSegmenter, Member

    a, b = analyzer.segmenter.members
    calls: list[str] = []

    class Spy:
        def __init__(self, name: str, model: TFLiteModel) -> None:
            self.name, self.model = name, model
            self.input_hw = model.input_hw

        def infer_pixels(self, px: np.ndarray) -> list[np.ndarray]:
            calls.append(self.name)
            return self.model.infer_pixels(px)

    ens = EnsembleSegmenter(
        [Member("a", Spy("a", a.model), 1.0), Member("b", Spy("b", b.model), 0.0)],  # type: ignore[arg-type]
        0.5,
    )
    solo = EnsembleSegmenter([Member("a", a.model, 1.0)], 0.5)
    np.testing.assert_array_equal(ens.probability(two_cells), solo.probability(two_cells))
    assert calls == ["a"]
    with pytest.raises(ValueError, match="negative"):
        EnsembleSegmenter([Member("a", a.model, 1.0), Member("b", b.model, -0.5)])
