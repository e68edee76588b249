"""``edge-wbc doctor``: is this station able to run, and if not, what exactly is wrong?

Each check is a small function over the config returning one row (name, status, detail). A row
is FAIL when the station cannot do its job (no camera, models missing or altered, no
interpreter, no disk, a required accelerator absent) and WARN when it can but something needs
attention (broker or LIS unreachable: counts and reports are kept and delivered later). Exit
status is non-zero when any row FAILs, so the installer and a technician's script can rely on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_wbc import __version__
from edge_wbc.accelerators import CPU, DELEGATES, Delegate
from edge_wbc.bundled import locate_models
from edge_wbc.config import Config

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
#: Below this the station refuses to be called healthy: a slide's crops and reports need room,
#: and SQLite needs space to commit.
MIN_FREE_BYTES = 200 * 1024**2
WARN_FREE_BYTES = 1024**3
#: Coral USB accelerator before/after its firmware is loaded; the M.2/PCIe one shows /dev/apex_N.
_CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the checks


def check_camera(cfg: Config) -> Check:
    """Open the configured source with the station's own camera code and take one frame."""
    src = cfg.camera.source
    try:
        from edge_wbc.camera import CameraError, FrameError, open_source
    except ImportError as e:
        return Check("camera", FAIL, f"edge_wbc.camera cannot be imported: {e}")
    if src.startswith("picamera2"):
        try:
            import picamera2  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as e:
            return Check("camera", FAIL, (
                f"picamera2 cannot be imported ({e}); on Raspberry Pi OS: sudo apt install "
                "python3-picamera2, and make the venv with --system-site-packages"))
    busy = (" (if the station is running it holds the camera: sudo systemctl stop edge-wbc "
            "first)" if not src.startswith("folder:") else "")
    try:
        source = open_source(src, cfg.camera.width, cfg.camera.height, loop=True)
    except CameraError as e:
        return Check("camera", FAIL, f"{src}: {e}{busy}")
    except Exception as e:  # drivers raise all sorts; the row must still say which source
        return Check("camera", FAIL, f"{src}: {type(e).__name__}: {e}{busy}")
    try:
        frame = source.capture()
    except FrameError as e:
        return Check("camera", WARN, f"{src}: opens, but the first frame is unusable: {e}")
    except CameraError as e:
        return Check("camera", FAIL, f"{src}: opens but delivers no frame: {e}{busy}")
    except Exception as e:
        return Check("camera", FAIL, f"{src}: {type(e).__name__}: {e}{busy}")
    finally:
        with contextlib.suppress(Exception):
            source.close()
    h, w = frame.rgb.shape[:2]
    extra = ""
    if src.startswith("folder:"):
        # The folder source just read a frame through imageio, so importing it costs nothing.
        from edge_wbc.pipeline.imageio import IMAGE_SUFFIXES

        d = Path(src.partition(":")[2])
        n = sum(1 for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        extra = f", {n} images to replay"
    return Check("camera", OK, f"{src}: {source.name}, {w}x{h} frames{extra}")


def check_models(cfg: Config) -> Check:
    from edge_wbc.pipeline.manifest import ManifestError, load_manifest

    where = locate_models(cfg.models.dir or "")
    try:
        man = load_manifest(where.path, verify=True)
    except ManifestError as e:
        return Check("models", FAIL, f"{e} (models from {where.source})")
    cls = man.classifier
    parts = [f"{len(man.segmenters)} segmenter(s)", f"classifier {cls.name}" if cls else
             "no classifier"]
    status = OK if cls is not None else FAIL
    # The anchors matter only to "Adapt to this lab": a problem with them is a warning (the
    # station counts as before), said here so IT hears of it before a technician's fit fails.
    note = ""
    if cls is not None and cls.anchors is not None:
        from edge_wbc.pipeline.adaptation import AdaptationError, manifest_anchors

        try:
            manifest_anchors(where.path, cls)
            note = ", adaptation anchors verified"
        except AdaptationError as e:
            status = WARN
            note = f"; {e}: lab adaptation will refuse to fit (restore the models folder)"
    # The station refuses to start with an adaptation it cannot load: so does this check.
    if cls is not None and cfg.models.adaptation:
        from edge_wbc.pipeline.adaptation import AdaptationError, load_adaptation

        try:
            ad = load_adaptation(Path(cfg.models.adaptation), cls.sha256)
            note += f", lab adaptation {ad.id} verified"
        except AdaptationError as e:
            return Check("models", FAIL, (
                f"[models] adaptation: {e}; the station will not start with it (fit a new one, "
                "or remove the setting to count with the shipped model)"))
    return Check("models", status, f"{where.path.resolve()} ({where.source}): "
                 f"{', '.join(parts)}, sha256 verified{note}")


def check_interpreter(cfg: Config) -> Check:
    try:
        from edge_wbc.pipeline.inference import (
            ModelLoadError,
            RuntimeMissing,
            TFLiteModel,
            get_runtime,
        )
        from edge_wbc.pipeline.manifest import ManifestError, load_manifest
    except ImportError as e:  # the device package itself is incomplete
        return Check("interpreter", FAIL, f"edge_wbc.pipeline.inference cannot be imported: {e}")
    try:
        rt = get_runtime()
    except RuntimeMissing as e:
        return Check("interpreter", FAIL, str(e))
    head = f"{rt.name} {rt.version}"
    try:
        man = load_manifest(locate_models(cfg.models.dir or "").path, verify=False)
    except ManifestError:
        return Check("interpreter", WARN, f"{head} imports; models not loadable (see models)")
    t0 = time.perf_counter()
    try:
        for entry in man.models:
            TFLiteModel(man.path(entry), threads=cfg.models.threads, runtime=rt)
    except (ModelLoadError, OSError, ValueError, RuntimeError) as e:
        return Check("interpreter", FAIL, f"{head}: {e}")
    ms = (time.perf_counter() - t0) * 1000
    return Check("interpreter", OK, f"{head}: {len(man.models)} models load on the CPU in "
                 f"{ms:.0f} ms ({cfg.models.threads} threads)")


def _coral_present() -> str | None:
    if any(Path("/dev").glob("apex_*")):
        return "M.2/PCIe Edge TPU (/dev/apex_*)"
    for d in Path("/sys/bus/usb/devices").glob("*"):
        try:
            ids = ((d / "idVendor").read_text().strip(), (d / "idProduct").read_text().strip())
        except OSError:
            continue
        if ids in _CORAL_USB_IDS:
            return f"USB Edge TPU ({ids[0]}:{ids[1]})"
    return None


def check_accelerator(cfg: Config) -> Check:
    present = _coral_present()
    if cfg.models.accelerator == CPU:
        hint = (f"; {present} is plugged in: set models.accelerator = \"edgetpu\" to use it"
                if present else "")
        return Check("accelerator", OK, f"CPU configured{hint}")
    try:
        from edge_wbc.pipeline.inference import AcceleratorError, open_accelerator
    except ImportError as e:
        return Check("accelerator", FAIL, f"edge_wbc.pipeline.inference cannot be imported: {e}")
    required = cfg.models.require_accelerator
    spec = DELEGATES[cfg.models.accelerator]
    try:
        acc = open_accelerator(spec.name, cfg.models.edgetpu_device, require=required)
    except AcceleratorError as e:
        return Check("accelerator", FAIL, str(e))
    except Exception as e:  # a delegate failing in an unforeseen way is still a finding
        return Check("accelerator", FAIL if required else WARN, f"{spec.label}: {e}")
    if acc.kind != spec.name:
        return Check("accelerator", WARN, acc.message)
    missing = _missing_compiled_files(cfg, spec)
    if missing:
        msg = (f"{spec.label} opens, but no compiled model for {', '.join(missing)}: "
               "those run on CPU")
        return Check("accelerator", FAIL if required else WARN, msg)
    return Check("accelerator", OK, acc.message)


def _missing_compiled_files(cfg: Config, spec: Delegate) -> list[str]:
    from edge_wbc.pipeline.manifest import ManifestError, load_manifest

    try:
        man = load_manifest(locate_models(cfg.models.dir or "").path, verify=False)
    except ManifestError:
        return []
    out = []
    for e in man.models:
        p = man.path(e)
        if not p.with_name(f"{p.stem}{spec.compiled_suffix}{p.suffix}").is_file():
            out.append(e.name)
    return out


def check_disk(cfg: Config, min_free: int = MIN_FREE_BYTES, warn_free: int = WARN_FREE_BYTES
               ) -> Check:
    d = Path(cfg.session.data_dir)
    probe = d
    # The station creates the folder (systemd's StateDirectory does on a Pi): measure the
    # file system it will land on.
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError as e:
        return Check("disk", FAIL, f"{d}: {e}")
    if read_only:
        # No user can write there: the station would refuse to start. Under the unit's
        # ProtectSystem=strict, any folder outside /var/lib/edge-wbc reads as read-only.
        return Check("disk", FAIL, f"{d}: {probe} is on a read-only file system; the station "
                     "cannot store anything there (a data_dir outside /var/lib/edge-wbc needs "
                     "ReadWritePaths= in a drop-in for edge-wbc.service, docs/pi.md)")
    free = usage.free
    human = f"{free / 1024**3:.1f} GiB free of {usage.total / 1024**3:.1f} GiB"
    if free < min_free:
        return Check("disk", FAIL, f"{d}: only {human}; the station needs at least "
                     f"{min_free // 1024**2} MiB to store cells and reports")
    where = f"{d}" if d.exists() else f"{d} (not created yet; on {probe})"
    note = ""
    if d.exists() and not os.access(d, os.W_OK):
        note = " — not writable by this user (fine if the service's own user owns it)"
    if free < warn_free:
        return Check("disk", WARN, f"{where}: {human}, running low{note}")
    return Check("disk", OK, f"{where}: {human}{note}")


def check_broker(cfg: Config, timeout: float = 3.0) -> Check:
    m = cfg.mqtt
    if not m.host:
        return Check("broker", SKIP, "no mqtt.host configured: counts stay on this station")
    t0 = time.perf_counter()
    try:
        with socket.create_connection((m.host, m.port), timeout=timeout):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        return Check("broker", WARN, (
            f"{m.host}:{m.port} unreachable ({why}); the station keeps counting and delivers "
            "when the broker is back"))
    ms = (time.perf_counter() - t0) * 1000
    tls = " (TLS configured)" if m.tls or m.tls_ca else ""
    return Check("broker", OK, f"{m.host}:{m.port} accepts TCP connections in {ms:.0f} ms{tls}")


def check_lis(cfg: Config, timeout: float = 3.0) -> Check:
    """Is the LIS reachable, and what waits for it in this station's outbox?"""
    lis = cfg.lis
    if lis.delivery == "off":
        return Check("lis", SKIP, "lis.delivery is 'off': reports stay on this station")
    from edge_wbc.comms.lis import outbox
    from edge_wbc.comms.lis.transports import make_transport
    from edge_wbc.counting.store import DB_NAME

    transport = make_transport(lis, cfg.mqtt.station_id)
    assert transport is not None  # delivery is not 'off'
    problem = transport.probe(timeout)
    queue = ""
    status = OK
    db = Path(cfg.session.data_dir) / DB_NAME
    try:
        has_db = db.is_file()
    except PermissionError:
        return Check("lis", WARN, f"{db.parent}: not readable by this user, so the LIS outbox "
                     "is not shown: run doctor as the service's user (sudo -u edge-wbc "
                     "edge-wbc doctor)")
    if has_db:
        import sqlite3

        try:
            conn = outbox.connect_read_only(str(db), timeout_s=timeout)
            try:
                st = outbox.status(conn)
            finally:
                conn.close()
        except sqlite3.Error as e:
            return Check("lis", FAIL, f"{db}: cannot read the LIS outbox: {e}")
        queue = f"; {st['waiting']} report(s) waiting, {st['held']} refused by the LIS"
        if st["held"]:
            status = WARN
            first = next(p for p in st["problems"] if p["held"])
            queue += (f" (e.g. sample {first['sample_id']}: {first['error']}; fix it there, "
                      "then edge-wbc lis retry)")
    if problem:
        return Check("lis", WARN, f"{transport.destination} unreachable ({problem}); reports wait "
                     f"in the outbox and go out when it is back{queue}")
    return Check("lis", status, f"{transport.destination} reachable{queue}")


def check_system(cfg: Config) -> Check:
    model = ""
    try:
        model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\0\n ")
    except OSError:
        model = platform.machine()
    py = ".".join(map(str, sys.version_info[:3]))
    return Check("system", OK, f"edge-wbc {__version__}, Python {py}, {model}")


CHECKS: tuple[tuple[str, Callable[[Config], Check]], ...] = (
    ("system", check_system),
    ("camera", check_camera),
    ("models", check_models),
    ("interpreter", check_interpreter),
    ("accelerator", check_accelerator),
    ("disk", check_disk),
    ("broker", check_broker),
    ("lis", check_lis),
)


def run_checks(cfg: Config, only: Iterable[str] | None = None,
               broker_timeout: float = 3.0) -> list[Check]:
    wanted = set(only) if only else None
    rows = []
    for name, fn in CHECKS:
        if wanted is not None and name not in wanted:
            continue
        try:
            if fn is check_broker:
                row = check_broker(cfg, broker_timeout)
            elif fn is check_lis:
                row = check_lis(cfg, broker_timeout)
            else:
                row = fn(cfg)
        except Exception as e:  # a check that crashes must not hide the others
            row = Check(name, FAIL, f"check crashed: {type(e).__name__}: {e}")
        rows.append(row)
    return rows


def format_table(rows: list[Check], width: int = 100) -> str:
    name_w = max([len("CHECK"), *(len(r.name) for r in rows)])
    out = [f"{'CHECK':<{name_w}}  STATUS  DETAIL"]
    detail_w = max(30, width - name_w - 10)
    for r in rows:
        lines = _wrap(r.detail, detail_w)
        out.append(f"{r.name:<{name_w}}  {r.status.upper():<6}  {lines[0]}")
        out += [f"{'':<{name_w}}  {'':<6}  {ln}" for ln in lines[1:]]
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def summary(rows: list[Check]) -> str:
    fails = [r.name for r in rows if r.status == FAIL]
    warns = [r.name for r in rows if r.status == WARN]
    if fails:
        return f"NOT READY: {', '.join(fails)} failed" + (
            f"; warnings: {', '.join(warns)}" if warns else "")
    if warns:
        return f"READY with warnings: {', '.join(warns)}"
    return "READY: every check passed"


def to_json(rows: list[Check], config_path: str | None) -> str:
    return json.dumps({"config": config_path, "checks": [r.to_json() for r in rows],
                       "ok": not any(r.status == FAIL for r in rows)}, indent=2)
