"""`edge-wbc station` as a process with the real FieldAnalyzer: on the small hand-weighted fixture
models always, and on the shipped models (the README's demo: bundled fields to 100 cells) when
models/manifest.json exists. Also kill -9 and restart, clean SIGTERM, and start-up errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mqtt_support import http_json as api

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "fields"
FIXTURE_MODELS = ROOT / "tests" / "fixtures" / "models"
SHIPPED = ROOT / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        e = {**os.environ, **(env or {})}
        e.pop("EDGE_WBC_CONFIG", None)
        self.p = subprocess.Popen(
            [sys.executable, "-c", "from edge_wbc.cli import app; app()", "station", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e,
        )

    def wait_url(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                if self.p.poll() is not None:
                    raise AssertionError("station exited: " + self.p.stderr.read())  # type: ignore[union-attr]
                continue
            m = re.search(r"open (http://\S+)", line)
            if m:
                return m.group(1)
        raise AssertionError("station did not print its URL")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)


def wait_fields(port: int, n: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, s = api(port, "/api/state")
        if s["fields"] >= n and not s["station"]["busy"] and s["station"]["queue"] == 0:
            return s
        assert time.monotonic() < deadline, f"only {s['fields']} of {n} fields analysed"
        time.sleep(0.05)


def test_station_with_real_analyzer_survives_sigkill_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    args = ("--models", str(FIXTURE_MODELS), "--source", f"folder:{SAMPLES}", "--data-dir",
            str(tmp_path), "--port", str(port), "--target", "100")
    p = Proc(*args)
    try:
        url = p.wait_url()
        assert url == f"http://127.0.0.1:{port}/"
        for _ in range(5):
            status, body = api(port, "/api/capture", {})
            assert status in (202, 429), body
            if status == 429:
                time.sleep(0.3)
        s1 = wait_fields(port, 4)
        assert s1["station"]["last_error"] is None
        assert s1["models"]["models"][0]["name"] == "seg-dark-a"  # the real analyzer's models
        cells = api(port, "/api/cells")[1]["cells"]
        if cells:
            api(port, f"/api/cells/{cells[0]['id']}/review", {"label": "eosinophil"})
        before = api(port, "/api/state")[1]
        p.p.send_signal(signal.SIGKILL)
        p.p.wait(10)
    finally:
        p.kill()

    p2 = Proc(*args)
    try:
        p2.wait_url()
        after = api(port, "/api/state")[1]
        for k in ("slide_id", "sample_id", "counted", "counts", "fields", "ci95", "reviewed"):
            assert after[k] == before[k], k
        # The replayed folder resumes after the last counted field, not at the first one.
        assert api(port, "/api/capture", {})[0] == 202
        wait_fields(port, before["fields"] + 1)
        last = api(port, "/api/fields/last")[1]
        assert Path(last["source"]).name == sorted(SAMPLES.glob("*.jpg"))[before["fields"]].name
        # Clean stop: SIGTERM finishes and says the count is saved.
        p2.p.send_signal(signal.SIGTERM)
        _, err = p2.p.communicate(timeout=30)
        assert p2.p.returncode == 0, err
        assert "every counted cell is saved" in err
    finally:
        p2.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--models", "/nonexistent/models"), "no manifest.json"),
        (("--source", "usb:3"), "camera source"),
        (("--source", "folder:/nonexistent/fields"), "not a folder"),
        (("--host", "0.0.0.0"), "token"),
    ],
)
def test_startup_errors_are_one_clear_line(tmp_path: Path, args: tuple, message: str) -> None:
    base = {"--models": str(FIXTURE_MODELS), "--data-dir": str(tmp_path),
            "--port": str(free_port()), "--source": f"folder:{SAMPLES}"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    flat = [x for kv in base.items() for x in kv]
    env = {"EDGE_WBC_TOKEN": ""}
    r = subprocess.run([sys.executable, "-c", "from edge_wbc.cli import app; app()", "station",
                        *flat], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, **env})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-c", "from edge_wbc.cli import app; app()", "station", "--models",
             str(FIXTURE_MODELS), "--data-dir", str(tmp_path), "--port", str(port), "--source",
             f"folder:{SAMPLES}"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped models yet")
def test_readme_demo_reaches_100_cells_with_shipped_models(tmp_path: Path) -> None:
    port = free_port()
    p = Proc("--source", f"folder:{SAMPLES}", "--data-dir", str(tmp_path), "--port", str(port),
             "--models", str(SHIPPED))
    try:
        p.wait_url()
        n = 0
        while True:
            s = api(port, "/api/state")[1]
            if s["complete"]:
                break
            status, body = api(port, "/api/capture", {})
            if status == 429:
                time.sleep(0.1)
                continue
            assert status == 202, body
            n += 1
            wait_fields(port, n, timeout=60)
            assert n <= 116, f"bundled fields gave only {s['counted']} cells"
        s = wait_fields(port, n)
        assert s["counted"] >= 100 and s["station"]["last_error"] is None
        assert abs(sum(r["percent"] for r in s["classes"]) - 100) < 0.5
        for r in s["classes"]:
            assert r["ci_low"] <= r["percent"] <= r["ci_high"]
        # Resolve what the classifier left unidentified, then finalise.
        for c in api(port, "/api/cells")[1]["cells"]:
            if c["group"] == "unidentified":
                best = max(("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte"),
                           key=lambda k: c["probs"].get(k, 0))
                assert api(port, f"/api/cells/{c['id']}/review", {"label": best})[0] == 200
        # The default config requires a sample ID on every report ([report] require_sample_id).
        status, body = api(port, "/api/slide/finalise", {})
        assert status == 409 and "sample ID" in body["error"], body
        assert api(port, "/api/slide/sample", {"sample_id": "DEMO-1"})[0] == 200
        status, final = api(port, "/api/slide/finalise", {})
        assert status == 200 and final["finalised"], final
        status, rep = api(port, "/api/slide/report.json")
        assert status == 200 and rep["counted"] == final["counted"]
        assert all(len(m["sha256"]) == 64 for m in rep["models"]["models"])
    finally:
        p.kill()


@pytest.mark.broker
def test_station_publishes_to_mqtt(tmp_path: Path) -> None:
    """The command's MQTT wiring: outbox in the store's transactions, retained differential,
    availability. (The publisher itself is tested in test_mqtt*.py.)"""
    from mqtt_support import MOSQUITTO, Collector, Mosquitto, wait_for

    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path / "broker").start()
    col = Collector(broker.port, "edge-wbc/st-7/#").wait_subscribed()
    port = free_port()
    p = Proc("--models", str(FIXTURE_MODELS), "--source", f"folder:{SAMPLES}", "--data-dir",
             str(tmp_path / "data"), "--port", str(port), "--mqtt-host", "127.0.0.1",
             "--mqtt-port", str(broker.port), "--station-id", "st-7",
             env={"EDGE_WBC_MQTT_COMMANDS_ENABLED": "true"})
    try:
        p.wait_url()
        for _ in range(3):
            assert api(port, "/api/capture", {})[0] == 202
            time.sleep(0.4)
        s = wait_fields(port, 3)
        wait_for(lambda: len(col.on("edge-wbc/st-7/field")) >= 3, 20, "3 field messages")
        cells = {m.json()["cell_id"] for m in col.on("edge-wbc/st-7/cell")}
        assert len(cells) == sum(1 for c in api(port, "/api/cells")[1]["cells"]
                                 if c["status"] == "counted")

        def diff_matches() -> bool:
            d = col.last("edge-wbc/st-7/differential")
            return d is not None and d.json()["counted"] == s["counted"] and \
                d.json()["slide_id"] == s["slide_id"]

        wait_for(diff_matches, 20, "retained differential equal to the station's state")
        assert col.last("edge-wbc/st-7/available").payload == b"online"
        # Commands run the page's actions, with the page's rules (edge_wbc.station.actions).
        col.client.publish("edge-wbc/st-7/slide/set", json.dumps(
            {"action": "target", "target": 250, "request_id": "r1"}), qos=1)
        col.client.publish("edge-wbc/st-7/slide/set", json.dumps(
            {"action": "new", "sample_id": "LAB\u202e-9", "request_id": "r2"}), qos=1)
        wait_for(lambda: len(col.on("edge-wbc/st-7/state")) >= 2, 20, "2 command echoes")
        echoes = {m.json()["request_id"]: m.json() for m in col.on("edge-wbc/st-7/state")}
        assert echoes["r1"]["ok"] and echoes["r1"]["result"]["target"] == 250
        assert api(port, "/api/state")[1]["target"] == 250
        assert not echoes["r2"]["ok"] and "U+202E" in echoes["r2"]["error"]
        p.p.send_signal(signal.SIGTERM)
        p.p.wait(30)
        wait_for(lambda: col.last("edge-wbc/st-7/available").payload == b"stopped", 10,
                 "available = stopped after a clean exit")
    finally:
        p.kill()
        col.close()
        broker.stop()


def _get_text(port: int, path: str) -> tuple[int, str, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    data = r.read().decode("utf-8")
    conn.close()
    return r.status, r.getheader("Content-Type") or "", data


def test_station_hands_the_finalised_slide_to_the_lis(tmp_path: Path) -> None:
    """The command's LIS wiring: [lis] from the environment, the outbox written on finalise, the
    delivery thread writing the folder, the state on /api/state, the on-demand routes and
    `edge-wbc report` giving the same message."""
    import hl7

    out = tmp_path / "lis"
    out.mkdir()
    port = free_port()
    p = Proc("--models", str(FIXTURE_MODELS), "--source", f"folder:{SAMPLES}", "--data-dir",
             str(tmp_path / "data"), "--port", str(port), "--station-id", "st-9",
             env={"EDGE_WBC_LIS_DELIVERY": "folder", "EDGE_WBC_LIS_FOLDER": str(out)})
    try:
        p.wait_url()
        assert api(port, "/api/slide/sample", {"sample_id": "H|42^x"})[0] == 200
        s = {"counted": 0}
        for i in range(1, 6):
            assert api(port, "/api/capture", {})[0] == 202
            s = wait_fields(port, i)
            if s["counted"]:
                break
        assert s["counted"], "the fixture models found no cell in 5 fields"
        for c in api(port, "/api/cells")[1]["cells"]:
            if c["effective_label"] == "unidentified":
                api(port, f"/api/cells/{c['id']}/review", {"label": "lymphocyte"})
        assert api(port, "/api/slide/target", {"target": s["counted"]})[0] == 200
        status, final = api(port, "/api/slide/finalise", {})
        assert status == 200, final
        deadline = time.monotonic() + 20
        while not list(out.glob("*.hl7")):
            assert time.monotonic() < deadline, api(port, "/api/state")[1]["station"]
            time.sleep(0.1)
        sid = final["slide_id"]
        f = out / f"H_42_x_{sid}.hl7"
        with open(f, encoding="utf-8", newline="") as fh:
            sent = fh.read()
        msg = hl7.parse(sent)
        assert msg.unescape(str(msg.segment("PID")(3)(1)(1))) == "H|42^x"
        lis = api(port, "/api/state")[1]["station"]["lis"]
        assert lis["state"] == "ok" and lis["waiting"] == 0
        assert lis["last_delivered"]["slide_id"] == sid
        status, ctype, text = _get_text(port, f"/api/slide/report.hl7?slide={sid}")
        assert status == 200 and ctype.startswith("application/hl7-v2") and text == sent
        status, ctype, fj = _get_text(port, "/api/slide/report.fhir.json")
        assert status == 200 and '"resourceType": "Bundle"' in fj
        cli = subprocess.run(
            [sys.executable, "-c", "from edge_wbc.cli import app; app()", "report", "--data-dir",
             str(tmp_path / "data"), "--slide", sid, "--format", "hl7"],
            capture_output=True, cwd=ROOT, env={**os.environ, "EDGE_WBC_LIS_FOLDER": str(out)},
            timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.decode("utf-8") == sent
    finally:
        p.kill()


def _replay_session(data: Path, folder: Path):  # type: ignore[no-untyped-def]
    """The store, slide session and folder camera as `edge-wbc station` makes them."""
    from edge_wbc.camera.folder import FolderSource
    from edge_wbc.counting.events import Fanout
    from edge_wbc.counting.session import SlideSession
    from edge_wbc.counting.store import Store
    from edge_wbc.station.command import _follow_slides

    store = Store(data)
    session = SlideSession(store, Fanout(), default_target=100,
                           models={"manifest": "test", "models": []})
    source = FolderSource(folder, loop=False)
    _follow_slides(source, session, Fanout())
    return store, session, source


def test_a_restart_resumes_the_replay_after_the_last_file_taken(tmp_path: Path) -> None:
    # Four corrupt files (each refused, each moving the replay on) then five good ones: after
    # eight captures four fields are counted, from 04..07. The restart must go on at 08, not
    # at "field 4" (the count), which is 04.jpg again: counted twice.
    from station_fakes import FakeAnalyzer

    from edge_wbc.camera import FrameError

    folder = tmp_path / "fields"
    folder.mkdir()
    good = sorted(SAMPLES.glob("*.jpg"))
    for i in range(9):
        data = b"not a jpeg" if i < 4 else good[i].read_bytes()
        (folder / f"{i:02d}.jpg").write_bytes(data)
    analyzer = FakeAnalyzer()
    store, session, source = _replay_session(tmp_path / "data", folder)
    for _ in range(8):
        try:
            frame = source.capture()
        except FrameError:
            continue
        session.add_field(frame.rgb, analyzer.analyze(frame.rgb, frame.source),
                          source=frame.source)
    assert session.state()["fields"] == 4
    store.close()

    store, session, source = _replay_session(tmp_path / "data", folder)
    try:
        assert Path(source.capture().source).name == "08.jpg"
    finally:
        store.close()


def test_a_restart_falls_back_to_the_count_when_the_file_is_not_in_the_folder(
    tmp_path: Path,
) -> None:
    from station_fakes import FakeAnalyzer

    folder = tmp_path / "fields"
    folder.mkdir()
    for i, src in enumerate(sorted(SAMPLES.glob("*.jpg"))[:4]):
        (folder / f"{i:02d}.jpg").write_bytes(src.read_bytes())
    store, session, source = _replay_session(tmp_path / "data", folder)
    for _ in range(2):
        frame = source.capture()
        session.add_field(frame.rgb, FakeAnalyzer().analyze(frame.rgb, frame.source),
                          source=frame.source)
    store.close()
    # The files were renamed between the runs: the last field's file is not found.
    for p in sorted(folder.iterdir()):
        p.rename(p.with_name("x" + p.name))
    store, session, source = _replay_session(tmp_path / "data", folder)
    try:
        assert Path(source.capture().source).name == "x02.jpg"
    finally:
        store.close()
