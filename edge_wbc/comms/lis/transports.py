"""Ways a report reaches the LIS: a folder, MLLP (HL7 v2 over TCP) or a FHIR server.

Each ``send`` returns an :class:`Outcome`: delivered, refused by the LIS (kept, with its
reason, until released) or failed in a way worth retrying (nobody answered, the connection
broke, the server had a 5xx). Nothing here raises for a peer's behaviour.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from edge_wbc.comms.lis import fhir, hl7v2
from edge_wbc.comms.lis.codes import ReportError

#: HTTP statuses that mean "later", not "never".
_RETRY_HTTP = (408, 425, 429)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    held: bool  # the LIS refused this report: do not send it again by itself
    detail: str

    @classmethod
    def delivered(cls, detail: str) -> Outcome:
        return cls(True, False, detail)

    @classmethod
    def refused(cls, detail: str) -> Outcome:
        return cls(False, True, detail)

    @classmethod
    def retry(cls, detail: str) -> Outcome:
        return cls(False, False, detail)


class Transport(Protocol):
    destination: str

    def send(self, rep: dict[str, Any]) -> Outcome: ...

    def probe(self, timeout_s: float) -> str | None:
        """None when the LIS side is reachable now, else why not (for doctor)."""
        ...


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64] or "sample"


@dataclass
class HL7Header:
    sending_application: str = "EDGE-WBC"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"

    def build(self, rep: dict[str, Any]) -> str:
        return hl7v2.build_oru(
            rep, sending_application=self.sending_application,
            sending_facility=self.sending_facility,
            receiving_application=self.receiving_application,
            receiving_facility=self.receiving_facility, processing_id=self.processing_id)


class FolderTransport:
    """One file per slide, ``<sample>_<slide>.hl7`` or ``.fhir.json``, renamed into place so an
    importer never reads half a file; a resend overwrites the same name."""

    def __init__(self, folder: str | Path, fmt: str, header: HL7Header) -> None:
        self.folder = Path(folder)
        self.fmt = fmt
        self.header = header
        self.destination = f"folder {self.folder} ({fmt})"

    def filename(self, rep: dict[str, Any]) -> str:
        ext = "hl7" if self.fmt == "hl7" else "fhir.json"
        sample = safe_name(str(rep.get("sample_id") or ""))
        return f"{sample}_{safe_name(str(rep['slide_id']))}.{ext}"

    def send(self, rep: dict[str, Any]) -> Outcome:
        try:
            text = (self.header.build(rep) if self.fmt == "hl7"
                    else fhir.to_json(fhir.build_bundle(rep)))
        except ReportError as e:
            return Outcome.refused(f"report cannot be converted: {e}")
        path = self.folder / self.filename(rep)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            if not self.folder.is_dir():
                return Outcome.retry(f"folder {self.folder} does not exist (not mounted?)")
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            with contextlib.suppress(OSError):
                fd = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(fd)  # the rename itself survives a power cut
                finally:
                    os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return Outcome.retry(f"cannot write {path}: {e.strerror or e}")
        return Outcome.delivered(f"written {path.name}")

    def probe(self, timeout_s: float) -> str | None:
        if not self.folder.is_dir():
            return f"{self.folder} does not exist"
        if not os.access(self.folder, os.W_OK | os.X_OK):
            return f"{self.folder} is not writable by this user"
        return None


class MllpTransport:
    """HL7 v2 over MLLP with python-hl7's asyncio streams: connect, send, wait for the ACK."""

    def __init__(self, host: str, port: int, timeout_s: float, header: HL7Header) -> None:
        self.host, self.port, self.timeout_s, self.header = host, port, timeout_s, header
        self.destination = f"mllp://{host}:{port}"

    def send(self, rep: dict[str, Any]) -> Outcome:
        try:
            text = self.header.build(rep)
        except ReportError as e:
            return Outcome.refused(f"report cannot be converted: {e}")
        cid = hl7v2.control_id(str(rep["slide_id"]))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._exchange(text, cid))
        # Called from inside an event loop (an async host): the exchange gets a thread of its own.
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, self._exchange(text, cid)).result()

    async def _exchange(self, text: str, cid: str) -> Outcome:
        from hl7.mllp import InvalidBlockError, open_hl7_connection

        where = f"{self.host}:{self.port}"
        try:
            reader, writer = await asyncio.wait_for(
                open_hl7_connection(self.host, self.port, encoding=hl7v2.ENCODING),
                self.timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            why = "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e))
            return Outcome.retry(f"cannot connect to the LIS at {where}: {why}")
        try:
            writer.writemessage(text)
            # A peer that stops reading must not hold the delivery thread beyond the timeout.
            await asyncio.wait_for(writer.drain(), self.timeout_s)
            # The block's bytes, not readmessage(): that decodes strictly and lets python-hl7's
            # ParseException out for a frame that is not HL7; hl7v2.parse_ack reads both.
            block = await asyncio.wait_for(reader.readblock(), self.timeout_s)
        except asyncio.TimeoutError:
            return Outcome.retry(f"no ACK from {where} within {self.timeout_s:g} s")
        except asyncio.IncompleteReadError:
            return Outcome.retry(f"{where} closed the connection before acknowledging")
        except (InvalidBlockError, ValueError) as e:
            return Outcome.retry(f"{where} answered with something that is not an HL7 ACK: {e}")
        except OSError as e:
            return Outcome.retry(f"connection to {where} broke: {e.strerror or e}")
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        try:
            ack = hl7v2.parse_ack(block)
        except ReportError as e:
            return Outcome.retry(f"{where} answered with something that is not an HL7 ACK: {e}")
        try:
            code, reason = hl7v2.ack_status(ack, cid)
        except ReportError as e:
            return Outcome.retry(f"{where}: {e}")
        if code in hl7v2.ACCEPT:
            return Outcome.delivered(f"{code} for message {cid}")
        if code in hl7v2.REFUSE:
            return Outcome.refused(f"LIS answered {code}" + (f": {reason}" if reason else ""))
        return Outcome.retry(f"LIS answered an unknown acknowledgement code {code!r}")

    def probe(self, timeout_s: float) -> str | None:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s):
                return None
        except OSError as e:
            return "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))


class FhirTransport:
    """POST of the transaction Bundle to the server's base URL, bearer token when configured."""

    def __init__(self, url: str, token: str | None, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.destination = self.url

    def send(self, rep: dict[str, Any]) -> Outcome:
        try:
            body = json.dumps(fhir.build_bundle(rep), ensure_ascii=False).encode("utf-8")
        except ReportError as e:
            return Outcome.refused(f"report cannot be converted: {e}")
        headers = {"Content-Type": "application/fhir+json; charset=utf-8",
                   "Accept": "application/fhir+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        u = urlsplit(self.url)
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(u.hostname or "", u.port, timeout=self.timeout_s,
                                        context=ssl.create_default_context())
            if u.scheme == "https"
            else http.client.HTTPConnection(u.hostname or "", u.port, timeout=self.timeout_s))
        # timeout_s bounds each read; a proxy that answers a header line every few seconds passes
        # every one of them and would hold the delivery thread for as long as it likes. The whole
        # exchange (connection, then answer) gets twice timeout_s: then the socket is shut.
        deadline = 2 * self.timeout_s
        cut = threading.Event()

        def shut() -> None:
            cut.set()
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

        timer = threading.Timer(deadline, shut)
        timer.daemon = True
        timer.start()
        try:
            # http.client follows no redirect: a POST answered 301/302/303 is never turned into
            # a GET whose 200 would count as a delivery.
            conn.request("POST", (u.path or "/") + (f"?{u.query}" if u.query else ""), body,
                         headers)
            resp = conn.getresponse()
            status = resp.status
            ctype = resp.getheader("Content-Type") or ""
            loc = resp.getheader("Location") or resp.getheader("Content-Location") or ""
            answer = resp.read(_MAX_ANSWER + 1 if 200 <= status < 300 else 4096)
        except (OSError, http.client.HTTPException) as e:
            if cut.is_set():
                return Outcome.retry(f"no complete answer from {self.url} within {deadline:g} s")
            if isinstance(e, (TimeoutError, socket.timeout)):
                return Outcome.retry(f"no answer from {self.url} within {self.timeout_s:g} s")
            if isinstance(e, OSError):
                # also http.client's RemoteDisconnected, which is both: "cannot reach"
                return Outcome.retry(f"cannot reach {self.url}: {e}")
            return Outcome.retry(f"{self.url} answered with something that is not HTTP: "
                                 f"{type(e).__name__}: {_printable(str(e), 200)}")
        finally:
            timer.cancel()
            conn.close()
        if cut.is_set():
            # http.client takes the shut socket's end for the end of the headers: what it read
            # is a fragment, never an answer.
            return Outcome.retry(f"no complete answer from {self.url} within {deadline:g} s")
        if 300 <= status < 400:
            # Where it points is what the technician needs to correct fhir_url.
            to = _printable(loc, 200)
            return Outcome.refused(
                f"FHIR server answered HTTP {status}, "
                + (f"redirecting to {to}" if to else "a redirect without a Location")
                + ": set lis.fhir_url to the FHIR base it names")
        if not 200 <= status < 300:
            why = _outcome_text(answer)
            msg = f"FHIR server answered HTTP {status}" + (f": {why}" if why else "")
            if status in _RETRY_HTTP or status >= 500:
                return Outcome.retry(msg)
            return Outcome.refused(msg)
        wrong = _not_transaction_response(answer, ctype)
        if wrong:
            return Outcome.refused(f"FHIR server answered HTTP {status} with {wrong}")
        return Outcome.delivered(f"HTTP {status}" + (f" {_printable(loc, 200)}" if loc else ""))

    def probe(self, timeout_s: float) -> str | None:
        u = urlsplit(self.url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            with socket.create_connection((u.hostname or "", port), timeout=timeout_s):
                return None
        except OSError as e:
            return "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))


#: A transaction-response of this station's Bundle is a few kB even with every resource in it.
_MAX_ANSWER = 8 << 20


def _printable(text: str, limit: int) -> str:
    """A peer's text fit for a log line and the page: whitespace runs as one space, control
    characters dropped, cut at ``limit``."""
    text = " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _not_transaction_response(raw: bytes, ctype: str) -> str:
    """'' when ``raw`` is a FHIR transaction-response Bundle whose every entry succeeded, else
    what came instead. A 2xx is not enough: a login page from a proxy in front of the server
    answers 200 too, and the report must not leave the outbox for it."""
    hint = ", not a FHIR transaction-response Bundle: is lis.fhir_url the FHIR base?"
    what = _printable(ctype.split(";")[0], 60) or "no Content-Type"
    if len(raw) > _MAX_ANSWER:
        return f"more than {_MAX_ANSWER >> 20} MiB of {what}{hint}"
    if not raw.strip():
        return f"an empty body{hint}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"{what}{hint}"
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        return f"JSON that is not a FHIR resource{hint}"
    kind = _printable(str(obj.get("type") or ""), 40)
    if obj["resourceType"] != "Bundle" or kind != "transaction-response":
        return f"a FHIR {_printable(obj['resourceType'], 40)}" + (
            f" of type {kind!r}" if kind else "") + hint
    entries = obj.get("entry") or []
    if not isinstance(entries, list):
        return f"a transaction-response whose entry is not a list{hint}"
    for i, e in enumerate(entries, 1):
        resp = e.get("response") if isinstance(e, dict) else None
        st = str(resp.get("status") or "") if isinstance(resp, dict) else ""
        # A transaction is all or nothing; a server that says otherwise has not stored it.
        if not st.startswith("2"):
            return (f"a transaction-response whose entry {i} answered "
                    f"{_printable(st, 60) or 'no status'}")
    return ""


def _outcome_text(raw: bytes) -> str:
    """The diagnostics of an OperationOutcome, else the start of the body."""
    text = raw.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
        issues = obj.get("issue") or []
        parts = [str(i.get("diagnostics") or (i.get("details") or {}).get("text") or
                     i.get("code") or "") for i in issues if isinstance(i, dict)]
        if any(parts):
            return "; ".join(p for p in parts if p)[:500]
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:200]


def make_transport(cfg: Any, station_id: str = "") -> Transport | None:
    """The transport the [lis] section asks for, or None when delivery is off."""
    header = HL7Header(cfg.sending_application, cfg.sending_facility or station_id,
                       cfg.receiving_application, cfg.receiving_facility, cfg.processing_id)
    if cfg.delivery == "folder":
        return FolderTransport(cfg.folder, cfg.format, header)
    if cfg.delivery == "mllp":
        return MllpTransport(cfg.host, cfg.port, cfg.timeout_s, header)
    if cfg.delivery == "fhir":
        return FhirTransport(cfg.fhir_url, cfg.fhir_token, cfg.timeout_s)
    return None
