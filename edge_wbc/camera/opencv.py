"""USB/UVC microscope cameras through OpenCV's VideoCapture.

A grabber thread reads frames continuously and keeps only the latest, so a capture is the field
under the objective *now*, not one from the driver's buffer a second ago, and the preview costs
the analysis nothing. When the camera stops delivering (unplugged, powered off) the grabber
keeps trying to reopen it and captures fail with a CameraError that says so.
"""

from __future__ import annotations

import logging
import threading
import time

import cv2
import numpy as np

from edge_wbc.camera import CameraError, Frame, fit_frame, preview_of

log = logging.getLogger(__name__)

#: A frame older than this is not "now": the camera has stopped.
STALE_S = 2.0
REOPEN_S = 2.0


class OpenCVSource:
    def __init__(self, device: str, width: int = 640, height: int = 480,
                 open_timeout_s: float = 5.0) -> None:
        self.device: int | str = int(device) if device.isdigit() else device
        self.width, self.height = width, height
        self.name = f"USB camera {device}" if isinstance(self.device, int) else f"camera {device}"
        self._lock = threading.Lock()
        self._latest: np.ndarray | None = None
        self._latest_t = 0.0
        self._frames = 0
        self._error = ""
        self._stop = threading.Event()
        try:
            self._cap = self._open()
        except cv2.error as e:
            raise CameraError(f"{self.name}: cannot open it: {_first_line(e)}") from None
        if self._cap is None:
            raise CameraError(
                f"{self.name}: cannot open it (is it plugged in, and not used by another "
                "program? for a USB camera try opencv:0, opencv:1 or opencv:/dev/videoN)"
            )
        self._thread = threading.Thread(target=self._grab, name="camera-grabber", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + open_timeout_s
        while time.monotonic() < deadline and self._latest is None and self._thread.is_alive():
            time.sleep(0.02)
        if self._latest is None:
            self.close()
            raise CameraError(f"{self.name}: opened but delivered no frame in {open_timeout_s} s")

    def _open(self) -> cv2.VideoCapture | None:
        cap = cv2.VideoCapture(self.device)
        if not cap.isOpened():
            cap.release()
            return None
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        # One buffered frame at most: older frames are not what is under the objective.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    @staticmethod
    def _read(cap: cv2.VideoCapture) -> np.ndarray | None:
        """The next frame as RGB, or None when the camera delivered none."""
        ok, bgr = cap.read()
        if not ok or bgr is None or not bgr.size:
            return None
        code = cv2.COLOR_BGR2RGB if bgr.ndim == 3 else cv2.COLOR_GRAY2RGB
        return np.asarray(cv2.cvtColor(bgr, code))

    def _grab(self) -> None:
        # A driver or backend failure raises cv2.error out of read(), cvtColor() or a reopen;
        # it is one more way of delivering no frame: the grabber logs it once per outage (not
        # every REOPEN_S) and goes on reopening, instead of dying and losing the camera for good.
        reported = False
        while not self._stop.is_set():
            cap = self._cap
            rgb: np.ndarray | None = None
            problem = "no frames: camera unplugged or switched off?"
            if cap is not None:
                try:
                    rgb = self._read(cap)
                except Exception as e:  # the thread must outlive any frame
                    problem = "camera error (see the log); reopening it"
                    if not reported:
                        log.warning("%s: %s; reopening it", self.name, _first_line(e))
                        reported = True
            if rgb is not None:
                with self._lock:
                    self._latest, self._latest_t = rgb, time.monotonic()
                    self._frames += 1
                    self._error = ""
                reported = False
                continue
            with self._lock:
                self._error = problem
            self._release(cap)
            self._cap = None
            if self._stop.wait(REOPEN_S):
                break
            try:
                self._cap = self._open()
            except Exception as e:  # as above: try again in REOPEN_S
                with self._lock:
                    self._error = "camera error (see the log); reopening it"
                if not reported:
                    log.warning("%s: reopening failed: %s", self.name, _first_line(e))
                    reported = True
                continue
            if self._cap is not None:
                log.info("%s reopened", self.name)

    def _release(self, cap: cv2.VideoCapture | None) -> None:
        if cap is None:
            return
        try:
            cap.release()
        except Exception as e:  # a camera in error may refuse this too
            log.debug("%s: release failed: %s", self.name, e)

    def _fresh(self) -> np.ndarray:
        with self._lock:
            img, t, err = self._latest, self._latest_t, self._error
        if img is None or time.monotonic() - t > STALE_S:
            raise CameraError(f"{self.name}: {err or 'no recent frame'}; check the cable")
        return img

    def capture(self) -> Frame:
        return Frame(fit_frame(self._fresh(), self.width, self.height), self.name)

    def preview(self) -> np.ndarray | None:
        try:
            return preview_of(self._fresh())
        except CameraError:
            return None

    def status(self) -> dict[str, object]:
        try:
            self._fresh()
            return {"ok": True, "message": "live", "name": self.name}
        except CameraError as e:
            return {"ok": False, "message": str(e), "name": self.name}

    def close(self) -> None:
        self._stop.set()
        t = getattr(self, "_thread", None)
        if t is not None and t.is_alive():
            t.join(3.0)
        self._release(self._cap)
        self._cap = None


def _first_line(e: BaseException) -> str:
    """OpenCV's errors run over several lines (source file, assertion); the first says what."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
