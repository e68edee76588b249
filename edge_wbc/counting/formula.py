"""A slide's cells counted by the lab's formula: rows, percentages, intervals and flags.

The formula itself (which rows exist, which count toward the target, which flags) is the
configuration's, built from :mod:`edge_wbc.taxonomy`; here the session's effective
labels become the numbers the page, the report and MQTT show.

* counted rows (leukocytes, ``unidentified`` included): percent of the counted leukocytes, with
  the 95 % interval; they add up to 100 % before each is rounded to 0.1 (shown, 99.9–100.1);
* ``per_100_wbc`` rows (NRBC) and ``count_only`` rows (platelets, smudge cells, artefacts):
  the count, and the same count per 100 counted leukocytes as ``percent``, without an interval
  (they are not a share of the leukocytes).

A flag's percent is per 100 counted leukocytes too, whatever its row's kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edge_wbc.counting.stats import interval
from edge_wbc.taxonomy import (
    CLASSES,
    COUNTED,
    NAMES,
    UNIDENTIFIED,
    Flag,
    Formula,
    Row,
    members,
)


@dataclass(frozen=True)
class Tally:
    rows: list[dict[str, Any]]  # every row shown, in the formula's order
    counted: int  # leukocytes counted toward the target (unidentified included)
    by_class: dict[str, int]  # effective class -> cells (rows of every kind, unidentified)
    set_aside: int  # cells of a non-leukocyte class the formula has no row for
    flags: list[dict[str, Any]]  # the raised flags

    def counts(self) -> dict[str, int]:
        return {r["label"]: r["count"] for r in self.rows}


def tally(formula: Formula, labels: Iterable[str], ci_method: str) -> Tally:
    """``labels``: the effective class of every cell that stands (not rejected, not a duplicate)."""
    by_class: dict[str, int] = {}
    by_row: dict[str, int] = {}
    extra: dict[str, Row] = {}
    set_aside = 0
    for lab in labels:
        row = formula.row_for(lab)
        if row is None:
            set_aside += 1
            continue
        by_class[lab] = by_class.get(lab, 0) + 1
        by_row[row.key] = by_row.get(row.key, 0) + 1
        if not row.configured:
            extra[row.key] = row
    # Rows a cell needed beyond the lab's, in the table's order (not the order cells came in).
    added = sorted(extra.values(), key=lambda r: CLASSES.index(r.key))
    kind_of_row = {r.key: r.kind for r in (*formula.rows, *added)}
    n = sum(k for key, k in by_row.items() if kind_of_row[key] == COUNTED)
    shown: list[Row] = [r for r in formula.rows if r.kind == COUNTED and r.key != UNIDENTIFIED]
    # A leukocyte class the formula does not list still counts, after the lab's rows.
    shown += [r for r in added if r.kind == COUNTED]
    shown += [r for r in formula.rows if r.key == UNIDENTIFIED]
    shown += [r for r in formula.rows if r.kind != COUNTED]
    shown += [r for r in added if r.kind != COUNTED]
    rows = [_row(r, by_row.get(r.key, 0), n, ci_method) for r in shown]
    flags = []
    for f in formula.flags:
        cells = sum(by_class.get(c, 0) for c in members(f.name))
        value = cells if f.unit == "count" else (100.0 * cells / n if n else 0.0)
        if f.raised(value):
            digits = _digits(f, value)
            shown_value = str(cells) if f.unit == "count" else f"{value:.{digits}f} %"
            # The shown rows holding the flag's classes: a consumer (the LIS) puts the flag on
            # them ("row": the first, for a flag on one class).
            on_rows = [r.key for r in shown if any(c in r.classes for c in members(f.name))]
            flags.append({
                "rule": f.rule, "name": f.name, "unit": f.unit, "threshold": f.threshold,
                "count": cells, "value": round(value, digits),
                "text": f"{NAMES.get(f.name, f.name)}: {shown_value} ({f.rule})",
                "row": on_rows[0] if on_rows else None, "rows": on_rows,
            })
    return Tally(rows, n, by_class, set_aside, flags)


def _digits(f: Flag, value: float) -> int:
    """Decimals that show a raised flag's value beyond its threshold: 12 of 199 band cells are
    6.03 %, which one decimal shows as "6.0 % (band_neutrophil > 6%)"."""
    for d in (1, 2, 3):
        if f.raised(round(value, d)):
            return d
    return 4


def _row(r: Row, k: int, n: int, ci_method: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": r.key,
        "name": NAMES.get(r.key, r.key),
        "group": r.group,
        "kind": r.kind,
        "classes": list(r.classes),
        "configured": r.configured,
        "count": k,
        "percent": round(100.0 * k / n, 1) if n else 0.0,
        "ci_low": None,
        "ci_high": None,
    }
    if r.kind == COUNTED:
        # Nothing counted yet: nothing is known about the share, 0–100 % (not "exactly 0").
        lo, hi = interval(k, n, ci_method) if n else (0.0, 1.0)
        out["ci_low"], out["ci_high"] = round(100.0 * lo, 1), round(100.0 * hi, 1)
    return out
