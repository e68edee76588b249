"""The finalised differential as an HL7 v2.5.1 ``ORU^R01`` message, built and read with python-hl7.

Segments: MSH, PID (the sample ID in PID-3: the station knows samples, not patients), OBR (the
differential panel, LOINC 69738-3; OBR-2/3 the sample and slide IDs), NTE (how the count was
made, flags no row holds, then the technologist's slide and cell comments as remarks, their line
breaks as ``\\.br\\``), then per formula row an OBX with the percentage (or per-100-WBC value)
and its LOINC or local code, an OBX with the number of cells counted (same OBX-4 sub-ID), and an
NTE with the 95 % confidence interval and the lab's flag text; a last OBX gives the leukocytes
counted.

Every value goes through python-hl7's escaping (``|^~\\&`` become escape sequences; text
beyond ASCII is sent as UTF-8, declared in MSH-18), so a sample ID typed with delimiters travels
as data and parses back unchanged.

MSH-10 (message control ID) and MSH-7 are derived from the slide, not from the clock: a report
sent again after a lost ACK is the identical message, which lets the LIS recognise a duplicate.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from typing import Any

import hl7

from edge_wbc.comms.lis.codes import (
    CELLS,
    COUNTED_CODE,
    Code,
    ReportError,
    comments,
    counted,
    is_manual,
    panel_code,
    result_rows,
    unplaced_flags,
)

VERSION = "2.5.1"
#: MSH-18: text outside ASCII travels as UTF-8 (python-hl7's \\X..\\ escape would write a
#: character's code point where HL7 expects the bytes of the declared character set).
CHARSET = "UNICODE UTF-8"
ENCODING = "utf-8"
_NON_ASCII = re.compile(r"([^\x00-\x7f]+)")
#: ACK codes (HL7 table 0008): accepted, or refused with the LIS's reason.
ACCEPT = ("AA", "CA")
REFUSE = ("AE", "AR", "CE", "CR")


def control_id(slide_id: str) -> str:
    """MSH-10: at most 20 characters (ST in v2.5.1), stable for a slide."""
    return hashlib.blake2s(slide_id.encode(), digest_size=10).hexdigest()


def hl7_ts(iso: str | None) -> str:
    """ISO 8601 (as the station writes it) -> HL7 DTM ``YYYYMMDDHHMMSS+0000``."""
    if not iso:
        return ""
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError as e:
        raise ReportError(f"time {iso!r} is not ISO 8601") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S+0000")


class _Escaped(str):
    """A value already escaped (formatted text with its line breaks): seg() sends it as is."""


#: HL7 table 0364 comment type: a remark (the technologist's words, not the station's).
_REMARK = ["RE", "Remark", "HL70364"]


class _Builder:
    def __init__(self) -> None:
        # A parsed header supplies the separators and the container factory for the rest.
        self.msg = hl7.parse("MSH|^~\\&|")
        self.segments: list[hl7.Segment] = []

    def escape(self, value: str) -> str:
        parts = _NON_ASCII.split(value)
        # split() with a group alternates ASCII (even) and non-ASCII (odd) runs.
        return "".join(p if i % 2 else self.msg.escape(p) for i, p in enumerate(parts))

    def ft(self, text: str) -> _Escaped:
        """Formatted text (FT, as NTE-3 is): each line escaped, lines joined by HL7's line break
        ``\\.br\\`` (python-hl7 would write a newline as a hex escape)."""
        return _Escaped("\\.br\\".join(self.escape(line) for line in text.split("\n")))

    def seg(self, name: str, fields: dict[int, str | list[str]]) -> None:
        s = self.msg.create_segment([self.msg.create_field([name])])
        for num in sorted(fields):
            v = fields[num]
            if isinstance(v, list):
                for comp, part in enumerate(v, 1):
                    if part:
                        s.assign_field(self.escape(part), num, 1, comp)
            elif isinstance(v, _Escaped):
                s.assign_field(str(v), num)
            elif v:
                s.assign_field(self.escape(v), num)
        self.segments.append(s)

    def msh(self, fields: dict[int, str | list[str]]) -> None:
        s = self.msg.create_segment([self.msg.create_field(["MSH"])])
        s.assign_field("|", 1)
        s.assign_field("^~\\&", 2)
        for num in sorted(fields):
            v = fields[num]
            if isinstance(v, list):
                for comp, part in enumerate(v, 1):
                    s.assign_field(self.escape(part), num, 1, comp)
            elif v:
                s.assign_field(self.escape(v), num)
        self.segments.append(s)

    def text(self) -> str:
        return str(self.msg.create_message(self.segments))


def _cwe(code: Code) -> list[str]:
    return [code.code, code.display, code.hl7_system]


def _num(v: float) -> str:
    return f"{v:.1f}"


def build_oru(
    rep: dict[str, Any],
    *,
    sending_application: str = "EDGE-WBC",
    sending_facility: str = "",
    receiving_application: str = "",
    receiving_facility: str = "",
    processing_id: str = "P",
) -> str:
    """The report dict (``edge-wbc/report/1``) as one ORU^R01 message (segments end in CR)."""
    for key in ("slide_id", "finalised_at"):
        if not rep.get(key):
            raise ReportError(f"the report has no {key}: only a finalised slide is sent")
    manual = is_manual(rep)
    rows = result_rows(rep)
    slide_id = str(rep["slide_id"])
    sample_id = str(rep.get("sample_id") or "")
    station = str(rep.get("station_id") or "")
    done = hl7_ts(rep["finalised_at"])
    started = hl7_ts(rep.get("started_at"))
    b = _Builder()
    b.msh({3: sending_application, 4: sending_facility or station, 5: receiving_application,
           6: receiving_facility, 7: done, 9: ["ORU", "R01", "ORU_R01"],
           10: control_id(slide_id), 11: processing_id, 12: VERSION, 18: CHARSET})
    # PID-3 (CX): the sample ID, with the slide as its assigning authority's namespace; the
    # station never learns who the patient is.
    b.seg("PID", {1: "1", 3: [sample_id or slide_id, "", "", "EDGE-WBC", "SID"]})
    operator = str(rep.get("operator") or "").strip()
    signed = str(rep.get("signed_off_by") or "").strip()
    # OBR-32 principal result interpreter (who signed off), OBR-34 technician (who counted):
    # NDL, the name as typed at the station in its first component.
    b.seg("OBR", {1: "1", 2: sample_id, 3: slide_id, 4: _cwe(panel_code()), 7: started,
                  8: done, 22: done, 24: "HM", 25: "F", 32: [signed], 34: [operator]})
    method = ("automated count, reviewed by a technologist" if manual
              else "automated count, not reviewed")
    b.seg("NTE", {1: "1", 2: "L", 3: (
        f"edge-wbc {rep.get('software', {}).get('version', '')}: {method}; "
        f"{counted(rep, rows)} leukocytes counted "
        f"(target {rep.get('target', '')}), 95 % CI by {rep.get('ci_method', '')}")})
    flags = unplaced_flags(rep)
    for i, text in enumerate(flags, 2):
        b.seg("NTE", {1: str(i), 2: "L", 3: f"flag: {text}"})
    # The technologist's slide and cell comments: remarks on the whole order, after the OBR.
    for i, text in enumerate(comments(rep), 2 + len(flags)):
        b.seg("NTE", {1: str(i), 2: "L", 3: b.ft(text), 4: _REMARK})
    n = 0
    for i, row in enumerate(rows, 1):
        code = row.code(manual)
        if row.value is not None:
            n += 1
            b.seg("OBX", {1: str(n), 2: "NM", 3: _cwe(code), 4: str(i), 5: _num(row.value),
                          6: [row.unit.code, row.unit.display, "UCUM"], 8: row.flag or "",
                          11: "F", 14: done, 16: ["", operator], 18: station,
                          19: done})
            notes = []
            if row.ci_low is not None and row.ci_high is not None:
                notes.append(f"95 % CI {_num(row.ci_low)}-{_num(row.ci_high)} "
                             f"{row.unit.display}")
            if row.flag_text:
                notes.append(f"flag: {row.flag_text}")
            if notes:
                b.seg("NTE", {1: "1", 2: "L", 3: "; ".join(notes)})
        n += 1
        b.seg("OBX", {1: str(n), 2: "NM", 3: _cwe(row.count_code() if row.value is not None
                                                     else code),
                      4: str(i), 5: str(row.count), 6: [CELLS.code, CELLS.display, "UCUM"],
                      8: row.flag if row.value is None and row.flag else "",
                      11: "F", 14: done, 16: ["", operator], 18: station,
                          19: done})
        if row.value is None and row.flag_text:
            b.seg("NTE", {1: "1", 2: "L", 3: f"flag: {row.flag_text}"})
    n += 1
    b.seg("OBX", {1: str(n), 2: "NM", 3: _cwe(COUNTED_CODE), 5: str(counted(rep, rows)),
                  6: [CELLS.code, CELLS.display, "UCUM"], 11: "F", 14: done, 18: station,
                  19: done})
    return b.text()


def parse(text: str) -> hl7.Message:
    """Parse a message this module (or a LIS) produced; raises :class:`ReportError`."""
    try:
        return hl7.parse(text)
    except Exception as e:  # python-hl7 raises plain exceptions on malformed input
        raise ReportError(f"not an HL7 v2 message: {e}") from e


def parse_ack(block: bytes) -> hl7.Message:
    """An ACK as it came off the wire (one MLLP block's bytes); raises :class:`ReportError`.

    Only MSA-1 and MSA-2 decide anything, and both are ASCII, so the bytes are read leniently:
    UTF-8 when they are UTF-8, else Latin-1 (ISO 8859-1, the commonest other MSH-18, and a byte
    for byte reading of anything else), and segments may end in LF or CRLF as well as CR. A LIS
    that accepted a report must not have it sent again forever for its facility's umlaut."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    if not text.startswith("MSH"):
        raise ReportError(f"it starts with {text[:20]!r}, not with an MSH segment")
    return parse(text)


def ack_status(ack: hl7.Message, sent_control_id: str) -> tuple[str, str]:
    """(MSA-1 code, the LIS's reason) from an ACK; raises :class:`ReportError` if it is not an
    ACK for the message that was sent."""
    try:
        msa = ack.segment("MSA")
    except KeyError:
        raise ReportError("the LIS answered without an MSA segment") from None
    code = str(msa(1)).strip().upper()
    acked = ack.unescape(str(msa(2))) if len(msa) > 2 else ""
    if acked and acked != sent_control_id:
        raise ReportError(f"the ACK is for message {acked!r}, not {sent_control_id!r}")
    reason = ack.unescape(str(msa(3))) if len(msa) > 3 else ""
    try:
        err = ack.segment("ERR")
        # ERR-8 user message, else ERR-3's text component (the HL7 error code's name).
        for num, comp in ((8, None), (3, 2)):
            if len(err) > num and str(err(num)):
                text = str(err(num)) if comp is None else str(err(num)(1)(comp))
                if text:
                    reason = (reason + "; " if reason else "") + ack.unescape(text)
                    break
    except (KeyError, IndexError):
        pass
    return code, reason
