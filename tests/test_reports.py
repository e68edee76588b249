"""Reports on finalise: JSON, CSV and printable HTML carry the same numbers, the review audit
trail, flagged-cell thumbnails and the model hashes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from station_fakes import fake_cell

from edge_wbc.counting.reports import REPORT_SCHEMA, write_reports
from edge_wbc.counting.session import SessionError, SlideSession
from edge_wbc.counting.store import Store
from edge_wbc.pipeline.results import FieldResult

FIELDS = sorted((Path(__file__).resolve().parent.parent / "samples" / "fields").glob("*.jpg"))
MODELS = {"manifest": "models/manifest.json", "created": "2026-11-25T20:00:00Z", "models": [
    {"name": "unet-a", "file": "a.tflite", "sha256": "ab" * 32, "task": "segmentation"},
    {"name": "cls", "file": "c.tflite", "sha256": "cd" * 32, "task": "classification"},
], "classifier_sha256": "cd" * 32,
    "adaptation": {"id": "20261201T120000Z-lab1", "sha256": "ef" * 32}}


@pytest.fixture()
def finalised(tmp_path: Path) -> tuple[SlideSession, Path]:
    data = tmp_path / "data"
    store = Store(data)
    s = SlideSession(store, default_target=8, models=MODELS, station_id="bench-1",
                     reporter=lambda sl, st, cs, fs, out: write_reports(sl, st, cs, fs, out, data))
    s.set_sample_id("H-<b>7</b>")  # markup in a sample id must come out as text
    labels = [["neutrophil", "neutrophil", "lymphocyte"],
              ["neutrophil", "monocyte", "unidentified"],
              ["eosinophil", "neutrophil", "lymphocyte"]]
    for i, labs in enumerate(labels):
        rgb = cv2.cvtColor(cv2.imread(str(FIELDS[i])), cv2.COLOR_BGR2RGB)
        cells = [fake_cell((30 + 150 * j, 40, 130 + 150 * j, 140), lab, 0.95 - 0.1 * j)
                 for j, lab in enumerate(labs)]
        s.add_field(rgb, FieldResult("f", 640, 480, cells, quality={"flags": ["out_of_focus"]}))
    ids = list(s.cells)
    s.review(ids[5], "monocyte")  # the unidentified one
    s.review(ids[0], "lymphocyte")
    s.review(ids[1], "rejected", "not_leukocyte")
    s.review(ids[2], "basophil")  # changed the mind: undone, so only in the history
    s.review(ids[2], None)
    s.finalise()
    return s, data


def test_json_report(finalised: tuple[SlideSession, Path]) -> None:
    s, data = finalised
    rep = json.loads((data / s.slide["reports"]["json"]).read_text())
    assert rep["schema"] == REPORT_SCHEMA
    assert rep["sample_id"] == "H-<b>7</b>" and rep["station_id"] == "bench-1"
    assert rep["counted"] == 8 and rep["target"] == 8
    diff = {r["label"]: r for r in rep["differential"]}
    assert diff["neutrophil"]["count"] == 2 and diff["lymphocyte"]["count"] == 3
    assert diff["monocyte"]["count"] == 2 and diff["eosinophil"]["count"] == 1
    # 3/8 exact 95 % CI: 8.5 % – 75.5 % (beta quantiles by hand: 0.085229, 0.755136).
    assert (diff["lymphocyte"]["ci_low"], diff["lymphocyte"]["ci_high"]) == (8.5, 75.5)
    assert rep["finalised_at"] and rep["started_at"] <= rep["finalised_at"]
    changes = {c["cell_id"]: c for c in rep["reviewed_changes"]}
    assert len(changes) == 3
    assert {(c["machine_label"], c["reviewed_label"]) for c in changes.values()} == {
        ("unidentified", "monocyte"), ("neutrophil", "lymphocyte"), ("neutrophil", "rejected")}
    assert rep["models"]["models"][0]["sha256"] == "ab" * 32
    assert [h["action"] for h in rep["review_history"]] == [
        "reclassified", "reclassified", "rejected", "reclassified", "restored"]
    assert rep["review_history"][3]["reviewed_label"] == "basophil"
    assert rep["fields"]["quality_warnings"] == {"out_of_focus": 3}
    assert rep["excluded"]["rejected"] == 1
    reasons = [r for f in rep["flagged_cells"] for r in f["reasons"]]
    assert any(r.startswith("reclassified") for r in reasons)


def test_csv_reports(finalised: tuple[SlideSession, Path]) -> None:
    s, data = finalised
    rows = list(csv.DictReader((data / s.slide["reports"]["csv"]).open()))
    assert [r["class"] for r in rows] == ["neutrophil", "eosinophil", "basophil", "lymphocyte",
                                         "monocyte"]
    assert sum(int(r["count"]) for r in rows) == 8
    assert rows[3]["percent"] == "37.5" and rows[3]["ci95_low_percent"] == "8.5"
    cells = list(csv.DictReader((data / s.slide["reports"]["cells_csv"]).open()))
    assert len(cells) == 9
    rej = [c for c in cells if c["reviewed_label"] == "rejected"]
    assert len(rej) == 1 and rej[0]["machine_label"] == "neutrophil" and rej[0]["counted_as"] == ""
    assert rej[0]["review_reason"] == "not_leukocyte" and rej[0]["reviewed_at"]


def test_html_report_is_self_contained_and_escaped(finalised: tuple[SlideSession, Path]) -> None:
    s, data = finalised
    page = (data / s.slide["reports"]["html"]).read_text()
    assert "H-&lt;b&gt;7&lt;/b&gt;" in page and "<b>7</b>" not in page
    assert page.count("data:image/jpeg;base64,") >= 3  # thumbnails of the reviewed cells
    assert "http://" not in page and "https://" not in page  # prints offline
    assert "ab" * 32 in page and "Clopper" in page
    assert "lab adaptation 20261201T120000Z-lab1" in page and "ef" * 32 in page
    assert "37.5" in page and "8.5 – 75.5" in page


def test_report_write_failure_leaves_slide_open(tmp_path: Path) -> None:
    store = Store(tmp_path)

    def broken(*a: object) -> dict:
        raise OSError(28, "No space left on device")

    s = SlideSession(store, default_target=1, reporter=broken)
    rgb = np.full((480, 640, 3), 200, np.uint8)
    s.add_field(rgb, FieldResult("f", 640, 480, [fake_cell((10, 10, 90, 90), "neutrophil")]))
    with pytest.raises(SessionError, match="No space left"):
        s.finalise()
    assert s.slide["status"] == "open" and store.open_slide()["id"] == s.slide["id"]
