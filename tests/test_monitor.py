"""``edge-wbc monitor``: the central view of many stations, against a real Mosquitto."""

from __future__ import annotations

import io
import json
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mqtt_support import Mosquitto, settings, sim_with_publisher, wait_for

from edge_wbc.cli import app
from edge_wbc.comms.monitor import Monitor, StationTable, run
from edge_wbc.counting import outbox

pytestmark = pytest.mark.timeout(120)


def test_table_folds_messages_and_ignores_junk() -> None:
    t = StationTable("edge-wbc")
    diff = {"slide": {"slide_id": "s1", "sample_id": "LAB-42"}, "target": 100, "counted": 50,
            "complete": False, "counts": {"neutrophil": 30, "lymphocyte": 20, "unidentified": 1},
            "percentages": {"neutrophil": 60.0, "lymphocyte": 40.0}}
    assert t.handle("edge-wbc/bench-1/differential", json.dumps(diff).encode(), now=100.0)
    assert t.handle("edge-wbc/bench-1/available", b"online", now=100.0) == "bench-1"
    assert t.handle("edge-wbc/bench-2/available", b"offline", now=50.0) == "bench-2"
    assert t.handle("edge-wbc/bench-2/differential", b"{not json", now=50.0) is None
    assert t.handle("other/bench-3/available", b"online") is None
    assert t.handle("edge-wbc/bench-1/capture/set", b"PRESS") is None
    assert t.handle("edge-wbc/bench-4/available", b"") is None  # cleared retained message
    v = t.stations["bench-1"].to_json()
    assert v["sample_id"] == "LAB-42" and v["counted"] == 50 and v["target"] == 100
    assert v["counts"]["neutrophil"] == 30 and v["counts"]["unidentified"] == 1
    text = t.render(now=110.0)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["STATION", "STATUS", "SAMPLE", "COUNTED"]
    assert lines[1].split()[:9] == ["bench-1", "online", "LAB-42", "50/100", "60.0", "0.0",
                                    "0.0", "40.0", "0.0"]
    assert lines[2].split()[:4] == ["bench-2", "offline", "-", "-"]
    assert lines[-1] == "2 stations, 1 online"


def test_online_without_fresh_stats_is_shown_stale() -> None:
    t = StationTable()
    t.handle("edge-wbc/s/available", b"online", now=1000.0)
    t.handle("edge-wbc/s/stats", json.dumps(
        {"ts": "1970-01-01T00:16:40Z", "interval_s": 60}).encode(), now=1000.0)  # t = 1000 s
    assert t.stations["s"].status(now=1100.0) == "online"
    assert t.stations["s"].status(now=1000.0 + 3 * 60 + 11) == "stale"
    assert "0 online" in t.render(now=2000.0) and " stale " in t.render(now=2000.0)
    t.handle("edge-wbc/s/available", b"offline")
    assert t.stations["s"].status(now=2000.0) == "offline"


def test_percentages_computed_when_absent() -> None:
    t = StationTable()
    t.handle("edge-wbc/s/differential", json.dumps(
        {"counted": 4, "target": 100, "counts": {"neutrophil": 3, "monocyte": 1}}).encode())
    pct = t.stations["s"].percentages()
    assert pct["neutrophil"] == 75.0 and pct["monocyte"] == 25.0


GOOD = {"schema": "edge-wbc/mqtt/2", "counted": 50, "target": 100, "sample_id": "OK-1",
        "counts": {"neutrophil": 50},
        "classes": [{"label": "neutrophil", "kind": "counted", "count": 50, "percent": 100.0}]}


def _row(**bad: object) -> dict[str, object]:
    return {**GOOD, "classes": [{**GOOD["classes"][0], **bad}]}  # type: ignore[dict-item]


@pytest.mark.parametrize("bad, problem", [
    (_row(count="many"), "classes[0].count is not a count"),
    (_row(kind="weird"), "classes[0].kind is not one of"),
    (_row(percent="x"), "classes[0].percent is not a number"),
    (_row(count=[1]), "classes[0].count is not a count"),
    (_row(count=1e400), "classes[0].count is not a count"),
    ({**GOOD, "counts": [1, 2]}, "counts is not an object"),
    ({**GOOD, "counts": {"neutrophil": "x"}}, "counts.neutrophil is not a count"),
    ({"counted": 1, "percentages": {"neutrophil": "x"}}, "percentages.neutrophil is not a number"),
    ({"counted": 1, "counts": {"neutrophil": "1x"}}, "counts.neutrophil is not a count"),
    ({**GOOD, "counted": -3}, "counted is not a count"),
    ({**GOOD, "flags": ["blast > 0"]}, "flags is not a list of objects"),
    ({**GOOD, "schema": "edge-wbc/mqtt/9"}, "schema 'edge-wbc/mqtt/9' is not one this monitor"),
])
def test_a_malformed_differential_is_named_and_the_other_stations_shown(
        bad: dict[str, object], problem: str, caplog: pytest.LogCaptureFixture) -> None:
    # Retained on the broker, a bad message stopped the monitor at every start, for every station.
    t = StationTable()
    t.handle("edge-wbc/good-1/differential", json.dumps(GOOD).encode(), now=100.0)
    assert t.handle("edge-wbc/bad-1/differential", json.dumps(bad).encode(), now=100.0)
    text = t.render(now=100.0)
    assert "good-1" in text and "OK-1" in text
    assert f"bad-1: differential not shown: {problem}" in text
    assert problem in caplog.text
    assert t.stations["bad-1"].to_json()["problem"].startswith(problem)
    assert t.stations["good-1"].to_json()["problem"] is None
    # the station's next good differential is shown again
    t.handle("edge-wbc/bad-1/differential", json.dumps(GOOD).encode(), now=101.0)
    assert "not shown" not in t.render(now=101.0)


def test_what_other_publishers_send_cannot_forge_or_hide_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    t = StationTable()
    forged = {**GOOD, "sample_id": "A\x1b[2J\x1b]0;pwned\x07B\nFAKE-ROW online 100/100"}
    t.handle("edge-wbc/s1/differential", json.dumps(forged).encode(), now=100.0)
    t.handle("edge-wbc/s1/available", b"on\x1bline", now=100.0)
    text = t.render(now=100.0)
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("FAKE-ROW") for line in text.splitlines())
    assert "A\ufffd[2J" in text
    # an integer of 5,000 digits is not JSON Python reads: said, not silently dropped
    huge = b'{"counted": ' + b"9" * 5000 + b', "target": 100}'
    assert t.handle("edge-wbc/s2/differential", huge) is None
    assert "ignoring non-JSON differential from s2" in caplog.text


@pytest.mark.broker
def test_twenty_stations_on_one_broker_all_shown_with_correct_counts(
        broker: Mosquitto, tmp_path: Path) -> None:
    n = 20
    with ExitStack() as stack:
        sims = []
        for i in range(n):
            sim, pub = stack.enter_context(sim_with_publisher(
                tmp_path / f"st{i:02d}.db", settings(broker.port, f"st{i:02d}")))
            for _ in range(i % 7 + 1):
                sim.capture(i % 3 + 1)
            sims.append((sim, pub))
        for sim, pub in sims:
            wait_for(lambda pub=pub: pub.connected, 15, "all stations connected")
            wait_for(lambda sim=sim: outbox.depth(sim.conn) == 0, 15, "all outboxes drained")

        # Wait for the retained differentials to be the final state, then ask the CLI.
        def expected() -> dict[str, dict]:
            return {sim.station: sim.state() for sim, _ in sims}

        runner = CliRunner()

        def snapshot() -> dict[str, dict]:
            res = runner.invoke(app, ["monitor", "--mqtt-host", "127.0.0.1", "--mqtt-port",
                                      str(broker.port), "--json", "--once"])
            assert res.exit_code == 0, res.output
            return {d["station"]: d for d in map(json.loads, res.stdout.splitlines())}

        def matches() -> bool:
            got = snapshot()
            return len(got) == n and all(
                got[s]["counted"] == st["counted"] and got[s]["counts"] == {
                    **st["counts"], "unidentified": 0} and got[s]["available"] == "online"
                for s, st in expected().items())

        wait_for(matches, 20, "monitor showing all 20 stations with their counts", step=0.5)
        table = runner.invoke(app, ["monitor", "--mqtt-host", "127.0.0.1", "--mqtt-port",
                                    str(broker.port), "--once"])
        assert table.exit_code == 0, table.output
        rows = {ln.split()[0]: ln.split() for ln in table.stdout.splitlines()[1:n + 1]}
        assert len(rows) == n
        for s, st in expected().items():
            assert rows[s][1] == "online" and rows[s][3] == f"{st['counted']}/100"
        assert f"{n} stations, {n} online" in table.stdout
    # Every station exited cleanly: the central view says so.
    res = CliRunner().invoke(app, ["monitor", "--mqtt-host", "127.0.0.1", "--mqtt-port",
                                   str(broker.port), "--json", "--once"])
    assert {json.loads(x)["available"] for x in res.stdout.splitlines()} == {"stopped"}


@pytest.mark.broker
def test_live_updates_as_json_lines(broker: Mosquitto, tmp_path: Path) -> None:
    out = io.StringIO()
    mon = Monitor("127.0.0.1", broker.port)
    stop = threading.Event()
    t = threading.Thread(target=run, args=(mon, True, False, 30.0, out, stop))
    t.start()
    with sim_with_publisher(tmp_path / "a.db", settings(broker.port, "live")) as (sim, _pub):
        sim.capture(2)
        wait_for(lambda: '"counted":2' in out.getvalue(), 10, "first update")
        sim.capture(3)
        wait_for(lambda: '"counted":5' in out.getvalue(), 10, "second update")
    wait_for(lambda: '"available":"stopped"' in out.getvalue(), 10, "stopped shown")
    stop.set()
    t.join(5)
    assert not t.is_alive()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert all(line["station"] == "live" for line in lines)


def test_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    from mqtt_support import free_port

    res = CliRunner().invoke(app, ["monitor", "--mqtt-host", "127.0.0.1", "--mqtt-port",
                                   str(free_port()), "--once"])
    assert res.exit_code == 2
    assert "cannot reach MQTT broker 127.0.0.1" in res.output


@pytest.mark.broker
def test_monitor_with_username_password(tmp_path: Path) -> None:
    import subprocess

    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "central", "c3ntral"], check=True,
                   capture_output=True)
    pw.chmod(0o600)
    b = Mosquitto(tmp_path / "broker", f"allow_anonymous false\npassword_file {pw}\n").start()
    try:
        args = ["monitor", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(b.port), "--once",
                "--username", "central"]
        ok = CliRunner().invoke(app, args, env={"EDGE_WBC_MQTT_PASSWORD": "c3ntral"})
        assert ok.exit_code == 0, ok.output
        assert "0 stations, 0 online" in ok.stdout
        bad = CliRunner().invoke(app, args, env={"EDGE_WBC_MQTT_PASSWORD": "nope"})
        assert bad.exit_code == 2
        assert "refused the connection: Not authorized" in bad.output
    finally:
        b.stop()
