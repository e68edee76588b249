"""Durable record of slides, fields, cells and events: SQLite (WAL) plus images on disk.

Layout under the data directory::

    edge-wbc.sqlite3               slides, fields, cells, events (+ the MQTT outbox)
    slides/<slide>/fields/<field>.jpg   the analysed field as captured
    slides/<slide>/crops/<cell>.jpg     the cell as the technician reviews it
    slides/<slide>/report/              report.json, report.csv, report.html on finalise

Every change is one transaction with its events (and, with MQTT on, its outbox rows — contract 4
of docs/architecture.md: the publisher can never miss an event that was counted, nor publish one
that was not). Images are written before the transaction and removed again if it fails, so a
field is either fully counted or not at all. ``synchronous=FULL`` makes a committed field survive
a power cut, not only a crash.

A full disk is reported as :class:`DiskFullError` with a message for the technician; the
transaction is rolled back so the counts on screen and in the database stay the same.

One process per data directory: :class:`Store` holds an OS lock (``flock`` on ``edge-wbc.lock``,
the holder's pid written in it) for as long as it is open, so a second station on the same folder
refuses to start instead of counting into the first one's slides. The kernel drops the lock when
its holder dies, however it dies, so a stale lock file never blocks a restart.

A database that is empty, unreadable, not SQLite or fails ``PRAGMA quick_check`` is refused at
open (:class:`DatabaseDamagedError`, saying how to restore a backup) instead of being silently
replaced or used; ``reset=True`` moves it aside, never deletes it. Every finalised slide leaves a
backup (SQLite's online backup API) in ``backups/``, the newest ``backups_keep`` kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_wbc.counting.events import Event
from edge_wbc.counting.overlap import SIG_H, SIG_W
from edge_wbc.counting.records import CellRecord, EventRecord, FieldRecord, SlideRecord

log = logging.getLogger(__name__)

DB_NAME = "edge-wbc.sqlite3"
LOCK_NAME = "edge-wbc.lock"
BACKUP_DIR = "backups"
#: Backups are edge-wbc-<UTC time>.sqlite3: the name sorts by age, pruning touches nothing else.
BACKUP_GLOB = "edge-wbc-*.sqlite3"
_SQLITE_MAGIC = b"SQLite format 3\x00"
SCHEMA_VERSION = 1
#: Below this much free space a capture is refused up front: a field with its crops is ~100 kB,
#: the margin keeps SQLite's journal and the report writable.
MIN_FREE_BYTES = 32 * 1024 * 1024
#: Events that go to the MQTT outbox (differential is retained state, re-sent on connect).
OUTBOX_KINDS = ("cell", "field", "slide")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slides (
    id TEXT PRIMARY KEY,
    sample_id TEXT NOT NULL,
    target INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'finalised', 'abandoned')),
    created_at TEXT NOT NULL,
    finalised_at TEXT,
    station_id TEXT NOT NULL DEFAULT '',
    models TEXT NOT NULL DEFAULT '{}',
    reports TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS slides_status ON slides (status, created_at);
CREATE TABLE IF NOT EXISTS fields (
    id TEXT PRIMARY KEY,
    slide_id TEXT NOT NULL REFERENCES slides (id),
    seq INTEGER NOT NULL,
    captured_at TEXT NOT NULL,
    source TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    quality TEXT NOT NULL,
    timing_ms TEXT NOT NULL,
    n_cells INTEGER NOT NULL,
    n_counted INTEGER NOT NULL,
    n_duplicate INTEGER NOT NULL,
    overlap_field TEXT,
    overlap_fraction REAL NOT NULL DEFAULT 0,
    overlap_rect TEXT,
    flagged_duplicate INTEGER NOT NULL DEFAULT 0,
    models TEXT NOT NULL DEFAULT '{}',
    image_file TEXT,
    signature BLOB,
    UNIQUE (slide_id, seq)
);
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    slide_id TEXT NOT NULL REFERENCES slides (id),
    field_id TEXT NOT NULL REFERENCES fields (id),
    seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    x0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x1 INTEGER NOT NULL, y1 INTEGER NOT NULL,
    area_px INTEGER NOT NULL,
    label TEXT NOT NULL,
    score REAL NOT NULL,
    probs TEXT NOT NULL,
    status TEXT NOT NULL,
    reviewed_label TEXT,
    review_reason TEXT,
    reviewed_at TEXT,
    created_at TEXT NOT NULL,
    crop_file TEXT
);
CREATE INDEX IF NOT EXISTS cells_slide ON cells (slide_id, seq, idx);
-- What a lab adaptation needs of a cell besides its crop: the classifier's pooled features
-- (float16, little-endian) and which classifier (sha256) computed them. A table of its own, so
-- a database of schema 1 gains it on open with nothing to migrate.
CREATE TABLE IF NOT EXISTS cell_embeddings (
    cell_id TEXT PRIMARY KEY REFERENCES cells (id),
    model_sha256 TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    slide_id TEXT,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    action TEXT,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_slide ON events (slide_id, id);
"""

# Added after schema 1 shipped; additive, so an existing station's database upgrades in place.
# One row per accepted capture, so a capture still queued when the process died can be named at
# the next start instead of vanishing (status: queued -> counted | refused | interrupted).
_CAPTURES_SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    slide_id TEXT,
    trigger TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    accepted_at TEXT NOT NULL,
    status TEXT NOT NULL,
    field_id TEXT,
    message TEXT,
    done_at TEXT
);
CREATE INDEX IF NOT EXISTS captures_status ON captures (status);
"""

# Also additive: what the technician adds to a slide for the signed report (who counted, who
# signed off, a comment), a comment per cell, and fields set aside (a duplicate, a bad smear
# area) with all their cells. A discard is a row, its reversal deletes the row; both are events.
_NOTES_SCHEMA = """
CREATE TABLE IF NOT EXISTS slide_notes (
    slide_id TEXT PRIMARY KEY REFERENCES slides (id),
    operator TEXT NOT NULL DEFAULT '',
    signed_off_by TEXT NOT NULL DEFAULT '',
    comment TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cell_comments (
    cell_id TEXT PRIMARY KEY REFERENCES cells (id),
    comment TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS field_discards (
    field_id TEXT PRIMARY KEY REFERENCES fields (id),
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
"""
#: The notes a slide carries (slide_notes' columns), '' when never set.
NOTE_KEYS = ("operator", "signed_off_by", "comment")


TransactionHook = Callable[[sqlite3.Connection, Event], None]


class StoreError(Exception):
    """The data directory or database cannot be used; the message says why."""


class DiskFullError(StoreError):
    """No space left: nothing of the refused change was kept, everything before it was."""


class DataDirLockedError(StoreError):
    """Another process (its pid in the message) has the data directory open."""


class DatabaseDamagedError(StoreError):
    """The database file exists but cannot be trusted; the message says why and the way out."""


class DataDirLock:
    """Exclusive ``flock`` on ``<data_dir>/edge-wbc.lock`` with the holder's pid written in it.

    flock, not the pid file alone: the kernel releases it when the holder exits or is killed, so
    there is no stale-lock guessing; the pid is only there to name the holder in the refusal. The
    file is never deleted: unlinking it would let a third process lock a fresh inode while the
    second still holds the old one.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create the lock file {self.path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"cannot lock {self.path}: {e.strerror or e}") from e
            raise DataDirLockedError(
                f"data directory {data_dir} is in use by another edge-wbc process "
                f"({_holder(self.path)}): only one station may count into one data folder. "
                "Stop that one first (sudo systemctl stop edge-wbc), or give this one another "
                "--data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _refuse_root_in_users_folder(data_dir: Path) -> None:
    """Root writing in the service user's folder (``sudo edge-wbc station --reset``) would leave
    a lock file, a database or backups that the station, running as that user, cannot write."""
    if os.geteuid() != 0:
        return
    owner = data_dir.stat().st_uid
    if owner == 0:
        return
    try:
        import pwd

        name = pwd.getpwuid(owner).pw_name
    except (ImportError, KeyError):
        name = str(owner)
    raise StoreError(
        f"data directory {data_dir} belongs to user {name}; run this as that user "
        f"(sudo -u {name} edge-wbc ...), not as root, or the station could no longer write the "
        "files root would leave there"
    )


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    # Empty while the holder is between its flock and writing its pid (microseconds).
    return f"pid {pid}" if pid.isdigit() else "pid not yet recorded"


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower()


class Store:
    """SQLite store of the station. One connection, serialised by a lock (the station's writes
    are a few per second at most); the MQTT publisher opens its own connection to the same file.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        mqtt: bool = False,
        outbox_max: int | None = None,
        min_free_bytes: int = MIN_FREE_BYTES,
        jpeg_quality: int = 90,
        backups_keep: int = 7,
        reset: bool = False,
        read_only: bool = False,
    ) -> None:
        """``read_only``: for operator commands beside a running station (``edge-wbc report``,
        ``edge-wbc lis ...``): takes no lock, creates and migrates nothing, and SQLite refuses
        any write through it (``query_only``); the station's own start checks the file."""
        self.data_dir = Path(data_dir)
        self.mqtt = mqtt
        self.outbox_max = outbox_max
        self.min_free_bytes = min_free_bytes
        self.jpeg_quality = jpeg_quality
        self.backups_keep = backups_keep
        #: Outcome of the last backup (path or error, and when), for the station's status.
        self.last_backup: dict[str, Any] | None = None
        self._backup_thread: threading.Thread | None = None
        self._backup_again = False
        self.db_path = self.data_dir / DB_NAME
        self.backup_dir = self.data_dir / BACKUP_DIR
        self._lock = threading.RLock()
        self._outbox: Any = None
        # Listeners that keep their own durable queue (the LIS outbox) write it here, in the
        # transaction of the change itself; counting only runs them and knows none of them.
        self._txn_hooks: list[TransactionHook] = []
        self._dir_lock: DataDirLock | None = None
        if read_only:
            self._open_read_only()
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            probe = self.data_dir / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StoreError(
                f"data directory {self.data_dir} is not writable ({e.strerror or e}); choose "
                "another with --data-dir or fix its permissions"
            ) from e
        _refuse_root_in_users_folder(self.data_dir)
        # First, before the database is even looked at: a second process must change nothing.
        dir_lock = self._dir_lock = DataDirLock(self.data_dir)
        try:
            self._open(reset)
        except BaseException:
            dir_lock.release()
            raise

    def _open_read_only(self) -> None:
        problem = _file_problem(self.db_path)
        if problem is None and not self.db_path.exists():
            raise StoreError(f"no station database in {self.data_dir} ({DB_NAME} missing)")
        if problem is not None:
            raise DatabaseDamagedError(self._damaged_message(problem))
        try:
            self.conn = self._connect()
            self.conn.execute("PRAGMA query_only=ON")
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.db_path}: cannot read the database: {e}") from e
        if row is None or int(row["value"]) != SCHEMA_VERSION:
            self.conn.close()
            raise StoreError(
                f"{self.db_path} has schema {row['value'] if row else 'none'}, this edge-wbc "
                f"reads {SCHEMA_VERSION}"
            )

    def _open(self, reset: bool) -> None:
        problem = _file_problem(self.db_path)
        if problem is None and not self.db_path.exists():
            _create_database(self.db_path)
            reset = False  # nothing there to move aside: a first start
        try:
            if problem is None:
                self.conn = self._connect()
                problem = _quick_check(self.conn)
                if problem is not None:
                    self.conn.close()
            if problem is not None:
                if not reset:
                    raise DatabaseDamagedError(self._damaged_message(problem))
                aside = _move_aside(self.db_path)
                log.warning("%s %s: moved aside to %s; starting an empty database",
                            self.db_path, problem, aside)
                _create_database(self.db_path)
                self.conn = self._connect()
            elif reset:
                self.conn.close()
                raise StoreError(
                    f"--reset refused: {self.db_path} is readable and passes its check, so "
                    "nothing was moved. To start an empty history keep this one and use another "
                    "--data-dir"
                )
            self.conn.executescript(_SCHEMA)
            self.conn.executescript(_CAPTURES_SCHEMA)
            self.conn.executescript(_NOTES_SCHEMA)
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row["value"]) != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.db_path} has schema {row['value']}, this edge-wbc reads "
                    f"{SCHEMA_VERSION}; upgrade edge-wbc or use another --data-dir"
                )
            if self.mqtt:
                from edge_wbc.counting import outbox  # only with MQTT: the station runs without it

                self._outbox = outbox
                outbox.ensure_schema(self.conn, max_rows=self.outbox_max)
        except sqlite3.DatabaseError as e:
            if _is_disk_full(e):
                raise DiskFullError(f"disk full: cannot open {self.db_path}") from e
            raise StoreError(f"{self.db_path}: cannot use the database: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.db_path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _damaged_message(self, problem: str) -> str:
        backups = self.backups()
        if backups:
            restore = (f"restore the newest backup ({backups[-1].name}, {len(backups)} in "
                       f"{self.backup_dir}) as docs/pi.md 'Restore a backup' shows")
        else:
            restore = "restore a copy you made (docs/pi.md, 'Restore a backup'); there is none " \
                      f"in {self.backup_dir}"
        return (
            f"{self.db_path} {problem}. The station does not start on it, so that no counted "
            f"slide is hidden or damaged further. Either {restore}, or run 'edge-wbc station "
            "--reset' once to move it aside (it is kept, renamed, next to the new one) and start "
            "an empty database; the field images and reports in slides/ stay where they are"
        )

    def close(self) -> None:
        # A backup under way finishes first: the folder stays locked while anything writes in it.
        self.wait_for_backup()
        with self._lock:
            self.conn.close()
            if self._dir_lock is not None:
                self._dir_lock.release()

    # ------------------------------------------------------------------ paths

    def slide_dir(self, slide_id: str) -> Path:
        return self.data_dir / "slides" / slide_id

    def field_image(self, field_id: str) -> Path | None:
        row = self._one("SELECT slide_id, image_file FROM fields WHERE id=?", (field_id,))
        if row is None or not row["image_file"]:
            return None
        return self.data_dir / row["image_file"]

    def crop_image(self, cell_id: str) -> Path | None:
        row = self._one("SELECT crop_file FROM cells WHERE id=?", (cell_id,))
        if row is None or not row["crop_file"]:
            return None
        return self.data_dir / row["crop_file"]

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.data_dir).free

    # ------------------------------------------------------------------ writes

    @contextlib.contextmanager
    def _transaction(
        self, events: Sequence[Event], slide_id: str | None
    ) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                    for ev in events:
                        self._write_event(ev, slide_id)
                    self.conn.execute("COMMIT")
                except BaseException:
                    # SQLite may already have rolled back by itself (e.g. on SQLITE_FULL).
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            except (sqlite3.DatabaseError, OSError) as e:
                if _is_disk_full(e):
                    raise DiskFullError(
                        "disk full: the database could not be written; nothing was lost, but "
                        "this change was not saved. Free space on the data disk and try again."
                    ) from e
                raise StoreError(f"database error: {e}") from e

    def _write_event(self, ev: Event, slide_id: str | None) -> None:
        payload = json.dumps(ev.payload, separators=(",", ":"), default=_json_default)
        self.conn.execute(
            "INSERT INTO events (slide_id, at, kind, action, payload) VALUES (?, ?, ?, ?, ?)",
            (ev.payload.get("slide_id", slide_id), ev.payload.get("at") or "", ev.kind,
             ev.payload.get("action"), payload),
        )
        if self._outbox is not None and ev.kind in OUTBOX_KINDS:
            self._outbox.enqueue(self.conn, ev.kind, ev.payload)
        for hook in self._txn_hooks:
            hook(self.conn, ev)

    def add_transaction_hook(self, hook: TransactionHook) -> None:
        """``hook(conn, event)`` runs for every event inside the transaction that writes it
        (must not commit); if it raises, the change is rolled back with it."""
        with self._lock:
            self._txn_hooks.append(hook)

    def create_slide(self, slide: SlideRecord, events: Sequence[Event]) -> None:
        with self._transaction(events, slide["id"]) as c:
            c.execute(
                "INSERT INTO slides (id, sample_id, target, status, created_at, finalised_at, "
                "station_id, models, reports) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (slide["id"], slide["sample_id"], int(slide["target"]), slide["status"],
                 slide["created_at"], slide.get("finalised_at"), slide.get("station_id", ""),
                 _dumps(slide.get("models") or {}), _dumps(slide.get("reports") or {})),
            )

    def update_slide(self, slide_id: str, changes: dict[str, Any], events: Sequence[Event]) -> None:
        allowed = {"sample_id", "target", "status", "finalised_at", "reports"}
        bad = set(changes) - allowed
        if bad:
            raise ValueError(f"cannot update slide columns {sorted(bad)}")
        cols = ", ".join(f"{k}=?" for k in changes)
        vals = [_dumps(v) if k == "reports" else v for k, v in changes.items()]
        with self._transaction(events, slide_id) as c:
            cur = c.execute(f"UPDATE slides SET {cols} WHERE id=?", (*vals, slide_id))
            if cur.rowcount != 1:
                raise StoreError(f"no slide {slide_id}")
        if changes.get("status") == "finalised":
            self.backup_in_background()

    def add_field(
        self,
        field: FieldRecord,
        cells: Sequence[CellRecord],
        rgb: np.ndarray,
        crops: dict[str, np.ndarray],
        signature: np.ndarray,
        events: Sequence[Event],
        capture_id: int | None = None,
        embeddings: dict[str, tuple[str, np.ndarray]] | None = None,
    ) -> None:
        """Write the field image and crops, then the rows and events in one transaction.

        ``embeddings``: cell id -> (classifier sha256, pooled features), kept for adaptation.

        Sets ``field["image_file"]`` and each cell's ``crop_file`` (relative to the data dir).
        ``capture_id`` (a row of :meth:`capture_accepted`) is marked counted in that same
        transaction, so a kill can never leave a counted field reported as not analysed.
        """
        self.require_free("this field was not counted")
        sdir = self.slide_dir(field["slide_id"])
        written: list[Path] = []
        try:
            fpath = sdir / "fields" / f"{field['id']}.jpg"
            self._write_jpeg(fpath, rgb, 85)
            written.append(fpath)
            field["image_file"] = str(fpath.relative_to(self.data_dir))
            for cell in cells:
                crop = crops.get(cell["id"])
                if crop is None:
                    continue
                cpath = sdir / "crops" / f"{cell['id']}.jpg"
                self._write_jpeg(cpath, crop, self.jpeg_quality)
                written.append(cpath)
                cell["crop_file"] = str(cpath.relative_to(self.data_dir))
            with self._transaction(events, field["slide_id"]) as c:
                c.execute(
                    "INSERT INTO fields (id, slide_id, seq, captured_at, source, width, height, "
                    "quality, timing_ms, n_cells, n_counted, n_duplicate, overlap_field, "
                    "overlap_fraction, overlap_rect, flagged_duplicate, models, image_file, "
                    "signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (field["id"], field["slide_id"], field["seq"], field["captured_at"],
                     field["source"], field["width"], field["height"], _dumps(field["quality"]),
                     _dumps(field["timing_ms"]), field["n_cells"], field["n_counted"],
                     field["n_duplicate"], field["overlap_field"], field["overlap_fraction"],
                     _dumps(field["overlap_rect"]), int(field["flagged_duplicate"]),
                     _dumps(field.get("models") or {}), field["image_file"],
                     np.ascontiguousarray(signature, np.uint8).tobytes()),
                )
                c.executemany(
                    "INSERT INTO cells (id, slide_id, field_id, seq, idx, x0, y0, x1, y1, "
                    "area_px, label, score, probs, status, reviewed_label, review_reason, "
                    "reviewed_at, created_at, crop_file) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (x["id"], x["slide_id"], x["field_id"], x["seq"], x["idx"], *x["bbox"],
                         x["area_px"], x["label"], x["score"], _dumps(x["probs"]), x["status"],
                         x["reviewed_label"], x["review_reason"], x["reviewed_at"],
                         x["created_at"], x["crop_file"])
                        for x in cells
                    ],
                )
                if embeddings:
                    c.executemany(
                        "INSERT INTO cell_embeddings (cell_id, model_sha256, dim, vector) "
                        "VALUES (?, ?, ?, ?)",
                        [
                            (cid, sha, int(np.size(v)),
                             np.asarray(v, "<f2").reshape(-1).tobytes())
                            for cid, (sha, v) in embeddings.items()
                        ],
                    )
                if capture_id is not None:
                    c.execute(
                        "UPDATE captures SET status='counted', field_id=?, done_at=? WHERE id=?",
                        (field["id"], _now_iso(), capture_id),
                    )
        except BaseException as e:
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            if isinstance(e, OSError) and _is_disk_full(e):
                raise DiskFullError(
                    "disk full while saving the field images: this field was not counted; "
                    "everything counted so far is saved. Free space, then capture again."
                ) from e
            if isinstance(e, OSError):
                raise StoreError(f"cannot save the field images: {e}") from e
            raise

    def require_free(self, refused: str) -> None:
        """Raise DiskFullError (``refused`` says what) when the disk is below its margin."""
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise DiskFullError(
                f"disk almost full ({free // (1024 * 1024)} MB free in {self.data_dir}): "
                f"{refused}; everything counted so far is saved. Free space, then capture again."
            )

    # ------------------------------------------------------------------ captures

    def capture_accepted(self, slide_id: str, trigger: str, source: str, at: str) -> int:
        """Record a capture before it is queued; returns its id (the API's capture_id)."""
        with self._transaction((), slide_id) as c:
            cur = c.execute(
                "INSERT INTO captures (slide_id, trigger, source, accepted_at, status) "
                "VALUES (?, ?, ?, ?, 'queued')", (slide_id, trigger, source, at),
            )
            return int(cur.lastrowid or 0)

    def capture_refused(self, capture_id: int, message: str, at: str) -> None:
        with self._transaction((), None) as c:
            c.execute(
                "UPDATE captures SET status='refused', message=?, done_at=? WHERE id=?",
                (message, at, capture_id),
            )

    def interrupt_captures(self, at: str) -> list[dict[str, Any]]:
        """Captures accepted but neither counted nor refused: the process that queued them died.
        Marks them interrupted (so they are reported once) and returns them, oldest first."""
        with self._transaction((), None) as c:
            rows = c.execute(
                "SELECT * FROM captures WHERE status='queued' ORDER BY id"
            ).fetchall()
            c.execute(
                "UPDATE captures SET status='interrupted', done_at=?, message=? "
                "WHERE status='queued'", (at, "the station stopped before analysing it"),
            )
        return [dict(r) for r in rows]

    def captures(self, slide_id: str | None = None) -> list[dict[str, Any]]:
        if slide_id is None:
            rows = self._all("SELECT * FROM captures ORDER BY id")
        else:
            rows = self._all("SELECT * FROM captures WHERE slide_id=? ORDER BY id", (slide_id,))
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ backups

    def backups(self) -> list[Path]:
        """Backups in the backup folder, oldest first."""
        return sorted(self.backup_dir.glob(BACKUP_GLOB))

    def backup_in_background(self) -> None:
        """Start :meth:`backup` on its own thread (a large database takes seconds to copy on a
        Pi, and the finalise that asked for it must not wait). One at a time: a request while
        one runs makes one more afterwards, so the newest state is always backed up."""
        if self.backups_keep <= 0:
            return
        with self._lock:
            if self._backup_thread is not None and self._backup_thread.is_alive():
                self._backup_again = True
                return
            self._backup_thread = threading.Thread(target=self._backup_loop,
                                                   name="db-backup", daemon=False)
            self._backup_thread.start()

    def _backup_loop(self) -> None:
        while True:
            self.backup()
            with self._lock:
                if not self._backup_again:
                    return
                self._backup_again = False

    def wait_for_backup(self, timeout: float | None = None) -> None:
        t = self._backup_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def backup(self) -> Path | None:
        """Snapshot the database with SQLite's online backup API into ``backups/``, keep the
        newest ``backups_keep``. Never raises: the change that asked for it is already saved; a
        failure is logged and kept in ``last_backup``. Returns the new file, None when skipped.

        Reads through a connection of its own, in one step: one read transaction, so the copy
        is a consistent snapshot while the station goes on writing (WAL lets both proceed)."""
        if self.backups_keep <= 0:
            return None
        at = _utc_stamp()
        dest = self.backup_dir / f"edge-wbc-{at}.sqlite3"
        tmp = dest.with_suffix(".tmp")
        try:
            need = self.db_path.stat().st_size + self.min_free_bytes
            if self.free_bytes() < need:
                # Counting needs the space more than a backup does.
                raise OSError(errno.ENOSPC, f"under {need // (1024 * 1024)} MB free")
            self.backup_dir.mkdir(exist_ok=True)
            for stale in self.backup_dir.glob("edge-wbc-*.tmp*"):
                # A copy cut short by a kill (e.g. systemd's stop timeout) is never a backup.
                with contextlib.suppress(OSError):
                    stale.unlink()
            src = sqlite3.connect(self.db_path, timeout=30.0)
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
                # A backup that is itself damaged must not push a good one out of the rotation.
                problem = _quick_check(dst)
                if problem is not None:
                    raise sqlite3.DatabaseError(f"the backup {problem}")
            finally:
                dst.close()
                src.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except (sqlite3.Error, OSError) as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("database backup to %s failed: %s (the data itself is saved)",
                        self.backup_dir, e)
            self.last_backup = {"ok": False, "error": str(e), "at": at}
            return None
        for old in self.backups()[: -self.backups_keep]:
            with contextlib.suppress(OSError):
                old.unlink()
        self.last_backup = {"ok": True, "path": str(dest), "at": at}
        log.info("database backed up to %s", dest)
        return dest

    def update_cell(
        self,
        cell_id: str,
        reviewed_label: str | None,
        reason: str | None,
        reviewed_at: str | None,
        events: Sequence[Event],
    ) -> None:
        slide = self._one("SELECT slide_id FROM cells WHERE id=?", (cell_id,))
        if slide is None:
            raise StoreError(f"no cell {cell_id}")
        with self._transaction(events, slide["slide_id"]) as c:
            c.execute(
                "UPDATE cells SET reviewed_label=?, review_reason=?, reviewed_at=? WHERE id=?",
                (reviewed_label, reason, reviewed_at, cell_id),
            )

    def set_slide_notes(self, slide_id: str, notes: dict[str, str], at: str,
                        events: Sequence[Event]) -> None:
        """Operator, sign-off and comment of a slide (keys of NOTE_KEYS; others kept)."""
        bad = set(notes) - set(NOTE_KEYS)
        if bad:
            raise StoreError(f"unknown slide notes {sorted(bad)}")
        with self._transaction(events, slide_id) as c:
            c.execute("INSERT OR IGNORE INTO slide_notes (slide_id, updated_at) VALUES (?, ?)",
                      (slide_id, at))
            for k, v in notes.items():  # k is one of NOTE_KEYS, checked above
                c.execute(f"UPDATE slide_notes SET {k}=?, updated_at=? WHERE slide_id=?",
                          (v, at, slide_id))

    def audit(self, slide_id: str, events: Sequence[Event]) -> None:
        """Events with no row to change (a station-wide switch recorded in a slide's trail)."""
        with self._transaction(events, slide_id):
            pass

    def set_cell_comment(self, cell_id: str, comment: str, at: str,
                         events: Sequence[Event]) -> None:
        """A technician's free-text note on one cell ('' removes it)."""
        slide = self._one("SELECT slide_id FROM cells WHERE id=?", (cell_id,))
        if slide is None:
            raise StoreError(f"no cell {cell_id}")
        with self._transaction(events, slide["slide_id"]) as c:
            if comment:
                c.execute("INSERT INTO cell_comments (cell_id, comment, at) VALUES (?, ?, ?) "
                          "ON CONFLICT (cell_id) DO UPDATE SET comment=excluded.comment, "
                          "at=excluded.at", (cell_id, comment, at))
            else:
                c.execute("DELETE FROM cell_comments WHERE cell_id=?", (cell_id,))

    def set_field_discarded(self, field_id: str, reason: str | None, at: str,
                            events: Sequence[Event]) -> None:
        """Set a field aside with its cells (``reason``), or take it back (None)."""
        row = self._one("SELECT slide_id FROM fields WHERE id=?", (field_id,))
        if row is None:
            raise StoreError(f"no field {field_id}")
        with self._transaction(events, row["slide_id"]) as c:
            if reason is None:
                c.execute("DELETE FROM field_discards WHERE field_id=?", (field_id,))
            else:
                c.execute("INSERT OR REPLACE INTO field_discards (field_id, reason, at) "
                          "VALUES (?, ?, ?)", (field_id, reason, at))

    def add_manual_cell(self, cell: CellRecord, events: Sequence[Event]) -> None:
        """A cell the technician counted by key (no image, no box of its own)."""
        with self._transaction(events, cell["slide_id"]) as c:
            c.execute(
                "INSERT INTO cells (id, slide_id, field_id, seq, idx, x0, y0, x1, y1, area_px, "
                "label, score, probs, status, reviewed_label, review_reason, reviewed_at, "
                "created_at, crop_file) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cell["id"], cell["slide_id"], cell["field_id"], cell["seq"], cell["idx"],
                 *cell["bbox"], cell["area_px"], cell["label"], cell["score"],
                 _dumps(cell["probs"]), cell["status"], cell["reviewed_label"],
                 cell["review_reason"], cell["reviewed_at"], cell["created_at"], None),
            )

    def update_cells(
        self, updates: Sequence[tuple[str, str | None, str | None, str | None]],
        events: Sequence[Event],
    ) -> None:
        """Several reviews (cell id, reviewed label, reason, at) in one transaction: a gallery
        group confirmed in one action is stored whole or not at all."""
        if not updates:
            return
        ids = [u[0] for u in updates]
        rows = self._all(
            f"SELECT DISTINCT slide_id FROM cells WHERE id IN ({','.join('?' * len(ids))})", ids
        )
        if len(rows) != 1:
            raise StoreError(f"cells {ids} are not all on one slide")
        with self._transaction(events, rows[0]["slide_id"]) as c:
            c.executemany(
                "UPDATE cells SET reviewed_label=?, review_reason=?, reviewed_at=? WHERE id=?",
                [(label, reason, at, cid) for cid, label, reason, at in updates],
            )

    def reviewed_cells(self) -> list[ReviewedCell]:
        """Every cell a technician reclassified or confirmed (rejected ones are not labels),
        oldest first, with its crop and stored embedding: a lab's labelled cells."""
        try:
            rows = self._all(
                "SELECT c.id, c.field_id, c.label, c.reviewed_label, c.review_reason, "
                "c.crop_file, e.model_sha256, e.dim, e.vector FROM cells c "
                "LEFT JOIN cell_embeddings e ON e.cell_id = c.id "
                "WHERE c.reviewed_label IS NOT NULL AND c.reviewed_label != 'rejected' "
                "AND c.status != 'manual' ORDER BY c.created_at, c.seq, c.idx"
            )
        except sqlite3.OperationalError as e:  # a read-only schema-1 file never opened since
            if "cell_embeddings" not in str(e):
                raise
            rows = self._all(
                "SELECT id, field_id, label, reviewed_label, review_reason, crop_file, "
                "NULL AS model_sha256, NULL AS dim, NULL AS vector FROM cells "
                "WHERE reviewed_label IS NOT NULL AND reviewed_label != 'rejected' "
                "AND status != 'manual' ORDER BY created_at, seq, idx"
            )
        out = []
        for r in rows:
            vec = None
            if r["vector"] is not None:
                vec = np.frombuffer(r["vector"], "<f2").astype(np.float32)
                if vec.size != r["dim"]:
                    vec = None
            out.append(
                ReviewedCell(
                    cell_id=r["id"],
                    field_id=r["field_id"],
                    label=r["reviewed_label"],
                    confirmed=r["review_reason"] == CONFIRMED,
                    machine_label=r["label"],
                    crop_path=self.data_dir / r["crop_file"] if r["crop_file"] else None,
                    embedding=vec,
                    embedding_model=r["model_sha256"],
                )
            )
        return out

    @classmethod
    def reviewed_cells_readonly(cls, data_dir: str | Path) -> list[ReviewedCell]:
        """``reviewed_cells`` of a station's data folder, read beside a running station."""
        store = cls(data_dir, read_only=True)
        try:
            return store.reviewed_cells()
        finally:
            store.close()

    def _write_jpeg(self, path: Path, rgb: np.ndarray, quality: int) -> None:
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if not ok:
            raise StoreError(f"could not encode {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(buf.tobytes())
        os.replace(tmp, path)

    # ------------------------------------------------------------------ reads

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            return self.conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, args).fetchall()

    def _notes_tables(self) -> bool:
        """A read-only open of a database no newer station has opened lacks the notes tables."""
        return self._one("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                         "name='field_discards'") is not None

    def _slides(self, where: str, args: Sequence[Any], tail: str = "") -> list[SlideRecord]:
        if self._notes_tables():
            rows = self._all(
                "SELECT s.*, n.operator, n.signed_off_by, n.comment FROM slides s "
                f"LEFT JOIN slide_notes n ON n.slide_id = s.id {where} {tail}", args)
        else:
            rows = self._all(f"SELECT s.* FROM slides s {where} {tail}", args)
        return [_slide(r) for r in rows]

    def open_slide(self) -> SlideRecord | None:
        rows = self._slides("WHERE s.status='open'", (),
                            "ORDER BY s.created_at DESC, s.rowid DESC LIMIT 1")
        return rows[0] if rows else None

    def slide(self, slide_id: str) -> SlideRecord | None:
        rows = self._slides("WHERE s.id=?", (slide_id,))
        return rows[0] if rows else None

    def slides(self, limit: int = 50) -> list[SlideRecord]:
        return self._slides("", (limit,), "ORDER BY s.created_at DESC, s.rowid DESC LIMIT ?")

    def cells(self, slide_id: str) -> list[CellRecord]:
        if self._notes_tables():
            rows = self._all(
                "SELECT c.*, cc.comment, fd.reason AS discarded FROM cells c "
                "LEFT JOIN cell_comments cc ON cc.cell_id = c.id "
                "LEFT JOIN field_discards fd ON fd.field_id = c.field_id "
                "WHERE c.slide_id=? ORDER BY c.seq, c.idx", (slide_id,))
        else:
            rows = self._all("SELECT * FROM cells WHERE slide_id=? ORDER BY seq, idx",
                             (slide_id,))
        return [_cell(r) for r in rows]

    def fields(self, slide_id: str) -> list[FieldRecord]:
        if self._notes_tables():
            rows = self._all(
                "SELECT f.*, fd.reason AS discarded, fd.at AS discarded_at FROM fields f "
                "LEFT JOIN field_discards fd ON fd.field_id = f.id "
                "WHERE f.slide_id=? ORDER BY f.seq", (slide_id,))
        else:
            rows = self._all("SELECT * FROM fields WHERE slide_id=? ORDER BY seq", (slide_id,))
        return [_field(r) for r in rows]

    def field_signatures(self, slide_id: str, k: int) -> list[tuple[str, np.ndarray]]:
        rows = self._all(
            "SELECT id, signature FROM fields WHERE slide_id=? ORDER BY seq DESC LIMIT ?",
            (slide_id, k),
        )
        out = []
        for r in reversed(rows):
            blob = r["signature"]
            if blob is not None and len(blob) == SIG_W * SIG_H:
                out.append((r["id"], np.frombuffer(blob, np.uint8).reshape(SIG_H, SIG_W).copy()))
        return out

    def events(self, slide_id: str | None = None) -> list[EventRecord]:
        if slide_id is None:
            rows = self._all("SELECT * FROM events ORDER BY id")
        else:
            rows = self._all("SELECT * FROM events WHERE slide_id=? ORDER BY id", (slide_id,))
        return [
            {"id": r["id"], "slide_id": r["slide_id"], "at": r["at"], "kind": r["kind"],
             "action": r["action"], "payload": json.loads(r["payload"])}
            for r in rows
        ]


#: review_reason of a cell the technician confirmed (its label kept, now a reviewed label).
CONFIRMED = "confirmed"


@dataclass(frozen=True)
class ReviewedCell:
    cell_id: str
    field_id: str
    label: str  # the reviewed (confirmed or changed) class
    confirmed: bool
    machine_label: str
    crop_path: Path | None
    embedding: np.ndarray | None
    embedding_model: str | None  # sha256 of the classifier that computed the embedding


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _file_problem(path: Path) -> str | None:
    """Why an existing database file cannot even be opened, or None (also when it is absent)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        # SQLite would quietly make a new, empty history in it; the slides would vanish from view.
        return "is empty (0 bytes)"
    if head != _SQLITE_MAGIC:
        return "is not an SQLite database"
    return None


def _quick_check(conn: sqlite3.Connection) -> str | None:
    """PRAGMA quick_check's findings (the first few), or None when it says ok."""
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as e:
        if _is_disk_full(e):
            raise
        return f"is damaged ({e})"
    if rows == ["ok"]:
        return None
    detail = "; ".join(" ".join(r.split()) for r in rows)
    return f"is damaged (PRAGMA quick_check: {detail[:400]})"


def _create_database(path: Path) -> None:
    """A new database, built under a temporary name and renamed into place: a crash while it is
    being made can never leave the 0-byte file that the next start would refuse."""
    tmp = path.with_name(path.name + ".new")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()  # a leftover of an earlier crash at this very step: never held data
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # writes the header: the file is never 0 bytes
    finally:
        conn.close()  # the last connection checkpoints and removes the -wal file
    os.replace(tmp, path)


def _move_aside(path: Path) -> Path:
    """Rename the database and its -wal/-shm together (SQLite pairs them by name, so the aside
    copy stays readable for a recovery attempt). Returns the new name of the main file."""
    aside = path.with_name(f"{path.stem}-damaged-{_utc_stamp()}{path.suffix}")
    for suffix in ("-wal", "-shm", ""):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{aside}{suffix}"))
    return aside


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), default=_json_default)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _slide(r: sqlite3.Row) -> SlideRecord:
    out: SlideRecord = {
        "id": r["id"],
        "sample_id": r["sample_id"],
        "target": r["target"],
        "status": r["status"],
        "created_at": r["created_at"],
        "finalised_at": r["finalised_at"],
        "station_id": r["station_id"],
        "models": json.loads(r["models"]),
        "reports": json.loads(r["reports"]),
    }
    keys = r.keys()  # a Row's `in` looks at its values, not its column names
    for k in NOTE_KEYS:
        if k in keys:
            out[k] = r[k] or ""  # type: ignore[literal-required]
    return out


def _cell(r: sqlite3.Row) -> CellRecord:
    out: CellRecord = {
        "id": r["id"],
        "slide_id": r["slide_id"],
        "field_id": r["field_id"],
        "seq": r["seq"],
        "idx": r["idx"],
        "bbox": [r["x0"], r["y0"], r["x1"], r["y1"]],
        "area_px": r["area_px"],
        "label": r["label"],
        "score": r["score"],
        "probs": json.loads(r["probs"]),
        "status": r["status"],
        "reviewed_label": r["reviewed_label"],
        "review_reason": r["review_reason"],
        "reviewed_at": r["reviewed_at"],
        "created_at": r["created_at"],
        "crop_file": r["crop_file"],
    }
    keys = r.keys()
    if "comment" in keys and r["comment"]:
        out["comment"] = r["comment"]
    if "discarded" in keys and r["discarded"]:
        out["discarded"] = r["discarded"]
    return out


def _field(r: sqlite3.Row) -> FieldRecord:
    out: FieldRecord = {
        "id": r["id"],
        "slide_id": r["slide_id"],
        "seq": r["seq"],
        "captured_at": r["captured_at"],
        "source": r["source"],
        "width": r["width"],
        "height": r["height"],
        "quality": json.loads(r["quality"]),
        "timing_ms": json.loads(r["timing_ms"]),
        "n_cells": r["n_cells"],
        "n_counted": r["n_counted"],
        "n_duplicate": r["n_duplicate"],
        "overlap_field": r["overlap_field"],
        "overlap_fraction": r["overlap_fraction"],
        "overlap_rect": json.loads(r["overlap_rect"]) if r["overlap_rect"] else None,
        "flagged_duplicate": bool(r["flagged_duplicate"]),
        "models": json.loads(r["models"]),
        "image_file": r["image_file"],
    }
    keys = r.keys()
    if "discarded" in keys and r["discarded"]:
        out["discarded"] = r["discarded"]
        out["discarded_at"] = r["discarded_at"]
    return out
