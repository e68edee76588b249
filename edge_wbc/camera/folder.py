"""Replay a folder of field images as if they came from the microscope camera (demo, tests).

The "stage" stands on one image at a time: the preview shows it, a capture takes it and moves
on to the next, as a technician moves to the next field after pressing capture. At the end of
the folder it starts again (``loop``) or reports that the folder is used up.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edge_wbc.camera import CameraError, Frame, FrameError, fit_frame, preview_of
from edge_wbc.pipeline.imageio import ImageError, list_folder, read_image


class FolderSource:
    def __init__(self, folder: str | Path, width: int = 640, height: int = 480, *,
                 loop: bool = True) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CameraError(f"folder source: {self.folder} is not a folder")
        try:
            # Not list_images: it keeps a folder it cannot list as an entry (the batch reports
            # it), which here would become a one-"field" camera whose field is the folder.
            self.files = list_folder(self.folder)
        except ImageError as e:
            raise CameraError(f"folder source: {e}") from None
        if not self.files:
            raise CameraError(f"folder source: no images (jpg, png, bmp, tif) in {self.folder}")
        self.width, self.height, self.loop = width, height, loop
        self.name = f"folder {self.folder}"
        self._i = 0
        self._lock = threading.Lock()
        self._preview: tuple[int, np.ndarray | None] | None = None

    @property
    def position(self) -> int:
        return self._i

    def seek(self, index: int) -> None:
        """Put the "stage" on field ``index`` (the station resumes a slide where it stopped and
        starts a new slide at the first field, so a replay never counts a field twice)."""
        with self._lock:
            self._i = max(0, int(index)) % len(self.files) if self.loop else \
                min(max(0, int(index)), len(self.files))

    def index_of(self, source: str) -> int | None:
        """The position of the file a frame's ``source`` names (as :meth:`capture` reports it),
        or None when it is not one of this folder's files."""
        try:
            wanted = Path(source).resolve()
            # Resolved: the same file named another way (a relative folder, a link to it).
            return next((i for i, p in enumerate(self.files) if p.resolve() == wanted), None)
        except (OSError, RuntimeError):
            return None

    def _used_up(self) -> bool:
        return not self.loop and self._i >= len(self.files)

    def capture(self) -> Frame:
        with self._lock:
            if self._i >= len(self.files):
                if not self.loop:
                    raise CameraError(
                        f"folder source: all {len(self.files)} fields of {self.folder} captured"
                    )
                self._i = 0
            path = self.files[self._i]
            self._i += 1
        try:
            rgb = read_image(path)
        except ImageError as e:
            # The stage has moved on: the next capture takes the next file.
            raise FrameError(f"{path.name}: {e}") from e
        return Frame(fit_frame(rgb, self.width, self.height), str(path))

    def preview(self) -> np.ndarray | None:
        with self._lock:
            if self._used_up():
                return None  # no field left under the "objective": nothing a capture would take
            i = self._i % len(self.files)
            cached = self._preview
        if cached is not None and cached[0] == i:
            return cached[1]
        try:
            img: np.ndarray | None = preview_of(fit_frame(read_image(self.files[i]),
                                                          self.width, self.height))
        except ImageError:
            img = None  # the capture reports the error; the preview just shows nothing
        with self._lock:
            self._preview = (i, img)
        return img

    def status(self) -> dict[str, object]:
        with self._lock:
            n = len(self.files)
            if self._used_up():
                return {"ok": False, "message": f"folder used up ({n} fields captured)",
                        "name": self.name}
            return {"ok": True, "message": f"field {self._i % n + 1} of {n}", "name": self.name}

    def close(self) -> None:
        pass
