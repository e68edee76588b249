"""scripts/install-pi.sh: dry run lists every step; a second run changes nothing.

Runs against a fake root (``--root DIR``): files land in DIR, and package-manager, pip and
service-manager commands are recorded in DIR/.install-commands instead of being run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_wbc.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-pi.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("systemctl") is None or shutil.which("bash") is None,
    reason="needs bash and systemctl (scripts/test.sh installs systemd)",
)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A checkout the test may modify (an upgrade is a changed checkout)."""
    s = tmp_path / "src"
    s.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", s / "pyproject.toml")
    shutil.copytree(ROOT / "edge_wbc", s / "edge_wbc",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(ROOT / "systemd", s / "systemd")
    (s / "docs").mkdir()
    shutil.copy2(ROOT / "docs" / "pi.md", s / "docs" / "pi.md")
    (s / "scripts").mkdir()
    shutil.copy2(SCRIPT, s / "scripts" / "install-pi.sh")
    (s / "models").mkdir()
    (s / "models" / "manifest.json").write_text('{"schema": "edge-wbc/manifest/1"}\n')
    (s / "models" / "seg_a.tflite").write_bytes(b"model-a")
    (s / "samples" / "fields").mkdir(parents=True)
    (s / "samples" / "fields" / "f1.jpg").write_bytes(b"jpeg")
    return s


def _run(src: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    res = subprocess.run(["bash", str(src / "scripts" / "install-pi.sh"), *args],
                         capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def _tree(root: Path) -> dict[str, str]:
    """Every file's content hash and mode, and every symlink's target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = f"{oct(p.stat().st_mode)} {hashlib.sha256(p.read_bytes()).hexdigest()}"
        elif p.is_dir():
            out[rel] = f"dir {oct(p.stat().st_mode)}"
    return out


def _commands(out: str) -> list[str]:
    return [ln.strip()[2:] for ln in out.splitlines() if ln.strip().startswith("+ ")]


def test_dry_run_lists_every_step_and_changes_nothing(src: Path, tmp_path: Path) -> None:
    fake = tmp_path / "root"
    res = _run(src, "--dry-run", "--root", str(fake), "--edgetpu", "--kiosk")
    steps = [ln for ln in res.stdout.splitlines() if ln.startswith("[")]
    assert [s.split("]")[0] + "]" for s in steps] == [f"[{i}]" for i in range(1, 9)]
    cmds = _commands(res.stdout)
    assert any("apt-get install" in c and "python3-picamera2" in c and "libedgetpu1-std" in c
               and "chromium-browser" in c for c in cmds)
    assert any("venv --system-site-packages" in c for c in cmds)
    assert any("pip install" in c and "[pi]" in c.replace("\\", "") and "numpy\\<2" in c
               for c in cmds)
    assert any(c.startswith("systemctl enable edge-wbc.service") for c in cmds)
    assert "install /etc/edge-wbc/config.toml" in res.stdout
    assert "dry run" in res.stdout
    assert _tree(fake) == {}


def test_second_run_changes_nothing(src: Path, tmp_path: Path) -> None:
    fake = tmp_path / "root"
    first = _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "tech")
    recorded = (fake / ".install-commands").read_text()
    assert "apt-get install" in recorded and "python3-picamera2" in recorded
    assert "pip install" in recorded and "systemctl restart edge-wbc.service" in recorded
    assert "systemctl daemon-reload" in recorded
    assert (fake / "etc/systemd/system/multi-user.target.wants/edge-wbc.service").is_symlink()
    assert (fake / "etc/systemd/system/graphical.target.wants/edge-wbc-kiosk.service").is_symlink()
    dropin = (fake / "etc/systemd/system/edge-wbc-kiosk.service.d/10-user.conf").read_text()
    assert "User=tech" in dropin
    assert (fake / "opt/edge-wbc/models/seg_a.tflite").read_bytes() == b"model-a"
    kiosk = fake / "opt/edge-wbc/bin/edge-wbc-kiosk"
    assert kiosk.stat().st_mode & 0o777 == 0o755
    assert "systemctl try-restart edge-wbc-kiosk.service" in recorded
    creds = fake / "etc/edge-wbc/credentials"
    assert oct(creds.stat().st_mode & 0o777) == "0o700"
    assert oct((creds / "mqtt-password").stat().st_mode & 0o777) == "0o600"
    assert "+ " in first.stdout

    before = _tree(fake)
    second = _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "tech")
    assert _tree(fake) == before
    assert _commands(second.stdout) == []
    assert "nothing changed" in second.stdout


def test_installed_config_and_unit(src: Path, tmp_path: Path) -> None:
    fake = tmp_path / "root"
    _run(src, "--root", str(fake), "--prefix", "/srv/wbc")
    conf = fake / "etc/edge-wbc/config.toml"
    cfg = load_config(conf, env={})
    assert cfg.models.dir == "/srv/wbc/models"
    unit = (fake / "etc/systemd/system/edge-wbc.service").read_text()
    assert "ExecStart=/srv/wbc/venv/bin/edge-wbc station" in unit
    assert "/opt/edge-wbc" not in unit
    assert "WorkingDirectory=/srv/wbc" in unit
    assert "Documentation=file:///srv/wbc/docs/pi.md" in unit
    assert (fake / "srv/wbc/docs/pi.md").is_file()


def test_upgrade_reinstalls_and_restarts_but_keeps_config(src: Path, tmp_path: Path) -> None:
    fake = tmp_path / "root"
    _run(src, "--root", str(fake))
    conf = fake / "etc/edge-wbc/config.toml"
    conf.write_text(conf.read_text().replace("target = 100", "target = 200"))
    log = fake / ".install-commands"
    n_before = len(log.read_text().splitlines())

    # a new release: code changed, a model replaced, an old one dropped
    init = src / "edge_wbc" / "__init__.py"
    init.write_text(init.read_text() + "\n# upgraded\n")
    (src / "models" / "seg_a.tflite").unlink()
    (src / "models" / "seg_b.tflite").write_bytes(b"model-b")
    res = _run(src, "--root", str(fake))
    new = log.read_text().splitlines()[n_before:]
    assert any("pip install" in c for c in new)
    assert any(c.startswith("systemctl restart edge-wbc.service") for c in new)
    assert not any("apt-get" in c or "useradd" in c for c in new)  # nothing else redone
    assert not (fake / "opt/edge-wbc/models/seg_a.tflite").exists()
    assert (fake / "opt/edge-wbc/models/seg_b.tflite").read_bytes() == b"model-b"
    assert "target = 200" in conf.read_text()  # the lab's edit survives
    assert "kept as you left it" in res.stdout


def test_usage_errors(src: Path, tmp_path: Path) -> None:
    res = _run(src, "--bogus", check=False)
    assert res.returncode == 2 and "unknown option" in res.stderr
    res = _run(src, "--prefix", "relative/dir", "--dry-run", check=False)
    assert res.returncode == 2
    if os.geteuid() != 0:
        res = _run(src, check=False)
        assert res.returncode == 1 and "sudo" in res.stderr
    assert "--dry-run" in _run(src, "--help").stdout


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 CLI missing")
def test_documented_backup_commands_work_on_a_live_wal_database(tmp_path: Path) -> None:
    """docs/pi.md's `.backup` and `VACUUM INTO` give consistent copies while a writer runs."""
    import sqlite3
    import threading

    db = tmp_path / "edge-wbc.sqlite3"
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE cells (id INTEGER PRIMARY KEY, label TEXT)")
    conn.executemany("INSERT INTO cells (label) VALUES (?)", [("lymphocyte",)] * 100)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            conn.execute("BEGIN")
            conn.execute("INSERT INTO cells (label) VALUES ('neutrophil')")
            conn.execute("COMMIT")

    t = threading.Thread(target=writer)
    t.start()
    try:
        docs = (ROOT / "docs" / "pi.md").read_text()
        assert ".backup '" in docs and "VACUUM INTO '" in docs
        for i, cmd in enumerate((f".backup '{tmp_path / 'b1.sqlite3'}'",
                                 f"VACUUM INTO '{tmp_path / 'b2.sqlite3'}'")):
            res = subprocess.run(["sqlite3", str(db), cmd], capture_output=True, text=True,
                                 timeout=60)
            assert res.returncode == 0, res.stderr
            copy = tmp_path / f"b{i + 1}.sqlite3"
            check = subprocess.run(["sqlite3", str(copy), "PRAGMA integrity_check"],
                                   capture_output=True, text=True, timeout=60)
            assert check.stdout.strip() == "ok"
    finally:
        stop.set()
        t.join()
    n_live = conn.execute("SELECT count(*) FROM cells").fetchone()[0]
    for name in ("b1.sqlite3", "b2.sqlite3"):
        c = sqlite3.connect(tmp_path / name)
        n = c.execute("SELECT count(*) FROM cells").fetchone()[0]
        assert 100 <= n <= n_live
        c.close()
    conn.close()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing")
def test_shellcheck_clean() -> None:
    res = subprocess.run(["shellcheck", "--severity=style", str(SCRIPT),
                          str(ROOT / "systemd" / "edge-wbc-kiosk")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout
