"""MQTT through the real slide session and store (contract 3 events, contract 4 outbox)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mqtt_support import (
    Collector,
    Mosquitto,
    StationProc,
    publisher,
    settings,
    synthetic_field,
    wait_for,
)

from edge_wbc.counting import outbox

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
T = "edge-wbc/bench-1"
STATE_KEYS = ("counted", "target", "complete", "counts", "percentages", "ci95", "unidentified")


def _sub(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in STATE_KEYS}


def test_session_events_reach_the_broker_through_the_store_outbox(
        broker: Mosquitto, tmp_path: Path) -> None:
    from edge_wbc.counting.events import Fanout
    from edge_wbc.counting.session import SlideSession
    from edge_wbc.counting.store import Store

    store = Store(tmp_path / "data", mqtt=True)
    fan = Fanout()
    holder: dict[str, SlideSession] = {}
    pub = publisher(settings(broker.port, "bench-1"), store.db_path,
                    state_provider=lambda: holder["session"].state())
    # Subscribed before the session exists: an empty Fanout is falsy (it has __len__), and the
    # session keeps ``publish or no-op``.
    fan.subscribe(pub.publish)
    session = holder["session"] = SlideSession(store, fan, default_target=10,
                                               station_id="bench-1")
    col = Collector(broker.port, "edge-wbc/#", client_id="central", persistent=True)
    col.wait_subscribed()
    pub.start()
    try:
        wait_for(lambda: pub.connected, 10, "connected")
        for seed in range(2):
            session.add_field(*synthetic_field(seed, 3))
        broker.stop()  # the third field is counted while the broker is away
        wait_for(lambda: not pub.connected, 10, "outage noticed")
        session.add_field(*synthetic_field(7, 4))
        assert outbox.depth(store.conn) >= 5  # its 4 cells + field summary wait on disk
        broker.start()
        counted = [c["id"] for c in store.cells(session.slide["id"])]
        assert len(counted) == 10
        wait_for(lambda: {m.json()["cell_id"] for m in col.on(f"{T}/cell")} >= set(counted),
                 20, "every counted cell id at the subscriber")
        target = counted[0]
        session.review(target, "monocyte" if session.cells[target]["label"] != "monocyte"
                       else "neutrophil")
        wait_for(lambda: any(m.json()["action"] == "reclassified" for m in col.on(f"{T}/cell")),
                 10, "reclassified event")
        wait_for(lambda: outbox.depth(store.conn) == 0, 10, "outbox drained")
        wait_for(lambda: (m := col.last(f"{T}/differential")) is not None
                 and _sub(m.json()) == _sub(session.state()), 10,
                 "retained differential == session state")
        diff = col.last(f"{T}/differential").json()  # type: ignore[union-attr]
        assert diff["sample_id"] == session.slide["sample_id"]
        assert diff["slide_id"] == session.slide["id"] and diff["station"] == "bench-1"
        session.finalise()
        wait_for(lambda: any(m.json()["action"] == "finalised" for m in col.on(f"{T}/slide")),
                 10, "final report on the slide topic")
        final = next(m.json() for m in col.on(f"{T}/slide") if m.json()["action"] == "finalised")
        assert final["report"]["counted"] == 10
        fields = [m.json() for m in col.on(f"{T}/field")]
        # At-least-once: a message in flight when the broker died may arrive twice, with the
        # same event_id, which is what consumers de-duplicate on.
        assert len({f["event_id"] for f in fields}) == 3
        assert pub.stats_payload(store.conn)["latency_ms"]["last"] == 55.0
    finally:
        pub.stop()
        col.close()
        store.close()


def _spawn(data: Path, port: int, captures: int) -> subprocess.Popen[str]:
    support = Path(__file__).resolve().parent / "mqtt_support.py"
    proc = subprocess.Popen(
        [sys.executable, str(support), "session", "--db", str(data), "--port", str(port),
         "--station", "bench-1", "--captures", str(captures)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], 30)[0]:
        proc.kill()
        raise AssertionError("station process did not start within 30 s")
    assert json.loads(proc.stdout.readline())["ready"]
    return proc


def test_sigkilled_station_process_goes_offline_and_resumes_with_everything(
        broker: Mosquitto, tmp_path: Path) -> None:
    """kill -9 of a process running the real store/session/publisher while the broker is down:
    its counted cells are in the outbox; the restarted process resumes the slide and sends them.
    """
    data = tmp_path / "data"
    col = Collector(broker.port, "edge-wbc/#", client_id="central", persistent=True)
    col.wait_subscribed()
    proc = _spawn(data, broker.port, captures=3)
    try:
        wait_for(lambda: (m := col.last(f"{T}/available")) is not None
                 and m.payload == b"online", 10, "online")
        t_kill = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        wait_for(lambda: col.last(f"{T}/available").payload == b"offline",  # type: ignore[union-attr]
                 7.5, "'offline' within 1.5 x keepalive (5 s)")
        offline_after = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    # Restart with the broker down: it counts 2 more fields that can only wait in the outbox...
    broker.stop()
    proc = _spawn(data, broker.port, captures=2)
    os.kill(proc.pid, signal.SIGKILL)  # ...and dies again before the broker is back.
    proc.wait(5)
    broker.start()
    proc = _spawn(data, broker.port, captures=0)
    try:
        wait_for(lambda: col.last(f"{T}/available").payload == b"online",  # type: ignore[union-attr]
                 15, "online after restart")
        import sqlite3

        # A plain reader: a second Store would be refused, the station holds the folder's lock.
        conn = sqlite3.connect(str(data / "edge-wbc.sqlite3"), timeout=10)
        (slide,) = conn.execute("SELECT id FROM slides WHERE status='open'").fetchone()
        cells = [r[0] for r in conn.execute("SELECT id FROM cells WHERE slide_id=?", (slide,))]
        assert len(cells) == 10  # 5 fields x 2: the open slide resumed with every cell
        wait_for(lambda: {m.json()["cell_id"] for m in col.on(f"{T}/cell")}
                 >= set(cells), 15, "every counted cell id delivered")
        wait_for(lambda: conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0,
                 10, "outbox drained")
        wait_for(lambda: col.last(f"{T}/differential").json()["counted"] == 10,  # type: ignore[union-attr]
                 10, "retained differential is the resumed state")
        conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert col.last(f"{T}/available").payload == b"stopped"  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
    print(f"offline seen {offline_after:.2f} s after SIGKILL")


# ---- the real `edge-wbc station` command (real analyzer on the fixture models) ----------------
def _counted_ids(st: StationProc) -> set[str]:
    return {c["id"] for c in st.api("/api/cells")[1]["cells"] if c["status"] == "counted"}


def _db_depth(data: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(str(data / "edge-wbc.sqlite3"), timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def test_station_command_sigkill_outage_and_restart_lose_nothing(
        broker: Mosquitto, tmp_path: Path) -> None:
    data = tmp_path / "data"
    t = "edge-wbc/st-9"
    col = Collector(broker.port, f"{t}/#", client_id="central-9", persistent=True)
    col.wait_subscribed()
    st = StationProc(data, broker.port, "st-9")
    try:
        st.wait_url()
        wait_for(lambda: (m := col.last(f"{t}/available")) is not None
                 and m.payload == b"online", 15, "online")
        st.capture(2)
        t_kill = time.monotonic()
        st.kill()
        wait_for(lambda: col.last(f"{t}/available").payload == b"offline",  # type: ignore[union-attr]
                 45, "last will after SIGKILL")
        # The default keepalive is 30 s; a killed process's socket is closed by the kernel, so
        # the broker publishes the will at once rather than after 1.5 x keepalive.
        assert time.monotonic() - t_kill < 45
    finally:
        st.kill()
    broker.stop()
    st = StationProc(data, broker.port, "st-9")  # broker down: counts go on locally
    try:
        st.wait_url()
        state = st.capture(3)
        assert state["counted"] > 0 and _db_depth(data) > 0
        st.kill()  # killed again, events still only on disk
    finally:
        st.kill()
    broker.start()
    st = StationProc(data, broker.port, "st-9")
    try:
        st.wait_url()
        wait_for(lambda: col.last(f"{t}/available").payload == b"online",  # type: ignore[union-attr]
                 20, "online after restart")
        ids = _counted_ids(st)
        assert ids
        wait_for(lambda: {m.json()["cell_id"] for m in col.on(f"{t}/cell")} >= ids, 30,
                 "every counted cell id delivered")
        wait_for(lambda: _db_depth(data) == 0, 20, "outbox drained")
        state = st.api("/api/state")[1]
        wait_for(lambda: (d := col.last(f"{t}/differential")) is not None
                 and d.json()["counted"] == state["counted"]
                 and d.json()["counts"] == state["counts"], 20,
                 "retained differential equals the station's state")
        fields = {m.json()["field_id"] for m in col.on(f"{t}/field")}
        assert len(fields) == state["fields"] == 5
        st.terminate()
        wait_for(lambda: col.last(f"{t}/available").payload == b"stopped",  # type: ignore[union-attr]
                 10, "stopped")
    finally:
        st.kill()
        col.close()


def test_station_command_wrong_password_keeps_counting(tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "station", "right"], check=True,
                   capture_output=True)
    pw.chmod(0o600)
    b = Mosquitto(tmp_path / "broker", f"allow_anonymous false\npassword_file {pw}\n").start()
    cfg = tmp_path / "edge-wbc.toml"
    cfg.write_text('[mqtt]\nusername = "station"\n')
    st = StationProc(tmp_path / "data", b.port, "st-pw", "--config", str(cfg),
                     env={"EDGE_WBC_MQTT_PASSWORD": "wrong"})
    try:
        st.wait_url()
        state = st.capture(2)
        assert state["fields"] == 2 and _db_depth(tmp_path / "data") > 0
        # The technician's page gets the reason through the station's status.
        mqtt = st.api("/api/state")[1]["station"]["mqtt"]
        assert mqtt["state"] == "auth_failed" and not mqtt["connected"]
        assert "Not authorized" in mqtt["warning"] and mqtt["outbox"]["depth"] > 0
        err = st.terminate()
        assert st.p.returncode == 0, err  # a clean stop, even with the broker refusing us
        assert "refused the connection: Not authorized" in err
        assert "counting continues locally" in err
        assert "wrong" not in err  # the secret itself is never logged
    finally:
        st.kill()
        b.stop()
