#!/usr/bin/env python3
"""Capture-to-updated-display latency of the station (target: median <= 300 ms).

Starts the real station (``edge_wbc.station.command.run``: real FieldAnalyzer, store, server) on
the bundled fields in a temporary data directory, then captures N fields and measures:

* ``trigger -> counted``  inside the station (frame grab, queue, analysis, store commit);
* ``POST -> field event -> field data``  as a page sees it over HTTP: the capture request, the
  pushed ``field`` event, then the field's JSON and image fetched (what the page draws);
* ``click -> field drawn``  in headless Chromium (when Playwright and /usr/bin/chromium exist):
  from the click on Capture to the new field image's ``load`` in the page.

    .venv/bin/python scripts/bench_station.py [--models models] [--captures 30] [--no-browser]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read() or b"null")
    c.close()
    return r.status, data


def get(port: int, path: str) -> bytes:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status} {data[:200]!r}")
    return data


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def http_round(port: int, n: int) -> tuple[list[float], list[float]]:
    """POST capture, wait for the field event on SSE, fetch field JSON + image."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/api/events")
    resp = conn.getresponse()
    fp = resp.fp

    def next_event() -> tuple[str, dict]:
        kind = ""
        while True:
            line = fp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                return kind, json.loads(line[6:])

    next_event()  # hello
    to_display, counted = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = post(port, "/api/capture", {"trigger": "bench"})
        if status != 202:
            raise RuntimeError(f"capture refused: {body}")
        while True:
            kind, ev = next_event()
            if kind == "field":
                break
        f = json.loads(get(port, "/api/fields/last"))
        get(port, f"/api/fields/{f['id']}.jpg")
        to_display.append((time.perf_counter() - t0) * 1000)
        counted.append(float(ev.get("latency_ms", float("nan"))))
        # Let the page-side fetches of other listeners settle; captures are seconds apart in use.
        time.sleep(0.05)
    conn.close()
    return to_display, counted


def _chromium() -> str:
    return os.environ.get("EDGE_WBC_CHROMIUM", "/usr/bin/chromium")


def browser_missing() -> str | None:
    """Why the browser round cannot run here (None: it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "skipped: playwright not installed"
    chromium = _chromium()
    if not (Path(chromium).is_file() or shutil.which(chromium)):
        return f"skipped: no Chromium at {chromium}"
    return None


def captures_problem(source: str, captures: int, browser: bool) -> str | None:
    """Why this run cannot take ``captures`` fields per round from ``source`` (None: it can).

    The station replays a folder once per slide (loop=False: going round again would count a
    field twice), so the run must fit in it: one warm-up capture, then ``captures`` in the
    HTTP round and as many again in the browser round. Checked before the station starts, not
    found as a refused capture minutes into the run. (Replaying with loop=True instead would
    need a station that loops, which the real one never does: the bench times the station as
    it runs.)
    """
    if captures < 1:
        return f"--captures {captures}: give at least 1"
    from edge_wbc.camera import CameraError, parse_source

    try:
        kind, arg = parse_source(source)
        if kind != "folder":
            return None  # a live camera has no end
        from edge_wbc.camera.folder import FolderSource

        n_fields = len(FolderSource(arg, loop=False).files)
    except CameraError as e:
        return f"--source: {e}"
    rounds = 2 if browser else 1
    needed = 1 + rounds * captures
    if needed <= n_fields:
        return None
    most = (n_fields - 1) // rounds
    what = "1 warm-up + {0} (HTTP) + {0} (browser)" if browser else "1 warm-up + {0} (HTTP)"
    return (
        f"--captures {captures}: this run would take {what.format(captures)} = {needed} "
        f"fields, but the station replays the {n_fields} fields of {arg} once per slide; give "
        f"--captures {most} or fewer" + (", or --no-browser" if browser else "")
        + ", or a --source folder with more fields"
    )


def browser_round(port: int, n: int) -> list[float] | str:
    missing = browser_missing()
    if missing is not None:
        return missing
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    out = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = b.new_page(viewport={"width": 800, "height": 480})
        pg.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        pg.wait_for_function("() => window.__counted !== undefined")
        for _ in range(n):
            pg.evaluate("() => { window.__fieldRenderedAt = 0; }")
            t = pg.evaluate("() => { const t = performance.now();"
                            " document.getElementById('capture').click(); return t; }")
            pg.wait_for_function("() => window.__fieldRenderedAt > 0", timeout=30000)
            done = pg.evaluate("() => window.__fieldRenderedAt")
            out.append(done - t)
            pg.wait_for_function("() => !document.getElementById('capture').classList"
                                 ".contains('busy')", timeout=30000)
            time.sleep(0.05)
        b.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--captures", type=int, default=30)
    ap.add_argument("--source", default=f"folder:{ROOT / 'samples' / 'fields'}")
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args(argv)
    if not (Path(args.models) / "manifest.json").is_file():
        print(f"no models at {args.models} (manifest.json missing): give --models DIR",
              file=sys.stderr)
        return 2
    problem = captures_problem(args.source, args.captures,
                               browser=not args.no_browser and browser_missing() is None)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    from edge_wbc.config import load_config
    from edge_wbc.logs import setup_logging
    from edge_wbc.station.command import run

    setup_logging("WARNING")
    data = tempfile.mkdtemp(prefix="edge-wbc-bench-")
    port = free_port()
    cfg = load_config(None, env={}).replace(
        models_dir=args.models, session_data_dir=data, station_port=port,
        camera_source=args.source, session_target=10000, station_queue_max=100,
    )
    stop = threading.Event()
    t = threading.Thread(target=run, args=(cfg, stop), daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            get(port, "/healthz")
            break
        except (OSError, RuntimeError):
            if time.monotonic() > deadline or not t.is_alive():
                print("station did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
    try:
        post(port, "/api/capture", {})  # warm-up: first inference allocates
        time.sleep(1.0)
        disp, counted = http_round(port, args.captures)
        br = [] if args.no_browser else browser_round(port, args.captures)
        state = json.loads(get(port, "/api/state"))
    finally:
        stop.set()
        t.join(30)
        shutil.rmtree(data, ignore_errors=True)

    models = state.get("models") or {}
    print(f"edge-wbc station latency, {args.captures} captures of bundled fields; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, models {args.models} "
          f"({models.get('accelerator', '?')}, {models.get('threads', '?')} threads, "
          f"{models.get('runtime', '?')})")
    print(f"{'measure':38s} {'median':>8s} {'p90':>8s} {'max':>8s}")
    rows = [("trigger -> counted (in station)", counted),
            ("POST -> field event -> field+image", disp)]
    if isinstance(br, list) and br:
        rows.append(("click -> field drawn (Chromium)", br))
    for name, xs in rows:
        xs = [x for x in xs if x == x]
        print(f"{name:38s} {statistics.median(xs):7.1f}ms {pct(xs, 0.9):7.1f}ms "
              f"{max(xs):7.1f}ms")
    if isinstance(br, str):
        print(f"{'click -> field drawn (Chromium)':38s} {br}")
    worst = statistics.median(rows[-1][1])
    print(f"target: median capture -> updated display <= 300 ms: "
          f"{'met' if worst <= 300 else 'NOT met'} ({worst:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
