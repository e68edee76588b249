"""The durable outbox: same-transaction enqueue, order, ack, and the bounding policy."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from edge_wbc.counting import outbox


def _db(tmp_path: Path, max_rows: int | None = None) -> sqlite3.Connection:
    conn = outbox.connect(str(tmp_path / "station.sqlite3"))
    outbox.ensure_schema(conn, max_rows=max_rows)
    return conn


def test_enqueue_peek_ack_roundtrip_keeps_order_and_adds_envelope(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    with conn:
        a = outbox.enqueue(conn, "cell", {"cell_id": "c1", "slide_id": "s1", "action": "counted"})
        b = outbox.enqueue(conn, "field", {"slide_id": "s1", "n_cells": 3})
    assert a is not None and b is not None and a < b
    rows = outbox.peek(conn, 10)
    assert [r.topic_suffix for r in rows] == ["cell", "field"]
    first = rows[0].payload
    assert first["schema"] == outbox.MQTT_SCHEMA
    assert first["cell_id"] == "c1" and first["ts"].endswith("Z") and len(first["event_id"]) == 32
    assert rows[0].qos == 1 and rows[0].retain is False
    assert outbox.depth(conn) == 2
    assert [r.id for r in outbox.peek(conn, 10, after_id=a)] == [b]
    outbox.ack(conn, a)
    assert outbox.depth(conn) == 1 and [r.id for r in outbox.peek(conn, 10)] == [b]


def test_rollback_of_the_store_transaction_removes_the_event_too(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    conn.execute("CREATE TABLE cells (id TEXT PRIMARY KEY)")
    with pytest.raises(sqlite3.IntegrityError), conn:
        conn.execute("INSERT INTO cells VALUES ('c1')")
        outbox.enqueue(conn, "cell", {"cell_id": "c1"})
        conn.execute("INSERT INTO cells VALUES ('c1')")  # fails: whole transaction rolls back
    assert outbox.depth(conn) == 0 and outbox.peek(conn, 10) == []


def test_second_connection_sees_commits_and_depth_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "station.sqlite3")
    writer = _db(tmp_path)
    reader = outbox.connect(path)
    with writer:
        for i in range(5):
            outbox.enqueue(writer, "cell", {"cell_id": f"c{i}"})
    rows = outbox.peek(reader, 3)
    outbox.ack_many(reader, [r.id for r in rows])
    assert outbox.depth(writer) == 2
    writer.close()
    reader.close()
    again = outbox.connect(path)
    outbox.ensure_schema(again)  # idempotent, keeps rows and counters
    assert outbox.depth(again) == 2
    assert [r.payload["cell_id"] for r in outbox.peek(again, 10)] == ["c3", "c4"]


def test_concurrent_writer_and_drainer_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "station.sqlite3")
    writer = _db(tmp_path)
    drained: list[str] = []
    done = threading.Event()

    def drain() -> None:
        conn = outbox.connect(path)
        last = 0
        while not done.is_set() or outbox.depth(conn):
            rows = outbox.peek(conn, 7, after_id=last)
            for r in rows:
                drained.append(r.payload["cell_id"])
                last = r.id
            outbox.ack_many(conn, [r.id for r in rows])
        conn.close()

    t = threading.Thread(target=drain)
    t.start()
    for i in range(300):
        with writer:
            outbox.enqueue(writer, "cell", {"cell_id": f"c{i:03d}"})
    done.set()
    t.join(30)
    assert not t.is_alive()
    assert drained == [f"c{i:03d}" for i in range(300)]
    assert outbox.depth(writer) == 0


def test_bad_inputs_are_clear_errors_and_queue_nothing(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    with pytest.raises(outbox.OutboxError, match="not JSON"):
        outbox.enqueue(conn, "cell", {"x": object()})
    with pytest.raises(outbox.OutboxError, match="not JSON"):
        outbox.enqueue(conn, "cell", {"x": float("nan")})
    with pytest.raises(outbox.OutboxError, match="topic level"):
        outbox.enqueue(conn, "cell/#", {})
    with pytest.raises(outbox.OutboxError, match="non-empty"):
        outbox.enqueue(conn, "", {})
    with pytest.raises(outbox.OutboxError, match="dict"):
        outbox.enqueue(conn, "cell", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(outbox.OutboxError, match="qos"):
        outbox.enqueue(conn, "cell", {}, qos=3)
    with pytest.raises(outbox.OutboxError, match=">= 1"):
        outbox.ensure_schema(conn, max_rows=0)
    assert outbox.depth(conn) == 0


def test_corrupt_row_is_skipped_not_fatal(tmp_path: Path) -> None:
    conn = _db(tmp_path)
    with conn:
        outbox.enqueue(conn, "cell", {"cell_id": "ok1"})
        conn.execute("INSERT INTO outbox(topic_suffix, payload, created_at) VALUES "
                     "('cell', '{broken', 0)")
        outbox.enqueue(conn, "cell", {"cell_id": "ok2"})
    assert [r.payload["cell_id"] for r in outbox.peek(conn, 10)] == ["ok1", "ok2"]
    assert outbox.depth(conn) == 2


def test_full_outbox_sheds_field_summaries_first_and_keeps_every_cell(tmp_path: Path) -> None:
    conn = _db(tmp_path, max_rows=4)
    with conn:
        outbox.enqueue(conn, "field", {"slide_id": "s1", "n": 1})
        outbox.enqueue(conn, "cell", {"slide_id": "s1", "cell_id": "a", "action": "counted"})
        outbox.enqueue(conn, "field", {"slide_id": "s1", "n": 2})
        outbox.enqueue(conn, "cell", {"slide_id": "s1", "cell_id": "b", "action": "counted"})
    st = outbox.status(conn)
    assert st.full and st.depth == 4 and "outbox full" in (st.warning or "")

    with conn:  # full: the oldest field summary makes room
        assert outbox.enqueue(conn, "cell", {"slide_id": "s1", "cell_id": "c"}) is not None
    kinds = [(r.topic_suffix, r.payload.get("cell_id") or r.payload.get("n"))
             for r in outbox.peek(conn, 10)]
    assert kinds == [("cell", "a"), ("field", 2), ("cell", "b"), ("cell", "c")]
    with conn:
        outbox.enqueue(conn, "cell", {"slide_id": "s1", "cell_id": "d"})
    assert [r.topic_suffix for r in outbox.peek(conn, 10)] == ["cell"] * 4
    assert outbox.status(conn).dropped_field == 2

    with conn:  # no field rows left: a new field summary is refused, a cell is still kept
        assert outbox.enqueue(conn, "field", {"slide_id": "s1", "n": 3}) is None
        assert outbox.enqueue(conn, "cell", {"slide_id": "s1", "cell_id": "e"}) is not None
    st = outbox.status(conn)
    assert st.refused_field == 1 and st.over_limit and st.depth == 5
    assert "kept above the limit" in (st.warning or "")
    cells = [r.payload["cell_id"] for r in outbox.peek(conn, 10)]
    assert cells == ["a", "b", "c", "d", "e"]


def test_queued_final_report_supersedes_that_slides_cell_events(tmp_path: Path) -> None:
    conn = _db(tmp_path, max_rows=3)
    with conn:
        outbox.enqueue(conn, "cell", {"slide_id": "s1", "cell_id": "a", "action": "counted"})
        outbox.enqueue(conn, "cell", {"slide_id": "s1", "cell_id": "b", "action": "counted"})
        outbox.enqueue(conn, "slide", {"slide_id": "s1", "action": "finalised",
                                       "counts": {"neutrophil": 2}})
        outbox.enqueue(conn, "cell", {"slide_id": "s2", "cell_id": "x", "action": "counted"})
    rows = outbox.peek(conn, 10)
    assert [(r.topic_suffix, r.payload.get("cell_id")) for r in rows] == [
        ("cell", "b"), ("slide", None), ("cell", "x")]
    st = outbox.status(conn)
    assert st.dropped_cell == 1 and not st.over_limit
    # The open slide's cells are never the ones shed.
    with conn:
        outbox.enqueue(conn, "cell", {"slide_id": "s2", "cell_id": "y", "action": "counted"})
        outbox.enqueue(conn, "cell", {"slide_id": "s2", "cell_id": "z", "action": "counted"})
    ids = [r.payload.get("cell_id") for r in outbox.peek(conn, 10)]
    assert ids == [None, "x", "y", "z"]


def test_limit_can_be_raised_and_over_limit_cleared(tmp_path: Path) -> None:
    conn = _db(tmp_path, max_rows=1)
    with conn:
        outbox.enqueue(conn, "cell", {"cell_id": "a"})
        outbox.enqueue(conn, "cell", {"cell_id": "b"})
    assert outbox.status(conn).over_limit
    outbox.ensure_schema(conn, max_rows=10)
    outbox.clear_over_limit(conn)
    st = outbox.status(conn)
    assert st.max_rows == 10 and not st.full and st.warning is None
    assert st.to_json()["depth"] == 2
