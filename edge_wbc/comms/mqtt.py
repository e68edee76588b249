"""MQTT publisher: the station as a well-behaved client of central monitoring's broker.

It takes the validated ``[mqtt]`` section (edge_wbc.config.MqttConfig: topics, secrets, TLS
files and the host-name default are checked there) and owns the connection, outbox draining and
stats; command payloads are parsed in ``commands``, Home Assistant discovery is
``ha_discovery``, and what a command does is ``edge_wbc.station.actions`` (the page's own
actions), reached through the ``command_handler`` the station passes in.

Availability contract (as Frigate's comms/mqtt.py and the paho README): the last will
``offline`` (retained) is set before connecting; on every connect the retained differential is
republished, then ``online``; a clean exit publishes ``stopped``. Subscriptions are (re)made in
``on_connect`` so they survive a broker restart.

Durability: cell/field/slide events are rows of the outbox (``edge_wbc.counting.outbox``) that the
station's store wrote in the same transaction as its counts. This publisher only drains them:
publish at QoS 1, delete the row after the broker's PUBACK for that message id. A broker outage
or a restart therefore loses nothing; a crash between PUBACK and delete re-sends a message,
which consumers de-duplicate by ``event_id`` (or cell id + action).

Threads: paho's network thread runs the callbacks, which only record facts under a lock and
wake the worker; one worker thread owns the SQLite connection, publishes, and runs command
handlers, so a slow handler or disk never stalls keepalives. paho's callbacks are invoked with
its internal message lock held, so nothing here holds our lock across ``client.publish``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import statistics
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_wbc.comms import ha_discovery
from edge_wbc.comms.commands import CommandError, NoCommand, parse_command, request_id_of
from edge_wbc.config import MqttConfig, is_loopback
from edge_wbc.counting import outbox
from edge_wbc.counting.outbox import MQTT_SCHEMA, utc_now_iso

log = logging.getLogger(__name__)

#: How many answered request_ids are remembered to spot a repeated command.
ANSWERED_KEPT = 256

StateProvider = Callable[[], dict[str, Any]]
#: Runs one of the station's actions by name (edge_wbc.station.actions) with its arguments.
CommandHandler = Callable[[str, dict[str, Any]], Any]
HealthProvider = Callable[[], dict[str, Any]]

ONLINE, OFFLINE, STOPPED = "online", "offline", "stopped"
#: Rows published but not yet acknowledged; bounds memory and the re-send burst after a restart.
INFLIGHT_WINDOW = 200
#: Back-off between reconnect attempts (seconds, first and longest).
RECONNECT_S = (1, 60)
# CONNACK reasons that retrying will not fix until someone changes the broker or our secrets.
_AUTH_REASONS = {"Bad user name or password", "Not authorized"}


class MqttError(RuntimeError):
    """Configuration that cannot work (missing TLS file, bad topic...): a clear startup error."""


class _PahoNoise(logging.Filter):
    """paho 2.2 logs 'Client is not connected' and 'failed to receive on socket' at ERROR on
    every reconnect attempt while the broker is away or speaks another protocol (TLS against
    plain); our own callbacks say that once, with the likely cause, so these go to DEBUG."""

    _REPEATED = ("Client is not connected", "failed to receive on socket")

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self._REPEATED):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_PAHO_LOG = logging.getLogger("edge_wbc.comms.mqtt.paho")
_PAHO_LOG.addFilter(_PahoNoise())


def _closed_in_handshake(exc: BaseException | None) -> bool:
    """The peer hung up (or sent something that is not TLS) in the middle of the handshake."""
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, ssl.SSLEOFError,
                        ssl.SSLZeroReturnError)):
        return True
    reason = getattr(exc, "reason", None)
    return isinstance(exc, ssl.SSLError) and reason in (
        "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
        "UNEXPECTED_EOF_WHILE_READING")


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str)


class MqttPublisher:
    """Drains the outbox to the broker and keeps the retained topics true. See module doc."""

    def __init__(
        self,
        cfg: MqttConfig,
        db_path: str | os.PathLike[str],
        state_provider: StateProvider | None = None,
        command_handler: CommandHandler | None = None,
        health_provider: HealthProvider | None = None,
        *,
        reconnect_s: tuple[int, int] = RECONNECT_S,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        # The rest (topic levels, TLS file pairs, secrets, the host name as station id) was
        # checked by edge_wbc.config when the section was loaded.
        if not cfg.host:
            raise MqttError("mqtt.host is not set")
        if not cfg.station_id:
            raise MqttError("mqtt.station_id is empty (edge_wbc.config.load_config fills in "
                            "the host name)")
        self.cfg = cfg
        self._host: str = cfg.host
        self._reconnect_s = reconnect_s
        self._on_change = on_change
        self._last_told: tuple[Any, ...] | None = None
        self.db_path = str(db_path)
        self._state_provider = state_provider
        self._command_handler = command_handler
        self._health_provider = health_provider
        self._started_at = time.monotonic()

        self._cv = threading.Condition()
        self._stopping = False
        self._connected = False
        self._just_connected = False
        self._wake = False
        self._state = "starting"
        self._error: str | None = None
        self._connects = 0
        self._diff: dict[str, Any] | None = None
        self._diff_dirty = False
        self._commands: deque[tuple[str, bytes]] = deque(maxlen=100)
        #: (kind, request_id) -> the answer given, the latest ANSWERED_KEPT (worker thread only).
        self._answered: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._pending: dict[int, int | None] = {}  # mid -> outbox row id (None: not an outbox row)
        self._early: set[int] = set()  # PUBACKs that arrived before publish() returned the mid
        # At most one differential in flight: paho re-sends unacknowledged messages after a
        # reconnect, and a stale retained differential must never land after a fresh one.
        self._diff_mids: set[int] = set()
        self._acked: list[int] = []
        self._inflight_rows: set[int] = set()
        self._last_sent_id = 0
        self._published = 0
        self._fields = 0
        self._latencies: deque[float] = deque(maxlen=200)
        self._outbox_status: outbox.OutboxStatus | None = None
        self._worker: threading.Thread | None = None

        self.client = self._make_client()

    # ---- paho client -------------------------------------------------------------------------
    def _make_client(self) -> paho.Client:
        s = self.cfg
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.effective_client_id,
                             protocol=paho.MQTTv311, clean_session=True)
        # A raising callback would otherwise kill paho's network thread (and keepalives).
        client.suppress_exceptions = True
        client.enable_logger(_PAHO_LOG)
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.use_tls:
            try:
                client.tls_set(ca_certs=s.tls_ca, certfile=s.tls_cert, keyfile=s.tls_key,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise MqttError(f"MQTT TLS settings unusable: {exc}") from exc
        # Before connect: the broker needs the will in CONNECT to announce an unclean death.
        client.will_set(s.topic("available"), OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=self._reconnect_s[0],
                                   max_delay=self._reconnect_s[1])
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self) -> MqttPublisher:
        db = outbox.connect(self.db_path)
        try:
            outbox.ensure_schema(db, max_rows=self.cfg.outbox_max)
            self._outbox_status = outbox.status(db)
        finally:
            db.close()
        self._worker = threading.Thread(target=self._run, name="edge-wbc-mqtt", daemon=True)
        self._worker.start()
        self._set_state("connecting")
        log.info("MQTT: connecting to %s:%d as %s (station %s, prefix %s)", self.cfg.host,
                 self.cfg.port, self.cfg.effective_client_id, self.cfg.station_id,
                 self.cfg.prefix)
        if self.cfg.password and not self.cfg.use_tls and not is_loopback(self._host):
            log.warning("MQTT: the password goes to %s unencrypted; set mqtt.tls_ca (or "
                        "mqtt.tls = true) to use TLS", self.cfg.host)
        # connect_async + loop_start: a broker that is down at boot must not stop the station.
        self.client.connect_async(self._host, self.cfg.port, self.cfg.keepalive)
        self.client.loop_start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish retained ``stopped``, wait (bounded) for outstanding PUBACKs, disconnect."""
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout_s + 5.0)
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
        self._set_state("stopped")

    # ---- listener (contract 3) ---------------------------------------------------------------
    def publish(self, event: Any) -> None:
        """Session listener: ``event.kind`` in differential/cell/field/slide, ``event.payload``.

        Cell/field/slide rows are already in the outbox (the store wrote them with the counts),
        so those only wake the drainer. Never blocks and never raises into the session.
        """
        try:
            kind = getattr(event, "kind", None)
            payload = getattr(event, "payload", None)
            with self._cv:
                if kind == "differential" and isinstance(payload, dict):
                    self._diff = dict(payload)
                    self._diff_dirty = True
                elif kind == "field" and isinstance(payload, dict):
                    self._fields += 1
                    lat = payload.get("latency_ms")
                    if lat is None and isinstance(payload.get("timing_ms"), dict):
                        lat = payload["timing_ms"].get("total")
                    if isinstance(lat, (int, float)):
                        self._latencies.append(float(lat))
                self._wake = True
                self._cv.notify_all()
        except Exception:  # a listener must never break counting
            log.exception("MQTT: could not take event %r", event)

    __call__ = publish

    # ---- status for the station's page -------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._cv:
            ob = self._outbox_status
            return {
                "enabled": True,
                "broker": f"{self.cfg.host}:{self.cfg.port}",
                "station_id": self.cfg.station_id,
                "state": self._state,
                "connected": self._connected,
                "error": self._error,
                "inflight": len(self._inflight_rows),
                "published": self._published,
                "outbox": ob.to_json() if ob else None,
                # Both when both hold: a broker away for long is what fills the outbox.
                "warning": "; ".join(w for w in (self._error, ob.warning if ob else None) if w)
                or None,
            }

    @property
    def connected(self) -> bool:
        return self._connected

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float) -> bool:
        """Block until ``predicate(status())`` holds (tests, shutdown scripts); bounded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.status()):
                return True
            with self._cv:
                self._cv.wait(0.05)
        return predicate(self.status())

    def _set_state(self, state: str, error: str | None = None) -> None:
        with self._cv:
            self._state = state
            self._error = error
            self._cv.notify_all()

    # ---- paho callbacks (network thread: record and wake, nothing slow) ----------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            name = str(reason)
            auth = name in _AUTH_REASONS
            msg = (f"MQTT broker {self.cfg.host}:{self.cfg.port} refused the "
                   f"connection: {name}"
                   + (" (check mqtt.username and the EDGE_WBC_MQTT_PASSWORD / mqtt-password "
                      "credential)" if auth else "")
                   + "; counting continues locally, events wait in the outbox")
            with self._cv:
                repeated = self._error == msg
            if not repeated:
                log.error("%s", msg)
            self._set_state("auth_failed" if auth else "refused", msg)
            return
        if self.cfg.commands_enabled:
            client.subscribe([(self.cfg.topic("capture", "set"), 1),
                              (self.cfg.topic("slide", "set"), 1)])
        with self._cv:
            self._connected = True
            self._just_connected = True
            self._connects += 1
            self._state = "connected"
            self._error = None
            self._cv.notify_all()
        log.info("MQTT: connected to %s:%d", self.cfg.host, self.cfg.port)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError`, so the cause is still in sys.exc_info().
        exc = sys.exc_info()[1]
        port = self.cfg.port
        if self.cfg.use_tls and _closed_in_handshake(exc):
            # A plain MQTT listener reads the TLS hello as a malformed packet and hangs up.
            kind, detail = "tls_mismatch", (
                f"the broker closed the connection during the TLS handshake ({exc}): port "
                f"{port} is probably a plain MQTT listener; use the broker's TLS port (usually "
                "8883) or set mqtt.tls = false without mqtt.tls_ca")
        elif isinstance(exc, ssl.SSLError):
            kind, detail = "tls_error", f"TLS handshake with the broker failed: {exc}"
        else:
            kind, detail = "unreachable", f"cannot reach the broker: {exc or 'connection failed'}"
        self._report_attempt(kind, detail)

    def _report_attempt(self, kind: str, detail: str) -> None:
        """A failed connection attempt: logged when the reason changes, not on every retry."""
        msg = (f"MQTT {self.cfg.host}:{self.cfg.port}: {detail}; retrying with "
               "back-off, counting continues locally")
        with self._cv:
            repeated = self._error == msg
        if repeated:
            log.debug("%s", msg)
        else:
            log.warning("%s", msg)
        self._set_state(kind, msg)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        with self._cv:
            was = self._connected
            self._connected = False
            if self._state in ("connected", "connecting"):
                self._state = "disconnected"
            answered = self._state in ("auth_failed", "refused")
            self._cv.notify_all()
        if self._stopping:
            return
        if was:
            log.warning("MQTT: lost the broker (%s); reconnecting with back-off, events wait "
                        "in the outbox", reason)
        elif not answered:
            # The TCP connection was made, then closed before any CONNACK.
            if self.cfg.use_tls:
                self._report_attempt("disconnected", (
                    f"the broker closed the connection before answering CONNECT ({reason}); "
                    "its log says why (a client certificate it does not accept?)"))
            else:
                self._report_attempt("tls_mismatch", (
                    f"the broker closed the connection before answering CONNECT ({reason}): "
                    f"port {self.cfg.port} is probably a TLS listener; set mqtt.tls = "
                    "true (or mqtt.tls_ca) or use the broker's plain port (usually 1883)"))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self._cv:
            self._diff_mids.discard(mid)
            if mid in self._pending:
                row = self._pending.pop(mid)
                if row is not None:
                    self._acked.append(row)
                self._published += 1
            else:
                self._early.add(mid)
            self._cv.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            # A retained command would fire again on every reconnect: refuse it.
            log.warning("MQTT: ignoring retained command on %s (publish commands without "
                        "retain)", msg.topic)
            return
        kind = {self.cfg.topic("capture", "set"): "capture",
                self.cfg.topic("slide", "set"): "slide"}.get(msg.topic)
        if kind is None:
            return
        with self._cv:
            self._commands.append((kind, bytes(msg.payload)))
            self._cv.notify_all()

    # ---- worker thread ------------------------------------------------------------------------
    def _send(self, topic: str, payload: str | bytes, qos: int, retain: bool,
              row_id: int | None = None, differential: bool = False) -> paho.MQTTMessageInfo | None:
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            log.error("MQTT: cannot publish on %s: %s", topic, exc)
            if row_id is not None:
                with self._cv:
                    self._acked.append(row_id)  # unpublishable forever: do not block the queue
            return None
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            # paho refused it (its mid still in use after a wrap-around): try again later.
            return None
        with self._cv:
            if info.mid in self._early:
                # PUBACK (or, at QoS 0, the write) beat us here: settle it now.
                self._early.discard(info.mid)
                if row_id is not None:
                    self._acked.append(row_id)
                self._published += 1
            elif qos > 0 or info.rc == paho.MQTT_ERR_SUCCESS:
                # A QoS 0 message refused for want of a connection never calls on_publish.
                self._pending[info.mid] = row_id
                if row_id is not None:
                    self._inflight_rows.add(row_id)
                if differential:
                    self._diff_mids.add(info.mid)
        return info

    def _has_work(self) -> bool:
        return (self._stopping or self._wake or self._just_connected or bool(self._acked)
                or bool(self._commands)
                or (self._diff_dirty and self._connected and not self._diff_mids))

    def _run(self) -> None:
        db = outbox.connect(self.db_path)
        next_stats = time.monotonic() + min(5.0, self.cfg.stats_interval_s)
        last_error = ""
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(self._has_work,
                                      timeout=max(0.05, min(1.0, next_stats - time.monotonic())))
                    stopping = self._stopping
                    just_connected, self._just_connected = self._just_connected, False
                    self._wake = False
                    acked, self._acked = self._acked, []
                    commands = list(self._commands)
                    self._commands.clear()
                    connected = self._connected
                try:
                    for kind, raw in commands:
                        self._handle_command(kind, raw)
                    self._ack(db, acked)
                    if stopping:
                        self._shutdown(db)
                        return
                    if just_connected:
                        self._announce()
                        # Fresh health soon after each connect, not a whole interval later.
                        next_stats = min(next_stats, time.monotonic() + 1.0)
                    elif connected and self._diff_dirty:
                        self._publish_differential()
                    if self._connected:
                        self._drain(db)
                    else:
                        # The store keeps queueing (and shedding) while the broker is away;
                        # the page and stats must see that, not the depth at the last drain.
                        self._refresh_outbox_status(db)
                    if time.monotonic() >= next_stats:
                        next_stats = time.monotonic() + self.cfg.stats_interval_s
                        if self._connected:
                            self._publish_stats(db)
                    self._tell_if_changed()
                    last_error = ""
                except Exception as exc:
                    # Disk trouble must not end publishing for good; say it once, not per retry.
                    if repr(exc) != last_error:
                        log.exception("MQTT worker error (retrying every second): %s", exc)
                        last_error = repr(exc)
                    if stopping:
                        return
                    time.sleep(1.0)
        finally:
            db.close()

    def _tell_if_changed(self) -> None:
        """Call ``on_change(status())`` when what the page shows changed (connection state, its
        error, the outbox filling or clearing), at most about once a second, from this thread."""
        if self._on_change is None:
            return
        st = self.status()
        ob = st["outbox"] or {}
        key = (st["state"], st["error"], ob.get("full"), ob.get("over_limit"))
        if key == self._last_told:
            return
        self._last_told = key
        try:
            self._on_change(st)
        except Exception:  # the page's refresh must not stop publishing
            log.exception("MQTT: status listener failed")

    def _refresh_outbox_status(self, db: Any) -> None:
        st = outbox.status(db)
        with self._cv:
            self._outbox_status = st

    def _ack(self, db: Any, rows: list[int]) -> None:
        if not rows:
            return
        try:
            outbox.ack_many(db, rows)
        except Exception:
            # e.g. a full disk: keep them to delete later rather than re-send them at restart.
            with self._cv:
                self._acked.extend(rows)
            raise
        st = outbox.status(db)
        if st.over_limit and not st.full:
            outbox.clear_over_limit(db)
            st = outbox.status(db)
        with self._cv:
            self._inflight_rows.difference_update(rows)
            self._outbox_status = st

    def _drain(self, db: Any) -> None:
        room = INFLIGHT_WINDOW - len(self._inflight_rows)
        if room <= 0:
            return
        rows = outbox.peek(db, room, after_id=self._last_sent_id)
        for row in rows:
            if not self._connected:
                break
            body = {**row.payload, "station": self.cfg.station_id, "event_seq": row.id}
            if self._send(self.cfg.topic(row.topic_suffix), _dumps(body), row.qos,
                          row.retain, row_id=row.id) is None:
                with self._cv:
                    if row.id not in self._acked:  # not an unpublishable row: retry it later
                        break
            self._last_sent_id = row.id
        if rows:
            with self._cv:
                self._outbox_status = outbox.status(db)

    def _current_state(self) -> dict[str, Any] | None:
        if self._state_provider is not None:
            try:
                state = self._state_provider()
                if isinstance(state, dict):
                    with self._cv:
                        self._diff = dict(state)
            except Exception:
                log.exception("MQTT: state provider failed; using the last differential event")
        with self._cv:
            return None if self._diff is None else dict(self._diff)

    def _differential_payload(self, state: dict[str, Any]) -> str:
        raw_slide = state.get("slide")
        slide: dict[str, Any] = raw_slide if isinstance(raw_slide, dict) else {}
        return _dumps({
            **state,
            # The station's own state schema stays readable next to the MQTT envelope's.
            "state_schema": state.get("schema"),
            "schema": MQTT_SCHEMA,
            "station": self.cfg.station_id,
            "slide_id": state.get("slide_id") or slide.get("slide_id"),
            "sample_id": state.get("sample_id") or slide.get("sample_id"),
            "ts": state.get("ts") or state.get("updated_at") or utc_now_iso(),
            "published_at": utc_now_iso(),
        })

    def _publish_differential(self) -> None:
        with self._cv:
            if self._diff_mids:
                return  # still dirty: sent once the one in flight is acknowledged
            state = None if self._diff is None else dict(self._diff)
            self._diff_dirty = False
        if state is not None:
            self._send(self.cfg.topic("differential"), self._differential_payload(state),
                       qos=1, retain=True, differential=True)

    def _announce(self) -> None:
        """After every connect: discovery, retained differential, then ``online``."""
        if self.cfg.ha_discovery:
            # The sensors follow the lab's formula, which the station's state carries.
            for topic, config in ha_discovery.configs(self.cfg, self._current_state()):
                self._send(topic, _dumps(config), qos=1, retain=True)
        with self._cv:
            # A differential left in flight by the last connection is re-sent by paho now;
            # let it land first so the fresh one below is the retained one (bounded wait).
            self._cv.wait_for(lambda: not self._diff_mids or not self._connected, timeout=5.0)
        state = self._current_state()
        with self._cv:
            self._diff_dirty = False
        if state is not None:
            self._send(self.cfg.topic("differential"), self._differential_payload(state),
                       qos=1, retain=True, differential=True)
        self._send(self.cfg.topic("available"), ONLINE, qos=1, retain=True)

    def stats_payload(self, db: Any) -> dict[str, Any]:
        st = outbox.status(db)
        with self._cv:
            self._outbox_status = st
            lats = list(self._latencies)
            fields = self._fields
            connects = self._connects
        try:
            free = shutil.disk_usage(Path(self.db_path).resolve().parent).free
        except OSError:
            free = None
        payload: dict[str, Any] = {
            "schema": MQTT_SCHEMA,
            "station": self.cfg.station_id,
            "ts": utc_now_iso(),
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            # Lets a consumer call a retained 'online' stale when stats stop coming (a broker
            # restart forgets the will of a station that then died unseen).
            "interval_s": self.cfg.stats_interval_s,
            "fields": fields,  # analysed since this process started
            "latency_ms": {
                "last": round(lats[-1], 1) if lats else None,
                "median": round(statistics.median(lats), 1) if lats else None,
                "n": len(lats),
            },
            "accelerator": None,
            "outbox": st.to_json(),
            "disk_free_mb": None if free is None else round(free / 2**20, 1),
            "mqtt_connects": connects,
        }
        with self._cv:
            diff = self._diff
        if diff:
            payload["slide_fields"] = diff.get("fields")
            payload["accelerator"] = diff.get("accelerator") or (
                diff.get("models", {}).get("accelerator")
                if isinstance(diff.get("models"), dict) else None)
        if self._health_provider is not None:
            try:
                payload.update(self._health_provider())
            except Exception:
                log.exception("MQTT: health provider failed")
        return payload

    def _publish_stats(self, db: Any) -> None:
        # Retained so a monitor that starts later sees the last health at once; QoS 0: the
        # next one supersedes it anyway.
        self._send(self.cfg.topic("stats"), _dumps(self.stats_payload(db)), qos=0,
                   retain=True)

    def _handle_command(self, kind: str, raw: bytes) -> None:
        request_id = None
        try:
            cmd = parse_command(kind, raw)
            request_id = cmd.request_id
            seen = self._answered.get((kind, request_id)) if request_id else None
            if seen is not None:
                # QoS 1 delivers at least once, and a client may retry after a lost echo: a
                # request_id already answered is answered again, not run again (a second field).
                log.info("MQTT: %s command %s already answered; not run again", kind,
                         request_id)
                echo = {**seen, "duplicate": True}
            else:
                echo = self._run_command(cmd)
        except NoCommand:
            log.info("MQTT: empty %s payload ignored (a retained command being deleted)", kind)
            return
        except CommandError as exc:
            log.warning("MQTT: ignoring malformed %s command %r: %s", kind, raw[:200], exc)
            echo = {"ok": False, "error": str(exc)}
            request_id = request_id_of(raw)
        body = {"schema": MQTT_SCHEMA, "station": self.cfg.station_id, "ts": utc_now_iso(),
                "command": kind, "request_id": request_id, **echo}
        self._send(self.cfg.topic("state"), _dumps(body), qos=1, retain=False)

    def _run_command(self, cmd: Any) -> dict[str, Any]:
        """The station's answer to ``cmd`` (remembered under its request_id). Raises
        CommandError when there is nothing to run it."""
        if self._command_handler is None:
            raise CommandError("this station has no command handler")
        try:
            result = self._command_handler(cmd.action, cmd.args)
            echo = {"ok": True, "result": result}
            log.info("MQTT command %s %s -> %s", cmd.action, cmd.args, result)
        except Exception as exc:  # the station refused it (finalise, unidentified)
            log.warning("MQTT: %s command failed: %s", cmd.kind, exc)
            echo = {"ok": False, "error": str(exc) or type(exc).__name__}
        if cmd.request_id:
            self._answered[(cmd.kind, cmd.request_id)] = echo
            while len(self._answered) > ANSWERED_KEPT:
                self._answered.popitem(last=False)
        return echo

    def _shutdown(self, db: Any) -> None:
        deadline = time.monotonic() + 5.0
        if self._connected:
            info = self._send(self.cfg.topic("available"), STOPPED, qos=1, retain=True)
            mid = None if info is None else info.mid
            # Bounded: a clean exit should not hang on a broker that has just gone away.
            with self._cv:
                self._cv.wait_for(
                    lambda: not self._connected
                    or (mid not in self._pending
                        and all(row is None for row in self._pending.values())),
                    timeout=max(0.0, deadline - time.monotonic()))
        with self._cv:
            acked, self._acked = self._acked, []
        self._ack(db, acked)


def start_publisher(
    cfg: MqttConfig,
    db_path: str | os.PathLike[str],
    state_provider: StateProvider | None = None,
    command_handler: CommandHandler | None = None,
    health_provider: HealthProvider | None = None,
    on_change: Callable[[dict[str, Any]], None] | None = None,
) -> MqttPublisher | None:
    """The station's one call: None when no broker is configured, else a started publisher.

    Raises MqttError for settings that cannot work (TLS files the TLS library refuses); a
    broker that is down or refuses us is not an error here: the station counts on and the
    publisher's ``status()`` says why nothing is going out.
    """
    if not cfg.host:
        return None
    return MqttPublisher(cfg, db_path, state_provider, command_handler, health_provider,
                         on_change=on_change).start()
