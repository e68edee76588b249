"""The rows the counting keeps: one slide, its fields, its cells and its event log.

They are plain dicts at run time (the store writes them to SQLite and the station serves them as
JSON unchanged); these types only say which keys each one has, so a checker catches a misspelt
key before a technician does. The SQLite columns they map to are in :mod:`edge_wbc.counting.store`.
"""

from __future__ import annotations

from typing import Any, TypedDict


class _SlideExtra(TypedDict, total=False):
    #: Only while a slide is being finalised: every review action in order, for the report.
    review_history: list[dict[str, Any]]
    #: Likewise: each change of the formula while the slide was open (a restart with another
    #: [formula]): at, previous, formula.
    formula_changes: list[dict[str, Any]]
    #: Who counted, who signed off, the technician's comment ('' when not given).
    operator: str
    signed_off_by: str
    comment: str


class SlideRecord(_SlideExtra):
    id: str
    sample_id: str
    target: int
    status: str  # open | finalised | abandoned
    created_at: str
    finalised_at: str | None
    station_id: str
    models: dict[str, Any]
    #: {format: path relative to the data directory}, filled on finalise.
    reports: dict[str, str]


class _FieldExtra(TypedDict, total=False):
    #: Relative to the data directory; set by the store once the image is written.
    image_file: str | None
    #: Trigger -> counted (ms), when the capture came with a trigger time.
    latency_ms: float
    #: Time the session spent on the field (ms); not stored.
    session_ms: float
    #: Why the technician set the field aside with its cells (absent: it counts), and when.
    discarded: str
    discarded_at: str


class FieldRecord(_FieldExtra):
    id: str
    slide_id: str
    seq: int
    captured_at: str
    source: str
    width: int
    height: int
    quality: dict[str, Any]
    timing_ms: dict[str, Any]
    n_cells: int
    n_counted: int
    n_duplicate: int
    overlap_field: str | None
    overlap_fraction: float
    overlap_rect: list[int] | None
    flagged_duplicate: bool
    models: dict[str, Any]


class _CellExtra(TypedDict, total=False):
    #: The technician's note on the cell.
    comment: str
    #: Its field was set aside (the reason): the cell does not count.
    discarded: str


class CellRecord(_CellExtra):
    id: str
    slide_id: str
    field_id: str
    seq: int
    idx: int
    bbox: list[int]  # x0, y0, x1, y1 in field pixels, x1/y1 exclusive
    area_px: int
    label: str  # the machine's label, never overwritten
    score: float
    probs: dict[str, float]
    status: str  # counted | duplicate | other | manual (added by key, no image)
    reviewed_label: str | None
    review_reason: str | None
    reviewed_at: str | None
    created_at: str
    #: Relative to the data directory; set by the store once the crop is written.
    crop_file: str | None


class EventRecord(TypedDict):
    id: int
    slide_id: str | None
    at: str
    kind: str
    action: str | None
    payload: dict[str, Any]
