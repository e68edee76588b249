"""Reading fields from disk: every file either becomes an RGB uint8 array or a clear error.

The file's header is read first, by hand (a few fixed offsets, every read bounds-checked): it
gives the size, so a frame too small to hold a cell or too large for a Pi's memory is refused
before a decoder allocates anything, and a truncated or damaged file is caught instead of being
analysed half grey. A frame larger than the analysis can hold is read reduced.

JPEGs are decoded by libjpeg-turbo through ``simplejpeg`` in strict mode. OpenCV's and Pillow's
decoders both swallow libjpeg's warnings ("Corrupt JPEG data: premature end of data segment",
"N extraneous bytes before marker") and hand back a grey-filled or shifted image; strict mode
turns those warnings into errors, and libjpeg-turbo's DCT scaling decodes a large frame reduced
without ever holding it at full size. PNG, BMP and TIFF are decoded by OpenCV.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from edge_wbc.pipeline.preprocess import ensure_rgb_uint8

#: File name endings treated as images when a folder is listed.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

#: A field narrower or lower than this cannot hold a leukocyte at any magnification the
#: station is set up for (config allows cell_diameter_px down to 4, but a frame must also give
#: the white balance a background to measure); smaller files are refused as "too small".
MIN_SIDE = 64

#: Frames with more pixels are analysed reduced (JPEG: decoded reduced by libjpeg-turbo's DCT
#: scaling; others: decoded, then shrunk at once). Measured with the shipped models on x86-64
#: (docs/hardening.md): ~165 MB of runtime and models, then the analysis costs ~15 bytes per
#: pixel, ~44 on a faded field (the chroma restoration works in float32): a 4 MP faded field
#: peaks at 341 MB, under the 400 MB a Pi can give the process.
ANALYSIS_MAX_PIXELS = 4_000_000

#: Largest decoded frame (width x height x channels x bytes per sample) accepted from formats
#: that are decoded whole: the decoder holds all of it and the file at once (an uncompressed
#: TIFF or BMP is as large as its pixels). The worst case measured, a 32-bit BMP of 64 MB,
#: peaks at 375 MB; 96 MB let a 16-bit TIFF reach 446 MB.
MAX_DECODED_BYTES = 64 * 2**20

#: Largest JPEG frame accepted (it is decoded at most 1/8 reduced: 64 MP gives 1 MP).
MAX_JPEG_PIXELS = 64_000_000

#: Files larger than this are refused before being read: no frame the limits above accept needs
#: more (an uncompressed TIFF is its decoded size plus a header).
MAX_FILE_BYTES = MAX_DECODED_BYTES + 2**20


class ImageError(Exception):
    """This file cannot be analysed; the message says why in terms a user can act on."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "jpeg", "png", "bmp", "tiff"
    width: int
    height: int
    #: channels and bytes per sample of the decoded array (what the decoder will allocate)
    channels: int = 3
    bytes_per_sample: int = 1
    #: images in the file (TIFF directories); only the first is read
    pages: int = 1

    @property
    def decoded_bytes(self) -> int:
        return self.width * self.height * self.channels * self.bytes_per_sample


@dataclass(frozen=True)
class DecodedImage:
    """A field as read: ``rgb`` may be smaller than the file's frame (``scale`` < 1)."""

    rgb: np.ndarray
    #: the file's frame size
    width: int
    height: int
    #: what a user should know about how the file was read (page used, reduced decode)
    notes: tuple[str, ...] = field(default=())

    @property
    def scale(self) -> float:
        """Pixels of ``rgb`` per pixel of the file (1.0 when read at full size)."""
        return self.rgb.shape[1] / self.width


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise ImageError(f"truncated {what}: the file ends at byte {len(data)}")
    return struct.unpack_from(fmt, data, offset)


def _jpeg_header(data: bytes) -> ImageHeader:
    # By hand rather than libjpeg's jpeg_read_header: that one also wants the Huffman tables
    # and the scan header, and a size is all that is needed to refuse a frame before decoding.
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
        (seglen,) = struct.unpack_from(">H", data, i + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 10 > n:
                break
            h, w, comps = struct.unpack_from(">HHB", data, i + 5)
            return ImageHeader("jpeg", int(w), int(h), {1: 1, 4: 4}.get(comps, 3))
        i += 2 + seglen
    raise ImageError("truncated or corrupt JPEG: no frame header")


#: PNG colour type -> channels OpenCV decodes it to (a palette may carry transparency: 4).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 29 or data[12:16] != b"IHDR":
        raise ImageError("truncated or corrupt PNG: no IHDR chunk")
    w, h, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise ImageError(f"corrupt PNG: colour type {colour} with bit depth {depth}")
    return ImageHeader("png", int(w), int(h), _PNG_CHANNELS[colour], 2 if depth == 16 else 1)


def _bmp_header(data: bytes) -> ImageHeader:
    (dib,) = _unpack("<I", data, 14, "BMP header")
    if dib == 12:
        w, h, _planes, bits = _unpack("<HHHH", data, 18, "BMP header")
    else:
        w, h, _planes, bits = _unpack("<iiHH", data, 18, "BMP header")
    return ImageHeader("bmp", abs(int(w)), abs(int(h)), 4 if bits == 32 else 3)


#: TIFF tags read: width, height, bits per sample, compression, photometric, strip offsets,
#: samples per pixel, strip byte counts, tile offsets, tile byte counts.
_TIFF_TAGS = (256, 257, 258, 259, 262, 273, 277, 279, 324, 325)
#: Directories followed when counting pages (a loop or a huge chain is not followed further).
_TIFF_MAX_PAGES = 1000


def _tiff_ifd(data: bytes, end: str, off: int) -> tuple[dict[int, list[int]], int]:
    """One image file directory: the tags above, and the offset of the next directory."""
    (count,) = _unpack(end + "H", data, off, "TIFF directory")
    values: dict[int, list[int]] = {}
    for k in range(count):
        e = off + 2 + 12 * k
        tag, typ, n = _unpack(end + "HHI", data, e, "TIFF directory")
        if tag not in _TIFF_TAGS:
            continue
        if typ not in (3, 4):  # SHORT, LONG: the only types these tags may have
            raise ImageError(f"corrupt TIFF: tag {tag} has type {typ}")
        size = 2 if typ == 3 else 4
        if n * size <= 4:
            where = e + 8
        else:
            (where,) = _unpack(end + "I", data, e + 8, "TIFF directory")
        if where + n * size > len(data):
            raise ImageError("truncated TIFF: a directory entry points past the end of the file")
        values[tag] = list(struct.unpack_from(f"{end}{n}{'H' if typ == 3 else 'I'}", data, where))
    (nxt,) = _unpack(end + "I", data, off + 2 + 12 * count, "TIFF directory")
    return values, nxt


def _tiff_header(data: bytes) -> ImageHeader:
    end = "<" if data[:2] == b"II" else ">"
    (magic,) = _unpack(end + "H", data, 2, "TIFF header")
    if magic == 43:
        raise ImageError(
            "BigTIFF files are not supported; save the field as an ordinary TIFF, PNG or JPEG"
        )
    (off,) = _unpack(end + "I", data, 4, "TIFF header")
    if off < 8 or off + 2 > len(data):
        raise ImageError("truncated TIFF: the first directory is past the end of the file")
    values, nxt = _tiff_ifd(data, end, off)

    def one(tag: int, name: str, default: int | None = None) -> int:
        v = values.get(tag)
        if not v:
            if default is None:
                raise ImageError(f"corrupt TIFF: no {name}")
            return default
        return int(v[0])

    w, h = one(256, "image width"), one(257, "image height")
    bits = max(values.get(258) or [1])
    spp = one(277, "samples per pixel", 1)
    for offs, counts in ((273, 279), (324, 325)):
        if offs in values or counts in values:
            o, c = values.get(offs, []), values.get(counts, [])
            if not o or len(o) != len(c):
                raise ImageError("corrupt TIFF: pixel data offsets and sizes do not match")
            if 0 in c:
                raise ImageError("corrupt TIFF: an empty strip (no pixel data)")
            last = max(a + b for a, b in zip(o, c, strict=True))
            if last > len(data):
                raise ImageError(f"truncated TIFF: {len(data)} of {last} bytes")
            if offs == 273 and one(259, "compression", 1) == 1 and w and h:
                need = h * math.ceil(w * spp * bits / 8)
                if sum(c) < need:
                    raise ImageError(f"truncated TIFF: strips hold {sum(c)} of {need} bytes")
            break
    else:
        raise ImageError("corrupt TIFF: no pixel data (no strips or tiles)")
    pages, seen = 1, {off}
    while nxt and nxt not in seen and pages < _TIFF_MAX_PAGES:
        seen.add(nxt)
        try:
            _, nxt = _tiff_ifd(data, end, nxt)
        except ImageError:
            break  # a damaged later page does not matter: only the first is read
        pages += 1
    ch = 3 if one(262, "photometric", 1) == 3 else spp  # a palette decodes to colour
    return ImageHeader("tiff", w, h, max(1, ch), max(1, math.ceil(bits / 8)), pages)


def read_header(data: bytes) -> ImageHeader:
    """Format, size and layout from the first bytes, without decoding pixels."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header(data)
    if data[:2] == b"BM":
        return _bmp_header(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_header(data)
    raise ImageError("not an image this program reads (JPEG, PNG, BMP or TIFF expected)")


def _check_size(hdr: ImageHeader) -> None:
    w, h = hdr.width, hdr.height
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageError(
            f"image is too small ({w}x{h}): a field needs at least {MIN_SIDE}x{MIN_SIDE} pixels"
        )
    if hdr.format == "jpeg":
        if w * h > MAX_JPEG_PIXELS:
            raise ImageError(
                f"image is {w}x{h} ({w * h / 1e6:.0f} MP), more than the "
                f"{MAX_JPEG_PIXELS / 1e6:.0f} MP accepted; save a smaller field"
            )
    elif hdr.decoded_bytes > MAX_DECODED_BYTES:
        depth = f"{hdr.channels} channel(s) of {8 * hdr.bytes_per_sample} bit"
        raise ImageError(
            f"image is {w}x{h} ({w * h / 1e6:.0f} MP, {depth}): decoding it needs "
            f"{hdr.decoded_bytes / 2**20:.0f} MB, more than the {MAX_DECODED_BYTES // 2**20} MB "
            "accepted; save a smaller field, or as JPEG (read reduced)"
        )


def _check_complete(data: bytes, hdr: ImageHeader) -> None:
    """Decoders fill a truncated image with grey and carry on; a half-grey field must not be
    counted, so the file's end is checked here (TIFF strips are checked with the header)."""
    if hdr.format == "jpeg":
        # In entropy-coded data 0xFF is always stuffed, so FFD9 after the last SOS is the EOI
        # (an EXIF thumbnail has its own EOI, but before the main scan).
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise ImageError("truncated JPEG: the file ends before the image data does")
    elif hdr.format == "png":
        if data.rfind(b"IEND") < 0:
            raise ImageError("truncated PNG: no IEND chunk")
    elif hdr.format == "bmp":
        (declared,) = struct.unpack_from("<I", data, 2)
        if declared > len(data):
            raise ImageError(f"truncated BMP: {len(data)} of {declared} bytes")


def _reduced_size(w: int, h: int, max_pixels: int) -> tuple[int, int] | None:
    if w * h <= max_pixels:
        return None
    f = math.sqrt(w * h / max_pixels)
    return max(1, int(w / f)), max(1, int(h / f))


def _decode_jpeg(data: bytes, hdr: ImageHeader, target: tuple[int, int] | None) -> np.ndarray:
    cs = {1: "GRAY", 4: "CMYK"}.get(hdr.channels, "RGB")
    tw, th = target or (0, 0)
    try:
        # min_width/min_height: libjpeg-turbo picks the smallest DCT scaling (1/8 steps) that
        # is still at least this large, so only the reduced frame is ever allocated.
        img = simplejpeg.decode_jpeg(data, colorspace=cs, min_width=tw, min_height=th, strict=True)
    except ValueError as e:
        raise ImageError(f"damaged or unsupported JPEG ({e}): not analysed") from None
    if cs == "CMYK":
        # Adobe's CMYK JPEGs store inverted inks: R = C'K'/255, as OpenCV reads them.
        k = img[:, :, 3:4].astype(np.uint16)
        img = (img[:, :, :3].astype(np.uint16) * k // 255).astype(np.uint8)
    return img


def _decode_other(data: bytes, hdr: ImageHeader, target: tuple[int, int] | None) -> np.ndarray:
    # OpenCV's IMREAD_REDUCED_* would decode these formats at full size and shrink afterwards
    # anyway (only its JPEG reader scales in the decoder), and it drops 16-bit depth and alpha:
    # decode UNCHANGED and shrink here, before any colour conversion copies the full frame.
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ImageError(f"corrupt {hdr.format.upper()}: {str(e).strip()[-200:]}") from None
    if img is None or img.size == 0:
        raise ImageError(f"corrupt {hdr.format.upper()}: the decoder could not read the pixels")
    if img.shape[1] != hdr.width or img.shape[0] != hdr.height:
        raise ImageError(
            f"corrupt {hdr.format.upper()}: the header says {hdr.width}x{hdr.height}, the "
            f"pixels are {img.shape[1]}x{img.shape[0]}"
        )
    if target is not None:
        img = cv2.resize(img, target, interpolation=cv2.INTER_AREA)
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    return img


def decode(data: bytes, max_pixels: int | None = None) -> DecodedImage:
    """Bytes -> a field as RGB uint8, reduced to at most ``max_pixels`` (default
    ANALYSIS_MAX_PIXELS). Raises ImageError with the reason (never a decoder's exception)."""
    max_pixels = ANALYSIS_MAX_PIXELS if max_pixels is None else max_pixels
    if not data:
        raise ImageError("empty file")
    hdr = read_header(data)
    _check_size(hdr)
    _check_complete(data, hdr)
    target = _reduced_size(hdr.width, hdr.height, max_pixels)
    img = (_decode_jpeg if hdr.format == "jpeg" else _decode_other)(data, hdr, target)
    if target is not None and (img.shape[1], img.shape[0]) != target:
        img = cv2.resize(img, target, interpolation=cv2.INTER_AREA)
    try:
        rgb = ensure_rgb_uint8(img)
    except ValueError as e:
        raise ImageError(f"unsupported pixel layout: {e}") from e
    notes = []
    if hdr.pages > 1:
        pages = f"{hdr.pages}" if hdr.pages < _TIFF_MAX_PAGES else f"{hdr.pages} or more"
        notes.append(f"the file has {pages} pages: page 1 was used")
    if target is not None:
        notes.append(
            f"{hdr.width}x{hdr.height} analysed reduced to {rgb.shape[1]}x{rgb.shape[0]} "
            f"(more than {max_pixels / 1e6:g} MP); positions are given in the file's pixels"
        )
    return DecodedImage(rgb, hdr.width, hdr.height, tuple(notes))


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Bytes -> RGB uint8 HxWx3 (reduced to at most ``max_pixels``). Raises ImageError."""
    return decode(data, max_pixels).rgb


def _read_file(path: Path) -> bytes:
    """The bytes of a regular file. A FIFO, device or socket is refused without blocking: it is
    opened non-blocking and checked on the open descriptor, so a file swapped after a look at
    its name cannot hang the batch either."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError("no such file (a link to a file that does not exist)") from None
        raise ImageError("no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("symbolic link loop: the name never reaches a file") from None
        if e.errno == errno.ENXIO:
            raise ImageError("not a regular file (a socket): refused") from None
        what = "folder" if _probe(path.is_dir, False) else "file"
        raise ImageError(f"cannot read {what}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a folder, not an image")
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
            raise ImageError(f"not a regular file ({kind}): refused")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(
                f"file is {st.st_size / 2**20:.0f} MB, more than the "
                f"{MAX_FILE_BYTES // 2**20} MB accepted"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # it grew while being read
        raise ImageError(f"file is more than the {MAX_FILE_BYTES // 2**20} MB accepted")
    return data


def read_field(path: str | Path, max_pixels: int | None = None) -> DecodedImage:
    """Read a field from disk (reduced to at most ``max_pixels``). Raises ImageError."""
    return decode(_read_file(Path(path)), max_pixels)


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a field from disk as RGB uint8. Raises ImageError (never a decoder crash)."""
    return read_field(path, max_pixels).rgb


def _probe(check: Callable[[], bool], default: bool) -> bool:
    try:
        return check()
    except OSError:  # not ours to look at (EACCES): the read of it will say so, per file
        return default


def list_folder(folder: str | Path) -> list[Path]:
    """The image files of one folder (by ending, sorted, not recursive). Raises ImageError when
    the folder cannot be listed (no permission, gone, not a folder)."""
    folder = Path(folder)
    try:
        children = list(folder.iterdir())
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ImageError(f"cannot list folder {folder}: {reason}") from None
    return sorted(
        c
        for c in children
        if not c.name.startswith(".")
        and c.suffix.lower() in IMAGE_SUFFIXES
        and _probe(c.is_file, True)
    )


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand the command line: files are kept as given (so a bad one is reported, not skipped);
    folders contribute their image files (by ending, sorted, not recursive). A folder that
    cannot be listed is kept as given too, so its error is reported like a file's (the read of
    it says why: "cannot read folder: Permission denied")."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not _probe(p.is_dir, False):
            out.append(p)
            continue
        try:
            out.extend(list_folder(p))
        except ImageError:
            out.append(p)
    return out
