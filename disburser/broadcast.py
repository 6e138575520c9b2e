"""A broadcasting thread for transactions already written ahead.

Under automine a node answers ``eth_sendRawTransaction`` for a batch only once it has mined
the one before (~25 ms for 500 transfers); over the internet each send costs a round trip
plus the upload of ~95 kB. Sent from the engine's own thread, that time is lost to
everything else: polling receipts, writing the ledger, measuring and signing the next
window. The Broadcaster sends on a connection of its own, in the order it was given, while
the engine goes on.

It touches neither the ledger nor the log. Every outcome goes back to the engine's thread,
which handles it exactly as if it had sent the transaction itself. After the first failure
it sends nothing more and hands the rest back as ``NotSent``, so that the engine handles the
failure (which may stop the run) before any later nonce goes out, as when it sends in
order itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Outgoing:
    tx_id: int
    nonce: int
    raw: str
    tx_hash: str
    last_of_window: bool = False


class NotSent(Exception):
    """Held back after an earlier send failed: the engine sends it itself."""


Result = tuple[Outgoing, BaseException | None]


class Broadcaster:
    def __init__(self, send: Callable[[str], object],
                 on_close: Callable[[], None] = lambda: None) -> None:
        self._send = send
        self._on_close = on_close
        self._todo: queue.SimpleQueue[Outgoing | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._halt = threading.Event()
        # Handed over and not yet handed back, by tx id. The engine's thread only.
        self.outstanding: dict[int, Outgoing] = {}
        self._thread = threading.Thread(target=self._loop, name="disburser-broadcast",
                                        daemon=True)
        self._thread.start()

    def put(self, item: Outgoing) -> None:
        self.outstanding[item.tx_id] = item
        self._todo.put(item)

    def _loop(self) -> None:
        while (item := self._todo.get()) is not None:
            if self._halt.is_set():
                self._done.put((item, NotSent()))
                continue
            try:
                self._send(item.raw)
            except BaseException as e:  # noqa: BLE001 - every outcome goes to the engine
                self._halt.set()
                self._done.put((item, e))
            else:
                self._done.put((item, None))

    def results(self, wait: float | None = None) -> list[Result]:
        """What has finished, in order. ``wait``: block up to that long for the first when
        something is outstanding. After a failure, waits until everything is back (the
        rest comes back NotSent at once; only a send already on the wire is waited for)."""
        out: list[Result] = []
        if wait is not None and self.outstanding:
            try:
                out.append(self._done.get(timeout=wait))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        for item, _ in out:
            del self.outstanding[item.tx_id]
        if self._halt.is_set() and any(e is not None for _, e in out):
            while self.outstanding:
                item, e = self._done.get()
                del self.outstanding[item.tx_id]
                out.append((item, e))
        return out

    def resume(self) -> None:
        """After the engine has handled a failure and sent the held-back rest itself."""
        assert not self.outstanding
        self._halt.clear()

    def close(self) -> None:
        """Send nothing more (what is queued stays written ahead for the next run) and
        stop the thread. A send already on the wire is waited for, retries included: once
        the run is over (and its runner lock released) nothing may reach the node from it."""
        self._halt.set()
        self._todo.put(None)
        self._thread.join()
        self._on_close()
