"""What one analysed field is: the contract between analysis and everything downstream.

``FieldResult.to_json()`` is the per-image entry of ``edge-wbc analyze --json``
(schema ``edge-wbc/analysis/2``: each cell's fine ``label`` and its ``group``); keep it stable
and bump the schema when it changes. The classes and groups are
:mod:`edge_wbc.taxonomy`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_wbc import taxonomy

ANALYSIS_SCHEMA = "edge-wbc/analysis/2"
#: The five types of a five-part differential (group names), in report order.
CLASSES = taxonomy.FIVE_PART
UNIDENTIFIED = taxonomy.UNIDENTIFIED
#: Red cells, debris, anything the classifier calls not a leukocyte (the non_wbc group).
OTHER = taxonomy.OTHER
#: Every label a cell can carry.
LABELS = (*taxonomy.CLASSES, UNIDENTIFIED)


@dataclass
class Cell:
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in input-image pixels, x1/y1 exclusive
    label: str  # one of LABELS: the fine class (band_neutrophil, erythroblast, ...)
    score: float  # calibrated probability of the predicted class
    probs: dict[str, float]
    area_px: int
    #: RGB uint8 crop as the classifier saw it (white-balanced, square); not serialised.
    crop: np.ndarray | None = field(default=None, repr=False)
    #: boolean mask of the cell within bbox; not serialised.
    mask: np.ndarray | None = field(default=None, repr=False)
    #: the classifier's pooled features (float32, edge_wbc.pipeline.classify.Prediction);
    #: None when the classifier emits none; not serialised.
    embedding: np.ndarray | None = field(default=None, repr=False)

    @property
    def group(self) -> str:
        """The five-part type for the five and their subtypes, else immature_granulocyte,
        abnormal_wbc, nrbc, non_wbc, or unidentified."""
        return taxonomy.group_of(self.label)

    @property
    def counted(self) -> bool:
        """A leukocyte (or unidentified): it counts toward a slide's target."""
        return taxonomy.is_leukocyte(self.label)

    def to_json(self) -> dict[str, Any]:
        return {
            "bbox": [int(v) for v in self.bbox],
            "label": self.label,
            "group": self.group,
            "score": round(float(self.score), 4),
            "probs": {k: round(float(v), 4) for k, v in self.probs.items()},
            "area_px": int(self.area_px),
        }


@dataclass
class FieldResult:
    path: str
    width: int
    height: int
    cells: list[Cell] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    timing_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    #: uint8 HxW, 255 on counted cells after postprocessing; not serialised.
    mask: np.ndarray | None = field(default=None, repr=False)
    #: how the file was read, when a user should know (a multi-page TIFF's page 1 used, a large
    #: frame analysed reduced); added to schema 1 as an optional key, absent when empty.
    notes: list[str] = field(default_factory=list)
    #: which classifier (sha256) and lab adaptation (id, sha256, or None) produced the labels
    #: (FieldAnalyzer.provenance); serialised as "model" when known.
    model: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "path": self.path,
            "width": int(self.width),
            "height": int(self.height),
            "error": self.error,
            "cells": [c.to_json() for c in self.cells],
            "quality": self.quality,
            "timing_ms": {k: round(float(v), 2) for k, v in self.timing_ms.items()},
        }
        if self.notes:
            doc["notes"] = list(self.notes)
        if self.model:
            doc["model"] = dict(self.model)
        return doc
