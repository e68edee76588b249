"""edge_wbc_convert.graph_edit: the classifier's pooled features as a second output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from edge_wbc_convert.graph_edit import (
    GraphEditError,
    add_embedding_output,
    dense_head,
    with_embedding_output,
)

from edge_wbc.pipeline.analysis import FieldAnalyzer
from edge_wbc.pipeline.classify import CellClassifier
from edge_wbc.pipeline.heads import LinearHead
from edge_wbc.pipeline.imageio import read_image
from edge_wbc.pipeline.inference import TFLiteModel
from edge_wbc.pipeline.manifest import ManifestError, label_binding, load_manifest, sha256_file

TESTS = Path(__file__).parent
FIXTURE_MODELS = TESTS / "fixtures" / "models"
SHIPPED = TESTS.parent / "models" / "classifier.tflite"


def _crops(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_edit_keeps_output_0_and_adds_the_pool(tmp_path: Path) -> None:
    src = FIXTURE_MODELS / "cls_colour.tflite"
    dst = add_embedding_output(src, tmp_path / "cls.tflite")
    a, b = TFLiteModel(src, threads=1), TFLiteModel(dst, threads=1)
    assert len(a.outputs) == 1 and [o.shape for o in b.outputs] == [(1, 6), (1, 3)]
    for x in _crops(8, 32):
        oa, ob = a.infer_pixels(x), b.infer_pixels(x)
        np.testing.assert_array_equal(oa[0], ob[0])
        # cls_colour's pool is the crop's mean colour (to one int8 step of the output).
        np.testing.assert_allclose(ob[1][0], x.reshape(-1, 3).mean(0) / 255, atol=0.01)
    assert with_embedding_output(dst.read_bytes()) == dst.read_bytes()  # idempotent
    w, bias, _ = dense_head(dst.read_bytes())
    assert w.shape == (3, 6)
    np.testing.assert_allclose(w[:, :3], 8 * np.eye(3), atol=0.1)  # the fixture's weights
    np.testing.assert_allclose(bias, [0, 0, 0, 1.5, 1.5, 0.5], atol=0.05)


def test_a_model_without_the_pool_is_refused() -> None:
    with pytest.raises(GraphEditError, match="global_average_pooling2d"):
        with_embedding_output((FIXTURE_MODELS / "seg_dark.tflite").read_bytes())


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped classifier in models/")
def test_shipped_classifier_emits_its_embedding_and_head() -> None:
    man = load_manifest(SHIPPED.parent)
    assert man.classifier is not None
    m = TFLiteModel(SHIPPED, threads=1)
    assert [o.shape for o in m.outputs] == [(1, len(man.classifier.classes)), (1, 1280)]
    w, bias, _ = dense_head(SHIPPED.read_bytes())
    for x in _crops(3, man.classifier.input_hw[0]):
        probs, emb = m.infer_pixels(x)
        z = emb[0].astype(np.float64) @ w + bias
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        # The dequantised Dense head on the float embedding is the int8 head to a few steps.
        np.testing.assert_allclose(p, probs[0], atol=6 / 256)


def _models_with_embedding(tmp_path: Path, declare: object) -> Path:
    for f in FIXTURE_MODELS.iterdir():
        shutil.copy(f, tmp_path / f.name)
    add_embedding_output(tmp_path / "cls_colour.tflite")
    raw = json.loads((tmp_path / "manifest.json").read_text())
    cls = next(m for m in raw["models"] if m["task"] == "classification")
    cls["sha256"] = sha256_file(tmp_path / "cls_colour.tflite")
    if declare is not None:
        cls["embedding"] = declare
    cls["label_binding"] = label_binding(cls)  # a release of the edited model
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    return tmp_path


def test_cells_carry_the_embedding_mean_over_views(tmp_path: Path) -> None:
    models = _models_with_embedding(tmp_path, {"output_index": 1, "shape": [1, 3]})
    assert load_manifest(models).classifier.embedding_dim == 3
    a = FieldAnalyzer(models, threads=1)
    res = a.analyze(read_image(TESTS / "fixtures" / "fields" / "BloodImage_00249.jpg"), "f")
    assert res.cells and all(c.embedding is not None for c in res.cells)
    for c in res.cells:
        assert c.embedding.dtype == np.float32 and c.embedding.shape == (3,)
        np.testing.assert_allclose(c.embedding, c.crop.reshape(-1, 3).mean(0) / 255, atol=0.01)
        assert "embedding" not in c.to_json()
    # Four views: each one's pool is dequantised, then averaged.
    clf = CellClassifier(a.classifier.model, a.classifier.classes, views=4)
    crop = res.cells[0].crop
    rots = [np.ascontiguousarray(np.rot90(crop, k)) for k in range(4)]
    views = [a.classifier.model.infer_pixels(v)[1][0] for v in rots]
    np.testing.assert_allclose(clf.classify(crop).embedding, np.mean(views, 0), rtol=1e-6)


def test_single_output_models_have_no_embedding(tmp_path: Path) -> None:
    a = FieldAnalyzer(FIXTURE_MODELS, threads=1)
    assert a.classifier.embedding_dim is None
    res = a.analyze(read_image(TESTS / "fixtures" / "fields" / "BloodImage_00249.jpg"), "f")
    assert res.cells and all(c.embedding is None for c in res.cells)


def test_manifest_and_model_must_agree_on_the_embedding(tmp_path: Path) -> None:
    models = _models_with_embedding(tmp_path, {"output_index": 1, "shape": [1, 7]})
    with pytest.raises(ManifestError, match="declares a 7-d embedding output, the model has 3-d"):
        FieldAnalyzer(models, threads=1)
    raw = json.loads((models / "manifest.json").read_text())
    cls = next(m for m in raw["models"] if m["task"] == "classification")
    cls["embedding"] = {"shape": [2, 3]}
    cls["label_binding"] = label_binding(cls)
    (models / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"models\[2\]\.embedding"):
        load_manifest(models)
    # A declared embedding on a model that has none.
    shutil.copy(FIXTURE_MODELS / "cls_colour.tflite", models / "cls_colour.tflite")
    cls["embedding"] = {"output_index": 1, "shape": [1, 3]}
    cls["sha256"] = sha256_file(models / "cls_colour.tflite")
    cls["label_binding"] = label_binding(cls)
    (models / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="3-d embedding output, the model has none"):
        FieldAnalyzer(models, threads=1)


FINE = (
    "band_neutrophil", "segmented_neutrophil", "eosinophil", "basophil", "lymphocyte",
    "monocyte", "immature_granulocyte", "erythroblast", "platelet", "other",
)  # fmt: skip


def _with_head(models: Path, base_sha256: str) -> LinearHead:
    """A head on cls_colour's 3-d embedding (mean colour): red -> band, green -> erythroblast."""
    w = np.zeros((3, len(FINE)))
    w[0, 0] = 40.0
    w[1, 7] = 40.0
    head = LinearHead(FINE, w, np.zeros(len(FINE)), base_sha256, 1.0, 0.5, 0.9)
    jp = head.save(models / "classifier_fine.json")
    raw = json.loads((models / "manifest.json").read_text())
    cls = next(m for m in raw["models"] if m["task"] == "classification")
    cls["head"] = {"file": jp.name, "sha256": sha256_file(jp), "classes": list(FINE)}
    (models / "manifest.json").write_text(json.dumps(raw))
    return head


def test_a_head_in_the_manifest_names_the_cells(tmp_path: Path) -> None:
    models = _models_with_embedding(tmp_path, {"output_index": 1, "shape": [1, 3]})
    base = sha256_file(models / "cls_colour.tflite")
    head = _with_head(models, base)
    a = FieldAnalyzer(models, threads=1)
    assert a.classifier.head is not None and a.classifier.labels == FINE
    cls = next(m for m in a.describe()["models"] if m["task"] == "classification")
    assert cls["head"] == {"file": "classifier_fine.json", "sha256": sha256_file(
        models / "classifier_fine.json")}  # fmt: skip
    res = a.analyze(read_image(TESTS / "fixtures" / "fields" / "BloodImage_00249.jpg"), "f")
    assert res.cells
    for c in res.cells:
        assert set(c.probs) == set(FINE)
        want = head.probs(c.embedding)
        np.testing.assert_allclose([c.probs[k] for k in FINE], want, rtol=1e-5)
    # The same crop by hand: the head on the mean of the views' embeddings.
    crop = res.cells[0].crop
    views = [a.classifier.model.infer_pixels(np.ascontiguousarray(np.rot90(crop, k)))[1][0]
             for k in range(a.classifier.views)]  # fmt: skip
    p = a.classifier.classify(crop)
    np.testing.assert_allclose(p.embedding, np.mean(views, 0), rtol=1e-6)


def test_a_head_for_another_classifier_or_tampered_is_refused(tmp_path: Path) -> None:
    models = _models_with_embedding(tmp_path, {"output_index": 1, "shape": [1, 3]})
    _with_head(models, "0" * 64)
    with pytest.raises(ManifestError, match="fitted on the classifier with sha256 000000"):
        FieldAnalyzer(models, threads=1)
    _with_head(models, sha256_file(models / "cls_colour.tflite"))
    raw = json.loads((models / "manifest.json").read_text())
    cls = next(m for m in raw["models"] if m["task"] == "classification")
    cls["head"]["classes"] = [*FINE[1:], FINE[0]]
    (models / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"classifier_fine\.json: classes"):
        FieldAnalyzer(models, threads=1)
    cls["head"]["classes"] = list(FINE)
    (models / "manifest.json").write_text(json.dumps(raw))
    (models / "classifier_fine.json").write_text(
        (models / "classifier_fine.json")
        .read_text()
        .replace('"temperature": 1.0', '"temperature": 2.0')
    )
    with pytest.raises(ManifestError, match=r"head file .* does not match the manifest"):
        load_manifest(models)
    del cls["embedding"]
    (models / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="a head reads the embedding"):
        load_manifest(models)


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped classifier in models/")
def test_the_shipped_classifier_names_the_fine_classes_and_emits_its_embedding() -> None:
    from edge_wbc import taxonomy

    man = load_manifest(SHIPPED.parent)
    ce = man.classifier
    assert ce is not None and ce.classes == taxonomy.MODEL_CLASSES
    # The ten outputs are the network's own now: no head file on the embedding, which lab
    # adaptation still reads.
    assert ce.head is None and ce.embedding_dim == 1280
    assert 0.0 < ce.confidence_threshold <= (ce.other_threshold or 1.0) < 1.0
