""""Adapt to this lab" on the station: fit a lab head on the store's reviewed cells (the code of
``edge-wbc adapt fit --data-dir``), show its held-out validation, activate it, roll back.

Fitted versions live in ``<data_dir>/adaptations/<id>/`` (never overwritten). Which one is in
use is the station's own decision, kept in ``<data_dir>/adaptations/active.json`` so that a
restart keeps it; while that file is absent the config's ``[models] adaptation`` applies. A
switch reaches the analyser at once (the next field is classified by it), goes into the open
slide's audit trail and over MQTT as a ``slide`` event (action ``adaptation``), and every field
records the models that counted it.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge_wbc.counting.session import SlideSession, now_iso
from edge_wbc.files import write_atomic
from edge_wbc.pipeline.adaptation import (
    ADAPTATION_JSON,
    MIN_CELLS_PER_CLASS,
    AdaptationError,
    BaseHead,
    cells_from_rows,
    fit_adaptation,
    shipped_base,
    taught_counts,
    write_adaptation,
)

log = logging.getLogger(__name__)

FOLDER = "adaptations"
ACTIVE = "active.json"


class AdaptationRefused(Exception):
    """The fit or switch cannot be done; the message says why (shown on the page)."""


class LabAdaptation:
    """The station's adaptation: ``analyzer`` is the FieldAnalyzer counting the fields."""

    def __init__(self, analyzer: Any, session: SlideSession, data_dir: Path) -> None:
        self.analyzer = analyzer
        self.session = session
        self.dir = Path(data_dir) / FOLDER
        self._lock = threading.Lock()
        self.last_fit: dict[str, Any] | None = None
        self._shipped: BaseHead | None = None

    def _base(self) -> BaseHead:
        """The shipped head (it cannot change while the station runs: loaded once, as the
        page asks for the status on every refresh). Raises AdaptationError."""
        if self._shipped is None:
            self._shipped = shipped_base(self.analyzer)
        return self._shipped

    # ------------------------------------------------------------------ start

    def restore(self) -> str | None:
        """At start: the adaptation the station last activated (over the config's), if any.
        Returns a warning when it cannot be used (the analyser keeps what the config set)."""
        p = self.dir / ACTIVE
        if not p.is_file():
            return None
        try:
            doc = json.loads(p.read_text())
            path = doc.get("path")
        except (OSError, ValueError, AttributeError) as e:
            return f"{p}: unreadable ({e}); using the config's adaptation"
        try:
            self.analyzer.set_adaptation(path)
        except AdaptationError as e:
            return f"the adaptation activated on this station cannot be used ({e}); using " \
                   "the config's"
        self.session.models = self.analyzer.describe()
        return None

    # ------------------------------------------------------------------ reading

    def status(self) -> dict[str, Any]:
        ad = self.analyzer.adaptation
        rows = self.session.store.reviewed_cells()
        # The fit's own rule for "enough cells": only cells it can learn from, labels that
        # teach the same class together (None: no classifier to adapt).
        try:
            base = self._base()
            learnable: dict[str, int] | None = taught_counts(
                cells_from_rows(rows, base.sha256).learnable(base).labels, base)
        except AdaptationError:
            learnable = None
        return {
            "active": ({"id": ad.id, "created": ad.created, "path": str(ad.path),
                        "cells": ad.doc.get("cells"), "validation": ad.doc.get("validation")}
                       if ad is not None else None),
            "versions": self.versions(),
            "reviewed_cells": len(rows),
            "reviewed_by_class": _by_class(r.label for r in rows),
            "learnable_by_class": learnable,
            "min_cells_per_class": MIN_CELLS_PER_CLASS,
            "last_fit": self.last_fit,
        }

    def versions(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.dir.is_dir():
            return out
        for d in sorted(self.dir.iterdir(), reverse=True):
            j = d / ADAPTATION_JSON
            if not j.is_file():
                continue
            try:
                doc = json.loads(j.read_text())
            except (OSError, ValueError):
                continue
            out.append({"id": doc.get("id"), "created": doc.get("created"),
                        "cells": doc.get("cells"), "path": str(d)})
        return out

    # ------------------------------------------------------------------ actions

    def fit(self) -> dict[str, Any]:
        """Fit on every reviewed cell of this station, validate on held-out cells, and write
        the version when it is better (not active yet: ``activate`` does that)."""
        if not self._lock.acquire(blocking=False):
            raise AdaptationRefused("a fit is already running")
        try:
            try:
                base = self._base()
            except AdaptationError as e:
                raise AdaptationRefused(str(e)) from None
            lab = cells_from_rows(self.session.store.reviewed_cells(), base.sha256).learnable(
                base
            )
            # The cells left out (a blast, a cell another classifier saw) are named in every
            # answer, refusals included, so the count on the page adds up.
            left_out = (f" ({len(lab.skipped)} reviewed cell(s) left out: "
                        f"{'; '.join(lab.skipped[:3])}{' …' if len(lab.skipped) > 3 else ''})"
                        if lab.skipped else "")  # fmt: skip
            if not lab.labels:
                raise AdaptationRefused(
                    "no reviewed cells to learn from yet: confirm or change cells in review "
                    f"first (at least {MIN_CELLS_PER_CLASS} of each of two classes){left_out}")
            try:
                result = fit_adaptation(np.stack(lab.embeddings), lab.labels, base, lab.keys)
            except AdaptationError as e:
                raise AdaptationRefused(f"cannot adapt: {e}{left_out}") from None
            out: dict[str, Any] = {
                "at": now_iso(), "accepted": result.accepted, "reason": result.reason,
                "cells": result.cells, "too_few": result.too_few,
                "validation": result.validation, "seconds": round(result.seconds, 2),
                "skipped": len(lab.skipped), "skipped_reasons": lab.skipped[:50], "id": None,
            }
            if result.accepted:
                self.dir.mkdir(parents=True, exist_ok=True)
                stamp = now_iso().replace(":", "").replace("-", "").replace(".", "")
                try:
                    ad = write_adaptation(self.dir / stamp, result, base,
                                          {"data_dir": str(self.session.store.data_dir),
                                           "station": self.session.station_id})
                except (AdaptationError, OSError) as e:
                    raise AdaptationRefused(f"could not write the adaptation: {e}") from None
                out["id"], out["path"] = ad.id, str(ad.path)
            self.last_fit = out
            return out
        finally:
            self._lock.release()

    def activate(self, ident: str | None) -> dict[str, Any]:
        """Use version ``ident`` from the next field on (None: the shipped model)."""
        path: Path | None = None
        if ident is not None:
            match = [v for v in self.versions() if v["id"] == ident]
            if not match:
                raise AdaptationRefused(f"no adaptation {ident!r} on this station")
            path = Path(match[0]["path"])
        before = self.analyzer.adaptation
        try:
            ad = self.analyzer.set_adaptation(path)
        except AdaptationError as e:
            raise AdaptationRefused(str(e)) from None
        try:
            self._write_active(path)
        except OSError as e:
            self.analyzer.adaptation = before  # not kept over a restart: not switched at all
            raise AdaptationRefused(f"could not record the switch: {e.strerror or e}") from None
        self.session.set_models(
            self.analyzer.describe(),
            {"adaptation": ad.describe() if ad is not None else None,
             "previous": before.describe() if before is not None else None},
        )
        log.info("adaptation %s", f"{ad.id} activated" if ad else "rolled back to the shipped "
                 "model")
        return self.status()

    def _write_active(self, path: Path | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / ACTIVE,
                     json.dumps({"path": str(path) if path else None, "at": now_iso()}) + "\n")


def _by_class(labels: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for lab in labels:
        out[lab] = out.get(lab, 0) + 1
    return dict(sorted(out.items()))
