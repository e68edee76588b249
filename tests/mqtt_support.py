"""Test support for the MQTT tests: a real Mosquitto on loopback, a recording subscriber, and a
small simulated station (its own SQLite rows + outbox in one transaction, events to the
publisher) used where the real station is not the point of the test.

Also runnable as a process (``python tests/mqtt_support.py sim ...``) so a test can SIGKILL a
"station" and restart it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_wbc.comms.mqtt import MqttPublisher
from edge_wbc.config import MqttConfig
from edge_wbc.counting import outbox
from edge_wbc.pipeline.results import CLASSES

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    if not pred():
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Mosquitto:
    """One broker process on 127.0.0.1 only; persistence on, so restarts keep sessions/retained."""

    def __init__(self, workdir: Path, extra_conf: str = "", port: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "mosquitto.log"

    def conf_text(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.dir}/",
            f"log_dest file {self.log}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto' and cannot write self.dir
        if "allow_anonymous" not in self.extra_conf and "password_file" not in self.extra_conf:
            lines.append("allow_anonymous true")
        return "\n".join(lines) + "\n" + self.extra_conf

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        assert MOSQUITTO, "mosquitto is not installed (apt-get install mosquitto)"
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.conf_text())
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited: {err}\n{log}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return True
            return False

        wait_for(listening, timeout_s, f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file on the way out
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Collector:
    """A central-side subscriber that records everything; reconnects on its own."""

    def __init__(self, port: int, topics: str | list[str] = "#", client_id: str = "",
                 persistent: bool = False, tls: dict[str, Any] | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.topics = [topics] if isinstance(topics, str) else topics
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"collector-{os.getpid()}-{id(self)}",
                                  clean_session=not persistent)
        if tls:
            self.client.tls_set(**tls)
        if auth:
            self.client.username_pw_set(*auth)
        self.client.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def wait_subscribed(self, timeout_s: float = 10.0) -> Collector:
        assert self.subscribed.wait(timeout_s), "collector never subscribed"
        return self

    def on(self, topic: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic == topic]

    def last(self, topic: str) -> Received | None:
        got = self.on(topic)
        return got[-1] if got else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- a simulated station: same transaction discipline as the real store ------------------------
@dataclass
class Event:
    """Shape of contract 3 (edge_wbc.counting.events.Event)
    for tests that do not need the station."""

    kind: str
    payload: dict[str, Any] = field(default_factory=dict)


class SimStation:
    """Counts cells into SQLite; each capture writes cells + outbox rows in ONE transaction."""

    def __init__(self, db_path: Path, station: str, target: int = 100,
                 listener: Callable[[Any], None] | None = None, sample_id: str = "S-1") -> None:
        self.db_path = db_path
        self.station = station
        # The publisher's worker calls state() from its own thread, as with the real station.
        self.conn = sqlite3.connect(str(db_path), timeout=30, check_same_thread=False)
        self.lock = threading.RLock()
        outbox.enable_wal(self.conn)
        self.conn.executescript(
            "CREATE TABLE IF NOT EXISTS cells (cell_id TEXT PRIMARY KEY, slide_id TEXT,"
            " label TEXT);"
            "CREATE TABLE IF NOT EXISTS slides (slide_id TEXT PRIMARY KEY, sample_id TEXT,"
            " target INTEGER);")
        outbox.ensure_schema(self.conn)
        self.listener = listener
        row = self.conn.execute("SELECT slide_id, sample_id, target FROM slides").fetchone()
        if row is None:
            self.slide_id, self.sample_id, self.target = f"{station}-slide-1", sample_id, target
            with self.conn:
                self.conn.execute("INSERT INTO slides VALUES (?, ?, ?)",
                                  (self.slide_id, self.sample_id, self.target))
                outbox.enqueue(self.conn, "slide", {"slide_id": self.slide_id,
                                                    "action": "started",
                                                    "sample_id": sample_id, "target": target})
        else:
            self.slide_id, self.sample_id, self.target = row

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(CLASSES, 0)
        with self.lock:
            rows = self.conn.execute("SELECT label, COUNT(*) FROM cells GROUP BY label").fetchall()
        for label, n in rows:
            c[label] = n
        return c

    def state(self) -> dict[str, Any]:
        counts = self.counts()
        counted = sum(counts.values())
        return {
            "slide_id": self.slide_id, "sample_id": self.sample_id, "target": self.target,
            "counted": counted, "complete": counted >= self.target,
            "counts": counts,
            "percentages": {k: round(100.0 * v / counted, 1) if counted else 0.0
                            for k, v in counts.items()},
            "models": {"classifier": "test"},
        }

    def capture(self, n_cells: int = 2) -> list[str]:
        ids = []
        with self.lock, self.conn:
            start = self.conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            for i in range(n_cells):
                cid = f"{self.slide_id}-c{start + i:05d}"
                label = CLASSES[(start + i) % len(CLASSES)]
                self.conn.execute("INSERT INTO cells VALUES (?, ?, ?)",
                                  (cid, self.slide_id, label))
                outbox.enqueue(self.conn, "cell", {"slide_id": self.slide_id, "cell_id": cid,
                                                   "action": "counted", "label": label})
                ids.append(cid)
            outbox.enqueue(self.conn, "field", {"slide_id": self.slide_id,
                                                "cells": n_cells, "latency_ms": 42.0})
        if self.listener:
            for cid in ids:
                self.listener(Event("cell", {"cell_id": cid}))
            self.listener(Event("field", {"cells": n_cells, "latency_ms": 42.0}))
            self.listener(Event("differential", self.state()))
        return ids

    def close(self) -> None:
        self.conn.close()


def settings(port: int, station: str, **kw: Any) -> MqttConfig:
    """The [mqtt] section a test station uses (keepalive 5 s so a dead client shows soon)."""
    base: dict[str, Any] = {"host": "127.0.0.1", "port": port, "station_id": station,
                            "client_id": f"edge-wbc-{station}", "keepalive": 5,
                            "stats_interval_s": 60.0}
    base.update(kw)
    return MqttConfig(**base)


#: Reconnect back-off for tests: a restarted broker is found within 2 s, not 60.
TEST_RECONNECT_S = (1, 2)


def publisher(cfg: MqttConfig, db_path: Any, **kw: Any) -> MqttPublisher:
    kw.setdefault("reconnect_s", TEST_RECONNECT_S)
    return MqttPublisher(cfg, db_path, **kw)


@contextlib.contextmanager
def sim_with_publisher(db_path: Path, s: MqttConfig, **kw: Any
                       ) -> Iterator[tuple[SimStation, MqttPublisher]]:
    holder: dict[str, SimStation] = {}
    pub = publisher(s, db_path, state_provider=lambda: holder["sim"].state(), **kw)
    sim = SimStation(db_path, s.station_id, listener=pub.publish)
    holder["sim"] = sim
    pub.start()
    try:
        yield sim, pub
    finally:
        pub.stop()
        sim.close()


def synthetic_field(seed: int, n_cells: int) -> tuple[Any, Any]:
    """A field the real session accepts: independent noise (no duplicate-field overlap) and
    ``n_cells`` cells labelled round-robin, as if analysed."""
    import numpy as np

    from edge_wbc.pipeline.results import Cell, FieldResult

    rgb = np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    cells = []
    for i in range(n_cells):
        label = CLASSES[(seed + i) % len(CLASSES)]
        x = 10 + 60 * i
        cells.append(Cell(bbox=(x, 20, x + 40, 60), label=label, score=0.9,
                          probs={c: (0.9 if c == label else 0.025) for c in CLASSES},
                          area_px=1200))
    return rgb, FieldResult(path=f"field{seed}.png", width=320, height=240, cells=cells,
                            timing_ms={"total": 55.0})


def _session_main(args: argparse.Namespace) -> None:
    """The real store + slide session + publisher, as the station wires them."""
    from edge_wbc.counting.events import Fanout
    from edge_wbc.counting.session import SlideSession
    from edge_wbc.counting.store import Store

    store = Store(args.db, mqtt=True)
    fan = Fanout()
    holder: dict[str, Any] = {}
    pub = publisher(settings(args.port, args.station), store.db_path,
                    state_provider=lambda: holder["s"].state())
    fan.subscribe(pub.publish)
    session = holder["s"] = SlideSession(store, fan, default_target=100,
                                         station_id=args.station)
    pub.start()
    start = session.n_fields
    for i in range(args.captures):
        session.add_field(*synthetic_field(1000 + start + i, 2))
    print(json.dumps({"ready": True, "counted": session.state()["counted"]}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    stop.wait(600)
    pub.stop()
    store.close()


# ---- the real `edge-wbc station` command as a process (fixture models, bundled fields) ------
ROOT = Path(__file__).resolve().parents[1]
FIXTURE_MODELS = ROOT / "tests" / "fixtures" / "models"
SAMPLES = ROOT / "samples" / "fields"


class StationProc:
    """``edge-wbc station`` in a subprocess, with the real analyzer on the fixture models."""

    def __init__(self, data_dir: Path, mqtt_port: int, station_id: str, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        import re

        self._re = re
        self.http_port = free_port()
        e = {**os.environ, **(env or {})}
        e.pop("EDGE_WBC_CONFIG", None)
        self.p = subprocess.Popen(
            [sys.executable, "-c", "from edge_wbc.cli import app; app()", "station",
             "--models", str(FIXTURE_MODELS), "--source", f"folder:{SAMPLES}",
             "--data-dir", str(data_dir), "--port", str(self.http_port),
             "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port),
             "--station-id", station_id, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e)

    def wait_url(self, timeout_s: float = 60) -> None:
        import select

        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not select.select([self.p.stdout], [], [], 0.5)[0]:
                if self.p.poll() is not None:
                    raise AssertionError("station exited: " + (self.p.stderr.read()
                                                                 if self.p.stderr else ""))
                continue
            line = self.p.stdout.readline()
            if self._re.search(r"open (http://\S+)", line):
                return
            if not line and self.p.poll() is not None:
                raise AssertionError("station exited: " + (self.p.stderr.read()
                                                             if self.p.stderr else ""))
        raise AssertionError("station did not print its URL")

    def api(self, path: str, body: Any = None) -> tuple[int, Any]:
        return http_json(self.http_port, path, body)

    def capture(self, n: int, timeout_s: float = 60) -> dict[str, Any]:
        """n fields through POST /api/capture, waiting for each to be counted."""
        start = self.api("/api/state")[1]["fields"]
        for i in range(n):
            deadline = time.monotonic() + timeout_s
            while True:
                status, body = self.api("/api/capture", {})
                if status == 202:
                    break
                assert status == 429 and time.monotonic() < deadline, (status, body)
                time.sleep(0.1)
            wait_for(lambda i=i: self.api("/api/state")[1]["fields"] >= start + i + 1,
                     timeout_s, f"field {start + i + 1} counted")
        return self.api("/api/state")[1]

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def terminate(self, timeout_s: float = 30) -> str:
        self.p.send_signal(signal.SIGTERM)
        _, err = self.p.communicate(timeout=timeout_s)
        return err


def _bench(n: int) -> None:
    """Outbox enqueue cost and drain throughput through a local Mosquitto (prints a table)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        conn = outbox.connect(str(d / "o.db"))
        outbox.ensure_schema(conn)
        payload = {"slide_id": "s", "action": "counted", "label": "neutrophil",
                   "probs": dict.fromkeys(CLASSES, 0.2), "bbox": [1, 2, 3, 4]}
        t = time.perf_counter()
        for i in range(n):
            with conn:
                outbox.enqueue(conn, "cell", {"cell_id": f"c{i}", **payload})
        enq = time.perf_counter() - t
        broker = Mosquitto(d / "broker").start()
        col = Collector(broker.port, "edge-wbc/+/cell").wait_subscribed()
        pub = publisher(settings(broker.port, "bench"), d / "o.db")
        t = time.perf_counter()
        pub.start()
        wait_for(lambda: outbox.depth(conn) == 0, 300, "drain")
        drain = time.perf_counter() - t
        got = len(col.on("edge-wbc/bench/cell"))
        pub.stop()
        col.close()
        broker.stop()
    print(f"{'metric':<40}{'value':>14}")
    print(f"{'events':<40}{n:>14}")
    print(f"{'enqueue, one transaction each (ms)':<40}{enq / n * 1e3:>14.3f}")
    print(f"{'drain incl. PUBACK + delete (events/s)':<40}{n / drain:>14.0f}")
    print(f"{'received by subscriber':<40}{got:>14}")


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["sim", "session", "bench"])
    ap.add_argument("--db")
    ap.add_argument("--port", type=int)
    ap.add_argument("--station", default="st1")
    ap.add_argument("-n", type=int, default=5000, help="bench: number of events")
    ap.add_argument("--captures", type=int, default=0)
    ap.add_argument("--publish", action="store_true", help="connect a publisher")
    args = ap.parse_args()
    if args.mode == "bench":
        _bench(args.n)
        return
    if args.db is None or args.port is None:
        ap.error("--db and --port are required for sim/session")
    if args.mode == "session":
        _session_main(args)
        return
    s = settings(args.port, args.station)
    holder: dict[str, SimStation] = {}
    pub = publisher(s, args.db, state_provider=lambda: holder["sim"].state()) \
        if args.publish else None
    sim = SimStation(Path(args.db), args.station, listener=pub.publish if pub else None)
    holder["sim"] = sim
    if pub:
        pub.start()
    for _ in range(args.captures):
        sim.capture(2)
    print(json.dumps({"ready": True, "counted": sim.state()["counted"]}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    stop.wait(600)
    if pub:
        pub.stop()


if __name__ == "__main__":
    _main()


def http_json(port: int, path: str, body: Any = None) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON) on the station's API; (status, decoded JSON or None)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None
