"""The broadcasting threads on their own: order, a failure halts them, close sends nothing
more; with two lanes, two sends on the wire at once and at most one after a failure.
Its use by the send loop is in test_sender_decisions.py (decisions) and in every batch-mode
integration, fault and crash test (real Anvil)."""

from __future__ import annotations

import threading
import time

from disburser import chain as ch
from disburser.broadcast import Broadcaster, NotSent, Outgoing


class Node:
    """Records what arrives; ``refuse`` maps raw bytes to the error they get; ``gate``
    holds each send until it is set."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.refuse: dict[str, Exception] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a send has started

    def send(self, raw: str) -> str:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        if raw in self.refuse:
            raise self.refuse[raw]
        self.sent.append(raw)
        return "0x"


def _item(i: int, last: bool = False, alongside: bool = True) -> Outgoing:
    return Outgoing(tx_id=i, nonce=i, raw=f"0x{i:02x}", tx_hash=f"0xh{i}", last_of_window=last,
                    alongside=alongside)


def _all(b: Broadcaster) -> list[tuple[int, BaseException | None]]:
    out: list[tuple[int, BaseException | None]] = []
    for _ in range(100):
        if not b.outstanding:
            return out
        out += [(item.tx_id, e) for item, e in b.results(wait=0.5)]
    raise AssertionError(f"still outstanding after 50 s: {sorted(b.outstanding)}")


def test_sends_in_order_and_hands_every_outcome_back() -> None:
    node = Node()
    b = Broadcaster(node.send)
    for i in range(5):
        b.put(_item(i))
    assert _all(b) == [(i, None) for i in range(5)]
    assert node.sent == [f"0x{i:02x}" for i in range(5)]
    assert b.outstanding == {}
    b.close()


def test_after_a_failure_nothing_more_is_sent_until_resumed() -> None:
    node = Node()
    refusal = ch.NodeError("txpool is full")
    node.refuse["0x02"] = refusal
    b = Broadcaster(node.send)
    for i in range(5):
        b.put(_item(i))
    got = _all(b)
    assert [i for i, _ in got] == [0, 1, 2, 3, 4]
    assert [e for _, e in got][:3] == [None, None, refusal]
    assert all(isinstance(e, NotSent) for _, e in got[3:])
    assert node.sent == ["0x00", "0x01"]  # nothing after the refused nonce went out
    b.resume()
    b.put(_item(5))
    assert _all(b) == [(5, None)]
    assert node.sent == ["0x00", "0x01", "0x05"]
    b.close()


def test_results_without_wait_do_not_block_and_outstanding_counts_what_is_on_the_way() -> None:
    node = Node()
    node.gate.clear()
    b = Broadcaster(node.send)
    b.put(_item(0))
    b.put(_item(1))
    assert b.results() == []
    assert b.results(wait=0.01) == []
    assert set(b.outstanding) == {0, 1}
    node.gate.set()
    assert _all(b) == [(0, None), (1, None)]
    b.close()


def test_close_waits_for_the_send_on_the_wire_and_sends_nothing_still_queued() -> None:
    node = Node()
    node.gate.clear()
    closed: list[bool] = []
    b = Broadcaster(node.send, on_close=lambda: closed.append(True))
    for i in range(3):
        b.put(_item(i))
    assert node.entered.wait(60)  # 0x00 is on the wire, held at the gate
    closer = threading.Thread(target=b.close)
    closer.start()
    for _ in range(6000):
        if b._halt.is_set():
            break
        time.sleep(0.01)
    assert b._halt.is_set()
    closer.join(0.1)
    assert closer.is_alive()  # close waits for the send on the wire
    node.gate.set()
    closer.join(60)
    assert not closer.is_alive() and not any(t.is_alive() for t in b._threads)
    assert node.sent == ["0x00"]  # 0x01 and 0x02 stay written ahead only
    assert closed == [True]


class Counting(Node):
    """Counts the sends on the wire at once; each stays there ``_on_wire`` long (20 ms)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_wire = 0
        self.most_on_wire = 0
        self.lock = threading.Lock()

    def _on_wire(self, count: int) -> None:
        time.sleep(0.02)

    def send(self, raw: str) -> str:
        with self.lock:
            self.on_wire += 1
            self.most_on_wire = max(self.most_on_wire, self.on_wire)
            count = self.on_wire
        try:
            self._on_wire(count)
            return super().send(raw)
        finally:
            with self.lock:
                self.on_wire -= 1


class TwoLaneNode(Counting):
    """Holds every send until two are on the wire at once (or 60 s pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.both = threading.Event()

    def _on_wire(self, count: int) -> None:
        if count == 2:
            self.both.set()
        self.both.wait(60)


def test_two_lanes_have_two_sends_on_the_wire_and_hand_every_outcome_back() -> None:
    node = TwoLaneNode()
    b = Broadcaster(node.send, node.send)
    for i in range(6):
        b.put(_item(i))
    got = _all(b)
    assert sorted(got, key=lambda g: g[0]) == [(i, None) for i in range(6)]
    assert node.most_on_wire == 2
    assert sorted(node.sent) == [f"0x{i:02x}" for i in range(6)]
    b.close()


def test_two_lanes_send_one_at_a_time_what_may_not_go_alongside() -> None:
    """Transactions that do not fit one block together: never two on the wire, in order
    (under automine the second could be left in the pool for good)."""
    node = Counting()
    b = Broadcaster(node.send, node.send)
    for i in range(6):
        b.put(_item(i, alongside=False))
    assert _all(b) == [(i, None) for i in range(6)]
    assert node.most_on_wire == 1
    assert node.sent == [f"0x{i:02x}" for i in range(6)]
    b.close()


class SlowFailure(Node):
    """Nonce 0 hangs until released, then fails (a send retried for long, then refused);
    the others go through at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.first_sent = threading.Event()
        self.refusal = ch.NodeError("txpool is full")

    def send(self, raw: str) -> str:
        if raw == "0x00":
            assert self.release.wait(60), "the test never released nonce 0"
            raise self.refusal
        out = super().send(raw)
        self.first_sent.set()
        return out


def test_with_two_lanes_a_failure_lets_out_only_the_send_already_on_the_wire() -> None:
    """While nonce 0 hangs on one lane, the other sends nonce 1 and then waits: nothing
    further than one past an unanswered send. Nonce 0 fails: 2 and later come back
    NotSent, never sent."""
    node = SlowFailure()
    b = Broadcaster(node.send, node.send)
    for i in range(5):
        b.put(_item(i))
    assert node.first_sent.wait(60)
    time.sleep(0.2)  # time in which a lane not held back would send 2, 3 and 4
    assert node.sent == ["0x01"]
    node.release.set()
    got = dict(_all(b))
    assert got[0] is node.refusal and got[1] is None
    assert all(isinstance(got[i], NotSent) for i in (2, 3, 4))
    assert node.sent == ["0x01"]
    b.resume()
    b.put(_item(5))
    b.put(_item(6))
    assert sorted(_all(b), key=lambda g: g[0]) == [(5, None), (6, None)]
    assert node.sent[1:] in (["0x05", "0x06"], ["0x06", "0x05"])
    b.close()
