"""Decisions of the send loop driven by a fake chain (pure logic; the integration and fault
suites run the same loop against a real Anvil)."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from disburser import chain as ch
from disburser import policy
from disburser.broadcast import THREAD_NAME, Broadcaster, NotSent, Outgoing
from disburser.devnet import PAYER_KEY
from disburser.domain import Manifest, Mode, Payment, PaymentStatus
from disburser.errors import FailClosed, RpcError, SettingsError
from disburser.keys import Signer
from disburser.ledger import HISTORY_CHECKED, PAID_BY_TRANSFER, Ledger, TxRow
from disburser.manifest import make_manifest
from disburser.sender import (
    METER_TRIES,
    NONCE_BEHIND_WAIT,
    WINDOW,
    SendConfig,
    Sender,
    _sender_of,
)

TOKEN = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"
BATCH = "0x9fE46736679d2D9a65F0992F2272dE9f3c7fa6e0"
TO = ["0x" + f"{i + 1:040x}" for i in range(5)]


class FakeChain:
    url = "http://127.0.0.1:1/secret-key"

    def __init__(self) -> None:
        self.refuse: ch.NodeError | None = None
        self.allowance_left = 25
        self.sent: list[str] = []
        self.pool_holder: str | None = None  # the hash the pool holds at any nonce

    def find_pending_tx(self, sender: str, nonce: int) -> str | None:
        return self.pool_holder

    def send_raw(self, raw: str) -> str:
        if self.refuse:
            raise self.refuse
        self.sent.append(raw)
        return "0x"

    def paused(self, token: str) -> bool:
        return False

    def blacklisted(self, token: str, who: str) -> bool:
        return False

    def call(self, to: str, data: str, sender: str | None = None) -> bytes:
        # A batch moving more than the allowance fails as a whole, with no culprit.
        amounts = _amounts(data)
        if sum(amounts) > self.allowance_left:
            raise ch.Reverted("execution reverted", 3, b"")
        return b""


def _amounts(data: str) -> list[int]:
    words = [int(data[10 + 64 * i:10 + 64 * (i + 1)], 16) for i in range((len(data) - 10) // 64)]
    n = words[5]
    return words[-n:]


def _sender(tmp_path: Path, chain: FakeChain) -> Sender:
    cfg = SendConfig(mode=Mode.BATCH, chain_id=31337, token=TOKEN, decimals=6,
                     batch_contract=BATCH, confirmations=1, max_in_flight=4, batch_size=10,
                     bump_after_blocks=3, max_fee_wei=100 * 10**9, max_tx_fee_wei=10**18,
                     priority_fee_wei=10**9, poll_interval=0.01, ceiling=10**12)
    return Sender(Ledger(tmp_path / "l.sqlite"), chain, Signer(bytes.fromhex(PAYER_KEY[2:])),  # type: ignore[arg-type]
                  cfg)


def _accepted(s: Sender, n: int) -> Manifest:
    """A manifest of ``n`` payments of 10 base units, accepted into the sender's ledger."""
    pays = [Payment(i, f"u{i}", TO[i], 10) for i in range(n)]
    m = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=s.payer,
                      not_after=2**40, payments=pays)
    s.ledger.accept_manifest(m, ceiling=10**12, signers=[])
    return m


def _sent_direct(tmp_path: Path, n: int, clock: Callable[[], float] | None = None
                 ) -> tuple[Sender, FakeChain, TxRow]:
    """A sender with ``n`` direct transfers written ahead and sent (the node took them):
    the sender, its FakeChain and the first transaction."""
    chain = FakeChain()
    chain.send_raw_many = lambda raws: ["0x"] * len(raws)  # type: ignore[attr-defined]
    chain.head = lambda: ch.Head(1, "0x", 10**9, 30_000_000, 0)  # type: ignore[attr-defined]
    chain.nonce = lambda *_: 0  # type: ignore[attr-defined]
    s = _sender(tmp_path, chain)
    if clock is not None:
        s = Sender(s.ledger, chain, Signer(bytes.fromhex(PAYER_KEY[2:])),  # type: ignore[arg-type]
                   s.cfg, clock=clock)
    m = _accepted(s, n)
    s._sign_and_send_many(kind="direct", root=m.root, to=TOKEN, program="p", items=[
        ("0x", 60_000, [r], 10) for r in s.ledger.queued(m.root)])
    return s, chain, s.ledger.txs(s.payer)[0]


@pytest.mark.parametrize("error", [
    ch.NodeError("tx fee (1.61 ether) exceeds the configured cap (1.00 ether)"),
    ch.NodeError("txpool is full"),
    ch.GasCapExceeded("intrinsic gas too high -- tx.gas_limit > env.cfg.tx_gas_limit_cap"),
])
def test_a_refused_broadcast_stops_the_run_instead_of_waiting_forever(
        tmp_path: Path, error: ch.NodeError) -> None:
    chain = FakeChain()
    chain.refuse = error
    s = _sender(tmp_path, chain)
    with pytest.raises(FailClosed) as e:
        s._broadcast(1, 7, "0xab", "0xhash")
    assert str(e.value) == (f"node refused transaction 0xhash at nonce 7: {error}; nothing more "
                            "is sent. Fix the cause and run `send` again (the same signed bytes "
                            "are sent again, and those of any later transaction already "
                            "signed)")
    assert s.broadcast_any
    # A refused bump leaves the earlier attempt covering the nonce: not fatal.
    s._broadcast(1, 7, "0xab", "0xhash2", others_pending=True)


@pytest.mark.parametrize("error", [ch.AlreadyKnown("already known"),
                                   ch.NonceTooLow("nonce too low"),
                                   ch.Underpriced("replacement transaction underpriced"),
                                   ch.ServerTimeout("request timed out", -32002),
                                   ch.classify(429, "exceeded its compute units per second "
                                               "capacity")])
def test_ambiguous_answers_are_left_to_the_lookup(tmp_path: Path, error: ch.NodeError) -> None:
    chain = FakeChain()
    chain.refuse = error
    _sender(tmp_path, chain)._broadcast(1, 7, "0xab", "0xhash")  # no exception, no re-sign


def test_underpriced_because_another_signer_holds_the_nonce_stops_the_run(
        tmp_path: Path) -> None:
    """Underpriced with an attempt of ours in the pool is the usual case (a re-broadcast of
    an older attempt); with another signer's transaction there it stops the run before a
    bump can replace that transaction without a word."""
    s, chain, t = _sent_direct(tmp_path, 1)
    ours = s.ledger.attempts(t.id or 0)[0].hash
    chain.refuse = ch.Underpriced("replacement transaction underpriced")
    chain.pool_holder = ours.upper().replace("0X", "0x")
    s._broadcast(t.id or 0, t.nonce, "0xab", ours, others_pending=True)
    chain.pool_holder = None  # a fee under the node's floor: nothing of anyone's there
    s._pool_owner_checked.clear()
    s._broadcast(t.id or 0, t.nonce, "0xab", ours, others_pending=True)
    chain.pool_holder = "0x" + "ee" * 32
    # Within LOOKUP_EVERY of the last look at this nonce's pool: not read again (a reorg
    # re-sends every attempt of a nonce, the older ones refused as underpriced).
    s._broadcast(t.id or 0, t.nonce, "0xab", ours, others_pending=True)
    s._pool_owner_checked.clear()
    with pytest.raises(FailClosed) as e:
        s._broadcast(t.id or 0, t.nonce, "0xab", ours, others_pending=True)
    assert str(e.value) == (
        f"payer {s.payer}: nonce {t.nonce} is taken by pending transaction 0x{'ee' * 32}, "
        "which this ledger did not send; its payments stay in flight. Stopping rather than "
        "guessing")


def test_no_culprit_means_no_payment_is_blamed(tmp_path: Path) -> None:
    chain = FakeChain()
    s = _sender(tmp_path, chain)
    m = _accepted(s, 4)
    rows = s.ledger.queued(m.root)
    with pytest.raises(FailClosed, match=r"a batch of 4 payments of 0x[0-9a-f]{64} fails in "
                       r"simulation \(reverted without a reason\) but no single payment does"):
        s._isolate_failure(m.root, rows, b"")
    assert {r.status for r in s.ledger.payments(m.root)} == {"queued"}


@pytest.mark.parametrize("cap, tx_cap, gas, want", [
    (100 * 10**9, 10**18, 16_000_000, 62_500_000_000),  # geth's 1 ETH txfeecap binds
    (100 * 10**9, 10**18, 1_000_000, 100 * 10**9),  # the operator's cap binds
    (10 * 10**9, 10**18, 0, 10 * 10**9),
])
def test_fee_cap_respects_the_node_tx_fee_cap(cap: int, tx_cap: int, gas: int, want: int) -> None:
    assert policy.fee_cap(cap, tx_cap, gas) == want
    assert policy.fee_cap(cap, tx_cap, gas) * gas <= tx_cap


def test_rpc_url_secrets_are_not_shown() -> None:
    assert ch.display_url("https://mainnet.infura.io/v3/0123456789abcdef") == \
        "https://mainnet.infura.io"
    assert ch.display_url("http://user:pw@127.0.0.1:8545/key") == "http://127.0.0.1:8545"




def test_a_failed_batch_broadcast_is_ambiguous_not_fatal(tmp_path: Path) -> None:
    """Several transfers broadcast in one JSON-RPC batch and the whole request fails: each
    is left for the poll to look up and re-send; the run does not stop."""
    chain = FakeChain()

    def send_raw_many(raws: list[str]) -> list[object]:
        raise ch.RpcError("node at http://127.0.0.1:1 unreachable after 9 tries: reset")

    chain.send_raw_many = send_raw_many  # type: ignore[attr-defined]
    chain.head = lambda: ch.Head(1, "0x", 10**9, 30_000_000, 0)  # type: ignore[attr-defined]
    chain.nonce = lambda *_: 0  # type: ignore[attr-defined]
    s = _sender(tmp_path, chain)
    m = _accepted(s, 3)
    rows = s.ledger.queued(m.root)
    s._sign_and_send_many(kind="direct", root=m.root, to=TOKEN, program="p", items=[
        ("0x", 60_000, [r], 10) for r in rows])
    txs = s.ledger.txs(s.payer)
    assert [t.nonce for t in txs] == [0, 1, 2]  # written ahead, consecutive
    assert {p.status for p in s.ledger.payments(m.root)} == {"in_flight"}
    assert s.broadcast_any


def test_our_own_mined_transaction_without_a_receipt_yet_is_not_foreign(tmp_path: Path) -> None:
    """The node's nonce has passed our transaction but its receipt is not served yet (Anvil
    moves the nonce a moment before): the block holds our own hash, so the run waits for the
    next poll instead of stopping; a hash that is not ours still stops it."""
    s, chain, t = _sent_direct(tmp_path, 2)
    atts = s.ledger.attempts(t.id or 0)
    chain.receipts = lambda hashes: {h: None for h in hashes}  # type: ignore[attr-defined]
    chain.nonce = lambda *_: 2  # type: ignore[attr-defined]
    chain.locate_nonce = lambda payer, nonce: (True, atts[0].hash)  # type: ignore[attr-defined]
    s._resolve_used_nonce(t, atts)
    assert s._mined_now == [] and s.ledger.txs(s.payer)[0].status == "pending"
    chain.locate_nonce = lambda payer, nonce: (True, "0x" + "ee" * 32)  # type: ignore[attr-defined]
    with pytest.raises(FailClosed, match=f"nonce 0 was used by transaction 0x{'ee' * 32}, which "
                       "this ledger did not send"):
        s._resolve_used_nonce(t, atts)
    # The nonce went back (a reorg): pending again, not foreign.
    chain.nonce = lambda *_: 0  # type: ignore[attr-defined]
    s._resolve_used_nonce(t, atts)
    # Ours, but the node never serves the receipt: not forever.
    chain.nonce = lambda *_: 2  # type: ignore[attr-defined]
    chain.locate_nonce = lambda payer, nonce: (True, atts[0].hash)  # type: ignore[attr-defined]
    s._receipt_missing_since[t.id or 0] -= 121
    with pytest.raises(FailClosed, match=f"transaction {atts[0].hash} at nonce 0 is in a block but "
                       "the node has served no receipt for it for 120 s"):
        s._resolve_used_nonce(t, atts)


def test_a_used_nonce_whose_block_is_not_served_yet_is_not_foreign(tmp_path: Path) -> None:
    """The state nonce has moved but no block the node serves holds it yet (Anvil serves the
    block a moment after; a load-balanced node may read the nonce from a backend ahead of the
    one serving blocks). It was called a foreign transaction "(not found in recent blocks)"
    and a healthy run stopped with exit 1; reproduced on Anvil by helper-46's race. Now the
    run waits as for a missing receipt, and says what it could not find."""
    now = [1000.0]
    s, chain, t = _sent_direct(tmp_path, 1, clock=lambda: now[0])
    atts = s.ledger.attempts(t.id or 0)
    chain.receipts = lambda hashes: {h: None for h in hashes}  # type: ignore[attr-defined]
    chain.nonce = lambda *_: 1  # type: ignore[attr-defined]
    chain.locate_nonce = lambda payer, nonce: (False, None)  # type: ignore[attr-defined]
    s._resolve_used_nonce(t, atts)
    now[0] += 119
    s._resolve_used_nonce(t, atts)
    assert s._mined_now == [] and s.ledger.txs(s.payer)[0].status == "pending"
    now[0] += 2
    with pytest.raises(FailClosed) as e:
        s._resolve_used_nonce(t, atts)
    assert str(e.value) == (
        f"payer {s.payer}: the chain's nonce passed 0, but for 120 s the node has served "
        "neither a receipt of this ledger's transaction at that nonce nor a block holding it; "
        "its payments stay in flight. Check the node (one behind a load balancer may serve "
        "blocks from a backend that lags) and run `send` again")


def test_a_nonce_used_before_the_blocks_scanned_stops_the_run_at_once(tmp_path: Path) -> None:
    """The head the node serves has the nonce used, and no block of the last 2000 holds it:
    another signer used it long ago (a ledger restored from an old backup). Not a node that
    lags: waiting would only repeat itself on every run."""
    s, chain, t = _sent_direct(tmp_path, 1)
    chain.receipts = lambda hashes: {h: None for h in hashes}  # type: ignore[attr-defined]
    chain.nonce = lambda *_: 1  # type: ignore[attr-defined]
    chain.locate_nonce = lambda payer, nonce: (True, None)  # type: ignore[attr-defined]
    with pytest.raises(FailClosed) as e:
        s._resolve_used_nonce(t, s.ledger.attempts(t.id or 0))
    assert str(e.value) == (
        f"payer {s.payer}: nonce 0 was used by a transaction more than 2000 blocks back, "
        "which this ledger did not send (none of its attempts has a receipt); its payments "
        "stay in flight. Stopping rather than guessing")


def test_the_nonce_is_read_only_when_a_pending_transaction_is_due_for_a_check(
        tmp_path: Path) -> None:
    """A poll reads the chain's nonce (a state read, which waits for the block being mined)
    only when a pending transaction without a receipt needs a decision: not seen in the pool
    for LOOKUP_EVERY seconds. Before that it asks for every pending receipt and waits; a nonce
    a foreign transaction used is still caught, at the first check that is due."""
    now = [1000.0]
    chain = FakeChain()
    chain.send_raw_many = lambda raws: ["0x"] * len(raws)  # type: ignore[attr-defined]
    chain.head = lambda: ch.Head(1, "0x" + "11" * 32, 10**9, 30_000_000, 0)  # type: ignore[attr-defined]
    nonce_reads: list[int] = []
    asked: list[list[str]] = []
    chain_nonce = [0]

    def nonce(*_: Any) -> int:
        nonce_reads.append(1)
        return chain_nonce[0]

    def receipts(hashes: list[str]) -> dict[str, None]:
        asked.append(list(hashes))
        return {h: None for h in hashes}

    chain.nonce = nonce  # type: ignore[attr-defined]
    chain.receipts = receipts  # type: ignore[attr-defined]
    chain.known = lambda hashes: {h: False for h in hashes}  # type: ignore[attr-defined]
    chain.locate_nonce = lambda payer, nonce: (True, "0x" + "ee" * 32)  # type: ignore[attr-defined]
    s = Sender(Ledger(tmp_path / "l.sqlite"), chain,  # type: ignore[arg-type]
               Signer(bytes.fromhex(PAYER_KEY[2:])), _sender(tmp_path, chain).cfg,
               clock=lambda: now[0])
    m = _accepted(s, 2)
    s._sign_and_send_many(kind="direct", root=m.root, to=TOKEN, program="p", items=[
        ("0x", 60_000, [r], 10) for r in s.ledger.queued(m.root)])
    hashes = {a.hash for t in s.ledger.txs(s.payer) for a in s.ledger.attempts(t.id or 0)}
    nonce_reads.clear()
    chain_nonce[0] = 2
    now[0] += 0.5  # both were accepted by the node half a second ago
    s._poll()
    assert nonce_reads == [] and [set(a) for a in asked] == [hashes]
    assert [t.status for t in s.ledger.txs(s.payer)] == ["pending", "pending"]
    now[0] += 1.0  # a check is due: the nonce shows both were used, by someone else
    s._head = None
    s._looked_up.clear()
    with pytest.raises(FailClosed, match=f"nonce 0 was used by transaction 0x{'ee' * 32}, which "
                       "this ledger did not send"):
        s._poll()
    assert nonce_reads  # read this time (and again by the check of the used nonce)


def test_a_chain_nonce_behind_a_final_one_stops_the_run_only_if_it_stays_behind(
        tmp_path: Path) -> None:
    """A node behind a load balancer may answer an old nonce for a moment; a chain rolled
    back below a confirmed transaction stays there. NONCE_BEHIND_WAIT tells them apart."""
    now = [1000.0]
    chain = FakeChain()
    s = Sender(Ledger(tmp_path / "l.sqlite"), chain,  # type: ignore[arg-type]
               Signer(bytes.fromhex(PAYER_KEY[2:])), _sender(tmp_path, chain).cfg,
               clock=lambda: now[0])
    s._check_not_rolled_back(0)  # nothing final yet: any nonce will do
    s._final_nonce = 5
    s._check_not_rolled_back(5)  # behind: the wait begins
    now[0] += NONCE_BEHIND_WAIT - 1
    s._check_not_rolled_back(6)  # caught up: the wait is over
    s._check_not_rolled_back(3)  # behind again: a new wait
    now[0] += NONCE_BEHIND_WAIT - 0.5
    s._check_not_rolled_back(3)
    now[0] += 0.5
    with pytest.raises(FailClosed, match="the chain's nonce went back to 3, at or below nonce "
                       "5 that this ledger holds confirmed at depth 1"):
        s._check_not_rolled_back(3)


def test_a_priced_out_or_overdue_transaction_is_due_for_a_check_though_just_seen(
        tmp_path: Path) -> None:
    """The other two reasons a poll reads the nonce: a transaction priced out by the base
    fee, and the lowest pending one once its bump is due (a bump is never sent without the
    check of the nonce). Neither waits for LOOKUP_EVERY."""
    now = 1000.0
    chain = FakeChain()
    chain.send_raw_many = lambda raws: ["0x"] * len(raws)  # type: ignore[attr-defined]
    chain.head = lambda: ch.Head(1, "0x" + "11" * 32, 10**9, 30_000_000, 0)  # type: ignore[attr-defined]
    chain.nonce = lambda *_: 0  # type: ignore[attr-defined]
    s = Sender(Ledger(tmp_path / "l.sqlite"), chain,  # type: ignore[arg-type]
               Signer(bytes.fromhex(PAYER_KEY[2:])), _sender(tmp_path, chain).cfg,
               clock=lambda: now)
    m = _accepted(s, 2)
    s._sign_and_send_many(kind="direct", root=m.root, to=TOKEN, program="p", items=[
        ("0x", 60_000, [r], 10) for r in s.ledger.queued(m.root)])
    (t0, a0), (t1, a1) = [(t, s.ledger.attempts(t.id or 0)[-1]) for t in s.ledger.txs(s.payer)]
    head = chain.head()
    assert not s._check_due(t0, a0, head, 0, now) and not s._check_due(t1, a1, head, 0, now)
    hot = dataclasses.replace(head, base_fee=int(a1.max_fee) + 1)
    assert s._check_due(t1, a1, hot, 0, now)  # not the lowest, but priced out
    # priced out of the next block: after a full block the base fee rises by an eighth
    full = dataclasses.replace(head, base_fee=int(a1.max_fee) * 8 // 9 + 9,
                               gas_used=head.gas_limit)
    assert full.base_fee <= int(a1.max_fee) and s._check_due(t1, a1, full, 0, now)
    half = dataclasses.replace(full, gas_used=head.gas_limit // 2)  # the base fee stays
    assert not s._check_due(t1, a1, half, 0, now)
    # a chain whose base fee follows other rules (Arbitrum's): the head's own
    s.cfg = dataclasses.replace(s.cfg, chain_id=42161)
    assert not s._check_due(t1, a1, full, 0, now)
    s._lowest_since[t0.id or 0] = head.number  # what a poll at this head records
    later = dataclasses.replace(head, number=head.number + s.cfg.bump_after_blocks)
    assert s._check_due(t0, a0, later, 0, now)  # the lowest, a bump due
    assert not s._check_due(t1, a1, later, 0, now)  # not the lowest: no bump


class ThreadedChain(FakeChain):
    """A FakeChain that gives the broadcasting thread a client (itself), refusing some sends
    by position (a pair counts as two, the later nonce first) and recording which thread
    sent what."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_nth: dict[int, ch.NodeError | RpcError] = {}
        self.calls = 0
        self.by: list[tuple[str, str]] = []  # (thread name, raw) of every accepted send
        self.head = lambda: ch.Head(1, "0x", 10**9, 30_000_000, 0)  # type: ignore[method-assign]
        self.nonce = lambda *_: 0  # type: ignore[attr-defined]

    def for_thread(self) -> ThreadedChain:
        return self

    automine = True  # a pair goes later nonce first, as to Anvil on automine

    def mines_on_arrival(self) -> bool:
        return self.automine

    def send_raw(self, raw: str) -> str:
        self.calls += 1
        if self.calls in self.refuse_nth:
            raise self.refuse_nth[self.calls]
        self.sent.append(raw)
        self.by.append((threading.current_thread().name, raw))
        return "0x"

    def send_raw_many(self, raws: list[str]) -> list[object]:
        """One request: an outcome each, as Transport.batch answers."""
        out: list[object] = []
        for raw in raws:
            try:
                out.append(self.send_raw(raw))
            except (ch.NodeError, RpcError) as e:
                out.append(e)
        return out


MAIN, THREAD = threading.main_thread().name, THREAD_NAME


@pytest.fixture
def threaded(tmp_path: Path) -> Iterator[tuple[ThreadedChain, Sender]]:
    chain = ThreadedChain()
    s = _sender(tmp_path, chain)
    try:
        yield chain, s
    finally:
        if isinstance(s._bcast, Broadcaster):
            s._bcast.close()


def _window(s: Sender, m: Manifest, n: int) -> list[str]:
    """Writes the next ``n`` one-payment batches ahead and hands them to the broadcasting
    thread; the raw bytes of every transaction so far, in nonce order."""
    s._sign_and_send_many(kind="batch", root=m.root, to=BATCH, program="p", one_by_one=True,
                          items=[("0x", 60_000, [r], 10) for r in s.ledger.queued(m.root)[:n]])
    assert isinstance(s._bcast, Broadcaster)
    return [a.raw for t in s.ledger.txs(s.payer) for a in s.ledger.attempts(t.id or 0)]


def test_a_refusal_met_by_the_broadcasting_thread_stops_the_run_before_later_nonces(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """The window goes as two pairs, each later nonce first. Nonce 0 is refused: the run
    stops naming it; nonce 1, which went out beside it, is handled (logged); the second pair
    stays written ahead, never sent."""
    chain, s = threaded
    chain.refuse_nth[2] = ch.NodeError("txpool is full")
    m = _accepted(s, 4)
    raws = _window(s, m, 4)
    assert s.broadcast_any
    with capture_logs() as logs, pytest.raises(FailClosed) as e:
        s._flush_broadcasts()
    tx = s.ledger.txs(s.payer)[0]
    h = s.ledger.attempts(tx.id or 0)[0].hash
    assert str(e.value).startswith(f"node refused transaction {h} at nonce 0: "
                                   "txpool is full; nothing more is sent.")
    assert chain.by == [(THREAD, raws[1])]  # nonces 2 and 3 stay written ahead, never sent
    assert [x["nonce"] for x in logs if x["event"] == "transfer_broadcast"] == [1]
    assert [t.status for t in s.ledger.txs(s.payer)] == ["pending"] * 4


def test_a_refusal_in_a_later_unit_stops_the_run_with_everything_before_it_handled(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """Nonce 3 (the second pair's later nonce, sent first) is refused: nonce 2 went out in
    the same request; nonces 0 and 1 before; nonce 4 (alone) never goes out."""
    chain, s = threaded
    chain.refuse_nth[3] = ch.NodeError("txpool is full")
    m = _accepted(s, 5)
    raws = _window(s, m, 5)
    with capture_logs() as logs, pytest.raises(FailClosed) as e:
        s._flush_broadcasts()
    assert " at nonce 3: txpool is full" in str(e.value)
    assert chain.by == [(THREAD, raws[1]), (THREAD, raws[0]), (THREAD, raws[2])]
    assert [x["nonce"] for x in logs if x["event"] == "transfer_broadcast"] == [0, 1, 2]


def _gated_window(s: Sender, m: Manifest, n: int, node: Any, chain: ThreadedChain
                  ) -> list[str]:
    """Writes ``n`` one-payment batches ahead, handed to the broadcasting thread whose sends
    go to ``node(raw, raws, send)`` (held until the raw bytes are known); the raw bytes in
    nonce order."""
    raws: list[str] = []
    ready = threading.Event()
    send = chain.send_raw

    def gated(raw: str) -> str:
        assert ready.wait(60)
        return node(raw, raws, send)

    chain.send_raw = gated  # type: ignore[method-assign]
    s._sign_and_send_many(kind="batch", root=m.root, to=BATCH, program="p", one_by_one=True,
                          items=[("0x", 60_000, [r], 10) for r in s.ledger.queued(m.root)[:n]])
    raws += [a.raw for t in s.ledger.txs(s.payer) for a in s.ledger.attempts(t.id or 0)]
    ready.set()
    return raws


def _record_units(s: Sender) -> list[list[int]]:
    """The nonces of each unit the engine hands to the broadcasting thread, from now on."""
    s._broadcaster()
    assert isinstance(s._bcast, Broadcaster)
    units: list[list[int]] = []
    real_put = s._bcast.put

    def put(*unit: Outgoing) -> None:
        units.append([o.nonce for o in unit])
        real_put(*unit)

    s._bcast.put = put  # type: ignore[method-assign]
    return units


@pytest.mark.parametrize(("gas", "units", "order"), [(15_000_000, [[0, 1], [2]], [1, 0, 2]),
                                                     (15_000_001, [[0], [1], [2]], [0, 1, 2])])
def test_two_go_together_later_nonce_first_only_if_both_fit_one_block(
        threaded: tuple[ThreadedChain, Sender], gas: int, units: list[list[int]],
        order: list[int]) -> None:
    """Under automine two ready batches that do not fit one block leave one in the pool
    until something else arrives: at the end of a run, for good. Pairs never span
    windows (the next window's first goes alone)."""
    chain, s = threaded
    m = _accepted(s, 3)  # the fake's head: a 30M block
    put = _record_units(s)
    rows = s.ledger.queued(m.root)
    s._sign_and_send_many(kind="batch", root=m.root, to=BATCH, program="p", one_by_one=True,
                          items=[("0x", gas, [r], 10) for r in rows[:2]])
    s._sign_and_send_many(kind="batch", root=m.root, to=BATCH, program="p", one_by_one=True,
                          items=[("0x", gas, [rows[2]], 10)])  # the next window: the same
    s._flush_broadcasts()
    assert put == units
    raws = [a.raw for t in s.ledger.txs(s.payer) for a in s.ledger.attempts(t.id or 0)]
    assert chain.sent == [raws[k] for k in order]


def test_failures_in_a_pair_are_handled_in_nonce_order(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """Nonce 1 is refused (it went first) while nonce 0's answer is lost: the lost one is
    handled first (left to the poll), then the refusal stops the run naming 1."""
    chain, s = threaded
    m = _accepted(s, 3)

    def node(raw: str, raws: list[str], send: Any) -> str:
        if raw == raws[1]:
            raise ch.NodeError("txpool is full")
        raise RpcError("node at http://127.0.0.1:1 unreachable after 9 tries")

    _gated_window(s, m, 3, node, chain)
    with capture_logs() as logs, pytest.raises(FailClosed) as e:
        s._flush_broadcasts()
    assert " at nonce 1: txpool is full" in str(e.value)
    assert [(x["event"], x["nonce"]) for x in logs] == [
        ("transfer_broadcast_unknown", 0), ("transfer_broadcast_refused", 1)]
    assert chain.sent == []  # nonce 2 never went out


def test_a_node_that_keeps_no_nonce_gaps_gets_one_at_a_time_after_refusing_one(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """A node that keeps no nonce gaps (Hardhat on automine) refuses a later nonce that
    arrives first (here first of its pair, as to a node that says it mines on arrival):
    not a refusal that stops the run (the poll sends the stored bytes again), and no pairs
    after."""
    chain, s = threaded
    m = _accepted(s, 4)

    def node(raw: str, raws: list[str], send: Any) -> str:
        if raw == raws[1]:
            raise ch.NonceTooHigh("Nonce too high. Expected nonce to be 0 but got 1. Note "
                                  "that transactions can't be queued when automining.")
        return str(send(raw))

    raws = _gated_window(s, m, 2, node, chain)
    with capture_logs() as logs:
        s._flush_broadcasts()  # no exception
    assert [x["nonce"] for x in logs if x["event"] == "transfer_nonce_gap_refused"] == [1]
    assert chain.sent == [raws[0]]
    assert s._one_at_a_time
    put = _record_units(s)
    s._sign_and_send_many(kind="batch", root=m.root, to=BATCH, program="p", one_by_one=True,
                          items=[("0x", 60_000, [r], 10) for r in s.ledger.queued(m.root)])
    s._flush_broadcasts()
    assert put == [[2], [3]]


TOO_HIGH = "Nonce too high. Expected nonce to be 0 but got 1."


def test_a_batch_refused_for_a_gap_is_sent_again_by_the_next_poll(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """Nonce 1 reached a node that keeps no gaps before nonce 0 could: the poll finds it
    missing and sends the same bytes again, saying why (not as a drop)."""
    chain, s = threaded
    now = [1000.0]
    s.clock = lambda: now[0]
    chain.refuse_nth[1] = ch.classify(-32000, TOO_HIGH)  # nonce 1, sent first of its pair
    m = _accepted(s, 3)
    raws = _window(s, m, 3)
    with capture_logs() as logs:
        s._flush_broadcasts()  # no exception: nonce 0 is pending below it
        assert chain.sent == [raws[0], raws[2]]  # 2 held back, then sent by the engine
        hashes = {a.hash: a.raw for t in s.ledger.txs(s.payer)
                  for a in s.ledger.attempts(t.id or 0)}
        chain.known = lambda hs: {h: hashes[h] in chain.sent for h in hs}  # type: ignore[attr-defined]
        chain.receipts = lambda hs: {h: None for h in hs}  # type: ignore[attr-defined]
        chain.block_hashes = lambda ns: {}  # type: ignore[attr-defined]
        now[0] += 0.01
        s._poll()
    assert chain.sent == [raws[0], raws[2], raws[1]]  # the same bytes, never re-signed
    assert [(x["event"], x["nonce"]) for x in logs if x["event"].startswith(
        ("transfer_nonce_gap", "transfer_resent", "transfer_dropped"))] == [
        ("transfer_nonce_gap_refused", 1), ("transfer_resent_after_gap", 1)]
    assert len(s.ledger.attempts(s.ledger.txs(s.payer)[1].id or 0)) == 1


def test_nonce_too_high_with_nothing_of_ours_below_stops_the_run(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """The chain has not seen nonces the ledger holds done (a node reset): no transaction
    of the ledger's can fill the gap, and re-sending forever would hide it."""
    chain, s = threaded
    m = _accepted(s, 1)
    s._sign_and_send(kind="batch", root=m.root, to=BATCH, data="0x", gas=60_000,
                     rows=s.ledger.queued(m.root), amount=10, program="p")
    tx = s.ledger.txs(s.payer)[0]
    chain.refuse_nth[2] = ch.classify(-32000, TOO_HIGH)
    with pytest.raises(FailClosed) as e:
        s._broadcast(tx.id or 0, tx.nonce, "0xab", "0xhash")
    assert str(e.value) == (
        f"node refused transaction 0xhash at nonce {tx.nonce}: {TOO_HIGH}; the chain's nonce "
        f"for {s.payer} is below what the ledger holds, and no transaction of the ledger's "
        "can fill the gap (was the node reset, or is this another chain?). Nothing more is "
        "sent")


def test_a_windows_broadcast_is_over_only_when_every_send_of_it_is_back(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """The "after_broadcast" point (where the crash tests kill the run) is passed once the
    window's last send is back, not before: nonces 0 and 1 back, 2 on the wire."""
    chain, s = threaded
    m = _accepted(s, 3)
    release = threading.Event()

    def node(raw: str, raws: list[str], send: Any) -> str:
        if raw == raws[2]:
            assert release.wait(60)
        return str(send(raw))

    _gated_window(s, m, 3, node, chain)
    passed: list[str] = []
    s._crash_point = passed.append  # type: ignore[method-assign]
    assert isinstance(s._bcast, Broadcaster)
    for _ in range(6000):  # until the pair of nonces 0 and 1 is back
        s._collect_broadcasts(wait=0.01)
        if len(s._bcast.outstanding) == 1:
            break
    assert [o.nonce for o in s._bcast.outstanding.values()] == [2]
    assert passed == []
    release.set()
    s._flush_broadcasts()
    assert passed == ["after_broadcast"]


def test_one_at_a_time_after_a_refused_request_of_two_the_rest_is_sent_by_the_engine(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """The node answers a request of two with one error: the thread sends them alone, in
    nonce order. Nonce 0's answer is lost (the node unreachable after the transport's
    retries): nonce 1 comes back NotSent, and the engine leaves both to the poll rather than
    wait out the retries again for nonce 1."""
    chain, s = threaded

    def refuse_many(raws: list[str]) -> list[object]:
        raise ch.NodeError("batch requests are not supported")

    chain.send_raw_many = refuse_many  # type: ignore[method-assign]
    chain.refuse_nth[1] = RpcError("node at http://127.0.0.1:1 unreachable after 9 tries")
    m = _accepted(s, 2)
    raws = _window(s, m, 2)
    with capture_logs() as logs:
        s._flush_broadcasts()  # no exception: nonces 0 and 1 are left to the poll
    assert chain.by == []
    assert [(x["event"], x["nonce"]) for x in logs] == [("transfer_broadcast_unknown", 0)]
    assert s._outstanding() == {}
    assert len(raws) == 2 and len(s.ledger.txs(s.payer)) == 2  # both written ahead


def test_after_an_ambiguous_failure_the_engine_sends_the_held_back_rest_in_order(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """A refusal of the node's (here: nonce too low, ambiguous) is an answer: the engine
    sends the rest the thread held back itself, in nonce order."""
    chain, s = threaded
    chain.refuse_nth[2] = ch.NonceTooLow("nonce too low")
    m = _accepted(s, 4)
    raws = _window(s, m, 3)
    s._flush_broadcasts()  # no exception: the poll looks nonce 0 up
    # The thread stopped at the failure (nonce 1 had gone first, in the same request); the
    # engine sent the rest itself.
    assert chain.by == [(THREAD, raws[1]), (MAIN, raws[2])]
    assert s._outstanding() == {}
    # Resumed: the thread takes the next window again.
    more = _window(s, m, 1)
    s._flush_broadcasts()
    assert chain.by[2:] == [(THREAD, more[3])]
    assert s._txs_sent == 4


def test_after_a_node_that_did_not_answer_the_held_back_rest_is_left_to_the_poll(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """The node unreachable after the transport's retries (minutes): the engine sent every
    held-back transaction itself, each waiting out the same retries, up to an hour with a
    full window. They stay written ahead; the poll looks them up and sends them again."""
    chain, s = threaded
    chain.refuse_nth[2] = RpcError("node at http://127.0.0.1:1 unreachable after 9 tries")
    m = _accepted(s, 4)
    raws = _window(s, m, 4)
    s._flush_broadcasts()
    assert chain.by == [(THREAD, raws[1])]
    assert s._outstanding() == {}
    assert len(s.ledger.txs(s.payer)) == 4


def test_transactions_still_with_the_broadcasting_thread_are_not_polled(
        threaded: tuple[ThreadedChain, Sender]) -> None:
    """The node may not have them yet: looked up now they would look dropped."""
    chain, s = threaded
    m = _accepted(s, 2)
    gate = threading.Event()
    send = chain.send_raw
    chain.send_raw = lambda raw: (gate.wait(60), send(raw))[1]  # type: ignore[method-assign]
    _window(s, m, 2)
    asked: list[str] = []
    chain.receipts = lambda hashes: asked.extend(hashes) or {}  # type: ignore[attr-defined]
    chain.known = lambda hashes: asked.extend(hashes) or {}  # type: ignore[attr-defined]
    chain.block_hashes = lambda numbers: {}  # type: ignore[attr-defined]
    assert s._poll() is False
    assert asked == [] and set(s._outstanding()) == {t.id for t in s.ledger.txs(s.payer)}
    gate.set()
    s._flush_broadcasts()
    assert s._outstanding() == {}
    # Handed back: polled now (mined, and deep at confirmations 1).
    chain.nonce = lambda *_: 2  # type: ignore[attr-defined]
    chain.receipts = lambda hashes: {  # type: ignore[attr-defined]
        h: ch.Receipt(h, 1, "0x", 1, 21_000, 10**9) for h in asked.extend(hashes) or hashes}
    assert s._poll() is True
    assert len(asked) == 2
    assert [t.status for t in s.ledger.txs(s.payer)] == ["confirmed"] * 2


def test_windows_are_one_batch_first_then_four(threaded: tuple[ThreadedChain, Sender]) -> None:
    """With nothing in flight one batch goes out at once; then windows of WINDOW batches, up
    to DISBURSER_MAX_IN_FLIGHT unmined."""
    chain, s = threaded
    s.cfg = dataclasses.replace(s.cfg, batch_size=1, max_in_flight=6)
    s._batch_size = 1
    pays = [Payment(i, f"u{i}", "0x" + f"{i + 1:040x}", 10) for i in range(8)]
    m = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=s.payer,
                      not_after=2**40, payments=pays)
    s.ledger.accept_manifest(m, ceiling=10**12, signers=[])
    s._meter = True
    chain.measure_many = lambda payer, to, datas: [  # type: ignore[attr-defined]
        (True, 100_000, b"") for _ in datas]
    windows: list[int] = []
    sign = s._sign_and_send_many

    def record(**kw: Any) -> None:
        windows.append(len(kw["items"]))
        sign(**kw)

    s._sign_and_send_many = record  # type: ignore[method-assign]
    assert s._fill(m) is True
    assert windows == [1, WINDOW, 1]
    s._flush_broadcasts()
    assert len(chain.by) == 6 and {t for t, _ in chain.by} == {THREAD}


class HistoryChain(FakeChain):
    """Answers eth_getLogs with the given Transfer logs from the payer, and counts asks."""

    def __init__(self, payer: str, logs: list[tuple[str, str, int]]) -> None:
        super().__init__()
        self.payer, self.logs, self.asked = payer, logs, 0

    def head(self) -> ch.Head:
        return ch.Head(50, "0x" + "11" * 32, 10**9, 30_000_000, 0)

    def own_connections(self) -> bool:
        return False  # one connection: the logs are read one range at a time

    def for_thread(self) -> None:
        return None

    # Disbursed logs from the payer: (transaction, contract, manifest root)
    disbursed: list[tuple[str, str, str]] = []
    paid_bits: dict[int, int] = {}  # the batch contract's bitmap words of the manifest

    def paid_words(self, contract: str, payer: str, token: str, root: str, words: list[int]
                   ) -> dict[int, int]:
        return {w: self.paid_bits.get(w, 0) for w in words}

    def rpc(self, method: str, params: Any = ()) -> Any:
        assert method == "eth_getLogs"
        if params[0]["topics"][0] == ch.DISBURSED_TOPIC:
            assert "address" not in params[0]  # any contract: the engine judges which
            return [{"transactionHash": tx, "address": c, "blockNumber": "0x5",
                     "topics": [ch.DISBURSED_TOPIC, params[0]["topics"][1], root]}
                    for tx, c, root in self.disbursed]
        self.asked += 1
        return [{"blockNumber": "0x5", "logIndex": hex(k), "transactionHash": tx,
                 "topics": [ch.TRANSFER_TOPIC, "0x" + "0" * 24 + self.payer[2:].lower(),
                            "0x" + "0" * 24 + to[2:].lower()],
                 "data": "0x" + f"{amount:064x}"}
                for k, (tx, to, amount) in enumerate(self.logs)]


def _history(tmp_path: Path, pays: list[Payment]) -> tuple[HistoryChain, Sender, Manifest]:
    chain = HistoryChain("", [])
    s = _sender(tmp_path, chain)
    chain.payer = s.payer
    m = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=s.payer,
                      not_after=2**40, payments=pays)
    s.ledger.accept_manifest(m, ceiling=10**12, signers=[])
    s._first_nonce = 7
    return chain, s, m


def _accept_past_transfers(s: Sender, m: Manifest) -> None:
    """What an operator does: a refusal lists the matches, then --accept-past-transfers."""
    with pytest.raises(FailClosed):
        s._skip_paid_by_transfers(m.root, len(m.payments))
    s.cfg = dataclasses.replace(s.cfg, accept_past_transfers=True)
    s._skip_paid_by_transfers(m.root, len(m.payments))
    s.cfg = dataclasses.replace(s.cfg, accept_past_transfers=False)


def test_transfers_the_ledger_did_not_send_mark_payments_paid_once_per_manifest(
        tmp_path: Path) -> None:
    """A ledger that did not see the payer's first nonce reads the payer's Transfer logs
    once per manifest: a log of a payment's amount to its recipient that the ledger did not
    send pays one payment (two payments of the same recipient and amount need two logs); a
    log of another amount to a recipient no exact log matches is that payment's too (an
    allocation corrected and re-signed after a lost ledger); one the ledger sent itself pays
    none."""
    ours = "0x" + "cc" * 32
    chain, s, m = _history(tmp_path, [
        Payment(0, "u0", TO[0], 10), Payment(1, "u1", TO[0], 10),
        Payment(2, "u2", TO[1], 20), Payment(3, "u3", TO[2], 30)])
    s.ledger.tx_hashes = lambda: {ours: (1, m.root)}  # type: ignore[method-assign]
    chain.logs = [("0x" + "aa" * 32, TO[0], 10),  # pays one of payments 0 and 1
                  ("0x" + "ab" * 32, TO[1], 19),  # payment 2's recipient, another amount
                  (ours, TO[2], 30)]  # sent by this ledger: not a payment made elsewhere
    _accept_past_transfers(s, m)
    assert chain.asked == 2
    rows = {p.idx: (p.status, p.reason) for p in s.ledger.payments(m.root)}
    assert rows == {0: ("paid_elsewhere", PAID_BY_TRANSFER), 1: ("queued", None),
                    2: ("paid_elsewhere", PAID_BY_TRANSFER), 3: ("queued", None)}
    # Once per manifest: what the payer sends after the ledger's first nonce is its own.
    chain.logs.append(("0x" + "ad" * 32, TO[1], 20))
    s._skip_paid_by_transfers(m.root, len(m.payments))
    assert chain.asked == 2
    assert s.ledger.payments(m.root, [PaymentStatus.PAID_ELSEWHERE])[0].idx == 0


def test_a_match_stops_the_run_unless_past_transfers_are_accepted(tmp_path: Path) -> None:
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10), Payment(1, "u1", TO[1], 20)])
    chain.logs = [("0x" + "aa" * 32, TO[1], 20)]
    with pytest.raises(FailClosed) as e:
        s._skip_paid_by_transfers(m.root, len(m.payments))
    assert str(e.value) == (
        f"1 payment(s) of manifest {m.root} go to recipients of transfers from the payer "
        f"that this ledger did not send (first: payments[1] 20 base units to {TO[1]}, paid by "
        f"transaction 0x{'aa' * 32} in block 5; all in the log as "
        "past_transfer_matches_payment). If this fund paid them (a lost ledger; a corrected "
        "amount is then a top-up to pay by a manifest of its own), run "
        "`send --accept-past-transfers` to record them as "
        "paid elsewhere; if those transfers were for something else, set "
        "DISBURSER_FROM_BLOCK after them and before the fund's first payment. Nothing was "
        "sent")
    assert [p.status for p in s.ledger.payments(m.root)] == ["queued"] * 2
    assert not s.ledger.history_checked(m.root, 0)  # asked again on the next run
    assert chain.sent == []


def _second_manifest_after_one_transfer(
        tmp_path: Path) -> tuple[HistoryChain, Sender, Manifest, Manifest]:
    """A first manifest whose payment (TO[0], 10) was recorded as paid by transfer 0xaa..,
    then a second manifest of another program paying the same recipient the same amount."""
    chain, s, first = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    chain.logs = [("0x" + "aa" * 32, TO[0], 10)]
    _accept_past_transfers(s, first)
    second = make_manifest(program="q", chain_id=31337, token=TOKEN, payer=s.payer,
                           not_after=2**40, payments=[Payment(0, "v0", TO[0], 10)])
    s.ledger.accept_manifest(second, ceiling=10**12, signers=[])
    s.cfg = dataclasses.replace(s.cfg, accept_past_transfers=False)
    return chain, s, first, second


def test_a_transfer_explained_by_another_manifest_pays_nothing_here(tmp_path: Path) -> None:
    """One transfer, two manifests paying the same recipient the same amount: the first
    manifest's payment takes it; the second's is not taken for paid (and nothing stops)."""
    _, s, first, second = _second_manifest_after_one_transfer(tmp_path)
    s._skip_paid_by_transfers(second.root, 1)
    assert [p.status for p in s.ledger.payments(first.root)] == ["paid_elsewhere"]
    assert [p.status for p in s.ledger.payments(second.root)] == ["queued"]
    assert s.ledger.history_checked(second.root, 0)


def test_only_the_very_transfer_recorded_for_another_manifest_is_set_aside(
        tmp_path: Path) -> None:
    """Another manifest's payment recorded as paid by one transfer explains that transfer,
    not every transfer of the same recipient and amount (say, one after a raised
    DISBURSER_FROM_BLOCK): a second one still stops the run."""
    chain, s, _, second = _second_manifest_after_one_transfer(tmp_path)
    chain.logs = [("0x" + "ab" * 32, TO[0], 10)]  # the first one is before the range now
    with pytest.raises(FailClosed, match=f"paid by transaction 0x{'ab' * 32} in block 5"):
        s._skip_paid_by_transfers(second.root, 1)


@pytest.mark.parametrize(("mode", "contract", "other_root", "stops"), [
    (Mode.BATCH, BATCH, None, False),  # the bitmap judges the contract's transactions
    (Mode.DIRECT, BATCH, None, False),  # the same: direct mode reads the bitmap too
    (Mode.DIRECT, None, None, True),  # an unknown contract paid this manifest: a match
    (Mode.DIRECT, None, "known", False),  # it paid another manifest this ledger knows
    # ... one it does not know (a lost ledger; the same users re-sorted under another
    # root, say): a match, from any contract
    (Mode.DIRECT, None, "unknown", True),
    (Mode.BATCH, BATCH, "unknown", True),
])
def test_transfers_of_batch_transactions(tmp_path: Path, mode: Mode, contract: str | None,
                                         other_root: str | None, stops: bool) -> None:
    """A transfer in a transaction whose Disbursed log names another manifest this ledger
    knows paid that one; in the batch contract's own transaction for this manifest, where
    the run reads its bitmap (batch mode; direct mode with DISBURSER_BATCH_CONTRACT set and
    verified), it is the bitmap's to judge, exactly by manifest and index. Otherwise it is
    matched like any other."""
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    s.cfg = dataclasses.replace(s.cfg, mode=mode, batch_contract=contract)
    if mode is Mode.DIRECT and contract:
        s._bitmap = True  # verify_batch_contract found BatchPayout's code there
    chain.logs = [("0x" + "ba" * 32, TO[0], 10)]
    root = m.root
    if other_root == "known":
        other = make_manifest(program="q", chain_id=31337, token=TOKEN, payer=s.payer,
                              not_after=2**40, payments=[Payment(0, "v0", TO[3], 5)])
        s.ledger.accept_manifest(other, ceiling=10**12, signers=[])
        root = other.root
    elif other_root == "unknown":
        root = "0x" + "ee" * 32
    chain.disbursed = [("0x" + "BA" * 32, contract or "0x" + "c0" * 20, root)]
    if stops:
        with pytest.raises(FailClosed, match="go to recipients of transfers from the payer"):
            s._skip_paid_by_transfers(m.root, 1)
        assert [p.status for p in s.ledger.payments(m.root)] == ["queued"]
        assert chain.sent == []
    else:
        s._skip_paid_by_transfers(m.root, 1)
        assert [p.status for p in s.ledger.payments(m.root)] == ["queued"]
        assert s.ledger.history_checked(m.root, 0)


def test_a_manifest_the_ledger_does_not_know_stops_the_run(tmp_path: Path) -> None:
    """The payer paid a manifest this ledger does not know (a lost ledger, a second ledger):
    even with no payment matching, it may hold this program's users and count against its
    ceiling, which only the ledger checks. The run stops, listing it; a manifest with
    nothing left to pay is recorded freely (how a re-created ledger learns its manifests);
    --accept-past-transfers goes on once the refusal listed it."""
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    other = "0x" + "ee" * 32
    chain.logs = [("0x" + "ba" * 32, TO[3], 99)]  # its payment: not one of this manifest's
    chain.disbursed = [("0x" + "ba" * 32, "0x" + "c0" * 20, other)]
    with pytest.raises(FailClosed) as e:
        s._skip_paid_by_transfers(m.root, 1)
    assert str(e.value) == (
        f"the payer paid 1 manifest(s) that this ledger does not know (first: {other}, in "
        f"transaction 0x{'ba' * 32} in block 5; all in the log as payer_paid_unknown_manifest):"
        " they may hold this program's users and count against its ceiling, which only a "
        "ledger that knows them checks. If they are this fund's, send each of them with this "
        "ledger (their contract's paid bitmap makes that pay nothing already paid; approvers "
        f"re-sign an expired one with a later not_after), then manifest {m.root} again; if "
        "they are not, run `send --accept-past-transfers` or set DISBURSER_FROM_BLOCK after "
        "them. Nothing was sent")
    assert not s.ledger.history_checked(m.root, 0) and chain.sent == []
    # Accepted once listed, and the acceptance recorded.
    s.cfg = dataclasses.replace(s.cfg, accept_past_transfers=True)
    s._skip_paid_by_transfers(m.root, 1)
    assert s.ledger.history_checked(m.root, 0)
    assert [p.status for p in s.ledger.payments(m.root)] == ["queued"]
    (checked,) = s.ledger.events(HISTORY_CHECKED)
    assert json.loads(checked.data)["unknown_manifests"] == [other]
    # Nothing left to pay: recorded without a refusal.
    done = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=s.payer,
                         not_after=2**40, payments=[Payment(0, "w0", TO[4], 7)])
    s.ledger.accept_manifest(done, ceiling=10**12, signers=[])
    s.ledger.mark_paid_elsewhere(done.root, [0], contract=BATCH)
    s.cfg = dataclasses.replace(s.cfg, accept_past_transfers=False)
    s._skip_paid_by_transfers(done.root, 1)  # no queued payment: returns at once
    assert [p.status for p in s.ledger.payments(done.root)] == ["paid_elsewhere"]


def test_a_disbursed_log_without_the_payers_transfers_names_no_manifest(
        tmp_path: Path) -> None:
    """Anyone may emit a Disbursed log naming the payer: in a transaction without the
    payer's own transfers of the token it paid nothing, and stops nothing."""
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    chain.logs = [("0x" + "ba" * 32, TO[3], 99)]
    chain.disbursed = [("0x" + "bb" * 32, "0x" + "66" * 20, "0x" + "ee" * 32)]
    s._skip_paid_by_transfers(m.root, 1)
    assert s.ledger.history_checked(m.root, 0)


def test_a_manifest_all_paid_is_recorded_beside_unknown_ones(tmp_path: Path) -> None:
    """A lost ledger re-learns its manifests by sending them again: one the bitmap finds
    all paid is recorded without a stop, though the payer paid others it does not know
    yet."""
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    s.cfg = dataclasses.replace(s.cfg, batch_contract=BATCH)
    chain.logs = [("0x" + "ba" * 32, TO[0], 10), ("0x" + "bb" * 32, TO[3], 5)]
    chain.disbursed = [("0x" + "ba" * 32, BATCH, m.root),
                       ("0x" + "bb" * 32, BATCH, "0x" + "ee" * 32)]
    chain.paid_bits = {0: 0b1}
    s._skip_paid_by_transfers(m.root, 1)
    assert [p.status for p in s.ledger.payments(m.root)] == ["paid_elsewhere"]
    assert s.ledger.history_checked(m.root, 0)


def test_matches_and_unknown_manifests_are_shown_together(tmp_path: Path) -> None:
    """--accept-past-transfers accepts everything the refusal listed: the refusal says
    everything it listed."""
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    chain.logs = [("0x" + "aa" * 32, TO[0], 10), ("0x" + "bb" * 32, TO[3], 5)]
    chain.disbursed = [("0x" + "bb" * 32, "0x" + "c0" * 20, "0x" + "ee" * 32)]
    with pytest.raises(FailClosed) as e:
        s._skip_paid_by_transfers(m.root, 1)
    msg = str(e.value)
    assert msg.startswith("the payer paid 1 manifest(s) that this ledger does not know")
    assert f" Also: 1 payment(s) of manifest {m.root} go to recipients of transfers" in msg
    assert msg.endswith("Nothing was sent") and msg.count("Nothing was sent") == 1


def test_the_bitmap_is_applied_with_the_check(tmp_path: Path) -> None:
    """Where the bitmap is read, its marks are written before the check is recorded: a run
    that dies after it leaves no payment of the contract's transactions both set aside and
    queued (a later run without the bitmap would pay it again)."""
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10), Payment(1, "u1", TO[1], 20)])
    chain.logs = [("0x" + "ba" * 32, TO[0], 10)]
    chain.disbursed = [("0x" + "ba" * 32, BATCH, m.root)]
    chain.paid_bits = {0: 0b1}
    s._skip_paid_by_transfers(m.root, 2)
    assert [p.status for p in s.ledger.payments(m.root)] == ["paid_elsewhere", "queued"]
    assert s.ledger.history_checked(m.root, 0)


def test_a_lower_from_block_reads_again(tmp_path: Path) -> None:
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    s.cfg = dataclasses.replace(s.cfg, from_block=20)
    s._skip_paid_by_transfers(m.root, 1)
    s._skip_paid_by_transfers(m.root, 1)
    assert chain.asked == 1
    s.cfg = dataclasses.replace(s.cfg, from_block=10)
    chain.logs = [("0x" + "aa" * 32, TO[0], 10)]
    with pytest.raises(FailClosed):
        s._skip_paid_by_transfers(m.root, 1)
    assert chain.asked == 2


def test_past_transfers_are_accepted_only_once_a_refusal_listed_them(tmp_path: Path) -> None:
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10), Payment(1, "u1", TO[1], 20)])
    s.cfg = dataclasses.replace(s.cfg, accept_past_transfers=True)
    chain.logs = [("0x" + "aa" * 32, TO[0], 10)]
    with pytest.raises(FailClosed, match="^1 payment"):  # the flag alone: not yet shown
        s._skip_paid_by_transfers(m.root, 2)
    chain.logs.append(("0x" + "ab" * 32, TO[1], 20))  # a new match since the listing
    with pytest.raises(FailClosed, match="^2 payment"):
        s._skip_paid_by_transfers(m.root, 2)
    s._skip_paid_by_transfers(m.root, 2)
    assert [p.status for p in s.ledger.payments(m.root)] == ["paid_elsewhere"] * 2


@pytest.mark.parametrize("same_contract", [True, False])
def test_a_contracts_transfer_for_a_payment_its_bitmap_marked_pays_no_other(
        tmp_path: Path, same_contract: bool) -> None:
    """Contract C's bitmap marked payment 0 paid in an earlier run; now C is not read (the
    setting was unset): C's transaction for this manifest still holds payment 0's transfer,
    which must not be taken for payment 1 of the same recipient and amount. The same
    transfer in another contract's transaction is not explained by C's marks: a match."""
    c = "0x" + "c0" * 20
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10), Payment(1, "u1", TO[0], 10)])
    s.ledger.mark_paid_elsewhere(m.root, [0], contract=c)
    s.cfg = dataclasses.replace(s.cfg, mode=Mode.DIRECT, batch_contract=None)
    chain.logs = [("0x" + "ba" * 32, TO[0], 10)]
    chain.disbursed = [("0x" + "ba" * 32, c if same_contract else "0x" + "c1" * 20, m.root)]
    if same_contract:
        s._skip_paid_by_transfers(m.root, 2)
        assert [p.status for p in s.ledger.payments(m.root)] == ["paid_elsewhere", "queued"]
    else:
        with pytest.raises(FailClosed, match=r"^1 payment\(s\) .* payments\[1\]"):
            s._skip_paid_by_transfers(m.root, 2)


def test_a_listing_rejected_by_a_raised_from_block_is_not_accepted_later(
        tmp_path: Path) -> None:
    """Transfer X was listed, then the operator judged it unrelated and raised
    DISBURSER_FROM_BLOCK past it (a check recorded). Lowering it again with the flag does
    not accept X on the old listing: it is listed again first."""
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    chain.logs = [("0x" + "aa" * 32, TO[0], 10)]
    with pytest.raises(FailClosed):
        s._skip_paid_by_transfers(m.root, 1)
    s.cfg = dataclasses.replace(s.cfg, from_block=10)
    logs, chain.logs = chain.logs, []
    s._skip_paid_by_transfers(m.root, 1)
    s.cfg = dataclasses.replace(s.cfg, from_block=0, accept_past_transfers=True)
    chain.logs = logs
    with pytest.raises(FailClosed):
        s._skip_paid_by_transfers(m.root, 1)
    assert [p.status for p in s.ledger.payments(m.root)] == ["queued"]


def test_a_bitmap_mark_that_does_not_name_its_contract_stops_a_guess(tmp_path: Path) -> None:
    """A ledger written before bitmap marks named their contract: a batch transaction that
    pays the marked recipient and amount is not guessed to be that payment's or another's."""
    from disburser.ledger import PAID_BY_BITMAP

    c = "0x" + "c0" * 20
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10), Payment(1, "u1", TO[0], 10)])
    with s.ledger.session() as session:
        s.ledger._paid_elsewhere(session, m.root, [0], PAID_BY_BITMAP)
    s.cfg = dataclasses.replace(s.cfg, mode=Mode.DIRECT, batch_contract=None)
    chain.logs = [("0x" + "ba" * 32, TO[0], 10)]
    chain.disbursed = [("0x" + "ba" * 32, c, m.root)]
    with pytest.raises(FailClosed) as e:
        s._skip_paid_by_transfers(m.root, 2)
    assert str(e.value) == (
        f"manifest {m.root}: payments were marked paid by a batch contract's bitmap in an "
        f"earlier run, and transaction 0x{'ba' * 32} of contract {c} pays the same recipient "
        "and amount; set DISBURSER_BATCH_CONTRACT to that contract so that its bitmap is "
        "read. Nothing was sent")
    assert chain.sent == [] and not s.ledger.history_checked(m.root, 0)


def test_failed_payments_put_back_in_the_queue_are_looked_at_again(tmp_path: Path) -> None:
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    s.ledger.mark_failed(m.root, 0, "Blacklistable: account is blacklisted")
    assert not s.ledger.has_queued(m.root)
    s.ledger.record_history_check(m.root, [], [], from_block=0, to_block=50)
    assert s.ledger.requeue_failed(m.root) == 1
    assert not s.ledger.history_checked(m.root, 0)
    chain.logs = [("0x" + "aa" * 32, TO[0], 10)]
    with pytest.raises(FailClosed):
        s._skip_paid_by_transfers(m.root, 1)


def test_a_from_block_above_the_head_is_refused(tmp_path: Path) -> None:
    chain, s, m = _history(tmp_path, [Payment(0, "u0", TO[0], 10)])
    s.cfg = dataclasses.replace(s.cfg, from_block=51)
    with pytest.raises(SettingsError) as e:
        s._skip_paid_by_transfers(m.root, len(m.payments))
    assert str(e.value) == ("DISBURSER_FROM_BLOCK: 51 is above the chain's head 50: the "
                            "payer's past transfers cannot be read from there")
    assert chain.asked == 0 and not s.ledger.history_checked(m.root, 0)


def test_a_ledger_that_saw_the_payers_first_nonce_reads_no_transfer_logs(
        tmp_path: Path) -> None:
    chain = HistoryChain("", [])
    s = _sender(tmp_path, chain)
    chain.payer = s.payer
    m = _accepted(s, 2)
    chain.logs = [("0x" + "aa" * 32, TO[0], 10)]
    s._first_nonce = 0
    s._skip_paid_by_transfers(m.root, len(m.payments))
    assert chain.asked == 0
    assert [p.status for p in s.ledger.payments(m.root)] == ["queued"] * 2


def test_gas_meter_is_given_up_only_after_several_windows_without_an_answer(
        tmp_path: Path) -> None:
    """A node error at the first window does not turn GasMeter off for the whole run; three
    windows in a row without a usable answer do (each of those batches is simulated the
    exact way meanwhile)."""
    chain = FakeChain()
    s = _sender(tmp_path, chain)
    answers: list[Any] = [ch.NodeError("header not found"), [(True, 100_000, b"")]]

    def measure_many(payer: str, to: str, datas: Any) -> Any:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    chain.measure_many = measure_many  # type: ignore[attr-defined]
    assert s._measure(BATCH, ["0x"]) == [None]
    assert s._meter is None
    assert s._measure(BATCH, ["0x"]) == [(True, 100_000, b"")]
    assert s._meter is True

    (tmp_path / "2").mkdir()
    s2 = _sender(tmp_path / "2", chain)
    answers[:] = [ch.NodeError("no overrides")] * 3
    for _ in range(METER_TRIES - 1):
        s2._measure(BATCH, ["0x"])
        assert s2._meter is None
    s2._measure(BATCH, ["0x"])
    assert s2._meter is False
    assert s2._measure(BATCH, ["0x"]) == [None] and answers == []  # not asked again


def test_the_wait_between_idle_polls_starts_short_and_doubles_to_the_interval(
        tmp_path: Path) -> None:
    """A transaction just sent is looked for again after an eighth of the poll interval;
    while nothing changes the wait doubles up to the interval, never past it."""
    s = _sender(tmp_path, FakeChain())
    slept: list[float] = []
    s.sleep = slept.append
    for _ in range(6):
        s._wait()
    assert slept == [0.00125, 0.0025, 0.005, 0.01, 0.01, 0.01]
    s._idle = 0.0  # what a poll that changed something does
    s._wait()
    assert slept[-1] == 0.00125


class Wire:
    """A client for the broadcasting thread's send: records each request (the raw bytes in
    wire order); ``one`` and ``many`` map raw bytes to the error a lone send raises or a
    request's element answers; ``whole`` fails every request of several as a whole."""

    def __init__(self, *, one: dict[str, Exception] | None = None,
                 many: dict[str, Exception] | None = None,
                 whole: Exception | None = None) -> None:
        self.requests: list[list[str]] = []
        self.one, self.many, self.whole = one or {}, many or {}, whole

    def send_raw(self, raw: str) -> str:
        self.requests.append([raw])
        if raw in self.one:
            raise self.one[raw]
        return "h" + raw

    def send_raw_many(self, raws: list[str]) -> list[object]:
        self.requests.append(list(raws))
        if self.whole is not None:
            raise self.whole
        return [self.many.get(r) or "h" + r for r in raws]


@pytest.mark.parametrize("later_first", [True, False])
def test_a_pair_goes_in_one_request_later_nonce_first_only_to_a_node_mining_on_arrival(
        later_first: bool) -> None:
    wire = Wire(many={"b": ch.NonceTooHigh("nonce too high")})
    got = _sender_of(wire, later_first=later_first)(["a", "b"])
    assert wire.requests == [["b", "a"] if later_first else ["a", "b"]]
    assert got == ["ha", wire.many["b"]]  # outcomes in nonce order either way


def test_a_lone_send_returns_its_refusal() -> None:
    refusal = ch.NodeError("txpool is full")
    assert _sender_of(Wire(one={"a": refusal}), later_first=True)(["a"]) == [refusal]


def test_a_node_refusing_requests_of_two_gets_one_at_a_time_from_then_on() -> None:
    wire = Wire(whole=ch.NodeError("batch requests are not supported"))
    send = _sender_of(wire, later_first=True)
    assert send(["a", "b"]) == ["ha", "hb"]
    assert send(["c", "d"]) == ["hc", "hd"]
    assert wire.requests == [["b", "a"], ["a"], ["b"], ["c"], ["d"]]


def test_a_request_of_two_rate_limited_as_a_whole_goes_one_at_a_time_only_this_once() -> None:
    wire = Wire(whole=ch.NodeError("rate limit exceeded"))
    send = _sender_of(wire, later_first=False)
    assert send(["a", "b"]) == ["ha", "hb"]
    wire.whole = None
    assert send(["c", "d"]) == ["hc", "hd"]
    assert wire.requests == [["a", "b"], ["a"], ["b"], ["c", "d"]]


def test_one_by_one_nothing_goes_out_after_a_failure() -> None:
    refusal = ch.NodeError("txpool is full")
    wire = Wire(whole=ch.NodeError("batch requests are not supported"), one={"a": refusal})
    got = _sender_of(wire, later_first=True)(["a", "b"])
    assert got[0] is refusal and isinstance(got[1], NotSent)
    assert wire.requests == [["b", "a"], ["a"]]


def test_a_request_of_two_lost_in_transport_leaves_both_unknown() -> None:
    wire = Wire(whole=RpcError("node at http://127.0.0.1:1 unreachable after 9 tries"))
    got = _sender_of(wire, later_first=True)(["a", "b"])
    assert [type(x) for x in got] == [RpcError, RpcError]
    assert all(str(x).startswith("request of 2 transactions failed: node at ") for x in got)
    assert wire.requests == [["b", "a"]]  # not sent again here: the poll looks them up


def test_an_element_rate_limited_is_sent_again_alone() -> None:
    wire = Wire(many={"a": ch.NodeError("rate limit exceeded")})
    assert _sender_of(wire, later_first=True)(["a", "b"]) == ["ha", "hb"]
    assert wire.requests == [["b", "a"], ["a"]]
