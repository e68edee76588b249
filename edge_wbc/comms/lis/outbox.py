"""The LIS outbox: finalised slides waiting for the laboratory information system's acknowledgement.

A row is written by :func:`hook`, which the station registers with the store so it runs inside
the transaction that finalises the slide (the same contract as the MQTT outbox): a slide is
either finalised *and* queued for the LIS, or neither. The delivery thread deletes the row only
once the LIS acknowledged it (MLLP ``AA``, HTTP 2xx, the file renamed into place), in the same
transaction that logs the delivery in ``lis_delivered``.

A report the LIS refused (``AE``/``AR``, HTTP 4xx) stays, ``held`` with the LIS's reason, and is
not sent again until someone releases it (``edge-wbc lis retry``): the same message would be
refused again. Counting knows nothing of this module; it only runs the store's hooks.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lis_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    slide_id TEXT NOT NULL UNIQUE,
    sample_id TEXT NOT NULL,
    report_file TEXT NOT NULL,      -- report.json, relative to the data directory
    queued_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_try_at TEXT,
    last_error TEXT,
    held INTEGER NOT NULL DEFAULT 0    -- 1: the LIS refused it; kept until released
);
CREATE TABLE IF NOT EXISTS lis_delivered (
    slide_id TEXT PRIMARY KEY,
    sample_id TEXT NOT NULL,
    delivered_at TEXT NOT NULL,
    destination TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Row:
    id: int
    slide_id: str
    sample_id: str
    report_file: str
    attempts: int
    last_error: str | None


def ensure_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)


@contextmanager
def _txn(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on a connection opened by this module (autocommit mode)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def connect(db_path: str, timeout_s: float = 30.0) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, timeout=timeout_s, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    ensure_schema(conn)
    return conn


def connect_read_only(db_path: str, timeout_s: float = 5.0) -> sqlite3.Connection:
    """For looking only (doctor, ``edge-wbc lis status``): creates and changes nothing."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=timeout_s,
                           isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only=ON")
    return conn


def enqueue(conn: sqlite3.Connection, slide_id: str, sample_id: str, report_file: str) -> None:
    """Queue a slide (does not commit). Queuing one already queued or held sends it afresh."""
    conn.execute(
        "INSERT INTO lis_outbox (slide_id, sample_id, report_file, queued_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (slide_id) DO UPDATE SET report_file = excluded.report_file, held = 0,"
        " attempts = 0, last_error = NULL",
        (slide_id, sample_id, report_file, now_iso()),
    )


def hook(conn: sqlite3.Connection, event: Any) -> None:
    """Store transaction hook: queue a slide in the transaction that finalises it."""
    if event.kind != "slide" or event.payload.get("action") not in ("finalised", "finalized"):
        return
    p = event.payload
    slide_id = p.get("slide_id") or (p.get("slide") or {}).get("id")
    if not slide_id:
        return
    enqueue(conn, str(slide_id), str(p.get("sample_id") or ""),
            str((p.get("files") or {}).get("json") or ""))


def due(conn: sqlite3.Connection) -> Row | None:
    """The oldest report not held: delivery keeps the order of finalising."""
    r = conn.execute(
        "SELECT id, slide_id, sample_id, report_file, attempts, last_error FROM lis_outbox"
        " WHERE held = 0 ORDER BY id LIMIT 1").fetchone()
    return Row(*r) if r else None


def delivered(conn: sqlite3.Connection, row: Row, destination: str, detail: str) -> None:
    with _txn(conn):
        conn.execute("DELETE FROM lis_outbox WHERE id = ?", (row.id,))
        conn.execute(
            "INSERT OR REPLACE INTO lis_delivered (slide_id, sample_id, delivered_at, destination,"
            " detail) VALUES (?, ?, ?, ?, ?)",
            (row.slide_id, row.sample_id, now_iso(), destination, detail))


def failed(conn: sqlite3.Connection, row: Row, error: str, *, held: bool) -> None:
    with _txn(conn):
        conn.execute(
            "UPDATE lis_outbox SET attempts = attempts + 1, last_try_at = ?, last_error = ?,"
            " held = ? WHERE id = ?", (now_iso(), error, int(held), row.id))


def release(conn: sqlite3.Connection, slide_id: str | None = None) -> int:
    """Send held (refused) reports again: one slide, or all. Returns how many."""
    with _txn(conn):
        if slide_id is None:
            cur = conn.execute("UPDATE lis_outbox SET held = 0 WHERE held = 1")
        else:
            # Only a held one: a waiting report is sent by itself, and counting it "released"
            # told the technician something had been done.
            cur = conn.execute("UPDATE lis_outbox SET held = 0 WHERE slide_id = ? AND held = 1",
                               (slide_id,))
        return cur.rowcount


def find(conn: sqlite3.Connection, slide_id: str) -> dict[str, Any] | None:
    """Where one slide's report is: ``state`` 'held', 'waiting' or 'delivered' with its
    attempts and last error, or when and where it went; None when it was never queued."""
    r = conn.execute("SELECT held, attempts, last_error, last_try_at FROM lis_outbox"
                     " WHERE slide_id = ?", (slide_id,)).fetchone()
    if r is not None:
        return {"state": "held" if r[0] else "waiting", "attempts": r[1], "error": r[2],
                "at": r[3]}
    r = conn.execute("SELECT delivered_at, destination, detail FROM lis_delivered"
                     " WHERE slide_id = ?", (slide_id,)).fetchone()
    if r is not None:
        return {"state": "delivered", "at": r[0], "destination": r[1], "detail": r[2]}
    return None


def queue_now(conn: sqlite3.Connection, slide_id: str, sample_id: str, report_file: str) -> None:
    """Queue (or re-queue) one slide on demand, committed."""
    with _txn(conn):
        enqueue(conn, slide_id, sample_id, report_file)


def status(conn: sqlite3.Connection) -> dict[str, Any]:
    """Counts and the latest problem and delivery, for the page, the CLI and doctor."""
    has = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE name IN ('lis_outbox', 'lis_delivered')")}
    if len(has) < 2:  # a station that never ran with [lis] on: nothing queued, nothing sent
        return {"waiting": 0, "held": 0, "oldest_waiting_since": None, "problems": [],
                "last_delivered": None}
    waiting, held = conn.execute(
        "SELECT COALESCE(SUM(held = 0), 0), COALESCE(SUM(held = 1), 0) FROM lis_outbox"
    ).fetchone()
    oldest = conn.execute("SELECT MIN(queued_at) FROM lis_outbox WHERE held = 0").fetchone()[0]
    problems = [
        {"slide_id": s, "sample_id": smp, "held": bool(h), "attempts": a, "error": e, "at": t}
        for s, smp, h, a, e, t in conn.execute(
            "SELECT slide_id, sample_id, held, attempts, last_error, last_try_at FROM lis_outbox"
            " WHERE last_error IS NOT NULL ORDER BY held DESC, last_try_at DESC LIMIT 5")
    ]
    last = conn.execute(
        "SELECT slide_id, sample_id, delivered_at, destination, detail FROM lis_delivered"
        " ORDER BY delivered_at DESC LIMIT 1").fetchone()
    return {
        "waiting": int(waiting),
        "held": int(held),
        "oldest_waiting_since": oldest,
        "problems": problems,
        "last_delivered": None if last is None else dict(zip(
            ("slide_id", "sample_id", "at", "destination", "detail"), last, strict=True)),
    }
