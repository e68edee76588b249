"""The slide session: the single owner of the leukocyte count.

One slide at a time: every analysed field adds its cells, the technician reviews them, and the
slide is finalised into a report once the target is reached and no cell is left unidentified.
Every change is written to the store in one transaction *before* listeners (display, MQTT) hear
of it, so what they show can always be rebuilt from the database after a crash.

Counting rules (what a cell contributes):

* a cell stands as its *effective label*: the technician's reviewed label when there is one (any
  class of :mod:`edge_wbc.taxonomy`), else the machine's; ``rejected`` (not a
  leukocyte / counted twice / unusable) and ``duplicate`` cells (inside the part of the field
  already seen in a previous field) do not stand at all;
* the lab's formula (``[formula]`` in the config, :mod:`edge_wbc.counting.formula`) puts each
  standing cell in a row: leukocytes and ``unidentified`` count toward the target, erythroblasts
  are reported per 100 leukocytes, platelets, smudge cells and artefacts as counts only; a
  non-leukocyte class the formula has no row for is set aside (``excluded.other``).

Percentages of counted rows are of all counted leukocytes, unidentified included, so they add up
to 100 % (before rounding); the slide cannot be finalised while any unidentified cell remains.

The intervals live in :mod:`edge_wbc.counting.stats`, the duplicate-field guard in
:mod:`edge_wbc.counting.overlap`.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from edge_wbc import taxonomy
from edge_wbc.counting.events import Event, Publish
from edge_wbc.counting.formula import Tally, tally
from edge_wbc.counting.overlap import box_fraction_inside, field_signature, find_overlap
from edge_wbc.counting.records import CellRecord, FieldRecord, SlideRecord
from edge_wbc.counting.stats import CI_METHODS
from edge_wbc.counting.store import CONFIRMED
from edge_wbc.inputs import InputError, check_sample_id, check_target, hidden_char
from edge_wbc.pipeline.preprocess import cell_crop, ensure_rgb_uint8, white_balance
from edge_wbc.pipeline.results import FieldResult
from edge_wbc.taxonomy import UNIDENTIFIED, Formula

#: 2: rows carry kind/group/classes; the formula and its raised flags ride along.
STATE_SCHEMA = "edge-wbc/state/2"
REJECT_REASONS = ("not_leukocyte", "counted_twice", "unusable")
REJECTED = "rejected"
#: Gallery group of the cells of a discarded field.
DISCARDED = "discarded"
#: Cell status decided by the machine when the field was counted.
STATUS_COUNTED, STATUS_DUPLICATE, STATUS_OTHER = "counted", "duplicate", "other"
#: A cell the technician added by key, as on a manual differential counter: the camera missed it.
STATUS_MANUAL = "manual"
#: Why a field is set aside with its cells.
DISCARD_REASONS = ("duplicate", "bad_area", "unusable")
#: Reject reason only a manually added cell takes: the key was pressed by mistake.
ADDED_IN_ERROR = "added_in_error"
#: Longest comment (slide or cell) and longest name (who counted, who signed off).
MAX_NOTE_CHARS = 2000
MAX_NAME_CHARS = 120
#: A slide started without a sample ID gets a placeholder starting so.
UNNAMED = "unnamed-"
#: Side of the stored cell thumbnail (px). Larger than the classifier's input so the technician
#: sees the cell comfortably on a desktop screen as well.
CROP_PX = 128


class SessionError(Exception):
    """A request the session refuses in its present state (the slide is finalised, cells are
    still unidentified...); the message is meant for the technician."""


class BadValue(SessionError):
    """A value no state of the session would take (an unknown class, a reason not in the list,
    text with hidden characters)."""


class UnknownItem(SessionError):
    """A cell or field the open slide does not have."""


# --------------------------------------------------------------------------- the session


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def effective_label(cell: CellRecord) -> str | None:
    """The class a cell stands as (the formula says where it counts), or None when it does not
    stand: rejected in review, or a duplicate the technician left alone."""
    rl = cell.get("reviewed_label")
    if rl == REJECTED or cell.get("discarded"):
        return None
    if rl:
        return str(rl)
    if cell["status"] == STATUS_DUPLICATE:
        return None
    return str(cell["label"])


def _new_slide_id() -> str:
    return datetime.now(timezone.utc).strftime("S%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)


class SlideSession:
    """Counts, targets, review and finalisation of the open slide.

    Thread-safe: the analysis worker adds fields while HTTP threads review cells and read state.
    ``store`` is a :class:`edge_wbc.counting.store.Store`;
    ``publish`` receives events after each commit.
    ``reporter`` (slide, cells, fields, out_dir) -> {format: path} writes the report on finalise.
    """

    def __init__(
        self,
        store: Any,
        publish: Publish | None = None,
        *,
        default_target: int = 100,
        duplicate_overlap: float = 0.5,
        ci_method: str = "clopper-pearson",
        models: dict[str, Any] | None = None,
        station_id: str = "",
        reporter: Any = None,
        guard_history: int = 3,
        formula: Formula | None = None,
        require_sample_id: bool = False,
        require_operator: bool = False,
    ) -> None:
        if ci_method not in CI_METHODS:
            raise ValueError(f"unknown CI method {ci_method!r}; expected one of {CI_METHODS}")
        self.store = store
        # `is not None`: an events.Fanout with no listeners yet is falsy (it has __len__).
        self.publish: Publish = publish if publish is not None else (lambda e: None)
        self.default_target = _check_target(default_target)
        self.duplicate_overlap = float(duplicate_overlap)
        self.ci_method = ci_method
        self.models = models or {}
        self.station_id = station_id
        self.reporter = reporter
        self.guard_history = guard_history
        self.formula = formula if formula is not None else taxonomy.formula_or_raise()
        # What a lab wants on every signed report before finalise ([report] in the config).
        self.require_sample_id = require_sample_id
        self.require_operator = require_operator
        self._lock = threading.RLock()
        self.slide: SlideRecord  # set by _resume_or_start below
        self.cells: dict[str, CellRecord] = {}  # insertion order = capture order
        self.n_fields = 0
        self.n_fields_flagged = 0
        self._last_field: FieldRecord | None = None
        self._sigs: list[tuple[str, np.ndarray]] = []
        self._resume_or_start()

    # ------------------------------------------------------------------ lifecycle

    def _resume_or_start(self) -> None:
        with self._lock:
            slide = self.store.open_slide()
            if slide is None:
                self._start(sample_id="", target=self.default_target)
                return
            self._load(slide)

    def _load(self, slide: SlideRecord) -> None:
        self.slide = slide
        self.cells = {c["id"]: c for c in self.store.cells(slide["id"])}
        fields = self.store.fields(slide["id"])
        self.n_fields = len(fields)
        self.n_fields_flagged = sum(1 for f in fields if f.get("overlap_field"))
        self._last_field = fields[-1] if fields else None
        self._sigs = [
            (fid, sig) for fid, sig in self.store.field_signatures(slide["id"], self.guard_history)
        ]
        # A station restarted with another [formula] counts the open slide by the new one; the
        # switch goes into its audit trail and report, as the flags on screen until then may
        # not be the report's.
        recorded, now = self._recorded_formula(slide["id"]), self._formula_record()
        if recorded != now:
            ev = Event("slide", {"action": "formula", **self._slide_payload(slide),
                                 "at": now_iso(), "formula": now, "previous": recorded})
            self.store.audit(slide["id"], [ev])
            self._emit([ev])

    def _formula_record(self) -> dict[str, Any]:
        """What of the formula changes the numbers: its rows (and their kinds) and flags."""
        return {"name": self.formula.name,
                "rows": [[r.key, r.kind] for r in self.formula.rows],
                "flags": [f.rule for f in self.formula.flags]}

    def _recorded_formula(self, slide_id: str) -> dict[str, Any] | None:
        """The formula the slide was last counted by (None: a slide of a version that did not
        record it)."""
        out = None
        for e in self.store.events(slide_id):
            if e["kind"] == "slide" and isinstance(e["payload"].get("formula"), dict):
                out = e["payload"]["formula"]
        return out

    def _start(self, sample_id: str, target: int) -> Event:
        sid = _new_slide_id()
        at = now_iso()
        sample = sample_id.strip() or UNNAMED + sid[1:16]
        slide: SlideRecord = {
            "id": sid,
            "sample_id": sample,
            "target": target,
            "status": "open",
            "created_at": at,
            "finalised_at": None,
            "station_id": self.station_id,
            "models": self.models,
            "reports": {},
        }
        ev = Event("slide", {"action": "started", **self._slide_payload(slide), "at": at,
                             "formula": self._formula_record()})
        self.store.create_slide(slide, [ev])
        self.slide = slide
        self.cells = {}
        self.n_fields = 0
        self.n_fields_flagged = 0
        self._last_field = None
        self._sigs = []
        return ev

    def new_slide(
        self, sample_id: str | None = "", target: int | None = None, abandon: bool = False,
        operator: str | None = None, slide_id: str | None = None,
    ) -> None:
        """Start counting a new slide. An open slide with cells is only closed when ``abandon``
        is set (it stays in the database, marked abandoned, never silently discarded).
        ``operator``: who counts it (for the signed report). ``slide_id``: the slide the caller
        saw (see ``_require_slide``): the one it means to abandon."""
        target = self.default_target if target is None else _check_target(target)
        sample_id = _check_sample_id(sample_id)
        operator = _check_note("operator", operator)
        with self._lock:
            self._require_slide(slide_id)
            events: list[Event] = []
            if self.slide.get("status") == "open":
                if self.cells and not abandon:
                    raise SessionError(
                        f"slide {self.slide['sample_id']} is open with {self.counted()} "
                        f"cell{'' if self.counted() == 1 else 's'} "
                        "counted: finalise it, or confirm that it is abandoned"
                    )
                at = now_iso()
                self.store.update_slide(
                    self.slide["id"], {"status": "abandoned", "finalised_at": at},
                    [Event("slide", {"action": "abandoned", **self._slide_payload(self.slide),
                                     "at": at})],
                )
                events.append(Event("slide", {"action": "abandoned",
                                              **self._slide_payload(self.slide), "at": at}))
            events.append(self._start(sample_id, target))
            if operator:
                events.append(self._set_notes({"operator": operator}))
            self._emit(events)

    def set_sample_id(self, sample_id: str | None, slide_id: str | None = None) -> None:
        sample_id = _check_sample_id(sample_id)
        if not sample_id:
            raise BadValue("the sample id cannot be empty")
        with self._lock:
            self._require_slide(slide_id)
            self._require_open()
            at = now_iso()
            payload = {"action": "sample", **self._slide_payload(self.slide), "at": at}
            payload["sample_id"] = sample_id
            ev = Event("slide", payload)
            self.store.update_slide(self.slide["id"], {"sample_id": sample_id}, [ev])
            self.slide["sample_id"] = sample_id
            self._emit([ev])

    def set_target(self, target: int, slide_id: str | None = None) -> None:
        """Change (usually extend) the target of the open slide, e.g. 100 -> 200."""
        target = _check_target(target)
        with self._lock:
            self._require_slide(slide_id)
            self._require_open()
            at = now_iso()
            payload = {"action": "target", **self._slide_payload(self.slide), "at": at,
                       "previous_target": self.slide["target"], "target": target}
            ev = Event("slide", payload)
            self.store.update_slide(self.slide["id"], {"target": target}, [ev])
            self.slide["target"] = target
            self._emit([ev])

    def finalise(self, slide_id: str | None = None) -> dict[str, Any]:
        """Close the slide and write its report. Refused while a blocker remains."""
        with self._lock:
            self._require_slide(slide_id)
            self._require_open()
            blockers = self.finalise_blockers()
            if blockers:
                raise SessionError("cannot finalise: " + "; ".join(blockers))
            at = now_iso()
            closing: SlideRecord = {**self.slide, "status": "finalised", "finalised_at": at}
            # Every review action in order, including ones later undone: the report's audit trail.
            events = self.store.events(self.slide["id"])
            closing["review_history"] = [
                {k: e["payload"].get(k) for k in ("cell_id", "action", "label", "reviewed_label",
                                                   "review_reason", "at")}
                for e in events
                if e["kind"] == "cell" and e["action"] != "counted"
            ]
            closing["formula_changes"] = [
                {k: e["payload"].get(k) for k in ("at", "previous", "formula")}
                for e in events if e["kind"] == "slide" and e["action"] == "formula"
            ]
            state = self._state(closing)
            reports: dict[str, str] = {}
            if self.reporter is not None:
                try:
                    # Each cell with the row it counted in: the report need not redo the formula.
                    reports = self.reporter(
                        closing, state,
                        [{**c, "counted_as": self._row_key(c)} for c in self.cells.values()],
                        self.store.fields(self.slide["id"]),
                        self.store.slide_dir(self.slide["id"]) / "report",
                    )
                except OSError as e:
                    raise SessionError(
                        f"the report could not be written ({e.strerror or e}); the slide stays "
                        "open with every cell counted. Free space on the data disk and finalise "
                        "again."
                    ) from e
            closing["reports"] = reports
            state = self._state(closing)
            ev = Event("slide", {"action": "finalised", **self._slide_payload(closing), "at": at,
                                 "report": state, "files": reports})
            self.store.update_slide(
                self.slide["id"], {"status": "finalised", "finalised_at": at, "reports": reports},
                [ev],
            )
            closing.pop("review_history", None)
            closing.pop("formula_changes", None)
            self.slide = closing
            self._emit([ev])
            return state

    def finalise_blockers(self) -> list[str]:
        with self._lock:
            return self._blockers(self.slide, self.tally())

    def _blockers(self, slide: SlideRecord, t: Tally) -> list[str]:
        out = _blockers(slide, t)
        if self.require_sample_id and slide["sample_id"].startswith(UNNAMED):
            out.append("enter the sample ID (the lab requires one on every report)")
        if self.require_operator and not (slide.get("operator") or slide.get("signed_off_by")):
            out.append("enter who counted or signs off (the lab requires a name on every "
                       "report)")
        return out

    def set_models(self, models: dict[str, Any], change: dict[str, Any],
                   action: str = "adaptation") -> None:
        """The models and settings counting from the next field on (a lab adaptation activated
        or rolled back, ``action`` "adaptation"; a new cell diameter, "magnification"): recorded
        on every later field, and as an event in the open slide's audit trail."""
        with self._lock:
            at = now_iso()
            ev = Event("slide", {"action": action, **self._slide_payload(self.slide),
                                 "at": at, **change})
            self.store.audit(self.slide["id"], [ev])
            self.models = models
            self._emit([ev])

    # ------------------------------------------------------------------ notes

    def set_notes(self, slide_id: str | None = None, **notes: str | None) -> dict[str, str]:
        """Operator (who counted), signed_off_by and the slide's comment; None leaves one as it
        is, '' clears it. Returns the slide's notes."""
        unknown = set(notes) - {"operator", "signed_off_by", "comment"}
        if unknown:
            raise BadValue(f"unknown slide notes {sorted(unknown)} (operator, "
                               "signed_off_by, comment)")
        given = {k: _check_note(k, v) for k, v in notes.items() if v is not None}
        with self._lock:
            self._require_slide(slide_id)
            self._require_open()
            if given:
                self._emit([self._set_notes(given)])
            return self.notes()

    def _set_notes(self, given: dict[str, str]) -> Event:
        at = now_iso()
        ev = Event("slide", {"action": "notes", **self._slide_payload(self.slide), "at": at,
                             **given})
        self.store.set_slide_notes(self.slide["id"], given, at, [ev])
        for k, v in given.items():
            self.slide[k] = v  # type: ignore[literal-required]
        return ev

    def notes(self, slide: SlideRecord | None = None) -> dict[str, str]:
        s = self.slide if slide is None else slide
        return {"operator": s.get("operator") or "", "signed_off_by": s.get("signed_off_by") or "",
                "comment": s.get("comment") or ""}

    def comment_cell(self, cell_id: str, comment: str | None) -> CellRecord:
        """The technician's note on one cell ('' or None removes it); audited."""
        text = _check_note("comment", comment)
        with self._lock:
            self._require_open()
            cell = self.cells.get(cell_id)
            if cell is None:
                raise UnknownItem(f"no cell {cell_id!r} on the open slide")
            at = now_iso()
            updated: CellRecord = {**cell}
            if text:
                updated["comment"] = text
            else:
                updated.pop("comment", None)
            payload = self._cell_payload(updated, "commented")
            payload["at"] = at
            payload["comment"] = text
            ev = Event("cell", payload)
            self.store.set_cell_comment(cell_id, text, at, [ev])
            self.cells[cell_id] = updated
            self._emit([ev])
            return updated

    # ------------------------------------------------------------------ manual count, discards

    def add_manual(self, label: str) -> CellRecord:
        """Count a cell the camera missed, as on a manual differential counter: it belongs to
        the field on screen (the last captured), has no image, and is marked as added by hand
        in the gallery and the reports. Taken back by rejecting it ('added_in_error')."""
        if not isinstance(label, str) or label not in taxonomy.GROUP_OF:
            raise BadValue(f"cannot add a cell of class {_shown(label)}: use one of "
                               f"{', '.join(self.formula.review_classes())}")
        with self._lock:
            self._require_open()
            f = self._last_field
            if f is None:
                raise SessionError("capture a field first: a cell added by hand belongs to the "
                                   "field on screen")
            if f.get("discarded"):
                raise SessionError(f"field #{f['seq']} is discarded: take it back or capture "
                                   "another before adding cells to it")
            n = 1 + sum(1 for c in self.cells.values()
                        if c["field_id"] == f["id"] and c["status"] == STATUS_MANUAL)
            at = now_iso()
            cell: CellRecord = {
                "id": f"{f['id']}-M{n:02d}", "slide_id": self.slide["id"], "field_id": f["id"],
                "seq": f["seq"], "idx": 100 + n, "bbox": [0, 0, 0, 0], "area_px": 0,
                "label": label, "score": 1.0, "probs": {label: 1.0}, "status": STATUS_MANUAL,
                "reviewed_label": None, "review_reason": None, "reviewed_at": None,
                "created_at": at, "crop_file": None,
            }
            ev = Event("cell", {**self._cell_payload(cell, "added"), "at": at})
            self.store.add_manual_cell(cell, [ev])
            self.cells[cell["id"]] = cell
            self._emit([ev])
            return cell

    def discard_field(self, field_id: str, reason: str | None) -> dict[str, Any]:
        """Set a field aside with all its cells (``reason`` in DISCARD_REASONS), or take it back
        (None). Nothing is deleted; both are events in the audit trail."""
        if reason is not None and reason not in DISCARD_REASONS:
            raise BadValue(f"discard reason must be one of {', '.join(DISCARD_REASONS)}")
        with self._lock:
            self._require_open()
            fields = {f["id"]: f for f in self.store.fields(self.slide["id"])}
            f = fields.get(field_id)
            if f is None:
                raise UnknownItem(f"no field {field_id!r} on the open slide")
            if (reason is None) == (not f.get("discarded")):
                raise SessionError(f"field #{f['seq']} is "
                                   f"{'already discarded' if reason else 'not discarded'}")
            at = now_iso()
            mine = [c for c in self.cells.values() if c["field_id"] == field_id]
            before = self.counted()
            ev = Event("slide", {"action": "field_discarded" if reason else "field_restored",
                                 **self._slide_payload(self.slide), "at": at,
                                 "field_id": field_id, "seq": f["seq"], "reason": reason,
                                 "cells": len(mine)})
            self.store.set_field_discarded(field_id, reason, at, [ev])
            for c in mine:
                u: CellRecord = {**c}
                if reason:
                    u["discarded"] = reason
                else:
                    u.pop("discarded", None)
                self.cells[c["id"]] = u
            if self._last_field is not None and self._last_field["id"] == field_id:
                if reason:
                    self._last_field["discarded"] = reason
                    self._last_field["discarded_at"] = at
                else:
                    self._last_field.pop("discarded", None)
                    self._last_field.pop("discarded_at", None)
            ev.payload["counted_change"] = self.counted() - before
            self._emit([ev])
            return {"field_id": field_id, "seq": f["seq"], "discarded": reason,
                    "counted_change": ev.payload["counted_change"]}

    # ------------------------------------------------------------------ counting

    def add_field(
        self,
        rgb: np.ndarray,
        result: FieldResult,
        *,
        source: str = "",
        captured_at: str = "",
        t_trigger: float | None = None,
        capture_id: int | None = None,
        slide_id: str | None = None,
    ) -> FieldRecord:
        """Count one analysed field. Returns the field summary (also published as an event).
        ``capture_id``: the store's record of the capture, closed in the field's transaction.
        ``slide_id``: the slide the field was captured for; another one open now (a new slide
        started while it was analysed) refuses it rather than count one patient's field on
        another's slide."""
        rgb = ensure_rgb_uint8(rgb)
        if result.error:
            raise SessionError(f"field not counted: {result.error}")
        with self._lock:
            self._require_open()
            if slide_id is not None and slide_id != self.slide["id"]:
                raise SessionError(
                    f"field not counted: it was captured for slide {slide_id}, which was closed "
                    "before its analysis finished"
                )
            t0 = time.perf_counter()
            h, w = rgb.shape[:2]
            sig = field_signature(rgb)
            overlaps = [
                ov for fid, prev in self._sigs
                if (ov := find_overlap(prev, sig, (h, w), prev_id=fid)) is not None
            ]
            best = max(overlaps, key=lambda o: o.fraction) if overlaps else None
            seq = self.n_fields + 1
            fid = f"{self.slide['id']}-F{seq:04d}"
            at = captured_at or now_iso()
            balanced = white_balance(rgb) if result.cells else rgb
            cell_rows: list[CellRecord] = []
            crops: dict[str, np.ndarray] = {}
            # The base classifier's features of each cell, with the model that computed them:
            # a reviewed cell becomes one of the lab's labelled cells for adaptation.
            model_sha = (result.model or {}).get("classifier_sha256")
            embeddings: dict[str, tuple[str, np.ndarray]] = {}
            unknown = sorted({c.label for c in result.cells
                              if c.label != UNIDENTIFIED and c.label not in taxonomy.GROUP_OF})
            if unknown:
                raise SessionError(f"field not counted: unknown cell class(es) {unknown} "
                                   f"(known: {', '.join(taxonomy.CLASSES)})")
            for i, c in enumerate(result.cells):
                x0, y0, x1, y1 = (int(v) for v in c.bbox)
                box = (x0, y0, x1, y1)
                leukocyte = taxonomy.is_leukocyte(c.label)
                if not leukocyte and self.formula.row_for(c.label) is None:
                    status = STATUS_OTHER  # set aside before the overlap test, as always
                elif any(box_fraction_inside(box, o.rect) >= 0.5 for o in overlaps):
                    status = STATUS_DUPLICATE
                else:
                    status = STATUS_COUNTED if leukocyte else STATUS_OTHER
                cid = f"{fid}-C{i + 1:02d}"
                cell_rows.append({
                    "id": cid,
                    "slide_id": self.slide["id"],
                    "field_id": fid,
                    "seq": seq,
                    "idx": i + 1,
                    "bbox": list(box),
                    "area_px": int(c.area_px),
                    "label": c.label,
                    "score": float(c.score),
                    "probs": {k: float(v) for k, v in c.probs.items()},
                    "status": status,
                    "reviewed_label": None,
                    "review_reason": None,
                    "reviewed_at": None,
                    "created_at": at,
                    "crop_file": None,
                })
                crops[cid] = cell_crop(balanced, box, CROP_PX)
                if model_sha and c.embedding is not None:
                    embeddings[cid] = (str(model_sha), c.embedding)
            quality = json_safe(dict(result.quality or {}))
            field_row: FieldRecord = {
                "id": fid,
                "slide_id": self.slide["id"],
                "seq": seq,
                "captured_at": at,
                "source": source or result.path,
                "width": w,
                "height": h,
                "quality": quality,
                "timing_ms": json_safe(dict(result.timing_ms or {})),
                "n_cells": len(cell_rows),
                "n_counted": sum(1 for c in cell_rows if c["status"] == STATUS_COUNTED),
                "n_duplicate": sum(1 for c in cell_rows if c["status"] == STATUS_DUPLICATE),
                "overlap_field": best.field_id if best else None,
                "overlap_fraction": round(best.fraction, 3) if best else 0.0,
                "overlap_rect": list(best.rect) if best else None,
                "flagged_duplicate": bool(best and best.fraction > self.duplicate_overlap),
                "models": self.models,
            }
            events = [Event("cell", self._cell_payload(c, "counted")) for c in cell_rows
                      if c["status"] == STATUS_COUNTED]
            if t_trigger is not None:
                # Trigger -> counted (before the commit), for the MQTT stats topic.
                field_row["latency_ms"] = round((time.perf_counter() - t_trigger) * 1000, 1)
            fev = Event("field", self._field_payload(field_row))
            new_cells = {c["id"]: c for c in cell_rows}
            prospective = {**self.cells, **new_cells}
            state_after = self._state(self.slide, prospective, self.n_fields + 1,
                                      self.n_fields_flagged + (1 if best else 0))
            fev.payload["counted_total"] = state_after["counted"]
            self.store.add_field(field_row, cell_rows, rgb, crops, sig, [*events, fev],
                                 capture_id=capture_id, embeddings=embeddings)
            self.cells = prospective
            self.n_fields += 1
            self.n_fields_flagged += 1 if best else 0
            self._last_field = field_row
            self._sigs = [*self._sigs, (fid, sig)][-self.guard_history :]
            field_row["session_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            self._emit([*events, fev])
            return field_row

    def review(self, cell_id: str, label: str | None, reason: str | None = None,
               if_unreviewed: bool = False) -> CellRecord:
        """Reclassify (label: any class of the taxonomy), reject (label 'rejected' + reason) or
        restore (None) a cell. The machine's label is never overwritten; both are kept.
        ``if_unreviewed``: only while nobody has decided on the cell (the page's U takes back a
        cell it added, not another person's later correction of it)."""
        with self._lock:
            self._require_open()
            cell = self.cells.get(cell_id)
            if cell is None:
                raise UnknownItem(f"no cell {cell_id!r} on the open slide")
            if if_unreviewed and cell.get("reviewed_label"):
                raise SessionError(
                    f"cell {cell_id} was reviewed meanwhile (now {cell['reviewed_label']}): "
                    "not taken back; look at it in Review")
            if cell.get("discarded"):
                # As confirm says: a decision on a cell set aside with its field would count
                # the moment the field is taken back, unseen.
                raise SessionError(f"cell {cell_id} is in a discarded field: take the field "
                                   "back first")
            if label is None:
                action, reason = "restored", None
            elif label == REJECTED:
                allowed = REJECT_REASONS + ((ADDED_IN_ERROR,) if cell["status"] == STATUS_MANUAL
                                            else ())
                if reason not in allowed:
                    raise BadValue(f"reject reason must be one of {', '.join(allowed)}")
                action = "rejected"
            elif isinstance(label, str) and label in taxonomy.GROUP_OF:
                action, reason = "reclassified", None
            else:
                raise BadValue(
                    f"cannot reclassify as {_shown(label)}: use one of "
                    f"{', '.join(self.formula.review_classes())}, or reject"
                )
            before = effective_label(cell)
            at = now_iso()
            updated: CellRecord = {**cell, "reviewed_label": label, "review_reason": reason,
                       "reviewed_at": at if label is not None else None}
            payload = self._cell_payload(updated, action)
            # Its own time: a restore has no reviewed_at and would otherwise carry the capture
            # time, a wrong audit trail and the same MQTT de-duplication key for every restore.
            payload["at"] = at
            payload["previous_reviewed_label"] = cell.get("reviewed_label")
            payload["previous_effective_label"] = before
            ev = Event("cell", payload)
            self.store.update_cell(cell_id, label, reason, updated["reviewed_at"], [ev])
            self.cells[cell_id] = updated
            self._emit([ev])
            return updated

    def confirm(self, cell_ids: Sequence[str]) -> list[CellRecord]:
        """The technician says the shown class is right: each cell's machine label becomes its
        reviewed label (review_reason 'confirmed'), so it counts exactly as before and is now
        one of the lab's labelled cells. Cells already reviewed are left as they are. All or
        nothing: an unknown cell, or one with no class to confirm (unidentified, rejected, a
        duplicate), refuses the whole request."""
        with self._lock:
            self._require_open()
            todo: list[CellRecord] = []
            for cid in dict.fromkeys(cell_ids):
                cell = self.cells.get(cid)
                if cell is None:
                    raise UnknownItem(f"no cell {cid!r} on the open slide")
                # A cell added by key is the technician's own call already, and has no image
                # to learn from.
                if cell.get("reviewed_label") or cell["status"] == STATUS_MANUAL:
                    continue
                if cell.get("discarded"):
                    raise SessionError(f"cell {cid} is in a discarded field: take the field "
                                       "back first")  # fmt: skip
                if cell["label"] == UNIDENTIFIED or effective_label(cell) is None:
                    raise SessionError(
                        f"cell {cid} has no class to confirm ({cell['label']}, "
                        f"{cell['status']}): choose its class instead"
                    )
                todo.append(cell)
            if not todo:
                return []
            at = now_iso()
            updated: list[CellRecord] = []
            events: list[Event] = []
            for cell in todo:
                u: CellRecord = {**cell, "reviewed_label": cell["label"],
                                 "review_reason": CONFIRMED, "reviewed_at": at}
                payload = self._cell_payload(u, "confirmed")
                payload["previous_reviewed_label"] = None
                payload["previous_effective_label"] = effective_label(cell)
                updated.append(u)
                events.append(Event("cell", payload))
            self.store.update_cells(
                [(u["id"], u["reviewed_label"], CONFIRMED, at) for u in updated], events
            )
            for u in updated:
                self.cells[u["id"]] = u
            self._emit(events)
            return updated

    # ------------------------------------------------------------------ reading

    def tally(self, cells: dict[str, CellRecord] | None = None) -> Tally:
        labels = (effective_label(c) for c in (self.cells if cells is None else cells).values())
        return tally(self.formula, (lab for lab in labels if lab is not None), self.ci_method)

    def counts(self, cells: dict[str, CellRecord] | None = None) -> dict[str, int]:
        """Cells per shown row of the formula (counted, per-100 and count-only rows)."""
        return self.tally(cells).counts()

    def counted(self) -> int:
        return self.tally().counted

    def state(self) -> dict[str, Any]:
        """The slide as GET /api/state and the 'differential' event show it."""
        with self._lock:
            return self._state(self.slide)

    def _state(
        self,
        slide: SlideRecord,
        cells: dict[str, CellRecord] | None = None,
        n_fields: int | None = None,
        n_flagged: int | None = None,
    ) -> dict[str, Any]:
        cells = self.cells if cells is None else cells
        t = self.tally(cells)
        n = t.counted
        rows = t.rows
        counts = t.counts()
        counted_rows = [r for r in rows if r["kind"] == taxonomy.COUNTED]
        reviewed = [c for c in cells.values() if c.get("reviewed_label")]
        unreviewed = [c for c in cells.values() if not c.get("reviewed_label")]
        target = int(slide["target"])
        blockers = self._blockers(slide, t) if slide.get("status") == "open" else []
        return {
            "schema": STATE_SCHEMA,
            "station_id": self.station_id,
            "slide": self._slide_payload(slide),
            # Flat copies for MQTT consumers (the monitor reads these).
            "slide_id": slide["id"],
            "sample_id": slide["sample_id"],
            "target": target,
            "counted": n,
            "complete": n >= target,
            "finalised": slide.get("status") == "finalised",
            "progress": round(min(1.0, n / target), 4) if target else 0.0,
            # Every shown row; `kind` says counted / per_100_wbc / count_only.
            "classes": rows,
            "counts": counts,
            "unidentified": counts[UNIDENTIFIED],
            # Per 100 counted leukocytes for every row (a share of them for counted rows).
            "percentages": {r["label"]: r["percent"] for r in rows},
            "ci95": {r["label"]: [r["ci_low"], r["ci_high"]] for r in counted_rows},
            "ci_method": self.ci_method,
            "class_counts": t.by_class,
            "formula": self.formula.describe(),
            "flags": t.flags,
            "fields": self.n_fields if n_fields is None else n_fields,
            "fields_overlapping": self.n_fields_flagged if n_flagged is None else n_flagged,
            "cells_detected": len(cells),
            "excluded": {
                "duplicate": sum(1 for c in unreviewed if c["status"] == STATUS_DUPLICATE),
                # Not leukocytes, with no row in the formula (machine or review said so).
                "other": t.set_aside,
                "rejected": sum(1 for c in reviewed if c["reviewed_label"] == REJECTED),
            },
            "reviewed": len(reviewed),
            # Standing cells the technician added by key, and fields set aside with their cells.
            # (the report's rule: a hand-added cell the formula sets aside is not one of them)
            "manual": sum(1 for c in cells.values()
                          if c["status"] == STATUS_MANUAL and self._row_key(c) is not None),
            "fields_discarded": len({c["field_id"] for c in cells.values()
                                     if c.get("discarded")}),
            "notes": self.notes(slide),
            "requires": {"sample_id": self.require_sample_id, "operator": self.require_operator},
            "can_finalise": slide.get("status") == "open" and not blockers,
            "finalise_blockers": blockers,
            "reports": slide.get("reports") or {},
            # The open slide: what counts its next field (a magnification or an adaptation
            # changed during it is on the fields and in the audit trail); else its start's.
            "models": (self.models if slide is self.slide and slide.get("status") == "open"
                       else slide.get("models") or self.models),
            "updated_at": now_iso(),
        }

    def last_field(self) -> dict[str, Any] | None:
        with self._lock:
            f = self._last_field
            if f is None:
                return None
            return {**f, "cells": [self.cell_view(c) for c in self.cells.values()
                                   if c["field_id"] == f["id"]]}

    def field_view(self, field_id: str) -> dict[str, Any] | None:
        """One field of the open slide with its cells (the review's field view)."""
        with self._lock:
            if self._last_field is not None and self._last_field["id"] == field_id:
                return self.last_field()
            f = next((x for x in self.store.fields(self.slide["id"]) if x["id"] == field_id),
                     None)
            if f is None:
                return None
            return {**f, "cells": [self.cell_view(c) for c in self.cells.values()
                                   if c["field_id"] == field_id]}

    def gallery(self) -> list[dict[str, Any]]:
        """Every cell of the slide for review, most doubtful first within each group."""
        with self._lock:
            cells = [self.cell_view(c) for c in self.cells.values()]
        return sorted(cells, key=lambda c: (c["group_order"], c["score"]))

    def _row_key(self, c: CellRecord) -> str | None:
        eff = effective_label(c)
        row = self.formula.row_for(eff) if eff is not None else None
        return row.key if row is not None else None

    def cell_view(self, c: CellRecord) -> dict[str, Any]:
        eff = effective_label(c)
        row = self._row_key(c)
        if row is not None:
            group = row
        elif c.get("reviewed_label") == REJECTED:
            group = REJECTED
        elif c.get("discarded"):
            group = DISCARDED
        elif eff is not None:
            group = STATUS_OTHER  # a non-leukocyte the formula has no row for
        else:
            group = c["status"]  # duplicate
        # Unidentified first: they block finalising and need the technician most; then the
        # formula's rows in its order, then what does not stand.
        keys = [r.key for r in self.formula.rows]
        order = [UNIDENTIFIED, *(k for k in keys if k != UNIDENTIFIED)]
        tail = [STATUS_OTHER, STATUS_DUPLICATE, DISCARDED, REJECTED]
        group_order = (order.index(group) if group in order
                       else len(order) + (tail.index(group) + 1 if group in tail else 0))
        return {
            "id": c["id"],
            "field_id": c["field_id"],
            "bbox": c["bbox"],
            "label": c["label"],
            "score": round(float(c["score"]), 4),
            "probs": c["probs"],
            "status": c["status"],
            "reviewed_label": c.get("reviewed_label"),
            "review_reason": c.get("review_reason"),
            "effective_label": eff,
            # The row the cell is counted in (None: it is not), and how that row counts.
            "counted_as": row,
            "kind": taxonomy.kind_of(eff) if row is not None and eff is not None else None,
            "class_group": taxonomy.group_of(eff) if eff is not None else None,
            "group": group,
            "group_order": group_order,
            "manual": c["status"] == STATUS_MANUAL,
            "comment": c.get("comment") or "",
            "discarded": c.get("discarded"),
        }

    # ------------------------------------------------------------------ helpers

    def require_slide(self, slide_id: str | None) -> None:
        """``_require_slide`` for a caller that checks before its own work (the station's
        finalise, before it looks at the fields still analysing)."""
        with self._lock:
            self._require_slide(slide_id)

    def _require_slide(self, slide_id: str | None) -> None:
        """A page's dialog names the slide it was opened for: another client may have finalised
        that slide and started the next patient's meanwhile, and a sample ID, a sign-off or a
        finalise meant for one patient must never land on another's. None: the open slide
        (MQTT commands and scripts that act on "whatever is open")."""
        if slide_id is None or slide_id == self.slide["id"]:
            return
        if not isinstance(slide_id, str):
            raise BadValue(f"slide_id must be text, got {type(slide_id).__name__}")
        raise SessionError(
            f"the slide has changed: this was meant for slide {_shown(slide_id)}, the station "
            f"is now on {self.slide['sample_id']} ({self.slide.get('status')}); nothing was "
            "changed, look again")

    def _require_open(self) -> None:
        if self.slide.get("status") != "open":
            raise SessionError(
                f"slide {self.slide.get('sample_id')} is {self.slide.get('status')}: "
                "start a new slide"
            )

    def _slide_payload(self, slide: SlideRecord) -> dict[str, Any]:
        return {
            "slide_id": slide["id"],
            "sample_id": slide["sample_id"],
            "target": slide["target"],
            "status": slide["status"],
            "created_at": slide["created_at"],
            "finalised_at": slide.get("finalised_at"),
        }

    def _cell_payload(self, c: CellRecord, action: str) -> dict[str, Any]:
        return {
            "cell_id": c["id"],
            "slide_id": c["slide_id"],
            "sample_id": self.slide.get("sample_id"),
            "field_id": c["field_id"],
            "action": action,
            "label": c["label"],
            "reviewed_label": c.get("reviewed_label"),
            "review_reason": c.get("review_reason"),
            "effective_label": effective_label(c),
            "group": (taxonomy.group_of(eff) if (eff := effective_label(c)) is not None
                      else None),
            "counted_as": self._row_key(c),
            "score": round(float(c["score"]), 4),
            "probs": {k: round(float(v), 4) for k, v in c["probs"].items()},
            "bbox": c["bbox"],
            "at": c.get("reviewed_at") or c.get("created_at"),
        }

    def _field_payload(self, f: FieldRecord) -> dict[str, Any]:
        keys = ("id", "seq", "captured_at", "source", "width", "height", "quality", "timing_ms",
                "n_cells", "n_counted", "n_duplicate", "overlap_field", "overlap_fraction",
                "flagged_duplicate")
        row: Mapping[str, Any] = f  # keys from a runtime tuple, not literals
        out = {k: row[k] for k in keys}
        out["field_id"] = out.pop("id")
        out["slide_id"] = f["slide_id"]
        out["sample_id"] = self.slide.get("sample_id")
        if "latency_ms" in f:
            out["latency_ms"] = f["latency_ms"]
        return out

    def _emit(self, events: list[Event]) -> None:
        for ev in events:
            self.publish(ev)
        self.publish(Event("differential", self._state(self.slide)))


def json_safe(v: Any) -> Any:
    """Plain JSON values only: numpy scalars to Python, NaN/inf to None (strict JSON consumers
    such as the MQTT outbox refuse them, and one odd quality metric must not block a count)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.ndarray):
        return json_safe(v.tolist())
    return v


def _blockers(slide: SlideRecord, t: Tally) -> list[str]:
    out = []
    n = t.counted
    target = int(slide["target"])
    if n == 0:
        out.append("no cells counted yet")
    elif n < target:
        out.append(f"{n} of {target} cells counted (or lower the target to finalise early)")
    unid = t.by_class.get(UNIDENTIFIED, 0)
    if unid:
        out.append(f"{unid} unidentified cell{'s' if unid != 1 else ''} to resolve "
                   "(reclassify or reject)")
    return out


def _check_target(target: Any) -> int:
    try:
        return check_target(target)
    except InputError as e:
        raise BadValue(str(e)) from None


def _shown(value: object, limit: int = 60) -> str:
    """A value quoted in an error, cut short: a 4,000-character label is not echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_note(name: str, value: Any) -> str:
    """A name or comment as stored: text, no hidden characters, bounded."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadValue(f"{name} must be text, got {type(value).__name__}")
    text = value.strip()
    if name == "comment":
        # A tab pasted from a table reads as a space; refused, the comment was lost.
        text = text.replace("\t", " ")
    # Line breaks are what a comment is made of; any other hidden character is refused.
    bad = hidden_char(text.replace("\n", " ").replace("\r", " ")) if name == "comment" \
        else hidden_char(text)
    if bad is not None:
        raise BadValue(f"{name} must not contain {bad}")
    limit = MAX_NOTE_CHARS if name == "comment" else MAX_NAME_CHARS
    if len(text) > limit:
        raise BadValue(f"{name} must be at most {limit} characters, got {len(text)}")
    return text


def _check_sample_id(sample_id: Any) -> str:
    try:
        text = check_sample_id(sample_id)
    except InputError as e:
        raise BadValue(str(e)) from None
    if text.lower().startswith(UNNAMED):
        # The station's own name for a slide without one: entered, it would read as missing
        # (a lab that requires a sample ID could never finalise the slide).
        raise BadValue(
            f"a sample id starting with {UNNAMED!r} is the station's placeholder for a slide "
            "without one: enter the sample's own id"
        )
    return text
