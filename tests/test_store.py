"""SQLite store: persistence, resume after SIGKILL, full disk, unusable data dir, outbox in the
same transaction."""

from __future__ import annotations

import errno
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from station_fakes import FakeAnalyzer, fake_cell

from edge_wbc.counting.session import SlideSession
from edge_wbc.counting.store import DiskFullError, Store, StoreError
from edge_wbc.pipeline.results import FieldResult

ROOT = Path(__file__).resolve().parent.parent
FIELDS = sorted((ROOT / "samples" / "fields").glob("*.jpg"))


def _rgb(i: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(FIELDS[i])), cv2.COLOR_BGR2RGB)


def _field(labels: list[str]) -> FieldResult:
    cells = [fake_cell((20 + 110 * i, 20, 120 + 110 * i, 120), lab) for i, lab in enumerate(labels)]
    return FieldResult(path="f.jpg", width=640, height=480, cells=cells)


def _comparable(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "updated_at"}


def test_reopen_restores_slide_counts_and_reviews(tmp_path: Path) -> None:
    store = Store(tmp_path)
    s = SlideSession(store, default_target=50)
    s.set_sample_id("H-0042")
    s.add_field(_rgb(0), _field(["neutrophil", "lymphocyte"]))
    s.add_field(_rgb(1), _field(["monocyte", "unidentified"]))
    ids = list(s.cells)
    s.review(ids[1], "neutrophil")
    s.review(ids[3], "rejected", "counted_twice")
    before = _comparable(s.state())
    store.close()

    store2 = Store(tmp_path)
    s2 = SlideSession(store2, default_target=50)
    assert _comparable(s2.state()) == before
    assert s2.slide["sample_id"] == "H-0042"
    # Crops and field images are on disk where the rows say.
    for c in store2.cells(s2.slide["id"]):
        assert (tmp_path / c["crop_file"]).is_file()
    assert store2.field_image(f"{s2.slide['id']}-F0001").is_file()
    kinds = [e["kind"] for e in store2.events(s2.slide["id"])]
    assert kinds.count("cell") == 6 and kinds.count("field") == 2 and kinds[0] == "slide"


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {tests!r})
    import cv2
    from station_fakes import FakeAnalyzer
    from edge_wbc.counting.session import SlideSession
    from edge_wbc.counting.store import Store
    files = {files!r}
    store = Store({data!r})
    s = SlideSession(store, default_target=100)
    an = FakeAnalyzer()
    for i, f in enumerate(files):
        rgb = cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB)
        s.add_field(rgb, an.analyze(rgb, f), source=f)
        if i == 2:
            first = list(s.cells)[0]
            s.review(first, "eosinophil")
        # Announce only what is committed: the parent compares against the last line.
        print(json.dumps({{k: v for k, v in s.state().items() if k != "updated_at"}}), flush=True)
        if {stream}:
            continue
    print("IDLE", flush=True)
    time.sleep(60)
    """
)


def _run_child(data: Path, files: list[Path], stream: bool) -> subprocess.Popen:
    code = _CHILD.format(tests=str(ROOT / "tests"), files=[str(f) for f in files],
                         data=str(data), stream=stream)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_sigkill_between_captures_resumes_same_slide(tmp_path: Path) -> None:
    proc = _run_child(tmp_path, FIELDS[:6], stream=False)
    lines = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == "IDLE":
                break
            lines.append(line)
        else:
            pytest.fail("child exited early: " + proc.stderr.read())  # type: ignore[union-attr]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    last = json.loads(lines[-1])
    store = Store(tmp_path)
    s = SlideSession(store, default_target=100)
    assert _comparable(s.state()) == last
    assert s.state()["counts"]["eosinophil"] >= 1  # the review survived
    assert s.state()["fields"] == 6
    # Counting continues on the same slide with the next field number.
    an = FakeAnalyzer()
    f = s.add_field(_rgb(10), an.analyze(_rgb(10)))
    assert f["seq"] == 7 and s.slide["id"] == last["slide"]["slide_id"]


def test_sigkill_while_capturing_leaves_consistent_database(tmp_path: Path) -> None:
    proc = _run_child(tmp_path, FIELDS[:40], stream=True)
    lines = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if len(lines) == 8:
                time.sleep(0.05)  # kill somewhere inside the next field's work
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail("child exited early: " + proc.stderr.read())  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait(10)
    last = json.loads(lines[-1])
    store = Store(tmp_path)
    s = SlideSession(store, default_target=100)
    st = s.state()
    # Nothing announced as counted is lost; at most the fields after it were added.
    assert st["slide"]["slide_id"] == last["slide"]["slide_id"]
    assert st["fields"] >= last["fields"] and st["counted"] >= last["counted"]
    # Each field is all-or-nothing: its n_cells matches its cell rows.
    conn = sqlite3.connect(tmp_path / "edge-wbc.sqlite3")
    for fid, n in conn.execute("SELECT id, n_cells FROM fields"):
        rows = conn.execute("SELECT COUNT(*) FROM cells WHERE field_id=?", (fid,)).fetchone()[0]
        assert rows == n
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_low_free_space_refuses_field_and_keeps_counts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    s = SlideSession(store)
    s.add_field(_rgb(0), _field(["neutrophil"]))
    store.min_free_bytes = 1 << 62  # more than any disk has
    with pytest.raises(DiskFullError, match="not counted"):
        s.add_field(_rgb(1), _field(["lymphocyte"]))
    assert s.state()["counted"] == 1 and s.state()["fields"] == 1
    assert len(list((tmp_path / "slides").rglob("*.jpg"))) == 2  # field 1 + its crop only


def test_database_full_rolls_back_and_removes_images(tmp_path: Path) -> None:
    store = Store(tmp_path)
    s = SlideSession(store)
    s.add_field(_rgb(0), _field(["neutrophil"]))
    before = _comparable(s.state())
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own 'disk is full' path
    with pytest.raises(DiskFullError, match="disk full"):
        for i in range(1, 6):
            s.add_field(_rgb(i), _field(["lymphocyte"] * 4))
    after = _comparable(s.state())
    assert after == before
    n_files = len(list((tmp_path / "slides").rglob("*.jpg")))
    n_rows = store.conn.execute("SELECT COUNT(*) FROM fields").fetchone()[0] + \
        store.conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    assert n_files == n_rows  # no orphan images from the refused field
    store.conn.execute("PRAGMA max_page_count=1073741823")
    s.add_field(_rgb(7), _field(["monocyte"]))  # space back: counting goes on
    assert s.state()["counted"] == before["counted"] + 1


def test_image_write_enospc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    s = SlideSession(store)
    real = Store._write_jpeg
    calls = {"n": 0}

    def failing(self, path, rgb, q):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, rgb, q)

    monkeypatch.setattr(Store, "_write_jpeg", failing)
    with pytest.raises(DiskFullError, match="disk full"):
        s.add_field(_rgb(0), _field(["neutrophil", "lymphocyte"]))
    assert s.state()["counted"] == 0
    assert not list((tmp_path / "slides").rglob("*.jpg"))


def test_unusable_data_dir(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        Store(f / "sub")


def test_schema_mismatch_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "edge-wbc.sqlite3")
    conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema 99"):
        Store(tmp_path)


def test_outbox_rows_written_in_same_transaction(tmp_path: Path) -> None:
    outbox = pytest.importorskip("edge_wbc.counting.outbox")
    store = Store(tmp_path, mqtt=True, outbox_max=1000)
    s = SlideSession(store)
    start = outbox.depth(store.conn)  # the 'slide started' event
    assert start == 1
    s.add_field(_rgb(0), _field(["neutrophil", "lymphocyte"]))
    assert outbox.depth(store.conn) == start + 3  # 2 cells + 1 field
    rows = outbox.peek(store.conn, 10)
    assert [r.topic_suffix for r in rows] == ["slide", "cell", "cell", "field"]
    # A refused field leaves no outbox rows behind.
    store.min_free_bytes = 1 << 62
    with pytest.raises(DiskFullError):
        s.add_field(_rgb(1), _field(["monocyte"]))
    assert outbox.depth(store.conn) == start + 3
    # NaN in a quality metric must not block the count (strict JSON in the outbox).
    store.min_free_bytes = 0
    res = _field(["monocyte"])
    res.quality = {"focus": float("nan"), "flags": []}
    s.add_field(_rgb(2), res)
    assert s.state()["counted"] == 3

