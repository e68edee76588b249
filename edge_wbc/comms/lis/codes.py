"""What each row of the differential is called in the LIS: LOINC where LOINC has a term, a local
code system otherwise, and the rows themselves read generically from the finalised report.

Sources (looked up for this table; LOINC 2.7x names):

* panel 69738-3 "Differential panel, method unspecified - Blood" (ACTIVE). The method-specific
  panels 24318-8 (Manual Differential panel - Blood) and 57023-4 (Auto Differential panel -
  Blood) are DISCOURAGED in LOINC (child panels of CBC orders), and the CBC panels would claim
  results (haemoglobin, counts per volume) this station does not measure; the method is carried
  by each result's code instead.
* automated count, /100 leukocytes: 770-8 neutrophils (US Core example "Neutrophils/100
  leukocytes in Blood by Automated count"), 736-9 lymphocytes, 5905-5 monocytes, 713-8
  eosinophils, 706-2 basophils, 71695-1 immature granulocytes, 58413-6 "Nucleated
  erythrocytes/100 leukocytes [Ratio] in Blood by Automated count".
* manual count, /100 leukocytes: 23761-0 neutrophils, 769-0 "Neutrophils.segmented/100 leukocytes
  in Blood by Manual count", 764-1 "Neutrophils.band form/100 leukocytes in Blood by Manual
  count", 737-7 lymphocytes, 744-3 monocytes, 714-6 eosinophils, 707-0 basophils, 740-1
  metamyelocytes, 749-2 myelocytes, 709-6 blasts (each "<cells>/100 leukocytes in Blood by Manual
  count").

Every other class (and the automated variant of band/segmented neutrophils, blasts, myelocytes,
metamyelocytes, for which LOINC has no automated term) uses :data:`LOCAL_SYSTEM` with the class
name as its code, so a LIS can map it; nothing here is a guessed LOINC code.

"Manual" is chosen when a technician reviewed the slide (confirmed or changed at least one
cell: the report's ``reviewed_changes`` is not empty), "automated" otherwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
#: Codes for classes and counts LOINC has no term for (FHIR system; HL7 v2 coding system "L").
LOCAL_SYSTEM = "urn:edge-wbc:wbc-class"
HL7_LOCAL = "L"

PANEL = ("69738-3", "Differential panel, method unspecified - Blood")

#: class -> (automated, manual) LOINC code and display; None where LOINC has no such term.
_LOINC: dict[str, tuple[tuple[str, str] | None, tuple[str, str] | None]] = {
    "neutrophil": (("770-8", "Neutrophils/100 leukocytes in Blood by Automated count"),
                   ("23761-0", "Neutrophils/100 leukocytes in Blood by Manual count")),
    "segmented_neutrophil": (
        None, ("769-0", "Neutrophils.segmented/100 leukocytes in Blood by Manual count")),
    "band_neutrophil": (
        None, ("764-1", "Neutrophils.band form/100 leukocytes in Blood by Manual count")),
    "lymphocyte": (("736-9", "Lymphocytes/100 leukocytes in Blood by Automated count"),
                   ("737-7", "Lymphocytes/100 leukocytes in Blood by Manual count")),
    "monocyte": (("5905-5", "Monocytes/100 leukocytes in Blood by Automated count"),
                 ("744-3", "Monocytes/100 leukocytes in Blood by Manual count")),
    "eosinophil": (("713-8", "Eosinophils/100 leukocytes in Blood by Automated count"),
                   ("714-6", "Eosinophils/100 leukocytes in Blood by Manual count")),
    "basophil": (("706-2", "Basophils/100 leukocytes in Blood by Automated count"),
                 ("707-0", "Basophils/100 leukocytes in Blood by Manual count")),
    "immature_granulocyte": (
        ("71695-1", "Immature granulocytes/100 leukocytes in Blood by Automated count"), None),
    "metamyelocyte": (None, ("740-1", "Metamyelocytes/100 leukocytes in Blood by Manual count")),
    "myelocyte": (None, ("749-2", "Myelocytes/100 leukocytes in Blood by Manual count")),
    "blast": (None, ("709-6", "Blasts/100 leukocytes in Blood by Manual count")),
    "erythroblast": (
        ("58413-6", "Nucleated erythrocytes/100 leukocytes [Ratio] in Blood by Automated count"),
        None),
}
#: The formula may report NRBC under its group name.
_LOINC["nrbc"] = _LOINC["erythroblast"]

#: HL7 table 0078 abnormal flags a lab's flag may name directly.
HL7_FLAGS = ("L", "H", "LL", "HH", "N", "A", "AA")


@dataclass(frozen=True)
class Code:
    system: str  # LOINC or LOCAL_SYSTEM
    code: str
    display: str

    @property
    def hl7_system(self) -> str:
        return "LN" if self.system == LOINC else HL7_LOCAL


@dataclass(frozen=True)
class Unit:
    code: str  # UCUM
    display: str


PERCENT = Unit("%", "%")
PER_100_WBC = Unit("/100{WBCs}", "/100 WBC")
CELLS = Unit("{cells}", "cells")


@dataclass(frozen=True)
class ResultRow:
    """One row of the finalised formula, as the LIS gets it."""

    label: str
    count: int
    value: float | None  # percent (or per 100 WBC); None for a counts-only row
    unit: Unit
    ci_low: float | None
    ci_high: float | None
    flag: str | None  # HL7 table 0078 code, or None
    flag_text: str | None  # the lab's words for it, sent as a note

    def code(self, manual: bool) -> Code:
        auto, man = _LOINC.get(self.label, (None, None))
        hit = man if manual else auto
        if hit is not None and self.value is not None:
            return Code(LOINC, hit[0], hit[1])
        return Code(LOCAL_SYSTEM, self.label, _pretty(self.label) + (
            " count" if self.value is None else f" {self.unit.display}"))

    def count_code(self) -> Code:
        return Code(LOCAL_SYSTEM, f"{self.label}.count", f"{_pretty(self.label)} cells counted")


def _pretty(label: str) -> str:
    return label.replace("_", " ").capitalize()


def panel_code() -> Code:
    return Code(LOINC, *PANEL)


COUNTED_CODE = Code(LOCAL_SYSTEM, "leukocytes.counted", "Leukocytes counted in the differential")


class ReportError(ValueError):
    """The finalised report cannot be turned into a LIS message; the message says why."""


def is_manual(rep: dict[str, Any]) -> bool:
    """A technician looked at cells of this slide (confirmed or changed at least one)."""
    return bool(rep.get("reviewed_changes"))


def counted(rep: dict[str, Any], rows: list[ResultRow]) -> int:
    """Leukocytes in the differential: the report's own number, else its percentage rows."""
    n = rep.get("counted")
    if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
        return n
    return sum(r.count for r in rows if r.unit is PERCENT)


def result_rows(rep: dict[str, Any]) -> list[ResultRow]:
    """The report's formula rows, whatever classes the lab's formula has.

    A row names its class or group in ``label`` (or ``class`` / ``group``), has a ``count`` and a
    ``kind``: ``counted`` (a share of the counted leukocytes: ``percent`` with its CI),
    ``per_100_wbc`` (e.g. NRBC: ``percent`` read as per 100 leukocytes) or ``count_only``
    (platelets, smudge cells: the count alone). A row without ``kind`` is ``counted`` when it
    has a ``percent``. The lab's raised flags (report ``flags``, each naming a class or group)
    go to the row that holds that class or group.
    """
    rows = rep.get("differential")
    if not isinstance(rows, list) or not rows:
        raise ReportError("the report has no differential rows")
    out = []
    flags = _report_flags(rep, rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ReportError(f"differential row {i} is not an object")
        label = row.get("label") or row.get("class") or row.get("group")
        if not isinstance(label, str) or not label:
            raise ReportError(f"differential row {i} names no class")
        count = row.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ReportError(f"differential row {label!r}: count {count!r} is not a count")
        kind = str(row.get("kind") or "")
        value: float | None
        if "per_100_wbc" in row or kind in ("per_100", "per_100_wbc"):
            value, unit = _num(row.get("per_100_wbc", row.get("percent")), label), PER_100_WBC
        elif kind in ("count_only", "counts_only") or "percent" not in row:
            value, unit = None, CELLS
        else:
            value, unit = _num(row.get("percent"), label), PERCENT
        lo, hi = row.get("ci_low"), row.get("ci_high")
        flag, text = _flag(row.get("flag", row.get("flags")), flags.get(i))
        out.append(ResultRow(
            label=label, count=count, value=value, unit=unit,
            ci_low=None if lo is None or value is None else _num(lo, label),
            ci_high=None if hi is None or value is None else _num(hi, label),
            flag=flag, flag_text=text,
        ))
    return out


def unplaced_flags(rep: dict[str, Any]) -> list[str]:
    """Texts of raised flags no differential row holds (sent as a report-level note)."""
    diff = rep.get("differential")
    rows: list[Any] = diff if isinstance(diff, list) else []
    placed = {id(f) for fs in _report_flags(rep, rows).values() for f in fs}
    return [str(f.get("text") or f.get("rule") or f.get("name"))
            for f in rep.get("flags") or [] if isinstance(f, dict) and id(f) not in placed]


def comments(rep: dict[str, Any]) -> list[str]:
    """The technologist's comments as notes for the LIS: the slide's, then each cell's (as the
    report lists them). Lines are kept; other control characters read as spaces."""
    out = []
    slide = rep.get("comment")
    if slide not in (None, ""):
        if not isinstance(slide, str):
            raise ReportError(f"the report's comment is not text: {slide!r:.60}")
        out.append(f"comment: {_plain(slide)}")
    cells = rep.get("cell_comments") or []
    if not isinstance(cells, list):
        raise ReportError("the report's cell_comments is not a list")
    for c in cells:
        if not (isinstance(c, dict) and isinstance(c.get("comment"), str)
                and isinstance(c.get("cell_id", ""), str)):
            raise ReportError(f"a cell comment is not {{cell_id, comment}} text: {c!r:.60}")
        if c["comment"].strip():
            out.append(f"comment on cell {c.get('cell_id') or '?'}: {_plain(c['comment'])}")
    return out


def _plain(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    return "\n".join(re.sub(r"[\x00-\x1f\x7f]", " ", line).rstrip() for line in lines)


def _num(v: Any, label: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ReportError(f"differential row {label!r}: {v!r} is not a number")
    return float(v)


def _report_flags(rep: dict[str, Any], rows: list[Any]) -> dict[int, list[dict[str, Any]]]:
    """Report-level flags by the index of the row that holds what they name. The formula says
    which rows a flag covers (``rows``): one row takes it; a flag over several rows (a group
    split into rows) belongs to none of them and goes to the report. Without ``rows``: the row
    of that label, else the row listing that class, else the first row of that group."""
    out: dict[int, list[dict[str, Any]]] = {}
    dicts = [(i, r) for i, r in enumerate(rows) if isinstance(r, dict)]
    for f in rep.get("flags") or []:
        if not isinstance(f, dict):
            continue
        covered = f.get("rows")
        if isinstance(covered, list):
            if len(covered) == 1:
                hit = next((i for i, r in dicts if r.get("label") == covered[0]), None)
                if hit is not None:
                    out.setdefault(hit, []).append(f)
            continue
        name = f.get("name") or f.get("class") or f.get("label") or f.get("row") or f.get("group")
        if not isinstance(name, str):
            continue
        hit = next((i for i, r in dicts if r.get("label") == name), None)
        if hit is None:
            hit = next((i for i, r in dicts if name in (r.get("classes") or ())), None)
        if hit is None:
            hit = next((i for i, r in dicts if r.get("group") == name), None)
        if hit is not None:
            out.setdefault(hit, []).append(f)
    return out


def _flag(row_flag: Any, report_flags: Any) -> tuple[str | None, str | None]:
    """(HL7 0078 code, text) from whatever the lab's flag rule put on the row."""
    items: list[Any] = []
    for src in (row_flag, report_flags):
        if isinstance(src, list):
            items += src
        elif src:
            items.append(src)
    if not items:
        return None, None
    code = "A"  # abnormal, direction unknown: the lab's rule said so
    texts = []
    for it in items:
        if isinstance(it, str):
            if it.upper() in HL7_FLAGS:
                code = it.upper()
            else:
                texts.append(it)
        elif isinstance(it, dict):
            c = str(it.get("hl7") or it.get("code") or "").upper()
            if c in HL7_FLAGS:
                code = c
            elif str(it.get("op") or "").startswith(">") or "threshold" in it:
                code = "H"  # the lab's rules flag a value above their limit
            t = it.get("message") or it.get("text") or it.get("rule") or it.get("name")
            if t:
                texts.append(str(t))
    return code, "; ".join(texts) or None
