"""Real LIS peers on loopback for the LIS tests: an MLLP listener (python-hl7's asyncio server)
and a small FHIR HTTP server, each scripted answer by answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
from hl7.mllp import start_hl7_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MllpPeer:
    """Answers each message with the next scripted reply: an ACK code ('AA', 'AE', 'AR'),
    'close' (read it, hang up without an ACK), 'half' (half an ACK, then hang up), 'silent'
    (read it and never answer), 'wrong' (an AA for another message). Unscripted: 'AA'."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.script: list[str] = []
        self.received: list[hl7.Message] = []
        self.acked: list[str] = []  # control ids answered AA
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while True:
                try:
                    msg = await reader.readmessage()
                except asyncio.IncompleteReadError:
                    return
                self.received.append(msg)
                mode = self.script.pop(0) if self.script else "AA"
                if mode == "close":
                    return
                if mode == "silent":
                    await asyncio.sleep(3)
                    return
                if mode == "half":
                    writer.write(b"\x0bMSH|^~\\&|LIS")
                    await writer.drain()
                    return
                if mode == "wrong":
                    ack = hl7.parse(str(msg).replace(str(msg.segment("MSH")(10)), "OTHER"))
                    writer.writemessage(ack.create_ack("AA", message_id="A1"))
                else:
                    ack = msg.create_ack(mode, message_id="A1", application="LIS",
                                         facility="LAB")
                    if mode != "AA":
                        # MSA-3 and an ERR segment, as interface engines send them.
                        ack = hl7.parse(str(ack).rstrip("\r") + "|sample unknown to LIS\r"
                                        "ERR|||207^Application internal error^HL70357|E\r")
                    writer.writemessage(ack)
                await writer.drain()
                if mode == "AA":
                    self.acked.append(str(msg.segment("MSH")(10)))
        finally:
            writer.close()

    def start(self) -> MllpPeer:
        async def go() -> Any:
            return await start_hl7_server(self._client, "127.0.0.1", self.port,
                                          encoding="utf-8")

        self._server = asyncio.run_coroutine_threadsafe(go(), self._loop).result(5)
        return self

    def stop(self) -> None:
        """Go away: stop listening and drop every connection."""
        if self._server is not None:
            srv = self._server
            self._server = None

            async def down() -> None:
                srv.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.wait_closed(), 2)

            asyncio.run_coroutine_threadsafe(down(), self._loop).result(5)

    def close(self) -> None:
        self.stop()

        async def cancel() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class FhirPeer:
    """A FHIR endpoint: each POST gets the next scripted answer: 201 (the transaction-response
    Bundle a FHIR server answers, one entry per entry sent), 302 / 307 (a redirect), 400, 500,
    'timeout', or 'html' (200 with a login page, as a single-sign-on proxy answers); unscripted:
    201. Records the bodies and Authorization headers it was sent."""

    def __init__(self) -> None:
        self.script: list[int | str] = []
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.gets = 0
        peer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                # What a redirected POST would turn into: it must never count as a delivery.
                peer.gets += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n))
                mode = peer.script.pop(0) if peer.script else 201
                peer.auth.append(self.headers.get("Authorization"))
                if mode == "timeout":
                    time.sleep(1.5)
                    return
                out: dict[str, Any]
                if mode == 400:
                    out = {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "invalid",
                         "diagnostics": "Observation.code: unknown code system"}]}
                elif mode == 500:
                    out = {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "fatal", "code": "exception", "diagnostics": "db down"}]}
                elif mode in (302, 307):
                    out = {}
                elif mode == "html":
                    data = b"<html><body>Please log in</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                else:
                    peer.bodies.append(body)
                    out = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
                        {"response": {"status": "201 Created", "etag": 'W/"1"',
                                      "location": f"{e['resource']['resourceType']}/{i}"
                                                  "/_history/1"}}
                        for i, e in enumerate(body.get("entry") or [], 1)]}
                data = json.dumps(out).encode()
                self.send_response(int(mode))
                if mode in (302, 307):
                    self.send_header("Location", "https://fhir.lab.example/fhir/r4/"
                                     if mode == 307 else "/elsewhere")
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                if mode == 201:
                    self.send_header("Location", "Bundle/1")
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def mllp_peer() -> Iterator[MllpPeer]:
    p = MllpPeer().start()
    try:
        yield p
    finally:
        p.close()


class RawPeer:
    """A TCP peer that reads one request (an MLLP block, or an HTTP request with its body) and
    answers with the given bytes, whatever they are: the garbled, foreign and non-UTF-8 answers
    python-hl7's and http.server's own peers cannot produce."""

    def __init__(self, answer: bytes, kind: str = "mllp", drip_s: float = 0.0) -> None:
        self.answer = answer
        self.kind = kind
        #: > 0: the answer goes a line at a time, this far apart (a proxy that dribbles)
        self.drip_s = drip_s
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/fhir"
        threading.Thread(target=self._accept, daemon=True).start()

    def _read(self, c: socket.socket) -> bytes:
        buf = b""
        end = b"\x1c\x0d" if self.kind == "mllp" else b"\r\n\r\n"
        while end not in buf:
            d = c.recv(65536)
            if not d:
                return buf
            buf += d
        if self.kind == "http":
            head, body = buf.split(end, 1)
            n = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")), 0)
            while len(body) < n:
                d = c.recv(65536)
                if not d:
                    break
                body += d
            buf = head + end + body
        return buf

    def _serve(self, c: socket.socket) -> None:
        with c:
            try:
                self.requests.append(self._read(c))
                if self.drip_s:
                    for line in self.answer.splitlines(keepends=True):
                        c.sendall(line)
                        time.sleep(self.drip_s)
                else:
                    c.sendall(self.answer)
                time.sleep(0.3)  # let the client read it before the connection goes
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
