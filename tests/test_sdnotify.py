"""sd_notify protocol and the liveness watchdog, against a harness that plays systemd."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sd_harness import NotifyHarness

from edge_wbc import sdnotify
from edge_wbc.sdnotify import STUCK_EXIT_CODE, Liveness

ROOT = Path(__file__).resolve().parents[1]

# A child that behaves like the station's analysis loop: READY after "loading", then one
# inference every 50 ms inside liveness.busy(), announcing each on STATUS.
CHILD = textwrap.dedent(
    """
    import logging, sys, time
    from edge_wbc import sdnotify
    from edge_wbc.logs import setup_logging
    setup_logging("INFO")
    time.sleep(0.2)  # "loading models"
    live = sdnotify.Liveness(stuck_after_s=float(sys.argv[1])).start()
    sdnotify.notify_ready("ready")
    for i in range(int(sys.argv[2])):
        sdnotify.notify_status(f"field {i}")
        with live.busy("field analysis"):
            time.sleep(0.05)
        time.sleep(0.05)
    sdnotify.notify_stopping("done")
    """
)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[NotifyHarness]:
    h = NotifyHarness(path=tmp_path / "notify.sock")
    yield h
    h.close()


def _run_child(h: NotifyHarness, stuck_after: float, fields: int, extra_env: dict[str, str],
               watchdog_usec: int = 400_000) -> subprocess.Popen[bytes]:
    env = {**h.env(watchdog_usec), "PYTHONPATH": str(ROOT), **extra_env}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(stuck_after), str(fields)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_healthy_process_pings_until_done(harness: NotifyHarness) -> None:
    proc = _run_child(harness, stuck_after=2.0, fields=20, extra_env={})
    harness.wait_for("READY", "1", proc=proc)
    _out, err = proc.communicate(timeout=30)
    time.sleep(0.1)
    assert proc.returncode == 0, err.decode()
    pings = harness.times("WATCHDOG", "1")
    ready = harness.times("READY", "1")[0]
    # 20 fields x ~0.1 s at one ping per 0.2 s: pings all the way through
    assert len(pings) >= 5
    assert harness.times("STOPPING", "1")
    assert max(pings) > ready + 1.0


def test_hung_inference_stops_pings_and_exits_nonzero(harness: NotifyHarness) -> None:
    stuck_after = 1.0
    proc = _run_child(
        harness, stuck_after=stuck_after, fields=50,
        extra_env={sdnotify.ENV_HANG_AFTER: "5", sdnotify.ENV_HANG_S: "60"},
    )
    ready = harness.wait_for("READY", "1", proc=proc)
    try:
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    assert proc.returncode == STUCK_EXIT_CODE, err.decode()
    hang_start = harness.times("STATUS", "field 5")[0]
    pings = harness.times("WATCHDOG", "1")
    assert pings and min(pings) >= ready - 0.5  # pinged while healthy
    # no ping once the inference has been stuck past the limit (+ one check interval of slack)
    assert max(pings) <= hang_start + stuck_after + 0.5
    # ... and systemd is told why; the journal gets one clear line
    assert any(s.startswith("unhealthy: field analysis has been running") for _, s in
               harness.statuses())
    assert b"exiting with status 70" in err
    assert not harness.times("STOPPING", "1")  # it did not get to finish normally


def test_abstract_socket_and_ready_payload() -> None:
    h = NotifyHarness(abstract_name=f"edge-wbc-test-{uuid.uuid4().hex}")
    try:
        env = h.env()
        assert env["NOTIFY_SOCKET"].startswith("@")
        assert sdnotify.notify("READY=1\nSTATUS=up and running", env)
        t = h.wait_for("READY", "1", timeout=3)
        assert t and h.statuses()[0][1] == "up and running"
    finally:
        h.close()


def test_no_notify_socket_is_a_no_op() -> None:
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_dead_socket_is_logged_not_raised(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_liveness_in_process_reports_stuck_and_dead_threads() -> None:
    found: list[str] = []
    live = Liveness(stuck_after_s=0.3, env={}, exit_on_unhealthy=False,
                    check_interval_s=0.05, on_unhealthy=found.append)
    with live.busy("quick"):
        assert live.health() is None
    assert live.busy_for() is None

    gate = threading.Event()
    worker = threading.Thread(target=gate.wait, name="analysis-worker", daemon=True)
    worker.start()
    live.watch_thread(worker)
    assert live.health() is None
    gate.set()
    worker.join()
    assert "analysis-worker" in (live.health() or "")

    live2 = Liveness(stuck_after_s=0.3, env={}, exit_on_unhealthy=False,
                     check_interval_s=0.05, on_unhealthy=found.append).start()
    with live2.busy("field analysis"):
        time.sleep(0.6)
    live2.stop()
    assert found and "field analysis has been running" in found[-1]


def test_liveness_busy_clears_on_exception() -> None:
    live = Liveness(stuck_after_s=5, env={})
    with pytest.raises(RuntimeError), live.busy():
        raise RuntimeError("corrupt frame")
    assert live.busy_for() is None and live.health() is None


# --------------------------------------------------------------------------- journald logging


def _log_lines(env: dict[str, str], level: str = "INFO") -> list[str]:
    import io
    import logging

    from edge_wbc.config import ConfigError
    from edge_wbc.logs import register_expected, setup_logging

    register_expected(ConfigError)
    buf = io.StringIO()
    handler = setup_logging(level, stream=buf, env=env)
    log = logging.getLogger("edge_wbc.test")
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            log.exception("broker 127.0.0.1:1883 unreachable")
        try:
            raise ZeroDivisionError("a bug")
        except ZeroDivisionError:
            log.exception("unexpected")
        log.warning("disk low")
        log.debug("details")
    finally:
        logging.getLogger().removeHandler(handler)
    return buf.getvalue().splitlines()


def test_journal_lines_carry_priority_and_no_timestamp() -> None:
    lines = _log_lines({"JOURNAL_STREAM": "8:12345"})
    assert lines[0] == (
        "<3>edge_wbc.test: broker 127.0.0.1:1883 unreachable: [Errno 111] Connection refused "
        "(ConnectionRefusedError)"
    )
    # an unexpected error keeps its traceback, every line at the same priority
    tb = [ln for ln in lines if "Traceback" in ln]
    assert tb and all(ln.startswith("<3>") for ln in lines[1:lines.index(tb[0]) + 3])
    assert "<4>edge_wbc.test: disk low" in lines
    assert not any("details" in ln for ln in lines)  # below INFO
    assert not any(re.match(r"^<\d>\d{4}-\d\d-\d\d", ln) for ln in lines)


def test_project_errors_are_expected_without_registration() -> None:
    from edge_wbc.camera import CameraError
    from edge_wbc.counting.store import DiskFullError
    from edge_wbc.logs import is_expected
    from edge_wbc.pipeline.manifest import ManifestError

    assert is_expected(CameraError("unplugged")) and is_expected(ManifestError("x"))
    assert is_expected(DiskFullError("full"))  # a subclass of StoreError
    assert not is_expected(ZeroDivisionError()) and not is_expected(KeyError("k"))


def test_terminal_lines_have_timestamps_and_debug_shows_tracebacks() -> None:
    lines = _log_lines({}, level="DEBUG")
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ERROR   edge_wbc.test: broker", lines[0])
    # at DEBUG even expected errors come with their traceback, for the developer
    assert sum("Traceback" in ln for ln in lines) == 2
    assert any("details" in ln for ln in lines)


# --------------------------------------------------------------------------- the real station


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(method: str, url: str) -> tuple[int, dict[str, object]]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_station_under_systemd_harness_ready_then_watchdog_stops_on_hang(
    harness: NotifyHarness, tmp_path: Path
) -> None:
    """`edge-wbc station` as systemd runs it: READY only after the models are loaded and the page
    listens; WATCHDOG=1 while healthy; a field whose inference hangs stops the pings and the
    process exits non-zero (Restart=on-failure would bring it back)."""
    port = _free_port()
    stuck_after = 2.0
    conf = tmp_path / "config.toml"
    conf.write_text(
        f"[camera]\nsource = 'folder:{ROOT / 'tests' / 'fixtures' / 'fields'}'\n"
        f"[models]\ndir = '{ROOT / 'tests' / 'fixtures' / 'models'}'\n"
        f"[session]\ndata_dir = '{tmp_path / 'state'}'\n"
        f"[station]\nport = {port}\nstuck_after_s = {stuck_after}\n"
    )
    env = {
        **harness.env(watchdog_usec=1_000_000),  # systemd's WatchdogSec=1s: ping every 0.5 s
        "PYTHONPATH": str(ROOT),
        # fault injection inside Liveness.busy(): the 2nd field's analysis sleeps (no fake result)
        sdnotify.ENV_HANG_AFTER: "1",
        sdnotify.ENV_HANG_S: "120",
    }
    env.pop("EDGE_WBC_CONFIG", None)
    t_start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from edge_wbc.cli import app; app()", "station",
         "--config", str(conf)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        ready = harness.wait_for("READY", "1", timeout=90, proc=proc)
        # READY carries the URL, so the page was listening when it was sent
        ready_status = next(m.fields.get("STATUS", "") for m in harness.snapshot()
                            if m.fields.get("READY") == "1")
        assert f":{port}/" in ready_status
        code, state = _http("GET", f"http://127.0.0.1:{port}/api/state")
        assert code == 200

        # healthy and idle: pings keep coming
        time.sleep(1.6)
        assert len([t for t in harness.times("WATCHDOG", "1") if t > ready]) >= 2

        # field 1 analyses normally
        code, _ = _http("POST", f"http://127.0.0.1:{port}/api/capture")
        assert code == 202
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, state = _http("GET", f"http://127.0.0.1:{port}/api/state")
            if state["station"]["fields_analysed"] >= 1:  # type: ignore[index]
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"field 1 never analysed: {state}")

        # field 2's inference hangs
        code, _ = _http("POST", f"http://127.0.0.1:{port}/api/capture")
        assert code == 202
        t_hang = time.monotonic()
        _out, err = proc.communicate(timeout=stuck_after + 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    assert proc.returncode == STUCK_EXIT_CODE, err.decode()[-3000:]
    pings = harness.times("WATCHDOG", "1")
    assert min(pings) >= t_start
    # the last ping is no later than the hang limit (+ a 0.5 s check/ping period and slack)
    assert max(pings) <= t_hang + stuck_after + 1.0, (max(pings) - t_hang)
    assert any("field analysis has been running" in s for _, s in harness.statuses())
    assert b"exiting with status 70" in err
    assert not harness.times("STOPPING", "1")


def test_station_with_missing_models_never_sends_ready(harness: NotifyHarness,
                                                       tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(
        f"[camera]\nsource = 'folder:{ROOT / 'tests' / 'fixtures' / 'fields'}'\n"
        f"[models]\ndir = '{tmp_path / 'no-models'}'\n"
        f"[session]\ndata_dir = '{tmp_path / 'state'}'\n"
        f"[station]\nport = {_free_port()}\n"
    )
    env = {**harness.env(watchdog_usec=1_000_000), "PYTHONPATH": str(ROOT)}
    env.pop("EDGE_WBC_CONFIG", None)
    res = subprocess.run(
        [sys.executable, "-c", "from edge_wbc.cli import app; app()", "station",
         "--config", str(conf)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    time.sleep(0.2)
    assert res.returncode != 0
    assert "manifest.json" in res.stderr and "Traceback" not in res.stderr
    assert not harness.times("READY", "1")


def test_station_stops_cleanly_on_sigterm(harness: NotifyHarness, tmp_path: Path) -> None:
    """`systemctl stop`: SIGTERM -> STOPPING=1 and exit 0 (so Restart=on-failure leaves it be)."""
    import signal

    port = _free_port()
    conf = tmp_path / "config.toml"
    conf.write_text(
        f"[camera]\nsource = 'folder:{ROOT / 'tests' / 'fixtures' / 'fields'}'\n"
        f"[models]\ndir = '{ROOT / 'tests' / 'fixtures' / 'models'}'\n"
        f"[session]\ndata_dir = '{tmp_path / 'state'}'\n"
        f"[station]\nport = {port}\n"
    )
    env = {**harness.env(watchdog_usec=2_000_000), "PYTHONPATH": str(ROOT)}
    env.pop("EDGE_WBC_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from edge_wbc.cli import app; app()", "station",
         "--config", str(conf)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        harness.wait_for("READY", "1", timeout=90, proc=proc)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)  # the unit's TimeoutStopSec
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert harness.times("STOPPING", "1")
