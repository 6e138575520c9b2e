"""The broadcasting thread for transactions already written ahead.

Under automine a node answers ``eth_sendRawTransaction`` for a batch only once it has mined
the one before (~25 ms for 500 transfers); over the internet each send costs a round trip
plus the upload of ~95 kB. Sent from the engine's own thread, that time is lost to
everything else: polling receipts, writing the ledger, measuring and signing the next
window. The Broadcaster sends on a connection of its own while the engine goes on.

It sends what it is given in nonce order, one unit at a time: a transaction alone, or two
at consecutive nonces, which the engine's send puts in one JSON-RPC request. To a node
that builds a block when a transaction arrives (Anvil's automine) the later nonce goes
first: the node holds it for the gap below, and the earlier one makes both ready at the
same moment, so the two are mined in one block instead of one each. Elsewhere the earlier
goes first, as always (a node with a busy pool, or a payer with an EIP-7702 delegation, may
refuse a nonce that arrives before the one below it). The engine pairs two only when they
fit one block together: under automine a node mines what is ready, as much as fits a
block, and leaves the rest for the next arrival; two that do not fit, sent last, would
leave one in the pool for good.

It touches neither the ledger nor the log. Every outcome goes back to the engine's thread,
which handles it exactly as if it had sent the transaction itself. After the first failure
no unit starts: the rest comes back as ``NotSent``, so that the engine handles the failure
(which may stop the run) before it sends the rest itself. Only the later nonce of the
failed one's own pair can have gone out beside it: written ahead like every other, it is
settled by the next run if this one stops. A node that refuses a later nonce arriving
first ("nonce too high") gets it again from the engine's next poll, and no more pairs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
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
# Raw transactions in nonce order (one or two) -> the outcome of each in the same order:
# an exception for one that was refused or not sent; raises when the request as a whole
# failed (every one of them gets that error).
Send = Callable[[Sequence[str]], Sequence[object]]


THREAD_NAME = "disburser-broadcast"


class Broadcaster:
    def __init__(self, send: Send, on_close: Callable[[], None] = lambda: None) -> None:
        """``send``: on a connection of its own; given one raw transaction or two."""
        self._send = send
        self._on_close = on_close
        self._todo: queue.SimpleQueue[tuple[Outgoing, ...] | None] = queue.SimpleQueue()
        # A unit's outcomes go back together: one results() call never takes half a pair.
        self._done: queue.SimpleQueue[list[Result]] = queue.SimpleQueue()
        self._halt = threading.Event()
        # Handed over and not yet handed back, by tx id. The engine's thread only.
        self.outstanding: dict[int, Outgoing] = {}
        self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def put(self, *unit: Outgoing) -> None:
        """One transaction, or two at consecutive nonces sent together (see above)."""
        assert len(unit) == 1 or (len(unit) == 2 and unit[1].nonce == unit[0].nonce + 1)
        for item in unit:
            self.outstanding[item.tx_id] = item
        self._todo.put(unit)

    def _loop(self) -> None:
        while (unit := self._todo.get()) is not None:
            if self._halt.is_set():
                self._done.put([(item, NotSent()) for item in unit])
                continue
            try:
                got = list(self._send([item.raw for item in unit]))
                assert len(got) == len(unit), "one outcome per transaction"
            except BaseException as e:  # noqa: BLE001 - every outcome goes to the engine
                self._halt.set()
                self._done.put([(item, e) for item in unit])
                continue
            errors = [r if isinstance(r, BaseException) else None for r in got]
            if any(errors):
                self._halt.set()  # before the outcomes: results() then waits for the rest
            self._done.put(list(zip(unit, errors, strict=True)))

    def results(self, wait: float | None = None) -> list[Result]:
        """What has finished, in nonce order. ``wait``: block up to that long for the first
        when something is outstanding. When what it took holds a failure, waits until
        everything is back (the rest comes back NotSent at once)."""
        out: list[Result] = []
        if wait is not None and self.outstanding:
            try:
                out += self._done.get(timeout=wait)
            except queue.Empty:
                return out
        while True:
            try:
                out += self._done.get_nowait()
            except queue.Empty:
                break
        for item, _ in out:
            del self.outstanding[item.tx_id]
        if self._halt.is_set() and any(e is not None for _, e in out):
            while self.outstanding:
                unit = self._done.get()
                for item, _ in unit:
                    del self.outstanding[item.tx_id]
                out += unit
        return out

    def resume(self) -> None:
        """After the engine has handled a failure and sent the held-back rest itself."""
        assert not self.outstanding
        self._halt.clear()

    def close(self) -> None:
        """Send nothing more (what is queued stays written ahead for the next run) and
        stop the thread. A send already on the wire is waited for, retries included: once
        the run is over (and its runner lock released) nothing may reach the node from it."""
        # A second Ctrl-C while a send is on the wire does not cut this short (the run's
        # lock would be released with a send still going out); it is raised after.
        interrupted: KeyboardInterrupt | None = None
        stopping = False
        while not stopping:
            try:
                self._halt.set()
                self._todo.put(None)  # a second None, after an interrupt here, is unread
                stopping = True
            except KeyboardInterrupt as e:
                interrupted = e
        while self._thread.is_alive():
            try:
                self._thread.join()
            except KeyboardInterrupt as e:
                interrupted = e
        self._on_close()
        if interrupted is not None:
            raise interrupted
