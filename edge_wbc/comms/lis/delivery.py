"""The delivery thread: drains the LIS outbox through the configured transport.

One report at a time in the order the slides were finalised. A report the LIS acknowledged is
deleted from the outbox (and logged); one it refused is held with the reason; when the LIS cannot
be reached the thread waits ``retry_s`` (doubling up to :data:`MAX_RETRY_S`, or ``retry_s``
when that is longer) and tries the same report again, so a LIS that was down gets every report
once it is back, in order. An attempt whose outcome the station cannot write down (a full disk)
backs off the same way: the report stays, and is sent again as the identical message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_wbc.comms.lis import outbox
from edge_wbc.comms.lis.codes import ReportError
from edge_wbc.comms.lis.transports import Outcome, Transport, make_transport

log = logging.getLogger(__name__)

MAX_RETRY_S = 600.0
#: How often the thread looks for new rows when nothing woke it (a slide finalised by another
#: process, e.g. `edge-wbc lis send`).
POLL_S = 2.0


def load_report(data_dir: str | Path, report_file: str) -> dict[str, Any]:
    """The finalised report (report.json) a row points at; ReportError when it is unusable."""
    if not report_file:
        raise ReportError("the slide was finalised without a report.json")
    p = Path(data_dir) / report_file
    try:
        rep = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"report file {report_file} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"report file {report_file} cannot be read: {e}") from e
    if not isinstance(rep, dict):
        raise ReportError(f"report file {report_file} is not a report")
    return rep


class LisDelivery:
    """Owns the transport and a connection to the station's database (WAL, its own)."""

    def __init__(
        self,
        cfg: Any,
        db_path: str | Path,
        data_dir: str | Path,
        *,
        station_id: str = "",
        transport: Transport | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        chosen = transport or make_transport(cfg, station_id)
        if chosen is None:
            raise ValueError("lis.delivery is 'off': nothing to deliver to")
        self.transport: Transport = chosen
        self.conn = outbox.connect(str(db_path))
        self.on_change = on_change
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = float(cfg.retry_s)
        # A retry_s above MAX_RETRY_S is the lab's choice: kept, never shortened after the first.
        self._max_backoff = max(MAX_RETRY_S, float(cfg.retry_s))
        # What the station could not write to its outbox (status only has the database's view).
        self._unrecorded: dict[str, Any] | None = None
        self._last_crash = ""
        # While the LIS is away nothing is tried before this (time.monotonic()); one clock for
        # the whole queue keeps the reports in order.
        self._resume_at = 0.0
        self.reachable: bool | None = None  # None until the first attempt
        self.last_outcome: str | None = None

    # The store calls this inside the finalising transaction (see outbox.hook).
    def hook(self, conn: Any, event: Any) -> None:
        outbox.hook(conn, event)

    def __call__(self, event: Any) -> None:
        """Session listener: events arrive after their commit, so a finalised slide's row is
        visible now; send it without waiting for the next poll."""
        if event.kind == "slide" and event.payload.get("action") in ("finalised", "finalized"):
            self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lis-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            self.conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.run_once()
                self._last_crash = ""
            except Exception as e:  # the thread must outlive a bug in one report
                # Backs off like a failed send, one traceback per new error: a database that
                # keeps failing must not be hammered, nor fill the log, every POLL_S.
                why = f"{type(e).__name__}: {e}"
                if why != self._last_crash:
                    log.exception("LIS delivery failed")
                self._last_crash = why
                self._back_off(f"LIS delivery failed: {why}")
                wait = POLL_S
            self._wake.wait(wait)
            self._wake.clear()

    def run_once(self) -> float:
        """Try the waiting reports in order; returns seconds until it is worth looking again."""
        while not self._stop.is_set():
            wait = self._resume_at - time.monotonic()
            if wait > 0:
                return min(POLL_S, wait)
            with self._lock:
                row = outbox.due(self.conn)
            if row is None:
                break
            self._attempt(row)
        return POLL_S

    def _attempt(self, row: outbox.Row) -> Outcome:
        try:
            rep = load_report(self.data_dir, row.report_file)
        except ReportError as e:
            outcome = Outcome.refused(str(e))
        else:
            try:
                outcome = self.transport.send(rep)
            except Exception as e:  # a bug: kept and retried with the back-off, never lost
                log.exception("LIS transport failed on slide %s", row.slide_id)
                outcome = Outcome.retry(f"internal error: {type(e).__name__}: {e}")
        with self._lock:
            try:
                self._record(row, outcome)
            except sqlite3.Error as e:
                outcome = self._not_recorded(row, outcome, e)
            self.last_outcome = outcome.detail
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # a page that cannot be told must not stop delivery
                log.exception("LIS status listener failed")
        return outcome

    def _record(self, row: outbox.Row, outcome: Outcome) -> None:
        """The outcome into the outbox; raises sqlite3.Error when the database cannot take it."""
        if outcome.ok:
            outbox.delivered(self.conn, row, self.transport.destination, outcome.detail)
            self._unrecorded = None
            self._backoff = float(self.cfg.retry_s)
            self._resume_at = 0.0
            self.reachable = True
            log.info("LIS: sample %s (slide %s) delivered to %s: %s", row.sample_id,
                     row.slide_id, self.transport.destination, outcome.detail)
        elif outcome.held:
            outbox.failed(self.conn, row, outcome.detail, held=True)
            self._unrecorded = None
            self.reachable = True
            log.warning("LIS refused sample %s (slide %s): %s; kept, release it with "
                        "`edge-wbc lis retry`", row.sample_id, row.slide_id, outcome.detail)
        else:
            # The LIS is away: the reports after this one would fail the same way.
            outbox.failed(self.conn, row, outcome.detail, held=False)
            self._unrecorded = None
            self.reachable = False
            self._back_off(f"LIS: sample {row.sample_id} not delivered ({outcome.detail})")

    def _back_off(self, what: str) -> None:
        self._resume_at = time.monotonic() + self._backoff
        log.warning("%s; next try in %.0f s", what, self._backoff)
        self._backoff = min(self._backoff * 2, self._max_backoff)

    def _not_recorded(self, row: outbox.Row, outcome: Outcome, err: sqlite3.Error) -> Outcome:
        """The station could not write the outcome down (a full disk): the report stays and the
        whole queue backs off as for a LIS that is away. A report the LIS accepted is sent again
        later as the identical message (same MSH-10, same conditional creates), which the LIS
        can recognise; forgetting it unrecorded would lose the record that it was delivered."""
        then = (f"the LIS accepted it ({outcome.detail})" if outcome.ok
                else f"the LIS refused it ({outcome.detail})" if outcome.held
                else f"not delivered ({outcome.detail})")
        detail = f"{then}, but the station cannot record that in its database: {err}"
        # A smaller write may still fit where the delivery's did not: then `lis status` says it.
        with contextlib.suppress(sqlite3.Error):
            outbox.failed(self.conn, row, detail, held=False)
        before = self._unrecorded
        tries = (before["attempts"] if before and before["slide_id"] == row.slide_id
                 else row.attempts)
        self._unrecorded = {"slide_id": row.slide_id, "sample_id": row.sample_id, "held": False,
                            "attempts": max(tries, row.attempts) + 1, "error": detail,
                            "at": outbox.now_iso()}
        self.reachable = outcome.ok or outcome.held
        self._back_off(f"LIS: sample {row.sample_id} (slide {row.slide_id}): {detail}")
        return Outcome.retry(detail)

    def status(self) -> dict[str, Any]:
        with self._lock:
            st = outbox.status(self.conn)
            if self._unrecorded is not None:
                st["problems"] = [self._unrecorded, *(
                    p for p in st["problems"] if p["slide_id"] != self._unrecorded["slide_id"])]
        state = ("refused" if st["held"] else "ok" if not st["waiting"]
                 else "unreachable" if self.reachable is False else "sending")
        return {"delivery": self.cfg.delivery, "destination": self.transport.destination,
                "state": state, **st}
