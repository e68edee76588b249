"""Reading fields from disk: every file either becomes an RGB uint8 array or a clear error.

Images are decoded from bytes with OpenCV (``cv2.imdecode``), after a look at the file's
header: the header gives the size, so an enormous image is refused before a decoder allocates
gigabytes for it, and a truncated file is caught instead of being analysed half grey.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_wbc.pipeline.preprocess import ensure_rgb_uint8

#: File name endings treated as images when a folder is listed.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

#: Largest field accepted. A 50 MP camera frame is far beyond any microscope camera's useful
#: resolution and would need ~150 MB as RGB, more for 16-bit; anything larger is refused.
MAX_PIXELS = 50_000_000

#: Files larger than this are refused before being read (an uncompressed 50 MP 16-bit RGBA
#: TIFF is 400 MB).
MAX_FILE_BYTES = 512 * 1024 * 1024


class ImageError(Exception):
    """This file cannot be analysed; the message says why in terms a user can act on."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "jpeg", "png", "bmp", "tiff"
    width: int
    height: int


def _jpeg_header(data: bytes) -> ImageHeader:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageError("corrupt JPEG: marker expected in the header")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image or start of scan before any frame header
        (seglen,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return ImageHeader("jpeg", int(w), int(h))
        i += 2 + seglen
    raise ImageError("truncated or corrupt JPEG: no frame header")


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageError("truncated or corrupt PNG: no IHDR chunk")
    w, h = struct.unpack(">II", data[16:24])
    return ImageHeader("png", int(w), int(h))


def _bmp_header(data: bytes) -> ImageHeader:
    if len(data) < 26:
        raise ImageError("truncated BMP header")
    (dib,) = struct.unpack("<I", data[14:18])
    if dib == 12:
        w, h = struct.unpack("<HH", data[18:22])
    else:
        w, h = struct.unpack("<ii", data[18:26])
    return ImageHeader("bmp", abs(int(w)), abs(int(h)))


def _tiff_header(data: bytes) -> ImageHeader:
    end = "<" if data[:2] == b"II" else ">"
    (magic,) = struct.unpack(end + "H", data[2:4])
    if magic == 43:
        raise ImageError(
            "BigTIFF files are not supported; save the field as an ordinary TIFF, PNG or JPEG"
        )
    (off,) = struct.unpack(end + "I", data[4:8])
    if off + 2 > len(data):
        raise ImageError("truncated TIFF: first directory is past the end of the file")
    (count,) = struct.unpack(end + "H", data[off : off + 2])
    values: dict[int, list[int]] = {}
    for k in range(count):
        e = off + 2 + 12 * k
        if e + 12 > len(data):
            raise ImageError("truncated TIFF directory")
        tag, typ, n = struct.unpack(end + "HHI", data[e : e + 8])
        if tag in (256, 257, 273, 279, 324, 325) and typ in (3, 4):
            size = 2 if typ == 3 else 4
            where = e + 8 if n * size <= 4 else struct.unpack(end + "I", data[e + 8 : e + 12])[0]
            if where + n * size > len(data):
                raise ImageError("truncated TIFF: a directory entry points past the end")
            values[tag] = list(
                struct.unpack(f"{end}{n}{'H' if typ == 3 else 'I'}", data[where : where + n * size])
            )
    if 256 not in values or 257 not in values:
        raise ImageError("corrupt TIFF: no image width/height")
    # Strip (273/279) or tile (324/325) offsets and byte counts: every pixel byte must be there.
    for offs, counts in ((273, 279), (324, 325)):
        if offs in values and counts in values:
            last = max(o + c for o, c in zip(values[offs], values[counts], strict=False))
            if last > len(data):
                raise ImageError(f"truncated TIFF: {len(data)} of {last} bytes")
    return ImageHeader("tiff", int(values[256][0]), int(values[257][0]))


def read_header(data: bytes) -> ImageHeader:
    """Format and size from the first bytes, without decoding pixels."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header(data)
    if data[:2] == b"BM":
        return _bmp_header(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_header(data)
    raise ImageError("not an image this program reads (JPEG, PNG, BMP or TIFF expected)")


def _check_complete(data: bytes, hdr: ImageHeader) -> None:
    """Decoders fill a truncated image with grey and carry on; a half-grey field must not be
    counted, so the file's end is checked here."""
    if hdr.format == "jpeg":
        # In entropy-coded data 0xFF is always stuffed, so FFD9 after the last SOS is the EOI
        # (an EXIF thumbnail has its own EOI, but before the main scan).
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise ImageError("truncated JPEG: the file ends before the image data does")
    elif hdr.format == "png":
        if data.rfind(b"IEND") < 0:
            raise ImageError("truncated PNG: no IEND chunk")
    elif hdr.format == "bmp":
        (declared,) = struct.unpack("<I", data[2:6])
        if declared > len(data):
            raise ImageError(f"truncated BMP: {len(data)} of {declared} bytes")


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> RGB uint8 HxWx3. Raises ImageError with the reason."""
    if not data:
        raise ImageError("empty file")
    hdr = read_header(data)
    if hdr.width < 1 or hdr.height < 1:
        raise ImageError(f"image has no pixels ({hdr.width}x{hdr.height})")
    if hdr.width * hdr.height > MAX_PIXELS:
        raise ImageError(
            f"image is {hdr.width}x{hdr.height} ({hdr.width * hdr.height / 1e6:.0f} MP), more than "
            f"the {MAX_PIXELS / 1e6:.0f} MP accepted; save a smaller field"
        )
    _check_complete(data, hdr)
    buf = np.frombuffer(data, np.uint8)
    # UNCHANGED keeps 16-bit depth and alpha so ensure_rgb_uint8 can convert them properly.
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(f"corrupt {hdr.format.upper()}: the decoder could not read the pixels")
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    try:
        return ensure_rgb_uint8(img)
    except ValueError as e:
        raise ImageError(f"unsupported pixel layout: {e}") from e


def read_image(path: str | Path) -> np.ndarray:
    """Read a field from disk as RGB uint8. Raises ImageError (never a decoder crash)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError as e:
        raise ImageError("no such file") from e
    except OSError as e:
        raise ImageError(f"cannot access file: {e.strerror or e}") from e
    if p.is_dir():
        raise ImageError("is a folder, not an image")
    if size > MAX_FILE_BYTES:
        raise ImageError(
            f"file is {size / 2**20:.0f} MB, more than the {MAX_FILE_BYTES // 2**20} MB accepted"
        )
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from e
    return decode_image(data)


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand the command line: files are kept as given (so a bad one is reported, not skipped);
    folders contribute their image files (by ending, sorted, not recursive)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(
                sorted(
                    c
                    for c in p.iterdir()
                    if c.is_file()
                    and not c.name.startswith(".")
                    and c.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        else:
            out.append(p)
    return out
