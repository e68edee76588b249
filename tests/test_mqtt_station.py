"""MQTT through the real slide session and store (contract 3 events, contract 4 outbox)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mqtt_support import Collector, Mosquitto, settings, wait_for

from edge_wbc import outbox
from edge_wbc.mqtt import MqttPublisher
from edge_wbc.results import CLASSES, Cell, FieldResult

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]
T = "edge-wbc/bench-1"
STATE_KEYS = ("counted", "target", "complete", "counts", "percentages", "ci95", "unidentified")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def _field(seed: int, n_cells: int) -> tuple[np.ndarray, FieldResult]:
    # Independent noise per field: the duplicate-field guard must not see an overlap.
    rgb = np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    cells = []
    for i in range(n_cells):
        label = CLASSES[(seed + i) % len(CLASSES)]
        x = 10 + 60 * i
        cells.append(Cell(bbox=(x, 20, x + 40, 60), label=label, score=0.9,
                          probs={c: (0.9 if c == label else 0.025) for c in CLASSES},
                          area_px=1200))
    return rgb, FieldResult(path=f"field{seed}.png", width=320, height=240, cells=cells,
                            timing_ms={"total": 55.0})


def _sub(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in STATE_KEYS}


def test_session_events_reach_the_broker_through_the_store_outbox(
        broker: Mosquitto, tmp_path: Path) -> None:
    from edge_wbc.events import Fanout
    from edge_wbc.session import SlideSession
    from edge_wbc.store import Store

    store = Store(tmp_path / "data", mqtt=True)
    fan = Fanout()
    holder: dict[str, SlideSession] = {}
    pub = MqttPublisher(settings(broker.port, "bench-1"), store.db_path,
                        state_provider=lambda: holder["session"].state())
    # Subscribed before the session exists: an empty Fanout is falsy (it has __len__), and the
    # session keeps ``publish or no-op``.
    fan.subscribe(pub.publish)
    session = holder["session"] = SlideSession(store, fan, default_target=10,
                                               station_id="bench-1")
    col = Collector(broker.port, "edge-wbc/#", client_id="central", persistent=True)
    col.wait_subscribed()
    pub.start()
    try:
        wait_for(lambda: pub.connected, 10, "connected")
        for seed in range(2):
            session.add_field(*_field(seed, 3))
        broker.stop()  # the third field is counted while the broker is away
        wait_for(lambda: not pub.connected, 10, "outage noticed")
        session.add_field(*_field(7, 4))
        assert outbox.depth(store.conn) >= 5  # its 4 cells + field summary wait on disk
        broker.start()
        counted = [c["id"] for c in store.cells(session.slide["id"])]
        assert len(counted) == 10
        wait_for(lambda: {m.json()["cell_id"] for m in col.on(f"{T}/cell")} >= set(counted),
                 20, "every counted cell id at the subscriber")
        target = counted[0]
        session.review(target, "monocyte" if session.cells[target]["label"] != "monocyte"
                       else "neutrophil")
        wait_for(lambda: any(m.json()["action"] == "reclassified" for m in col.on(f"{T}/cell")),
                 10, "reclassified event")
        wait_for(lambda: outbox.depth(store.conn) == 0, 10, "outbox drained")
        wait_for(lambda: (m := col.last(f"{T}/differential")) is not None
                 and _sub(m.json()) == _sub(session.state()), 10,
                 "retained differential == session state")
        diff = col.last(f"{T}/differential").json()  # type: ignore[union-attr]
        assert diff["sample_id"] == session.slide["sample_id"]
        assert diff["slide_id"] == session.slide["id"] and diff["station"] == "bench-1"
        session.finalise()
        wait_for(lambda: any(m.json()["action"] == "finalised" for m in col.on(f"{T}/slide")),
                 10, "final report on the slide topic")
        final = next(m.json() for m in col.on(f"{T}/slide") if m.json()["action"] == "finalised")
        assert final["report"]["counted"] == 10
        fields = [m.json() for m in col.on(f"{T}/field")]
        # At-least-once: a message in flight when the broker died may arrive twice, with the
        # same event_id, which is what consumers de-duplicate on.
        assert len({f["event_id"] for f in fields}) == 3
        assert pub.stats_payload(store.conn)["latency_ms"]["last"] == 55.0
    finally:
        pub.stop()
        col.close()
        store.close()
