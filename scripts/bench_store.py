"""What the store's safety costs: start-up check, backup at finalise, capture record.

Builds a database of N finalised slides (one slide counted through the real SlideSession, 100
cells in 50 fields, its rows then copied N-1 times under new ids, so row sizes are real), then
times on it:

* open: ``Store(data_dir)`` as the station does at every start (lock, file checks,
  ``PRAGMA quick_check``, schema);
* quick_check: the check alone;
* backup: one ``Store.backup()`` (SQLite online backup + quick_check of the copy + fsync), the
  work each finalise starts (on its own thread: the finalise does not wait for it);
* capture: recording one capture as accepted (a small committed transaction with
  ``synchronous=FULL``, so one fsync), the work added before each 202; closing it costs nothing
  more when the field is counted (it rides in the field's own transaction).

Prints one table row per size. Example: ``python scripts/bench_store.py --slides 100 1000``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_wbc.counting.session import SlideSession
from edge_wbc.counting.store import DB_NAME, Store
from edge_wbc.pipeline.results import CLASSES, Cell, FieldResult

TABLES = ("slides", "fields", "cells", "events", "captures")


def _seed(data: Path) -> str:
    store = Store(data, backups_keep=0)
    s = SlideSession(store, default_target=100)
    rng = np.random.default_rng(0)
    for i in range(50):
        rgb = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        cells = []
        for j in range(2):
            label = CLASSES[(2 * i + j) % len(CLASSES)]
            probs = {c: (0.9 if c == label else 0.025) for c in CLASSES}
            x = 40 + 300 * j
            cells.append(Cell(bbox=(x, 100, x + 120, 220), label=label, score=0.9, probs=probs,
                              area_px=14400))
        s.add_field(rgb, FieldResult(path=f"f{i}.jpg", width=640, height=480, cells=cells,
                                     quality={"flags": []}, timing_ms={"total": 300.0}),
                    source=f"f{i}.jpg")
    for c in list(s.cells)[:5]:
        s.review(c, "lymphocyte")
    s.finalise()
    sid = s.slide["id"]
    store.close()
    return sid


def _replicate(data: Path, sid: str, n: int) -> None:
    import sqlite3

    conn = sqlite3.connect(data / DB_NAME)
    conn.row_factory = sqlite3.Row
    rows = {
        "slides": conn.execute("SELECT * FROM slides WHERE id=?", (sid,)).fetchall(),
        "fields": conn.execute("SELECT * FROM fields WHERE slide_id=?", (sid,)).fetchall(),
        "cells": conn.execute("SELECT * FROM cells WHERE slide_id=?", (sid,)).fetchall(),
        "events": conn.execute("SELECT * FROM events WHERE slide_id=?", (sid,)).fetchall(),
    }
    id_cols = ("id", "slide_id", "field_id")
    conn.execute("BEGIN")
    for k in range(1, n):
        suffix = f"-R{k:05d}"
        for table, rs in rows.items():
            if not rs:
                continue
            names = rs[0].keys()  # a Row iterates over its values, not its column names
            cols = [c for c in names if not (table == "events" and c == "id")]
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            conn.executemany(sql, [
                [r[c] + suffix if c in id_cols and r[c] else r[c] for c in cols] for r in rs
            ])
    conn.execute("COMMIT")
    conn.close()


def _ms(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--dir", type=Path, default=None,
                    help="Where to build the databases (default: a temporary folder); its disk "
                         "decides the fsync cost.")
    args = ap.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"SQLite {__import__('sqlite3').sqlite_version}")
    print("| slides | cells | DB MB | open ms | quick_check ms | backup ms | capture accept ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.slides:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            data = Path(tmp)
            _replicate(data, _seed(data), n)
            size = (data / DB_NAME).stat().st_size / 2**20
            t_open = _ms(lambda d=data: Store(d).close(), 3)
            store = Store(data, backups_keep=2)
            n_cells = store.conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            t_qc = _ms(lambda s=store: s.conn.execute("PRAGMA quick_check").fetchall(), 3)
            t_backup = _ms(store.backup, 3)

            t_cap = _ms(lambda s=store: s.capture_accepted("S", "bench", "x", "2026-01-01"), 30)
            store.close()
        print(f"| {n} | {n_cells} | {size:.1f} | {t_open:.0f} | {t_qc:.0f} | {t_backup:.0f} | "
              f"{t_cap:.1f} |", flush=True)


if __name__ == "__main__":
    main()
