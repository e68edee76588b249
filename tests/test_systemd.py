"""The shipped systemd units: `systemd-analyze verify` is clean, and they say what the Pi needs.

verify insists that ExecStart binaries exist, and on a CI machine /opt/edge-wbc does not. So the
units are copied with their install prefix mapped to a temporary tree whose executables are
real files; every other line is verified exactly as shipped. "Clean" means no output at all:
systemd-analyze exits 0 even for unknown keys, so a warning is treated as a failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "systemd").glob("*.service"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (scripts/test.sh installs systemd)"
)

# Absolute executables referenced by the units, and what stands in for them in the test.
_EXECUTABLES = ("/opt/edge-wbc/venv/bin/edge-wbc", "/opt/edge-wbc/bin/edge-wbc-kiosk")


def _verifiable_copy(tmp_path: Path, units: list[Path]) -> list[Path]:
    root = tmp_path / "root"
    for exe in _EXECUTABLES:
        dst = root / exe.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(sys.executable)
    out_dir = tmp_path / "units"
    out_dir.mkdir(exist_ok=True)
    out = []
    for u in units:
        text = u.read_text()
        for exe in _EXECUTABLES:
            text = text.replace(exe, str(root / exe.lstrip("/")))
        p = out_dir / u.name
        p.write_text(text)
        out.append(p)
    return out


def _verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )


def _directives(path: Path) -> dict[str, list[str]]:
    d: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        k, _, v = line.partition("=")
        d.setdefault(k.strip(), []).append(v.strip())
    return d


def test_units_shipped() -> None:
    assert {u.name for u in UNITS} == {"edge-wbc.service", "edge-wbc-kiosk.service"}


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    res = _verify(_verifiable_copy(tmp_path, UNITS))
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo'd directive or a missing binary is reported."""
    (unit,) = _verifiable_copy(tmp_path, [ROOT / "systemd" / "edge-wbc.service"])
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restartt=on-failure"))
    res = _verify([unit])
    assert "Restartt" in res.stdout + res.stderr
    missing = tmp_path / "units" / "missing.service"
    missing.write_text("[Service]\nExecStart=/nonexistent/edge-wbc station\n")
    res = _verify([missing])
    assert res.returncode != 0


def test_station_unit_contract() -> None:
    d = _directives(ROOT / "systemd" / "edge-wbc.service")
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert int(one["WatchdogSec"]) > 30  # longer than the default stuck_after_s
    assert one["Restart"] == "on-failure"
    assert int(one["StartLimitBurst"]) >= 1 and int(one["StartLimitIntervalSec"]) > 0
    assert one["StateDirectory"] == "edge-wbc" and one["ConfigurationDirectory"] == "edge-wbc"
    assert one["User"] == "edge-wbc" or one.get("DynamicUser") == "yes"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert set(one["SupplementaryGroups"].split()) >= {"video", "gpio", "plugdev"}
    allowed = " ".join(d["DeviceAllow"])
    for dev in ("video4linux", "gpiochip", "usb_device", "apex"):
        assert dev in allowed, dev
    creds = {v.split(":")[0] for v in d["LoadCredential"]}
    assert creds == {"mqtt-password", "mqtt-tls-key", "token", "lis-fhir-token"}
    assert one["ExecStart"].startswith("/opt/edge-wbc/venv/bin/edge-wbc station")
    # the credentials' names are the ones the config reads
    from edge_wbc import config

    assert creds == {config.CRED_MQTT_PASSWORD, config.CRED_MQTT_TLS_KEY, config.CRED_TOKEN,
                     config.CRED_LIS_FHIR_TOKEN}


def test_kiosk_unit_contract() -> None:
    d = _directives(ROOT / "systemd" / "edge-wbc-kiosk.service")
    one = {k: v[-1] for k, v in d.items()}
    assert "edge-wbc.service" in one["After"] and "edge-wbc.service" in one["Wants"]
    assert one["ExecStart"] == "/opt/edge-wbc/bin/edge-wbc-kiosk"
    assert any(v.startswith("EDGE_WBC_KIOSK_URL=http://127.0.0.1:8080") for v in d["Environment"])
    assert one["WantedBy"] == "graphical.target"


def _kiosk(tmp_path: Path, runtime: Path, browser: str | None, wait_s: str = "3",
           system_path: bool = True) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    if browser:
        fake = bin_dir / browser
        # stands in for Chromium: shows how it was started
        fake.write_text('#!/bin/sh\n'
                        'echo "WAYLAND_DISPLAY=${WAYLAND_DISPLAY:-} DISPLAY=${DISPLAY:-}"\n'
                        'for a in "$@"; do echo "ARG $a"; done\n')
        fake.chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin" if system_path else str(bin_dir)
    env = {"PATH": path, "XDG_RUNTIME_DIR": str(runtime),
           "EDGE_WBC_KIOSK_URL": "http://127.0.0.1:8123/", "EDGE_WBC_KIOSK_WAIT_S": wait_s}
    sh = shutil.which("sh") or "/bin/sh"
    return subprocess.run([sh, str(ROOT / "systemd" / "edge-wbc-kiosk")], env=env,
                          capture_output=True, text=True, timeout=30)


def test_kiosk_script_finds_the_wayland_session_and_opens_the_page(tmp_path: Path) -> None:
    import socket

    runtime = tmp_path / "run"
    runtime.mkdir()
    (runtime / "wayland-0.lock").write_text("")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(runtime / "wayland-0"))  # labwc's socket name
    try:
        res = _kiosk(tmp_path, runtime, "chromium")
    finally:
        sock.close()
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("WAYLAND_DISPLAY=wayland-0 ")
    assert "ARG --kiosk" in lines and "ARG --app=http://127.0.0.1:8123/" in lines
    assert f"ARG --user-data-dir={runtime}/edge-wbc-kiosk" in lines


def test_kiosk_script_fails_clearly_without_display_or_browser(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    res = _kiosk(tmp_path / "a", runtime, None, system_path=False)
    assert res.returncode == 1 and "no Chromium found" in res.stderr
    if Path("/tmp/.X11-unix/X0").exists():
        pytest.skip("this machine has an X display")
    res = _kiosk(tmp_path / "b", runtime, "chromium-browser", wait_s="1")
    assert res.returncode == 1 and "no desktop session" in res.stderr
