"""HTTP JSON API, server-sent events and live preview of the station, on the standard library.

``ThreadingHTTPServer`` keeps the device free of a web framework: the page needs a dozen routes,
one SSE stream and an MJPEG preview, a few requests per second at most.

Routes (JSON unless said; errors are ``{"error": message, "status": code}``, the standard
library's own refusals of a request line or headers included; methods other than GET, HEAD and
POST get 405, a request line that is not HTTP/1.x 400 or 505; HEAD of a stream is its headers;
a value no state would take is 400, a cell or field the open slide does not have 404, what the
slide's state refuses now (finalised, target reached, unidentified cells left) 409):

    GET  /                          the page (static/index.html)
    GET  /api/state                 the slide's formula (= MQTT differential) + "station" health
                                    + "limits" (largest target, longest sample id)
    GET  /api/events                server-sent events: hello (full state), differential, field,
                                    cell, slide, status
    GET  /api/preview.mjpg          live camera view (MJPEG); /api/preview.jpg one frame
    POST /api/capture               {"trigger"?} -> 202 {"capture_id", "queued"}; 409 slide not
                                    accepting fields, 429 queue full, 503 camera, 422 bad frame,
                                    507 disk below its margin
    GET  /api/fields/last           last field with its cells; /api/fields/<id>.jpg its image
    GET  /api/cells                 review gallery (unidentified first, least certain first)
    GET  /api/cells/<id>.jpg        the cell's crop; /api/cells/<id>/large.jpg the cell with its
                                    surroundings at the camera's full resolution
    POST /api/cells/<id>/review     {"label": class | "rejected" + "reason" | null (restore),
                                    "if_unreviewed"?: true (409 when someone decided meanwhile)}
    POST /api/cells/<id>/confirm    the shown class is right (a reviewed label for adaptation)
    POST /api/cells/confirm         {"ids": [...]}: confirm several (a gallery group) at once
    POST /api/cells/<id>/comment    {"comment": text ('' removes it)}
    POST /api/cells/add             {"label"}: a cell the camera missed, counted by key
    GET  /api/fields/<id>           one field of the open slide with its cells
    POST /api/fields/<id>/discard   {"reason": duplicate | bad_area | unusable | null (take back)}
    POST /api/slide/new             {"sample_id", "target", "abandon", "operator"}
    POST /api/slide/notes           {"operator", "signed_off_by", "comment"} (absent: unchanged)
    POST /api/slide/sample          {"sample_id"};  POST /api/slide/target {"target"}
    POST /api/slide/finalise        -> final state; 409 with the reasons when blocked
                                    (each /api/slide/ POST takes an optional "slide_id": the
                                    slide the caller saw; 409 "the slide has changed" when it
                                    is no longer the open one. The page always sends it.)
    GET  /api/slide/report.html|report.json|report.csv|cells.csv[?slide=<id>][&download=1]
    GET  /api/slide/report.hl7|report.fhir.json[?slide=<id>]   the finalised report as the LIS
                                    gets it (HL7 v2.5.1 ORU^R01, FHIR R4 Bundle; docs/lis.md)
    GET  /api/adaptation            the lab adaptation in use, fitted versions, reviewed cells
    POST /api/adaptation/fit        fit on the reviewed cells -> held-out validation (+ "id" when
                                    better: written, not yet active); 409 when it cannot be fitted
    POST /api/adaptation/activate   {"id": version | null (the shipped model)}; 409 when refused
    GET  /api/magnification         cell diameter in use, the config's, the saved one, last measure
    POST /api/magnification/measure the red cells of the fields at hand -> the leukocyte diameter
                                    they imply; 409 when too few red cells (or already running)
    POST /api/magnification/accept  {"cell_diameter_px": px}: counts from the next field, kept
                                    over restarts; 400 when not a diameter the config would take
    POST /api/magnification/reset   back to the config's cell_diameter_px
    GET  /api/slides                recent slides;  POST /api/errors/clear;  GET /healthz

Security: the server binds 127.0.0.1 unless told otherwise; any other address needs a token
(``EDGE_WBC_TOKEN`` or the systemd credential), given as ``Authorization: Bearer``, the
``edge_wbc_token`` cookie, or once as ``?token=`` (which sets the cookie, for a kiosk URL).
Requests whose Host header is not this station are refused (DNS-rebinding: a web page in the
kiosk's browser must not reach the API through a name that resolves to 127.0.0.1), and POSTs must
be JSON, which a cross-site form cannot send without a CORS preflight this server never grants.
Every response forbids framing (``Content-Security-Policy`` with ``frame-ancestors 'none'``,
``X-Frame-Options: DENY``); bodies need an exact ``Content-Length`` and strict JSON
(``edge_wbc.inputs``); connections are bounded (see :class:`StationServer`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import mimetypes
import queue
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from edge_wbc.camera import CameraError, FrameError
from edge_wbc.config import is_loopback
from edge_wbc.counting.events import Event
from edge_wbc.counting.session import (
    MAX_NAME_CHARS,
    MAX_NOTE_CHARS,
    BadValue,
    SessionError,
    UnknownItem,
)
from edge_wbc.counting.store import DiskFullError, StoreError
from edge_wbc.inputs import MAX_SAMPLE_ID_CHARS, MAX_TARGET, InputError, parse_json_object
from edge_wbc.station.actions import Actions
from edge_wbc.station.app import BusyError, Station

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "edge_wbc_token"
SSE_CLIENT_QUEUE = 256
SSE_HEARTBEAT_S = 15.0
MAX_BODY = 64 * 1024
LINGER_S, LINGER_BYTES = 2.0, 1 << 20  # see Handler.finish
# The page loads its script and stylesheet from here and sets colours and bar widths through
# style attributes (hence style-src-attr, which leaves <style> elements and inline scripts
# blocked); images are crops, fields, the preview and the empty data: favicon.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
            "style-src-attr 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# The printed report is one self-contained file: an inline stylesheet and data: thumbnails.
REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'none'")
# The page's inputs take their bounds from here (edge_wbc.inputs), not from copies in its HTML.
LIMITS = {"target_max": MAX_TARGET, "sample_id_max_chars": MAX_SAMPLE_ID_CHARS,
          "name_max_chars": MAX_NAME_CHARS, "comment_max_chars": MAX_NOTE_CHARS}
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_CELL = re.compile(
    r"^/api/cells/([A-Za-z0-9_:-]+)(/review|/confirm|/comment|/large\.jpg|\.jpg)$")
_FIELD = re.compile(r"^/api/fields/([A-Za-z0-9_:-]+)(\.jpg|/discard)?$")
#: Context around a cell in its large view, as a fraction of the box on each side.
LARGE_MARGIN = 0.6
_TRIGGER = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_REPORT = re.compile(
    r"^/api/slide/(report\.html|report\.json|report\.csv|cells\.csv|report\.hl7|"
    r"report\.fhir\.json)$")
_REPORT_KEYS = {"report.html": "html", "report.json": "json", "report.csv": "csv",
                "cells.csv": "cells_csv", "report.hl7": "hl7", "report.fhir.json": "fhir"}


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class EventHub:
    """Fans session events out to every connected page (one bounded queue per SSE client).

    A client that stops reading is dropped instead of slowing the count down; its page
    reconnects (EventSource does so by itself) and gets the full state again.
    """

    def __init__(self) -> None:
        self._clients: list[queue.Queue[tuple[str, str] | None]] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        data = json.dumps(event.payload, separators=(",", ":"), default=str)
        with self._lock:
            clients = list(self._clients)
        for q in clients:
            try:
                q.put_nowait((event.kind, data))
            except queue.Full:
                self.remove(q)
                with contextlib.suppress(queue.Full):
                    q.put_nowait(None)

    def add(self) -> queue.Queue[tuple[str, str] | None]:
        q: queue.Queue[tuple[str, str] | None] = queue.Queue(SSE_CLIENT_QUEUE)
        with self._lock:
            self._clients.append(q)
        return q

    def remove(self, q: queue.Queue[tuple[str, str] | None]) -> None:
        with self._lock:
            if q in self._clients:
                self._clients.remove(q)

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for q in clients:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)


class StationServer(ThreadingHTTPServer):
    """One thread per connection, bounded.

    A connection that has not sent a whole request head is *waiting*: it holds a thread but may
    lose it. When all ``max_handlers`` threads are taken, the longest-waiting connection is
    closed to make room, so idle or trickling clients (a forgotten browser tab, a slowloris)
    cannot lock the technician out; only when every thread is busy with a request or a stream
    (page events, preview) is a new connection answered 503 after ``slot_wait_s``. A connection
    silent for ``idle_timeout_s`` is closed; streams write at least every 15 s, so they stay.
    """

    daemon_threads = True
    allow_reuse_address = True
    # listen(2) backlog; the standard library's 5 reset a burst of 60 concurrent POSTs.
    request_queue_size = 128
    max_handlers = 64
    idle_timeout_s = 30.0
    slot_wait_s = 5.0

    def __init__(
        self,
        station: Station,
        hub: EventHub,
        host: str = "127.0.0.1",
        port: int = 8080,
        token: str | None = None,
        preview_fps: float = 5.0,
        lis: Any = None,
        actions: Actions | None = None,
        adaptation: Any = None,
        magnification: Any = None,
    ) -> None:
        if not is_loopback(host) and not token:
            raise ValueError(
                f"refusing to listen on {host}: other machines could control the station. Set a "
                "token (EDGE_WBC_TOKEN or the systemd credential 'token') or use 127.0.0.1"
            )
        self.station = station
        self.actions = actions or Actions(station)
        self.hub = hub
        self.token = token or None
        self.preview_fps = preview_fps
        self.lis = lis  # the [lis] section: the HL7 header of on-demand messages
        #: station.adaptations.LabAdaptation, or None when the analyser cannot be adapted.
        self.adaptation = adaptation
        #: station.magnification.Magnification, or None (not wired: its routes answer 404).
        self.magnification = magnification
        self.stopping = threading.Event()
        self.bind_host = host
        self._slots = threading.BoundedSemaphore(self.max_handlers)
        self._waiting: dict[Handler, float] = {}
        self._waiting_lock = threading.Lock()
        super().__init__((host, port), Handler)
        self.port = self.server_address[1]
        self._jpeg_cache: tuple[int, bytes] | None = None
        self._jpeg_lock = threading.Lock()

    def preview_jpeg(self) -> bytes | None:
        img = self.station.source.preview()
        if img is None:
            return None
        with self._jpeg_lock:
            if self._jpeg_cache is not None and self._jpeg_cache[0] == id(img):
                return self._jpeg_cache[1]
            data = encode_jpeg(img, 80)
            self._jpeg_cache = (id(img), data)
            return data

    def shutdown(self) -> None:
        self.stopping.set()
        self.hub.close_all()
        super().shutdown()

    # ------------------------------------------------------------------ connection bound

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            deadline = time.monotonic() + self.slot_wait_s
            # One connection closed per slot needed; retried while none is waiting yet (a
            # thread just started has not reached its first read).
            closed = False
            while True:
                closed = closed or self._close_longest_waiting()
                if self._slots.acquire(timeout=0.05):
                    break
                if time.monotonic() >= deadline:
                    self._turn_away(request)
                    return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def waiting(self, handler: Handler) -> None:
        with self._waiting_lock:
            self._waiting[handler] = time.monotonic()

    def working(self, handler: Handler) -> bool:
        """The request head is in; False when the connection was closed to make room."""
        with self._waiting_lock:
            return self._waiting.pop(handler, None) is not None

    def _close_longest_waiting(self) -> bool:
        with self._waiting_lock:
            if not self._waiting:
                return False
            handler = min(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[handler]
        # Wakes its thread (a read returns end-of-stream), which then ends and frees its slot.
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)
        return True

    def _turn_away(self, request: Any) -> None:
        body = json.dumps({"error": "the station is busy: too many open connections; try "
                                    "again", "status": 503}).encode()
        head = ["HTTP/1.1 503 Service Unavailable", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Retry-After: 1", "Connection: close",
                f"Content-Security-Policy: {PAGE_CSP}",
                *(f"{k}: {v}" for k, v in SECURITY_HEADERS.items())]
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.shutdown_request(request)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


class Handler(BaseHTTPRequestHandler):
    server: StationServer
    protocol_version = "HTTP/1.1"
    server_version = "edge-wbc"
    # Headers and body go out in separate writes; with Nagle on, keep-alive connections stall
    # ~40 ms per response waiting for a delayed ACK (measured: +100 ms capture-to-display).
    disable_nagle_algorithm = True
    # The policy for the response being written (end_headers sends it, then resets it).
    _csp = PAGE_CSP

    def setup(self) -> None:
        # StreamRequestHandler applies this to the socket: reads and writes that make no
        # progress for this long end the connection. (Typeshed calls it a ClassVar; setup reads
        # it from the instance, so a per-server value belongs there.)
        self.timeout = self.server.idle_timeout_s  # type: ignore[misc]
        super().setup()

    def finish(self) -> None:
        super().finish()
        # Lingering close (RFC 9112 9.6): a refused request's body may still be arriving.
        # Closing with it unread makes the kernel reset the connection, and a client still
        # sending sees the reset instead of the answer it was sent. Our side is shut first, so
        # the client reads the answer's end at once; what it still sends is read and dropped,
        # for at most LINGER_S and LINGER_BYTES.
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            left = LINGER_BYTES
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                sock.settimeout(wait)
                chunk = sock.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)

    def handle_one_request(self) -> None:
        self.server.waiting(self)
        try:
            super().handle_one_request()
        except OSError:
            # The client went away (mid-request or while its answer was written), the
            # connection was closed to make room, or it timed out (a timed-out socket's file
            # refuses any further read): nobody to answer, nothing to log as a crash.
            self.close_connection = True
        finally:
            self.server.working(self)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # The standard library answers a request line without a version as HTTP/0.9: the body
    # alone, no status line, no headers. Every answer here has them.
    default_request_version = "HTTP/1.1"

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if len(self.requestline.split()) == 2:
            self.send_error(400, "the request line needs a version: METHOD /path HTTP/1.1")
            return False
        major = self.request_version.split("/", 1)[1].split(".")[0]
        if int(major) != 1:
            self.send_error(505, f"{self.request_version} is not served: send HTTP/1.1")
            return False
        if self.command not in ("GET", "HEAD", "POST"):
            # 405, not the standard library's 501: the method is the client's to change.
            self.send_error(405, f"method {self.command} is not allowed: use GET, HEAD or POST",
                            headers={"Allow": "GET, HEAD, POST"})
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None,
                   headers: dict[str, str] | None = None) -> None:
        """The standard library's refusals (request line, headers, method, version) in the
        API's error shape, ``{"error", "status"}``, instead of an HTML page."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True  # what is left of the request is not to be read as another
        if self.request_version == "HTTP/0.9":
            # Refused before its line was read whole ("GET / x HTTP/0.9"): an HTTP/0.9 answer
            # would go without its status line.
            self.request_version = "HTTP/1.1"
        reason = message or self.responses.get(code, ("error",))[0]
        body = json.dumps({"error": reason, "status": code}).encode()
        self._send(code, body, "application/json", {"Connection": "close", **(headers or {})})

    # ------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def end_headers(self) -> None:
        # Here rather than in _send: every response (errors of the standard library, SSE, the
        # preview, redirects) carries them. The report's own policy replaces the page's.
        self.send_header("Content-Security-Policy", self._csp)
        self._csp = PAGE_CSP
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, separators=(",", ":"), default=str).encode()
        self._send(status, body, "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message, "status": status})

    def _body(self) -> dict[str, Any]:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if self.headers.get("Transfer-Encoding"):
            # Without a length the body's end is unknown to this server; guessing would leave
            # part of it to be read as the next request on a keep-alive connection.
            self.close_connection = True
            raise _ApiError(411, "send the body with a Content-Length, not chunked")
        declared = self.headers.get_all("Content-Length") or []
        if len(set(declared)) > 1:
            self.close_connection = True
            raise _ApiError(400, "conflicting Content-Length headers")
        text = (declared[0] if declared else "0").strip()
        if not text.isascii() or not text.isdigit():
            # -5 would read to the end of the stream (a hung thread), abc is no length at all.
            self.close_connection = True
            raise _ApiError(400, f"Content-Length must be a whole number of bytes, got {text!r}")
        length = int(text)
        if length > MAX_BODY:
            self.close_connection = True
            raise _ApiError(413, "request body too large")
        try:
            raw = self.rfile.read(length) if length else b""
        except TimeoutError:
            # The client stopped sending: the rest of the stream is no request to read.
            self.close_connection = True
            raise _ApiError(408, f"the body did not arrive ({length} bytes announced)") from None
        if len(raw) < length:
            self.close_connection = True
            raise _ApiError(400, f"body ended after {len(raw)} of {length} bytes")
        if ctype != "application/json":
            raise _ApiError(415, "send JSON (Content-Type: application/json)")
        if not raw:
            return {}
        try:
            return parse_json_object(raw)
        except InputError as e:
            raise _ApiError(400, str(e)) from None

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip()
        if self.server.token:
            return True  # the token is the access control when the station is on the network
        if not host:
            return True  # every browser sends Host: a request without one is no rebinding page
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        name = name.strip("[]")
        return is_loopback(name)

    def _authorised(self, query: dict[str, list[str]]) -> tuple[bool, str | None]:
        tok = self.server.token
        if not tok:
            return True, None
        given = None
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
        if given is None:
            for part in (self.headers.get("Cookie") or "").split(";"):
                k, _, v = part.strip().partition("=")
                if k == COOKIE:
                    given = v
        set_cookie = None
        if given is None and query.get("token"):
            given = query["token"][0]
            set_cookie = given
        ok = given is not None and hmac.compare_digest(given.encode(), tok.encode())
        return ok, set_cookie if ok else None

    def _dispatch(self, method: str) -> None:
        if not self.server.working(self):
            self.close_connection = True  # closed to make room for another connection
            return
        if method == "GET" and (self.headers.get("Transfer-Encoding")
                                or self.headers.get("Content-Length", "0").strip() != "0"):
            # GET and HEAD bodies are never read: on a kept-alive connection the body would be
            # read as the next request (one smuggled past whatever looked at this one).
            self.close_connection = True
        try:
            url = urlsplit(self.path)
        except ValueError as e:  # "http://[x/": an absolute-form target that is no URL
            self.close_connection = True
            self._error(400, f"request target is not a URL: {e}")
            return
        query = parse_qs(url.query)
        path = url.path
        if not self._host_ok():
            self.close_connection = True  # a POST's body was not read: do not parse it as a request
            self._error(403, "unknown Host header: open the station as http://127.0.0.1:PORT/")
            return
        ok, set_cookie = self._authorised(query)
        if not ok:
            self.close_connection = True
            self._error(401, "token required: open the page with ?token=… or send "
                             "'Authorization: Bearer …'")
            return
        if set_cookie is not None:
            # Strip the token from the address bar (and from the kiosk's history).
            self.send_response(303)
            # One leading slash: "//host/" (an absolute-form target's path) would leave the site.
            self.send_header("Location", "/" + path.lstrip("/"))
            self.send_header("Set-Cookie", f"{COOKIE}={set_cookie}; HttpOnly; SameSite=Strict; "
                             "Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            if method == "GET":
                self._get(path, query)
            else:
                self._post(path)
        except _ApiError as e:
            self._error(e.status, str(e))
        # 400 and 404 for what no state would take, 409 for what this state refuses: a client
        # retrying after a 409 may succeed once the technician acts; after a 400, never.
        except BadValue as e:
            self._error(400, str(e))
        except UnknownItem as e:
            self._error(404, str(e))
        except SessionError as e:
            self._error(409, str(e))
        except BusyError as e:
            self._error(429, str(e))
        except CameraError as e:
            self._error(503, str(e))
        except FrameError as e:
            self._error(422, str(e))
        except DiskFullError as e:
            self._error(507, str(e))
        except StoreError as e:
            self._error(500, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug must answer the page, not drop its connection
            log.exception("%s %s failed", method, path)
            with contextlib.suppress(OSError):
                self._error(500, f"internal error: {e}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # ------------------------------------------------------------------ routes

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        st = self.server.station
        session = st.session
        if path in ("/", "/index.html"):
            self._static("index.html")
        elif path.startswith("/static/"):
            self._static(path[len("/static/"):])
        elif path == "/healthz":
            s = st.status()
            healthy = s["worker_alive"]
            self._json(200 if healthy else 503, {"ok": healthy, "camera": s["camera"]})
        elif path == "/api/state":
            self._json(200, {**session.state(), "station": st.status(), "limits": LIMITS})
        elif path == "/api/events":
            self._sse()
        elif path == "/api/preview.mjpg":
            self._mjpeg()
        elif path == "/api/preview.jpg":
            data = self.server.preview_jpeg()
            if data is None:
                raise _ApiError(503, "no preview frame from the camera")
            self._send(200, data, "image/jpeg")
        elif path == "/api/fields/last":
            f = session.last_field()
            if f is None:
                raise _ApiError(404, "no field captured on this slide yet")
            self._json(200, f)
        elif path == "/api/cells":
            self._json(200, {"slide_id": session.slide["id"], "cells": session.gallery()})
        elif path == "/api/adaptation":
            self._json(200, self._adaptation().status())
        elif path == "/api/magnification":
            self._json(200, self._magnification().status())
        elif path == "/api/slides":
            self._json(200, {"slides": session.store.slides(50)})
        elif (m := _FIELD.match(path)) and m.group(2) != "/discard":
            fid, jpg = m.group(1), m.group(2)
            if not jpg:
                f = session.field_view(fid)
                if f is None:
                    raise _ApiError(404, f"no field {fid} on the open slide")
                self._json(200, f)
                return
            p = session.store.field_image(fid)
            self._file(p, "image/jpeg", f"no image for field {fid}")
        elif (m := _CELL.match(path)) and m.group(2) == ".jpg":
            p = session.store.crop_image(m.group(1))
            self._file(p, "image/jpeg", f"no crop for cell {m.group(1)}")
        elif (m := _CELL.match(path)) and m.group(2) == "/large.jpg":
            self._send(200, self._large_crop(m.group(1)), "image/jpeg",
                       {"Cache-Control": "max-age=86400"})
        elif m := _REPORT.match(path):
            self._report(m.group(1), query)
        else:
            raise _ApiError(404, f"no such page: {path}")

    def _post(self, path: str) -> None:
        act = self.server.actions
        body = self._body()
        if path == "/api/capture":
            trigger = body.get("trigger", "api")
            if not isinstance(trigger, str) or not _TRIGGER.match(trigger):
                raise _ApiError(400, "trigger must be a short name (letters, digits, - or _)")
            self._json(202, act.capture(trigger))
        elif (m := _CELL.match(path)) and m.group(2) == "/review":
            if "label" not in body:
                raise _ApiError(400, "give 'label' (a class, 'rejected' with 'reason', or null "
                                     "to restore the machine's label)")
            guard = body.get("if_unreviewed", False)
            if not isinstance(guard, bool):
                raise _ApiError(400, f"if_unreviewed must be true or false, got {guard!r}")
            self._json(200, act.review(m.group(1), body["label"], body.get("reason"), guard))
        elif (m := _CELL.match(path)) and m.group(2) == "/comment":
            if "comment" not in body:
                raise _ApiError(400, "give 'comment' (text; '' removes it)")
            self._json(200, act.comment_cell(m.group(1), body["comment"]))
        elif path == "/api/cells/add":
            if "label" not in body:
                raise _ApiError(400, "give 'label': the class of the cell to add")
            self._json(200, act.add_cell(body["label"]))
        elif (m := _FIELD.match(path)) and m.group(2) == "/discard":
            if "reason" not in body:
                raise _ApiError(400, "give 'reason' (duplicate, bad_area, unusable) or null to "
                                     "take the field back")
            self._json(200, act.discard_field(m.group(1), body["reason"]))
        elif (m := _CELL.match(path)) and m.group(2) == "/confirm":
            self._json(200, act.confirm([m.group(1)]))
        elif path == "/api/cells/confirm":
            ids = body.get("ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                raise _ApiError(400, "give 'ids': a non-empty list of cell ids")
            self._json(200, act.confirm(ids))
        elif path == "/api/slide/new":
            abandon = body.get("abandon", False)
            if not isinstance(abandon, bool):
                # "no" or "false" must not close a slide with counted cells.
                raise _ApiError(400, f"abandon must be true or false, got {abandon!r}")
            self._json(200, act.new_slide(body.get("sample_id"), body.get("target"),
                                          abandon=abandon, operator=body.get("operator"),
                                          slide_id=body.get("slide_id")))
        elif path == "/api/slide/notes":
            self._json(200, act.set_notes(body.get("operator"), body.get("signed_off_by"),
                                          body.get("comment"), slide_id=body.get("slide_id")))
        elif path == "/api/slide/sample":
            self._json(200, act.set_sample_id(body.get("sample_id"), body.get("slide_id")))
        elif path == "/api/slide/target":
            if "target" not in body:
                raise _ApiError(400, "give 'target' (number of cells)")
            self._json(200, act.set_target(body["target"], body.get("slide_id")))
        elif path == "/api/slide/finalise":
            self._json(200, act.finalise(body.get("slide_id")))
        elif path == "/api/errors/clear":
            self._json(200, act.clear_error())
        elif path in ("/api/adaptation/fit", "/api/adaptation/activate"):
            from edge_wbc.station.adaptations import AdaptationRefused

            lab = self._adaptation()
            try:
                if path.endswith("/fit"):
                    self._json(200, lab.fit())
                else:
                    if "id" not in body or not (body["id"] is None or isinstance(body["id"], str)):
                        raise _ApiError(400, "give 'id': an adaptation's id, or null for the "
                                             "shipped model")
                    self._json(200, lab.activate(body["id"]))
            except AdaptationRefused as e:
                raise _ApiError(409, str(e)) from None
        elif path in ("/api/magnification/measure", "/api/magnification/accept",
                      "/api/magnification/reset"):
            self._magnification_action(path.rsplit("/", 1)[1], body)
        else:
            raise _ApiError(404, f"no such action: {path}")

    def _magnification_action(self, what: str, body: dict[str, Any]) -> None:
        from edge_wbc.station.magnification import BadDiameter, MagnificationRefused

        mag = self._magnification()
        try:
            if what == "measure":
                self._json(200, mag.measure())
            elif what == "accept":
                if "cell_diameter_px" not in body:
                    raise _ApiError(400, "give 'cell_diameter_px': the leukocyte diameter in "
                                         "pixels to count with")
                self._json(200, mag.accept(body["cell_diameter_px"]))
            else:
                self._json(200, mag.reset())
        except BadDiameter as e:
            raise _ApiError(400, str(e)) from None
        except MagnificationRefused as e:
            raise _ApiError(409, str(e)) from None

    # ------------------------------------------------------------------ helpers

    def _static(self, rel: str) -> None:
        try:
            p = (STATIC / rel).resolve()
            found = p.is_relative_to(STATIC.resolve()) and p.is_file()
        except (OSError, ValueError):  # a NUL in the name, a name too long for the file system
            found = False
        if not found:
            raise _ApiError(404, f"no such file: {rel!r}")
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript",):
            ctype += "; charset=utf-8"
        self._send(200, p.read_bytes(), ctype)

    def _magnification(self) -> Any:
        if self.server.magnification is None:
            raise _ApiError(404, "this station does not measure its magnification")
        return self.server.magnification

    def _adaptation(self) -> Any:
        if self.server.adaptation is None:
            raise _ApiError(404, "this station's analyser cannot be adapted (no classifier "
                                 "embedding)")
        return self.server.adaptation

    def _large_crop(self, cell_id: str) -> bytes:
        """The cell with its surroundings from the stored field image, at the camera's own
        resolution (the gallery's crop is a 128 px thumbnail)."""
        store = self.server.station.session.store
        cell = self.server.station.session.cells.get(cell_id)
        if cell is None:
            raise _ApiError(404, f"no cell {cell_id} on the open slide")
        p = store.field_image(cell["field_id"])
        if p is None or not p.is_file() or cell["bbox"][2] <= cell["bbox"][0]:
            raise _ApiError(404, f"no image of cell {cell_id} (added by hand, or its field "
                                 "image is missing)")
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise _ApiError(404, f"the image of field {cell['field_id']} cannot be read")
        h, w = img.shape[:2]
        x0, y0, x1, y1 = cell["bbox"]
        side = max(x1 - x0, y1 - y0) * (1 + 2 * LARGE_MARGIN)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        a0, b0 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
        a1, b1 = min(w, int(cx + side / 2)), min(h, int(cy + side / 2))
        return encode_jpeg(cv2.cvtColor(img[b0:b1, a0:a1], cv2.COLOR_BGR2RGB), 92)

    def _file(self, p: Path | None, ctype: str, missing: str) -> None:
        if p is None or not p.is_file():
            raise _ApiError(404, missing)
        self._send(200, p.read_bytes(), ctype, {"Cache-Control": "max-age=86400"})

    def _report(self, name: str, query: dict[str, list[str]]) -> None:
        session = self.server.station.session
        sid = (query.get("slide") or [session.slide["id"]])[0]
        slide = session.store.slide(sid)
        if slide is None:
            raise _ApiError(404, f"no slide {sid}")
        key = _REPORT_KEYS[name]
        rel = (slide.get("reports") or {}).get("json" if key in ("hl7", "fhir") else key)
        if not rel:
            if slide.get("status") == "abandoned":
                raise _ApiError(404, f"slide {slide['sample_id']} was abandoned: it has no report")
            raise _ApiError(404, f"slide {slide['sample_id']} has no report yet: finalise it first")
        p = session.store.data_dir / rel
        if not p.is_file():
            raise _ApiError(404, f"report file {rel} is missing")
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", slide["sample_id"])
        disp = "inline" if name.endswith(".html") and not query.get("download") else "attachment"
        headers = {"Content-Disposition": f'{disp}; filename="{safe}-{name}"'}
        if key in ("hl7", "fhir"):
            from edge_wbc.comms.lis import FORMATS, ReportError, render
            from edge_wbc.comms.lis.delivery import load_report

            try:
                text = render(load_report(session.store.data_dir, rel), key, self.server.lis,
                              slide.get("station_id") or "")
            except ReportError as e:
                raise _ApiError(422, f"slide {slide['sample_id']}: {e}") from e
            self._send(200, text.encode("utf-8"), FORMATS[key][0], headers)
            return
        ctype = {"html": "text/html; charset=utf-8", "json": "application/json",
                 "csv": "text/csv; charset=utf-8"}[name.rsplit(".", 1)[1]]
        if name.endswith(".html"):
            self._csp = REPORT_CSP
        self._send(200, p.read_bytes(), ctype, headers)

    def _sse(self) -> None:
        srv = self.server
        q = srv.hub.add()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "keep-alive")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.close_connection = True
            if self.command == "HEAD":
                return  # the headers alone: a stream that never ends is no answer to HEAD
            # A fresh page (or one reconnecting after a restart) starts from the full state.
            st = srv.station
            first = {**st.session.state(), "station": st.status(), "limits": LIMITS}
            self._sse_write("hello", json.dumps(first, default=str))
            while not srv.stopping.is_set():
                try:
                    item = q.get(timeout=SSE_HEARTBEAT_S)
                except queue.Empty:
                    self.wfile.write(b": ping\n\n")
                    self.wfile.flush()
                    continue
                if item is None:
                    break
                self._sse_write(*item)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            srv.hub.remove(q)

    def _sse_write(self, kind: str, data: str) -> None:
        self.wfile.write(f"event: {kind}\ndata: {data}\n\n".encode())
        self.wfile.flush()

    def _mjpeg(self) -> None:
        srv = self.server
        fps = srv.preview_fps
        if fps <= 0:
            raise _ApiError(404, "live preview is off (camera.preview_fps = 0)")
        boundary = "edgewbcframe"
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={boundary}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        period = 1.0 / fps
        try:
            while not srv.stopping.is_set():
                t = time.monotonic()
                data = srv.preview_jpeg()
                if data is not None:
                    self.wfile.write(
                        f"--{boundary}\r\nContent-Type: image/jpeg\r\nContent-Length: "
                        f"{len(data)}\r\n\r\n".encode() + data + b"\r\n"
                    )
                    self.wfile.flush()
                srv.stopping.wait(max(0.0, period - (time.monotonic() - t)))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass


def serve_in_thread(server: StationServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    t.start()
    return t
