"""`edge-wbc analyze` / `bench`: the JSON contract, masks, overlays and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from edge_wbc.cli import analyze as cli_analyze
from edge_wbc.taxonomy import group_of

TESTS = Path(__file__).parent
FIXTURE_MODELS = TESTS / "fixtures" / "models"
FIELDS = TESTS / "fixtures" / "fields"

IMAGE_KEYS = {"path", "width", "height", "error", "cells", "quality", "timing_ms", "model"}
CELL_KEYS = {"bbox", "label", "group", "score", "probs", "area_px"}


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()
    cli_analyze.register(a)
    return a


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(f'[models]\ndir = "{FIXTURE_MODELS}"\n\n[postprocess]\ncell_diameter_px = 170.0\n')
    return p


@pytest.fixture()
def batch(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(FIELDS / "BloodImage_00249.jpg", d / "two.jpg")
    grey = cv2.imread(str(FIELDS / "BloodImage_00007.jpg"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(d / "grey16.png"), grey.astype(np.uint16) * 257)
    return d


def _run(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, ["analyze", *args])
    return r.exit_code, r.stdout, r.stderr


def test_registered_in_the_main_command() -> None:
    from edge_wbc.cli import app as main_app

    names = {c.name for c in main_app.registered_commands}
    assert {"analyze", "bench"} <= names


def test_json_contract_masks_and_overlays(
    app: typer.Typer, batch: Path, config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.json"
    code, stdout, _ = _run(
        app, str(batch), "--config", str(config), "--json", str(out),
        "--masks", str(tmp_path / "masks"), "--overlays", str(tmp_path / "ov"),
    )  # fmt: skip
    assert code == 0, stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == "edge-wbc/analysis/2"
    assert doc["models"]["accelerator"] == "cpu" and len(doc["models"]["models"]) == 3
    assert doc["models"]["cell_diameter_px"] == 170.0
    cls_sha = json.loads((FIXTURE_MODELS / "manifest.json").read_text())["models"][-1]["sha256"]
    assert doc["models"]["classifier_sha256"] == cls_sha and doc["models"]["adaptation"] is None
    assert [Path(i["path"]).name for i in doc["images"]] == ["grey16.png", "two.jpg"]
    for img in doc["images"]:
        assert set(img) == IMAGE_KEYS and img["error"] is None
        assert img["model"] == {"classifier_sha256": cls_sha, "adaptation": None}
        assert (img["width"], img["height"]) == (640, 480)
        assert {"preprocess", "segment", "postprocess", "classify", "total"} <= set(
            img["timing_ms"]
        )
        assert "flags" in img["quality"]
        for c in img["cells"]:
            assert set(c) == CELL_KEYS
            assert c["group"] == group_of(c["label"])
            x0, y0, x1, y1 = c["bbox"]
            assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
            assert c["label"] in (
                "neutrophil",
                "eosinophil",
                "basophil",
                "lymphocyte",
                "monocyte",
                "unidentified",
                "other",
            )
    two = doc["images"][1]
    assert len(two["cells"]) == 2
    for stem in ("two", "grey16"):
        m = cv2.imread(str(tmp_path / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert m.dtype == np.uint8 and m.shape == (480, 640)
        assert set(np.unique(m)) <= {0, 255}
        assert (tmp_path / "ov" / f"{stem}.jpg").is_file()
    m = cv2.imread(str(tmp_path / "masks" / "two.png"), cv2.IMREAD_UNCHANGED)
    counted = [c for c in two["cells"] if c["label"] != "other"]
    assert int((m == 255).sum()) == sum(c["area_px"] for c in counted)
    for c in counted:  # every counted cell is in the mask, inside its box
        x0, y0, x1, y1 = c["bbox"]
        assert (m[y0:y1, x0:x1] == 255).sum() == c["area_px"]
    assert "2 of 2 image(s) analysed" in stdout


def test_a_corrupt_file_fails_alone_with_exit_1(
    app: typer.Typer, batch: Path, config: Path, tmp_path: Path
) -> None:
    data = (FIELDS / "BloodImage_00015.jpg").read_bytes()
    (batch / "cut.jpg").write_bytes(data[: len(data) // 3])
    (batch / "empty.png").write_bytes(b"")
    out = tmp_path / "out.json"
    code, stdout, _ = _run(
        app, str(batch), "--config", str(config), "--json", str(out), "--masks", str(tmp_path / "m")
    )
    assert code == 1
    doc = json.loads(out.read_text())
    by_name = {Path(i["path"]).name: i for i in doc["images"]}
    assert set(by_name) == {"cut.jpg", "empty.png", "grey16.png", "two.jpg"}
    assert "truncated JPEG" in by_name["cut.jpg"]["error"] and by_name["cut.jpg"]["cells"] == []
    assert by_name["empty.png"]["error"] == "empty file"
    assert by_name["two.jpg"]["error"] is None and len(by_name["two.jpg"]["cells"]) == 2
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["grey16.png", "two.png"]
    assert "2 failed" in stdout


def test_json_to_stdout(app: typer.Typer, config: Path) -> None:
    code, stdout, stderr = _run(
        app, str(FIELDS / "BloodImage_00007.jpg"), "--config", str(config), "--json", "-"
    )
    assert code == 0
    doc = json.loads(stdout)
    assert doc["images"][0]["path"].endswith("BloodImage_00007.jpg")
    assert "1 of 1 image(s) analysed" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope.jpg"], "no such file"),
        ([str(FIELDS / "BloodImage_00007.jpg"), "--accelerator", "gpu"], "--accelerator"),
        ([str(FIELDS / "BloodImage_00007.jpg"), "--models", "/nonexistent"], "manifest.json"),
        ([str(FIXTURE_MODELS)], "no images found"),
        (
            [str(FIELDS / "BloodImage_00007.jpg"), "--json", "/nonexistent/dir/out.json"],
            "does not exist",
        ),
        # refused before the batch, not after analysing it all
        ([str(FIELDS / "BloodImage_00007.jpg"), "--json", str(FIELDS)], "is a folder"),
    ],
)
def test_usage_errors_exit_2(app: typer.Typer, config: Path, args: list[str], message: str) -> None:
    code, _stdout, stderr = _run(app, *args, "--config", str(config))
    assert code == 2
    assert message in stderr


def test_no_paths_is_a_usage_error(app: typer.Typer) -> None:
    assert _run(app)[0] == 2


def test_clashing_output_names_are_refused(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(FIELDS / "BloodImage_00007.jpg", tmp_path / "a" / "x.jpg")
    shutil.copy(FIELDS / "BloodImage_00015.jpg", tmp_path / "b" / "x.jpg")
    code, _, stderr = _run(
        app,
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--config",
        str(config),
        "--masks",
        str(tmp_path / "m"),
    )
    assert code == 2 and "overwrite" in stderr
    assert not (tmp_path / "m" / "x.png").exists()


def test_bad_config_is_a_usage_error(app: typer.Typer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[postprocess]\ncell_diameter = 3\n")
    code, _, stderr = _run(app, str(FIELDS / "BloodImage_00007.jpg"), "--config", str(bad))
    assert code == 2 and "cell_diameter" in stderr


def test_bench_prints_the_table(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "--config",
            str(config),
            "--runs",
            "3",
            "--warmup",
            "1",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    for row in (
        "segment",
        "postprocess",
        "classify",
        "decode + total",
        "model load",
        "peak RSS",
        "segmenter seg-dark-a",
    ):
        assert row in r.stdout
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["peak_rss_mb"] > 0 and doc["load_ms"] > 0 and doc["stages_ms"]["total"]["median"] > 0


def test_odd_inputs_on_the_command_line_are_each_their_own_error(
    app: typer.Typer, batch: Path, config: Path, tmp_path: Path
) -> None:
    import os

    d = tmp_path / "odd"
    d.mkdir()
    data = (FIELDS / "BloodImage_00249.jpg").read_bytes()
    (d / "cut60.jpg").write_bytes(data[: int(len(data) * 0.6)] + b"\xff\xd9")
    (d / "short.tif").write_bytes(b"II*\x00\x08")
    cv2.imwrite(str(d / "tiny.png"), np.full((32, 32, 3), 200, np.uint8))
    os.mkfifo(d / "fifo.jpg")
    (d / "loop1.jpg").symlink_to(d / "loop2.jpg")
    (d / "loop2.jpg").symlink_to(d / "loop1.jpg")
    (d / "dangling.jpg").symlink_to(d / "never.jpg")
    (d / "unreadable.jpg").write_bytes(data)
    real_open = os.open

    def deny(path: object, *args: object, **kw: object) -> int:
        if str(path).endswith("unreadable.jpg"):  # tests run as root: chmod denies nothing
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    names = ["cut60.jpg", "short.tif", "tiny.png", "fifo.jpg", "loop1.jpg", "dangling.jpg",
             "unreadable.jpg"]  # fmt: skip
    out = tmp_path / "out.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", deny)
        code, stdout, _ = _run(
            app, *(str(d / n) for n in names), str(batch / "two.jpg"),
            "--config", str(config), "--json", str(out),
        )  # fmt: skip
    assert code == 1, stdout
    by_name = {Path(i["path"]).name: i for i in json.loads(out.read_text())["images"]}
    assert set(by_name) == {*names, "two.jpg"}
    expected = {
        "cut60.jpg": "Corrupt JPEG data",
        "short.tif": "truncated TIFF",
        "tiny.png": "too small (32x32)",
        "fifo.jpg": "not a regular file (a FIFO)",
        "loop1.jpg": "symbolic link loop",
        "dangling.jpg": "no such file (a link",
        "unreadable.jpg": "Permission denied",
    }
    for name, message in expected.items():
        assert message in (by_name[name]["error"] or ""), (name, by_name[name]["error"])
        assert by_name[name]["cells"] == []
    assert by_name["two.jpg"]["error"] is None and len(by_name["two.jpg"]["cells"]) == 2
    assert "7 failed" in stdout


def test_multi_page_tiff_note(app: typer.Typer, config: Path, tmp_path: Path) -> None:
    from PIL import Image

    rgb = cv2.cvtColor(cv2.imread(str(FIELDS / "BloodImage_00249.jpg")), cv2.COLOR_BGR2RGB)
    pages = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    p = tmp_path / "stack.tif"
    pages[0].save(p, save_all=True, append_images=pages[1:])
    out = tmp_path / "out.json"
    code, stdout, _ = _run(app, str(p), "--config", str(config), "--json", str(out))
    assert code == 0, stdout
    img = json.loads(out.read_text())["images"][0]
    assert img["notes"] == ["the file has 2 pages: page 1 was used"]
    assert len(img["cells"]) == 2
    assert "note: the file has 2 pages: page 1 was used" in stdout


def test_a_large_frame_is_analysed_reduced_in_the_files_pixels(
    app: typer.Typer, batch: Path, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The 640x480 field stands in for a frame over ANALYSIS_MAX_PIXELS (4 MP, slow in a test).
    from edge_wbc.pipeline import imageio

    field = batch / "two.jpg"
    full_out, small_out = tmp_path / "full.json", tmp_path / "small.json"
    assert _run(app, str(field), "--config", str(config), "--json", str(full_out))[0] == 0
    monkeypatch.setattr(imageio, "ANALYSIS_MAX_PIXELS", 100_000)
    code, stdout, _ = _run(
        app, str(field), "--config", str(config), "--json", str(small_out),
        "--masks", str(tmp_path / "m"), "--overlays", str(tmp_path / "ov"),
    )  # fmt: skip
    assert code == 0, stdout
    full = json.loads(full_out.read_text())["images"][0]
    small = json.loads(small_out.read_text())["images"][0]
    assert (small["width"], small["height"]) == (640, 480)
    assert "640x480 analysed reduced to 365x273" in small["notes"][0]
    assert len(small["cells"]) == len(full["cells"]) == 2
    pairs = zip(
        sorted(full["cells"], key=lambda c: c["bbox"]),
        sorted(small["cells"], key=lambda c: c["bbox"]),
        strict=True,
    )
    for a, b in pairs:  # the same cells, in the same place, of the same size and type
        assert max(abs(u - v) for u, v in zip(a["bbox"], b["bbox"], strict=True)) <= 12
        assert abs(a["area_px"] - b["area_px"]) / a["area_px"] < 0.15
        assert a["label"] == b["label"]
    m = cv2.imread(str(tmp_path / "m" / "two.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == (480, 640)
    counted = [c for c in small["cells"] if c["label"] != "other"]
    assert int((m == 255).sum()) == sum(c["area_px"] for c in counted)
    assert cv2.imread(str(tmp_path / "ov" / "two.jpg")).shape[:2] == (273, 365)


def _rebind(m: dict) -> None:
    from edge_wbc.pipeline.manifest import label_binding

    m["label_binding"] = label_binding(m)


def _seg(raw: dict) -> dict:
    return raw["models"][0]


def _cls(raw: dict) -> dict:
    return raw["models"][2]


def _swap_classes(raw: dict) -> None:
    c = _cls(raw)["classes"]
    c[0], c[3] = c[3], c[0]  # neutrophil <-> lymphocyte, binding left as released


def _drop_other(raw: dict) -> None:
    _cls(raw)["classes"].remove("other")  # released with a list one short of the outputs
    _rebind(_cls(raw))


def _unknown_class(raw: dict) -> None:
    _cls(raw)["classes"][5] = "blast"
    _rebind(_cls(raw))


def _twice(raw: dict) -> None:
    _cls(raw)["classes"][5] = "monocyte"
    _rebind(_cls(raw))


def _output_type(raw: dict) -> None:
    _cls(raw)["output"] = {"type": "odds"}
    _rebind(_cls(raw))


def _set(path: str, value: object):  # type: ignore[no-untyped-def]
    def edit(raw: dict) -> None:
        *head, last = path.split(".")
        d: object = raw
        for k in head:
            d = d[int(k)] if isinstance(d, list) else d.setdefault(k, {})  # type: ignore[index,union-attr]
        d[int(last) if isinstance(d, list) else last] = value  # type: ignore[index]

    return edit


def _all_weights_zero(raw: dict) -> None:
    for m in raw["models"][:2]:
        m["ensemble_weight"] = 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_swap_classes, "models[2].label_binding: the classes, output or embedding of 'cls-col"),
        (_set("ensemble.threshold", 5.0), "ensemble.threshold: 5.0 is not in (0, 1]"),
        (_set("models.2.calibration.confidence_threshold", 5.0),
         "models[2].calibration.confidence_threshold: 5.0 is not in [0, 1]"),
        (_set("models.2.calibration.other_threshold", -0.1),
         "models[2].calibration.other_threshold: -0.1 is not in [0, 1]"),
        (_set("models.2.calibration.temperature", 0), "models[2].calibration.temperature: 0"),
        (_drop_other, "classifier has 6 outputs but the manifest lists 5 classes"),
        (_unknown_class, "models[2].classes: ['blast'] unknown"),
        (_twice, "models[2].classes: ['monocyte'] listed twice"),
        (_output_type, "models[2].output.type: 'odds'"),
        (_set("models", {"a": 1}), "models: expected a list of models, got dict"),
        (_set("models.1", ["seg_dark.tflite"]), "models[1]: expected an object, got list"),
        (_set("models.0.ensemble_weight", "0.5"),
         "models[0].ensemble_weight: expected a number, got str"),
        (_set("models.0.ensemble_weight", True), "models[0].ensemble_weight: expected a number"),
        (_set("models.0.ensemble_weight", float("nan")),
         "models[0].ensemble_weight: nan is not a finite number"),
        (_set("models.0.ensemble_weight", float("inf")), "models[0].ensemble_weight: inf"),
        (_all_weights_zero, "the segmenters' weights sum to 0"),
        (_set("models.0.input.shape", ["1", "96", "128", "3"]),
         "models[0].input.shape[0]: expected an integer, got str"),
        (_set("models.0.file", "../models/seg_dark.tflite"), "models[0].file: '../models/"),
        (_set("models.0.sha256", "abc"), "models[0].sha256: expected a sha256"),
        (_set("models.0.label_binding", None), "models[0].label_binding: missing"),
        (_set("models.2.views", True), "models[2]: views True is not one of 1, 2, 4, 8"),
        (_set("models.2.calibration", [1.0, 0.4]), "models[2].calibration: expected an object"),
        (_set("models.2.preprocessing.crop_scale", 0.1),
         "models[2].preprocessing.crop_scale: 0.1 is not in [1, 4]"),
        (_set("ensemble", "0.5"), "ensemble: expected an object, got str"),
    ],
)
def test_bad_manifest_values_exit_2_naming_the_key(
    app: typer.Typer, tmp_path: Path, edit: object, message: str
) -> None:
    models = tmp_path / "models"
    shutil.copytree(FIXTURE_MODELS, models)
    raw = json.loads((models / "manifest.json").read_text())
    edit(raw)  # type: ignore[operator]
    (models / "manifest.json").write_text(json.dumps(raw))
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[models]\ndir = "{models}"\n')
    r = CliRunner().invoke(app, ["analyze", str(FIELDS / "BloodImage_00007.jpg"), "--config",
                                 str(cfg)])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output and isinstance(r.exception, (SystemExit, type(None)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "the manifest: expected an object, got list"),
        ("[" * 30000 + "]" * 30000, "nested too deeply"),
        ('{"schema": "edge-wbc/manifest/1", "models": [], "x": NaN}', "no segmentation model"),
    ],
)
def test_manifest_that_is_not_an_object(
    app: typer.Typer, tmp_path: Path, text: str, message: str
) -> None:
    models = tmp_path / "models"
    shutil.copytree(FIXTURE_MODELS, models)
    (models / "manifest.json").write_text(text)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[models]\ndir = "{models}"\n')
    r = CliRunner().invoke(app, ["analyze", str(FIELDS / "BloodImage_00007.jpg"), "--config",
                                 str(cfg)])  # fmt: skip
    assert r.exit_code == 2 and message in r.stderr, r.output


def test_shipped_manifests_are_bound() -> None:
    from edge_wbc.pipeline.manifest import label_binding, load_manifest

    for folder in (FIXTURE_MODELS, TESTS.parent / "models"):
        man = load_manifest(folder, verify=True)
        for e in man.models:
            assert e.raw["label_binding"] == label_binding(e.raw)


def test_paths_that_cannot_be_looked_at_are_each_their_own_error(
    app: typer.Typer, batch: Path, config: Path, tmp_path: Path
) -> None:
    # As a user without permission sees them (tests run as root, so EACCES is simulated): a
    # file inside a folder it may not search, a folder it may not list.
    import os

    hidden = tmp_path / "private" / "f.jpg"
    hidden.parent.mkdir()
    shutil.copy(FIELDS / "BloodImage_00007.jpg", hidden)
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(FIELDS / "BloodImage_00007.jpg", locked / "g.jpg")
    denied = PermissionError(13, "Permission denied")
    real = {"lstat": os.lstat, "open": os.open, "is_dir": Path.is_dir, "iterdir": Path.iterdir}

    def lstat(p: object, *a: object, **k: object) -> os.stat_result:
        if str(p) == str(hidden):
            raise denied
        return real["lstat"](p, *a, **k)  # type: ignore[operator,no-any-return]

    def os_open(p: object, *a: object, **k: object) -> int:
        if str(p) in (str(hidden), str(locked)):
            raise denied
        return real["open"](p, *a, **k)  # type: ignore[operator,no-any-return]

    def is_dir(self: Path) -> bool:
        if str(self) == str(hidden):
            raise denied
        return real["is_dir"](self)  # type: ignore[operator,no-any-return]

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if str(self) == str(locked):
            raise denied
        return real["iterdir"](self)  # type: ignore[operator]

    out = tmp_path / "out.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "lstat", lstat)
        mp.setattr(os, "open", os_open)
        mp.setattr(Path, "is_dir", is_dir)
        mp.setattr(Path, "iterdir", iterdir)
        code, stdout, _ = _run(
            app, str(hidden), str(locked), str(batch / "two.jpg"),
            "--config", str(config), "--json", str(out),
        )  # fmt: skip
    assert code == 1, stdout
    by_name = {Path(i["path"]).name: i for i in json.loads(out.read_text())["images"]}
    assert by_name["f.jpg"]["error"] == "cannot read file: Permission denied"
    assert by_name["locked"]["error"] == "cannot read folder: Permission denied"
    assert by_name["two.jpg"]["error"] is None and len(by_name["two.jpg"]["cells"]) == 2


def test_cell_diameter_auto_measures_the_fields(
    app: typer.Typer, config: Path, tmp_path: Path
) -> None:
    """--cell-diameter auto reads the magnification off the fields' red cells: BCCD fields at
    their own size give about the default 170 px; the same fields at half size about half."""
    full, half = tmp_path / "full", tmp_path / "half"
    full.mkdir()
    half.mkdir()
    for p in sorted(FIELDS.glob("BloodImage_*.jpg"))[:4]:
        img = cv2.imread(str(p))
        cv2.imwrite(str(full / p.name), img)
        cv2.imwrite(str(half / p.name), cv2.resize(img, None, fx=0.5, fy=0.5,
                                                   interpolation=cv2.INTER_AREA))
    sizes = {}
    for name, d in (("full", full), ("half", half)):
        code, out, err = _run(app, str(d), "--config", str(config), "--cell-diameter", "auto",
                              "--json", "-")
        assert code == 0, err
        assert "Accept it with --cell-diameter" in err
        sizes[name] = json.loads(out)["models"]["cell_diameter_px"]
    assert 130 <= sizes["full"] <= 210
    assert sizes["half"] == pytest.approx(sizes["full"] / 2, rel=0.15)
    code, _, err = _run(app, str(full), "--config", str(config), "--cell-diameter", "big")
    assert code == 2 and "number of pixels or 'auto'" in err


def test_python_dash_m_runs_the_cli() -> None:
    """``python -m edge_wbc.cli`` (scripts/eval_analyze.py runs the CLI that way) is the command."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edge_wbc.cli", "analyze", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--cell-diameter" in r.stdout, r.stderr


def test_a_failed_atomic_write_leaves_no_temporary(tmp_path: Path) -> None:
    from edge_wbc.files import write_atomic

    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "out", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
