"""Every odd file either becomes a correct RGB uint8 field or a clear, specific error."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_wbc.pipeline.imageio import (
    ANALYSIS_MAX_PIXELS,
    MAX_JPEG_PIXELS,
    MIN_SIDE,
    ImageError,
    decode,
    decode_image,
    list_images,
    read_field,
    read_header,
    read_image,
)


def _field(h: int = 72, w: int = 96) -> np.ndarray:
    """An RGB test pattern whose channels differ, so a BGR/RGB swap is visible."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 1] = np.arange(w, dtype=np.uint8)[None, :] * 2
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
    assert out.dtype == np.uint8 and out.shape == (72, 96, 3)
    tol = 8 if ext == ".jpg" else 0
    assert abs(int(out[..., 0].mean()) - 200) <= tol  # red stays in channel 0
    assert abs(int(out[..., 2].mean()) - 30) <= tol


def test_greyscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = np.tile(np.arange(80, dtype=np.uint8), (70, 1))
    out = read_image(_write(tmp_path / "g.png", grey))
    assert out.shape == (70, 80, 3)
    assert (
        (out[..., 0] == grey).all() and (out[..., 1] == grey).all() and (out[..., 2] == grey).all()
    )


def test_16_bit_is_scaled_not_truncated(tmp_path: Path) -> None:
    img16 = np.full((70, 80, 3), 65535 // 2, np.uint16)
    img16[..., 0] = 65535  # blue in BGR order
    out = read_image(_write(tmp_path / "deep.png", img16))
    assert out.dtype == np.uint8
    assert out[0, 0, 2] == 255 and abs(int(out[0, 0, 0]) - 127) <= 1


def test_16_bit_greyscale_tiff(tmp_path: Path) -> None:
    img16 = np.full((70, 80), 4096, np.uint16)
    out = read_image(_write(tmp_path / "deep.tif", img16))
    assert out.shape == (70, 80, 3) and abs(int(out[0, 0, 0]) - 16) <= 1


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    bgra = np.zeros((70, 70, 4), np.uint8)
    bgra[..., 2] = 255  # red
    bgra[:, :35, 3] = 255  # left half opaque, right half transparent
    out = read_image(_write(tmp_path / "a.png", bgra))
    assert out.shape == (70, 70, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 69]) == (255, 255, 255)


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
    # Only a header claiming 10000 x 6000 (60 MP, 172 MB as RGB): refused before any pixel
    # buffer exists.
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
    assert MAX_JPEG_PIXELS < 9000 * 9000


def test_big_but_allowed_image_reads(tmp_path: Path) -> None:
    img = np.full((1200, 1600, 3), 180, np.uint8)
    got = read_field(_write(tmp_path / "big.png", img))
    assert got.rgb.shape == (1200, 1600, 3) and got.scale == 1.0 and got.notes == ()


def test_missing_and_folder_and_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="folder"):
        read_image(tmp_path / "dir.jpg")
    p = _write(tmp_path / "ok.png", _field())

    real_open = os.open

    def deny(path: object, *args: object, **kw: object) -> int:
        # Tests run as root, for whom chmod 000 denies nothing.
        if Path(str(path)) == p:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
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


def _strip_tiff(
    h: int = 70,
    w: int = 80,
    pages: int = 1,
    override: dict[int, tuple[int, int, int]] | None = None,
) -> bytes:
    """An RGB TIFF with each directory first and its pixel strip after it (as cameras and
    libtiff write them), so cutting the file loses pixels, not the directory. ``override``:
    tag -> (type, count, value) replacing or adding entries of the first page."""
    px = np.full((h, w, 3), 100, np.uint8).tobytes()
    base = {
        256: (3, 1, w), 257: (3, 1, h), 258: (3, 1, 8), 259: (3, 1, 1), 262: (3, 1, 2),
        273: (4, 1, 0), 277: (3, 1, 3), 278: (3, 1, h), 279: (4, 1, len(px)),
    }  # fmt: skip
    out = b"II*\x00" + struct.pack("<I", 8)
    for page in range(pages):
        entries = base | (override or {}) if page == 0 else base
        ifd_at = len(out)
        strip_at = ifd_at + 2 + 12 * len(entries) + 4
        nxt = strip_at + len(px) if page < pages - 1 else 0
        out += struct.pack("<H", len(entries))
        for tag in sorted(entries):
            typ, n, val = entries[tag]
            val = strip_at if tag == 273 and val == 0 else val
            packed = struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val)
            out += struct.pack("<HHI", tag, typ, n) + packed
        out += struct.pack("<I", nxt) + px
    return out


def test_truncated_tiff(tmp_path: Path) -> None:
    data = _strip_tiff()
    assert decode_image(data).shape == (70, 80, 3)
    p = tmp_path / "cut.tif"
    p.write_bytes(data[:-1000])
    with pytest.raises(ImageError, match="truncated TIFF"):
        read_image(p)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"II*\x00\x08", "truncated TIFF"),
        (b"MM\x00*\x00\x00", "truncated TIFF"),
        (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 3), "truncated TIFF"),
        (b"II*\x00" + struct.pack("<I", 4), "truncated TIFF"),
        (_strip_tiff(override={256: (3, 0, 0)}), "no image width"),
        (_strip_tiff(override={279: (4, 1, 0)}), "empty strip"),
        (_strip_tiff(override={279: (4, 1, 100)}), "strips hold 100 of"),
        (_strip_tiff(override={273: (4, 0, 0), 279: (4, 0, 0)}), "pixel data"),
        (_strip_tiff(override={273: (4, 2, 0)}), "TIFF"),
        (_strip_tiff(override={256: (2, 1, 80)}), "type 2"),
        (_strip_tiff(override={256: (3, 1, 60000), 257: (3, 1, 60000)}), "TIFF"),
    ],
)
def test_short_or_odd_tiff_is_this_files_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_multi_page_tiff_says_page_1_was_used(tmp_path: Path) -> None:
    p = tmp_path / "stack.tif"
    p.write_bytes(_strip_tiff(pages=3))
    got = read_field(p)
    assert got.rgb.shape == (70, 80, 3)
    assert got.notes == ("the file has 3 pages: page 1 was used",)
    single = tmp_path / "one.tif"
    single.write_bytes(_strip_tiff())
    assert read_field(single).notes == ()


FIELD_JPEG = Path(__file__).parent / "fixtures" / "fields" / "BloodImage_00249.jpg"


def _cut_with_end_marker(data: bytes) -> bytes:
    return data[: int(len(data) * 0.6)] + b"\xff\xd9"


def _zeros_inside(data: bytes) -> bytes:
    sos = data.find(b"\xff\xda")
    k = (sos + len(data)) // 2
    return data[:k] + b"\x00" * 4096 + data[k + 4096 :]


@pytest.mark.parametrize("damage", [_cut_with_end_marker, _zeros_inside])
def test_damaged_jpeg_is_an_error_not_a_grey_field(damage: object, tmp_path: Path) -> None:
    # OpenCV decodes both to a whole-looking 640x480 field (libjpeg only warns "Corrupt JPEG
    # data: premature end of data segment"): it must not be analysed as if whole.
    data = FIELD_JPEG.read_bytes()
    bad = damage(data)  # type: ignore[operator]
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageError, match=r"damaged or unsupported JPEG .*Corrupt JPEG data"):
        decode_image(bad)
    assert decode_image(data).shape == (480, 640, 3)


def test_station_refuses_a_damaged_capture(tmp_path: Path) -> None:
    from edge_wbc.camera import FrameError, open_source

    d = tmp_path / "fields"
    d.mkdir()
    (d / "00.jpg").write_bytes(_cut_with_end_marker(FIELD_JPEG.read_bytes()))
    (d / "01.jpg").write_bytes(FIELD_JPEG.read_bytes())
    src = open_source(f"folder:{d}", loop=False)
    with pytest.raises(FrameError, match="Corrupt JPEG"):
        src.capture()
    assert src.capture().rgb.shape[2] == 3  # the next field is taken


def test_jpeg_matches_opencv(tmp_path: Path) -> None:
    data = FIELD_JPEG.read_bytes()
    ref = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    got = decode_image(data)
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0


def test_cmyk_and_grey_jpegs(tmp_path: Path) -> None:
    import io

    from PIL import Image

    rgb = _field()
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    got = decode_image(buf.getvalue())
    assert got.shape == (72, 96, 3) and abs(int(got[..., 0].mean()) - 200) <= 3
    grey = cv2.imencode(".jpg", np.full((70, 90), 77, np.uint8))[1].tobytes()
    g = decode_image(grey)
    assert g.shape == (70, 90, 3) and abs(int(g.mean()) - 77) <= 1


@pytest.mark.parametrize(
    "size", [(1, 1), (1, 640), (640, 1), (2, 2), (16, 16), (32, 32), (63, 400)]
)
@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_too_small(size: tuple[int, int], ext: str) -> None:
    h, w = size
    ok, buf = cv2.imencode(ext, np.full((h, w, 3), 120, np.uint8))
    assert ok
    with pytest.raises(ImageError, match=f"too small \\({w}x{h}\\).*{MIN_SIDE}x{MIN_SIDE}"):
        decode_image(buf.tobytes())


def test_smallest_accepted_field() -> None:
    _ok, buf = cv2.imencode(".png", np.full((MIN_SIDE, MIN_SIDE, 3), 120, np.uint8))
    assert decode_image(buf.tobytes()).shape == (MIN_SIDE, MIN_SIDE, 3)


@pytest.mark.timeout(30)
def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "field.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file \\(a FIFO\\)"):
        read_image(fifo)


def test_device_file_is_refused() -> None:
    with pytest.raises(ImageError, match="not a regular file"):
        read_image("/dev/zero")


def test_symlink_loop_and_dangling_link(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(ImageError, match="symbolic link loop"):
        read_image(a)
    gone = tmp_path / "gone.jpg"
    gone.symlink_to(tmp_path / "never.jpg")
    with pytest.raises(ImageError, match="no such file \\(a link"):
        read_image(gone)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".bmp"])
def test_large_frames_are_read_reduced(ext: str) -> None:
    # A cap of 12,000 pixels stands in for ANALYSIS_MAX_PIXELS (4 MP) to keep the test small.
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, :200] = (40, 80, 200)  # BGR: left half blue-ish, right half black
    _ok, buf = cv2.imencode(ext, img)
    got = decode(buf.tobytes(), max_pixels=12_000)
    h, w = got.rgb.shape[:2]
    assert h * w <= 12_000 and abs(w / h - 4 / 3) < 0.05
    assert (got.width, got.height) == (400, 300) and got.scale == w / 400
    assert "400x300 analysed reduced to" in got.notes[0]
    assert abs(int(got.rgb[h // 2, w // 4, 2]) - 40) <= 6  # colours survive, RGB order kept
    assert ANALYSIS_MAX_PIXELS == 4_000_000


def test_too_many_decoded_bytes_refused_before_decoding() -> None:
    # 16-bit RGBA 5000x3000: 114 MB decoded.
    ihdr = struct.pack(">IIBBBBB", 5000, 3000, 16, 6, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    with pytest.raises(ImageError, match=r"4 channel\(s\) of 16 bit.*114 MB"):
        decode_image(data)


def test_station_answers_422_and_counts_nothing_for_bad_files(tmp_path: Path) -> None:
    import http.client
    import json

    from station_fakes import RunningStation

    d = tmp_path / "fields"
    d.mkdir()
    (d / "00.jpg").write_bytes(_cut_with_end_marker(FIELD_JPEG.read_bytes()))
    (d / "01.tif").write_bytes(b"II*\x00\x08")
    (d / "02.png").write_bytes(cv2.imencode(".png", np.full((2, 2, 3), 9, np.uint8))[1].tobytes())
    (d / "03.tif").write_bytes(_strip_tiff(override={279: (4, 1, 0)}))
    (d / "04.jpg").write_bytes(FIELD_JPEG.read_bytes())
    rs = RunningStation(tmp_path / "data", f"folder:{d}", target=10)

    def post(path: str) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", rs.server.port, timeout=10)
        conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read() or b"{}")
        conn.close()
        return r.status, body

    try:
        reasons = []
        for _ in range(4):
            status, body = post("/api/capture")
            assert status == 422, body  # refused, never a 500
            reasons.append(json.dumps(body))
        assert "Corrupt JPEG data" in reasons[0] and "truncated TIFF" in reasons[1]
        assert "too small" in reasons[2] and "empty strip" in reasons[3]
        assert post("/api/capture")[0] == 202
        rs.wait_idle()
        assert rs.session.state()["fields"] == 1  # only the whole field was counted
    finally:
        rs.close()
