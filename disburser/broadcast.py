"""Broadcasting threads for transactions already written ahead.

Under automine a node answers ``eth_sendRawTransaction`` for a batch only once it has mined
the one before (~25 ms for 500 transfers); over the internet each send costs a round trip
plus the upload of ~95 kB. Sent from the engine's own thread, that time is lost to
everything else: polling receipts, writing the ledger, measuring and signing the next
window. The Broadcaster sends on connections of its own while the engine goes on.

It has one or more lanes: a thread and a connection each, all taking the next transaction
from one queue in nonce order. With two, the next batch is on its way while the node is
still taking the one before, so both are in its pool when it builds the next block (on
automine one batch a block becomes two; over the internet two uploads overlap). A later
nonce may reach the node a moment before an earlier one; most nodes keep it until the gap
is filled (see the end for one that does not). A transaction goes out beside the one
before it only when the engine marks it ``alongside``: when both fit one block together.
Under automine a node mines what is ready when a transaction arrives, as much as fits a
block, and leaves the rest for the next arrival: two that do not fit together, sent last,
would leave one in the pool for good.

It touches neither the ledger nor the log. Every outcome goes back to the engine's thread,
which handles it exactly as if it had sent the transaction itself. After the first failure
no send that had not passed its lane's gate starts: the rest comes back as ``NotSent``, so
that the engine handles the failure (which may stop the run) before it sends the rest
itself. Only a send another lane had already let through (at most ``lanes - 1`` of them)
can still go out: each is written ahead like every other, and a run that stops leaves it
for the next to settle. A node that keeps no nonce gaps (Hardhat on automine) refuses a
later nonce that arrives first ("nonce too high"); the engine sends it again and goes one
at a time from then on.
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
    # May be on the wire while the send before it is unanswered: only where both fit one
    # block together (see the module's docstring).
    alongside: bool = False


class NotSent(Exception):
    """Held back after an earlier send failed: the engine sends it itself."""


Result = tuple[Outgoing, BaseException | None]


THREAD_NAME = "disburser-broadcast"


class Broadcaster:
    def __init__(self, *sends: Callable[[str], object],
                 on_close: Callable[[], None] = lambda: None) -> None:
        """``sends``: one per lane, each on a connection of its own."""
        assert sends, "a broadcaster needs a lane"
        self._lanes = len(sends)
        self._on_close = on_close
        self._todo: queue.SimpleQueue[tuple[int, Outgoing] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._halt = threading.Event()
        # Handed over and not yet handed back, by tx id. The engine's thread only.
        self.outstanding: dict[int, Outgoing] = {}
        # Sends are numbered in the order they were put. A lane starts send s only once
        # every send before s - (lanes - 1) went out (before s, unless s goes alongside):
        # while one is unanswered, at most lanes - 1 later ones are on the wire, and none
        # after a failure.
        self._next = 0  # the number of the next put (the engine's thread only)
        self._cv = threading.Condition()
        self._low = 0  # the lowest number not yet sent successfully
        self._ok: set[int] = set()  # numbers above _low sent successfully
        self._threads = [threading.Thread(target=self._loop, args=(send,), name=THREAD_NAME,
                                          daemon=True) for send in sends]
        for t in self._threads:
            t.start()

    def put(self, item: Outgoing) -> None:
        self.outstanding[item.tx_id] = item
        self._todo.put((self._next, item))
        self._next += 1

    def _loop(self, send: Callable[[str], object]) -> None:
        while (entry := self._todo.get()) is not None:
            seq, item = entry
            after = seq - (self._lanes - 1) if item.alongside else seq
            with self._cv:
                while not self._halt.is_set() and self._low < after:
                    self._cv.wait()
                halted = self._halt.is_set()
            if halted:
                self._done.put((item, NotSent()))
                continue
            try:
                send(item.raw)
            except BaseException as e:  # noqa: BLE001 - every outcome goes to the engine
                with self._cv:
                    self._halt.set()
                    self._cv.notify_all()
                self._done.put((item, e))
            else:
                with self._cv:
                    self._ok.add(seq)
                    while self._low in self._ok:
                        self._ok.discard(self._low)
                        self._low += 1
                    self._cv.notify_all()
                self._done.put((item, None))

    def results(self, wait: float | None = None) -> list[Result]:
        """What has finished, in the order it finished (lanes may finish out of nonce
        order). ``wait``: block up to that long for the first when something is
        outstanding. When what it took holds a failure, waits until everything is back
        (the rest comes back NotSent at once; only sends already on the wire are waited
        for). A call after the one that took the failure may return only a send that
        finished later."""
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
        with self._cv:
            # Everything put so far is settled by the engine: numbering starts afresh.
            self._low, self._ok = self._next, set()
            self._halt.clear()

    def close(self) -> None:
        """Send nothing more (what is queued stays written ahead for the next run) and
        stop the threads. Sends already on the wire are waited for, retries included: once
        the run is over (and its runner lock released) nothing may reach the node from it."""
        with self._cv:
            self._halt.set()
            self._cv.notify_all()
        for _ in self._threads:
            self._todo.put(None)
        # A second Ctrl-C while a send is on the wire does not cut this wait short (the
        # run's lock would be released with a send still going out); it is raised after.
        interrupted: KeyboardInterrupt | None = None
        for t in self._threads:
            while t.is_alive():
                try:
                    t.join()
                except KeyboardInterrupt as e:
                    interrupted = e
        self._on_close()
        if interrupted is not None:
            raise interrupted
