"""The one definition of how pixels become model inputs.

Training (``convert``) and the device (``edge_wbc``) both call these functions, so the two can
never drift apart. Every image here is RGB, uint8, HxWx3 unless said otherwise; loaders convert
from OpenCV's BGR at the edge of the program.

The chain for a field:
  white_balance  ->  letterbox to the segmenter's input (aspect kept)  ->  scale to [0, 1]
and for a cell:
  white-balanced full-resolution field  ->  cell_crop (square, side = k * cell diameter)  ->  [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Version of this preprocessing. Written into the manifest; the runtime refuses a model built
#: for another version because its inputs would silently mean something else.
#: v2 added the chroma floor (``restore_chroma``) to ``white_balance``.
PREPROCESS_VERSION = 2

#: Channel order of every model input.
COLOR_ORDER = "RGB"

#: Grey level the plasma background is mapped to by white balancing. Below 255 so that a
#: slightly brighter region (a glare spot) does not clip.
BACKGROUND_LEVEL = 225.0

#: Chroma (max - min channel, 0-255) that the most stained 1 % of a balanced field reaches at
#: least. Stained nuclei reach 95-150 in every training source (Zheng 1 down to ~71); a faded
#: stain or a grey camera cast leaves ~25. Below the floor, colour is stretched up to it.
CHROMA_FLOOR = 80.0

#: Most a faded field's chroma is stretched: beyond this it is mostly noise and JPEG artefacts.
MAX_CHROMA_GAIN = 4.0

#: Crop side as a multiple of the cell's diameter (max side of its box). The same rule for every
#: source and on the device, so a cell fills the crop the same way whatever the magnification.
CROP_SCALE = 1.5


@dataclass(frozen=True)
class Letterbox:
    """Where a source image sits inside a letterboxed model input."""

    src_h: int
    src_w: int
    dst_h: int
    dst_w: int
    scale: float  # dst pixels per src pixel
    top: int
    left: int
    new_h: int
    new_w: int

    def to_source(
        self, box: tuple[float, float, float, float]
    ) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        s = self.scale
        return (
            (x0 - self.left) / s,
            (y0 - self.top) / s,
            (x1 - self.left) / s,
            (y1 - self.top) / s,
        )


def ensure_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Bring greyscale, 16-bit, float or RGBA images to RGB uint8.

    Raises ValueError for shapes that are not an image at all.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"not an image: array of shape {img.shape}")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype.kind == "f":
        hi = float(np.nanmax(img)) if img.size else 1.0
        scale = 255.0 if hi <= 1.0 + 1e-6 else 1.0
        img = np.clip(np.nan_to_num(img) * scale + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    c = img.shape[2]
    if c == 1:
        img = np.repeat(img, 3, axis=2)
    elif c == 4:
        # Alpha is composited on white: a transparent pixel is "no specimen", like the plasma.
        a = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)
    elif c == 2:
        img = np.repeat(img[:, :, :1], 3, axis=2)
    elif c != 3:
        raise ValueError(f"unsupported number of channels: {c}")
    return np.ascontiguousarray(img)


def _pixel_sample(rgb: np.ndarray) -> np.ndarray:
    """The field's pixels on a grid ~160 wide (N x 3): field statistics need no more."""
    h, w = rgb.shape[:2]
    step = max(1, int(max(h, w) // 160))
    return rgb[::step, ::step].reshape(-1, 3)


def background_rgb(rgb: np.ndarray, quantile: float = 0.8) -> np.ndarray:
    """Estimate the colour of the plasma background.

    In a stained smear the background is the brightest large region: red cells are pink and
    darker, leukocytes purple and darker still. The median colour of the brightest 20 % of pixels
    (on a downscaled copy, for speed) is a robust estimate across stains and camera casts.
    """
    small = _pixel_sample(rgb).astype(np.float32)
    lum = small @ np.array([0.299, 0.587, 0.114], np.float32)
    thr = np.quantile(lum, quantile)
    bright = small[lum >= thr]
    if len(bright) == 0:
        bright = small
    return np.median(bright, axis=0)


def white_balance(rgb: np.ndarray) -> np.ndarray:
    """Per-channel gain so that the background becomes neutral grey at BACKGROUND_LEVEL, then
    the chroma floor (``restore_chroma``).

    This removes a camera's colour cast (yellow, blue, green lamps and sensors), most of the
    exposure differences between labs, and a grey cast or faded stain before the models see the
    field.
    """
    bg = np.maximum(background_rgb(rgb), 8.0)
    gains = np.clip(BACKGROUND_LEVEL / bg, 0.4, 6.0).astype(np.float32)
    lut = np.clip(np.arange(256, dtype=np.float32)[:, None] * gains[None, :] + 0.5, 0, 255)
    lut = lut.astype(np.uint8)
    out = np.empty_like(rgb)
    for c in range(3):
        out[:, :, c] = cv2.LUT(rgb[:, :, c], lut[:, c])
    return restore_chroma(out)


def stain_chroma(rgb: np.ndarray, quantile: float = 0.99) -> float:
    """Chroma (max - min channel) reached by the most stained pixels of a balanced field."""
    small = _pixel_sample(rgb)
    r, g, b = small[:, 0], small[:, 1], small[:, 2]
    # Elementwise max/min of three columns: numpy's reduce over a length-3 axis is ~10x slower.
    c = np.maximum(np.maximum(r, g), b).astype(np.int16) - np.minimum(np.minimum(r, g), b)
    return float(np.quantile(c, quantile)) if c.size else 0.0


def restore_chroma(rgb: np.ndarray) -> np.ndarray:
    """Stretch a faded field's colour around each pixel's grey until its stain reaches
    CHROMA_FLOOR; a field that already reaches it is returned unchanged.

    White balance cannot undo a grey cast (a desaturating camera, a faded or thin stain): the
    purple of nuclei against pink red cells is what the models key on, so it is brought back to
    the weakest level seen in training rather than left for the models to guess.
    """
    chroma = stain_chroma(rgb)
    if chroma >= CHROMA_FLOOR:
        return rgb
    gain = min(MAX_CHROMA_GAIN, CHROMA_FLOOR / max(chroma, 1.0))
    f = rgb.astype(np.float32)
    grey = f.mean(axis=2, keepdims=True)
    return np.clip(grey + (f - grey) * gain + 0.5, 0, 255).astype(np.uint8)


def letterbox_geometry(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Letterbox:
    sh, sw = src_hw
    dh, dw = dst_hw
    scale = min(dh / sh, dw / sw)
    nh, nw = max(1, round(sh * scale)), max(1, round(sw * scale))
    top, left = (dh - nh) // 2, (dw - nw) // 2
    return Letterbox(sh, sw, dh, dw, scale, top, left, nh, nw)


def letterbox(
    rgb: np.ndarray, dst_hw: tuple[int, int], pad: float = BACKGROUND_LEVEL
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio; pad with background grey (what empty glass looks like
    after white balance) so the padding never looks like a cell."""
    geo = letterbox_geometry(rgb.shape[:2], dst_hw)
    interp = cv2.INTER_AREA if geo.scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (geo.new_w, geo.new_h), interpolation=interp)
    out = np.full((geo.dst_h, geo.dst_w, *rgb.shape[2:]), pad, dtype=rgb.dtype)
    out[geo.top : geo.top + geo.new_h, geo.left : geo.left + geo.new_w] = resized
    return out, geo


def unletterbox(prob: np.ndarray, geo: Letterbox) -> np.ndarray:
    """Map a map at model resolution back onto the source image (bilinear)."""
    valid = prob[geo.top : geo.top + geo.new_h, geo.left : geo.left + geo.new_w]
    return cv2.resize(valid, (geo.src_w, geo.src_h), interpolation=cv2.INTER_LINEAR)


def to_unit(rgb: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]: the models' real-valued input range."""
    return rgb.astype(np.float32) * (1.0 / 255.0)


def segmenter_input(
    rgb: np.ndarray, dst_hw: tuple[int, int], balanced: bool = False
) -> tuple[np.ndarray, Letterbox]:
    """Field -> float32 HxWx3 in [0, 1] at the segmenter's size, plus the geometry to map back."""
    img = rgb if balanced else white_balance(rgb)
    boxed, geo = letterbox(img, dst_hw)
    return to_unit(boxed), geo


def crop_window(
    box: tuple[float, float, float, float], scale: float = CROP_SCALE
) -> tuple[int, int, int, int]:
    """Square window centred on a cell box, side = scale * the box's longer side."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * scale
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    half = max(side / 2.0, 1.0)
    return (
        int(np.floor(cx - half)),
        int(np.floor(cy - half)),
        int(np.ceil(cx + half)),
        int(np.ceil(cy + half)),
    )


def window_canvas(
    rgb: np.ndarray, window: tuple[int, int, int, int], fill: float | np.ndarray
) -> np.ndarray:
    """The pixels of a window that may reach past the field; the part outside is ``fill``."""
    h, w = rgb.shape[:2]
    wx0, wy0, wx1, wy1 = window
    canvas = np.empty((wy1 - wy0, wx1 - wx0, 3), np.uint8)
    canvas[:] = fill
    sx0, sy0, sx1, sy1 = max(wx0, 0), max(wy0, 0), min(wx1, w), min(wy1, h)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - wy0 : sy1 - wy0, sx0 - wx0 : sx1 - wx0] = rgb[sy0:sy1, sx0:sx1]
    return canvas


def cell_crop(
    rgb_balanced: np.ndarray,
    box: tuple[float, float, float, float],
    size: int,
    scale: float = CROP_SCALE,
) -> np.ndarray:
    """Crop one cell from a white-balanced full-resolution field, resized to size x size.

    The part of the window outside the field is filled with background grey, so a cell at the
    border is centred like any other.
    """
    canvas = window_canvas(rgb_balanced, crop_window(box, scale), BACKGROUND_LEVEL)
    side = canvas.shape[0]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(canvas, (size, size), interpolation=interp)
