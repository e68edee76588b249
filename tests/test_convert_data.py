"""Segmentation sampler: source weights, and the chroma floor in the training path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from edge_wbc_convert.data import RGB_FROM_HED, ColorAug, SegSampler, load_items, mix_stains

from edge_wbc.pipeline import preprocess as pp

DATA = Path(__file__).parent / "fixtures" / "data"


def _items() -> list:
    return [i for i in load_items(DATA, ("bccd",)) if i.mask is not None]


def test_source_weights_override_and_unknown_source_is_an_error(tmp_path: Path) -> None:
    s = SegSampler(_items(), (48, 64), tmp_path, weights={"bccd": 2.0, "zheng2": 0.5})
    assert s.weights["bccd"] == 2.0 and s.weights["zheng2"] == 0.5
    assert s.sources == ["bccd"] and s.p.tolist() == [1.0]  # only sources with images count
    x, y = s.batch(2)
    assert x.shape == (2, 48, 64, 3) and y.shape == (2, 48, 64, 1)
    with pytest.raises(ValueError, match="no segmentation source"):
        SegSampler(_items(), (48, 64), tmp_path, weights={"zheng3": 1.0})
    with pytest.raises(ValueError, match="no segmentation training images"):
        SegSampler(_items(), (48, 64), tmp_path, weights={"bccd": 0.0})


def test_augmented_fields_come_out_balanced_like_device_inputs() -> None:
    # Whatever cast and fading the augmentation applies, what the model sees went through the
    # device's white balance and chroma floor (up to the small residual cast added after it).
    bgr = cv2.imread(str(DATA / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rng = np.random.default_rng(0)
    # A dark exposure under a strong cast can leave a channel past the balance's gain limit
    # (about 1 draw in 50): most draws, not all, come out balanced; unbalanced, ~90 % would not.
    aug = ColorAug(p=1.0)
    off = [pp.background_rgb(aug(rgb, rng)) for _ in range(60)]
    balanced = [bool(np.all(np.abs(bg - pp.BACKGROUND_LEVEL) < 45)) for bg in off]
    assert sum(balanced) >= 54, off


def test_monochrome_share_drains_all_colour_and_is_off_unless_asked(tmp_path: Path) -> None:
    rgb = cv2.cvtColor(
        cv2.imread(str(DATA / "bccd" / "JPEGImages" / "BloodImage_00000.jpg")), cv2.COLOR_BGR2RGB
    )
    rng = np.random.default_rng(1)
    grey = ColorAug(mono_p=1.0).cast(rgb, rng, 0.6, 1.0).astype(int)
    assert np.abs(grey - grey[..., :1]).max() <= 1  # every pixel: R = G = B
    # Off (the classifier's setting) no draw of the 60 leaves a field without colour.
    spread = [np.ptp(ColorAug().cast(rgb, rng, 0.6).astype(int), axis=2).max() for _ in range(60)]
    assert min(spread) > 3
    s = SegSampler(_items(), (48, 64), tmp_path, mono_p=0.25)
    assert s.color.mono_p == 0.25 and SegSampler(_items(), (48, 64), tmp_path).color.mono_p == 0


def _dye(row: int, od: float) -> np.ndarray:
    """One pixel of a single dye at the given optical density."""
    return np.clip(256.0 * np.exp(-od * RGB_FROM_HED[row]) - 0.5, 0, 255).astype(np.uint8)[
        None, None
    ]


def test_mix_stains_changes_one_dye_and_leaves_the_other_and_the_background() -> None:
    azure, eosin, white = _dye(0, 0.6), _dye(1, 0.6), np.full((1, 1, 3), 255, np.uint8)
    img = np.concatenate([azure, eosin, white], axis=1)
    assert np.abs(mix_stains(img, 1.0, 1.0).astype(int) - img).max() <= 1
    more_eosin = mix_stains(img, 1.0, 1.4).astype(int)
    assert np.abs(more_eosin[0, 0] - azure[0, 0]).max() <= 2  # the nucleus dye is untouched
    assert more_eosin[0, 1, 1] < int(eosin[0, 0, 1]) - 10  # eosin absorbs green: pinker
    assert np.abs(more_eosin[0, 2] - 255).max() <= 1  # no dye, no change
    less_azure = mix_stains(img, 0.6, 1.0).astype(int)
    assert (
        less_azure[0, 0].sum() > int(azure.sum()) + 30
        and abs(less_azure[0, 1] - eosin[0, 0]).max() <= 2
    )


def test_stain_mix_draws_gains_within_the_configured_range() -> None:
    rgb = _field()[:64, :64]
    rng = np.random.default_rng(3)
    assert np.array_equal(ColorAug(stain_gain=0.0).stain_mix(rgb, rng), mix_stains(rgb, 1.0, 1.0))
    outs = [ColorAug(stain_gain=0.35).stain_mix(rgb, rng) for _ in range(6)]
    assert any(np.abs(o.astype(int) - rgb).mean() > 1.0 for o in outs)
    assert all(o.shape == rgb.shape and o.dtype == np.uint8 for o in outs)


def _field() -> np.ndarray:
    bgr = cv2.imread(str(DATA / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_context_patch_crop_matches_the_device_crop() -> None:
    # Training augments only the cell's surroundings; with no augmentation the crop must be
    # what the device crops from the whole balanced field.
    from edge_wbc_convert.cells import context_patch

    rgb = _field()
    box = (250, 180, 360, 290)  # a 110-px box: the patch is downscaled to 84 px for a 96-px crop
    patch, pbox = context_patch(rgb, box)
    assert max(pbox[2] - pbox[0], pbox[3] - pbox[1]) <= 90
    ours = pp.cell_crop(pp.white_balance(patch), pbox, 96).astype(np.float32)
    device = pp.cell_crop(pp.white_balance(rgb), box, 96).astype(np.float32)
    assert np.abs(ours - device).mean() < 6.0


def test_context_patch_at_the_field_corner_is_filled_with_the_field_background() -> None:
    from edge_wbc_convert.cells import context_patch

    rgb = _field()
    patch, pbox = context_patch(rgb, (0, 0, 40, 40))  # small box: kept at native resolution
    assert pbox == (28, 28, 68, 68)
    outside = patch[:20, :20].reshape(-1, 3).astype(np.float32)
    assert np.allclose(outside, pp.background_rgb(rgb).astype(np.uint8), atol=1)


def test_augmented_crop_sampler_gives_unit_crops_of_every_label() -> None:
    from edge_wbc_convert.cells import LABELS6, CellItem, CropSampler

    img = DATA / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
    cells = [
        CellItem("bccd", img, "train", "neutrophil", (250, 180, 360, 290)),
        CellItem("pbc", img, "train", "other", (0, 0, 40, 40)),
    ]
    s = CropSampler(cells, 32, seed=1)
    x, y = s.batch(16)
    assert x.shape == (16, 32, 32, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    got = {LABELS6[int(k)] for k in y.argmax(1)}
    assert got == {"neutrophil", "other"}


def test_crop_sampler_source_weights_override_and_unknown_source_is_an_error() -> None:
    from edge_wbc_convert.cells import CellItem, CropSampler

    img = DATA / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
    cells = [
        CellItem("bccd", img, "train", "neutrophil", (250, 180, 360, 290)),
        CellItem("pbc", img, "train", "neutrophil", (0, 0, 40, 40)),
    ]
    only_bccd = CropSampler(cells, 32, seed=2, augment=False, source_weights={"pbc": 0.0})
    assert only_bccd.source_weight["pbc"] == 0.0 and only_bccd.source_weight["bccd"] == 0.25
    seen: list[str] = []

    def record(c: CellItem, rng: object, augment: bool) -> np.ndarray:
        seen.append(c.source)
        return np.zeros((32, 32, 3), np.float32)

    only_bccd.crop = record  # type: ignore[method-assign]
    only_bccd.batch(20)
    assert set(seen) == {"bccd"}
    with pytest.raises(ValueError, match="no classifier source"):
        CropSampler(cells, 32, source_weights={"zheng3": 1.0})


def test_raabin_reads_become_typed_cells_in_their_images_split(tmp_path: Path) -> None:
    from edge_wbc_convert.cells import RAABIN_READS, raabin_cells, read_reads
    from edge_wbc_convert.data import Item

    reads = tmp_path / "reads.csv"
    reads.write_text(
        "# comment line\n"
        "split,sheet_no,image,x0,y0,x1,y1,read\n"
        "train,0,a.jpg,1,2,30,40,eosinophil\n"
        "train,1,a.jpg,50,60,90,99,\n"  # not callable: no cell
        "test,2,b.jpg,5,6,70,80,basophil\n"
        "val,3,gone.jpg,5,6,70,80,monocyte\n"  # an image the data folder lacks
    )
    items = [
        Item(source="raabin", image=tmp_path / "a.jpg", split="train", boxes=[]),
        Item(source="raabin", image=tmp_path / "b.jpg", split="test", boxes=[]),
        Item(source="bccd", image=tmp_path / "gone.jpg", split="val", boxes=[]),
    ]
    cells = raabin_cells(items, reads)
    assert [(c.image.name, c.split, c.label, c.box) for c in cells] == [
        ("a.jpg", "train", "eosinophil", (1, 2, 30, 40)),
        ("b.jpg", "test", "basophil", (5, 6, 70, 80)),
    ]
    assert all(c.source == "raabin" for c in cells)
    assert raabin_cells([i for i in items if i.source == "bccd"], reads) == []

    reads.write_text("split,sheet_no,image,x0,y0,x1,y1,read\ntrain,0,a.jpg,1,2,3,4,eosinophill\n")
    with pytest.raises(ValueError, match="eosinophill"):
        raabin_cells(items, reads)
    # The shipped reads parse, and every split has callable cells.
    rows = read_reads(RAABIN_READS)
    assert {r["split"] for r in rows if r["read"]} == {"train", "val", "test"}


def test_field_red_cells_and_platelets_become_a_fixed_other_sample() -> None:
    from edge_wbc_convert.cells import bccd_other_cells
    from edge_wbc_convert.data import voc_boxes

    items = load_items(DATA, ("bccd",))
    cells = bccd_other_cells(items, {"train": 5, "val": 3})
    assert cells and all(c.label == "other" and c.source == "bccd" for c in cells)
    by_split = {s: [c for c in cells if c.split == s] for s in ("train", "val", "test")}
    assert len(by_split["train"]) <= 5 and len(by_split["val"]) <= 3 and not by_split["test"]
    for c in cells:
        xml = c.image.parent.parent / "Annotations" / f"{c.image.stem}.xml"
        assert c.box in voc_boxes(xml, "RBC") + voc_boxes(xml, "Platelets")
        assert c.box[2] - c.box[0] >= 12 and c.box[3] - c.box[1] >= 12
        assert c.box not in voc_boxes(xml, "WBC")
    # The same sample every time: a release must rebuild the cells a run was trained on.
    assert bccd_other_cells(items, {"train": 5, "val": 3}) == cells
