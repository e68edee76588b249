"""A stand-in for systemd's side of the notify protocol, for tests.

Binds a Unix datagram socket, hands its address to a child as ``$NOTIFY_SOCKET`` (with
``WATCHDOG_USEC``), and records every message with its arrival time, as systemd would see them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Message:
    t: float  # time.monotonic() on arrival
    fields: dict[str, str]


@dataclass
class NotifyHarness:
    path: Path | None = None  # socket file; None for an abstract socket
    abstract_name: str | None = None
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if self.abstract_name is not None:
            self.sock.bind("\0" + self.abstract_name)
        else:
            assert self.path is not None
            self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return "@" + self.abstract_name if self.abstract_name is not None else str(self.path)

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "NOTIFY_"))}
        env["NOTIFY_SOCKET"] = self.address
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            with self._lock:
                self.messages.append(Message(time.monotonic(), fields))

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def times(self, key: str, value: str | None = None) -> list[float]:
        return [m.t for m in self.snapshot()
                if key in m.fields and (value is None or m.fields[key] == value)]

    def statuses(self) -> list[tuple[float, str]]:
        return [(m.t, m.fields["STATUS"]) for m in self.snapshot() if "STATUS" in m.fields]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0,
                 proc: subprocess.Popen[bytes] | None = None) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ts = self.times(key, value)
            if ts:
                return ts[0]
            if proc is not None and proc.poll() is not None:
                time.sleep(0.2)  # let the last datagrams land
                ts = self.times(key, value)
                if ts:
                    return ts[0]
                raise AssertionError(f"process exited ({proc.returncode}) before {key}")
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s: {self.snapshot()}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)
