"""Slide session: confidence intervals against hand-computed values, counting, review, targets,
finalise blockers and the duplicate-field guard."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from station_fakes import fake_cell

from edge_wbc.counting.events import Event, Fanout
from edge_wbc.counting.overlap import field_signature, find_overlap
from edge_wbc.counting.reports import write_reports
from edge_wbc.counting.session import SessionError, SlideSession
from edge_wbc.counting.stats import beta_ppf, betainc, clopper_pearson, wilson
from edge_wbc.counting.store import Store
from edge_wbc.pipeline.results import FieldResult

FIELDS = sorted((Path(__file__).parent.parent / "samples" / "fields").glob("*.jpg"))


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- intervals


def test_clopper_pearson_closed_forms() -> None:
    # k = 0 and k = n have closed forms: (0, 1 - (a/2)^(1/n)) and ((a/2)^(1/n), 1).
    lo, hi = clopper_pearson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 100), abs=1e-9)  # 0.036217
    lo, hi = clopper_pearson(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 100), abs=1e-9)  # 0.963783
    # k = 1: lower bound 1 - (1 - a/2)^(1/n); k = n - 1: upper bound (1 - a/2)^(1/n).
    assert clopper_pearson(1, 10)[0] == pytest.approx(1 - 0.975 ** (1 / 10), abs=1e-9)
    assert clopper_pearson(9, 10)[1] == pytest.approx(0.975 ** (1 / 10), abs=1e-9)


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # Rümke's table (exact binomial 95 % limits, in %), as printed in haematology texts.
        (10, 100, 4.9, 17.6),
        (50, 100, 39.8, 60.2),
        (5, 100, 1.6, 11.3),
        (1, 100, 0.0, 5.4),
        (20, 200, 6.2, 15.0),
        (30, 200, 10.4, 20.7),
    ],
)
def test_clopper_pearson_matches_rumke_table(k: int, n: int, lo: float, hi: float) -> None:
    a, b = clopper_pearson(k, n)
    assert round(100 * a, 1) == lo
    assert round(100 * b, 1) == hi


def test_wilson_hand_computed() -> None:
    # 10/100, z = 1.959964: centre = (0.1 + z²/200) / (1 + z²/100) = 0.114797,
    # half = z / (1 + z²/100) * sqrt(0.1*0.9/100 + z²/40000) = 0.059568.
    lo, hi = wilson(10, 100)
    assert lo == pytest.approx(0.055229, abs=2e-6)
    assert hi == pytest.approx(0.174366, abs=2e-6)
    assert wilson(0, 50)[0] == 0.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_betainc_and_quantile_are_inverse() -> None:
    # I_x(1, 1) = x and I_x(a, 1) = x^a: exact references.
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, abs=1e-12)
    assert betainc(3, 1, 0.5) == pytest.approx(0.125, abs=1e-12)
    for a, b, q in [(2, 9, 0.975), (45, 56, 0.025), (0.5, 0.5, 0.3), (120, 80, 0.5)]:
        assert betainc(a, b, beta_ppf(q, a, b)) == pytest.approx(q, abs=1e-10)


def test_interval_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        clopper_pearson(5, 3)
    with pytest.raises(ValueError):
        wilson(-1, 3)


# --------------------------------------------------------------------------- session


def _field(cells: list, w: int = 640, h: int = 480) -> FieldResult:
    return FieldResult(path="f.jpg", width=w, height=h, cells=cells, quality={"flags": []})


@pytest.fixture()
def session(tmp_path: Path):
    events: list[Event] = []
    fan = Fanout()
    fan.subscribe(events.append)
    store = Store(tmp_path / "data")
    s = SlideSession(store, fan, default_target=10, models={"models": []},
                     reporter=lambda sl, st, cs, fs, out: write_reports(
                         sl, st, cs, fs, out, tmp_path / "data"))
    s.events = events  # type: ignore[attr-defined]
    yield s
    store.close()


def _add(session: SlideSession, img: np.ndarray, labels: list[str]) -> dict:
    cells = [fake_cell((20 + 110 * i, 20, 120 + 110 * i, 120), lab) for i, lab in enumerate(labels)]
    return session.add_field(img, _field(cells))


def _distinct_fields(k: int) -> list[np.ndarray]:
    return [_rgb(p) for p in FIELDS[:k]]


def test_counts_percentages_and_cis(session: SlideSession) -> None:
    imgs = _distinct_fields(4)
    _add(session, imgs[0], ["neutrophil", "neutrophil", "lymphocyte"])
    _add(session, imgs[1], ["neutrophil", "monocyte", "other"])
    _add(session, imgs[2], ["neutrophil", "eosinophil"])
    _add(session, imgs[3], ["neutrophil", "lymphocyte", "unidentified"])
    st = session.state()
    # 'other' is never counted; unidentified is a leukocyte of unknown type and is.
    assert st["counted"] == 10
    assert st["counts"] == {"neutrophil": 5, "eosinophil": 1, "basophil": 0, "lymphocyte": 2,
                            "monocyte": 1, "unidentified": 1}
    assert st["percentages"]["neutrophil"] == 50.0
    assert st["percentages"]["lymphocyte"] == 20.0
    # 5/10 exact: I^-1(0.025; 5, 6) = 0.187086, I^-1(0.975; 6, 5) = 0.812914.
    assert st["ci95"]["neutrophil"] == [18.7, 81.3]
    # 0/10: upper = 1 - 0.025^(1/10) = 0.308497.
    assert st["ci95"]["basophil"] == [0.0, 30.8]
    assert sum(r["percent"] for r in st["classes"]) == pytest.approx(100.0, abs=0.11)
    assert st["complete"] and st["progress"] == 1.0
    assert st["excluded"]["other"] == 1
    assert st["slide_id"] == st["slide"]["slide_id"] and st["sample_id"]


def test_finalise_blocked_until_unidentified_resolved(
    session: SlideSession, tmp_path: Path
) -> None:
    imgs = _distinct_fields(3)
    _add(session, imgs[0], ["neutrophil"] * 4)
    with pytest.raises(SessionError, match="4 of 10"):
        session.finalise()
    _add(session, imgs[1], ["lymphocyte", "unidentified", "neutrophil"])
    _add(session, imgs[2], ["neutrophil", "monocyte", "neutrophil"])
    st = session.state()
    assert st["complete"] and not st["can_finalise"]
    with pytest.raises(SessionError, match="1 unidentified"):
        session.finalise()
    unid = next(c for c in session.cells.values() if c["label"] == "unidentified")
    session.review(unid["id"], "lymphocyte")
    assert session.state()["can_finalise"]
    final = session.finalise()
    assert final["finalised"] and final["counts"]["lymphocyte"] == 2
    report = tmp_path / "data" / session.slide["reports"]["json"]
    assert report.is_file()
    # A finalised slide takes no more fields or reviews.
    with pytest.raises(SessionError, match="finalised"):
        _add(session, imgs[0], ["neutrophil"])
    with pytest.raises(SessionError, match="finalised"):
        session.review(unid["id"], "neutrophil")
    actions = [e.payload.get("action") for e in session.events if e.kind == "slide"]
    assert actions == ["finalised"]


def test_review_keeps_machine_label_and_updates_counts(session: SlideSession) -> None:
    _add(session, _distinct_fields(1)[0], ["neutrophil", "neutrophil", "monocyte"])
    a, b, c = list(session.cells)
    session.review(a, "eosinophil")
    session.review(b, "rejected", "not_leukocyte")
    st = session.state()
    assert st["counts"]["neutrophil"] == 0 and st["counts"]["eosinophil"] == 1
    assert st["counted"] == 2 and st["excluded"]["rejected"] == 1 and st["reviewed"] == 2
    cell = session.store.cells(session.slide["id"])[0]
    assert cell["label"] == "neutrophil" and cell["reviewed_label"] == "eosinophil"
    # Restore puts the machine's decision back.
    session.review(b, None)
    assert session.state()["counts"]["neutrophil"] == 1
    with pytest.raises(SessionError, match="reason"):
        session.review(c, "rejected", "because")
    with pytest.raises(SessionError, match="cannot reclassify"):
        session.review(c, "unicorn")
    with pytest.raises(SessionError, match="cannot reclassify"):
        session.review(c, "unidentified")  # only the machine leaves a cell unidentified
    with pytest.raises(SessionError, match="no cell"):
        session.review("nope", "neutrophil")
    cell_events = [e.payload["action"] for e in session.events if e.kind == "cell"]
    assert cell_events == ["counted"] * 3 + ["reclassified", "rejected", "restored"]
    # Every change is followed by the full differential.
    assert session.events[-1].kind == "differential"


def test_target_extend_and_validation(session: SlideSession) -> None:
    session.set_target(200)
    assert session.state()["target"] == 200
    for bad in (0, -5, "abc", 10001, 2.5):
        with pytest.raises(SessionError):
            session.set_target(bad)


def test_a_cell_of_a_discarded_field_is_not_confirmed_or_reviewed(session: SlideSession) -> None:
    rec = _add(session, _distinct_fields(1)[0], ["lymphocyte"])
    (cid,) = [c for c in session.cells if c.startswith(rec["id"])]
    session.discard_field(rec["id"], "unusable")
    with pytest.raises(SessionError, match="discarded field: take the field back first"):
        session.confirm([cid])
    # nor reclassified, rejected or restored: it would count, unseen, when the field comes back
    for label in ("neutrophil", None):
        with pytest.raises(SessionError, match="discarded field: take the field back first"):
            session.review(cid, label)
    session.discard_field(rec["id"], None)
    assert session.review(cid, "neutrophil")["reviewed_label"] == "neutrophil"


def test_small_wording_and_pasted_text(session: SlideSession) -> None:
    _add(session, _distinct_fields(1)[0], ["neutrophil"])
    with pytest.raises(SessionError, match="is open with 1 cell counted"):
        session.new_slide("B-2")
    (cid,) = list(session.cells)
    with pytest.raises(SessionError) as exc:
        session.review(cid, "x" * 4000)
    assert len(str(exc.value)) < 400  # the label is not echoed whole
    session.set_notes(comment="MCV\t92\nHb\t140")  # a tab pasted from a table
    assert session.notes(session.slide)["comment"] == "MCV 92\nHb 140"


def test_the_placeholder_prefix_is_not_a_sample_id(session: SlideSession) -> None:
    # Entered, it would read as "no sample ID" and a lab requiring one could never finalise.
    for bad in ("unnamed-x", "Unnamed-2"):
        with pytest.raises(SessionError, match="placeholder"):
            session.set_sample_id(bad)
        with pytest.raises(SessionError, match="placeholder"):
            session.new_slide(bad, abandon=True)
    session.set_sample_id("unnamed patient 7")  # only the exact prefix is the station's


def test_new_slide_requires_finalise_or_abandon(session: SlideSession) -> None:
    _add(session, _distinct_fields(1)[0], ["neutrophil"])
    old = session.slide["id"]
    with pytest.raises(SessionError, match="abandoned"):
        session.new_slide("B-2")
    session.new_slide("B-2", target=200, abandon=True)
    assert session.slide["sample_id"] == "B-2" and session.state()["counted"] == 0
    assert session.store.slide(old)["status"] == "abandoned"
    assert session.store.cells(old)  # the abandoned slide's cells are kept
    with pytest.raises(SessionError):
        session.new_slide("x" * 65, abandon=True)


def test_listener_failure_does_not_stop_counting(session: SlideSession) -> None:
    fan = Fanout()

    def broken(e: Event) -> None:
        raise RuntimeError("display gone")

    got: list[Event] = []
    fan.subscribe(broken)
    fan.subscribe(got.append)
    session.publish = fan
    _add(session, _distinct_fields(1)[0], ["neutrophil"])
    assert session.state()["counted"] == 1 and any(e.kind == "field" for e in got)


# --------------------------------------------------------------------------- duplicate guard


def _shifted_pair(img: np.ndarray, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    big = cv2.resize(img, (1700, 1300), interpolation=cv2.INTER_CUBIC)
    x0, y0 = 520, 400
    return big[y0 : y0 + 480, x0 : x0 + 640], big[y0 + dy : y0 + dy + 480, x0 + dx : x0 + dx + 640]


@pytest.mark.parametrize(("dx", "dy"), [(0, 0), (120, 0), (-100, 60), (300, 200), (-400, -150)])
def test_find_overlap_recovers_shift(dx: int, dy: int) -> None:
    a, b = _shifted_pair(_rgb(FIELDS[3]), dx, dy)
    ov = find_overlap(field_signature(a), field_signature(b), (480, 640))
    assert ov is not None
    assert abs(ov.dx + dx) <= 8 and abs(ov.dy + dy) <= 8
    expect = (640 - abs(dx)) * (480 - abs(dy)) / (640 * 480)
    assert ov.fraction == pytest.approx(expect, abs=0.03)


def test_find_overlap_rejects_unrelated_fields() -> None:
    imgs = _distinct_fields(12)
    sigs = [field_signature(i) for i in imgs]
    for i in range(len(sigs) - 1):
        assert find_overlap(sigs[i], sigs[i + 1], (480, 640)) is None
    flat = np.full((480, 640, 3), 200, np.uint8)
    assert find_overlap(field_signature(flat), field_signature(flat), (480, 640)) is None


def test_overlapping_field_cells_not_counted_twice(session: SlideSession) -> None:
    a, b = _shifted_pair(_rgb(FIELDS[5]), 200, 0)
    # Field A: a cell at x 300..380; in field B (moved 200 px right) the same cell is at
    # x 100..180 — inside B's first 440 columns, which A already showed.
    session.add_field(a, _field([fake_cell((300, 200, 380, 280), "neutrophil")]))
    f = session.add_field(b, _field([fake_cell((100, 200, 180, 280), "neutrophil"),
                                     fake_cell((520, 300, 600, 380), "lymphocyte")]))
    assert f["overlap_field"] and f["overlap_fraction"] == pytest.approx(440 / 640, abs=0.03)
    assert f["n_duplicate"] == 1 and f["n_counted"] == 1
    assert f["flagged_duplicate"]  # 69 % > duplicate_overlap 0.5
    st = session.state()
    assert st["counted"] == 2 and st["excluded"]["duplicate"] == 1 and st["fields_overlapping"] == 1
    # The same field captured twice: everything in it was counted already.
    f2 = session.add_field(b, _field([fake_cell((520, 300, 600, 380), "lymphocyte")]))
    assert f2["overlap_fraction"] == 1.0 and f2["n_counted"] == 0
    # The technician can still count a duplicate explicitly (reviewed label wins).
    dup = next(c for c in session.cells.values() if c["status"] == "duplicate")
    session.review(dup["id"], "neutrophil")
    assert session.state()["counted"] == 3


def test_error_field_is_refused(session: SlideSession) -> None:
    res = FieldResult(path="x", width=640, height=480, error="truncated JPEG")
    with pytest.raises(SessionError, match="truncated"):
        session.add_field(np.zeros((480, 640, 3), np.uint8), res)
    assert session.state()["fields"] == 0


def test_ci_method_wilson(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    s = SlideSession(store, ci_method="wilson", default_target=10)
    _add(s, _distinct_fields(1)[0], ["neutrophil", "lymphocyte"])
    lo, hi = wilson(1, 2)
    assert s.state()["ci95"]["neutrophil"] == [round(100 * lo, 1), round(100 * hi, 1)]
    assert math.isclose(s.state()["percentages"]["neutrophil"], 50.0)
    with pytest.raises(ValueError):
        SlideSession(store, ci_method="bayes")
