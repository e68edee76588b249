"""The Raspberry Pi camera through picamera2 (imported only when used: it needs libcamera's
Python bindings from Raspberry Pi OS, which no other platform has).

Two streams from one configuration: ``main`` at the analysis size (RGB) and ``lores`` for the
page's preview (YUV420 on a Pi 4's ISP), as picamera2's detection examples do, so the preview
runs at its own small size and the analysis frame is never a rescaled preview.
"""

from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np

from edge_wbc.camera import PREVIEW_SIDE, CameraError, Frame, fit_frame


def _import_picamera2() -> Any:
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except ImportError as e:
        raise CameraError(
            "picamera2 is not available: on Raspberry Pi OS install python3-picamera2 and create "
            "the venv with --system-site-packages (scripts/install-pi.sh does both); elsewhere "
            f"use --source opencv:N or folder:DIR ({e})"
        ) from e
    return Picamera2


def lores_size(width: int, height: int, side: int = PREVIEW_SIDE) -> tuple[int, int]:
    s = min(1.0, side / max(width, height))
    # The ISP wants even dimensions (multiples of 2 for YUV420); 16 keeps every Pi model happy.
    return (max(16, int(width * s) // 16 * 16), max(16, int(height * s) // 16 * 16))


class Picamera2Source:
    def __init__(self, index: int = 0, width: int = 640, height: int = 480) -> None:
        Picamera2 = _import_picamera2()
        self.width, self.height = width, height
        self.name = "Pi camera" if index == 0 else f"Pi camera {index}"
        self._lock = threading.Lock()
        self._error = ""
        try:
            self.cam = Picamera2(index)
            self.lores = lores_size(width, height)
            config = self.cam.create_video_configuration(
                main={"size": (width, height), "format": "RGB888"},
                lores={"size": self.lores, "format": "YUV420"},
                buffer_count=4,
            )
            self.cam.configure(config)
            self.cam.start()
        except CameraError:
            raise
        except Exception as e:  # libcamera raises RuntimeError/IndexError/OSError variously
            raise CameraError(
                f"{self.name}: cannot start it ({e}); is the ribbon cable seated and the camera "
                "enabled, and no other program using it?"
            ) from e

    def capture(self) -> Frame:
        try:
            with self._lock:
                arr = self.cam.capture_array("main")
        except Exception as e:
            self._error = str(e)
            raise CameraError(f"{self.name}: capture failed ({e})") from e
        self._error = ""
        # picamera2's "RGB888" is B, G, R in memory (libcamera's naming is little-endian).
        rgb = np.ascontiguousarray(arr[:, :, 2::-1]) if arr.ndim == 3 else \
            cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
        return Frame(fit_frame(rgb, self.width, self.height), self.name)

    def preview(self) -> np.ndarray | None:
        try:
            with self._lock:
                arr = self.cam.capture_array("lores")
        except Exception as e:
            self._error = str(e)
            return None
        if arr.ndim == 2:  # YUV420 planar, Y then U then V (I420): (h * 3/2) x w
            w, h = self.lores
            # Not COLOR_YUV420p2RGB: in OpenCV that is YV12 (V before U) and swaps red and blue.
            return cv2.cvtColor(arr[: h * 3 // 2, :w], cv2.COLOR_YUV2RGB_I420)
        return np.ascontiguousarray(arr[:, :, 2::-1])

    def status(self) -> dict[str, object]:
        ok = not self._error
        return {"ok": ok, "message": "live" if ok else self._error, "name": self.name}

    def close(self) -> None:
        try:
            self.cam.stop()
            self.cam.close()
        except Exception:
            pass
