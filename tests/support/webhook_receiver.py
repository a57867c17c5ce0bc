"""A webhook receiver on 127.0.0.1 for tests and benchmarks: checks signatures, fails on purpose, records.

It answers 500, 429 (Retry-After: 1) or "late" (200 only after the sender's
timeout) for a ``fail_rate`` share of requests, and records every request
with what it answered, so a test can tell what the sender counted as
delivered (the first 200 in time per delivery id) from repeats.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from services.orchestrator.core.webhooks import verify_signature


@dataclass
class Receipt:
    delivery_id: str
    event_type: str
    body: dict
    # What the receiver answered: 200, 500, 429, or "late" (answered 200 after the sender gave up).
    answer: int | str
    at: float


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that checks signatures and fails on purpose."""

    secret: str = ""
    fail_rate: float = 0.0
    always_fail: bool = False
    rng: random.Random = field(default_factory=lambda: random.Random(20240607))
    receipts: list[Receipt] = field(default_factory=list)
    bad_signatures: int = 0
    concurrent: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    # The sender's timeout: a "late" answer comes this long after it gave up.
    timeout_s: float = 0.3

    def answer(self) -> int | str:
        with self.lock:
            if self.always_fail:
                return 500
            r = self.rng.random()
        if r < self.fail_rate * 0.5:
            return 500
        if r < self.fail_rate * 0.75:
            return 429
        if r < self.fail_rate:
            return "late"
        return 200

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.concurrent += 1
            self.peak = max(self.peak, self.concurrent)
        counted = True
        try:
            length = int(request.headers.get("Content-Length", "0"))
            raw = request.rfile.read(length)
            if len(raw) < length:
                return  # the sender went away mid-request (it stopped, or gave up): nothing to judge
            if not verify_signature(self.secret, request.headers.get("X-Llmesh-Signature", ""), raw):
                with self.lock:
                    self.bad_signatures += 1
                self._reply(request, 401)
                return
            answer = self.answer()
            with self.lock:
                self.receipts.append(Receipt(request.headers["X-Llmesh-Delivery"], request.headers["X-Llmesh-Event"],
                                             json.loads(raw), answer, time.monotonic()))
            if answer == "late":
                # Counted while the sender still waits; no longer once it gave up (a while before it does,
                # so a slow start of this thread does not count one request twice).
                time.sleep(max(0.0, self.timeout_s - 0.1))
                with self.lock:
                    self.concurrent -= 1
                    counted = False
                time.sleep(0.4)
                self._reply(request, 200)
            elif answer == 429:
                self._reply(request, 429, {"Retry-After": "1"})
            else:
                self._reply(request, int(answer))
        finally:
            if counted:
                with self.lock:
                    self.concurrent -= 1

    @staticmethod
    def _reply(request: http.server.BaseHTTPRequestHandler, status: int, headers: dict | None = None) -> None:
        with contextlib.suppress(OSError):  # the sender gave up on a late answer
            request.send_response(status)
            for name, value in (headers or {}).items():
                request.send_header(name, value)
            request.send_header("Content-Length", "0")
            request.end_headers()

    def delivered(self) -> dict[str, Receipt]:
        """The first answer of 200 in time, per delivery id (what the sender counted as delivered)."""
        with self.lock:
            out: dict[str, Receipt] = {}
            for receipt in self.receipts:
                if receipt.answer == 200:
                    out.setdefault(receipt.delivery_id, receipt)
            return out


@contextlib.contextmanager
def receiving(receiver: Receiver, port: int = 0) -> Iterator[Receiver]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            receiver.handle(self)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
