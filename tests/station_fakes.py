"""Test doubles for the station's tests ONLY: a deterministic stand-in for FieldAnalyzer.

The station is built around an injected ``analyze(rgb, path) -> FieldResult`` so that session,
store, API and page can be tested without the models. The shipped command always uses the real
FieldAnalyzer; nothing here is importable from ``edge_wbc``.
"""

from __future__ import annotations

import itertools
import threading
import time

import cv2
import numpy as np

from edge_wbc.pipeline.results import CLASSES, Cell, FieldResult

#: The label sequence the fake "classifier" cycles through: mostly neutrophils and lymphocytes,
#: an unidentified cell now and then so review and finalise blockers are exercised.
LABEL_CYCLE = (
    "neutrophil", "lymphocyte", "neutrophil", "monocyte", "neutrophil", "eosinophil",
    "lymphocyte", "neutrophil", "unidentified", "neutrophil", "basophil", "lymphocyte",
)


def fake_cell(box: tuple[int, int, int, int], label: str, score: float = 0.9) -> Cell:
    probs = dict.fromkeys(CLASSES, (1.0 - score) / 4)
    if label in probs:
        probs[label] = score
    x0, y0, x1, y1 = box
    return Cell(bbox=box, label=label, score=score, probs=probs, area_px=(x1 - x0) * (y1 - y0))


class FakeAnalyzer:
    """Finds the darkest blob of the field (the stained nucleus of the leukocyte in a BCCD
    field) and labels it from LABEL_CYCLE; a second cell on every third field."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self._labels = itertools.cycle(LABEL_CYCLE)
        self._n = 0
        self.delay_s = delay_s
        self.calls = 0
        self.lock = threading.Lock()

    def analyze(self, rgb: np.ndarray, path: str = "") -> FieldResult:
        with self.lock:
            self.calls += 1
            n = self._n
            self._n += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        h, w = rgb.shape[:2]
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        y, x = np.unravel_index(int(np.argmin(cv2.blur(grey, (25, 25)))), grey.shape)
        boxes = [(max(0, x - 50), max(0, y - 50), min(w, x + 50), min(h, y + 50))]
        if n % 3 == 2:
            bx, by = (x + w // 2) % (w - 100), (y + h // 2) % (h - 100)
            boxes.append((bx, by, bx + 90, by + 90))
        cells = []
        for b in boxes:
            with self.lock:
                label = next(self._labels)
            cells.append(fake_cell(b, label, 0.55 if label == "unidentified" else 0.93))
        return FieldResult(path=path, width=w, height=h, cells=cells,
                           quality={"flags": []}, timing_ms={"total": 1.0})


class HeldAnalyzer(FakeAnalyzer):
    """While ``hold``, each analysis waits for ``release`` (``entered`` says it began): a field
    caught mid-analysis."""

    def __init__(self, hold: bool = True) -> None:
        super().__init__()
        self.hold = hold
        self.entered, self.release = threading.Event(), threading.Event()

    def analyze(self, rgb: np.ndarray, path: str = "") -> FieldResult:
        if self.hold:
            self.entered.set()
            assert self.release.wait(10)
        return super().analyze(rgb, path)


class RunningStation:
    """A station wired exactly as ``edge-wbc station`` wires it, but with an injected analyzer
    (tests only), on a free loopback port, in this process."""

    def __init__(self, data_dir, source: str = "folder:samples/fields", *, analyzer=None,
                 target: int = 100, queue_max: int = 4, token: str | None = None,
                 host: str = "127.0.0.1", preview_fps: float = 5.0, formula=None,
                 mqtt: bool = False) -> None:
        from functools import partial

        from edge_wbc.camera import open_source
        from edge_wbc.counting.events import Fanout
        from edge_wbc.counting.reports import write_reports
        from edge_wbc.counting.session import SlideSession
        from edge_wbc.counting.store import Store
        from edge_wbc.station.app import Station
        from edge_wbc.station.server import EventHub, StationServer, serve_in_thread

        self.analyzer = analyzer or FakeAnalyzer()
        self.store = Store(data_dir, mqtt=mqtt)
        self.fanout = Fanout()
        self.hub = EventHub()
        self.fanout.subscribe(self.hub)
        self.events: list = []
        self.fanout.subscribe(self.events.append)
        describe = getattr(self.analyzer, "describe", None)
        models = describe() if describe else {"manifest": "test", "models": [
            {"name": "fake-analyzer", "file": "-", "sha256": "0" * 64, "task": "segmentation"}]}
        self.session = SlideSession(self.store, self.fanout, default_target=target, models=models,
                                    station_id="test-station",
                                    reporter=partial(write_reports, data_dir=self.store.data_dir),
                                    formula=formula)
        self.source = open_source(source)
        self.station = Station(self.source, self.analyzer.analyze, self.session, self.fanout,
                               queue_max=queue_max, info={"accelerator": "cpu"})
        self.server = StationServer(self.station, self.hub, host, 0, token, preview_fps)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.station.start()
        serve_in_thread(self.server)

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.station.status()
            if not s["busy"] and s["queue"] == 0:
                return
            time.sleep(0.01)
        raise TimeoutError("station still busy")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.station.stop()
        self.store.close()
