"""Where fields come from: one small interface over the Pi camera, USB/UVC cameras and folders.

``open_source("folder:DIR" | "picamera2" | "picamera2:N" | "opencv:N" | "opencv:/dev/videoN")``
returns a :class:`FrameSource`. ``capture()`` gives the analysis frame (RGB uint8 at the size the
pipeline is calibrated for, 640x480 by default: the segmenters see it letterboxed to their input
and cells are cropped from it at full resolution); ``preview()`` gives a small frame for the
page's live view, from a separate stream where the camera has one, so the preview never costs the
analysis its resolution or the analysis the preview its frame rate.

Two kinds of failure, both with a message for the technician:
:class:`CameraError` (the camera is gone or delivers nothing: unplugged, busy, wrong index) and
:class:`FrameError` (this one frame is unusable: a corrupt file; the next capture may work).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol, runtime_checkable

import numpy as np

from edge_wbc.config import CAMERA_SOURCES, split_camera_source

#: Longer side of preview frames (the page scales them; a 7" screen shows ~400 px of preview).
PREVIEW_SIDE = 480


class CameraError(Exception):
    """The camera cannot deliver frames; the message says what to check."""


class FrameError(Exception):
    """This frame cannot be used (corrupt, truncated); the source itself still works."""


@dataclass
class Frame:
    rgb: np.ndarray
    source: str  # file path, or the camera's name
    captured_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@runtime_checkable
class FrameSource(Protocol):
    #: What the page shows as the camera ("Pi camera", "USB camera 0", "folder samples/fields").
    name: str

    def capture(self) -> Frame:
        """The analysis frame at the moment of the trigger."""
        ...

    def preview(self) -> np.ndarray | None:
        """The latest display frame (RGB, small), or None when there is none yet."""
        ...

    def status(self) -> dict[str, object]:
        """Health for the page: at least {"ok": bool, "message": str}."""
        ...

    def close(self) -> None: ...


def parse_source(spec: str) -> tuple[str, str]:
    """'folder:DIR' -> ('folder', 'DIR'); 'opencv:0' -> ('opencv', '0'); 'picamera2[:N]';
    'samples' -> ('folder', the sample fields inside the package)."""
    spec = (spec or "").strip()
    parsed = split_camera_source(spec)
    if parsed is None:
        raise CameraError(f"camera source {spec!r} not understood: use {CAMERA_SOURCES}")
    if parsed[0] == "samples":
        from edge_wbc.bundled import packaged_samples

        return "folder", str(packaged_samples())
    return parsed


def open_source(
    spec: str, width: int = 640, height: int = 480, *, loop: bool = True
) -> FrameSource:
    kind, arg = parse_source(spec)
    if kind == "folder":
        from edge_wbc.camera.folder import FolderSource

        return FolderSource(arg, width, height, loop=loop)
    if kind == "opencv":
        from edge_wbc.camera.opencv import OpenCVSource

        return OpenCVSource(arg, width, height)
    from edge_wbc.camera.picam import Picamera2Source

    return Picamera2Source(int(arg), width, height)


def fit_frame(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bring a frame to the analysis size: centre-crop to the aspect ratio, then resize.

    Cropping rather than padding or stretching keeps cells round and their size in pixels what
    the postprocessing expects (cell_diameter_px is set for this frame size).
    """
    import cv2

    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    target = width / height
    if w / h > target:
        cw = round(h * target)
        x0 = (w - cw) // 2
        rgb = rgb[:, x0 : x0 + cw]
    elif w / h < target:
        ch = round(w / target)
        y0 = (h - ch) // 2
        rgb = rgb[y0 : y0 + ch]
    interp = cv2.INTER_AREA if rgb.shape[1] > width else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(rgb, (width, height), interpolation=interp))


def preview_of(rgb: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    s = side / max(h, w)
    if s >= 1:
        return rgb
    return cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
