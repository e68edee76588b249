"""scripts/install-pi.sh: dry run lists every step; a second run changes nothing.

Runs against a fake root (``--root DIR``): files land in DIR, and package-manager, pip and
service-manager commands are recorded in DIR/.install-commands instead of being run.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
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


def _fake_root(tmp_path: Path, name: str = "root") -> Path:
    """An empty root that has the desktop user `tech` (uid 1001), as a Pi has its first user."""
    fake = tmp_path / name
    (fake / "etc").mkdir(parents=True)
    (fake / "etc" / "passwd").write_text("tech:x:1001:1001:Tech:/home/tech:/bin/bash\n")
    (fake / "etc" / "group").write_text("tech:x:1001:\n")
    return fake


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
    fake = _fake_root(tmp_path)
    before = _tree(fake)
    res = _run(src, "--dry-run", "--root", str(fake), "--edgetpu", "--kiosk", "--kiosk-user",
               "tech")
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
    assert _tree(fake) == before


def test_second_run_changes_nothing(src: Path, tmp_path: Path) -> None:
    fake = _fake_root(tmp_path)
    first = _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "tech")
    recorded = (fake / ".install-commands").read_text()
    assert "apt-get install" in recorded and "python3-picamera2" in recorded
    assert "pip install" in recorded and "systemctl restart edge-wbc.service" in recorded
    assert "systemctl daemon-reload" in recorded
    assert (fake / "etc/systemd/system/multi-user.target.wants/edge-wbc.service").is_symlink()
    assert (fake / "etc/systemd/system/graphical.target.wants/edge-wbc-kiosk.service").is_symlink()
    dropin = (fake / "etc/systemd/system/edge-wbc-kiosk.service.d/10-user.conf").read_text()
    assert "User=tech" in dropin
    assert "XDG_RUNTIME_DIR=/run/user/1001" in dropin  # tech's own uid, not the first user's
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


# --- Fifth pass (session 13): the installer under an adversarial tester -----------------------
# Each test below failed before its fix (docs/hardening.md, "Fifth pass").


def _new_commands(fake: Path, n_before: int) -> list[str]:
    return (fake / ".install-commands").read_text().splitlines()[n_before:]


def _n_commands(fake: Path) -> int:
    return len((fake / ".install-commands").read_text().splitlines())


def test_a_deleted_venv_is_recreated_and_the_package_installed_into_it(
        src: Path, tmp_path: Path) -> None:
    fake = tmp_path / "root"
    _run(src, "--root", str(fake))
    shutil.rmtree(fake / "opt/edge-wbc/venv")
    n = _n_commands(fake)
    res = _run(src, "--root", str(fake))
    new = _new_commands(fake, n)
    assert any("venv --system-site-packages" in c for c in new)
    assert any("pip install" in c for c in new), res.stdout  # was: "already installed"
    assert any(c.startswith("systemctl restart edge-wbc.service") for c in new)
    assert "already installed" not in res.stdout


def test_an_interrupted_upgrade_is_restarted_and_reloaded_by_the_next_run(
        src: Path, tmp_path: Path) -> None:
    fake = _fake_root(tmp_path)
    _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "tech")
    # A release that changes the code and the station's unit; the run stops after pip and after
    # writing the unit, before daemon-reload and the restart (here: a write that fails).
    init = src / "edge_wbc" / "__init__.py"
    init.write_text(init.read_text() + "\n# upgraded\n")
    unit = src / "systemd" / "edge-wbc.service"
    unit.write_text(unit.read_text() + "# upgraded\n")
    (src / "systemd" / "edge-wbc-kiosk").write_text(
        (src / "systemd" / "edge-wbc-kiosk").read_text() + "# upgraded\n")
    kiosk = fake / "opt/edge-wbc/bin/edge-wbc-kiosk"
    kiosk.unlink()
    kiosk.mkdir()
    n = _n_commands(fake)
    res = _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "tech", check=False)
    assert res.returncode == 1
    assert "/opt/edge-wbc/bin/edge-wbc-kiosk" in res.stderr and "Done." not in res.stdout
    stopped = _new_commands(fake, n)
    assert any("pip install" in c for c in stopped)
    assert not any(c.startswith(("systemctl restart", "systemctl daemon-reload")) for c in stopped)
    assert "# upgraded" in (fake / "etc/systemd/system/edge-wbc.service").read_text()

    kiosk.rmdir()
    n = _n_commands(fake)
    res = _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "tech")
    new = _new_commands(fake, n)
    assert "pip install" not in " ".join(new)  # that part was done
    assert "systemctl daemon-reload" in new[0]
    assert any(c.startswith("systemctl restart edge-wbc.service") for c in new), res.stdout
    assert not any(p.name.endswith("-pending") for p in (fake / "opt/edge-wbc").iterdir())
    # and once done, done: the next run has nothing left to do
    again = _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "tech")
    assert _commands(again.stdout) == [] and "nothing changed" in again.stdout


def test_a_failed_write_stops_the_installer_naming_the_file(src: Path, tmp_path: Path) -> None:
    fake = tmp_path / "root"
    (fake / "opt/edge-wbc").mkdir(parents=True)
    (fake / "opt/edge-wbc/docs").write_text("a file where a folder should be")
    res = _run(src, "--root", str(fake), check=False)
    assert res.returncode == 1, res.stdout
    assert "cannot write /opt/edge-wbc/docs/pi.md" in res.stderr
    assert "Done." not in res.stdout
    assert not (fake / "etc/edge-wbc/config.toml").exists()  # it stopped there


@pytest.mark.parametrize("first_too_large", ["/opt/edge-wbc/docs/pi.md",
                                             "/etc/edge-wbc/config.toml"])
def test_a_full_disk_leaves_no_half_written_file(
        src: Path, tmp_path: Path, first_too_large: str) -> None:
    """`ulimit -f 4` stands for a full disk: no file over 4 kB can be written whole."""
    fake = tmp_path / "root"
    if first_too_large.endswith("config.toml"):
        (src / "docs" / "pi.md").unlink()  # the guide (17 kB) would be the first
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    res = subprocess.run(["bash", "-c", 'ulimit -f 4; exec bash "$@"', "bash",
                          str(src / "scripts" / "install-pi.sh"), "--root", str(fake)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{first_too_large} (is " in res.stderr and "full?)" in res.stderr
    assert "Done." not in res.stdout
    folder = fake / first_too_large.lstrip("/").rsplit("/", 1)[0]
    assert not folder.exists() or list(folder.iterdir()) == []  # no stub, no temporary
    assert not (fake / "etc/edge-wbc/config.toml").exists()
    # space again: the next run writes everything whole
    res = _run(src, "--root", str(fake))
    assert f"install {first_too_large}" in res.stdout
    cfg = load_config(fake / "etc/edge-wbc/config.toml", env={})
    assert cfg.models.dir == "/opt/edge-wbc/models"
    if "pi.md" in first_too_large:
        assert (fake / "opt/edge-wbc/docs/pi.md").read_bytes() == (src / "docs/pi.md").read_bytes()


def test_an_empty_config_left_by_an_older_installer_is_replaced(src: Path, tmp_path: Path) -> None:
    fake = tmp_path / "root"
    _run(src, "--root", str(fake))
    conf = fake / "etc/edge-wbc/config.toml"
    conf.write_bytes(b"")
    res = _run(src, "--root", str(fake))
    assert "kept as you left it" not in res.stdout
    assert "is empty" in res.stdout
    assert load_config(conf, env={}).models.dir == "/opt/edge-wbc/models"


def test_an_existing_group_of_the_service_users_name_is_joined(src: Path, tmp_path: Path) -> None:
    fake = _fake_root(tmp_path)
    with (fake / "etc/group").open("a") as f:
        f.write("edge-wbc:x:1234:\n")  # left by a removed user, or made by hand
    _run(src, "--root", str(fake))
    recorded = (fake / ".install-commands").read_text()
    assert "useradd --system -g edge-wbc " in recorded and "--user-group" not in recorded
    groups = (fake / "etc/group").read_text().splitlines()
    assert [g for g in groups if g.startswith("edge-wbc:")] == ["edge-wbc:x:1234:"]
    user = [u for u in (fake / "etc/passwd").read_text().splitlines() if u.startswith("edge-wbc:")]
    assert len(user) == 1 and user[0].split(":")[3] == "1234"


def test_the_fake_roots_useradd_fails_where_the_real_one_does(tmp_path: Path) -> None:
    """The emulation refuses --user-group on an existing group, as shadow-utils does."""
    fake = _fake_root(tmp_path)
    body = SCRIPT.read_text()
    funcs = body[body.index("emulate_useradd() {"):body.index("pkg_installed() {")]
    funcs += body[body.index("passwd_entry() {"):body.index("systemctl_q() {")]
    script = (f'ROOT={shlex.quote(str(fake))}; FAKE=1\n'
              + body[body.index("next_id() {"):body.index("# useradd as shadow")] + funcs
              + 'emulate_useradd useradd --system --user-group tech\n')
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 9 and "group tech exists" in res.stderr and "use -g" in res.stderr


@pytest.mark.parametrize("prefix", ["/opt/edge wbc", "/opt/a&b", "/opt/a#b", "/opt/a%i"])
def test_a_prefix_systemd_or_sed_would_mangle_is_refused(
        src: Path, tmp_path: Path, prefix: str) -> None:
    fake = tmp_path / "root"
    res = _run(src, "--root", str(fake), "--prefix", prefix, check=False)
    assert res.returncode == 2, res.stdout
    assert "--prefix" in res.stderr and "letters, digits" in res.stderr
    assert _tree(fake) == {}


def test_the_coral_key_command_writes_where_it_says_under_a_root_with_a_space(
        src: Path, tmp_path: Path) -> None:
    fake = tmp_path / "r oot & more"
    res = _run(src, "--dry-run", "--root", str(fake), "--edgetpu")
    [cmd] = [c for c in _commands(res.stdout) if "gpg" in c]
    # Run what the installer would run, with a curl and a gpg that only write files.
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "curl").write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\n'
                                  'echo "-----BEGIN PGP-----" > "$2"\n')
    (fakebin / "gpg").write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\n'
                                 'out="$2"; shift 2; cat "$1" > "$out"\n')
    for b in ("curl", "gpg"):
        (fakebin / b).chmod(0o755)
    keyrings = fake / "usr/share/keyrings"
    keyrings.mkdir(parents=True)
    env = dict(os.environ, PATH=f"{fakebin}:{os.environ['PATH']}")
    done = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in keyrings.iterdir()] == ["coral-edgetpu-archive-keyring.gpg"]
    assert (keyrings / "coral-edgetpu-archive-keyring.gpg").read_text().startswith("-----BEGIN")


def test_an_unprivileged_dry_run_says_it_cannot_see_the_credentials(tmp_path: Path) -> None:
    # Another user must be able to read the checkout and the root, as on a Pi (~pi/edge-wbc).
    base = Path(tempfile.mkdtemp(prefix="edge-wbc-inst-", dir="/tmp"))
    try:
        base.chmod(0o755)
        s = base / "src"
        s.mkdir()
        shutil.copy2(ROOT / "pyproject.toml", s)
        shutil.copytree(ROOT / "edge_wbc", s / "edge_wbc", symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "models", "samples"))
        shutil.copytree(ROOT / "systemd", s / "systemd")
        (s / "scripts").mkdir()
        shutil.copy2(SCRIPT, s / "scripts")
        fake = base / "root"
        _run(s, "--root", str(fake))
        creds = fake / "etc/edge-wbc/credentials"
        assert oct(creds.stat().st_mode & 0o777) == "0o700"
        cmd = ["bash", str(s / "scripts" / "install-pi.sh"), "--dry-run", "--root", str(fake)]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        else:
            creds.chmod(0o000)  # what root's 0700 is to another user
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "SUDO_USER"})
        assert res.returncode == 0, res.stdout + res.stderr
        assert "create empty credential" not in res.stdout
        assert "credential token: cannot check (root only" in res.stdout
        creds.chmod(0o700)
    finally:
        shutil.rmtree(base)


def test_the_kiosk_user_must_exist_and_its_own_uid_is_used(src: Path, tmp_path: Path) -> None:
    fake = _fake_root(tmp_path)
    before = _tree(fake)
    # no SUDO_USER (root's own shell) and no user `pi` on this system
    res = _run(src, "--root", str(fake), "--kiosk", check=False)
    assert res.returncode == 1
    assert "no user 'pi'" in res.stderr and "--kiosk-user" in res.stderr
    assert _tree(fake) == before  # stopped before changing anything
    with (fake / "etc/passwd").open("a") as f:
        f.write("lab:x:1003:1003::/home/lab:/bin/bash\n")
    with (fake / "etc/passwd").open("a") as f:
        f.write("root:x:0:0:root:/root:/bin/bash\n")
    res = _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "root", check=False)
    assert res.returncode == 1 and "not as 'root'" in res.stderr  # Chromium will not run as root
    assert not (fake / "opt").exists() and not (fake / ".install-commands").exists()
    _run(src, "--root", str(fake), "--kiosk", "--kiosk-user", "lab")
    dropin = (fake / "etc/systemd/system/edge-wbc-kiosk.service.d/10-user.conf").read_text()
    assert "User=lab" in dropin and "XDG_RUNTIME_DIR=/run/user/1003" in dropin


def _ship_like_the_repository(src: Path) -> None:
    """What models/ holds besides the device's files: float weights, figures, evaluations."""
    m = src / "models"
    (m / "classifier.keras").write_bytes(b"float weights")
    (m / "confusion_pbc.png").write_bytes(b"png")
    (m / "cls_eval.json").write_text("{}")
    (m / "classifier_anchors.npz").write_bytes(b"npz")
    (m / "README.md").write_text("# models\n")


def test_only_what_the_device_loads_is_installed_and_a_labs_own_files_stay(
        src: Path, tmp_path: Path) -> None:
    _ship_like_the_repository(src)
    fake = tmp_path / "root"
    _run(src, "--root", str(fake))
    models = fake / "opt/edge-wbc/models"
    # the wheel's rule (pyproject's package-data), not the whole folder
    assert sorted(p.name for p in models.iterdir()) == [
        "README.md", "classifier_anchors.npz", "manifest.json", "seg_a.tflite"]
    # the lab compiles for its Coral on the Pi (models/README.md)
    (models / "seg_a_edgetpu.tflite").write_bytes(b"compiled here")
    (models / "notes.txt").write_text("ours")
    (src / "models" / "seg_a.tflite").unlink()
    (src / "models" / "seg_b.tflite").write_bytes(b"model-b")
    res = _run(src, "--root", str(fake))
    assert not (models / "seg_a.tflite").exists()  # installed by edge-wbc, no longer shipped
    assert (models / "seg_a_edgetpu.tflite").read_bytes() == b"compiled here"
    assert (models / "notes.txt").read_text() == "ours"
    assert "kept notes.txt seg_a_edgetpu.tflite" in res.stdout


def test_an_older_installers_full_copy_is_cleaned_up_but_unknown_files_stay(
        src: Path, tmp_path: Path) -> None:
    _ship_like_the_repository(src)
    fake = tmp_path / "root"
    models = fake / "opt/edge-wbc/models"
    models.mkdir(parents=True)
    for f in (src / "models").iterdir():  # what the installer before session 13 left
        shutil.copy2(f, models / f.name)
    (models / "classifier_edgetpu.tflite").write_bytes(b"compiled here")
    _run(src, "--root", str(fake))
    assert sorted(p.name for p in models.iterdir()) == [
        "README.md", "classifier_anchors.npz", "classifier_edgetpu.tflite", "manifest.json",
        "seg_a.tflite"]


def test_docs_name_the_credential_path_the_unit_loads() -> None:
    unit = (ROOT / "systemd" / "edge-wbc.service").read_text()
    line = next(ln for ln in unit.splitlines() if ln.startswith("LoadCredential=mqtt-password:"))
    assert line in (ROOT / "docs" / "mqtt.md").read_text()


def test_pi_guide_says_what_grows_and_what_a_data_dir_elsewhere_needs() -> None:
    unit = (ROOT / "systemd" / "edge-wbc.service").read_text()
    guide = (ROOT / "docs" / "pi.md").read_text()
    assert "ProtectSystem=strict" in unit and "ReadWritePaths=" in guide
    assert "does not prune" in guide or "never deletes" in guide
    example = (ROOT / "edge_wbc" / "config.example.toml").read_text()
    assert "backups_keep = 7" in example and "7 backups" in guide


def test_the_sample_fields_travel_with_their_licence(tmp_path: Path) -> None:
    """The BCCD images are MIT-licensed: the notice goes wherever the images go (Pi and wheel)."""
    fake = tmp_path / "root"
    s = tmp_path / "src"
    s.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", s)
    shutil.copytree(ROOT / "edge_wbc", s / "edge_wbc", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(ROOT / "samples", s / "samples")
    shutil.copytree(ROOT / "systemd", s / "systemd")
    (s / "scripts").mkdir()
    shutil.copy2(SCRIPT, s / "scripts")
    _run(s, "--root", str(fake))
    fields = fake / "opt/edge-wbc/samples/fields"
    assert "MIT License" in (fields / "NOTICE").read_text()
    assert any(fields.glob("*.jpg"))
