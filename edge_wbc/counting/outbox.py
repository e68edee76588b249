"""Durable outbox: MQTT events written to the station's SQLite before they are published.

Everything here is a plain function over a ``sqlite3.Connection`` passed in, so the station's
store can enqueue in the SAME transaction as the cell/field/slide rows it writes: either the
count and its event are both on disk, or neither is. The MQTT publisher opens its own connection
to the same file (WAL) and deletes a row only after the broker's PUBACK for it.

Bounding policy (``max_rows``, config ``mqtt.outbox_max``): the outbox is a transport queue,
the store keeps every cell/field/slide for good, so what may be shed is what central monitoring
can do without. When an enqueue finds the outbox full, one row is evicted, in this order:

1. the oldest **field** summary (derived data: the cell events and the retained differential
   carry the counts);
2. the oldest **cell** event of a slide whose ``finalised`` slide event (the final report, with
   every count) is itself still queued, so central still learns that slide's result;
3. otherwise nothing is evicted: cell and slide events of open slides are never dropped and the
   row is stored above the limit; a new field summary is refused instead.

Whenever the outbox is at or above its limit, ``status()`` reports ``full`` (and ``over_limit``
once step 3 happened), the publisher puts it in its stats/state and the station shows it.
Eviction counters persist in the database so the warning survives restarts.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

#: Schema of every JSON payload published by edge-wbc; bump when a payload changes shape.
#: 2: the differential carries the lab's formula (rows with kind and group) and raised flags;
#: cell events carry the group and the formula row a cell counts in.
MQTT_SCHEMA = "edge-wbc/mqtt/2"
DEFAULT_MAX_ROWS = 100_000
_FINALISED = ("finalised", "finalized")

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: never reused: 'event_seq' stays unique
    topic_suffix TEXT NOT NULL,
    payload TEXT NOT NULL,
    qos INTEGER NOT NULL DEFAULT 1,
    retain INTEGER NOT NULL DEFAULT 0,
    slide_id TEXT,
    action TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(topic_suffix, id);
CREATE INDEX IF NOT EXISTS outbox_slide ON outbox(slide_id, topic_suffix);
CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO outbox_meta(key, value) VALUES
    ('depth', 0), ('max_rows', {max_rows}), ('dropped_field', 0), ('dropped_cell', 0),
    ('refused_field', 0), ('over_limit', 0);
-- Depth kept by triggers so every connection sees it without COUNT(*) over a long queue.
CREATE TRIGGER IF NOT EXISTS outbox_ins AFTER INSERT ON outbox BEGIN
    UPDATE outbox_meta SET value = value + 1 WHERE key = 'depth';
END;
CREATE TRIGGER IF NOT EXISTS outbox_del AFTER DELETE ON outbox BEGIN
    UPDATE outbox_meta SET value = value - 1 WHERE key = 'depth';
END;
"""


class OutboxError(ValueError):
    """A payload or topic that cannot be queued (the caller's bug, reported with the reason)."""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic_suffix: str
    payload: dict[str, Any]
    qos: int
    retain: bool
    created_at: float


@dataclass(frozen=True)
class OutboxStatus:
    depth: int
    max_rows: int
    dropped_field: int
    dropped_cell: int
    refused_field: int
    over_limit: bool

    @property
    def full(self) -> bool:
        return self.depth >= self.max_rows

    @property
    def warning(self) -> str | None:
        """One line for the station's display while the outbox is full, else None."""
        if not self.full and not self.over_limit:
            return None
        text = (f"MQTT outbox full: {self.depth}/{self.max_rows} events waiting for the broker; "
                "oldest field summaries are being dropped")
        if self.over_limit:
            text += "; cell/slide events kept above the limit"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "max": self.max_rows,
            "full": self.full,
            "dropped_field": self.dropped_field,
            "dropped_cell": self.dropped_cell,
            "refused_field": self.refused_field,
            "over_limit": self.over_limit,
            "warning": self.warning,
        }


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def enable_wal(conn: sqlite3.Connection) -> None:
    """WAL lets the publisher read/delete while the store writes, without 'database is locked'."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")


def ensure_schema(conn: sqlite3.Connection, max_rows: int | None = None) -> None:
    """Create the outbox tables (idempotent); ``max_rows`` (if given) updates the stored limit."""
    if max_rows is not None and max_rows < 1:
        raise OutboxError(f"outbox max_rows must be >= 1, got {max_rows}")
    conn.executescript(_SCHEMA_SQL.format(max_rows=int(max_rows or DEFAULT_MAX_ROWS)))
    if max_rows is not None:
        with conn:
            conn.execute("UPDATE outbox_meta SET value = ? WHERE key = 'max_rows'",
                         (int(max_rows),))


def _meta(conn: sqlite3.Connection) -> dict[str, int]:
    return {k: int(v) for k, v in conn.execute("SELECT key, value FROM outbox_meta")}


def _bump(conn: sqlite3.Connection, key: str, by: int = 1) -> None:
    conn.execute("UPDATE outbox_meta SET value = value + ? WHERE key = ?", (by, key))


def _validate_suffix(topic_suffix: str) -> None:
    if not isinstance(topic_suffix, str) or not topic_suffix:
        raise OutboxError("outbox topic_suffix must be a non-empty string")
    if any(c in topic_suffix for c in "+#\0") or topic_suffix.startswith("/") \
            or topic_suffix.endswith("/"):
        raise OutboxError(f"outbox topic_suffix {topic_suffix!r} is not a plain topic level")


def enqueue(
    conn: sqlite3.Connection,
    topic_suffix: str,
    payload: dict[str, Any],
    qos: int = 1,
    retain: bool = False,
) -> int | None:
    """Queue one event; returns its row id, or None when the bounding policy refused it.

    Does not commit: the caller's transaction (``with conn:``) covers this row together with
    the store's own rows. Adds ``schema``, ``ts`` (event time, ISO 8601 UTC) and ``event_id``
    (globally unique, stable across retransmissions) to the payload when absent.
    """
    _validate_suffix(topic_suffix)
    if qos not in (0, 1, 2):
        raise OutboxError(f"qos must be 0, 1 or 2, got {qos!r}")
    if not isinstance(payload, dict):
        raise OutboxError(f"outbox payload must be a dict, got {type(payload).__name__}")
    body = {"schema": MQTT_SCHEMA, "ts": utc_now_iso(), "event_id": uuid.uuid4().hex, **payload}
    try:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise OutboxError(f"outbox payload for {topic_suffix!r} is not JSON: {exc}") from exc
    slide_id = body.get("slide_id")
    action = body.get("action")

    meta = _meta(conn)
    if meta["depth"] >= meta["max_rows"] and not _make_room(conn, topic_suffix, meta):
        return None
    cur = conn.execute(
        "INSERT INTO outbox(topic_suffix, payload, qos, retain, slide_id, action, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (topic_suffix, text, qos, int(bool(retain)),
         None if slide_id is None else str(slide_id),
         None if action is None else str(action), time.time()),
    )
    return int(cur.lastrowid)  # type: ignore[arg-type]


def _make_room(conn: sqlite3.Connection, topic_suffix: str, meta: dict[str, int]) -> bool:
    """Apply the bounding policy for one new row; False means 'refuse the new row'."""
    row = conn.execute(
        "SELECT id FROM outbox WHERE topic_suffix = 'field' ORDER BY id LIMIT 1").fetchone()
    if row is not None:
        conn.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
        _bump(conn, "dropped_field")
        _warn_shed(meta, "dropped the oldest queued field summary")
        return True
    row = conn.execute(
        "SELECT c.id FROM outbox c WHERE c.topic_suffix = 'cell' AND c.slide_id IS NOT NULL"
        " AND EXISTS (SELECT 1 FROM outbox s WHERE s.topic_suffix = 'slide'"
        "   AND s.slide_id = c.slide_id AND s.action IN (?, ?))"
        " ORDER BY c.id LIMIT 1", _FINALISED).fetchone()
    if row is not None:
        conn.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
        _bump(conn, "dropped_cell")
        _warn_shed(meta, "dropped a cell event superseded by its queued final slide report")
        return True
    if topic_suffix == "field":
        _bump(conn, "refused_field")
        _warn_shed(meta, "refused a new field summary")
        return False
    if not meta["over_limit"]:
        conn.execute("UPDATE outbox_meta SET value = 1 WHERE key = 'over_limit'")
        log.warning("MQTT outbox over its limit of %d rows: keeping cell/slide events anyway "
                    "(they are never dropped); is the broker reachable?", meta["max_rows"])
    return True


def _warn_shed(meta: dict[str, int], what: str) -> None:
    shed = meta["dropped_field"] + meta["dropped_cell"] + meta["refused_field"]
    # Once at the first shed row, then every 1000, so a long outage cannot flood the journal.
    if shed % 1000 == 0:
        log.warning("MQTT outbox full (%d rows): %s (%d shed so far)",
                    meta["max_rows"], what, shed + 1)


def peek(conn: sqlite3.Connection, limit: int, after_id: int = 0) -> list[OutboxRow]:
    """The oldest ``limit`` rows with id > ``after_id`` (publish order = enqueue order)."""
    rows = conn.execute(
        "SELECT id, topic_suffix, payload, qos, retain, created_at FROM outbox"
        " WHERE id > ? ORDER BY id LIMIT ?", (int(after_id), int(limit))).fetchall()
    out = []
    for rid, suffix, text, qos, retain, created in rows:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            # Only possible if the file was edited or damaged; keep going, drop the bad row.
            log.error("outbox row %d is not valid JSON; deleting it", rid)
            ack(conn, rid)
            continue
        out.append(OutboxRow(rid, suffix, payload, int(qos), bool(retain), float(created)))
    return out


def ack(conn: sqlite3.Connection, row_id: int) -> None:
    """Delete one delivered row (commits: called by the publisher on its own connection)."""
    ack_many(conn, [row_id])


def ack_many(conn: sqlite3.Connection, row_ids: list[int]) -> None:
    if not row_ids:
        return
    with conn:
        conn.executemany("DELETE FROM outbox WHERE id = ?", [(int(r),) for r in row_ids])


def depth(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM outbox_meta WHERE key = 'depth'").fetchone()
    return int(row[0]) if row else 0


def status(conn: sqlite3.Connection) -> OutboxStatus:
    meta = _meta(conn)
    return OutboxStatus(
        depth=meta.get("depth", 0),
        max_rows=meta.get("max_rows", DEFAULT_MAX_ROWS),
        dropped_field=meta.get("dropped_field", 0),
        dropped_cell=meta.get("dropped_cell", 0),
        refused_field=meta.get("refused_field", 0),
        over_limit=bool(meta.get("over_limit", 0)),
    )


def clear_over_limit(conn: sqlite3.Connection) -> None:
    """Called by the publisher once the queue drained below the limit again."""
    with conn:
        conn.execute("UPDATE outbox_meta SET value = 0 WHERE key = 'over_limit'")


def connect(db_path: str, timeout_s: float = 30.0) -> sqlite3.Connection:
    """A connection suitable for draining (WAL, generous busy timeout, autocommit off)."""
    conn = sqlite3.connect(db_path, timeout=timeout_s, check_same_thread=False)
    enable_wal(conn)
    return conn
