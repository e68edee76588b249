"""Property-based tests of the image reader: whatever the bytes, a field or an ImageError.

Mutations of real files of every format (bytes flipped, cut, inserted, header fields set to
odd values) and hand-built TIFF directories: ``decode`` returns an RGB uint8 field at least
MIN_SIDE on a side, at the header's size or reduced, or raises ImageError; never a decoder's
exception, an OpenCV assertion or a hang.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_wbc.pipeline.imageio import MIN_SIDE, ImageError, decode, read_header

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _field() -> np.ndarray:
    rng = np.random.default_rng(7)
    img = np.full((72, 96, 3), 200, np.uint8)
    img[20:50, 30:60] = (120, 40, 140)  # a purple "nucleus"
    return (img + rng.integers(0, 20, img.shape)).astype(np.uint8)


SEEDS = {
    ext: cv2.imencode(ext, _field())[1].tobytes() for ext in (".jpg", ".png", ".bmp", ".tif")
}
SEEDS[".png16"] = cv2.imencode(".png", _field().astype(np.uint16) * 257)[1].tobytes()
SEEDS[".jpg-grey"] = cv2.imencode(".jpg", _field()[:, :, 0])[1].tobytes()


def _check(data: bytes, max_pixels: int | None = None) -> None:
    try:
        got = decode(data, max_pixels)
    except ImageError as e:
        assert str(e)  # a reason a user can read
        return
    rgb = got.rgb
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.flags["C_CONTIGUOUS"]
    assert got.width >= MIN_SIDE and got.height >= MIN_SIDE
    hdr = read_header(data)
    assert (got.width, got.height) == (hdr.width, hdr.height)
    if max_pixels is None or hdr.width * hdr.height <= max_pixels:
        assert rgb.shape[:2] == (hdr.height, hdr.width)
    else:
        assert rgb.shape[0] * rgb.shape[1] <= max_pixels


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "zero", "u16", "u32"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "zero":
            n = draw(st.integers(1, 4096))
            data[at : at + n] = bytes(len(data[at : at + n]))
        elif op in ("u16", "u32"):
            # Header fields (sizes, offsets, counts) set to edge values.
            v = draw(st.sampled_from([0, 1, 2, 63, 64, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            fmt = draw(st.sampled_from(["<", ">"])) + ("H" if op == "u16" else "I")
            size = struct.calcsize(fmt)
            if at + size <= len(data) and at < 200:
                struct.pack_into(fmt, data, at, v & (0xFFFF if op == "u16" else 0xFFFFFFFF))
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_files_give_a_field_or_an_image_error(data: bytes) -> None:
    _check(data)


@FUZZ
@given(mutated(), st.sampled_from([4096, 5000, 100_000]))
def test_reduced_reads_keep_the_pixel_cap(data: bytes, max_pixels: int) -> None:
    _check(data, max_pixels)


MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00"]


@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=600))
def test_random_bytes_behind_a_magic_number(magic: bytes, rest: bytes) -> None:
    _check(magic + rest)


TAGS = [256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 322, 323, 324, 325, 339]


@st.composite
def tiff(draw: st.DrawFn) -> bytes:
    """A little-endian TIFF with a drawn directory: real tags, drawn types, counts, values."""
    entries = draw(
        st.lists(
            st.tuples(
                st.sampled_from(TAGS),
                st.sampled_from([1, 2, 3, 4, 5, 16]),
                st.integers(0, 70000),
                st.integers(0, 0xFFFFFFFF),
            ),
            max_size=14,
        )
    )
    body = draw(st.binary(max_size=3000))
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, typ, n, val in sorted(entries):
        out += struct.pack("<HHII", tag, typ, n, val)
    return out + struct.pack("<I", draw(st.sampled_from([0, 8, 10, 0xFFFFFFF0]))) + body


@FUZZ
@given(tiff())
def test_drawn_tiff_directories(data: bytes) -> None:
    _check(data)


@pytest.mark.parametrize("ext", sorted(SEEDS))
def test_seeds_decode(ext: str) -> None:
    assert decode(SEEDS[ext]).rgb.shape == (72, 96, 3)
