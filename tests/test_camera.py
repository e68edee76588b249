"""Camera sources: folder replay, OpenCV VideoCapture (on a video file), picamera2 adapter (on a
stand-in module with picamera2's API, since libcamera exists only on Raspberry Pi OS)."""

from __future__ import annotations

import logging
import sys
import time
import types
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest

from edge_wbc.camera import (
    CameraError,
    FrameError,
    FrameSource,
    fit_frame,
    open_source,
    parse_source,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fields"


@pytest.mark.parametrize(
    ("spec", "kind", "arg"),
    [("folder:samples/fields", "folder", "samples/fields"), ("opencv:0", "opencv", "0"),
     ("opencv:/dev/video2", "opencv", "/dev/video2"), ("picamera2", "picamera2", "0"),
     ("picamera2:1", "picamera2", "1")],
)
def test_parse_source(spec: str, kind: str, arg: str) -> None:
    assert parse_source(spec) == (kind, arg)


@pytest.mark.parametrize("spec", ["", "folder:", "usb:0", "picamera2:x", "opencv"])
def test_parse_source_rejects(spec: str) -> None:
    with pytest.raises(CameraError, match="not understood"):
        parse_source(spec)


def _folder(tmp_path: Path, n: int = 3) -> Path:
    d = tmp_path / "f"
    d.mkdir()
    for i, src in enumerate(sorted(SAMPLES.glob("*.jpg"))[:n]):
        (d / f"{i:02d}.jpg").write_bytes(src.read_bytes())
    return d


def test_folder_replays_in_order_and_loops(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    src = open_source(f"folder:{d}")
    assert isinstance(src, FrameSource)
    first_preview = src.preview()
    names = [Path(src.capture().source).name for _ in range(4)]
    assert names == ["00.jpg", "01.jpg", "02.jpg", "00.jpg"]
    # The preview shows the field the next capture will take.
    nxt = cv2.cvtColor(cv2.imread(str(d / "01.jpg")), cv2.COLOR_BGR2RGB)
    prev = src.preview()
    assert prev is not None and first_preview is not None
    small = cv2.resize(nxt, (prev.shape[1], prev.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(prev.astype(int) - small.astype(int)).mean() < 3
    assert src.status()["ok"] and "2 of 3" in src.status()["message"]


def test_folder_without_loop_reports_end(tmp_path: Path) -> None:
    src = open_source(f"folder:{_folder(tmp_path, 2)}", loop=False)
    src.capture()
    src.capture()
    with pytest.raises(CameraError, match="all 2 fields"):
        src.capture()


def test_a_used_up_folder_says_so_and_previews_nothing(tmp_path: Path) -> None:
    # Without loop the end of the folder is the end: the page must not show "field 1 of 2"
    # and a preview of a field the next capture refuses.
    src = open_source(f"folder:{_folder(tmp_path, 2)}", loop=False)
    src.capture()
    assert src.status() == {"ok": True, "message": "field 2 of 2", "name": src.name}
    assert src.preview() is not None
    src.capture()
    assert src.status() == {"ok": False, "message": "folder used up (2 fields captured)",
                            "name": src.name}
    assert src.preview() is None
    src.seek(0)  # a new slide: the folder is there again
    assert src.status()["ok"] and src.preview() is not None


def test_a_folder_that_cannot_be_listed_is_a_camera_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a user without permission sees it (tests run as root, so EACCES is simulated). Before,
    # the folder became a camera with one "field": the folder itself.
    import errno

    d = _folder(tmp_path, 2)
    real = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self == d:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(CameraError, match=rf"cannot list folder {d}: Permission denied"):
        open_source(f"folder:{d}")


def test_folder_seek(tmp_path: Path) -> None:
    src = open_source(f"folder:{_folder(tmp_path, 3)}", loop=False)
    src.seek(2)
    assert Path(src.capture().source).name == "02.jpg"
    with pytest.raises(CameraError, match="all 3 fields"):
        src.capture()
    src.seek(0)  # a new slide starts at the first field again
    assert Path(src.capture().source).name == "00.jpg"


def test_folder_corrupt_frame_is_a_frame_error_and_moves_on(tmp_path: Path) -> None:
    d = _folder(tmp_path, 2)
    good = (d / "00.jpg").read_bytes()
    (d / "00.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    src = open_source(f"folder:{d}")
    assert src.preview() is None
    with pytest.raises(FrameError, match=r"00\.jpg"):
        src.capture()
    assert Path(src.capture().source).name == "01.jpg"


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="not a folder"):
        open_source(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CameraError, match="no images"):
        open_source(f"folder:{tmp_path / 'empty'}")


def test_odd_frames_are_fitted_to_the_analysis_size(tmp_path: Path) -> None:
    d = tmp_path / "odd"
    d.mkdir()
    cv2.imwrite(str(d / "grey16.png"), (np.arange(800 * 1000) % 65535).reshape(800, 1000)
                .astype(np.uint16))
    frame = open_source(f"folder:{d}").capture()
    assert frame.rgb.shape == (480, 640, 3) and frame.rgb.dtype == np.uint8
    wide = np.zeros((100, 400, 3), np.uint8)
    wide[:, 150:250] = 255  # the centre survives the crop to 4:3
    out = fit_frame(wide, 640, 480)
    assert out.shape == (480, 640, 3) and out[240, 320].tolist() == [255, 255, 255]


def _video(path: Path, n: int = 15) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    assert w.isOpened()
    for i in range(n):
        img = np.full((240, 320, 3), (40, 80, 200), np.uint8)  # BGR order: red
        cv2.putText(img, str(i), (100, 150), cv2.FONT_HERSHEY_SIMPLEX, 3, (255, 255, 255), 5)
        w.write(img)
    w.release()
    return path


def test_opencv_source_frames_and_unplug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_wbc.camera import opencv as ocv

    monkeypatch.setattr(ocv, "STALE_S", 0.3)
    monkeypatch.setattr(ocv, "REOPEN_S", 30.0)
    src = open_source(f"opencv:{_video(tmp_path / 'v.avi')}")
    try:
        f = src.capture()
        assert f.rgb.shape == (480, 640, 3)
        r, _g, b = (int(v) for v in f.rgb[10, 10])
        assert r > 150 and b < 80  # BGR from OpenCV became RGB
        assert src.preview() is not None
        # The "camera" (a 15-frame file) stops delivering: captures fail visibly.
        time.sleep(0.6)
        with pytest.raises(CameraError, match="unplugged"):
            src.capture()
        assert not src.status()["ok"] and src.preview() is None
    finally:
        src.close()


class _FakeCapture:
    """cv2.VideoCapture's surface as OpenCVSource uses it; ``mode`` is what the next read does."""

    mode = "ok"
    opened = 0

    def __init__(self, device: object) -> None:
        type(self).opened += 1

    def isOpened(self) -> bool:  # OpenCV's name
        return True

    def set(self, prop: int, value: float) -> bool:
        return True

    def release(self) -> None:
        pass

    def read(self) -> tuple[bool, np.ndarray | None]:
        time.sleep(0.005)
        if self.mode == "raise":
            raise cv2.error("simulated backend failure")
        if self.mode == "two-channel":  # cvtColor refuses it with cv2.error
            return True, np.zeros((48, 64, 2), np.uint8)
        return True, np.full((48, 64, 3), 90, np.uint8)


def _until(check, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("failure", ["raise", "two-channel"])
def test_opencv_grabber_survives_opencv_errors(
    failure: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Before, a cv2.error out of read() or cvtColor() ended the grabber thread: the camera was
    # lost for good, though the driver came back a moment later.
    from edge_wbc.camera import opencv as ocv

    monkeypatch.setattr(ocv, "STALE_S", 0.2)
    monkeypatch.setattr(ocv, "REOPEN_S", 0.02)
    monkeypatch.setattr(_FakeCapture, "mode", "ok")
    monkeypatch.setattr(_FakeCapture, "opened", 0)
    monkeypatch.setattr(ocv.cv2, "VideoCapture", _FakeCapture)
    src = open_source("opencv:0")
    try:
        assert src.capture().rgb.shape == (480, 640, 3)
        with caplog.at_level("WARNING", logger=ocv.__name__):
            _FakeCapture.mode = failure
            _until(lambda: not src.status()["ok"], "the status never said the camera failed")
            _until(lambda: _FakeCapture.opened >= 4, "the grabber did not go on reopening")
        assert "camera error" in src.status()["message"]
        with pytest.raises(CameraError, match="camera error"):
            src.capture()
        # Once per outage in the log, not once per reopen.
        warnings = [r for r in caplog.records
                    if r.name == ocv.__name__ and r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "reopening" in warnings[0].getMessage()
        _FakeCapture.mode = "ok"
        _until(lambda: src.status()["ok"], "frames never came back")
        assert src.capture().rgb.shape == (480, 640, 3)
    finally:
        src.close()


def test_opencv_missing_device() -> None:
    with pytest.raises(CameraError, match="cannot open"):
        open_source("opencv:/nonexistent/video9")


def test_picamera2_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import fails like on a non-Pi
    with pytest.raises(CameraError, match="python3-picamera2"):
        open_source("picamera2")


class _StandInPicamera2:
    """picamera2's calls as the adapter uses them, returning arrays in picamera2's layouts."""

    instances: ClassVar[list[_StandInPicamera2]] = []

    def __init__(self, index: int = 0) -> None:
        self.index, self.started, self.config = index, False, None
        _StandInPicamera2.instances.append(self)

    def create_video_configuration(self, main: dict, lores: dict, buffer_count: int) -> dict:
        return {"main": main, "lores": lores}

    def configure(self, config: dict) -> None:
        self.config = config

    def start(self) -> None:
        self.started = True

    def capture_array(self, stream: str) -> np.ndarray:
        if stream == "main":
            w, h = self.config["main"]["size"]
            arr = np.zeros((h, w, 3), np.uint8)
            arr[:, :, 0] = 200  # B first in memory for "RGB888"
            return arr
        w, h = self.config["lores"]["size"]
        yuv = cv2.cvtColor(np.full((h, w, 3), (0, 0, 200), np.uint8), cv2.COLOR_RGB2YUV_I420)
        return yuv

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        pass


def test_picamera2_adapter_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("picamera2")
    mod.Picamera2 = _StandInPicamera2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", mod)
    src = open_source("picamera2", 640, 480)
    cam = _StandInPicamera2.instances[-1]
    assert cam.started and cam.config["main"] == {"size": (640, 480), "format": "RGB888"}
    lw, lh = cam.config["lores"]["size"]
    assert lw <= 480 and lw % 16 == 0 and lh % 16 == 0
    frame = src.capture()
    assert frame.rgb.shape == (480, 640, 3) and frame.rgb[0, 0].tolist() == [0, 0, 200]
    prev = src.preview()
    assert prev is not None and prev.shape == (lh, lw, 3)
    assert prev[5, 5, 2] > 150 and prev[5, 5, 0] < 50  # blue stays blue through YUV420
    src.close()
    assert not cam.started
