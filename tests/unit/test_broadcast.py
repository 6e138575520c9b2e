"""The broadcasting thread on its own: order, pairs handed to one send and back together,
a failure halts it, close sends nothing more (the order on the wire is the send's: see
test_sender_decisions.py). Its use by the send loop is in
test_sender_decisions.py (decisions) and in every batch-mode integration, fault and crash
test (real Anvil)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from disburser import chain as ch
from disburser.broadcast import Broadcaster, NotSent, Outgoing


class Node:
    """Records each request (the raw bytes it carried, in order) and what it accepted;
    ``refuse`` maps raw bytes to the error they get; ``gate`` holds each request until it
    is set; ``fail_request`` makes the next request fail as a whole."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []
        self.sent: list[str] = []
        self.refuse: dict[str, Exception] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a request has started
        self.fail_request: Exception | None = None

    def send(self, raws: Sequence[str]) -> list[object]:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        self.requests.append(list(raws))
        if self.fail_request is not None:
            raise self.fail_request
        out: list[object] = []
        for raw in raws:
            if raw in self.refuse:
                out.append(self.refuse[raw])
            else:
                self.sent.append(raw)
                out.append("0x")
        return out


def _item(i: int, last: bool = False) -> Outgoing:
    return Outgoing(tx_id=i, nonce=i, raw=f"0x{i:02x}", tx_hash=f"0xh{i}", last_of_window=last)


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
    assert node.requests == [[f"0x{i:02x}"] for i in range(5)]
    assert b.outstanding == {}
    b.close()


def test_a_pair_goes_to_one_send_and_comes_back_in_nonce_order() -> None:
    node = Node()
    b = Broadcaster(node.send)
    b.put(_item(0))
    b.put(_item(1), _item(2))
    b.put(_item(3), _item(4))
    assert _all(b) == [(i, None) for i in range(5)]
    assert node.requests == [["0x00"], ["0x01", "0x02"], ["0x03", "0x04"]]
    b.close()


def test_a_pairs_outcomes_come_back_together() -> None:
    """One results() call never takes half a pair: the engine would judge the second's
    refusal against a ledger that a poll had changed in between."""
    node = Node()
    node.refuse["0x01"] = ch.NonceTooHigh("nonce too high")
    b = Broadcaster(node.send)
    b.put(_item(0), _item(1))
    for _ in range(6000):
        if b._done.qsize():
            break
        time.sleep(0.01)
    time.sleep(0.05)  # time in which a second entry would arrive
    assert b._done.qsize() == 1
    got = b.results()
    assert [(item.tx_id, e) for item, e in got] == [(0, None), (1, node.refuse["0x01"])]
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


def test_a_failure_in_a_pair_lets_out_only_its_later_nonce() -> None:
    """The earlier nonce of a pair is refused: the later one went out beside it (the send
    put both in one request); the next pair comes back NotSent, never sent."""
    node = Node()
    refusal = ch.NodeError("txpool is full")
    node.refuse["0x00"] = refusal
    b = Broadcaster(node.send)
    b.put(_item(0), _item(1))
    b.put(_item(2), _item(3))
    got = _all(b)
    assert got[:2] == [(0, refusal), (1, None)]
    assert [i for i, _ in got[2:]] == [2, 3] and all(isinstance(e, NotSent) for _, e in got[2:])
    assert node.requests == [["0x00", "0x01"]]
    b.close()


def test_a_pair_whose_request_fails_as_a_whole_gets_the_error_for_both() -> None:
    node = Node()
    lost = ch.RpcError("node at http://127.0.0.1:1 unreachable after 9 tries")
    node.fail_request = lost
    b = Broadcaster(node.send)
    b.put(_item(0), _item(1))
    b.put(_item(2))
    got = _all(b)
    assert got[:2] == [(0, lost), (1, lost)] and isinstance(got[2][1], NotSent)
    assert node.requests == [["0x00", "0x01"]]
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
    assert not closer.is_alive() and not b._thread.is_alive()
    assert node.sent == ["0x00"]  # 0x01 and 0x02 stay written ahead only
    assert closed == [True]
