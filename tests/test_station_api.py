"""The station's HTTP API, SSE and preview, wired as `edge-wbc station` wires them, with a
deterministic analyzer (tests only) so counts are known."""

from __future__ import annotations

import http.client
import json
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from station_fakes import FakeAnalyzer, HeldAnalyzer, RunningStation

from edge_wbc.camera import CameraError, Frame
from edge_wbc.pipeline.results import FieldResult

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fields"


def req(url: str, method: str = "GET", body: Any = None, headers: dict | None = None,
        raw: bytes | None = None) -> tuple[int, dict, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    h = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=data, headers=h)
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), payload


def jreq(url: str, method: str = "GET", body: Any = None, **kw: Any) -> tuple[int, Any]:
    if method == "POST" and body is None:
        body = {}
    status, _, payload = req(url, method, body, **kw)
    return status, json.loads(payload) if payload else None


@pytest.fixture()
def st(tmp_path: Path):
    rs = RunningStation(tmp_path / "data", f"folder:{SAMPLES}", target=10)
    yield rs
    rs.close()


def capture(rs: RunningStation, n: int = 1) -> None:
    for _ in range(n):
        status, body = jreq(rs.url + "/api/capture", "POST")
        assert status == 202, body
        rs.wait_idle()


def test_capture_counts_and_state(st: RunningStation) -> None:
    capture(st, 3)
    status, s = jreq(st.url + "/api/state")
    assert status == 200
    # FakeAnalyzer: one cell per field, two on every third -> 4 cells in 3 fields.
    assert s["counted"] == 4 and s["fields"] == 3
    assert s["station"]["fields_analysed"] == 3 and s["station"]["camera"]["ok"]
    status, f = jreq(st.url + "/api/fields/last")
    assert status == 200 and f["seq"] == 3 and len(f["cells"]) == 2
    status, _, img = req(st.url + f"/api/fields/{f['id']}.jpg")
    assert status == 200 and img[:2] == b"\xff\xd8"
    status, _, crop = req(st.url + f"/api/cells/{f['cells'][0]['id']}.jpg")
    assert status == 200 and crop[:2] == b"\xff\xd8"
    status, g = jreq(st.url + "/api/cells")
    assert len(g["cells"]) == 4


def test_sse_pushes_state_and_events(st: RunningStation) -> None:
    u = urlsplit(st.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/api/events")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"

    def next_event() -> tuple[str, dict]:
        kind = None
        while True:
            line = r.fp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                return kind or "", json.loads(line[6:])

    kind, hello = next_event()
    assert kind == "hello" and hello["counted"] == 0 and "station" in hello
    jreq(st.url + "/api/capture", "POST")
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 10
    while "differential" not in seen or seen["differential"]["counted"] < 1:
        assert time.monotonic() < deadline
        k, d = next_event()
        seen[k] = d
    assert seen["field"]["seq"] == 1 and seen["cell"]["action"] == "counted"
    assert "status" in seen
    conn.close()


def test_busy_queue_refuses_visibly_and_loses_nothing(tmp_path: Path) -> None:
    rs = RunningStation(tmp_path / "d", f"folder:{SAMPLES}", analyzer=FakeAnalyzer(delay_s=0.4),
                        queue_max=1)
    try:
        codes = [jreq(rs.url + "/api/capture", "POST") for _ in range(4)]
        statuses = [c[0] for c in codes]
        assert statuses.count(202) >= 2 and 429 in statuses
        refused = next(b for s, b in codes if s == 429)
        assert "waiting for analysis" in refused["error"]
        assert rs.station.status()["last_error"]["kind"] == "busy"
        rs.wait_idle()
        # Every accepted capture was counted; none of the refused ones silently was.
        assert rs.session.state()["fields"] == statuses.count(202)
        assert rs.station.status()["last_error"] is None
    finally:
        rs.close()


def test_corrupt_frame_is_reported_and_next_works(tmp_path: Path) -> None:
    d = tmp_path / "fields"
    d.mkdir()
    src = sorted(SAMPLES.glob("*.jpg"))
    (d / "a.jpg").write_bytes(src[0].read_bytes()[:5000])  # truncated
    shutil.copy(src[1], d / "b.jpg")
    rs = RunningStation(tmp_path / "data", f"folder:{d}")
    try:
        status, body = jreq(rs.url + "/api/capture", "POST")
        assert status == 422 and "a.jpg" in body["error"]
        status, s = jreq(rs.url + "/api/state")
        assert s["station"]["last_error"]["kind"] == "frame" and "a.jpg" in \
            s["station"]["last_error"]["message"]
        capture(rs)
        assert rs.session.state()["counted"] == 1
        assert rs.station.status()["last_error"] is None
    finally:
        rs.close()


class _Unplugged:
    name = "USB camera 0"

    def capture(self) -> Frame:
        raise CameraError("USB camera 0: no frames: camera unplugged or switched off?")

    def preview(self) -> None:
        return None

    def status(self) -> dict:
        return {"ok": False, "message": "no frames: camera unplugged or switched off?"}

    def close(self) -> None:
        pass


def test_camera_unplugged_is_reported(st: RunningStation) -> None:
    capture(st)
    st.station.poll()
    n = len([e for e in st.events if e.kind == "status"])
    st.station.source = _Unplugged()
    st.station.poll()  # the command's main loop calls this every second
    pushed = [e for e in st.events if e.kind == "status"][n:]
    assert pushed and not pushed[-1].payload["camera"]["ok"]
    status, body = jreq(st.url + "/api/capture", "POST")
    assert status == 503 and "unplugged" in body["error"]
    s = jreq(st.url + "/api/state")[1]
    assert not s["station"]["camera"]["ok"] and s["counted"] == 1
    assert req(st.url + "/api/preview.jpg")[0] == 503


def test_disk_full_is_refused_at_once_and_nothing_counted_lost(st: RunningStation) -> None:
    capture(st, 2)
    before = st.session.state()["counted"]
    st.store.min_free_bytes = 1 << 62
    status, body = jreq(st.url + "/api/capture", "POST")
    # Refused there and then (not a 202 followed by a status message): nothing was queued.
    assert status == 507 and "capture refused" in body["error"]
    assert st.station.status()["queue"] == 0 and not st.station.status()["busy"]
    s = jreq(st.url + "/api/state")[1]
    assert s["counted"] == before and s["fields"] == 2
    assert s["station"]["last_error"]["kind"] == "disk"
    st.store.min_free_bytes = 0
    capture(st)
    assert st.session.state()["fields"] == 3
    assert [c["status"] for c in st.store.captures()] == ["counted"] * 3


def test_disk_filling_while_queued_is_reported_and_recorded(tmp_path: Path) -> None:
    rs = RunningStation(tmp_path / "d", f"folder:{SAMPLES}", analyzer=FakeAnalyzer(delay_s=0.5))
    try:
        status, body = jreq(rs.url + "/api/capture", "POST")
        assert status == 202
        rs.store.min_free_bytes = 1 << 62  # the disk fills while the field is being analysed
        rs.wait_idle()
        err = rs.station.status()["last_error"]
        assert err["kind"] == "disk" and "not counted" in err["message"]
        assert rs.session.state()["fields"] == 0
        (row,) = rs.store.captures()
        assert row["id"] == body["capture_id"] and row["status"] == "refused"
        assert "not counted" in row["message"]
    finally:
        rs.close()


def test_analysis_error_is_reported(st: RunningStation) -> None:
    def broken(rgb: np.ndarray, path: str = "") -> FieldResult:
        raise RuntimeError("interpreter exploded")

    st.station.analyze = broken
    jreq(st.url + "/api/capture", "POST")
    st.wait_idle()
    err = st.station.status()["last_error"]
    assert err["kind"] == "analysis" and "exploded" in err["message"]
    assert st.station.worker.is_alive()
    st.station.analyze = lambda rgb, path="": FieldResult(path, 640, 480, error="16-bit TIFF")
    jreq(st.url + "/api/capture", "POST")
    st.wait_idle()
    assert "16-bit TIFF" in st.station.status()["last_error"]["message"]
    assert st.session.state()["fields"] == 0


def test_review_target_finalise_report(st: RunningStation) -> None:
    capture(st, 8)  # 10 cells with FakeAnalyzer's 1,1,2 pattern; one is unidentified
    s = jreq(st.url + "/api/state")[1]
    assert s["complete"] and s["unidentified"] == 1
    status, body = jreq(st.url + "/api/capture", "POST")
    assert status == 409 and "target of 10 cells reached" in body["error"]
    assert jreq(st.url + "/api/slide/report.html")[0] == 404  # no report before finalise
    status, body = jreq(st.url + "/api/slide/finalise", "POST")
    assert status == 409 and "unidentified" in body["error"]

    cells = jreq(st.url + "/api/cells")[1]["cells"]
    assert cells[0]["group"] == "unidentified"  # the cells to resolve come first
    unid = cells[0]["id"]
    status, c = jreq(st.url + f"/api/cells/{unid}/review", "POST", {"label": "monocyte"})
    assert status == 200 and c["effective_label"] == "monocyte" and c["label"] == "unidentified"
    neu = next(c for c in cells if c["group"] == "neutrophil")["id"]
    status, c = jreq(st.url + f"/api/cells/{neu}/review", "POST",
                     {"label": "rejected", "reason": "counted_twice"})
    assert status == 200 and c["effective_label"] is None
    assert jreq(st.url + f"/api/cells/{neu}/review", "POST", {"label": "unicorn"})[0] == 400
    assert jreq(st.url + f"/api/cells/{neu}/review", "POST", {})[0] == 400
    # 9 counted after the rejection: below target again, capture is allowed again.
    s = jreq(st.url + "/api/state")[1]
    assert s["counted"] == 9 and not s["complete"]
    status, s = jreq(st.url + "/api/slide/target", "POST", {"target": 9})
    assert status == 200 and s["can_finalise"]
    assert jreq(st.url + "/api/slide/target", "POST", {"target": "lots"})[0] == 400

    status, final = jreq(st.url + "/api/slide/finalise", "POST")
    assert status == 200 and final["finalised"]
    status, h, page = req(st.url + "/api/slide/report.html")
    assert status == 200 and h["Content-Type"].startswith("text/html") and b"Leukocyte" in page
    status, h, js = req(st.url + "/api/slide/report.json")
    assert status == 200 and "attachment" in h["Content-Disposition"]
    rep = json.loads(js)
    assert rep["counted"] == 9 and len(rep["reviewed_changes"]) == 2
    status, h, csv = req(st.url + "/api/slide/report.csv")
    assert status == 200 and csv.startswith(b"sample_id,")
    # Closed slide: no more reviews, captures or target changes.
    assert jreq(st.url + f"/api/cells/{unid}/review", "POST", {"label": "neutrophil"})[0] == 409
    assert jreq(st.url + "/api/capture", "POST")[0] == 409
    status, s = jreq(st.url + "/api/slide/new", "POST", {"sample_id": "NEXT-1", "target": 200})
    assert status == 200 and s["sample_id"] == "NEXT-1" and s["counted"] == 0
    # The old slide's report is still reachable by id.
    old = rep["slide_id"]
    assert req(st.url + f"/api/slide/report.json?slide={old}")[0] == 200


def test_new_slide_needs_abandon_when_open(st: RunningStation) -> None:
    capture(st)
    status, body = jreq(st.url + "/api/slide/new", "POST", {"sample_id": "X"})
    assert status == 409 and "abandon" in body["error"]
    old = jreq(st.url + "/api/state")[1]["slide_id"]
    status, s = jreq(st.url + "/api/slide/new", "POST", {"sample_id": "X", "abandon": True})
    assert status == 200 and s["counted"] == 0
    status, body = jreq(st.url + f"/api/slide/report.json?slide={old}")
    assert status == 404 and "was abandoned: it has no report" in body["error"]
    assert jreq(st.url + "/api/slide/sample", "POST", {"sample_id": "X-2"})[1]["sample_id"] == "X-2"


def test_a_field_analysed_after_a_new_slide_is_not_counted_on_it(tmp_path: Path) -> None:
    # One patient's field must never land on the next patient's slide: the capture was accepted
    # for slide A, a new slide B started while it was being analysed.
    an = HeldAnalyzer()
    rs = RunningStation(tmp_path / "data", f"folder:{SAMPLES}", analyzer=an, target=10)
    try:
        first = jreq(rs.url + "/api/slide/new", "POST", {"sample_id": "PATIENT-A"})[1]
        status, _ = jreq(rs.url + "/api/capture", "POST")
        assert status == 202 and an.entered.wait(10)
        status, st_b = jreq(rs.url + "/api/slide/new", "POST", {"sample_id": "PATIENT-B"})
        assert status == 200 and st_b["slide_id"] != first["slide_id"]
        an.release.set()
        rs.wait_idle()
        state = jreq(rs.url + "/api/state")[1]
        assert state["sample_id"] == "PATIENT-B" and state["fields"] == 0 and state["counted"] == 0
        assert "captured for slide" in rs.station.last_error["message"]
    finally:
        an.release.set()
        rs.close()


def test_a_stale_page_cannot_act_on_the_next_patients_slide(st: RunningStation) -> None:
    """A dialog opened for slide P-ONE, saved after another client finalised it and started
    P-TWO: the sample ID, sign-off, target and finalise landed on P-TWO (adversarial pass)."""
    one = jreq(st.url + "/api/slide/new", "POST", {"sample_id": "P-ONE", "target": 500})[1]
    capture(st, 1)
    jreq(st.url + "/api/slide/new", "POST", {"sample_id": "P-TWO", "abandon": True})
    two = jreq(st.url + "/api/state")[1]
    stale = one["slide_id"]
    for path, body in (("/api/slide/sample", {"sample_id": "P-ONE-corrected"}),
                       ("/api/slide/notes", {"signed_off_by": "Dr A", "comment": "slide one"}),
                       ("/api/slide/target", {"target": 1}),
                       ("/api/slide/finalise", {}),
                       ("/api/slide/new", {"sample_id": "P-THREE", "abandon": True})):
        status, answer = jreq(st.url + path, "POST", {**body, "slide_id": stale})
        assert status == 409 and "the slide has changed" in answer["error"], (path, answer)
    now = jreq(st.url + "/api/state")[1]
    assert now["slide_id"] == two["slide_id"] and now["sample_id"] == "P-TWO"
    assert now["target"] == two["target"] and not now["finalised"]
    assert now["notes"] == {"operator": "", "signed_off_by": "", "comment": ""}
    # the slide it names, or none (MQTT, scripts: "whatever is open"), is acted on as before
    ok = jreq(st.url + "/api/slide/sample", "POST", {"sample_id": "P-2", "slide_id":
                                                     two["slide_id"]})
    assert ok[0] == 200 and ok[1]["sample_id"] == "P-2"
    assert jreq(st.url + "/api/slide/target", "POST", {"target": 7})[1]["target"] == 7
    assert jreq(st.url + "/api/slide/sample", "POST", {"sample_id": "P-3", "slide_id": 5}
                )[0] == 400


def test_taking_back_a_hand_added_cell_never_undoes_a_later_correction(
        st: RunningStation) -> None:
    # U in one tab rejected as "added in error" a cell another person had corrected meanwhile.
    capture(st, 1)
    cell = jreq(st.url + "/api/cells/add", "POST", {"label": "eosinophil"})[1]
    url = st.url + f"/api/cells/{cell['id']}/review"
    assert jreq(url, "POST", {"label": "monocyte"})[0] == 200  # the other tab
    status, body = jreq(url, "POST", {"label": "rejected", "reason": "added_in_error",
                                      "if_unreviewed": True})
    assert status == 409 and "was reviewed meanwhile (now monocyte)" in body["error"]
    assert st.session.cells[cell["id"]]["reviewed_label"] == "monocyte"
    other = jreq(st.url + "/api/cells/add", "POST", {"label": "eosinophil"})[1]
    status, body = jreq(st.url + f"/api/cells/{other['id']}/review", "POST",
                        {"label": "rejected", "reason": "added_in_error", "if_unreviewed": True})
    assert status == 200 and body["effective_label"] is None
    assert jreq(url, "POST", {"label": None, "if_unreviewed": "yes"})[0] == 400


def test_finalise_waits_for_the_fields_still_being_analysed(tmp_path: Path) -> None:
    # A capture answered 202 and then refused because the slide was finalised meanwhile: a
    # field the technician was promised, lost.
    an = HeldAnalyzer(hold=False)
    rs = RunningStation(tmp_path / "data", f"folder:{SAMPLES}", analyzer=an, target=500)
    try:
        assert jreq(rs.url + "/api/capture", "POST")[0] == 202
        rs.wait_idle()
        for c in rs.session.cells.values():  # nothing left to review
            if c["label"] == "unidentified":
                rs.session.review(c["id"], "lymphocyte")
        an.hold = True
        assert jreq(rs.url + "/api/capture", "POST")[0] == 202
        assert an.entered.wait(10)
        counted = rs.session.state()["counted"]
        assert jreq(rs.url + "/api/slide/target", "POST", {"target": counted})[0] == 200
        status, body = jreq(rs.url + "/api/slide/finalise", "POST")
        assert status == 409 and "1 field captured for this slide is still being analysed" \
            in body["error"], body
        an.release.set()
        rs.wait_idle()
        state = rs.session.state()
        assert state["fields"] == 2 and not state["finalised"]
        for c in rs.session.cells.values():
            if c["label"] == "unidentified":
                rs.session.review(c["id"], "lymphocyte")
        status, body = jreq(rs.url + "/api/slide/target", "POST",
                            {"target": rs.session.state()["counted"]})
        assert jreq(rs.url + "/api/slide/finalise", "POST")[0] == 200
    finally:
        an.release.set()
        rs.close()


def test_a_stop_that_cannot_wait_for_every_field_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    an = HeldAnalyzer()
    rs = RunningStation(tmp_path / "data", f"folder:{SAMPLES}", analyzer=an, target=500)
    try:
        for _ in range(2):
            assert jreq(rs.url + "/api/capture", "POST")[0] == 202
        with caplog.at_level(logging.WARNING, logger="edge_wbc.station.app"):
            rs.station.stop(timeout=0.3)
        assert "stopping with 2 capture(s) not analysed" in caplog.text
    finally:
        an.release.set()
        rs.close()


def test_a_body_that_never_arrives_is_a_408_not_a_crash(
    st: RunningStation, capfd: pytest.CaptureFixture[str]
) -> None:
    import socket

    st.server.idle_timeout_s = 1.0
    u = urlsplit(st.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(b"POST /api/slide/target HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 20\r\n\r\n"
                     b'{"target":')  # fmt: skip
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after answering
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"did not arrive" in answer
    assert jreq(st.url + "/api/state")[0] == 200  # and it goes on serving
    assert "Traceback" not in capfd.readouterr().err


def test_page_static_and_preview(st: RunningStation) -> None:
    status, h, page = req(st.url + "/")
    assert status == 200 and b"<title>edge-wbc" in page and "text/html" in h["Content-Type"]
    for f in ("app.js", "style.css"):
        assert req(st.url + f"/static/{f}")[0] == 200
    assert req(st.url + "/static/../server.py")[0] == 404
    assert req(st.url + "/static/%2e%2e/server.py")[0] == 404
    status, h, jpg = req(st.url + "/api/preview.jpg")
    assert status == 200 and jpg[:2] == b"\xff\xd8"
    u = urlsplit(st.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/api/preview.mjpg")
    r = conn.getresponse()
    assert r.getheader("Content-Type").startswith("multipart/x-mixed-replace")
    head = r.fp.read(400)
    assert b"--edgewbcframe" in head and b"\xff\xd8" in head
    conn.close()


def test_request_hygiene(st: RunningStation) -> None:
    # DNS rebinding: a foreign Host is refused on a loopback station.
    assert req(st.url + "/api/state", headers={"Host": "evil.example:80"})[0] == 403
    assert req(st.url + "/api/state", headers={"Host": "localhost:1234"})[0] == 200
    # A cross-site form post (not JSON) does not capture.
    status, _, _ = req(st.url + "/api/capture", "POST", raw=b"x=1",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    assert req(st.url + "/api/capture", "POST", raw=b"{nope",
               headers={"Content-Type": "application/json"})[0] == 400
    assert req(st.url + "/api/nothing")[0] == 404
    assert st.session.state()["fields"] == 0


def test_token_required_beyond_loopback(tmp_path: Path) -> None:
    from edge_wbc.station.server import StationServer

    rs = RunningStation(tmp_path / "d", f"folder:{SAMPLES}", token="s3cret-token")
    try:
        assert req(rs.url + "/api/state")[0] == 401
        assert req(rs.url + "/api/state", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert req(rs.url + "/api/state",
                   headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        status, h, _ = req(rs.url + "/?token=s3cret-token")
        assert status == 303 and h["Location"] == "/" and "HttpOnly" in h["Set-Cookie"]
        cookie = h["Set-Cookie"].split(";")[0]
        assert req(rs.url + "/api/state", headers={"Cookie": cookie})[0] == 200
        with pytest.raises(ValueError, match="token"):
            StationServer(rs.station, rs.hub, "0.0.0.0", 0, None)
    finally:
        rs.close()
