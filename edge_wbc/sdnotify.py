"""systemd's notify protocol (READY, STATUS, STOPPING, WATCHDOG) and the station's liveness.

Pure Python: one datagram per message to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract socket), as sd_notify(3) does, so the device needs no libsystemd bindings. Outside
systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op.

Liveness follows Frigate's detector watchdog: stamp before inference, clear after, and a
separate thread that judges the stamp. The watchdog ping (``WATCHDOG=1``) is sent only while the
process is healthy; once an inference has been running longer than ``stuck_after_s`` (a wedged
accelerator, a deadlocked interpreter) the thread logs why, stops pinging and ends the process
with a non-zero code, so ``Restart=on-failure`` brings up a fresh one. Exiting ourselves rather
than waiting for systemd's watchdog kill makes the restart quicker and works without systemd too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: Exit status when the watchdog finds the process hung (sysexits EX_SOFTWARE).
STUCK_EXIT_CODE = 70
#: Fault injection for the systemd harness test: after this many inferences the next one
#: sleeps (a real delay inside the busy section, never a made-up result).
ENV_HANG_AFTER = "EDGE_WBC_DEBUG_HANG_AFTER"
ENV_HANG_S = "EDGE_WBC_DEBUG_HANG_S"


# --------------------------------------------------------------------------- protocol


def _socket_address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    # vsock: addresses (VMs) are not used on a Pi; ignore rather than fail.
    return None


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification (``"READY=1"``, ``"STATUS=..."``...); False when not under systemd.

    Errors are logged, never raised: losing a status line must not stop the station (a lost
    watchdog ping is caught by systemd itself).
    """
    addr = _socket_address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode("utf-8", "replace"))
    except OSError as e:
        log.warning("sd_notify %r failed: %s", state.split("=", 1)[0], e)
        return False
    return True


def notify_ready(status: str | None = None) -> bool:
    """Tell systemd the station is up (Type=notify units are 'activating' until this)."""
    msg = "READY=1" + (f"\nSTATUS={_one_line(status)}" if status else "")
    return notify(msg + f"\nMAINPID={os.getpid()}")


def notify_status(status: str) -> bool:
    """Free-form line shown by ``systemctl status edge-wbc``."""
    return notify(f"STATUS={_one_line(status)}")


def notify_stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def notify_watchdog() -> bool:
    return notify("WATCHDOG=1")


def _one_line(s: str) -> str:
    return " ".join(s.split())


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings systemd expects to be safe (half of WatchdogSec), or None.

    ``$WATCHDOG_PID``, when set, says which process the watchdog is for: a child started
    from the station must not ping on its behalf.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 1e6 / 2 if value > 0 else None


# --------------------------------------------------------------------------- liveness


class Liveness:
    """Is the station still doing its job? Judged by a watchdog thread.

    ``with liveness.busy():`` around each inference; ``watch_thread(t)`` for threads that must
    stay alive (the analysis worker); ``add_check(name, fn)`` for anything else, ``fn`` returning
    a problem string or None. ``start()`` launches the watchdog thread.
    """

    def __init__(
        self,
        stuck_after_s: float = 30.0,
        *,
        env: Mapping[str, str] | None = None,
        exit_code: int = STUCK_EXIT_CODE,
        exit_on_unhealthy: bool = True,
        check_interval_s: float | None = None,
        on_unhealthy: Callable[[str], None] | None = None,
    ) -> None:
        if stuck_after_s <= 0:
            raise ValueError("stuck_after_s must be positive")
        self.stuck_after_s = float(stuck_after_s)
        self._env = dict(os.environ if env is None else env)
        self._exit_code = exit_code
        self._exit_on_unhealthy = exit_on_unhealthy
        self._on_unhealthy = on_unhealthy
        self._ping_every = watchdog_interval(self._env)
        # Check often enough to notice a hang well within the limit even without systemd.
        interval = min(self.stuck_after_s / 4, 1.0)
        if self._ping_every is not None:
            interval = min(interval, self._ping_every)
        self.check_interval_s = check_interval_s or interval
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._busy_what = ""
        self._count = 0
        self._threads: list[threading.Thread] = []
        self._checks: list[tuple[str, Callable[[], str | None]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.problem: str | None = None
        self._hang_after = _int_or_none(self._env.get(ENV_HANG_AFTER))
        self._hang_s = float(self._env.get(ENV_HANG_S, "3600") or 3600)
        if self._hang_after is not None:
            log.warning("fault injection on: inference %d will hang for %.0f s (%s)",
                        self._hang_after + 1, self._hang_s, ENV_HANG_AFTER)

    # -- what the station calls

    @contextmanager
    def busy(self, what: str = "inference") -> Iterator[None]:
        """Stamp before the work, clear after (also when it raises)."""
        with self._lock:
            self._busy_since = time.monotonic()
            self._busy_what = what
            n = self._count
            self._count += 1
        try:
            if self._hang_after is not None and n == self._hang_after:
                log.warning("fault injection: hanging in %s for %.0f s", what, self._hang_s)
                time.sleep(self._hang_s)
            yield
        finally:
            with self._lock:
                self._busy_since = None

    def watch_thread(self, thread: threading.Thread) -> None:
        self._threads.append(thread)

    def add_check(self, name: str, fn: Callable[[], str | None]) -> None:
        self._checks.append((name, fn))

    # -- the judgement

    def busy_for(self) -> float | None:
        with self._lock:
            since = self._busy_since
        return None if since is None else time.monotonic() - since

    def health(self) -> str | None:
        """None when healthy, else why not (one line)."""
        t = self.busy_for()
        if t is not None and t > self.stuck_after_s:
            return (f"{self._busy_what} has been running for {t:.1f} s (limit "
                    f"{self.stuck_after_s:.0f} s): the interpreter or accelerator is stuck")
        for th in self._threads:
            if not th.is_alive():
                return f"thread {th.name!r} has died"
        for name, fn in self._checks:
            try:
                msg = fn()
            except Exception as e:  # a failing check is itself a finding
                msg = f"check raised {type(e).__name__}: {e}"
            if msg:
                return f"{name}: {msg}"
        return None

    def start(self) -> Liveness:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        last_ping = 0.0
        while not self._stop.is_set():
            problem = self.health()
            if problem is not None:
                self._unhealthy(problem)
                return
            now = time.monotonic()
            if self._ping_every is not None and now - last_ping >= self._ping_every:
                if notify("WATCHDOG=1", self._env):
                    self.pings += 1
                last_ping = now
            self._stop.wait(self.check_interval_s)

    def _unhealthy(self, problem: str) -> None:
        self.problem = problem
        log.critical("station unhealthy, no more watchdog pings: %s", problem)
        notify(f"STATUS={_one_line('unhealthy: ' + problem)}", self._env)
        if self._on_unhealthy is not None:
            try:
                self._on_unhealthy(problem)
            except Exception:
                log.exception("on_unhealthy callback failed")
        if self._exit_on_unhealthy:
            log.critical("exiting with status %d so systemd restarts the station", self._exit_code)
            for h in logging.getLogger().handlers:
                with contextlib.suppress(Exception):  # best effort before a hard exit
                    h.flush()
            sys.stderr.flush()
            # A hung inference holds the interpreter (and maybe the GIL-free C call) forever:
            # a normal exit would wait for it, so leave without running cleanups.
            os._exit(self._exit_code)


def _int_or_none(s: str | None) -> int | None:
    if s is None or s.strip() == "":
        return None
    try:
        return int(s)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", ENV_HANG_AFTER, s)
        return None
