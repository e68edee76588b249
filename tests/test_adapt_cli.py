"""`edge-wbc adapt` and `analyze --adaptation`: exit codes, refusals, and the lab head applied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from edge_wbc.cli import adapt as cli_adapt
from edge_wbc.cli import analyze as cli_analyze
from edge_wbc.pipeline import adaptation as A

TESTS = Path(__file__).parent
FIXTURE_MODELS = TESTS / "fixtures" / "models"
FIELDS = TESTS / "fixtures" / "fields"


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()
    cli_analyze.register(a)
    cli_adapt.register(a)
    return a


@pytest.fixture(scope="module")
def shipped() -> A.BaseHead:
    from edge_wbc.pipeline.analysis import FieldAnalyzer

    an = FieldAnalyzer(threads=1)
    ce = an.manifest.classifier
    assert ce is not None
    return A.shipped_head(
        an.manifest.path(ce), ce.classes, ce.temperature, ce.confidence_threshold,
        ce.other_threshold, ce.sha256, an.runtime.interpreter_cls,
    )  # fmt: skip


def _lymphocyte_lab(shipped: A.BaseHead, out: Path, sha: str | None = None) -> A.Adaptation:
    """A lab head that calls every cell a lymphocyte: unmistakable when applied."""
    b = shipped.b.copy()
    b[shipped.classes.index("lymphocyte")] += 50.0
    fit = A.FitResult(
        accepted=True, reason="test", method="pull 1", W=shipped.W.astype(np.float32),
        b=b.astype(np.float32), temperature=1.0, confidence_threshold=0.5,
        other_threshold=0.5, cells={"lymphocyte": 5}, too_few={}, validation={}, seconds=0.0,
    )  # fmt: skip
    base = shipped if sha is None else A.BaseHead(
        shipped.classes, shipped.W, shipped.b, 1.0, 0.5, 0.5, sha
    )  # fmt: skip
    return A.write_adaptation(out, fit, base)


def _run(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_analyze_applies_the_adaptation_and_says_which(
    app: typer.Typer, shipped: A.BaseHead, tmp_path: Path
) -> None:
    field = str(FIELDS / "BloodImage_00249.jpg")
    code, out, _ = _run(app, "analyze", field, "--json", "-")
    assert code == 0
    plain = json.loads(out)
    assert plain["images"][0]["model"] == {
        "classifier_sha256": shipped.sha256, "adaptation": None
    }  # fmt: skip
    ad = _lymphocyte_lab(shipped, tmp_path / "lab")
    code, out, err = _run(app, "analyze", field, "--json", "-", "--adaptation", str(ad.path))
    assert code == 0, err
    doc = json.loads(out)
    img = doc["images"][0]
    assert img["model"]["adaptation"] == {"id": ad.id, "sha256": ad.sha256}
    assert doc["models"]["adaptation"] == {"id": ad.id, "sha256": ad.sha256}
    assert len(img["cells"]) == len(plain["images"][0]["cells"]) > 0
    assert {c["label"] for c in img["cells"]} == {"lymphocyte"}


def test_analyze_refuses_an_adaptation_of_another_model(
    app: typer.Typer, shipped: A.BaseHead, tmp_path: Path
) -> None:
    ad = _lymphocyte_lab(shipped, tmp_path / "other", sha="c" * 64)
    field = str(FIELDS / "BloodImage_00249.jpg")
    code, _, err = _run(app, "analyze", field, "--adaptation", str(ad.path))
    assert code == 2
    assert "adaptation.json: made for classifier sha256 cccccccccccc" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adaptation.json").write_text("{")
    code, _, err = _run(app, "analyze", field, "--adaptation", str(tmp_path / "broken"))
    assert code == 2 and "broken/adaptation.json: not valid JSON" in err
    # '' is none: the shipped head, even with a broken adaptation in the config (it read
    # ./adaptation.json)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[models]\nadaptation = "{tmp_path / "broken"}"\n')
    code, out, err = _run(app, "analyze", field, "--config", str(cfg), "--json", "-",
                          "--adaptation", "")
    assert code == 0, err
    assert json.loads(out)["images"][0]["model"]["adaptation"] is None


def test_a_classifier_without_embedding_cannot_be_adapted(
    app: typer.Typer, shipped: A.BaseHead, tmp_path: Path
) -> None:
    ad = _lymphocyte_lab(shipped, tmp_path / "lab")
    code, _, err = _run(
        app, "analyze", str(FIELDS / "BloodImage_00249.jpg"), "--models", str(FIXTURE_MODELS),
        "--adaptation", str(ad.path),
    )  # fmt: skip
    assert code == 2 and "cls_colour.tflite emits no embedding" in err


def _lab_dir(root: Path, classes: dict[str, int]) -> Path:
    fields = sorted(FIELDS.glob("BloodImage_*[0-9].jpg"))
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            shutil.copy(fields[i % len(fields)], root / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize(
    ("classes", "extra", "message"),
    [
        ({"neutrophil": 1, "blast_cell": 1}, [], "blast_cell: unknown class"),
        ({"neutrophil": 1}, ["--data-dir", "x"], "not both"),
        ({"neutrophil": 1}, ["--cell-diameter", "big"], "number of pixels or 'auto'"),
        ({"neutrophil": 2, "eosinophil": 2}, [], "at least two classes with >= 5 cells"),
    ],
)
def test_fit_usage_errors_exit_2(
    app: typer.Typer, tmp_path: Path, classes: dict[str, int], extra: list[str], message: str
) -> None:
    lab = _lab_dir(tmp_path / "lab", classes)
    code, _, err = _run(app, "adapt", "fit", str(lab), "--out", str(tmp_path / "o"), *extra)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "o").exists()


def test_fit_refuses_to_overwrite(app: typer.Typer, tmp_path: Path) -> None:
    lab = _lab_dir(tmp_path / "lab", {"neutrophil": 1, "eosinophil": 1})
    (tmp_path / "o").mkdir()
    code, _, err = _run(app, "adapt", "fit", str(lab), "--out", str(tmp_path / "o"))
    assert code == 2 and "never overwritten" in err


def test_fit_that_is_not_better_writes_nothing_and_exits_3(
    app: typer.Typer, tmp_path: Path
) -> None:
    # The same four fields in both classes: nothing to learn, so nothing is written. A folder
    # of blasts (assigned in review; the classifier has no output for them) is left out, said.
    lab = _lab_dir(tmp_path / "lab", {"neutrophil": 8, "lymphocyte": 8, "blast": 1})
    code, out, err = _run(app, "adapt", "fit", str(lab), "--out", str(tmp_path / "o"))
    assert code == 3, out + err
    assert f"skipped {lab / 'blast'}: reviewed as blast, which the classifier has no output" in err
    # half the labels are wrong by construction: the shipped model disagrees with them
    assert "not written: the shipped model agrees with only" in out
    assert "held-out validation" in out
    # the shipped models carry their anchor cells: the fit says it kept the shipped answers
    assert "the shipped answers kept on 301 anchor cells" in out
    assert not (tmp_path / "o").exists()


def test_fit_measures_the_magnification_and_lists_images_without_a_leukocyte(
    app: typer.Typer, tmp_path: Path
) -> None:
    import cv2

    lab = _lab_dir(tmp_path / "lab", {"neutrophil": 3, "lymphocyte": 3})
    cv2.imwrite(str(lab / "lymphocyte" / "blank.png"), np.full((300, 300, 3), 225, np.uint8))
    code, _out, err = _run(
        app, "adapt", "fit", str(lab), "--out", str(tmp_path / "o"), "--cell-diameter", "auto"
    )
    # the measurement goes to stderr (stdout may carry a JSON document)
    assert "red cells measure" in err and "leukocyte diameter" in err
    assert f"skipped {lab / 'lymphocyte' / 'blank.png'}: no leukocyte found" in err
    assert code == 2 and "at least two classes with >= 5 cells" in err
    assert not (tmp_path / "o").exists()


def test_fit_ignores_a_broken_configured_adaptation(app: typer.Typer, tmp_path: Path) -> None:
    # After a model update the configured adaptation is refused; the fit that replaces it must
    # still run (it starts from the shipped head anyway).
    lab = _lab_dir(tmp_path / "lab", {"neutrophil": 2, "eosinophil": 2})
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[models]\nadaptation = '{tmp_path / 'gone'}'\n")
    code, _, err = _run(app, "adapt", "fit", str(lab), "--out", str(tmp_path / "o"),
                        "--config", str(cfg))  # fmt: skip
    assert code == 2 and "at least two classes with >= 5 cells" in err, err


def test_fit_without_cells_says_what_to_give(app: typer.Typer, tmp_path: Path) -> None:
    code, _, err = _run(app, "adapt", "fit", "--out", str(tmp_path / "o"))
    assert code == 2 and "give folders of labelled cells" in err and "not both" not in err
