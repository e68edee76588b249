"""Every odd file either becomes a correct RGB uint8 field or a clear, specific error."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_wbc.pipeline.imageio import (
    MAX_PIXELS,
    ImageError,
    decode_image,
    list_images,
    read_header,
    read_image,
)


def _field(h: int = 48, w: int = 64) -> np.ndarray:
    """An RGB test pattern whose channels differ, so a BGR/RGB swap is visible."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 1] = np.arange(w, dtype=np.uint8)[None, :]
    rgb[..., 2] = 30
    return rgb


def _write(path: Path, img: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), img)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".tif"])
def test_colour_formats_read_as_rgb(tmp_path: Path, ext: str) -> None:
    rgb = _field()
    p = _write(tmp_path / f"f{ext}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    tol = 8 if ext == ".jpg" else 0
    assert abs(int(out[..., 0].mean()) - 200) <= tol  # red stays in channel 0
    assert abs(int(out[..., 2].mean()) - 30) <= tol


def test_greyscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = np.tile(np.arange(64, dtype=np.uint8), (40, 1))
    out = read_image(_write(tmp_path / "g.png", grey))
    assert out.shape == (40, 64, 3)
    assert (
        (out[..., 0] == grey).all() and (out[..., 1] == grey).all() and (out[..., 2] == grey).all()
    )


def test_16_bit_is_scaled_not_truncated(tmp_path: Path) -> None:
    img16 = np.full((20, 30, 3), 65535 // 2, np.uint16)
    img16[..., 0] = 65535  # blue in BGR order
    out = read_image(_write(tmp_path / "deep.png", img16))
    assert out.dtype == np.uint8
    assert out[0, 0, 2] == 255 and abs(int(out[0, 0, 0]) - 127) <= 1


def test_16_bit_greyscale_tiff(tmp_path: Path) -> None:
    img16 = np.full((20, 30), 4096, np.uint16)
    out = read_image(_write(tmp_path / "deep.tif", img16))
    assert out.shape == (20, 30, 3) and abs(int(out[0, 0, 0]) - 16) <= 1


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    bgra = np.zeros((10, 10, 4), np.uint8)
    bgra[..., 2] = 255  # red
    bgra[:, :5, 3] = 255  # left half opaque, right half transparent
    out = read_image(_write(tmp_path / "a.png", bgra))
    assert out.shape == (10, 10, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 9]) == (255, 255, 255)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        read_image(p)


def test_non_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image"):
        read_image(p)


def test_truncated_jpeg_is_refused_not_half_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", noisy)
    assert ok
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageError, match="truncated JPEG"):
        read_image(p)


def test_truncated_png(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".png", np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    assert ok
    p = tmp_path / "cut.png"
    p.write_bytes(buf.tobytes()[: len(buf) - 40])
    with pytest.raises(ImageError, match="PNG"):
        read_image(p)


def test_truncated_bmp(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".bmp", _field())
    assert ok
    p = tmp_path / "cut.bmp"
    p.write_bytes(buf.tobytes()[:500])
    with pytest.raises(ImageError, match="truncated BMP"):
        read_image(p)


def test_corrupt_jpeg_body(tmp_path: Path) -> None:
    # Right header, garbage where the pixels should be: the decoder's failure becomes an error.
    data = bytearray(cv2.imencode(".jpg", _field())[1].tobytes())
    sos = data.find(b"\xff\xda")
    data[20:sos] = b"\x00" * (sos - 20)
    p = tmp_path / "bad.jpg"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageError):
        read_image(p)


def test_enormous_png_refused_from_its_header(tmp_path: Path) -> None:
    # Only a header claiming 10000 x 6000 (60 MP): refused before any pixel buffer exists.
    ihdr = struct.pack(">IIBBBBB", 10000, 6000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    p = tmp_path / "huge.png"
    p.write_bytes(data)
    assert read_header(data).width == 10000
    with pytest.raises(ImageError, match="60 MP"):
        read_image(p)


def test_enormous_jpeg_header(tmp_path: Path) -> None:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 9000, 9000, 1) + b"\x01\x11\x00"
    data = b"\xff\xd8" + sof + b"\xff\xd9"
    assert read_header(data).height == 9000
    with pytest.raises(ImageError, match="MP"):
        decode_image(data)
    assert MAX_PIXELS < 9000 * 9000


def test_big_but_allowed_image_reads(tmp_path: Path) -> None:
    img = np.full((1200, 1600, 3), 180, np.uint8)
    assert read_image(_write(tmp_path / "big.png", img)).shape == (1200, 1600, 3)


def test_missing_and_folder_and_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="folder"):
        read_image(tmp_path / "dir.jpg")
    p = _write(tmp_path / "ok.png", _field())

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ImageError, match="Permission denied"):
        read_image(p)


def test_list_images_folders_and_files(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", "c.tiff", "notes.txt", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jpg").write_bytes(b"x")
    explicit = tmp_path / "notes.txt"
    got = list_images([tmp_path, explicit])
    assert [p.name for p in got] == ["a.png", "b.JPG", "c.tiff", "notes.txt"]


def _strip_tiff(h: int = 50, w: int = 60) -> bytes:
    """An RGB TIFF with its directory first and the pixel strip after it (as cameras and
    libtiff write them), so cutting the file loses pixels, not the directory."""
    px = np.full((h, w, 3), 100, np.uint8).tobytes()
    entries = [
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, 0), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(px)),
    ]  # fmt: skip
    strip_at = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, typ, n, val in entries:
        val = strip_at if tag == 273 else val
        packed = struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val)
        out += struct.pack("<HHI", tag, typ, n) + packed
    return out + struct.pack("<I", 0) + px


def test_truncated_tiff(tmp_path: Path) -> None:
    data = _strip_tiff()
    assert decode_image(data).shape == (50, 60, 3)
    p = tmp_path / "cut.tif"
    p.write_bytes(data[:-1000])
    with pytest.raises(ImageError, match="truncated TIFF"):
        read_image(p)
