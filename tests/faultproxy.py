"""A JSON-RPC fault proxy for tests: a loopback HTTP server that forwards requests to a node
and, for a seeded share of them, misbehaves the way real RPC providers do.

Faults (each with its own share of requests):

- ``reset``: the connection is dropped before anything is forwarded.
- ``http429`` / ``http502``: a rate-limit or gateway error, nothing forwarded.
- ``truncate``: forwarded, then half the response body and a dropped connection.
- ``drop_response``: forwarded (the node executes it), then the connection is dropped
  without an answer. On ``eth_sendRawTransaction`` this is the ambiguous broadcast: the
  node has the transaction, the client does not know it.
- ``error_after``: forwarded, then HTTP 502 instead of the node's answer (ambiguous too).
- ``delay``: held ``delay`` seconds, then forwarded; a client with a shorter timeout gives
  up and retries while the first copy still reaches the node.
- ``limit_element``: the first request of a JSON-RPC batch of two or more is answered with
  a rate-limit error inside a 200 answer and not forwarded; the rest are forwarded
  (providers throttle a batch element by element). Other requests never draw it.

``only`` restricts a fault to some JSON-RPC methods (a batch counts as each of its methods).
``first`` forces a fault on the first n requests it applies to (a fault that must happen,
whatever the timing); ``limit`` caps the number of faults. Other faults are drawn from
``random.Random(seed)`` in arrival order: the mix is reproducible for one client, although
how many polls a run makes (so which request draws what) depends on timing.

Every request that parses as JSON is kept in ``requests``, in arrival order.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("reset", "http429", "http502", "truncate", "drop_response", "error_after", "delay",
          "limit_element")


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, rates: Mapping[str, float] | None = None,
                 only: Mapping[str, Iterable[str]] | None = None, delay: float = 1.0,
                 first: Mapping[str, int] | None = None, limit: int | None = None) -> None:
        unknown = (set(rates or {}) | set(first or {})) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        self.upstream = upstream
        self.rates = dict(rates or {})
        self.only = {k: set(v) for k, v in (only or {}).items()}
        self.delay = delay
        self.first = dict(first or {})
        self.limit = limit
        self.enabled = True
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()  # "fault:method" and "forwarded:method"
        self.faults = 0
        self.requests: list[Any] = []
        self.limited: list[Any] = []  # the requests ``limit_element`` answered
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy._handle(self, body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, fault: str, method: str | None = None) -> int:
        return sum(n for k, n in self.stats.items()
                   if k.split(":")[0] == fault and (method is None or k.endswith(":" + method)))

    # --- internals ---------------------------------------------------------------------

    def _choose(self, methods: list[str], *, batch_of: int = 0) -> str | None:
        with self._lock:
            if not self.enabled:
                return None
            if self.limit is not None and self.faults >= self.limit:
                return None
            for fault in FAULTS:
                allowed = self.only.get(fault)
                if allowed is not None and not allowed.intersection(methods):
                    continue
                if fault == "limit_element" and batch_of < 2:
                    continue
                if self.first.get(fault, 0) > 0:
                    self.first[fault] -= 1
                    self.faults += 1
                    return fault
                rate = self.rates.get(fault, 0.0)
                if rate and self._rng.random() < rate:
                    self.faults += 1
                    return fault
            return None

    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        else:
            with self._lock:
                self.requests.append(doc)
        calls = doc if isinstance(doc, list) else [doc]
        methods = [str(c.get("method")) for c in calls if isinstance(c, dict)]
        fault = self._choose(methods, batch_of=len(calls) if isinstance(doc, list) else 0)
        tag = "+".join(sorted(set(methods))) or "?"
        if fault is not None:
            self.stats[f"{fault}:{tag}"] += 1
        if fault == "reset":
            return _reset(h)
        if fault in ("http429", "http502"):
            return _reply(h, 429 if fault == "http429" else 502, b"busy")
        if fault == "delay":
            time.sleep(self.delay)
        if fault == "limit_element" and isinstance(calls[0], dict):
            return _reply(h, 200, self._limit_first(calls))
        answer = self._forward(body)
        self.stats[f"forwarded:{tag}"] += 1
        if fault == "drop_response":
            return _reset(h)
        if fault == "error_after":
            return _reply(h, 502, b"bad gateway")
        if fault == "truncate":
            return _reply(h, 200, answer, truncate=True)
        _reply(h, 200, answer)

    def _limit_first(self, calls: list[Any]) -> bytes:
        with self._lock:
            self.limited.append(calls[0])
        limited = {"jsonrpc": "2.0", "id": calls[0].get("id"),
                   "error": {"code": -32005, "message": "rate limit exceeded"}}
        rest = json.loads(self._forward(json.dumps(calls[1:]).encode()))
        return json.dumps([limited, *rest]).encode()

    def _forward(self, body: bytes) -> bytes:
        req = urllib.request.Request(self.upstream, data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            data: bytes = r.read()
            return data


def _reply(h: BaseHTTPRequestHandler, status: int, body: bytes, *, truncate: bool = False) -> None:
    try:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if truncate:
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            _reset(h)
            return
        h.wfile.write(body)
    except OSError:  # the client gave up (it timed out): nothing to answer
        h.close_connection = True


def _reset(h: BaseHTTPRequestHandler) -> None:
    """Drop the connection with a TCP reset, as a crashed load balancer does."""
    h.close_connection = True
    try:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
    except OSError:
        pass
