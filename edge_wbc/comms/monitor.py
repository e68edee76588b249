"""Central side: ``edge-wbc monitor`` subscribes to ``<prefix>/+/#`` and shows every station.

Stations are known from what the broker retains (``available``, ``differential``, ``stats``),
so a monitor started at any time shows the current picture at once, then follows live updates.
Each station's differential carries its lab's formula (rows and their kinds) and raised flags;
a station of schema ``edge-wbc/mqtt/1`` (five classes, no formula) is shown as five-part.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as paho
import typer
from paho.mqtt.enums import CallbackAPIVersion

from edge_wbc.counting.outbox import MQTT_SCHEMA
from edge_wbc.counting.session import STATE_SCHEMA
from edge_wbc.inputs import visible
from edge_wbc.pipeline.results import CLASSES, UNIDENTIFIED
from edge_wbc.taxonomy import COUNT_ONLY, COUNTED, PER_100_WBC, SHORT

log = logging.getLogger(__name__)

#: Column suffix per row kind: a share of the leukocytes, per 100 of them, or a plain count.
_UNIT = {COUNTED: "%", PER_100_WBC: "/100", COUNT_ONLY: "#"}
#: Differential schemas this monitor reads (none given: an early station, read as /1). A
#: differential event carries the session's state schema, the retained snapshot the envelope's.
KNOWN_SCHEMAS = ("edge-wbc/mqtt/1", MQTT_SCHEMA, "edge-wbc/state/1", STATE_SCHEMA)
#: Larger counts are not a slide's (and would not fit the table).
_MAX_COUNT = 10**9


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_COUNT


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and 0 <= v < _MAX_COUNT)


def _has_rows(d: dict[str, Any]) -> bool:
    rows = d.get("classes")
    return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and "kind" in r
                                                         for r in rows)


def differential_problem(d: dict[str, Any]) -> str | None:
    """What in a station's differential this monitor cannot show, naming the key (None: it can
    all be shown). Any publisher on the broker can write a station's topic, and one retained bad
    message would otherwise stop the monitor for every station at each start."""
    schema = d.get("schema")
    if schema is not None and schema not in KNOWN_SCHEMAS:
        return (f"schema {str(schema)[:40]!r} is not one this monitor reads "
                f"({', '.join(KNOWN_SCHEMAS)}): update edge-wbc here")
    for key in ("counted", "target"):
        if d.get(key) is not None and not _is_count(d[key]):
            return f"{key} is not a count"
    if _has_rows(d):
        for i, r in enumerate(d["classes"]):
            if r["kind"] not in _UNIT:
                return f"classes[{i}].kind is not one of {', '.join(_UNIT)}"
            if not isinstance(r.get("label"), str):
                return f"classes[{i}].label is not text"
            if r.get("count") is not None and not _is_count(r["count"]):
                return f"classes[{i}].count is not a count"
            if r.get("percent") is not None and not _is_number(r["percent"]):
                return f"classes[{i}].percent is not a number"
    for key, ok in (("counts", _is_count), ("percentages", _is_number)):
        raw = d.get(key)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            return f"{key} is not an object"
        for k, v in raw.items():
            # counts may nest per-group detail (skipped when shown)
            if v is not None and not (key == "counts" and isinstance(v, dict)) and not ok(v):
                return f"{key}.{str(k)[:40]} is not a {'count' if ok is _is_count else 'number'}"
    unid = d.get(UNIDENTIFIED)
    if unid is not None and not isinstance(unid, dict) and not _is_count(unid):
        return f"{UNIDENTIFIED} is not a count"
    flags = d.get("flags")
    if flags is not None and not (isinstance(flags, list)
                                  and all(isinstance(f, dict) for f in flags)):
        return "flags is not a list of objects"
    return None


@dataclass
class StationView:
    station: str
    available: str = "?"
    differential: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0
    cell_events: int = 0
    #: Why the station's last differential is not shown (differential_problem), else None.
    problem: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        """The formula's rows but unidentified: label, kind, count, percent (per 100 counted
        leukocytes). A station without a formula in its differential: the five classes."""
        if _has_rows(self.differential):
            return [{"label": str(r.get("label")), "kind": r["kind"],
                     "count": int(r.get("count") or 0), "percent": float(r.get("percent") or 0)}
                    for r in self.differential["classes"] if r.get("label") != UNIDENTIFIED]
        counts, pct = self.counts(), self.percentages()
        return [{"label": c, "kind": COUNTED, "count": counts[c], "percent": pct[c]}
                for c in CLASSES]

    def flags(self) -> list[str]:
        raw = self.differential.get("flags")
        if not isinstance(raw, list):
            return []
        return [str(f.get("text") or f.get("rule")) for f in raw if isinstance(f, dict)]

    def formula(self) -> str | None:
        f = self.differential.get("formula")
        return str(f.get("name")) if isinstance(f, dict) and f.get("name") else None

    def counts(self) -> dict[str, int]:
        raw = self.differential.get("counts") or {}
        if _has_rows(self.differential):
            return {str(k): int(v or 0) for k, v in raw.items() if not isinstance(v, dict)}
        out = {c: int(raw.get(c, 0) or 0) for c in CLASSES}
        unid = raw.get(UNIDENTIFIED, self.differential.get(UNIDENTIFIED, 0))
        out[UNIDENTIFIED] = int(unid or 0) if not isinstance(unid, dict) else 0
        return out

    def percentages(self) -> dict[str, float]:
        if _has_rows(self.differential):
            return {r["label"]: r["percent"] for r in self.rows()}
        pct = self.differential.get("percentages")
        if isinstance(pct, dict) and pct:
            return {c: float(pct.get(c, 0.0) or 0.0) for c in CLASSES}
        counts = self.counts()
        total = sum(counts[c] for c in CLASSES)
        return {c: (100.0 * counts[c] / total if total else 0.0) for c in CLASSES}

    def status(self, now: float | None = None) -> str:
        """``available``, except 'stale' for an 'online' whose periodic stats stopped: after a
        broker restart a station that died meanwhile has no will left to say 'offline'."""
        if self.available != "online":
            return self.available
        interval = self.stats.get("interval_s")
        ts = _epoch(self.stats.get("ts"))
        if isinstance(interval, (int, float)) and ts is not None:
            now = time.time() if now is None else now
            if now - ts > 3 * float(interval) + 10.0:
                return "stale"
        return self.available

    def field(self, key: str) -> Any:
        """slide_id / sample_id: top level (MQTT envelope) or inside the station's 'slide'."""
        if self.differential.get(key) is not None:
            return self.differential[key]
        slide = self.differential.get("slide")
        return slide.get(key) if isinstance(slide, dict) else None

    def to_json(self) -> dict[str, Any]:
        d = self.differential
        ob = self.stats.get("outbox") if isinstance(self.stats.get("outbox"), dict) else {}
        return {
            "station": self.station,
            "available": self.available,
            "status": self.status(),
            "slide_id": self.field("slide_id"),
            "sample_id": self.field("sample_id"),
            "counted": d.get("counted"),
            "target": d.get("target"),
            "complete": d.get("complete"),
            "counts": self.counts() if d else {},
            "percentages": {k: round(v, 1) for k, v in self.percentages().items()} if d else {},
            "formula": self.formula(),
            "rows": self.rows() if d else [],
            "flags": self.flags(),
            "differential_ts": d.get("ts"),
            "outbox_depth": ob.get("depth") if ob else None,
            "seen": self.last_seen,
            "problem": self.problem,
        }


def _cell(row: dict[str, Any]) -> str:
    return str(row["count"]) if row["kind"] == COUNT_ONLY else f"{row['percent']:.1f}"


def _epoch(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class StationTable:
    """Folds MQTT messages into one view per station (pure: unit-testable without a broker)."""

    def __init__(self, prefix: str = "edge-wbc") -> None:
        self.prefix = prefix
        self.stations: dict[str, StationView] = {}

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> str | None:
        """Returns the station id whose view changed, or None (foreign or malformed message)."""
        levels = topic.split("/")
        if len(levels) < 3 or levels[0] != self.prefix:
            return None
        station, kind = levels[1], "/".join(levels[2:])
        if kind not in ("available", "differential", "stats", "cell"):
            return None
        view = self.stations.get(station)
        if kind == "available":
            text = payload.decode("utf-8", "replace").strip()
            if not text:  # retained message cleared
                return None
            view = view or self.stations.setdefault(station, StationView(station))
            view.available = text
        else:
            try:
                data = json.loads(payload)
            # ValueError: also an integer of more digits than Python converts;
            # RecursionError: arrays nested thousands deep
            except (ValueError, UnicodeDecodeError, RecursionError):
                log.warning("monitor: ignoring non-JSON %s from %s", kind, visible(station))
                return None
            if not isinstance(data, dict):
                log.warning("monitor: ignoring %s from %s: not a JSON object", kind,
                            visible(station))
                return None
            view = view or self.stations.setdefault(station, StationView(station))
            if kind == "differential":
                view.problem = differential_problem(data)
                if view.problem is not None:
                    log.warning("monitor: %s's differential is not shown: %s",
                                visible(station), view.problem)
                    data = {}
                view.differential = data
            elif kind == "stats":
                view.stats = data
            else:
                view.cell_events += 1
        view.last_seen = time.time() if now is None else now
        return station

    def render(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        # One column per row when every station counts by the same formula (five-part: NEU% ...
        # MON%, as always); stations with different formulas share one FORMULA column.
        layouts = {tuple((r["label"], r["kind"]) for r in v.rows())
                   for v in self.stations.values() if v.differential}
        shared = next(iter(layouts)) if len(layouts) == 1 else None
        if shared is None and not layouts:
            shared = tuple((c, COUNTED) for c in CLASSES)
        cols_head = ([SHORT.get(k, k.upper()) + _UNIT[kind] for k, kind in shared]
                     if shared is not None else ["FORMULA"])
        head = ["STATION", "STATUS", "SAMPLE", "COUNTED", *cols_head, "UNID", "OUTBOX", "SEEN",
                "FLAGS"]
        rows = [head]
        for sid in sorted(self.stations):
            v = self.stations[sid]
            d = v.differential
            if d:
                counted = f"{d.get('counted', '?')}/{d.get('target', '?')}"
                if d.get("complete"):
                    counted += " done"
                cells = [_cell(r) for r in v.rows()]
                cols = cells if shared is not None else [
                    " ".join(f"{SHORT.get(r['label'], r['label'])} {c}"
                             for r, c in zip(v.rows(), cells, strict=True))]
                unid = str(v.counts().get(UNIDENTIFIED, 0))
            else:
                counted, cols, unid = "-", ["-"] * len(cols_head), "-"
            ob = v.stats.get("outbox") if isinstance(v.stats.get("outbox"), dict) else None
            age = now - v.last_seen
            raised = d.get("flags")
            flags = ",".join(str(f.get("rule", "?")).replace(" ", "") for f in raised
                             if isinstance(f, dict)) if isinstance(raised, list) else ""
            flags = flags or "-"
            if v.problem is not None:
                counted, flags = "?", "differential not shown (below)"
            rows.append([visible(x) for x in (
                sid, v.status(now), str(v.field("sample_id") or "-"), counted, *cols, unid,
                str(ob.get("depth")) if ob else "-",
                f"{age:.0f}s ago" if age < 3600 else f"{age / 3600:.1f}h ago", flags)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        n_on = sum(1 for v in self.stations.values() if v.status(now) == "online")
        lines += [visible(f"{sid}: differential not shown: {v.problem}")
                  for sid, v in sorted(self.stations.items()) if v.problem is not None]
        lines.append(f"{len(self.stations)} stations, {n_on} online")
        return "\n".join(lines)


class Monitor:
    """A paho subscriber feeding a StationTable; ``on_change(station_id)`` after each update."""

    def __init__(self, host: str, port: int = 1883, prefix: str = "edge-wbc",
                 username: str | None = None, password: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls: bool = False,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.table = StationTable(prefix)
        self.lock = threading.Lock()
        self.on_change = on_change
        self.subscribed = threading.Event()
        self.error: str | None = None
        self.last_message = time.monotonic()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"edge-wbc-monitor-{os.getpid()}-{id(self) % 10000}")
        self.client.suppress_exceptions = True
        if username:
            self.client.username_pw_set(username, password)
        if tls or tls_ca or tls_cert:
            self.client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key,
                                cert_reqs=ssl.CERT_REQUIRED)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self.error = f"broker {self.host}:{self.port} refused the connection: {reason}"
            self.subscribed.set()  # wake a waiting --once with the error
            return
        self.error = None
        client.subscribe(f"{self.prefix}/+/#", qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            changed = self.table.handle(msg.topic, bytes(msg.payload))
            self.last_message = time.monotonic()
        if changed and self.on_change:
            self.on_change(changed)

    def start(self, timeout_s: float = 10.0) -> Monitor:
        # A blocking first connect: the user typed a host and wants to hear at once if it is wrong.
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionError(
                f"cannot reach MQTT broker {self.host}:{self.port}: {exc}") from exc
        self.client.loop_start()
        if not self.subscribed.wait(timeout_s):
            self.stop()
            raise ConnectionError(f"no answer from MQTT broker {self.host}:{self.port} "
                                  f"within {timeout_s:.0f} s")
        if self.error:
            self.stop()
            raise ConnectionError(self.error)
        return self

    def settle(self, quiet_s: float = 0.5, max_s: float = 5.0) -> None:
        """Wait for the burst of retained messages after subscribing (bounded)."""
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            with self.lock:
                idle = time.monotonic() - self.last_message
            if idle >= quiet_s:
                return
            time.sleep(0.05)

    def snapshot(self) -> list[StationView]:
        with self.lock:
            return [self.table.stations[k] for k in sorted(self.table.stations)]

    def render(self) -> str:
        with self.lock:
            return self.table.render()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(monitor: Monitor, as_json: bool, once: bool, duration_s: float | None,
        out: TextIO | None = None, stop: threading.Event | None = None) -> None:
    """Print the picture, then updates until ``duration_s`` passed or ``stop`` is set."""
    out = sys.stdout if out is None else out  # looked up late: tests and pipes swap it
    changed: set[str] = set()
    cv = threading.Condition()

    def note(station: str) -> None:
        with cv:
            changed.add(station)
            cv.notify()

    monitor.on_change = note
    monitor.start()
    monitor.settle()
    tty = out.isatty() and not as_json
    try:
        if once:
            _emit(monitor, as_json, None, out, tty=False)
            return
        _emit(monitor, as_json, None, out, tty)
        end = None if duration_s is None else time.monotonic() + duration_s
        while (end is None or time.monotonic() < end) and not (stop and stop.is_set()):
            with cv:
                cv.wait(timeout=0.5 if end is None else max(0.0, min(0.5, end - time.monotonic())))
                todo = set(changed)
                changed.clear()
            if todo:
                _emit(monitor, as_json, todo, out, tty)
            # Rate-limit redraws so a burst of 20 stations' cells does not flicker the terminal.
            time.sleep(0.2)
    finally:
        monitor.stop()


def _emit(monitor: Monitor, as_json: bool, stations: set[str] | None, out: TextIO,
          tty: bool) -> None:
    if as_json:
        for view in monitor.snapshot():
            if stations is None or view.station in stations:
                out.write(json.dumps(view.to_json(), separators=(",", ":")) + "\n")
    else:
        if tty:
            out.write("\x1b[H\x1b[2J")
        out.write(monitor.render() + "\n\n")
    out.flush()


def register(app: typer.Typer) -> None:
    @app.command("monitor")
    def monitor_cmd(
        mqtt_host: str = typer.Option(..., "--mqtt-host", help="Broker host."),
        mqtt_port: int = typer.Option(1883, "--mqtt-port", help="Broker port."),
        prefix: str = typer.Option("edge-wbc", "--prefix", help="Topic prefix of the stations."),
        as_json: bool = typer.Option(False, "--json", help="JSON lines, one per station update."),
        once: bool = typer.Option(False, "--once",
                                  help="Print the current picture (retained state) and exit."),
        duration: float | None = typer.Option(None, "--duration", min=0.1,
                                              help="Stop after this many seconds."),
        username: str | None = typer.Option(None, "--username",
                                            help="Broker user; the password comes from "
                                                 "EDGE_WBC_MQTT_PASSWORD."),
        tls_ca: Path | None = typer.Option(None, "--tls-ca", exists=True, dir_okay=False,
                                           help="CA certificate of the broker (enables TLS)."),
        tls_cert: Path | None = typer.Option(None, "--tls-cert", exists=True, dir_okay=False),
        tls_key: Path | None = typer.Option(None, "--tls-key", exists=True, dir_okay=False),
    ) -> None:
        """Central monitoring: live table of every station's running differential."""
        from edge_wbc.config import read_secret

        try:
            password = read_secret("mqtt.password") if username else None
        except (OSError, UnicodeDecodeError) as exc:
            typer.echo(f"error: cannot read the mqtt-password credential: {exc}", err=True)
            raise typer.Exit(2) from exc
        mon = Monitor(mqtt_host, mqtt_port, prefix, username=username, password=password,
                      tls_ca=str(tls_ca) if tls_ca else None,
                      tls_cert=str(tls_cert) if tls_cert else None,
                      tls_key=str(tls_key) if tls_key else None)
        try:
            run(mon, as_json, once, duration)
        except ConnectionError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        except KeyboardInterrupt:
            pass
