"""Stage 1: where the leukocytes are — the weighted vote of the segmenter ensemble.

As in Chernykh et al. 2024, each U-Net's probability map is multiplied by its weight and the
maps are averaged; thresholding the average gives the leukocyte mask. Small false blobs of a
single member fade in the average.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edge_wbc.pipeline.inference import Model
from edge_wbc.pipeline.preprocess import letterbox, letterbox_geometry, unletterbox


@dataclass
class Member:
    name: str
    model: Model
    weight: float
    #: "probabilities" (sigmoid/softmax inside the model) or "logits".
    output_type: str = "probabilities"


def to_probability(out: np.ndarray, output_type: str = "probabilities") -> np.ndarray:
    """A segmenter's first output (1xHxWxC) -> foreground probability HxW.

    C = 1: the leukocyte probability (or logit). C > 1: channel 0 is background and the rest
    are leukocyte parts (e.g. cytoplasm, nucleus), so foreground = 1 - background.
    """
    arr = out[0] if out.ndim == 4 else out
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if output_type == "logits":
        if arr.shape[2] == 1:
            arr = 1.0 / (1.0 + np.exp(-arr))
        else:
            e = np.exp(arr - arr.max(axis=2, keepdims=True))
            arr = e / e.sum(axis=2, keepdims=True)
    fg = arr[:, :, 0] if arr.shape[2] == 1 else 1.0 - arr[:, :, 0]
    return np.clip(fg, 0.0, 1.0).astype(np.float32)


def _weighted_sum(weights: Sequence[float], maps: Iterable[np.ndarray]) -> np.ndarray:
    out: np.ndarray = sum(wt * p for wt, p in zip(weights, maps, strict=True))  # type: ignore[assignment]
    return out


class EnsembleSegmenter:
    """Weighted-vote segmentation of a white-balanced field."""

    def __init__(self, members: Sequence[Member], threshold: float = 0.5) -> None:
        if not members:
            raise ValueError("the ensemble needs at least one segmenter")
        total = float(sum(m.weight for m in members))
        if total <= 0:
            raise ValueError("ensemble weights must sum to more than 0")
        if any(m.weight < 0 for m in members):
            raise ValueError("ensemble weights must not be negative")
        self.members = list(members)
        # A member with weight 0 cannot change the vote: it is not run (its ~10 ms are saved).
        self.voting = [m for m in members if m.weight > 0]
        self.weights = [m.weight / total for m in self.voting]
        self.threshold = float(threshold)

    def member_maps(self, rgb_balanced: np.ndarray) -> list[np.ndarray]:
        """Each voting member's probability map at its own input resolution (letterboxed)."""
        maps = []
        boxed_cache: dict[tuple[int, int], np.ndarray] = {}
        for m in self.voting:
            hw = m.model.input_hw
            if hw not in boxed_cache:
                boxed_cache[hw] = letterbox(rgb_balanced, hw)[0]
            prob = to_probability(m.model.infer_pixels(boxed_cache[hw])[0], m.output_type)
            if prob.shape != hw:
                prob = cv2.resize(prob, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
            maps.append(prob)
        return maps

    def probability(
        self, rgb_balanced: np.ndarray, out_hw: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Weighted average probability, mapped onto the field (or onto ``out_hw``, a resized
        copy of the field's frame used for postprocessing large images)."""
        h, w = rgb_balanced.shape[:2]
        out_hw = out_hw or (h, w)
        maps = self.member_maps(rgb_balanced)
        # Average at model resolution when all members share it: one unletterbox, not three.
        if len({p.shape for p in maps}) == 1:
            avg = _weighted_sum(self.weights, maps)
            return self._unbox(avg, (h, w), out_hw)
        return _weighted_sum(self.weights, (self._unbox(p, (h, w), out_hw) for p in maps))

    @staticmethod
    def _unbox(prob: np.ndarray, src_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
        geo = letterbox_geometry(src_hw, prob.shape[:2])
        if out_hw == src_hw:
            return unletterbox(np.ascontiguousarray(prob, np.float32), geo)
        valid = prob[geo.top : geo.top + geo.new_h, geo.left : geo.left + geo.new_w]
        return cv2.resize(valid, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)

    def mask(self, prob: np.ndarray) -> np.ndarray:
        return prob >= self.threshold
