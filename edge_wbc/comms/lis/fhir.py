"""The finalised differential as FHIR R4 resources in one transaction ``Bundle``.

``DiagnosticReport`` (status final, LOINC 69738-3, category HM) with one ``Observation`` per
formula row (LOINC per :mod:`edge_wbc.comms.lis.codes`, value in %, or /100 WBC, or a count;
components: cells counted and the 95 % CI; interpretation from the lab's flag), one for the
leukocytes counted, the sample as ``Specimen`` (accession identifier = sample ID) and the station
as ``Device`` (its software and model hashes as versions), and the people the report names as
``Practitioner``: who counted (the report's ``operator``: DiagnosticReport.performer and each
Observation's performer) and who signed off (``signed_off_by``: resultsInterpreter), each when
entered. No ``Patient``, which the station never learns (``subject`` is optional in R4).

Every resource is validated with ``fhir.resources`` before anything is sent or written. That
package ships R5 and R4B models; R4B (4.3.0) is used, whose five resources here have the same
elements as R4 (4.0.1).

Each entry is a conditional create (``ifNoneExist`` on a stable identifier) and the ``fullUrl``
UUIDs derive from the slide: a Bundle sent again after a lost response creates nothing twice on
a server that honours conditional creates.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from edge_wbc.comms.lis.codes import (
    CELLS,
    COUNTED_CODE,
    LOCAL_SYSTEM,
    UCUM,
    Code,
    ReportError,
    comments,
    counted,
    is_manual,
    panel_code,
    result_rows,
    unplaced_flags,
)

#: Identifier systems of what the station names itself.
SLIDE_SYSTEM = "urn:edge-wbc:slide"
SAMPLE_SYSTEM = "urn:edge-wbc:sample"
STATION_SYSTEM = "urn:edge-wbc:station"
OBSERVATION_SYSTEM = "urn:edge-wbc:observation"
#: The station knows operators by the name or ID typed at the station, not by a registry's ID.
OPERATOR_SYSTEM = "urn:edge-wbc:operator"
_NS = uuid.UUID("5d0f6a52-1f7e-4c0e-9b0e-4c1f3f0a6e21")  # edge-wbc's namespace for uuid5
_V3_INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def _uuid(slide_id: str, role: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, f'{slide_id}/{role}')}"


def _cc(code: Code) -> dict[str, Any]:
    return {"coding": [{"system": code.system, "code": code.code, "display": code.display}],
            "text": code.display}


def _qty(value: float, unit_code: str, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit_code}


def _token(v: str) -> str:
    """A token search value: FHIR's backslash escapes for its own separators, then URL-encoded."""
    for ch in ("\\", "|", ",", "$"):
        v = v.replace(ch, "\\" + ch)
    return quote(v, safe="")


def _entry(full_url: str, resource: dict[str, Any], ident: dict[str, str]) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"],
                    "ifNoneExist": f"identifier={_token(ident['system'])}|"
                                   f"{_token(ident['value'])}"},
    }


def build_bundle(rep: dict[str, Any]) -> dict[str, Any]:
    """The report dict (``edge-wbc/report/1``) as a validated transaction Bundle (a plain dict)."""
    if not rep.get("slide_id") or not rep.get("finalised_at"):
        raise ReportError("the report has no slide_id/finalised_at: only a finalised slide is "
                          "sent")
    manual = is_manual(rep)
    rows = result_rows(rep)
    slide_id = str(rep["slide_id"])
    sample_id = str(rep.get("sample_id") or "")
    station = str(rep.get("station_id") or "")
    done = str(rep["finalised_at"])
    period = {"start": str(rep.get("started_at") or done), "end": done}
    spec_url, dev_url = _uuid(slide_id, "specimen"), _uuid(slide_id, "device")
    entries: list[dict[str, Any]] = []

    spec_id = {"system": SAMPLE_SYSTEM, "value": sample_id or slide_id}
    specimen = {
        "resourceType": "Specimen",
        "identifier": [spec_id],
        "accessionIdentifier": spec_id,
        "status": "available",
        "type": {"text": "Peripheral blood smear"},
        "note": [{"text": f"slide {slide_id}"}],
    }
    entries.append(_entry(spec_url, specimen, spec_id))

    dev_id = {"system": STATION_SYSTEM, "value": station or "edge-wbc"}
    versions = [{"type": {"text": "software"},
                 "value": f"edge-wbc {rep.get('software', {}).get('version', '')}".strip()}]
    for m in (rep.get("models") or {}).get("models", []) or []:
        if isinstance(m, dict) and m.get("sha256"):
            versions.append({"type": {"text": f"model {m.get('name', '')}".strip()},
                             "value": f"sha256:{m['sha256']}"})
    device = {
        "resourceType": "Device",
        "identifier": [dev_id],
        "status": "active",
        "deviceName": [{"name": f"edge-wbc station {station}".strip(),
                        "type": "user-friendly-name"}],
        "version": versions,
    }
    entries.append(_entry(dev_url, device, dev_id))

    people: dict[str, str] = {}  # name -> fullUrl
    for role in ("operator", "signed_off_by"):
        name = str(rep.get(role) or "").strip()
        if name and name not in people:
            who_id = {"system": OPERATOR_SYSTEM, "value": name}
            people[name] = _uuid(slide_id, f"practitioner/{name}")
            entries.append(_entry(people[name], {"resourceType": "Practitioner",
                                                 "identifier": [who_id],
                                                 "name": [{"text": name}]}, who_id))
    counted_by = [{"reference": people[str(rep["operator"]).strip()]}] if str(
        rep.get("operator") or "").strip() else []
    signed_by = [{"reference": people[str(rep["signed_off_by"]).strip()]}] if str(
        rep.get("signed_off_by") or "").strip() else []

    method = ("automated count, reviewed by a technologist" if manual
              else "automated count, not reviewed")
    results = []
    for row in rows:
        code = row.code(manual)
        obs_id = {"system": OBSERVATION_SYSTEM, "value": f"{slide_id}/{row.label}"}
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [obs_id],
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "laboratory", "display": "Laboratory"}]}],
            "code": _cc(code),
            "effectivePeriod": period,
            "issued": done,
            "specimen": {"reference": spec_url},
            "device": {"reference": dev_url},
            **({"performer": counted_by} if counted_by else {}),
        }
        if row.value is None:
            obs["valueQuantity"] = _qty(row.count, CELLS.code, CELLS.display)
        else:
            obs["valueQuantity"] = _qty(row.value, row.unit.code, row.unit.display)
            comps = [{"code": _cc(row.count_code()),
                      "valueQuantity": _qty(row.count, CELLS.code, CELLS.display)}]
            if row.ci_low is not None and row.ci_high is not None:
                for end, v in (("low", row.ci_low), ("high", row.ci_high)):
                    comps.append({"code": _cc(Code(LOCAL_SYSTEM, f"ci95.{end}",
                                                   f"95 % confidence interval, {end} end")),
                                  "valueQuantity": _qty(v, row.unit.code, row.unit.display)})
            obs["component"] = comps
        if row.flag:
            obs["interpretation"] = [{"coding": [{"system": _V3_INTERP, "code": row.flag}],
                                      **({"text": row.flag_text} if row.flag_text else {})}]
        if row.flag_text:
            obs["note"] = [{"text": f"flag: {row.flag_text}"}]
        url = _uuid(slide_id, f"obs/{row.label}")
        entries.append(_entry(url, obs, obs_id))
        results.append({"reference": url})

    tot_id = {"system": OBSERVATION_SYSTEM, "value": f"{slide_id}/counted"}
    total = {
        "resourceType": "Observation",
        "identifier": [tot_id],
        "status": "final",
        "code": _cc(COUNTED_CODE),
        "effectivePeriod": period,
        "issued": done,
        "specimen": {"reference": spec_url},
        "device": {"reference": dev_url},
        "valueQuantity": _qty(counted(rep, rows), CELLS.code, CELLS.display),
        **({"performer": counted_by} if counted_by else {}),
    }
    tot_url = _uuid(slide_id, "obs/counted")
    entries.append(_entry(tot_url, total, tot_id))
    results.append({"reference": tot_url})

    rep_id = {"system": SLIDE_SYSTEM, "value": slide_id}
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [rep_id],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                  "code": "HM", "display": "Hematology"}]}],
        "code": _cc(panel_code()),
        "effectivePeriod": period,
        "issued": done,
        "specimen": [{"reference": spec_url}],
        **({"performer": counted_by} if counted_by else {}),
        **({"resultsInterpreter": signed_by} if signed_by else {}),
        "result": results,
        # R4 has no DiagnosticReport.note (R5 added it), and the technologist's slide and cell
        # comments are about the whole differential, not one Observation: they close the
        # conclusion, one per line, as HL7's NTEs after the OBR.
        "conclusion": "\n".join([" ".join([
            f"Leukocyte differential, {method}: {counted(rep, rows)} cells counted, 95 % CI "
            f"by {rep.get('ci_method', '')}.", *(f"Flag: {t}." for t in unplaced_flags(rep))]),
            *(c[0].upper() + c[1:] for c in comments(rep))]),
    }
    entries.append(_entry(_uuid(slide_id, "report"), report, rep_id))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    validate(bundle)
    return bundle


def validate(bundle: dict[str, Any]) -> None:
    """Validate the Bundle and each resource in it with fhir.resources; raises ReportError."""
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.bundle import Bundle

    try:
        Bundle.model_validate(bundle)
        for e in bundle.get("entry", []):
            res = e["resource"]
            get_fhir_model_class(res["resourceType"]).model_validate(res)
    except (ValidationError, KeyError, LookupError, ValueError) as e:
        raise ReportError(f"the FHIR resources do not validate: {e}") from e


def to_json(bundle: dict[str, Any]) -> str:
    return json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"
