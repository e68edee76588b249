"""Wrong counts and lost data (issue 15, items 1, 2, 4, 6, 7): one process per data folder, damaged
databases refused with the way out, backups at finalise, review events with their own time, and
captures still queued at a kill named at the next start. Real processes where the issue says so."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from mqtt_support import http_json as api
from station_fakes import RunningStation, fake_cell

from edge_wbc.counting.session import SlideSession
from edge_wbc.counting.store import (
    DB_NAME,
    DatabaseDamagedError,
    DataDirLockedError,
    Store,
    StoreError,
)
from edge_wbc.pipeline.results import FieldResult

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "fields"
FIELDS = sorted(SAMPLES.glob("*.jpg"))
FIXTURE_MODELS = ROOT / "tests" / "fixtures" / "models"


def _rgb(i: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(FIELDS[i])), cv2.COLOR_BGR2RGB)


def _field(labels: list[str]) -> FieldResult:
    cells = [fake_cell((20 + 110 * i, 20, 120 + 110 * i, 120), lab) for i, lab in enumerate(labels)]
    return FieldResult(path="f.jpg", width=640, height=480, cells=cells)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(data: Path, slides: int = 2, backups_keep: int = 7) -> list[str]:
    """A station's past: ``slides`` finalised slides of 2 cells each. Returns their ids."""
    store = Store(data, backups_keep=backups_keep)
    s = SlideSession(store, default_target=2)
    ids = []
    for i in range(slides):
        if i:
            s.new_slide(f"H-{i}")
        s.add_field(_rgb(i), _field(["neutrophil", "lymphocyte"]))
        s.finalise()
        ids.append(s.slide["id"])
    store.close()
    return ids


# --------------------------------------------------------------------------- 1. one process


class _Listener:
    """A TCP port standing in for the broker: records whether anybody connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.sock.close()


def _station(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_WBC_")}
    return subprocess.Popen(
        [sys.executable, "-c", "from edge_wbc.cli import app; app()", "station", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )


def _wait_url(p: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()  # type: ignore[union-attr]
        if re.search(r"open http://", line):
            return
        if not line and p.poll() is not None:
            raise AssertionError("station exited: " + p.stderr.read())  # type: ignore[union-attr]
    raise AssertionError("station did not print its URL")


def test_second_station_on_one_data_folder_refuses_before_the_broker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    base = ("--models", str(FIXTURE_MODELS), "--source", f"folder:{SAMPLES}", "--data-dir",
            str(data))
    port_a = _free_port()
    a = _station(*base, "--port", str(port_a))
    broker = _Listener()
    try:
        _wait_url(a)
        assert api(port_a, "/api/capture", {})[0] == 202
        deadline = time.monotonic() + 30
        while api(port_a, "/api/state")[1]["fields"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (data / "edge-wbc.lock").read_text().strip() == str(a.pid)

        b = subprocess.run(
            [sys.executable, "-c", "from edge_wbc.cli import app; app()", "station", *base,
             "--port", str(_free_port()), "--mqtt-host", "127.0.0.1", "--mqtt-port",
             str(broker.port)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("EDGE_WBC_")},
        )
        assert b.returncode == 2, b.stderr
        assert f"pid {a.pid}" in b.stderr and "in use by another edge-wbc process" in b.stderr
        assert "Traceback" not in b.stderr
        time.sleep(0.3)  # a connect attempt, had there been one, would have landed by now
        assert broker.connections == 0  # B never reached the broker: A stays online

        # A counts on undisturbed, and nothing of B is in its database.
        assert api(port_a, "/api/capture", {})[0] == 202
        deadline = time.monotonic() + 30
        while (s := api(port_a, "/api/state")[1])["fields"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with sqlite3.connect(data / DB_NAME) as conn:
            assert conn.execute("SELECT COUNT(*) FROM slides").fetchone()[0] == 1
            assert conn.execute("SELECT COUNT(*) FROM fields").fetchone()[0] == 2
        assert s["station"]["last_error"] is None
    finally:
        broker.close()
        a.kill()
        a.wait(10)
    # The kernel dropped A's lock with A: a restart after a kill -9 is not blocked.
    Store(data).close()


def test_lock_is_per_open_store_and_released_on_close(tmp_path: Path) -> None:
    first = Store(tmp_path)
    with pytest.raises(DataDirLockedError, match=f"pid {os.getpid()}"):
        Store(tmp_path)
    first.close()
    Store(tmp_path).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as `sudo edge-wbc ...` has")
def test_root_is_refused_in_the_service_users_folder(tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(StoreError, match="sudo -u nobody"):
        Store(data, reset=True)
    assert list(data.iterdir()) == []  # not even a lock file left behind


def test_operator_reader_beside_the_station_takes_no_lock_and_cannot_write(
        tmp_path: Path) -> None:
    ids = _history(tmp_path, slides=1)
    station = Store(tmp_path)
    try:
        reader = Store(tmp_path, read_only=True)  # `edge-wbc report` while the station runs
        assert [s["id"] for s in reader.slides()] == ids
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.conn.execute("DELETE FROM slides")
        reader.close()
        assert len(station.slides()) == 1
    finally:
        station.close()
    with pytest.raises(StoreError, match="missing"):
        Store(tmp_path / "elsewhere", read_only=True)


# --------------------------------------------------------------------------- 2 + 4. damaged db


def _zero_bytes(db: Path) -> None:
    db.write_bytes(b"")


def _not_sqlite(db: Path) -> None:
    db.write_bytes(b"slide,cells\nH-1,100\n" * 50)


def _random_pages(db: Path) -> None:
    # Pages 2-4 (the first tables' b-tree pages) overwritten, as a failing SD card does.
    rng = np.random.default_rng(7)
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(rng.integers(0, 256, 3 * 4096, dtype=np.uint8).tobytes())


def _random_cells_page(db: Path) -> None:
    # Only the cells table's page: the schema still reads, so the old station ran on regardless.
    with sqlite3.connect(db) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='cells'").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * size + 8)
        f.write(np.random.default_rng(3).integers(0, 256, size - 8, dtype=np.uint8).tobytes())


def _a_directory(db: Path) -> None:
    db.unlink()
    db.mkdir()  # unreadable as a file even for root (chmod 000 is not, and tests may run as root)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_zero_bytes, "is empty (0 bytes)"),
        (_not_sqlite, "is not an SQLite database"),
        (_random_pages, "is damaged"),
        (_random_cells_page, "is damaged (PRAGMA quick_check"),
        (_a_directory, "cannot be read"),
    ],
)
def test_damaged_database_is_refused_then_moved_aside_on_reset(
        tmp_path: Path, damage, reason: str) -> None:
    ids = _history(tmp_path)
    images = sorted((tmp_path / "slides").rglob("*.jpg"))
    assert images
    db = tmp_path / DB_NAME
    damage(db)
    before = db.read_bytes() if db.is_file() else None

    with pytest.raises(DatabaseDamagedError) as e:
        Store(tmp_path)
    msg = str(e.value)
    assert reason in msg and "--reset" in msg and "Restore a backup" in msg
    assert "edge-wbc-" in msg  # names the newest backup to restore
    # Refusing changed nothing: same bytes, no new history started next to it.
    if before is not None:
        assert db.read_bytes() == before
    assert not Path(f"{db}-wal").exists()
    # ... and left the folder unlocked for the way out.
    store = Store(tmp_path, reset=True)
    try:
        aside = sorted(tmp_path.glob("edge-wbc-damaged-*.sqlite3"))
        assert len(aside) == 1
        if before is not None:
            assert aside[0].read_bytes() == before  # moved, never deleted or rewritten
        assert store.slides() == []  # a new, empty, working database
        s = SlideSession(store)
        s.add_field(_rgb(5), _field(["monocyte"]))
        assert s.state()["counted"] == 1
    finally:
        store.close()
    assert all(p.is_file() for p in images)  # the old slides' images stay where they were
    assert ids  # the old slides are in the aside copy and the backups, not in the new database


def test_reset_refuses_a_healthy_database(tmp_path: Path) -> None:
    _history(tmp_path, slides=1)
    db = tmp_path / DB_NAME
    with pytest.raises(StoreError, match="passes its check, so nothing was moved"):
        Store(tmp_path, reset=True)
    assert db.is_file() and not list(tmp_path.glob("edge-wbc-damaged-*"))
    store = Store(tmp_path)
    assert len(store.slides()) == 1
    store.close()
    Store(tmp_path / "new", reset=True).close()  # a first start has nothing to refuse


def test_station_command_refuses_damaged_database_with_the_way_out(tmp_path: Path) -> None:
    _history(tmp_path, slides=1)
    (tmp_path / DB_NAME).write_bytes(b"")
    args = ("--models", str(FIXTURE_MODELS), "--source", f"folder:{SAMPLES}", "--data-dir",
            str(tmp_path), "--port", str(_free_port()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_WBC_")}
    r = subprocess.run([sys.executable, "-c", "from edge_wbc.cli import app; app()", "station",
                        *args], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is empty (0 bytes)" in r.stderr and "edge-wbc station --reset" in r.stderr
    assert (tmp_path / DB_NAME).stat().st_size == 0


def test_existing_database_gains_the_captures_table_in_place(tmp_path: Path) -> None:
    ids = _history(tmp_path, slides=1)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("DROP TABLE captures")  # as a database from before the table existed
    store = Store(tmp_path)
    try:
        assert [s["id"] for s in store.slides()] == ids
        assert store.captures() == []
        assert store.capture_accepted(ids[0], "api", "x", "2026-01-01T00:00:00Z") == 1
    finally:
        store.close()


# --------------------------------------------------------------------------- backups


def test_backups_at_finalise_are_bounded_and_restore(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = _history(data, slides=3, backups_keep=2)
    backups = sorted((data / "backups").glob("edge-wbc-*.sqlite3"))
    assert len(backups) == 2  # three finalised slides, the oldest backup dropped
    assert not list((data / "backups").glob("*.tmp"))
    for b in backups:
        with sqlite3.connect(b) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with sqlite3.connect(backups[-1]) as conn:
        finalised = [r[0] for r in conn.execute(
            "SELECT id FROM slides WHERE status='finalised' ORDER BY created_at")]
    assert finalised == ids

    # The restore docs/pi.md describes: damaged file aside, newest backup in its place.
    (data / DB_NAME).write_bytes(b"\0" * 4096)
    with pytest.raises(DatabaseDamagedError, match=backups[-1].name):
        Store(data)
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{data / DB_NAME}{suffix}")
        if p.exists():
            p.rename(tmp_path / f"broken{suffix}")
    (data / DB_NAME).write_bytes(backups[-1].read_bytes())
    store = Store(data)
    try:
        assert sorted(s["id"] for s in store.slides()) == sorted(ids)
        assert all(len(store.cells(i)) == 2 for i in ids)
    finally:
        store.close()


def test_backup_never_fails_a_finalise_nor_drops_good_backups(tmp_path: Path) -> None:
    _history(tmp_path, slides=2, backups_keep=2)
    good = sorted((tmp_path / "backups").glob("edge-wbc-*.sqlite3"))
    store = Store(tmp_path, backups_keep=2)
    s = SlideSession(store, default_target=1)
    s.new_slide("H-late")
    s.add_field(_rgb(4), _field(["eosinophil"]))
    # Room for the count's margin but not for a copy of the database on top of it.
    store.min_free_bytes = store.free_bytes() - (store.db_path.stat().st_size // 2)
    state = s.finalise()
    assert state["finalised"]
    store.wait_for_backup()
    assert store.last_backup is not None and store.last_backup["ok"] is False
    assert sorted((tmp_path / "backups").glob("edge-wbc-*.sqlite3")) == good
    store.close()


def test_backup_while_counting_is_a_consistent_snapshot(tmp_path: Path) -> None:
    store = Store(tmp_path, backups_keep=3)
    s = SlideSession(store, default_target=500)
    s.add_field(_rgb(0), _field(["neutrophil", "lymphocyte"]))
    done = threading.Event()

    def count() -> None:
        for i in range(1, 12):
            s.add_field(_rgb(i), _field(["neutrophil", "lymphocyte", "monocyte"]))
        done.set()

    t = threading.Thread(target=count)
    t.start()
    paths = []
    while not done.is_set():
        p = store.backup()
        assert p is not None, store.last_backup
        paths.append(p)
    t.join()
    store.close()
    for p in paths[-3:]:
        with sqlite3.connect(p) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            # Every field in the copy has all of its cells: no torn transaction.
            for fid, n in conn.execute("SELECT id, n_cells FROM fields"):
                assert conn.execute("SELECT COUNT(*) FROM cells WHERE field_id=?",
                                    (fid,)).fetchone()[0] == n


def test_a_backup_cut_short_is_cleared_and_never_counted(tmp_path: Path) -> None:
    store = Store(tmp_path, backups_keep=1)
    store.backup_dir.mkdir()
    cut = store.backup_dir / "edge-wbc-20260101T000000000000Z.tmp"
    cut.write_bytes(b"SQLite format 3\x00" + b"\0" * 100)  # a kill in the middle of a copy
    assert store.backups() == []
    made = store.backup()
    store.close()
    assert made is not None and store.backups() == [made] and not cut.exists()


def test_no_backups_when_turned_off(tmp_path: Path) -> None:
    _history(tmp_path, slides=1, backups_keep=0)
    assert not (tmp_path / "backups").exists()


# --------------------------------------------------------------------------- 6. review time


def test_every_review_event_carries_its_own_time(tmp_path: Path) -> None:
    store = Store(tmp_path)
    s = SlideSession(store)
    s.add_field(_rgb(0), _field(["neutrophil"]))
    cid = next(iter(s.cells))
    created = s.cells[cid]["created_at"]
    for label in ("lymphocyte", None, "rejected", None):
        time.sleep(0.003)  # the event times have millisecond resolution
        s.review(cid, label, "unusable" if label == "rejected" else None)
    reviews = [e for e in store.events(s.slide["id"])
               if e["kind"] == "cell" and e["action"] != "counted"]
    ats = [e["payload"]["at"] for e in reviews]
    assert [e["action"] for e in reviews] == ["reclassified", "restored", "rejected", "restored"]
    assert created not in ats
    assert len(set(ats)) == 4 and ats == sorted(ats)  # distinct de-duplication keys, in order
    assert [e["at"] for e in reviews] == ats  # the audit trail's column too
    store.close()


# --------------------------------------------------------------------------- 7. queued at a kill


_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from station_fakes import FakeAnalyzer, RunningStation
    rs = RunningStation({data!r}, "folder:{samples}", analyzer=FakeAnalyzer(delay_s={delay}))
    print(rs.url, flush=True)
    time.sleep(120)
    """
)


def test_captures_queued_at_a_kill_are_named_after_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    code = _CHILD.format(tests=str(ROOT / "tests"), data=str(data), samples=SAMPLES, delay=1.5)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = child.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("http://"), child.stderr.read()  # type: ignore[union-attr]
        port = int(url.rsplit(":", 1)[1])
        status, first = api(port, "/api/capture", {})
        assert status == 202
        deadline = time.monotonic() + 30
        while api(port, "/api/state")[1]["fields"] < 1:  # the first one is counted...
            assert time.monotonic() < deadline
            time.sleep(0.05)
        accepted = []
        for _ in range(3):  # ...these three are accepted, then the process dies under them
            status, body = api(port, "/api/capture", {})
            assert status == 202, body
            accepted.append(body["capture_id"])
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
        child.wait(10)

    caplog.set_level(logging.WARNING, logger="edge_wbc.station.app")
    rs = RunningStation(data, f"folder:{SAMPLES}")
    try:
        st = api(rs.server.port, "/api/state")[1]
        assert st["fields"] == 1  # what was counted is still counted
        err = st["station"]["last_error"]
        assert err["kind"] == "interrupted"
        assert "3 captures accepted before the station stopped were not analysed" in err["message"]
        for cid in accepted:
            assert f"{cid} at " in err["message"]
        assert f"{first['capture_id']} at " not in err["message"]
        assert [c["id"] for c in st["station"]["interrupted_captures"]] == accepted
        assert any("were not analysed" in r.getMessage() for r in caplog.records)
        # A field going through does not hide it; only the technician's "clear" does.
        assert api(rs.server.port, "/api/capture", {})[0] == 202
        rs.wait_idle()
        assert rs.station.status()["last_error"]["kind"] == "interrupted"
        api(rs.server.port, "/api/errors/clear", {})
        assert rs.station.status()["interrupted_captures"] == []
        rows = {c["id"]: c["status"] for c in rs.store.captures()}
        assert rows[first["capture_id"]] == "counted"
        assert [rows[c] for c in accepted] == ["interrupted"] * 3
    finally:
        rs.close()
    # Reported once: the next start has nothing to say.
    rs = RunningStation(data, f"folder:{SAMPLES}")
    try:
        assert rs.station.status()["last_error"] is None
    finally:
        rs.close()
