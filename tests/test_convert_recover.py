"""Float weights recovered from the int8 models (classifier and U-Nets), the float files kept in
models/, and the ten-output (fine) training pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from edge_wbc_convert.cells import CellItem, CropSampler
from edge_wbc_convert.fine import ALLOWED, FINE, fine_cells

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "fixtures" / "data"
pytestmark = pytest.mark.slow


def test_recovered_classifier_reproduces_the_shipped_int8_file() -> None:
    import json

    from edge_wbc_convert.recover import agreement, recover_classifier

    int8 = ROOT / "models" / "classifier.tflite"
    man = json.loads((ROOT / "models" / "manifest.json").read_text())
    entry = next(m for m in man["models"] if m["task"] == "classification")
    size = int(entry["input"]["shape"][1])
    model = recover_classifier(int8, "mnv2", size, 0.75, len(entry["classes"]))
    rng = np.random.default_rng(0)
    # Smooth blobs on a light background: crops the int8 file gives varied answers on.
    yy, xx = np.mgrid[0:size, 0:size]
    crops = []
    for _ in range(24):
        u = size / 96
        cx, cy, r = rng.uniform(30, 66) * u, rng.uniform(30, 66) * u, rng.uniform(12, 30) * u
        col = rng.uniform(0.2, 0.8, 3)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        crops.append(np.where(blob, col, 0.88).astype(np.float32))
    rep = agreement(model, int8, np.stack(crops))
    assert rep["top1_agreement"] >= 0.95
    assert rep["mean_abs_prob_diff"] < 0.02


def test_a_recovered_model_from_another_architecture_is_refused() -> None:
    from edge_wbc_convert.recover import recover_classifier

    with pytest.raises(ValueError, match=r"not this architecture|weighted"):
        recover_classifier(ROOT / "models" / "classifier.tflite", "mnv2", 96, 0.5, 10)


def _fixture_pairs() -> list:
    from edge_wbc_convert.data import load_items, seg_eval_pairs

    return seg_eval_pairs(load_items(DATA, ("bccd",)), DATA)


@pytest.mark.parametrize("encoder", ["mnv2", "mnv3s", "rescnn"])
def test_recovered_unets_reproduce_the_shipped_int8_files(encoder: str) -> None:
    from edge_wbc_convert.recover import recover_unet, seg_agreement

    int8 = ROOT / "models" / f"seg_{encoder}.tflite"
    model = recover_unet(int8, encoder, (192, 256))
    fields = [(it.source, rgb) for it, rgb, _ in _fixture_pairs()]
    rep = seg_agreement(model, int8, fields, 0.55)
    assert rep["n"] == 6
    assert rep["mean_iou"] >= 0.97, rep
    assert rep["mean_abs_prob_diff"] < 0.01, rep


def test_ops_are_matched_by_their_place_in_the_graph_not_their_order() -> None:
    from edge_wbc_convert.architectures import build_unet
    from edge_wbc_convert.recover import match, read_graph

    int8 = ROOT / "models" / "seg_mnv2.tflite"
    model = build_unet("mnv2", (192, 256))
    ops = read_graph(int8)
    plain = [(s.layer.name, s.part, o.position) for s, o in match(model, ops, "x")]
    shuffled = list(ops)
    np.random.default_rng(1).shuffle(shuffled)
    assert [(s.layer.name, s.part, o.position) for s, o in match(model, shuffled, "x")] == plain
    # A skip reaches the decoder: some op takes two upstream ops, the encoder's among them.
    assert any(len(o.upstream) == 2 for o in ops)


def test_an_op_named_for_another_layer_is_refused() -> None:
    import dataclasses

    from edge_wbc_convert.architectures import build_unet
    from edge_wbc_convert.recover import match, read_graph

    ops = read_graph(ROOT / "models" / "seg_mnv2.tflite")
    k = next(i for i, o in enumerate(ops) if any("block_3_project" in n for n in o.names))
    ops[k] = dataclasses.replace(ops[k], names=("unet_mnv2_1/block_9_project_1/convolution",))
    with pytest.raises(ValueError, match="named for another layer"):
        match(build_unet("mnv2", (192, 256)), ops, "seg_mnv2.tflite")


def test_a_unet_of_another_architecture_is_refused() -> None:
    from edge_wbc_convert.architectures import build_unet
    from edge_wbc_convert.recover import load_into, recover_unet

    with pytest.raises(ValueError, match="weighted ops, the architecture has"):
        recover_unet(ROOT / "models" / "seg_mnv2.tflite", "mnv3s", (192, 256))
    # Same layer count, one decoder width changed: the kernels do not fit.
    narrow = build_unet("rescnn", (192, 256), decoder_filters=(96, 64, 40, 24, 8))
    with pytest.raises(ValueError, match="not this architecture"):
        load_into(narrow, ROOT / "models" / "seg_rescnn.tflite")


def test_the_float_weights_in_models_are_the_recorded_ones_and_reproduce_the_int8_files() -> None:
    import json

    from edge_wbc_convert.quantize import load_keras
    from edge_wbc_convert.recover import agreement, cell_crops, seg_agreement

    from edge_wbc.pipeline.manifest import sha256_file

    man = json.loads((ROOT / "models" / "manifest.json").read_text())
    pairs = _fixture_pairs()
    fields = [(it.source, rgb) for it, rgb, _ in pairs]
    for m in man["models"]:
        fw = m["float_weights"]
        path = ROOT / "models" / fw["file"]
        assert sha256_file(path) == fw["sha256"], fw["file"]
        model = load_keras(path)
        if m["task"] == "segmentation":
            assert fw["agreement"]["mean_iou"] >= 0.97
            rep = seg_agreement(model, ROOT / "models" / m["file"], fields, 0.55)
            assert rep["mean_iou"] >= 0.97, (m["name"], rep)
        else:
            assert fw["agreement"]["top1_agreement"] >= 0.97
            size = int(m["input"]["shape"][1])
            rep = agreement(model, ROOT / "models" / m["file"], cell_crops(pairs, size))
            assert rep["n"] >= 6 and rep["top1_agreement"] >= 0.9, rep


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
