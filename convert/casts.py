"""Camera casts of the strength other labs' fields show, for evaluation: one set, used by the
detection robustness script and the classifier's release report alike.

Casts are applied in linear light (gamma 2.2), as a lamp or sensor would, with a haze (black
level lifted) or a desaturation for the grey ones. They act on the raw image: the device's white
balance and chroma floor must undo them.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np


def cast(
    r: float, g: float, b: float, haze: float = 0.0, saturation: float = 1.0
) -> Callable[[np.ndarray], np.ndarray]:
    """A colour cast in linear light, optional desaturation and haze, back to sRGB-ish."""

    def f(x: np.ndarray) -> np.ndarray:
        y = (x.astype(np.float32) / 255.0) ** 2.2 * np.array([r, g, b], np.float32)
        if saturation != 1.0:
            m = y.mean(axis=2, keepdims=True)
            y = m + (y - m) * saturation
        y = np.clip(y, 0, 1) ** (1 / 2.2)
        y = y * (1 - haze) + haze
        return np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8)

    return f


CASTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "yellow": cast(1.0, 0.85, 0.35),
    "yellow, strong": cast(1.0, 0.8, 0.2),
    "blue": cast(0.45, 0.7, 1.0),
    "blue, strong + haze": cast(0.3, 0.55, 1.0, haze=0.15),
    "green": cast(0.55, 1.0, 0.5),
    "green, strong": cast(0.35, 1.0, 0.3),
    "grey (saturation 0.4)": cast(1, 1, 1, saturation=0.4),
    "grey (saturation 0.25)": cast(1, 1, 1, saturation=0.25),
    "grey + haze": cast(0.9, 0.9, 0.9, haze=0.25, saturation=0.35),
    "grey (saturation 0.1)": cast(1, 1, 1, saturation=0.1),
    "monochrome": cast(1, 1, 1, saturation=0.0),
    "dark + blur": lambda x: cv2.GaussianBlur((x * 0.55).astype(np.uint8), (0, 0), 1.5),
}

#: The classifier's report runs one cast of each colour (on every test source, each a full pass
#: over PBC test): the strong ones, where detection was weakest.
CLASSIFIER_CASTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    k: CASTS[k]
    for k in ("yellow, strong", "blue, strong + haze", "green, strong", "grey (saturation 0.25)")
}
