"""Logging set up once for every command, readable in a terminal and in the journal.

Under systemd (``$JOURNAL_STREAM`` names our stderr) journald adds the time stamp and the unit
itself, so lines carry only a syslog priority prefix (``<3>``...) which journald turns into the
entry's priority: ``journalctl -u edge-wbc -p warning`` then shows just the problems.

Expected failures (a broker that is down, a corrupt image, a bad config) are logged as one line
without a traceback: they are the lab's problem to fix, not a bug, and a page of traceback hides
the one sentence that says what to do. Unexpected exceptions keep their traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import IO

# syslog priorities journald understands in a "<N>" line prefix.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

_expected: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    FileNotFoundError,
    PermissionError,
)


#: The project's own "the lab must fix this" exceptions, by name so that judging a log record
#: never imports (or waits for) the module that defines them.
_EXPECTED_NAMES = frozenset({
    "edge_wbc.config.ConfigError",
    "edge_wbc.pipeline.manifest.ManifestError",
    "edge_wbc.pipeline.imageio.ImageError",
    "edge_wbc.camera.CameraError",
    "edge_wbc.camera.FrameError",
    "edge_wbc.counting.store.StoreError",
    "edge_wbc.counting.session.SessionError",
    "edge_wbc.comms.mqtt.MqttError",
    "edge_wbc.pipeline.inference.model.AcceleratorError",
    "edge_wbc.pipeline.inference.model.ModelLoadError",
    "edge_wbc.pipeline.inference.runtime.RuntimeMissing",
    "edge_wbc.station.app.BusyError",
    "edge_wbc.station.command.StartupError",
    "edge_wbc.station.triggers.TriggerError",
})


class ExpectedError(Exception):
    """Base for failures the operator must fix (logged as one line, never a traceback)."""


def register_expected(*types: type[BaseException]) -> None:
    """Declare exception types whose tracebacks are noise (e.g. ConfigError, ManifestError)."""
    global _expected
    _expected = tuple(dict.fromkeys((*_expected, *types)))


def is_expected(exc: BaseException) -> bool:
    if isinstance(exc, (ExpectedError, *_expected)):
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in _EXPECTED_NAMES for c in type(exc).__mro__)


def _priority(levelno: int) -> int:
    for lvl in sorted(_PRIORITY, reverse=True):
        if levelno >= lvl:
            return _PRIORITY[lvl]
    return 7


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool, debug: bool) -> None:
        fmt = "%(name)s: %(message)s" if journal else (
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        super().__init__(fmt, datefmt="%Y-%m-%d %H:%M:%S")
        self.journal = journal
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_expected(exc) and not self.debug:
            # Same record, one line: message plus the exception's own words.
            record = logging.makeLogRecord(record.__dict__)
            record.msg = f"{record.getMessage()}: {_one_line(exc)}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        text = super().format(record)
        if not self.journal:
            return text
        # journald makes one entry per line: give every line of a traceback the same priority.
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if isinstance(exc, ExpectedError) else f"{msg} ({type(exc).__name__})"


def under_journal(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (stderr) is connected to journald, as ``$JOURNAL_STREAM`` says."""
    env = os.environ if env is None else env
    js = env.get("JOURNAL_STREAM", "")
    if not js:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
        dev, ino = js.split(":", 1)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        # Could not compare (e.g. a test's captured stream): trust the variable.
        return True


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when the record is emitted (as ``logging.lastResort``
    does), so a stderr replaced later (a test runner's capture, a redirection) that has since
    been closed never turns a log line into "--- Logging error ---" on somebody else's output."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def setup_logging(
    level: str | int = "INFO",
    stream: IO[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger once (idempotent: replaces our own handler)."""
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        lvl = logging.INFO
    handler: logging.Handler = (
        CurrentStderrHandler() if stream is None else logging.StreamHandler(stream)
    )
    handler.set_name("edge-wbc")
    handler.setFormatter(_Formatter(journal=under_journal(stream, env), debug=lvl <= logging.DEBUG))
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == "edge-wbc":
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    # Third-party chatter at INFO buries the station's own lines.
    for noisy in ("paho", "PIL", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    return handler


def log_expected(logger: logging.Logger, what: str, exc: BaseException,
                 level: int = logging.ERROR) -> None:
    """One line for a failure the operator can act on; the traceback only at DEBUG."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.log(level, "%s", what, exc_info=exc)
    else:
        logger.log(level, "%s: %s", what, _one_line(exc))
