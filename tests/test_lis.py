"""LIS hand-off: HL7 v2.5.1 ORU^R01 and FHIR R4 built from the finalised report, parsed back and
validated; the outbox written in the finalising transaction; delivery to real peers on loopback
(an MLLP listener that ACKs, NAKs and goes away; a FHIR server answering 201, 400, 500 or
nothing), to a folder, and through a LIS outage without losing or doubling a report."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import cv2
import hl7
import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from lis_peers import FhirPeer, MllpPeer, RawPeer, free_port, mllp_peer
from station_fakes import fake_cell

from edge_wbc.comms.lis import outbox, render
from edge_wbc.comms.lis.codes import LOCAL_SYSTEM, LOINC, ReportError
from edge_wbc.comms.lis.delivery import LisDelivery
from edge_wbc.comms.lis.fhir import build_bundle
from edge_wbc.comms.lis.hl7v2 import build_oru, control_id
from edge_wbc.config import load_config
from edge_wbc.counting.events import Fanout
from edge_wbc.counting.reports import write_reports
from edge_wbc.counting.session import SlideSession
from edge_wbc.counting.store import Store
from edge_wbc.pipeline.results import FieldResult

DELIMS = "A|B^C~D\\E&F"
FIELDS = sorted((Path(__file__).parent.parent / "samples" / "fields").glob("*.jpg"))


def _report(**over: Any) -> dict[str, Any]:
    rep: dict[str, Any] = {
        "schema": "edge-wbc/report/1", "software": {"name": "edge-wbc", "version": "0.1.0"},
        "sample_id": "H-2026-0042", "slide_id": "S20261201T113808-ab12", "station_id": "haem-3",
        "started_at": "2026-12-01T11:00:00.000Z", "finalised_at": "2026-12-01T11:38:08.123Z",
        "generated_at": "2026-12-01T11:38:08.200Z", "target": 100, "counted": 100,
        "ci_method": "clopper-pearson", "ci_level": 0.95,
        "differential": [
            {"label": "neutrophil", "count": 60, "percent": 60.0, "ci_low": 49.7,
             "ci_high": 69.7},
            {"label": "eosinophil", "count": 3, "percent": 3.0, "ci_low": 0.6, "ci_high": 8.5},
            {"label": "basophil", "count": 1, "percent": 1.0, "ci_low": 0.0, "ci_high": 5.4},
            {"label": "lymphocyte", "count": 30, "percent": 30.0, "ci_low": 21.2,
             "ci_high": 40.0},
            {"label": "monocyte", "count": 6, "percent": 6.0, "ci_low": 2.2, "ci_high": 12.6},
        ],
        "unidentified": 0, "reviewed_changes": [], "review_history": [], "flagged_cells": [],
        "models": {"models": [{"name": "cls", "task": "classify", "sha256": "ab" * 32}]},
    }
    rep.update(over)
    return rep


def _obx(msg: hl7.Message) -> list[hl7.Segment]:
    return list(msg.segments("OBX"))


# --------------------------------------------------------------------------- HL7 v2


def test_oru_parses_back_with_loinc_codes_counts_and_ci() -> None:
    text = build_oru(_report(), receiving_application="LIS", receiving_facility="LAB")
    assert text.endswith("\r") and "\n" not in text
    msg = hl7.parse(text)
    msh = msg.segment("MSH")
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(12)) == "2.5.1"
    assert str(msh(5)) == "LIS" and str(msh(6)) == "LAB" and str(msh(4)) == "haem-3"
    assert str(msh(10)) == control_id("S20261201T113808-ab12") and len(str(msh(10))) <= 20
    assert str(msh(7)) == "20261201113808+0000"
    assert [str(s(0)) for s in msg] == ["MSH", "PID", "OBR", "NTE", *(
        ["OBX", "NTE", "OBX"] * 5), "OBX"]
    assert str(msg.segment("OBR")(4)) == "69738-3^Differential panel, method unspecified - " \
                                         "Blood^LN"
    obx = _obx(msg)
    # No review: the automated-count codes.
    assert [str(o(3)(1)(1)) for o in obx[0:10:2]] == ["770-8", "713-8", "706-2", "736-9",
                                                      "5905-5"]
    assert str(obx[0](5)) == "60.0" and str(obx[0](6)(1)(1)) == "%" and str(obx[0](11)) == "F"
    assert str(obx[1](3)(1)(3)) == "L" and str(obx[1](5)) == "60" and str(obx[1](4)) == "1"
    assert str(obx[-1](5)) == "100"
    nte = list(msg.segments("NTE"))
    assert msg.unescape(str(nte[1](3))) == "95 % CI 49.7-69.7 %"


def test_reviewed_slide_uses_manual_count_codes() -> None:
    rep = _report(reviewed_changes=[{"cell_id": "c1", "machine_label": "monocyte",
                                     "reviewed_label": "lymphocyte"}])
    obx = _obx(hl7.parse(build_oru(rep)))
    assert [str(o(3)(1)(1)) for o in obx[0:10:2]] == ["23761-0", "714-6", "707-0", "737-7",
                                                      "744-3"]
    assert "reviewed by a technologist" in build_oru(rep)


def test_sample_id_with_hl7_delimiters_is_escaped_and_round_trips() -> None:
    rep = _report(sample_id=DELIMS + " é中", station_id="st|1")
    text = build_oru(rep)
    msg = hl7.parse(text)
    # Still one PID with the usual field count: the delimiters did not split anything.
    assert len(list(msg.segments("PID"))) == 1 and len(msg.segment("PID")) == 4
    assert msg.unescape(str(msg.segment("PID")(3)(1)(1))) == DELIMS + " é中"
    assert msg.unescape(str(msg.segment("OBR")(2))) == DELIMS + " é中"
    assert msg.unescape(str(msg.segment("MSH")(4))) == "st|1"
    assert str(msg.segment("MSH")(18)) == "UNICODE UTF-8"


def test_formula_rows_flags_local_codes_and_counts_only_rows() -> None:
    rep = _report(differential=[
        {"label": "band_neutrophil", "count": 8, "percent": 8.0, "ci_low": 3.5, "ci_high": 15.2,
         "flag": "H"},
        {"label": "segmented_neutrophil", "count": 52, "percent": 52.0},
        {"label": "blast", "count": 1, "percent": 1.0, "flags": [{"text": "any blast"}]},
        {"label": "plasma_cell", "count": 1, "percent": 1.0},
        {"label": "erythroblast", "count": 3, "per_100_wbc": 3.0, "kind": "per_100"},
        {"label": "smudge_cell", "count": 12, "kind": "count_only"},
    ], flags=[{"class": "smudge_cell", "text": "smudge > 10 %"}])
    msg = hl7.parse(build_oru(rep))
    by_code = {str(o(3)(1)(1)): o for o in _obx(msg)}
    # Automated count: LOINC has no automated band/segmented/blast term, so they are local.
    band = by_code["band_neutrophil"]
    assert str(band(3)(1)(3)) == "L" and str(band(8)) == "H"
    assert str(by_code["blast"](8)) == "A"
    assert str(by_code["58413-6"](6)(1)(1)) == "/100{WBCs}" and str(by_code["58413-6"](5)) == "3.0"
    smudge = by_code["smudge_cell"]
    assert str(smudge(5)) == "12" and str(smudge(8)) == "A"
    assert "flag: smudge > 10 %" in str(msg)
    reviewed = hl7.parse(build_oru({**rep, "reviewed_changes": [{"cell_id": "x"}]}))
    codes = {str(o(3)(1)(1)) for o in _obx(reviewed)}
    assert {"764-1", "769-0", "709-6", "plasma_cell"} <= codes


def test_slide_and_cell_comments_reach_the_lis() -> None:
    """Issue 18: NTE for comments. The slide's and each cell's comment, escaped, their lines as
    HL7's \\.br\\; in FHIR the DiagnosticReport's conclusion (R4 has no DiagnosticReport.note)."""
    rep = _report(comment="Platelet clumps | see smear\nToxic granulation ^ 2+",
                  cell_comments=[{"cell_id": "S1-F0001-C01", "comment": "giant platelet & "
                                                                        "clump\r\nsee field"},
                                 {"cell_id": "S1-F0002-C04", "comment": "A|B\x07C"}])
    text = build_oru(rep)
    assert text == build_oru(rep)  # the identical message on every resend...
    msg = hl7.parse(text)
    assert str(msg.segment("MSH")(10)) == control_id(rep["slide_id"])  # ...with the same MSH-10
    assert [str(s(0)) for s in msg][:7] == ["MSH", "PID", "OBR", "NTE", "NTE", "NTE", "NTE"]
    notes = list(msg.segments("NTE"))[1:4]
    assert [str(n(1)) for n in notes] == ["2", "3", "4"]
    assert all(str(n(4)) == "RE^Remark^HL70364" for n in notes)
    assert str(notes[0](3)) == r"comment: Platelet clumps \F\ see smear\.br\Toxic granulation " \
                                r"\S\ 2+"
    assert msg.unescape(str(notes[1](3))) == ("comment on cell S1-F0001-C01: giant platelet & "
                                              "clump\rsee field")
    assert msg.unescape(str(notes[2](3))) == "comment on cell S1-F0002-C04: A|B C"
    assert "\x07" not in text and "\n" not in text
    res = _validate_every_resource(build_bundle(rep))
    assert res["DiagnosticReport"][0]["conclusion"].split("\n")[1:] == [
        "Comment: Platelet clumps | see smear", "Toxic granulation ^ 2+",
        "Comment on cell S1-F0001-C01: giant platelet & clump", "see field",
        "Comment on cell S1-F0002-C04: A|B C"]
    # No comment: no remark.
    assert "RE^Remark" not in build_oru(_report(comment="", cell_comments=[]))
    for bad in ({"comment": ["x"]}, {"cell_comments": "x"}, {"cell_comments": [{"comment": 1}]}):
        with pytest.raises(ReportError):
            build_oru(_report(**bad))


@pytest.mark.parametrize("bad", [
    {"differential": []},
    {"differential": [{"label": "neutrophil", "count": -1, "percent": 1.0}]},
    {"differential": [{"label": "neutrophil", "count": 1, "percent": float("nan")}]},
    {"differential": [{"count": 1, "percent": 1.0}]},
    {"finalised_at": None},
    {"finalised_at": "yesterday"},
])
def test_bad_reports_are_refused_with_a_reason(bad: dict[str, Any]) -> None:
    with pytest.raises(ReportError):
        build_oru(_report(**bad))
    with pytest.raises(ReportError):
        build_bundle(_report(**bad))


# --------------------------------------------------------------------------- FHIR


def _validate_every_resource(bundle: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    Bundle.model_validate(bundle)
    out: dict[str, list[dict[str, Any]]] = {}
    for e in bundle["entry"]:
        res = e["resource"]
        get_fhir_model_class(res["resourceType"]).model_validate(res)
        out.setdefault(res["resourceType"], []).append(res)
    return out


def test_fhir_bundle_validates_and_carries_the_differential() -> None:
    bundle = json.loads(render(_report(sample_id=DELIMS), "fhir"))
    assert bundle["type"] == "transaction"
    res = _validate_every_resource(bundle)
    assert set(res) == {"Specimen", "Device", "Observation", "DiagnosticReport"}
    dr = res["DiagnosticReport"][0]
    assert dr["status"] == "final" and dr["code"]["coding"][0]["code"] == "69738-3"
    assert len(dr["result"]) == 6
    urls = {e["fullUrl"] for e in bundle["entry"]}
    assert {r["reference"] for r in dr["result"]} <= urls
    assert res["Specimen"][0]["accessionIdentifier"]["value"] == DELIMS
    neut = res["Observation"][0]
    assert neut["code"]["coding"][0] == {"system": LOINC, "code": "770-8",
                                         "display": "Neutrophils/100 leukocytes in Blood by "
                                                    "Automated count"}
    assert neut["valueQuantity"]["value"] == 60.0 and neut["valueQuantity"]["code"] == "%"
    comps = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"]
             for c in neut["component"]}
    assert comps == {"neutrophil.count": 60, "ci95.low": 49.7, "ci95.high": 69.7}
    # Conditional creates: a Bundle sent twice creates nothing twice on a conforming server.
    assert all(e["request"]["ifNoneExist"].startswith("identifier=") for e in bundle["entry"])
    spec = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Specimen")
    assert "%5C%7C" in spec["request"]["ifNoneExist"]  # '|' in the sample id escaped as '\|'
    # Deterministic: the same report gives the same Bundle.
    assert render(_report(sample_id=DELIMS), "fhir") == json.dumps(bundle, indent=2,
                                                                   ensure_ascii=False) + "\n"


def test_operators_are_named_in_both_messages() -> None:
    """Who counted and who signed off, as entered at the station: FHIR Practitioners referenced
    as performer / resultsInterpreter; HL7 OBR-34 (technician), OBR-32 (interpreter), OBX-16."""
    rep = _report(operator="A. Ivanova|lab 2", signed_off_by="Dr. B. Petrov")
    res = _validate_every_resource(json.loads(render(rep, "fhir")))
    names = {r["name"][0]["text"]: r for r in res["Practitioner"]}
    assert set(names) == {"A. Ivanova|lab 2", "Dr. B. Petrov"}
    bundle = json.loads(render(rep, "fhir"))
    url = {e["resource"]["name"][0]["text"]: e["fullUrl"] for e in bundle["entry"]
           if e["resource"]["resourceType"] == "Practitioner"}
    dr = res["DiagnosticReport"][0]
    assert dr["performer"] == [{"reference": url["A. Ivanova|lab 2"]}]
    assert dr["resultsInterpreter"] == [{"reference": url["Dr. B. Petrov"]}]
    assert all(o.get("performer") == [{"reference": url["A. Ivanova|lab 2"]}]
               for o in res["Observation"])
    msg = hl7.parse(build_oru(rep))
    obr = msg.segment("OBR")
    assert msg.unescape(str(obr(34))) == "A. Ivanova|lab 2"
    assert msg.unescape(str(obr(32))) == "Dr. B. Petrov"
    assert all(msg.unescape(str(s(16)(1)(2))) == "A. Ivanova|lab 2" for s in _obx(msg)[:-1])
    # Nobody entered: no Practitioner, no empty fields.
    res = _validate_every_resource(json.loads(render(_report(), "fhir")))
    assert "Practitioner" not in res and "performer" not in res["DiagnosticReport"][0]
    obr = hl7.parse(build_oru(_report())).segment("OBR")
    assert len(obr) <= 32  # no OBR-32/34 at all


def test_fhir_manual_codes_flags_and_local_system() -> None:
    rep = _report(reviewed_changes=[{"cell_id": "c"}], differential=[
        {"label": "lymphocyte", "count": 40, "percent": 40.0, "flag": "H"},
        {"label": "reactive_lymphocyte", "count": 2, "percent": 2.0,
         "flags": [{"hl7": "A", "text": "reactive lymphocytes seen"}]},
        {"label": "smudge_cell", "count": 5, "kind": "count_only"},
    ])
    res = _validate_every_resource(build_bundle(rep))
    obs = {o["code"]["coding"][0]["code"]: o for o in res["Observation"]}
    assert obs["737-7"]["interpretation"][0]["coding"][0]["code"] == "H"
    rl = obs["reactive_lymphocyte"]
    assert rl["code"]["coding"][0]["system"] == LOCAL_SYSTEM
    assert rl["note"][0]["text"] == "flag: reactive lymphocytes seen"
    assert obs["smudge_cell"]["valueQuantity"] == {
        "value": 5, "unit": "cells", "system": "http://unitsofmeasure.org", "code": "{cells}"}


def test_fhir_validation_rejects_a_broken_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_wbc.comms.lis import fhir

    real = fhir._qty
    monkeypatch.setattr(fhir, "_qty", lambda *a: {**real(*a), "valu": 1})
    with pytest.raises(ReportError, match="do not validate"):
        fhir.build_bundle(_report())


# --------------------------------------------------------------------------- outbox + store


def _rgb(i: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(FIELDS[i])), cv2.COLOR_BGR2RGB)


class Station:
    """A real store + session with the LIS hook registered, as `edge-wbc station` wires it."""

    def __init__(self, data: Path, delivery: LisDelivery | None = None) -> None:
        self.data = data
        self.store = Store(data)
        self.conn = outbox.connect(str(self.store.db_path))
        if delivery is not None:
            self.store.add_transaction_hook(delivery.hook)
        else:
            self.store.add_transaction_hook(outbox.hook)
        self.session = SlideSession(
            self.store, Fanout(), default_target=3, models={"models": []},
            reporter=lambda sl, st, cs, fs, out: write_reports(sl, st, cs, fs, out, data))
        self.n = 0

    def finalise_slide(self, sample_id: str) -> str:
        s = self.session
        if s.state()["counted"]:
            s.new_slide(sample_id, 3)
        else:
            s.set_sample_id(sample_id)
        cells = [fake_cell((20 + 110 * i, 20, 120 + 110 * i, 120), lab)
                 for i, lab in enumerate(["neutrophil", "lymphocyte", "neutrophil"])]
        s.add_field(_rgb(self.n % len(FIELDS)), FieldResult(
            path="f.jpg", width=640, height=480, cells=cells, quality={"flags": []}))
        self.n += 1
        s.finalise()
        return str(s.slide["id"])

    def close(self) -> None:
        self.conn.close()
        self.store.close()


def test_finalise_queues_the_slide_in_the_same_transaction(tmp_path: Path) -> None:
    st = Station(tmp_path / "data")
    sid = st.finalise_slide("H-1")
    rows = st.conn.execute("SELECT slide_id, sample_id, report_file FROM lis_outbox").fetchall()
    assert rows == [(sid, "H-1", f"slides/{sid}/report/report.json")]
    # A hook that fails rolls the finalise back: never finalised without its LIS row.
    def boom(conn: sqlite3.Connection, ev: Any) -> None:
        if ev.kind == "slide" and ev.payload.get("action") == "finalised":
            raise sqlite3.OperationalError("simulated failure")
    st.store.add_transaction_hook(boom)
    with pytest.raises(Exception, match="simulated"):
        st.finalise_slide("H-2")
    assert st.store.slide(st.session.slide["id"])["status"] == "open"
    assert st.conn.execute("SELECT COUNT(*) FROM lis_outbox").fetchone()[0] == 1
    st.close()


# --------------------------------------------------------------------------- delivery


def _cfg(tmp_path: Path, **env: str) -> Any:
    base = {"HOME": str(tmp_path), "EDGE_WBC_LIS_TIMEOUT_S": "0.5", "EDGE_WBC_LIS_RETRY_S": "1"}
    return load_config(None, env={**base, **{f"EDGE_WBC_LIS_{k.upper()}": v
                                             for k, v in env.items()}})


def _drain(d: LisDelivery, until: Any, timeout: float = 8.0) -> None:
    t0 = time.monotonic()
    while not until():
        assert time.monotonic() - t0 < timeout, d.status()
        d.run_once()
        time.sleep(0.05)


def _make(tmp_path: Path, **env: str) -> tuple[Station, LisDelivery]:
    cfg = _cfg(tmp_path, **env)
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    st = Station.__new__(Station)
    # The delivery creates its tables before the store takes its hook, as the station does.
    from edge_wbc.counting.store import DB_NAME

    d = LisDelivery(cfg.lis, data / DB_NAME, data, station_id="haem-3")
    Station.__init__(st, data, d)
    return st, d


def test_mllp_ack_delivers_once_and_nak_holds_with_reason(tmp_path: Path) -> None:
    with mllp_peer() as peer:
        st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(peer.port))
        a = st.finalise_slide(DELIMS)
        d.run_once()
        assert peer.acked == [control_id(a)]
        msg = peer.received[0]
        assert msg.unescape(str(msg.segment("PID")(3)(1)(1))) == DELIMS
        assert d.status()["state"] == "ok" and d.status()["waiting"] == 0
        assert d.status()["last_delivered"]["slide_id"] == a

        for code in ("AE", "AR"):
            peer.script = [code]
            sid = st.finalise_slide(f"H-{code}")
            d.run_once()
            row = st.conn.execute("SELECT held, last_error FROM lis_outbox WHERE slide_id = ?",
                                  (sid,)).fetchone()
            assert row[0] == 1 and f"LIS answered {code}: sample unknown to LIS" in row[1]
            assert "Application internal error" in row[1]
        s = d.status()
        assert s["state"] == "refused" and s["held"] == 2
        # Held reports are not resent by themselves...
        n = len(peer.received)
        d.run_once()
        assert len(peer.received) == n
        # ...until released; then each is delivered exactly once.
        assert outbox.release(st.conn) == 2
        d.run_once()
        assert len(peer.acked) == 3 and len(set(peer.acked)) == 3
        assert d.status()["state"] == "ok" and d.status()["held"] == 0
        d.stop()
        st.close()


@pytest.mark.parametrize(("mode", "why"), [
    ("close", "closed the connection before acknowledging"),
    ("half", "closed the connection before acknowledging"),
    ("silent", "no ACK"),
    ("wrong", "not '"),
])
def test_mllp_peer_going_away_mid_stream_is_retried(tmp_path: Path, mode: str, why: str
                                                     ) -> None:
    with mllp_peer() as peer:
        # 2 s to read an ACK, not the module's 0.5: the retry's ACK was once sent and recorded by
        # the peer yet read after 0.5 s on a busy CI machine, and the outbox kept the report.
        st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(peer.port),
                      timeout_s="2")  # fmt: skip
        peer.script = [mode]
        sid = st.finalise_slide("H-1")
        d.run_once()
        err, held = st.conn.execute("SELECT last_error, held FROM lis_outbox").fetchone()
        assert why in err and held == 0
        assert d.status()["state"] == "unreachable"
        # The retry (after retry_s) gets an ACK: delivered once, nothing left.
        _drain(d, lambda: peer.acked)
        assert peer.acked == [control_id(sid)]
        assert st.conn.execute("SELECT COUNT(*) FROM lis_outbox").fetchone()[0] == 0
        d.stop()
        st.close()


def _retried_with_a_reason(st: Any, d: Any, caplog: pytest.LogCaptureFixture,
                           reason: str) -> None:
    """One delivery attempt to a peer that answered wrongly: kept for a retry (not held), with
    ``reason``, and no internal error or traceback logged."""
    d.run_once()
    held, err = st.conn.execute("SELECT held, last_error FROM lis_outbox").fetchone()
    assert held == 0 and reason in err, err
    assert "internal error" not in err
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    d.stop()
    st.close()


def _framed(text: str, encoding: str = "utf-8") -> bytes:
    return b"\x0b" + text.encode(encoding) + b"\x1c\x0d"


@pytest.mark.parametrize("answer", [
    b"\x0bhello world\x1c\x0d",
    b"\x0b\x1c\x0d",
    "MSA|AA|{cid}\r",  # the MSA alone, no MSH
])
def test_mllp_answer_that_is_not_hl7_is_retried_without_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: bytes | str) -> None:
    peer = RawPeer(b"")
    try:
        st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(peer.port),
                      timeout_s="2")  # fmt: skip
        sid = st.finalise_slide("H-1")
        peer.answer = (_framed(answer.format(cid=control_id(sid))) if isinstance(answer, str)
                       else answer)
        _retried_with_a_reason(st, d, caplog, "answered with something that is not an HL7 ACK")
    finally:
        peer.close()


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_mllp_ack_in_latin1_or_with_lf_separators_delivers(tmp_path: Path, encoding: str,
                                                           sep: str) -> None:
    """Only MSA-1/MSA-2 matter: a LIS answering AA in ISO 8859-1 (MSH-18 8859/1) or with LF
    between segments accepted the report; it must not be sent again on every retry."""
    peer = RawPeer(b"")
    try:
        st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(peer.port))
        sid = st.finalise_slide("H-1")
        peer.answer = _framed(sep.join([
            "MSH|^~\\&|LIS|Klinikum München|||20261201||ACK^R01|A1|P|2.5.1|||||||8859/1",
            f"MSA|AA|{control_id(sid)}", ""]), encoding)
        d.run_once()
        assert st.conn.execute("SELECT COUNT(*) FROM lis_outbox").fetchone()[0] == 0, d.status()
        assert d.status()["last_delivered"]["detail"] == f"AA for message {control_id(sid)}"
        d.stop()
        st.close()
    finally:
        peer.close()


def test_lis_down_gets_every_report_once_back_none_twice(tmp_path: Path) -> None:
    port = free_port()
    st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(port))
    sids = [st.finalise_slide(f"H-{i}") for i in range(3)]
    d.run_once()
    s = d.status()
    assert s["state"] == "unreachable" and s["waiting"] == 3
    assert "cannot connect" in s["problems"][0]["error"]
    peer = MllpPeer(port).start()
    try:
        _drain(d, lambda: len(peer.acked) == 3)
        assert peer.acked == [control_id(x) for x in sids]  # in order, each once
        # The listener goes away with the next report pending, then returns.
        peer.stop()
        later = st.finalise_slide("H-3")
        d.run_once()
        assert d.status()["waiting"] == 1
        peer.start()
        _drain(d, lambda: len(peer.acked) == 4)
        assert peer.acked[-1] == control_id(later) and len(set(peer.acked)) == 4
        d.run_once()
        assert len(peer.received) == 4
    finally:
        d.stop()
        peer.close()
        st.close()


def test_fhir_server_201_400_500_and_timeout(tmp_path: Path) -> None:
    peer = FhirPeer()
    try:
        st, d = _make(tmp_path, delivery="fhir", fhir_url=peer.url, fhir_token="s3cret")
        peer.script = [201]
        st.finalise_slide(DELIMS)
        d.run_once()
        assert len(peer.bodies) == 1 and peer.auth == ["Bearer s3cret"]
        _validate_every_resource(peer.bodies[0])
        assert d.status()["last_delivered"]["detail"] == "HTTP 201 Bundle/1"

        def answered(code: int | str, sample: str) -> tuple[int, str]:
            peer.script = [code]
            sid = st.finalise_slide(sample)
            d.run_once()
            return st.conn.execute("SELECT held, last_error FROM lis_outbox WHERE slide_id = ?",
                                   (sid,)).fetchone()

        held, err = answered(400, "H-400")
        assert held == 1 and err == ("FHIR server answered HTTP 400: Observation.code: unknown "
                                     "code system")

        held, err = answered(302, "H-302")
        assert held == 1 and "HTTP 302" in err and peer.gets == 0

        # A redirect names where it points: that is what fhir_url should be.
        held, err = answered(307, "H-307")
        assert held == 1 and err == ("FHIR server answered HTTP 307, redirecting to "
                                     "https://fhir.lab.example/fhir/r4/: set lis.fhir_url to the "
                                     "FHIR base it names")

        # A 200 that is not a FHIR answer (a single-sign-on proxy's login page) is no delivery.
        held, err = answered("html", "H-sso")
        assert held == 1 and err == ("FHIR server answered HTTP 200 with text/html, not a FHIR "
                                     "transaction-response Bundle: is lis.fhir_url the FHIR base?")

        for mode, why in ((500, "HTTP 500: db down"), ("timeout", "no answer")):
            held, err = answered(mode, f"H-{mode}")
            assert held == 0 and why in err
            _drain(d, lambda: st.conn.execute("SELECT COUNT(*) FROM lis_outbox WHERE held = 0"
                                              ).fetchone()[0] == 0)
        assert len(peer.bodies) == 3
        assert d.status()["state"] == "refused"
        d.stop()
        st.close()
    finally:
        peer.close()


def _http(status: str, body: bytes = b"", ctype: str = "application/fhir+json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "\r\n").encode() + body


@pytest.mark.parametrize(("answer", "why"), [
    (_http("200 OK", b"{}", "application/json"), "with JSON that is not a FHIR resource, not"),
    (_http("200 OK", b'{"resourceType": "OperationOutcome"}'), "with a FHIR OperationOutcome, not"),
    (_http("200 OK", b'{"resourceType": "Bundle", "type": "batch-response"}'),
     "with a FHIR Bundle of type 'batch-response', not"),
    (_http("200 OK", b'{"resourceType": "Bundle", "type": "transaction-response", "entry": '
                     b'[{"response": {"status": "201 Created"}}, {"response": {"status": '
                     b'"400 Bad Request"}}]}'),
     "whose entry 2 answered 400 Bad Request"),
    (_http("204 No Content"), "HTTP 204 with an empty body, not"),
])
def test_fhir_2xx_that_is_not_a_transaction_response_is_held(tmp_path: Path, answer: bytes,
                                                             why: str) -> None:
    peer = RawPeer(answer, "http")
    try:
        st, d = _make(tmp_path, delivery="fhir", fhir_url=peer.url)
        st.finalise_slide("H-1")
        d.run_once()
        held, err = st.conn.execute("SELECT held, last_error FROM lis_outbox").fetchone()
        assert held == 1 and why in err, err
        d.stop()
        st.close()
    finally:
        peer.close()


@pytest.mark.parametrize("answer", [
    b"hello there\r\n\r\n",
    b"HTTP/1.1 201 Created\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    b"HTTP/1.1 201 Created\r\n" + b"X: a\r\n" * 150 + b"Content-Length: 0\r\n\r\n",
])
def test_fhir_garbled_http_answer_is_retried_with_the_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: bytes) -> None:
    peer = RawPeer(answer, "http")
    try:
        st, d = _make(tmp_path, delivery="fhir", fhir_url=peer.url)
        st.finalise_slide("H-1")
        _retried_with_a_reason(st, d, caplog, "answered with something that is not HTTP: ")
    finally:
        peer.close()


def test_a_fhir_answer_dribbled_a_line_at_a_time_is_cut_at_the_deadline(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Every read came within timeout_s, so a proxy sending a header line every 0.25 s held the
    # delivery thread for the whole answer (15 s in the adversarial pass), then counted it.
    answer = (b"HTTP/1.1 201 Created\r\n" + b"X-Slow: a\r\n" * 20
              + b"Content-Length: 0\r\n\r\n")
    peer = RawPeer(answer, "http", drip_s=0.25)
    try:
        st, d = _make(tmp_path, delivery="fhir", fhir_url=peer.url, timeout_s="0.5")
        st.finalise_slide("H-1")
        _retried_with_a_reason(st, d, caplog,
                               f"no complete answer from {peer.url} within 1 s")
    finally:
        peer.close()


def test_folder_delivery_writes_one_file_per_slide_atomically(tmp_path: Path) -> None:
    out = tmp_path / "lis-import"
    st, d = _make(tmp_path, delivery="folder", folder=str(out), format="hl7")
    sid = st.finalise_slide(DELIMS)
    d.run_once()
    assert "does not exist" in d.status()["problems"][0]["error"]  # not mounted yet: kept
    out.mkdir()
    _drain(d, lambda: any(out.iterdir()))
    files = list(out.iterdir())
    assert [f.name for f in files] == [f"A_B_C_D_E_F_{sid}.hl7"]  # no temporary left behind
    with open(files[0], encoding="utf-8", newline="") as f:  # keep HL7's CR separators
        msg = hl7.parse(f.read())
    assert msg.unescape(str(msg.segment("OBR")(2))) == DELIMS
    d.stop()
    st.close()

    st2, d2 = _make(tmp_path / "f", delivery="folder", folder=str(out), format="fhir")
    sid2 = st2.finalise_slide("H-9")
    d2.run_once()
    _validate_every_resource(json.loads((out / f"H-9_{sid2}.fhir.json").read_text()))
    d2.stop()
    st2.close()


def test_missing_report_file_is_held_with_the_reason(tmp_path: Path) -> None:
    with mllp_peer() as peer:
        st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(peer.port))
        sid = st.finalise_slide("H-1")
        (tmp_path / "data" / "slides" / sid / "report" / "report.json").unlink()
        d.run_once()
        assert peer.received == []
        s = d.status()
        assert s["held"] == 1 and "report.json" in s["problems"][0]["error"]
        d.stop()
        st.close()


def test_config_requires_the_destination_and_keeps_the_token_secret(tmp_path: Path) -> None:
    from edge_wbc.config import ConfigError

    with pytest.raises(ConfigError, match=r"lis\.host"):
        _cfg(tmp_path, delivery="mllp")
    with pytest.raises(ConfigError, match="clear text"):
        _cfg(tmp_path, delivery="fhir", fhir_url="http://fhir.lab.example/fhir",
             fhir_token="t")
    p = tmp_path / "c.toml"
    p.write_text('[lis]\ndelivery = "fhir"\nfhir_url = "https://x/fhir"\nfhir_token = "t"\n'
                 'sending_application = "A|B"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p, env={"HOME": str(tmp_path)})
    text = str(e.value)
    assert "c.toml:4: lis.fhir_token: secrets are not read from here" in text
    assert "c.toml:5: lis.sending_application" in text
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "lis-fhir-token").write_text("from-systemd\n")
    cfg = load_config(None, env={"HOME": str(tmp_path), "CREDENTIALS_DIRECTORY": str(creds),
                                 "EDGE_WBC_LIS_DELIVERY": "fhir",
                                 "EDGE_WBC_LIS_FHIR_URL": "https://x/fhir"})
    assert cfg.lis.fhir_token == "from-systemd"
    assert "from-systemd" not in repr(cfg) and cfg.to_dict()["lis"]["fhir_token"] == "***"


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:99999/fhir", "the port must be a number from 1 to 65535"),
    ("https://fhir.lab.example:http/fhir", "the port must be a number from 1 to 65535"),
    ("https://edge:pa55word@fhir.lab.example/fhir",
     "must not hold a user name or password (user:password@): give the server's bearer token "
     "as lis.fhir_token instead (EDGE_WBC_LIS_FHIR_TOKEN or the systemd credential "
     "'lis-fhir-token')"),
])
def test_config_refuses_a_fhir_url_that_cannot_work(tmp_path: Path, url: str, why: str) -> None:
    """Each passed check-config before, then crashed doctor (urlsplit's 'Port out of range') or
    could never log in while the password went to the logs and `lis status`."""
    from typer.testing import CliRunner

    from edge_wbc.cli import app
    from edge_wbc.config import ConfigError

    p = tmp_path / "c.toml"
    p.write_text(f'[lis]\ndelivery = "fhir"\nfhir_url = "{url}"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p, env={"HOME": str(tmp_path)})
    assert "c.toml:3: lis.fhir_url: " in str(e.value) and why in str(e.value)
    assert "pa55word" not in str(e.value)
    r = CliRunner().invoke(app, ["doctor", "--config", str(p), "--only", "lis"],
                           env={"HOME": str(tmp_path)})
    assert r.exit_code != 0 and why in r.output and "pa55word" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


# --------------------------------------------------------------------------- doctor and CLI


def test_doctor_and_cli_show_the_outbox(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge_wbc.cli import app
    from edge_wbc.cli import doctor as doc

    assert doc.check_lis(_cfg(tmp_path)).status == doc.SKIP
    port = free_port()
    st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(port))
    sid = st.finalise_slide("H-1")
    d.run_once()
    env = {"HOME": str(tmp_path), "EDGE_WBC_SESSION_DATA_DIR": str(tmp_path / "data"),
           "EDGE_WBC_LIS_DELIVERY": "mllp", "EDGE_WBC_LIS_HOST": "127.0.0.1",
           "EDGE_WBC_LIS_PORT": str(port)}
    cfg = load_config(None, env=env)
    row = doc.check_lis(cfg, timeout=0.5)
    assert row.status == doc.WARN and "unreachable" in row.detail
    assert "1 report(s) waiting" in row.detail

    runner = CliRunner()
    r = runner.invoke(app, ["lis", "status", "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["waiting"] == 1  # logs go to stderr, the JSON alone to stdout
    with mllp_peer() as peer:
        peer.script = ["AR"]
        d2 = LisDelivery(load_config(None, env={**env, "EDGE_WBC_LIS_PORT": str(peer.port)}).lis,
                         st.store.db_path, st.data)
        d2.run_once()
        r = runner.invoke(app, ["lis", "status"], env=env)
        assert "REFUSED  sample H-1" in r.output and "LIS answered AR" in r.output
        row = doc.check_lis(load_config(None, env={**env, "EDGE_WBC_LIS_PORT": str(peer.port)}))
        assert row.status == doc.WARN and "1 refused by the LIS" in row.detail
        assert "edge-wbc lis retry" in row.detail
        r = runner.invoke(app, ["lis", "retry"], env=env)
        assert "1 report(s) released" in r.output
        d2.run_once()
        assert peer.acked == [control_id(sid)]
        # On demand: a delivered slide sent again, and its report in every format.
        r = runner.invoke(app, ["lis", "send", "--slide", sid], env=env)
        assert r.exit_code == 0 and "queued for the LIS" in r.output
        d2.run_once()
        assert peer.acked == [control_id(sid)] * 2
        d2.stop()
    for fmt in ("hl7", "fhir", "json", "csv", "html"):
        r = runner.invoke(app, ["report", "--slide", sid, "--format", fmt], env=env)
        assert r.exit_code == 0, (fmt, r.output)
        assert r.stdout_bytes
    out = st.data / "out.hl7"
    r = runner.invoke(app, ["report", "--slide", sid, "--format", "hl7", "--out", str(out)],
                      env=env)
    assert r.exit_code == 0 and out.read_bytes().startswith(b"MSH|")
    for bad in (st.data / "no-such-folder" / "x.hl7", st.data):  # a missing folder, a folder
        r = runner.invoke(app, ["report", "--slide", sid, "--format", "hl7", "--out", str(bad)],
                          env=env)
        assert r.exit_code == 1 and f"edge-wbc: cannot write {bad}: " in r.output, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not list(st.data.glob(".*.tmp*"))
    r = runner.invoke(app, ["report", "--slide", "nope", "--format", "hl7"], env=env)
    assert r.exit_code == 1 and "no slide 'nope'" in r.output
    st.session.new_slide("H-open", 3)
    r = runner.invoke(app, ["report", "--slide", st.session.slide["id"], "--format", "hl7"],
                      env=env)
    assert r.exit_code == 1 and "not finalised" in r.output
    r = runner.invoke(app, ["report", "--slide", sid, "--format", "pdf"], env=env)
    assert r.exit_code != 0
    d.stop()
    st.close()


def test_lis_retry_of_one_slide_releases_only_a_refused_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge_wbc.cli import app

    port = free_port()
    st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(port))
    refused, waiting = st.finalise_slide("H-1"), st.finalise_slide("H-2")
    st.conn.execute("UPDATE lis_outbox SET held = 1, last_error = 'LIS answered AR'"
                    " WHERE slide_id = ?", (refused,))
    d.run_once()  # nobody listening: the other one waits
    env = {"HOME": str(tmp_path), "EDGE_WBC_SESSION_DATA_DIR": str(tmp_path / "data"),
           "EDGE_WBC_LIS_DELIVERY": "mllp", "EDGE_WBC_LIS_HOST": "127.0.0.1",
           "EDGE_WBC_LIS_PORT": str(port)}
    runner = CliRunner()
    r = runner.invoke(app, ["lis", "retry", "--slide", "nope"], env=env)
    assert r.exit_code == 1 and "no slide 'nope'" in r.output, r.output
    r = runner.invoke(app, ["lis", "retry", "--slide", waiting], env=env)
    assert r.exit_code == 0 and "released" in r.output and "1 report(s)" not in r.output
    assert f"slide {waiting} was not refused: its report is waiting for the LIS (1 attempt(s)" \
        in r.output
    r = runner.invoke(app, ["lis", "retry", "--slide", refused], env=env)
    assert r.exit_code == 0 and "1 report(s) released" in r.output
    assert st.conn.execute("SELECT COUNT(*) FROM lis_outbox WHERE held = 1").fetchone()[0] == 0
    with mllp_peer() as peer:
        d.transport.port = peer.port  # type: ignore[attr-defined]
        d._resume_at = 0.0
        _drain(d, lambda: len(peer.acked) == 2)
    r = runner.invoke(app, ["lis", "retry", "--slide", refused], env=env)
    assert r.exit_code == 1 and f"slide {refused} was delivered to mllp://" in r.output
    assert "lis send --slide" in r.output
    st.session.new_slide("H-open", 3)
    r = runner.invoke(app, ["lis", "retry", "--slide", st.session.slide["id"]], env=env)
    assert r.exit_code == 1 and "was never queued for the LIS" in r.output
    d.stop()
    st.close()


def test_formula_report_rows_and_raised_flags() -> None:
    """The report rows and flags as the lab's formula writes them (edge-wbc/report/2): kind,
    group, classes; flags naming a class or group, with their rule."""
    rep = _report(differential=[
        {"label": "neutrophil", "name": "Neutrophils", "group": "neutrophil", "kind": "counted",
         "classes": ["neutrophil", "band_neutrophil", "segmented_neutrophil"], "count": 88,
         "percent": 88.0, "ci_low": 79.9, "ci_high": 93.6},
        {"label": "blast", "name": "Blasts", "group": "abnormal_wbc", "kind": "counted",
         "classes": ["blast"], "count": 2, "percent": 2.0, "ci_low": 0.2, "ci_high": 7.0},
        {"label": "lymphocyte", "name": "Lymphocytes", "group": "lymphocyte", "kind": "counted",
         "classes": ["lymphocyte", "reactive_lymphocyte"], "count": 10, "percent": 10.0,
         "ci_low": 4.9, "ci_high": 17.6},
        {"label": "nrbc", "name": "NRBC", "group": "nrbc", "kind": "per_100_wbc",
         "classes": ["erythroblast"], "count": 3, "percent": 3.0, "ci_low": None,
         "ci_high": None},
        {"label": "non_wbc", "name": "Not leukocytes", "group": "non_wbc", "kind": "count_only",
         "classes": ["platelet", "smudge_cell"], "count": 14, "percent": 14.0, "ci_low": None,
         "ci_high": None},
    ], flags=[
        {"rule": "blast > 0", "name": "blast", "op": ">", "unit": "count", "threshold": 0,
         "count": 2, "value": 2, "text": "Blasts: 2 (blast > 0)"},
        {"rule": "smudge_cell > 10 %", "name": "smudge_cell", "op": ">", "unit": "percent",
         "threshold": 10, "count": 12, "value": 12.0, "text": "Smudge cells: 12.0 % (smudge_cell "
                                                             "> 10 %)"},
        {"rule": "band_neutrophil > 5 %", "name": "band_neutrophil", "op": ">",
         "threshold": 5, "text": "Band neutrophils: 7.0 % (band_neutrophil > 5 %)"},
        {"rule": "myelocyte > 0", "name": "myelocyte", "op": ">", "threshold": 0,
         "text": "Myelocytes: 1 (myelocyte > 0)"},
    ])
    # As the formula writes them (edge_wbc.counting.formula): the rows a flag covers.
    rep["flags"].append({"rule": "neutrophil > 80%", "name": "neutrophil", "op": ">",
                         "threshold": 80, "rows": ["band_neutrophil", "segmented_neutrophil"],
                         "text": "Neutrophil: 88.0 % (neutrophil > 80%)"})
    rep["flags"].append({"rule": "blast > 1", "name": "blast", "rows": ["blast"],
                         "threshold": 1, "text": "Blast: 2 (blast > 1)"})
    msg = hl7.parse(build_oru(rep))
    obx = {str(o(3)(1)(1)): o for o in _obx(msg)}
    assert str(obx["770-8"](8)) == "H"  # band_neutrophil is one of the neutrophil row's classes
    assert "flag: Blasts: 2 (blast > 0); Blast: 2 (blast > 1)" in str(msg)
    assert "NTE|3|L|flag: Neutrophil: 88.0 % (neutrophil > 80%)" in str(msg)
    assert str(obx["blast"](8)) == "H" and str(obx["736-9"](8)) == ""
    assert str(obx["58413-6"](6)(1)(1)) == "/100{WBCs}"
    assert str(obx["non_wbc"](5)) == "14" and str(obx["non_wbc"](8)) == "H"
    text = str(msg)
    assert "flag: Blasts: 2 (blast > 0)" in text
    # A flag no row holds still reaches the LIS, as a note on the report.
    assert "NTE|2|L|flag: Myelocytes: 1 (myelocyte > 0)" in text
    res = _validate_every_resource(build_bundle(rep))
    assert "Flag: Myelocytes: 1 (myelocyte > 0)." in res["DiagnosticReport"][0]["conclusion"]
    nrbc = next(o for o in res["Observation"] if o["code"]["coding"][0]["code"] == "58413-6")
    assert nrbc["valueQuantity"]["code"] == "/100{WBCs}" and "component" in nrbc


def test_doctor_reads_a_station_that_never_ran_with_the_lis_without_changing_it(
        tmp_path: Path) -> None:
    from edge_wbc.cli import doctor as doc

    store = Store(tmp_path / "data")
    store.close()
    db = tmp_path / "data" / "edge-wbc.sqlite3"
    before = db.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(None, env={"HOME": str(tmp_path),
                                 "EDGE_WBC_SESSION_DATA_DIR": str(tmp_path / "data"),
                                 "EDGE_WBC_LIS_DELIVERY": "folder",
                                 "EDGE_WBC_LIS_FOLDER": str(out)})
    row = doc.check_lis(cfg)
    assert row.status == doc.OK and "0 report(s) waiting, 0 refused" in row.detail
    assert db.read_bytes() == before
    out.rmdir()
    row = doc.check_lis(cfg)
    assert row.status == doc.WARN and "does not exist" in row.detail


def test_a_transport_bug_keeps_the_report_and_backs_off(tmp_path: Path) -> None:
    st, d = _make(tmp_path, delivery="folder", folder=str(tmp_path))

    def broken(rep: dict[str, Any]) -> Any:
        raise RuntimeError("boom")

    d.transport.send = broken  # type: ignore[method-assign]
    st.finalise_slide("H-1")
    wait = d.run_once()
    s = d.status()
    assert s["waiting"] == 1 and s["state"] == "unreachable"
    assert s["problems"][0]["error"] == "internal error: RuntimeError: boom"
    assert 0 < wait <= 1.0  # retry_s = 1: nothing is tried again before then
    d.stop()
    st.close()


def test_a_delivery_the_station_cannot_record_backs_off_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk after the LIS's AA: the report stays and is sent again (the identical
    message) after the back-off, not every POLL_S, and the reason is shown, not a traceback."""
    def full(*a: Any, **k: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with mllp_peer() as peer:
        st, d = _make(tmp_path, delivery="mllp", host="127.0.0.1", port=str(peer.port))
        sid = st.finalise_slide("H-1")
        monkeypatch.setattr(outbox, "delivered", full)
        d.run_once()
        assert peer.acked == [control_id(sid)]
        d.run_once()  # at once: nothing is sent before the back-off is over
        assert len(peer.received) == 1
        why = (f"the LIS accepted it (AA for message {control_id(sid)}), but the station cannot "
               "record that in its database: database or disk is full")
        s = d.status()
        assert s["waiting"] == 1 and s["problems"][0]["error"] == why
        # The smaller write fitted: `lis status` (another process) reads it from the database.
        assert st.conn.execute("SELECT attempts, last_error FROM lis_outbox").fetchone() == (
            1, why)
        # Nothing at all can be written: the delivery still backs off and shows it from memory.
        monkeypatch.setattr(outbox, "failed", full)
        d._resume_at = 0.0
        d.run_once()
        assert len(peer.received) == 2 and d.status()["problems"][0]["attempts"] == 2
        assert d._resume_at > time.monotonic()
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        monkeypatch.undo()
        _drain(d, lambda: st.conn.execute("SELECT COUNT(*) FROM lis_outbox").fetchone()[0] == 0)
        assert len({str(m) for m in peer.received}) == 1  # the identical message each time
        assert d.status()["problems"] == [] and d.status()["state"] == "ok"
        d.stop()
        st.close()


def test_a_delivery_thread_that_keeps_failing_backs_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    st, d = _make(tmp_path, delivery="folder", folder=str(tmp_path))
    calls: list[int] = []

    def locked(*a: Any) -> None:
        calls.append(1)
        raise sqlite3.OperationalError("disk I/O error")

    class Clock:
        """The thread's waits, without waiting: three turns of the loop, then stop."""
        def __init__(self) -> None:
            self.n = 0

        def wait(self, t: float) -> None:
            self.n += 1
            if self.n == 3:
                d._stop.set()

        def clear(self) -> None:
            pass

        def set(self) -> None:
            pass

    monkeypatch.setattr(outbox, "due", locked)
    d._wake = Clock()  # type: ignore[assignment]
    d._run()
    # Tried once, then left alone for the back-off; one traceback, not one per turn.
    assert len(calls) == 1 and d._resume_at > time.monotonic()
    assert len([r for r in caplog.records if r.exc_info]) == 1
    d._stop.clear()
    d.stop()
    st.close()


@pytest.mark.parametrize(("retry_s", "waits"), [
    ("1", [1, 2, 4, 8]),
    ("200", [200, 400, 600, 600]),
    ("1200", [1200, 1200, 1200, 1200]),
])
def test_back_off_doubles_to_ten_minutes_or_keeps_a_longer_retry_s(
        tmp_path: Path, retry_s: str, waits: list[int]) -> None:
    st, d = _make(tmp_path, delivery="folder", folder=str(tmp_path / "absent"), retry_s=retry_s)
    st.finalise_slide("H-1")
    seen = []
    for _ in waits:
        d._resume_at = 0.0
        d.run_once()
        seen.append(round(d._resume_at - time.monotonic()))
    assert seen == waits
    d.stop()
    st.close()
