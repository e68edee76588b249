"""The slide report written on finalise: JSON (machines), CSV (spreadsheets, LIS) and a printable
HTML page (the paper record), all from the same numbers.

Files in the slide's report folder:

* ``report.json`` — schema ``edge-wbc/report/2``: sample, slide, timestamps, target, the lab's
  formula (its name, rows and flag rules), the differential (one generic row per formula row:
  class or group, kind — counted / per_100_wbc / count_only —, count, %, 95 % CI), the raised
  flags, every review change (final state per cell, and the full history including undone
  changes), flagged cells, field summary, models with their sha256, software version;
* ``report.csv`` — the formula, one row per formula row (with sample id, timestamps and the
  raised flags on each row so a single row still says what it belongs to);
* ``cells.csv`` — the audit trail, one row per detected cell: machine label and score, reviewed
  label, reason and time, whether and in which formula row it was counted;
* ``report.html`` — self-contained (thumbnails inlined), laid out for A4.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import platform
import zoneinfo
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from edge_wbc import __version__, taxonomy
from edge_wbc.counting.records import CellRecord, FieldRecord, SlideRecord
from edge_wbc.files import write_atomic
from edge_wbc.taxonomy import UNIDENTIFIED

#: 2: differential rows carry group, kind and classes; formula and flags are new.
REPORT_SCHEMA = "edge-wbc/report/2"
#: The keys of one differential row (the LIS reads these).
ROW_KEYS = ("label", "name", "group", "kind", "classes", "count", "percent", "ci_low", "ci_high")
#: A counted cell the machine was less sure of than this is shown among the flagged cells.
LOW_CONFIDENCE = 0.7
#: The printed report holds one to two A4 pages: at most this many thumbnails and changes are
#: printed (every cell is in cells.csv and report.json).
MAX_THUMBNAILS = 16
MAX_PRINTED_CHANGES = 16
#: A thumbnail's caption is cut to this many characters on paper.
MAX_CAPTION = 60
FORMATS = ("json", "csv", "cells_csv", "html")
CI_NAMES = {
    "clopper-pearson": "Clopper–Pearson (exact binomial, as in Rümke's table)",
    "wilson": "Wilson score interval",
}


class ReportCell(CellRecord, TypedDict, total=False):
    """A cell as the session hands it to the report: with the formula row it counted in."""

    counted_as: str | None


def flag_reasons(cell: CellRecord) -> list[str]:
    """Why a cell deserves a second look in the report (empty: it does not)."""
    from edge_wbc.counting.session import REJECTED, STATUS_DUPLICATE, STATUS_OTHER

    out = []
    rl = cell.get("reviewed_label")
    from edge_wbc.counting.session import STATUS_MANUAL

    if cell["status"] == STATUS_MANUAL:
        out.append("added by hand (no image)")
    if cell.get("discarded"):
        out.append(f"field discarded ({cell['discarded'].replace('_', ' ')})")
    if rl == REJECTED:
        out.append(f"rejected ({(cell.get('review_reason') or '').replace('_', ' ')})")
    elif rl and rl != cell["label"]:
        out.append(f"reclassified {cell['label']} → {rl}")
    elif rl:
        out.append("confirmed")
    if cell.get("comment"):
        out.append(f"comment: {cell['comment']}")
    if cell["label"] == UNIDENTIFIED and not rl:
        out.append("unidentified by the classifier")
    if cell["status"] == STATUS_DUPLICATE:
        out.append("in a field overlapping a previous one")
    if cell["status"] == STATUS_OTHER and not rl:
        out.append(f"not a leukocyte (classifier: {cell['label'].replace('_', ' ')})")
    if (not rl and cell["label"] in taxonomy.GROUP_OF and taxonomy.is_leukocyte(cell["label"])
            and float(cell["score"]) < LOW_CONFIDENCE):
        out.append(f"low confidence ({float(cell['score']):.2f})")
    return out


def local_time(iso: str | None, tz: str = "") -> str | None:
    """A stored UTC time in the report's time zone (``tz``, IANA; '': the station's own), ISO
    8601 with its offset: a reader sees the lab's clock and can still compare instants."""
    if not iso:
        return iso
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(zoneinfo.ZoneInfo(tz) if tz else None).isoformat(timespec="seconds")


def zone_name(tz: str = "") -> str:
    if tz:
        return tz
    now = datetime.now().astimezone()
    return str(now.tzname() or now.strftime("%z"))


def build_report(
    slide: SlideRecord,
    state: dict[str, Any],
    cells: list[ReportCell],
    fields: list[FieldRecord],
    generated_at: str,
    tz: str = "",
) -> dict[str, Any]:
    """The report's content. Times are in ``tz`` (see :func:`local_time`)."""
    from edge_wbc.counting.session import STATUS_MANUAL

    def lt(iso: str | None) -> str | None:
        return local_time(iso, tz)

    changes = [
        {
            "cell_id": c["id"],
            "field_id": c["field_id"],
            "machine_label": c["label"],
            "machine_score": round(float(c["score"]), 4),
            "reviewed_label": c["reviewed_label"],
            "reason": c.get("review_reason"),
            "reviewed_at": lt(c.get("reviewed_at")),
            "comment": c.get("comment") or "",
        }
        for c in cells
        if c.get("reviewed_label")
    ]
    flagged = [
        {
            "cell_id": c["id"],
            "field_id": c["field_id"],
            "machine_label": c["label"],
            "score": round(float(c["score"]), 4),
            "reviewed_label": c.get("reviewed_label"),
            "counted_as": _counted_as(c),
            "reasons": r,
            "manual": c["status"] == STATUS_MANUAL,
            "comment": c.get("comment") or "",
        }
        for c in cells
        if (r := flag_reasons(c))
    ]
    # A lab adaptation and the cell diameter ("Measure magnification") may change during a
    # slide: each value that counted a field is named with how many.
    used = _fields_per(fields, "adaptation",
                       lambda ad: ad.get("id") if isinstance(ad, dict) else None)
    diameters = _fields_per(fields, "cell_diameter_px")
    warnings: dict[str, int] = {}
    for f in fields:
        for w in _quality_flags(f.get("quality") or {}):
            warnings[w] = warnings.get(w, 0) + 1
    models = slide.get("models") or {}
    return {
        "schema": REPORT_SCHEMA,
        "software": {"name": "edge-wbc", "version": __version__},
        "sample_id": slide["sample_id"],
        "slide_id": slide["id"],
        "station_id": slide.get("station_id") or state.get("station_id") or "",
        "station_host": platform.node(),
        "time_zone": zone_name(tz),
        "started_at": lt(slide["created_at"]),
        "finalised_at": lt(slide.get("finalised_at")),
        "generated_at": lt(generated_at),
        # Who counted and who signed off, as entered at the station; the slide's comment.
        "operator": slide.get("operator") or "",
        "signed_off_by": slide.get("signed_off_by") or "",
        "comment": slide.get("comment") or "",
        "target": state["target"],
        "counted": state["counted"],
        "ci_method": state["ci_method"],
        "ci_level": 0.95,
        "formula": {k: v for k, v in (state.get("formula") or {}).items()
                    if k in ("name", "rows", "flags")},
        # The slide was counted by another formula before (the station restarted with a new
        # [formula]): the flags seen on screen until then may not be this report's.
        "formula_changes": [{**c, "at": lt(c.get("at"))}
                            for c in slide.get("formula_changes", [])],
        # Every row but unidentified (none is left on a finalised slide): counted rows are a
        # share of the counted leukocytes with a CI; per_100_wbc and count_only rows are counts,
        # with `percent` per 100 counted leukocytes and no CI.
        "differential": [
            {k: row.get(k) for k in ROW_KEYS}
            for row in state["classes"]
            if row["label"] != UNIDENTIFIED
        ],
        "flags": state.get("flags", []),
        "class_counts": state.get("class_counts", {}),
        "unidentified": state["unidentified"],
        "excluded": state["excluded"],
        "manual_cells": sum(1 for c in cells if c["status"] == STATUS_MANUAL
                            and _counted_as(c) is not None),
        "reviewed_changes": changes,
        "review_history": [{**h, "at": lt(h.get("at"))}
                           for h in slide.get("review_history", [])],
        "cell_comments": [{"cell_id": c["id"], "comment": c["comment"]}
                          for c in cells if c.get("comment")],
        "flagged_cells": flagged,
        "fields": {
            "captured": len(fields),
            "overlapping_previous": sum(1 for f in fields if f.get("overlap_field")),
            "quality_warnings": warnings,
            "discarded": [{"field_id": f["id"], "seq": f["seq"], "reason": f["discarded"],
                           "at": lt(f.get("discarded_at"))}
                          for f in fields if f.get("discarded")],
        },
        "models": models,
        # Which lab adaptation (None: the shipped head) classified how many fields.
        "adaptations": used,
        # At which cell diameter (px; None: not recorded) how many fields were analysed.
        "cell_diameters": diameters,
    }


def _fields_per(fields: list[FieldRecord], key: str,
                identity: Callable[[Any], Any] = lambda v: v) -> list[dict[str, Any]]:
    """``[{key: value, "fields": n}]``: each value of the fields' models[key] in first-seen
    order, with how many fields it analysed (``identity``: what makes two values the same)."""
    out: dict[str, dict[str, Any]] = {}
    for f in fields:
        v = (f.get("models") or {}).get(key)
        out.setdefault(str(identity(v)), {key: v, "fields": 0})["fields"] += 1
    return list(out.values())


def _counted_as(cell: ReportCell) -> str | None:
    """The formula row the session counted the cell in (it hands reports each cell with it)."""
    if "counted_as" in cell:
        return cell["counted_as"]
    from edge_wbc.counting.session import effective_label

    return effective_label(cell)


def _quality_flags(q: dict[str, Any]) -> list[str]:
    """The analysis' quality block lists its warnings under 'flags' (edge_wbc.pipeline.quality)."""
    flags = q.get("flags")
    return [str(x) for x in flags] if isinstance(flags, list) else []


def write_reports(
    slide: SlideRecord,
    state: dict[str, Any],
    cells: list[ReportCell],
    fields: list[FieldRecord],
    out_dir: str | Path,
    data_dir: str | Path,
    tz: str = "",
) -> dict[str, str]:
    """Write every report format; returns {format: path relative to data_dir}. ``tz``: the
    time zone of its times (IANA name; '': the station's own).

    Each file is written to a temporary name and renamed, so a report on disk is never half a
    report (a full disk fails the finalise, which then leaves the slide open).
    """
    from edge_wbc.counting.session import now_iso

    out = Path(out_dir)
    data = Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = build_report(slide, state, cells, fields, now_iso(), tz)
    files = {
        "json": ("report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n"),
        "csv": ("report.csv", _formula_csv(rep)),
        "cells_csv": ("cells.csv", _cells_csv(rep, cells, tz)),
        "html": ("report.html", render_html(rep, cells, data)),
    }
    paths: dict[str, str] = {}
    for fmt, (name, text) in files.items():
        p = out / name
        write_atomic(p, text)
        paths[fmt] = str(p.relative_to(data)) if p.is_relative_to(data) else str(p)
    return paths


# A spreadsheet runs a cell that starts with one of these as a formula: a sample ID
# "=HYPERLINK(...)" typed at the station would run on whoever opens the report (OWASP's CSV
# injection). Such a cell gets a leading apostrophe, which spreadsheets show as text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` safe to open in a spreadsheet; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class _SafeWriter:
    """csv.writer that neutralises every cell, so no column can be forgotten."""

    def __init__(self, buf: io.StringIO) -> None:
        self._w = csv.writer(buf, lineterminator="\n")

    def writerow(self, row: list[Any]) -> None:
        self._w.writerow([csv_cell(v) for v in row])


def _formula_csv(rep: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = _SafeWriter(buf)
    w.writerow(["sample_id", "slide_id", "finalised_at", "class", "group", "kind", "count",
                "percent", "ci95_low_percent", "ci95_high_percent", "counted", "ci_method",
                "formula", "flags"])
    flags = "; ".join(f["text"] for f in rep.get("flags", []))
    for row in rep["differential"]:
        w.writerow([rep["sample_id"], rep["slide_id"], rep["finalised_at"], row["label"],
                    row["group"], row["kind"], row["count"], f"{row['percent']:.1f}",
                    _num(row["ci_low"]), _num(row["ci_high"]), rep["counted"], rep["ci_method"],
                    (rep.get("formula") or {}).get("name", ""), flags])
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _cells_csv(rep: dict[str, Any], cells: list[ReportCell], tz: str) -> str:
    buf = io.StringIO()
    w = _SafeWriter(buf)
    w.writerow(["sample_id", "cell_id", "field_id", "x0", "y0", "x1", "y1", "machine_label",
                "machine_score", "status", "reviewed_label", "review_reason", "reviewed_at",
                "counted_as", "field_discarded", "comment"])
    for c in cells:
        w.writerow([rep["sample_id"], c["id"], c["field_id"], *c["bbox"], c["label"],
                    f"{float(c['score']):.4f}", c["status"], c.get("reviewed_label") or "",
                    c.get("review_reason") or "", local_time(c.get("reviewed_at"), tz) or "",
                    _counted_as(c) or "", c.get("discarded") or "", c.get("comment") or ""])
    return buf.getvalue()


_HOW = {taxonomy.PER_100_WBC: "per 100 leukocytes, not counted",
        taxonomy.COUNT_ONLY: "count only"}


def _thumb(cell: CellRecord, data_dir: Path) -> str:
    f = cell.get("crop_file")
    if not f:
        return ""
    try:
        raw = (data_dir / f).read_bytes()
    except OSError:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(raw).decode("ascii")


_CSS = """
@page { size: A4; margin: 12mm 13mm; }
* { box-sizing: border-box; }
body { font: 9.5pt/1.35 "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: #1b2430;
       margin: 0 auto; max-width: 190mm; padding: 6mm 0; }
header { display: flex; justify-content: space-between; align-items: flex-end;
         border-bottom: 2px solid #1b2430; padding-bottom: 2.5mm; margin-bottom: 3mm; }
h1 { font-size: 15pt; margin: 0; letter-spacing: .02em; }
h2 { font-size: 10pt; margin: 4.5mm 0 1.5mm; text-transform: uppercase; letter-spacing: .06em;
     color: #3a4656; border-bottom: 1px solid #c9d0d9; padding-bottom: .8mm;
     break-after: avoid; }
.sub { color: #56616f; font-size: 8.5pt; }
dl { display: grid; grid-template-columns: max-content 1fr max-content 1fr; gap: .6mm 4mm;
     margin: 0; }
dt { color: #56616f; } dd { margin: 0; font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .9mm 1.6mm; border-bottom: 1px solid #dde2e8;
         vertical-align: top; }
th { font-size: 8pt; color: #56616f; font-weight: 600; }
td.n { text-align: right; }
table.small td, table.small th { font-size: 8pt; padding: .5mm 1.4mm; }
tr { break-inside: avoid; }
.bar { position: relative; height: 3mm; background: #eef1f4; min-width: 40mm; }
.bar i { position: absolute; top: 0; bottom: 0; left: 0; background: #2f6f9f; }
.bar b { position: absolute; top: -0.7mm; bottom: -0.7mm; border-left: 1.5px solid #1b2430;
         border-right: 1.5px solid #1b2430; }
.status { display: inline-block; padding: 0.5mm 2.5mm; border: 1.5px solid #1f7a4d;
          color: #1f7a4d; font-weight: 700; letter-spacing: .05em; }
.thumbs { display: grid; grid-template-columns: repeat(8, 1fr); gap: 2mm; }
figure { margin: 0; break-inside: avoid; font-size: 7pt; }
figure img { width: 100%; aspect-ratio: 1; object-fit: cover; border: 1px solid #c9d0d9; }
figure .noimg { aspect-ratio: 1; border: 1px dashed #9aa3ad; display: grid;
                place-items: center; color: #56616f; }
figcaption { line-height: 1.2; }
.mono { font-family: "DejaVu Sans Mono", monospace; font-size: 7.5pt; word-break: break-all; }
.comment { margin: 2mm 0 0; padding: 1.5mm 3mm; border-left: 3px solid #2f6f9f;
           background: #f4f7fa; white-space: pre-wrap; }
.sign { display: grid; grid-template-columns: 1fr 1fr 1fr; gap: 6mm; margin-top: 6mm;
        break-inside: avoid; }
.sign div { border-top: 1px solid #1b2430; padding-top: 1mm; font-size: 8pt; color: #56616f; }
.sign b { display: block; color: #1b2430; font-size: 9.5pt; min-height: 4.5mm; }
footer { margin-top: 4mm; font-size: 7.5pt; color: #56616f; border-top: 1px solid #c9d0d9;
         padding-top: 1.5mm; }
.flags { margin: 3mm 0 0; padding: 1.5mm 3mm; border: 1px solid #c9d0d9; }
.flags.raised { border: 2px solid #b3261e; color: #b3261e; }
.flags ul { margin: .5mm 0 0; padding-left: 5mm; }
.print { position: fixed; bottom: 5mm; right: 5mm; font: inherit; font-weight: 700;
         padding: 2mm 5mm; border: 1.5px solid #1b2430; background: #fff; border-radius: 4px;
         cursor: pointer; }
@media print { body { padding: 0; } .print { display: none; } }
"""


def _formula_words(f: Any) -> str:
    if not isinstance(f, dict):
        return "a formula not recorded (an earlier version)"
    flags = ", ".join(str(x) for x in f.get("flags") or []) or "none"
    return f"{f.get('name')} (flags: {flags})"


def render_html(rep: dict[str, Any], cells: list[ReportCell], data_dir: Path) -> str:
    """The paper record: laid out to print on one or two A4 pages, whatever the slide holds
    (long lists are cut with a pointer to cells.csv, which has every cell)."""
    e = html.escape
    rows = []
    for r in (r for r in rep["differential"] if r["kind"] == taxonomy.COUNTED):
        rows.append(
            f"<tr><td>{e(r.get('name') or r['label'])}</td><td class=n>{r['count']}</td>"
            f"<td class=n>{r['percent']:.1f}</td>"
            f"<td class=n>{r['ci_low']:.1f} – {r['ci_high']:.1f}</td>"
            f"<td><div class=bar><i style='width:{r['percent']:.1f}%'></i>"
            f"<b style='left:{r['ci_low']:.1f}%;width:{max(r['ci_high'] - r['ci_low'], 0.3):.1f}%'>"
            f"</b></div></td></tr>"
        )
    also = "".join(
        f"<tr><td>{e(r.get('name') or r['label'])}</td><td class=n>{r['count']}</td>"
        f"<td class=n>{r['percent']:.1f}</td><td>{_HOW[r['kind']]}</td></tr>"
        for r in rep["differential"] if r["kind"] != taxonomy.COUNTED
    )
    also_html = (
        "<h2>Also reported</h2><table class=small><thead><tr><th>Class</th><th class=n>Cells"
        "</th><th class=n>per 100 WBC</th><th>How</th></tr></thead>"
        f"<tbody>{also}</tbody></table>" if also else ""
    )
    flags = rep.get("flags", [])
    rules = (rep.get("formula") or {}).get("flags", [])
    flags_html = (
        "<div class='flags raised'><b>Flags</b><ul>"
        + "".join(f"<li>{e(f['text'])}</li>" for f in flags) + "</ul></div>"
        if flags else
        f"<div class=flags>No flag raised (rules: {e(', '.join(rules) or 'none set')}).</div>"
    )
    # Confirmations are counted, not listed: what a reader checks is what was changed.
    changed = [c for c in rep["reviewed_changes"] if c.get("reason") != "confirmed"]
    n_confirmed = len(rep["reviewed_changes"]) - len(changed)
    changes = "".join(
        f"<tr><td class=mono>{e(c['cell_id'])}</td><td>{e(c['machine_label'])} "
        f"({c['machine_score']:.2f})</td><td>{e(c['reviewed_label'])}"
        f"{' — ' + e(c['reason'].replace('_', ' ')) if c.get('reason') else ''}"
        f"{'<br><i>' + e(c['comment']) + '</i>' if c.get('comment') else ''}</td>"
        f"<td>{e(_clock(c.get('reviewed_at')))}</td></tr>"
        for c in changed[:MAX_PRINTED_CHANGES]
    ) or "<tr><td colspan=4>No cell was changed in review.</td></tr>"
    if len(changed) > MAX_PRINTED_CHANGES:
        changes += (f"<tr><td colspan=4>… and {len(changed) - MAX_PRINTED_CHANGES} more "
                    "(cells.csv)</td></tr>")
    by_id = {c["id"]: c for c in cells}
    # Thumbnails of what a reader should look at: changed, rejected, commented, hand-added or
    # left uncertain; confirmed-only cells are the technician's agreement, not a doubt.
    shown = [f for f in rep["flagged_cells"] if f["reasons"] != ["confirmed"]]
    figs = []
    for f in shown[:MAX_THUMBNAILS]:
        src = _thumb(by_id[f["cell_id"]], data_dir) if f["cell_id"] in by_id else ""
        img = (f"<img src='{src}' alt='{e(f['cell_id'])}'>" if src
               else f"<div class=noimg>{'by hand' if f.get('manual') else 'no image'}</div>")
        why = "; ".join(r for r in f["reasons"] if not r.startswith("comment:"))
        if len(why) > MAX_CAPTION:
            why = why[: MAX_CAPTION - 1] + "…"
        figs.append(
            f"<figure>{img}<figcaption><b>{e(f['counted_as'] or 'not counted')}</b>"
            f"{' ✎' if f.get('comment') else ''}<br>{e(why)}</figcaption></figure>"
        )
    if len(shown) > MAX_THUMBNAILS:
        figs.append(f"<p>… and {len(shown) - MAX_THUMBNAILS} more (cells.csv)</p>")
    models = "".join(
        f"<tr><td>{e(str(m.get('name')))}</td><td>{e(str(m.get('task')))}</td>"
        f"<td class=mono>{e(str(m.get('sha256')))}</td></tr>"
        for m in (rep["models"] or {}).get("models", [])
    ) or "<tr><td colspan=3>Model information not recorded.</td></tr>"
    adapted = []
    for a in rep.get("adaptations") or []:
        ad = a.get("adaptation")
        what = (f"lab adaptation {e(str(ad.get('id')))} (sha256 "
                f"<span class=mono>{e(str(ad.get('sha256')))}</span>)"
                if isinstance(ad, dict) else "shipped classifier head (no lab adaptation)")
        adapted.append(f"<tr><td colspan=2>{what}</td><td>{a['fields']} field"
                       f"{'s' if a['fields'] != 1 else ''}</td></tr>")
    for d in rep.get("cell_diameters") or []:
        px = d.get("cell_diameter_px")
        what = (f"cell diameter {px:g} px" if isinstance(px, (int, float))
                else "cell diameter not recorded")
        adapted.append(f"<tr><td colspan=2>{e(what)}</td><td>{d['fields']} field"
                       f"{'s' if d['fields'] != 1 else ''}</td></tr>")
    ex = rep["excluded"]
    warn = rep["fields"]["quality_warnings"]
    warn_txt = ", ".join(f"{k.replace('_', ' ')} × {v}" for k, v in warn.items()) or "none"
    disc = rep["fields"].get("discarded") or []
    disc_txt = (f" {len(disc)} discarded by the technician (" + ", ".join(
        f"#{d['seq']} {d['reason'].replace('_', ' ')}" for d in disc) + ")." if disc else "")
    manual = rep.get("manual_cells", 0)
    formula_changed = "".join(
        f"<br><span class=sub>changed {e(c.get('at') or '')}: from "
        f"{e(_formula_words(c.get('previous')))} to {e(_formula_words(c.get('formula')))}</span>"
        for c in rep.get("formula_changes") or [])
    comment = (f"<div class=comment><b>Comment:</b> {e(rep['comment'])}</div>"
               if rep.get("comment") else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Leukocyte differential — {e(rep['sample_id'])}</title>
<style>{_CSS}</style></head>
<body>
<button class=print onclick="window.print()">Print</button>
<header><div><h1>Leukocyte differential</h1>
<div class=sub>edge-wbc {e(rep['software']['version'])} · automated count with technologist
review</div></div><div class=status>FINALISED</div></header>
<dl>
<dt>Sample</dt><dd>{e(rep['sample_id'])}</dd><dt>Slide</dt><dd class=mono>{e(rep['slide_id'])}</dd>
<dt>Started</dt><dd>{e(rep['started_at'] or '')}</dd>
<dt>Finalised</dt><dd>{e(rep['finalised_at'] or '')}</dd>
<dt>Counted by</dt><dd>{e(rep.get('operator') or '—')}</dd>
<dt>Signed off by</dt><dd>{e(rep.get('signed_off_by') or '—')}</dd>
<dt>Station</dt><dd>{e(rep['station_id'] or '—')}</dd><dt>Cells counted</dt>
<dd>{rep['counted']} (target {rep['target']}){f', {manual} added by hand' if manual else ''}</dd>
<dt>Formula</dt><dd>{e(str((rep.get('formula') or {}).get('name', '—')))}{formula_changed}</dd>
<dt>Time zone</dt><dd>{e(rep.get('time_zone') or '')}</dd>
</dl>
{comment}
{flags_html}
<h2>Differential</h2>
<table><thead><tr><th>Class</th><th class=n>Count</th><th class=n>%</th>
<th class=n>95 % CI (%)</th><th>Share and CI</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<p class=sub>95 % confidence intervals: {e(CI_NAMES.get(rep['ci_method'], rep['ci_method']))}
on {rep['counted']} cells. Not counted: {ex['rejected']}
rejected in review, {ex['duplicate']} in overlapping fields, {ex['other']} not mature leukocytes.
Fields: {rep['fields']['captured']} captured, {rep['fields']['overlapping_previous']} overlapping a
previous field.{e(disc_txt)} Field-quality warnings: {e(warn_txt)}.</p>
{also_html}
<h2>Review: {len(changed)} changed, {n_confirmed} confirmed</h2>
<table class=small><thead><tr><th>Cell</th><th>Machine</th><th>Reviewed</th><th>When</th></tr>
</thead><tbody>{changes}</tbody></table>
<h2>Cells to look at ({len(shown)})</h2>
<div class=thumbs>{''.join(figs) or '<p>None.</p>'}</div>
<h2>Models</h2>
<table class=small><thead><tr><th>Model</th><th>Task</th><th>sha256</th></tr></thead>
<tbody>{models}{''.join(adapted)}</tbody></table>
<div class=sign><div><b>{e(rep.get('operator') or '')}</b>Counted by</div>
<div><b>{e(rep.get('signed_off_by') or '')}</b>Signed off by</div>
<div><b></b>Signature and date</div></div>
<footer>Report generated {e(rep['generated_at'] or '')} on station {e(rep['station_id'] or '—')}
({e(rep.get('station_host') or '')}), edge-wbc {e(rep['software']['version'])}, schema
{e(rep['schema'])}. The machine's labels and every review are kept in the station's database
(audit trail). For laboratory use by trained staff; results require technologist verification.
</footer>
</body></html>
"""


def _clock(iso: str | None) -> str:
    """A report time shortened for a table cell (the date is in the header)."""
    if not iso:
        return ""
    return iso[11:19] if len(iso) >= 19 else iso
