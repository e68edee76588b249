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
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_wbc.counting.events import Event
from edge_wbc.counting.overlap import SIG_H, SIG_W
from edge_wbc.counting.records import CellRecord, EventRecord, FieldRecord, SlideRecord

log = logging.getLogger(__name__)

DB_NAME = "edge-wbc.sqlite3"
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


TransactionHook = Callable[[sqlite3.Connection, Event], None]


class StoreError(Exception):
    """The data directory or database cannot be used; the message says why."""


class DiskFullError(StoreError):
    """No space left: nothing of the refused change was kept, everything before it was."""


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
    ) -> None:
        self.data_dir = Path(data_dir)
        self.mqtt = mqtt
        self.min_free_bytes = min_free_bytes
        self.jpeg_quality = jpeg_quality
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
        self.db_path = self.data_dir / DB_NAME
        self._lock = threading.RLock()
        self._outbox: Any = None
        # Listeners that keep their own durable queue (the LIS outbox) write it here, in the
        # transaction of the change itself; counting only runs them and knows none of them.
        self._txn_hooks: list[TransactionHook] = []
        try:
            self.conn = sqlite3.connect(
                self.db_path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(_SCHEMA)
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
            if mqtt:
                from edge_wbc.counting import outbox  # only with MQTT: the station runs without it

                self._outbox = outbox
                outbox.ensure_schema(self.conn, max_rows=outbox_max)
        except sqlite3.DatabaseError as e:
            if _is_disk_full(e):
                raise DiskFullError(f"disk full: cannot open {self.db_path}") from e
            raise StoreError(f"{self.db_path}: cannot use the database: {e}") from e

    def close(self) -> None:
        with self._lock:
            self.conn.close()

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

    def add_field(
        self,
        field: FieldRecord,
        cells: Sequence[CellRecord],
        rgb: np.ndarray,
        crops: dict[str, np.ndarray],
        signature: np.ndarray,
        events: Sequence[Event],
    ) -> None:
        """Write the field image and crops, then the rows and events in one transaction.

        Sets ``field["image_file"]`` and each cell's ``crop_file`` (relative to the data dir).
        """
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise DiskFullError(
                f"disk almost full ({free // (1024 * 1024)} MB free in {self.data_dir}): this "
                "field was not counted; everything counted so far is saved. Free space, then "
                "capture again."
            )
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

    def open_slide(self) -> SlideRecord | None:
        row = self._one(
            "SELECT * FROM slides WHERE status='open' ORDER BY created_at DESC, rowid DESC LIMIT 1"
        )
        return _slide(row) if row else None

    def slide(self, slide_id: str) -> SlideRecord | None:
        row = self._one("SELECT * FROM slides WHERE id=?", (slide_id,))
        return _slide(row) if row else None

    def slides(self, limit: int = 50) -> list[SlideRecord]:
        rows = self._all("SELECT * FROM slides ORDER BY created_at DESC, rowid DESC LIMIT ?",
                         (limit,))
        return [_slide(r) for r in rows]

    def cells(self, slide_id: str) -> list[CellRecord]:
        rows = self._all("SELECT * FROM cells WHERE slide_id=? ORDER BY seq, idx", (slide_id,))
        return [_cell(r) for r in rows]

    def fields(self, slide_id: str) -> list[FieldRecord]:
        rows = self._all(
            "SELECT * FROM fields WHERE slide_id=? ORDER BY seq", (slide_id,)
        )
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
    return {
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


def _cell(r: sqlite3.Row) -> CellRecord:
    return {
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


def _field(r: sqlite3.Row) -> FieldRecord:
    return {
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
