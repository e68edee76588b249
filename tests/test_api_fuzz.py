"""Property-based checks (hypothesis) of every door a request or command comes in through: the
station's POST routes, MQTT command payloads and the sample-ID rule. Whatever arrives, the answer
is a refusal with a reason or a valid action, never a 500, a traceback or a rule bent."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from station_fakes import RunningStation

from edge_wbc.comms.commands import CommandError, parse_command
from edge_wbc.inputs import (
    MAX_SAMPLE_ID_CHARS,
    MAX_TARGET,
    InputError,
    check_sample_id,
    hidden_char,
)
from edge_wbc.station.actions import REMOTE

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fields"
pytestmark = pytest.mark.timeout(600)

# JSON as a hostile client writes it: odd numbers (huge, fractional, non-finite: Python's
# json.dumps writes Infinity/NaN), any text, nesting.
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=80))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
# Bodies shaped like the API's (the keys it reads), so the fuzz reaches past "unknown key".
_keys = st.sampled_from(["sample_id", "target", "abandon", "trigger", "label", "reason", "ids",
                         "operator", "signed_off_by", "comment", "id"])
api_bodies = st.dictionaries(_keys, json_values, max_size=4) | json_values
ROUTES = ["/api/capture", "/api/slide/new", "/api/slide/sample", "/api/slide/target",
          "/api/slide/finalise", "/api/slide/notes", "/api/errors/clear", "/api/cells/confirm",
          "/api/cells/add", "/api/cells/c-1/review", "/api/cells/c-1/confirm",
          "/api/cells/c-1/comment", "/api/fields/f-1/discard", "/api/adaptation/activate",
          "/api/nothing"]
ANSWERS = {200, 202, 400, 404, 409, 411, 413, 415, 422, 429, 503, 507}


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory):
    rs = RunningStation(tmp_path_factory.mktemp("fuzz") / "data", f"folder:{SAMPLES}",
                        target=5)
    yield rs
    rs.close()


def _post(rs: RunningStation, path: str, raw: bytes) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", rs.server.port, timeout=20)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(ROUTES), body=api_bodies, pick=st.integers(0, 10**6))
def test_post_routes_answer_every_json_body(station: RunningStation, path: str,
                                            body: Any, pick: int) -> None:
    # Mostly a real cell of the open slide, so the fuzz gets past "no such cell".
    cells = [c["id"] for c in station.session.gallery()] + ["c-1"]
    path = path.replace("c-1", cells[pick % len(cells)])
    status, answer = _post(station, path, json.dumps(body).encode())
    assert status in ANSWERS, (status, answer)
    if status >= 400:
        assert isinstance(answer, dict) and answer["error"] and answer["status"] == status
    state = station.session.state()
    assert 1 <= state["target"] <= MAX_TARGET
    assert hidden_char(state["sample_id"]) is None
    assert len(state["sample_id"]) <= MAX_SAMPLE_ID_CHARS or state["sample_id"].startswith(
        "unnamed-")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(ROUTES[:5]), raw=st.binary(max_size=400))
def test_post_routes_answer_any_bytes(station: RunningStation, path: str, raw: bytes) -> None:
    status, answer = _post(station, path, raw)
    assert status in ANSWERS and status != 500, (status, answer)


@given(kind=st.sampled_from(["capture", "slide", "other"]),
       raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["action", "sample_id", "target", "request_id"]),
                         json_values | st.sampled_from(["new", "finalise", "target"]),
                         max_size=4).map(lambda d: json.dumps(d).encode()))
def test_mqtt_commands_are_refused_or_valid(kind: str, raw: bytes) -> None:
    try:
        cmd = parse_command(kind, raw)
    except CommandError as e:
        assert str(e)
        return
    assert cmd.action in REMOTE and cmd.kind == kind
    if "target" in cmd.args:
        t = cmd.args["target"]
        assert type(t) is int and 1 <= t <= MAX_TARGET
    if "sample_id" in cmd.args:
        assert check_sample_id(cmd.args["sample_id"]) == cmd.args["sample_id"] != ""
    assert cmd.request_id is None or isinstance(cmd.request_id, str)


@given(st.text(max_size=100))
def test_sample_id_rule(text: str) -> None:
    try:
        out = check_sample_id(text)
    except InputError as e:
        assert "sample id" in str(e)
        assert hidden_char(text.strip()) is not None or len(text.strip()) > MAX_SAMPLE_ID_CHARS
        return
    assert out == text.strip() and len(out) <= MAX_SAMPLE_ID_CHARS
    assert hidden_char(out) is None
