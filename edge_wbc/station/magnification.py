""""Measure magnification" on the station: a new microscope or camera is set up from its own
fields (edge_wbc.pipeline.scale: red cells are the ruler), the technician accepts the leukocyte
diameter it implies, and the station counts with it from the next field on.

What is measured: the stored images of the open slide's fields (discarded ones left out); with
none, the last fields of earlier slides; with none at all, frames taken from the camera now (a
replayed folder is put back where it was). The accepted value is the station's own decision,
kept in ``<data_dir>/magnification.json`` so that a restart keeps it (the log says it overrides
the config's ``[postprocess] cell_diameter_px``); "reset" deletes the file and goes back to the
config's value. Each change reaches the analyser between two fields, goes into the open slide's
audit trail (a ``slide`` event, action ``magnification``) and is recorded on every later field
(its models block carries ``cell_diameter_px``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_wbc.counting.session import now_iso
from edge_wbc.files import write_atomic
from edge_wbc.pipeline.scale import CellScale, ScaleError, estimate_cell_diameter
from edge_wbc.station.app import Station

log = logging.getLogger(__name__)

FILE = "magnification.json"
#: Fields measured at most: 20 give the magnification to a few per cent (~0.15 s each here).
FIELDS = 20
#: Frames taken from the camera when no field has been captured yet.
CAMERA_FRAMES = 3


class MagnificationRefused(Exception):
    """The measurement or change cannot be done; the message says why (shown on the page)."""


class BadDiameter(MagnificationRefused):
    """The value given is not a cell diameter the config would take."""


def config_rule(cfg: Any) -> Callable[[Any], float]:
    """The config's own rule for ``[postprocess] cell_diameter_px`` (edge_wbc.config), as a
    check of one value: returns it as a float or raises ValueError with the reason."""
    from edge_wbc.config import ConfigError

    def check(value: Any) -> float:
        if value is None:  # replace() would take None as "not given"
            raise ValueError("cell_diameter_px: give a number of pixels")
        try:
            return float(cfg.replace(postprocess_cell_diameter_px=value)
                         .postprocess.cell_diameter_px)
        except ConfigError as e:
            raise ValueError("; ".join(f"cell_diameter_px: {p.message}"
                                       for p in e.problems)) from None

    return check


def restore_saved(analyzer: Any, data_dir: Path, config_px: float,
                  check: Callable[[Any], float]) -> tuple[dict[str, Any] | None, str | None]:
    """At start, before the session records the models of its slide: puts the diameter accepted
    on this station (over the config's) into ``analyzer``. Returns the saved document (None:
    the config's value stays) and a warning when the saved value cannot be used."""
    f = Path(data_dir) / FILE
    if not f.is_file():
        return None, None
    try:
        doc = json.loads(f.read_text())
        px = check(doc["cell_diameter_px"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        return None, (f"{f}: cannot be used ({e}); counting with the config's "
                      f"cell_diameter_px {config_px:g}")
    analyzer.params = dataclasses.replace(analyzer.params, cell_diameter_px=px)
    log.info("cell_diameter_px %g px accepted on this station at %s (%s) overrides the "
             "config's %g px", px, doc.get("at"), f, config_px)
    return doc, None


class Magnification:
    """``analyzer``: the FieldAnalyzer counting the station's fields; ``config_px``: the
    config's cell_diameter_px; ``check``: the config's rule for the value (returns it as a float,
    raises ValueError with the reason)."""

    def __init__(self, analyzer: Any, station: Station, config_px: float, data_dir: Path,
                 check: Callable[[Any], float], saved: dict[str, Any] | None = None) -> None:
        self.analyzer = analyzer
        self.station = station
        self.session = station.session
        self.config_px = float(config_px)
        self.file = Path(data_dir) / FILE
        self.check = check
        self._measuring = threading.Lock()
        self._changing = threading.Lock()
        self.last: dict[str, Any] | None = None
        #: What restore_saved found at start (None: the config's value is in use).
        self.saved = saved

    # ------------------------------------------------------------------ start

    def restore(self) -> str | None:
        """At start: the diameter accepted on this station (over the config's), if any.
        Returns a warning when the saved value cannot be used (the config's stays)."""
        self.saved, problem = restore_saved(self.analyzer, self.file.parent, self.config_px,
                                            self.check)
        if self.saved is not None:
            self.session.models = self.analyzer.describe()
        return problem

    # ------------------------------------------------------------------ reading

    @property
    def current_px(self) -> float:
        return float(self.analyzer.params.cell_diameter_px)

    def status(self) -> dict[str, Any]:
        return {
            "cell_diameter_px": self.current_px,
            "config_px": self.config_px,
            "saved": self.saved,  # None: the config's value is in use
            "last": self.last,
            "fields_max": FIELDS,
        }

    # ------------------------------------------------------------------ actions

    def measure(self) -> dict[str, Any]:
        """The red cells' size and the leukocyte diameter it implies, on the fields at hand."""
        if not self._measuring.acquire(blocking=False):
            raise MagnificationRefused("a measurement is already running")
        try:
            source, images = self._images()
            try:
                scale = estimate_cell_diameter(images)
            except ScaleError:
                raise MagnificationRefused(
                    f"too few red cells to measure the magnification on the {source}: capture "
                    "fields with red cells spread in a single layer (not the feathered edge nor "
                    "the thick part), or set [postprocess] cell_diameter_px by hand") from None
            self.last = {**_describe(scale), "source": source, "at": now_iso(),
                         "current_px": self.current_px, "config_px": self.config_px}
            return self.last
        finally:
            self._measuring.release()

    def accept(self, value: Any) -> dict[str, Any]:
        """Count with leukocyte diameter ``value`` (px) from the next field on, over restarts."""
        try:
            px = self.check(value)
        except ValueError as e:
            raise BadDiameter(str(e)) from None
        measured = self.last if self.last and round(self.last["leukocyte_px"]) == round(px) \
            else None
        doc = {"cell_diameter_px": px, "at": now_iso(), "config_px": self.config_px,
               "measured": measured}
        with self._changing:
            self._write(doc)
            try:
                self._switch(px, "accepted", measured)
            except Exception:
                # Not in the audit trail: not switched, and not after a restart either.
                if self.saved is None:
                    self.file.unlink(missing_ok=True)
                else:
                    self._write(self.saved)
                raise
            self.saved = doc
        return self.status()

    def reset(self) -> dict[str, Any]:
        """Back to the config's cell_diameter_px (the saved value is deleted)."""
        with self._changing:
            if self.saved is None and self.current_px == self.config_px:
                return self.status()  # nothing to undo
            try:
                self.file.unlink(missing_ok=True)
            except OSError as e:
                raise MagnificationRefused(
                    f"could not delete {self.file}: {e.strerror or e}") from None
            self.saved = None
            self._switch(self.config_px, "reset to the config's value", None)
        return self.status()

    # ------------------------------------------------------------------ inside

    def _images(self) -> tuple[str, Iterator[np.ndarray]]:
        store = self.session.store
        slide_id = self.session.slide["id"]
        own = [f["id"] for f in store.fields(slide_id) if not f.get("discarded")]
        if own:
            return (f"{min(len(own), FIELDS)} last field(s) of this slide",
                    _read([store.field_image(i) for i in own[-FIELDS:]]))
        earlier: list[str] = []
        for s in store.slides(20):
            if s["id"] != slide_id:
                earlier = [f["id"] for f in store.fields(s["id"]) if not f.get("discarded")
                           ] + earlier
            if len(earlier) >= FIELDS:
                break
        if earlier:
            return (f"{min(len(earlier), FIELDS)} last field(s) of earlier slides",
                    _read([store.field_image(i) for i in earlier[-FIELDS:]]))
        from edge_wbc.camera import CameraError, FrameError

        try:
            frames = self.station.frames(CAMERA_FRAMES)
        except (CameraError, FrameError) as e:
            raise MagnificationRefused(
                f"no fields captured yet and no frame from the camera: {e}") from None
        return f"{len(frames)} frame(s) from the camera", iter(frames)

    def _apply(self, px: float) -> None:
        # A new frozen params object, swapped in one assignment: analyze() reads it once.
        self.analyzer.params = dataclasses.replace(self.analyzer.params, cell_diameter_px=px)

    def _switch(self, px: float, how: str, measured: dict[str, Any] | None) -> None:
        with self.station.between_fields():
            before = self.current_px
            # Audited first: a store that refuses the event leaves the analyser as it was.
            self.session.set_models(
                {**self.analyzer.describe(), "cell_diameter_px": px},
                {"cell_diameter_px": px, "previous_px": before, "how": how,
                 "measured": measured},
                action="magnification",
            )
            self._apply(px)
        log.info("cell_diameter_px %g px (was %g): %s", px, before, how)

    def _write(self, doc: dict[str, Any]) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.file, json.dumps(doc) + "\n")
        except OSError as e:
            # Not kept over a restart: not switched at all.
            raise MagnificationRefused(
                f"could not record the change in {self.file}: {e.strerror or e}") from None


def _read(paths: list[Path | None]) -> Iterator[np.ndarray]:
    from edge_wbc.pipeline.imageio import ImageError, read_image

    for p in paths:
        if p is None:
            continue
        try:
            yield read_image(p)
        except ImageError:
            continue  # a field image lost from disk: measured on the others


def _describe(s: CellScale) -> dict[str, Any]:
    return {"red_cell_px": round(s.red_cell_px, 1), "leukocyte_px": round(s.leukocyte_px, 1),
            "spread": [round(s.spread[0], 1), round(s.spread[1], 1)], "fields": s.fields,
            "skipped": s.skipped}
