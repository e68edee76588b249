"""The station's core: trigger → frame → bounded queue → analysis worker → slide session.

The frame is taken from the camera at the moment of the trigger (what is under the objective
when the technician presses capture), then waits in a bounded queue for the single analysis
worker (one interpreter set, one thread — contract 1 of docs/architecture.md). A capture that
finds the queue full, or the disk below its margin, is refused at once with a message, never
dropped silently; every failure after the queue (a corrupt frame, an analysis error, a full
disk) is published as a ``status`` event the page shows.

Each accepted capture is a row in the store before it is queued and is closed when it is counted
(in the field's own transaction) or refused. A capture still open when the process died was
never analysed: the next start names it on the page and in the log.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_wbc.camera import CameraError, Frame, FrameError, FrameSource
from edge_wbc.counting.events import Event, Publish
from edge_wbc.counting.session import SessionError, SlideSession, now_iso
from edge_wbc.counting.store import DiskFullError, StoreError
from edge_wbc.pipeline.results import FieldResult

log = logging.getLogger(__name__)

Analyze = Callable[[np.ndarray, str], FieldResult]


class BusyError(Exception):
    """The analysis queue is full: the capture was refused (and the page says so)."""


@dataclass
class _Job:
    capture_id: int
    frame: Frame
    trigger: str
    t0: float  # perf_counter at the trigger
    slide_id: str  # the slide it was captured for


class Station:
    """Owns the camera, the worker thread and the station's health; counting is the session's."""

    def __init__(
        self,
        source: FrameSource,
        analyze: Analyze,
        session: SlideSession,
        publish: Publish,
        *,
        queue_max: int = 4,
        liveness: Any = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.analyze = analyze
        self.session = session
        self.publish = publish
        self.queue_max = queue_max
        self.liveness = liveness
        self.info = info or {}
        # Health of optional parts (the MQTT publisher) merged into status(); set by the command.
        self.extra_status: Callable[[], dict[str, Any]] | None = None
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_max)
        self._lock = threading.Lock()
        # Held by the worker from a field's analysis to its commit: a change of the analyser's
        # settings taken under it (``between_fields``) never splits one field.
        self._field_lock = threading.Lock()
        self._busy: _Job | None = None
        #: Captures accepted and not yet counted or refused, per slide (under _lock): what a
        #: finalise must wait for.
        self._pending: dict[str, int] = {}
        self._stop = threading.Event()
        self.last_error: dict[str, Any] | None = None
        self.last_field: dict[str, Any] | None = None
        self.latencies_ms: list[float] = []
        self.fields_done = 0
        self.started_at = now_iso()
        self._last_cam: tuple[bool, str] | None = None
        self.worker = threading.Thread(target=self._run, name="analysis-worker", daemon=True)
        #: Captures the previous process accepted but never analysed (until the page clears it).
        self.interrupted: list[dict[str, Any]] = []
        self._report_interrupted()

    def _report_interrupted(self) -> None:
        lost = self.session.store.interrupt_captures(now_iso())
        if not lost:
            return
        self.interrupted = [{k: c[k] for k in ("id", "slide_id", "trigger", "accepted_at")}
                            for c in lost]
        shown = ", ".join(f"{c['id']} at {c['accepted_at']}" for c in lost[:10])
        more = f" and {len(lost) - 10} more" if len(lost) > 10 else ""
        n = len(lost)
        self._set_error(
            "interrupted",
            f"{n} capture{'s' if n != 1 else ''} accepted before the station stopped "
            f"{'were' if n != 1 else 'was'} not analysed (capture {shown}{more}): not counted, "
            "capture those fields again",
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the fields already captured (they were promised), then stop."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put(None, timeout=timeout)
        if self.worker.is_alive():
            self.worker.join(timeout)
        with self._lock:
            left = sum(self._pending.values())
        if left:
            # Recorded as accepted in the store: the next start reports them as interrupted.
            log.warning("stopping with %d capture(s) not analysed after %.0f s: not counted; "
                        "the next start lists them", left, timeout)
        self.source.close()

    def finalise(self, slide_id: str | None = None) -> dict[str, Any]:
        """Finalise the open slide once every field captured for it is counted: a capture
        accepted (202) and still analysing would otherwise be refused after the report."""
        with self._lock:
            self.session.require_slide(slide_id)
            n = self._pending.get(self.session.slide["id"], 0)
            if n:
                raise SessionError(
                    f"{n} field{'s' if n != 1 else ''} captured for this slide "
                    f"{'are' if n != 1 else 'is'} still being analysed: finalise when "
                    f"{'they are' if n != 1 else 'it is'} counted")
            return self.session.finalise(slide_id)

    # ------------------------------------------------------------------ triggers

    def capture(self, trigger: str = "api") -> dict[str, Any]:
        """Take the frame now and queue it. Raises SessionError (slide not accepting fields),
        BusyError (queue full), CameraError / FrameError (no usable frame)."""
        if self._stop.is_set():
            raise BusyError("the station is shutting down")
        st = self.session.state()
        if st["finalised"]:
            raise SessionError(
                f"slide {st['sample_id']} is finalised: start a new slide to count another"
            )
        if st["complete"]:
            raise SessionError(
                f"target of {st['target']} cells reached: review and finalise, or extend the "
                "target to count more"
            )
        store = self.session.store
        try:
            store.require_free("capture refused, this field was not counted")
        except DiskFullError as e:
            self._set_error("disk", str(e))
            raise
        with self._lock:
            # Read again under the lock a finalise or a new slide takes: a frame is never
            # queued for a slide that closed in between.
            slide = self.session.slide
            if slide["id"] != st["slide_id"] or slide.get("status") != "open":
                raise SessionError(f"slide {st['sample_id']} was closed meanwhile: capture "
                                   "again to count on the open slide")
            waiting = self._q.qsize()
            if waiting >= self.queue_max:
                msg = (f"capture refused: {waiting} fields are already waiting for analysis; "
                       "wait a moment and capture again")
                self._set_error("busy", msg)
                raise BusyError(msg)
            t0 = time.perf_counter()
            try:
                frame = self.source.capture()
            except CameraError as e:
                self._set_error("camera", str(e))
                raise
            except FrameError as e:
                self._set_error("frame", f"corrupt frame, not counted: {e}")
                raise
            try:
                cid = store.capture_accepted(st["slide_id"], trigger, frame.source, now_iso())
            except StoreError as e:
                self._set_error("disk" if isinstance(e, DiskFullError) else "store",
                                f"capture refused: {e}")
                raise
            job = _Job(cid, frame, trigger, t0, st["slide_id"])
            try:
                self._q.put_nowait(job)
            except queue.Full:  # cannot happen under the lock, but never lose it silently
                self._record_refused(job, "analysis queue full")
                raise BusyError("capture refused: analysis queue full") from None
            self._pending[job.slide_id] = self._pending.get(job.slide_id, 0) + 1
        self._status()
        return {"capture_id": job.capture_id, "queued": self._q.qsize(),
                "busy": self._busy is not None, "source": frame.source}

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                if self._q.empty():
                    return
                continue
            with self._lock:
                self._busy = job
            self._status()
            try:
                self._process(job)
            except Exception as e:  # the worker must survive anything one field does
                log.exception("field %d failed", job.capture_id)
                self._refuse(job, "analysis", f"field not counted: internal error: {e}")
            finally:
                with self._lock:
                    self._busy = None
                    n = self._pending.get(job.slide_id, 0) - 1
                    if n > 0:
                        self._pending[job.slide_id] = n
                    else:
                        self._pending.pop(job.slide_id, None)
                self._status()

    @contextlib.contextmanager
    def _busy_section(self) -> Iterator[None]:
        if self.liveness is None:
            yield
        else:
            with self.liveness.busy("field analysis"):
                yield

    @contextlib.contextmanager
    def between_fields(self) -> Iterator[None]:
        """Waits for the field being analysed to be counted; no field starts inside."""
        with self._field_lock:
            yield

    def frames(self, n: int) -> list[np.ndarray]:
        """Up to ``n`` analysis frames from the camera, not queued nor counted. A replayed
        folder is put back where it was, so the fields looked at are still counted later."""
        out: list[np.ndarray] = []
        with self._lock:
            pos = getattr(self.source, "position", None)
            try:
                for _ in range(n):
                    out.append(self.source.capture().rgb)
            except (CameraError, FrameError):
                if not out:
                    raise
                # A corrupt frame or the end of a replay: measure on those already taken.
            finally:
                seek = getattr(self.source, "seek", None)
                if isinstance(pos, int) and seek is not None:
                    seek(pos)
        return out

    def _process(self, job: _Job) -> None:
        with self._field_lock:
            self._process_field(job)

    def _process_field(self, job: _Job) -> None:
        with self._busy_section():
            result = self.analyze(job.frame.rgb, job.frame.source)
        if result.error:
            self._refuse(job, "frame", f"field not counted: {result.error}")
            return
        try:
            summary = self.session.add_field(
                job.frame.rgb, result, source=job.frame.source,
                captured_at=job.frame.captured_at, t_trigger=job.t0, capture_id=job.capture_id,
                slide_id=job.slide_id,
            )
        except DiskFullError as e:
            self._refuse(job, "disk", str(e))
            return
        except (StoreError, SessionError) as e:
            self._refuse(job, "store", f"field not counted: {e}")
            return
        ms = (time.perf_counter() - job.t0) * 1000.0
        self.latencies_ms = [*self.latencies_ms[-199:], ms]
        self.fields_done += 1
        self.last_field = {"field_id": summary["id"], "capture_id": job.capture_id,
                           "latency_ms": round(ms, 1), "trigger": job.trigger}
        if self.last_error and self.last_error["kind"] in ("frame", "disk", "store", "analysis",
                                                           "camera", "busy"):
            self.last_error = None  # a field went through: the problem is over

    def _refuse(self, job: _Job, kind: str, message: str) -> None:
        self._set_error(kind, message)
        self._record_refused(job, message)

    def _record_refused(self, job: _Job, message: str) -> None:
        try:
            self.session.store.capture_refused(job.capture_id, message, now_iso())
        except StoreError as e:
            # The page already says the field was not counted; at worst the next start also
            # lists this capture as not analysed, which is true.
            log.warning("capture %d: could not record its refusal: %s", job.capture_id, e)

    # ------------------------------------------------------------------ health

    def _set_error(self, kind: str, message: str) -> None:
        log.warning("%s", message)
        self.last_error = {"kind": kind, "message": message, "at": now_iso()}
        self._status()

    def clear_error(self) -> None:
        self.last_error = None
        self.interrupted = []
        self._status()

    def status(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        busy = self._busy
        try:
            cam = self.source.status()
        except Exception as e:
            cam = {"ok": False, "message": str(e)}
        out = {
            "camera": {"name": getattr(self.source, "name", "camera"), **cam},
            "queue": self._q.qsize(),
            "queue_max": self.queue_max,
            "busy": busy is not None,
            "worker_alive": self.worker.is_alive(),
            "fields_analysed": self.fields_done,
            "latency_ms_median": round(lat[len(lat) // 2], 1) if lat else None,
            "last_field": self.last_field,
            "last_error": self.last_error,
            "interrupted_captures": self.interrupted,
            "backup": self.session.store.last_backup,
            "started_at": self.started_at,
            **self.info,
        }
        with contextlib.suppress(OSError):
            out["disk_free_mb"] = self.session.store.free_bytes() // (1024 * 1024)
        if self.extra_status is not None:
            try:
                out.update(self.extra_status())
            except Exception:  # health reporting must never break the page
                log.exception("extra station status failed")
        return out

    def poll(self) -> None:
        """Called about once a second: pushes a status event when the camera's health changed
        (a camera unplugged between captures shows on the page before the next capture)."""
        try:
            cam = self.source.status()
        except Exception as e:
            cam = {"ok": False, "message": str(e)}
        key = (bool(cam.get("ok")), str(cam.get("message", "")))
        if key != self._last_cam:
            self._last_cam = key
            self._status()

    def _status(self) -> None:
        self.publish(Event("status", self.status()))
