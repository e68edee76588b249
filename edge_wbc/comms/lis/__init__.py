"""The finalised differential to the laboratory information system (docs/lis.md).

A listener of the counting, like MQTT: the slide session never imports it. The station
registers :meth:`LisDelivery.hook` with the store so each finalised slide is queued in the
transaction that finalises it; the delivery thread sends it as HL7 v2.5.1 ``ORU^R01``
(:mod:`.hl7v2`) or a FHIR R4 Bundle (:mod:`.fhir`) through a folder, MLLP or a FHIR server
(:mod:`.transports`) and forgets it once the LIS acknowledged it.
"""

from __future__ import annotations

from typing import Any

from edge_wbc.comms.lis.codes import ReportError

__all__ = ["FORMATS", "ReportError", "render"]

#: On-demand formats: (media type, file suffix).
FORMATS = {"hl7": ("application/hl7-v2; charset=utf-8", "hl7"),
           "fhir": ("application/fhir+json; charset=utf-8", "fhir.json")}


def render(rep: dict[str, Any], fmt: str, cfg: Any = None, station_id: str = "") -> str:
    """The report as an HL7 message or FHIR Bundle text, as the configured delivery would send
    it (``cfg``: the [lis] section, for the HL7 header; None: defaults)."""
    from edge_wbc.comms.lis import fhir
    from edge_wbc.comms.lis.transports import HL7Header

    if fmt == "hl7":
        header = HL7Header() if cfg is None else HL7Header(
            cfg.sending_application, cfg.sending_facility or station_id,
            cfg.receiving_application, cfg.receiving_facility, cfg.processing_id)
        return header.build(rep)
    if fmt == "fhir":
        return fhir.to_json(fhir.build_bundle(rep))
    raise ValueError(f"unknown LIS format {fmt!r}; expected one of {', '.join(FORMATS)}")
