"""The guards of money paths that mutation testing found untested: each test here fails when
its guard is removed or weakened (the mutant it kills is named in its docstring). The send
loop runs against ``Node``, a fake chain that mines each transaction as it arrives; the
ledger is a real SQLite file; reconcile is the pure core."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode
from eth_utils import keccak, to_checksum_address

from disburser import chain as ch
from disburser.devnet import PAYER, PAYER_KEY
from disburser.domain import Manifest, Mode, Payment
from disburser.errors import CeilingError, DisburserError, FailClosed
from disburser.keys import Signer
from disburser.ledger import PAID_BY_BITMAP, Ledger, NewTx
from disburser.manifest import make_manifest
from disburser.reconcile import LedgerInfo, LedgerPayment, Result, reconcile
from disburser.sender import SendConfig, Sender
from disburser.settings import Ceilings
from disburser.transfers import Transfer

TOKEN = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"
BATCH = "0x9fE46736679d2D9a65F0992F2272dE9f3c7fa6e0"
TRUE = (1).to_bytes(32, "big")  # what a token's transfer returns on success


def to(i: int) -> str:
    return "0x" + f"{i + 1:040x}"


def error_string(reason: str) -> bytes:
    """Revert data of ``revert(reason)``: Error(string)."""
    return ch.ERROR_STRING + encode(["string"], [reason])


def transfer_failed(index: int, inner: bytes) -> bytes:
    """BatchPayout's revert data for the payment at ``index``: TransferFailed(index, inner)."""
    return ch.TRANSFER_FAILED + encode(["uint256", "bytes"], [index, inner])


def amounts_of(data: str) -> list[int]:
    """The amounts of a transfer(to, amount) or of a disburse(...) batch's calldata."""
    words = [int(data[10 + 64 * i:10 + 64 * (i + 1)], 16) for i in range((len(data) - 10) // 64)]
    if len(words) == 2:
        return [words[1]]
    return words[-words[5]:]


Sim = tuple[bool, int, bytes]


class Node:
    """A fake node: it mines each transaction it is sent in a block of its own, answers
    receipts, nonces and canonical block hashes from that, and simulates calls with
    ``simulated(calldata)``. The payer is rich in tokens and ETH; nothing is paused or
    blacklisted."""

    url = "http://127.0.0.1:1/secret"

    def __init__(self, simulated: Callable[[str], Sim] | None = None) -> None:
        self.number = 1
        self.sent: list[str] = []
        self.mined: dict[str, int] = {}  # tx hash -> block number
        self.simulated = simulated or (lambda data: (True, 40_000, TRUE))

    @staticmethod
    def block_hash_of(n: int) -> str:
        return f"0x{n:064x}"

    def head(self) -> ch.Head:
        return ch.Head(self.number, self.block_hash_of(self.number), 10**9, 30_000_000, 0)

    def nonce(self, address: str, block: str = "latest") -> int:
        return len(self.mined)

    def send_raw(self, raw: str) -> str:
        h = "0x" + keccak(hexstr=raw).hex()
        self.sent.append(raw)
        self.number += 1
        self.mined[h] = self.number
        return h

    def send_raw_many(self, raws: Sequence[str]) -> list[object]:
        return [self.send_raw(r) for r in raws]

    def receipts(self, hashes: Sequence[str]) -> dict[str, ch.Receipt | None]:
        return {h: ch.Receipt(h, self.mined[h], self.block_hash_of(self.mined[h]), 1, 50_000,
                              10**9) if h in self.mined else None for h in hashes}

    def known(self, hashes: Sequence[str]) -> dict[str, bool]:
        return {h: False for h in hashes}

    def block_hashes(self, numbers: Sequence[int]) -> dict[int, str | None]:
        return {n: self.block_hash_of(n) if n <= self.number else None for n in numbers}

    def simulate_many(self, sender: str, to: str, datas: Sequence[str]) -> list[Sim]:
        return [self.simulated(d) for d in datas]

    def simulate(self, sender: str, to: str, data: str) -> Sim:
        return self.simulated(data)

    def call(self, to: str, data: str, sender: str | None = None) -> bytes:
        ok, _, ret = self.simulated(data)
        if not ok:
            raise ch.Reverted("execution reverted", 3, ret)
        return ret

    def paused(self, token: str) -> bool:
        return False

    def blacklisted(self, token: str, who: str) -> bool:
        return False

    def token_balance(self, token: str, who: str) -> int:
        return 10**30

    def eth_balance(self, who: str) -> int:
        return 10**24

    def find_pending_tx(self, sender: str, nonce: int) -> str | None:
        return None


def _sender(tmp_path: Path, node: Any, *, mode: Mode = Mode.DIRECT, ceiling: int = 10**12,
            confirmations: int = 1, max_in_flight: int = 4,
            clock: Callable[[], float] | None = None) -> Sender:
    cfg = SendConfig(mode=mode, chain_id=31337, token=TOKEN, decimals=6,
                     batch_contract=BATCH if mode is Mode.BATCH else None,
                     confirmations=confirmations, max_in_flight=max_in_flight, batch_size=10,
                     bump_after_blocks=3, max_fee_wei=100 * 10**9, max_tx_fee_wei=10**18,
                     priority_fee_wei=10**9, poll_interval=0.01, ceiling=ceiling)
    return Sender(Ledger(tmp_path / "l.sqlite"), node, Signer(bytes.fromhex(PAYER_KEY[2:])),
                  cfg, clock=clock or time.time)


def _accepted(s: Sender, amounts: Sequence[int], *, program: str = "p", prefix: str = "u",
              not_after: int = 2**40, ceiling: int = 10**12) -> Manifest:
    """A manifest paying ``amounts`` (payment i to ``to(i)``), accepted into the ledger."""
    m = make_manifest(program=program, chain_id=31337, token=TOKEN, payer=s.payer,
                      not_after=not_after,
                      payments=[Payment(i, f"{prefix}{i}", to(i), a)
                                for i, a in enumerate(amounts)])
    s.ledger.accept_manifest(m, ceiling=ceiling, signers=[])
    return m


def _states(s: Sender, m: Manifest) -> list[tuple[str, str | None]]:
    return [(p.status, p.reason) for p in s.ledger.payments(m.root)]


def _carried(s: Sender, m: Manifest) -> set[int]:
    """The indexes of the payments bound to a transaction."""
    return {p.idx for p in s.ledger.payments(m.root) if p.tx_id is not None}


# --- invariant 2: never over the ceiling --------------------------------------------------


def test_a_manifest_may_fill_the_ceiling_exactly_and_not_one_base_unit_more(
        tmp_path: Path) -> None:
    """Invariant 2 at acceptance (ledger.py ``_refuse_unacceptable``, ``committed + total >
    ceiling``): a manifest whose total equals the ceiling is accepted, and one more base unit
    in another manifest of the program is refused with nothing recorded. With ``>=`` a
    program could never be paid up to its ceiling; with ``> ceiling + 1`` one base unit
    over the ceiling was accepted and then paid."""
    led = Ledger(tmp_path / "l.sqlite")

    def manifest(tag: str, amounts: Sequence[int]) -> Manifest:
        return make_manifest(program="p", chain_id=31337, token=TOKEN, payer=PAYER,
                             not_after=2**40, payments=[Payment(i, f"{tag}{i}", to(i), a)
                                                        for i, a in enumerate(amounts)])

    assert led.accept_manifest(manifest("a", [60, 40]), ceiling=100, signers=[])
    assert led.committed("p") == 100
    over = manifest("b", [1])
    with pytest.raises(CeilingError) as e:
        led.accept_manifest(over, ceiling=100, signers=[])
    assert str(e.value) == ("program p: accepted 100 + this manifest 1 = 101 base units "
                            "exceeds the ceiling 100")
    assert led.committed("p") == 100 and led.manifest(over.root) is None


def test_the_ceiling_is_checked_again_when_each_transaction_is_signed(tmp_path: Path) -> None:
    """Invariant 2 at signing time (sender.py ``_sign_and_send_many``, its
    ``check_ceiling``): after the first transfer is signed, a second runner on the shared
    ledger, configured with a higher ceiling, accepts another manifest of the program, so
    that the program's accepted total passes this run's ceiling. The next signing must stop
    with CeilingError, signing and sending nothing more. Without the re-check the run went
    on paying its manifest over the ceiling it was given."""
    node = Node()
    s = _sender(tmp_path, node, ceiling=40)
    m = _accepted(s, [10, 10], ceiling=40)
    assert s._send_direct(m, 1)  # payment 0 signed and sent
    other = Ledger(tmp_path / "l.sqlite")  # the second runner's view of the same file
    more = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=s.payer,
                         not_after=2**40, payments=[Payment(0, "w0", to(7), 25)])
    assert other.accept_manifest(more, ceiling=100, signers=[])
    with pytest.raises(CeilingError) as e:
        s._send_direct(m, 1)
    assert str(e.value) == ("program p: accepted manifests total 45 base units, over the "
                            "ceiling 40")
    assert len(node.sent) == 1 and len(s.ledger.txs(s.payer)) == 1
    assert [st for st, _ in _states(s, m)] == ["in_flight", "queued"]
    assert _carried(s, m) == {0}


# --- invariant 4: confirmed means deep -----------------------------------------------------


def test_a_mined_transaction_is_confirmed_only_at_the_configured_depth(tmp_path: Path) -> None:
    """Invariant 4 (sender.py ``_advance``, the mined branch's ``policy.is_deep``): with
    confirmations 3 a transfer mined in block 10 stays mined, its payment in flight, through
    polls at heads 10 and 11 (each a full lookup: the clock passes LOOKUP_EVERY between
    them), and is confirmed at head 12. Without the depth check the first poll after the
    receipt confirmed it at depth 1, and a reorg could then undo a payment the ledger calls
    done."""
    now = [1000.0]
    node = Node()
    s = _sender(tmp_path, node, confirmations=3, clock=lambda: now[0])
    m = _accepted(s, [10])
    assert s._send_direct(m, 1)
    (h,) = node.mined
    node.mined[h] = 10  # its receipt says block 10
    node.number = 10

    def poll(head: int) -> tuple[str, str]:
        node.number = head
        now[0] += 2.0
        s._poll()
        (t,) = s.ledger.txs(s.payer)
        return t.status, s.ledger.payments(m.root)[0].status

    assert poll(10) == ("mined", "in_flight")  # the receipt: mined at depth 1
    assert poll(10) == ("mined", "in_flight")
    assert poll(11) == ("mined", "in_flight")
    assert poll(11) == ("mined", "in_flight")
    assert poll(12) == ("confirmed", "confirmed")
    (t,) = s.ledger.txs(s.payer)
    assert t.block_number == 10


# --- invariant 5: fail closed ---------------------------------------------------------------


@pytest.mark.parametrize("mode, reason", [
    (Mode.DIRECT, "ERC20: transfer amount exceeds balance"),
    (Mode.BATCH, "ERC20: transfer amount exceeds allowance"),
    (Mode.BATCH, "ERC20: insufficient allowance"),  # OpenZeppelin 4.7 to 4.9
    # OpenZeppelin 5 says it with a custom error: ERC20InsufficientBalance(payer, 5, 10)
    (Mode.DIRECT, "e450d38c" + "00" * 12 + "11" * 20 + f"{5:064x}" + f"{10:064x}"),
], ids=["direct", "batch", "batch-oz47", "direct-oz5"])
def test_a_balance_or_allowance_short_mid_run_stops_the_run_and_blames_no_one(
        tmp_path: Path, mode: Mode, reason: str) -> None:
    """Invariant 5 (sender.py ``_fail_closed_if_global``, "exceeds balance" / "exceeds
    allowance"): the funds check passed at the start, then the payer's balance (or the batch
    contract's allowance) was drained. Every simulation now fails with the token's reason;
    the run must stop naming it, with every payment still queued and nothing sent. Without
    the check each recipient in turn was marked failed with the payer's problem as its
    reason (one by one, until the whole manifest was "failed")."""
    oz5 = reason.startswith("e450d38c")

    def short(data: str) -> Sim:
        if oz5:
            return False, 30_000, bytes.fromhex(reason)
        if mode is Mode.DIRECT:
            return False, 30_000, error_string(reason)
        first = 0  # BatchPayout names the payment whose transferFrom failed
        return False, 30_000, transfer_failed(first, error_string(reason))

    node = Node(short)
    s = _sender(tmp_path, node, mode=mode)
    m = _accepted(s, [10, 10, 10, 10])
    with pytest.raises(FailClosed) as e:
        if mode is Mode.DIRECT:
            s._send_direct(m, 4)
        else:
            s._send_batch(m)
    what, check = (("transfer", "balance") if mode is Mode.DIRECT
                   else ("batch", "allowance to the batch contract"))
    if oz5:
        reason = ("ERC20InsufficientBalance: transfer amount exceeds balance (5 of 10 base "
                  "units)")
    assert str(e.value) == (f"token {TOKEN} refused the {what}: {reason}; check the payer's "
                            f"{check} and run `send` again")
    assert _states(s, m) == [("queued", None)] * 4
    assert node.sent == [] and s.ledger.txs(s.payer) == []


# --- invariant 6: one bad recipient blocks no one --------------------------------------------


def test_a_token_that_returns_false_fails_that_payment_and_sends_the_rest(
        tmp_path: Path) -> None:
    """Invariant 6 in direct mode (sender.py ``_send_direct``, ``returned[:32]`` all zero):
    a token may refuse a transfer by returning false instead of reverting. The simulation of
    payment 1 succeeds but returns false: it must be marked failed with "token returned
    false" and no transaction may carry it, while payments 0 and 2 are signed. Without the
    check it was signed, mined, and confirmed as paid although no token moved."""
    def sim(data: str) -> Sim:
        return (True, 40_000, bytes(32)) if to(1)[2:] in data else (True, 40_000, TRUE)

    node = Node(sim)
    s = _sender(tmp_path, node)
    m = _accepted(s, [10, 11, 12])
    while s._send_direct(m, 3):
        pass
    assert _states(s, m) == [("in_flight", None), ("failed", "token returned false"),
                             ("in_flight", None)]
    assert _carried(s, m) == {0, 2}
    assert len(node.sent) == len(s.ledger.txs(s.payer)) == 2
    assert sorted(t.amount for t in s.ledger.txs(s.payer)) == ["10", "12"]


def test_a_batch_reverting_without_a_culprit_index_is_split_to_find_it(tmp_path: Path) -> None:
    """Invariant 6 in batch mode (sender.py ``_bisect``): a batch of 8 reverts with a plain
    Error(string), which names no payment (the contract's TransferFailed index is missing,
    as from a token reverting outside BatchPayout's wrapper). Splitting must follow the half
    that still fails: payment 5, the only one that fails alone, is marked failed with the
    token's reason and the other 7 go out in one batch. Following the other half ended on a
    payment that passes, and the run stopped with "no single payment does", paying no one."""
    bad = 15  # payment 5's amount: every batch holding it reverts

    def sim(data: str) -> Sim:
        if bad in amounts_of(data):
            return False, 60_000, error_string("Blacklistable: account is blacklisted")
        return True, 100_000, b""

    node = Node(sim)
    s = _sender(tmp_path, node, mode=Mode.BATCH)
    m = _accepted(s, [10 + i for i in range(8)])
    assert s._send_batch(m)
    states = _states(s, m)
    assert states[5] == ("failed", "Blacklistable: account is blacklisted")
    assert [st for i, (st, _) in enumerate(states) if i != 5] == ["in_flight"] * 7
    (t,) = s.ledger.txs(s.payer)
    assert t.kind == "batch" and t.count == 7 and t.amount == str(sum(range(10, 18)) - bad)
    assert _carried(s, m) == {0, 1, 2, 3, 4, 6, 7} and len(node.sent) == 1


# --- not_after ----------------------------------------------------------------------------


def test_nothing_new_is_sent_once_the_manifest_expires_mid_run(tmp_path: Path) -> None:
    """The manifest's not_after (sender.py ``_run``, ``self.clock() > m.not_after``): after
    it no new payment of the manifest is sent. The clock passes not_after once the first
    transfer is on the wire (max_in_flight 1): the run settles that one, reports itself
    expired after one transaction, and leaves the other two queued. Without the check an
    expired manifest (one the approvers' signatures no longer cover) was paid in full."""
    node = Node()
    s = _sender(tmp_path, node, max_in_flight=1,
                clock=lambda: 2000.0 if node.sent else 1000.0)
    s._preflight_done = True  # the chain, token and contract: not what is tested here
    m = _accepted(s, [10, 10, 10], not_after=1500)
    result = s.run(m)
    assert result.expired and result.txs_sent == 1
    assert (result.confirmed, result.unpaid, result.amount_paid) == (1, 2, 10)
    assert [st for st, _ in _states(s, m)] == ["confirmed", "queued", "queued"]
    assert len(node.sent) == 1


# --- invariant 1: paid at most once ---------------------------------------------------------


def test_the_batch_contracts_bitmap_marks_exactly_the_payments_it_paid(tmp_path: Path) -> None:
    """Invariant 1 with a lost ledger (sender.py ``_skip_paid_on_chain``, bit ``i % 256`` of
    word ``i // 256``): of 300 payments the bitmap has only word 1's bit 0 set, which is
    payment 256. Exactly that one is recorded paid elsewhere; every other stays queued.
    With the bit read from the wrong place payment 256 was sent a second time (and, for
    other words, some unpaid payment would be skipped as paid)."""
    node = Node()
    asked: list[list[int]] = []

    def paid_words(contract: str, payer: str, token: str, root: str,
                   words: list[int]) -> dict[int, int]:
        asked.append(words)
        return {w: 1 if w == 1 else 0 for w in words}

    node.paid_words = paid_words  # type: ignore[attr-defined]
    s = _sender(tmp_path, node, mode=Mode.BATCH)
    m = _accepted(s, [10] * 300)
    s._skip_paid_on_chain(m.root, m.count)
    assert asked == [[0, 1]]
    states = _states(s, m)
    assert states[256] == ("paid_elsewhere", PAID_BY_BITMAP)
    assert [i for i, (st, _) in enumerate(states) if st != "queued"] == [256]
    assert s.ledger.bitmap_marks(m.root) == {256: BATCH.lower()}


def _in_flight(tmp_path: Path) -> tuple[Ledger, Manifest, int]:
    """A ledger with a manifest of three payments, payment 0 claimed by a signed transfer."""
    led = Ledger(tmp_path / "l.sqlite")
    m = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=PAYER, not_after=2**40,
                      payments=[Payment(i, f"u{i}", to(i), 10) for i in range(3)])
    led.accept_manifest(m, ceiling=10**12, signers=[])
    (tx_id,) = led.record_txs([NewTx(
        payer=PAYER, nonce=0, kind="direct", root=m.root, to=TOKEN, data="0x",
        gas_limit=60_000, raw="0x00", tx_hash="0x" + "ab" * 32, max_fee=10, tip=1, idxs=(0,),
        amount=10)])
    return led, m, tx_id


def test_a_payment_in_flight_cannot_be_marked_failed(tmp_path: Path) -> None:
    """Invariants 1 and 6 (ledger.py ``mark_failed``, its ``status == queued`` guard): a
    payment whose transaction is signed and may be mined must not be called failed. The
    write must be refused, the payment left in flight bound to its transaction, and no
    failure event written. Without the guard it became failed while its transfer could
    still land (a confirmation settles only payments in flight, so it stayed failed), and
    `--retry-failed` would queue it to be paid a second time."""
    led, m, tx_id = _in_flight(tmp_path)
    with pytest.raises(DisburserError) as e:
        led.mark_failed(m.root, 0, "Blacklistable: account is blacklisted")
    assert str(e.value) == (f"ledger: payment {m.root}[0] queued -> failed changed 0 rows, "
                            "expected 1; another process changed the ledger")
    p = led.payments(m.root)[0]
    assert (p.status, p.reason, p.tx_id) == ("in_flight", None, tx_id)
    assert led.events("payment_failed") == []


def test_a_payment_in_flight_cannot_be_marked_paid_elsewhere(tmp_path: Path) -> None:
    """Invariant 1 (ledger.py ``_paid_elsewhere``, its ``status == queued`` guard): a
    payment already claimed by one of our transactions is not "paid elsewhere". Marking it
    so (with a queued one beside it) must be refused as a whole: nothing is written, the
    in-flight one keeps its transaction and the queued one stays queued. Without the guard
    an in-flight payment was relabelled, so its transaction's outcome no longer settled it:
    had that transaction reverted, the payment would stay counted as paid though nothing
    moved, and never be sent again."""
    led, m, tx_id = _in_flight(tmp_path)
    with pytest.raises(DisburserError) as e:
        led.mark_paid_elsewhere(m.root, [0, 1], contract=BATCH)
    assert str(e.value) == ("ledger: payments queued -> paid_elsewhere changed 1 rows, "
                            "expected 2; another process changed the ledger")
    rows = led.payments(m.root)
    assert [(p.status, p.tx_id) for p in rows] == [("in_flight", tx_id), ("queued", None),
                                                   ("queued", None)]
    assert led.bitmap_marks(m.root) == {}


# --- invariant 7: the chain is the truth (reconcile) ------------------------------------------

U = 10**6
RC_PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
RECIPIENT = "0x00000000000000000000000000000000000abc01"
CEILINGS = Ceilings(default=300_000_000 * U, per_program={})


def _rc_manifest(amounts: Sequence[int]) -> Manifest:
    return make_manifest(program="relief", chain_id=31337, token=TOKEN, payer=RC_PAYER,
                         not_after=2_000_000_000,
                         payments=[Payment(i, f"u-{i}", to_checksum_address(RECIPIENT), a)
                                   for i, a in enumerate(amounts)])


def _log(block: int, n: int, amount: int) -> Transfer:
    return Transfer(block, 0, "0x" + f"{n:064x}", RC_PAYER.lower(), RECIPIENT, amount)


def _kinds(r: Result) -> list[str]:
    return sorted(str(d["kind"]) for d in r.discrepancies)


def test_a_third_transfer_beside_two_attributed_ones_is_a_double_payment() -> None:
    """Invariant 7 (reconcile.py ``_match_group``, step 2 only for payments the ledger did
    not attribute): two payments of 3 tokens to one recipient, each attributed by the ledger
    to its own transaction, and a third identical transfer on chain. The chain paid 9
    tokens for 6 owed: one payment is paid_twice and paid_total is 9. When step 2 re-matched
    attributed payments, the third log replaced an attributed one, which then counted
    nowhere: both payments showed paid, 6 in total, and 3 tokens vanished from the report."""
    m = _rc_manifest([3 * U, 3 * U])
    assert m.payments[0].to.lower() == RECIPIENT
    a, b, c = _log(10, 1, 3 * U), _log(11, 2, 3 * U), _log(12, 3, 3 * U)
    info = LedgerInfo({(m.root, 0): LedgerPayment("confirmed", None, (a.tx_hash,), a.tx_hash),
                       (m.root, 1): LedgerPayment("confirmed", None, (b.tx_hash,), b.tx_hash)})
    r = reconcile([m], [a, b, c], info, CEILINGS, 1, 100)
    assert [p.status for p in r.payments] == ["paid_twice", "paid"]
    assert [p.paid for p in r.payments] == [6 * U, 3 * U]
    assert r.payments[0].tx_hashes == (a.tx_hash, c.tx_hash)
    assert r.payments[1].tx_hashes == (b.tx_hash,)
    assert r.paid_total == 9 * U and r.exit_code == 1
    assert _kinds(r) == ["paid_twice"]


def test_a_payment_paid_in_parts_is_pending_while_any_part_is_shallow() -> None:
    """Invariants 4 and 7 (reconcile.py, ``shallow`` over a payment's several transfers): a
    payment of 10 tokens paid as 6 (deep) and 4 (in the head block, depth 1 of 3) is
    pending, not paid, until the last part is deep too. Without it only a single-transfer
    payment was held to the depth; a part that a reorg can still remove was reported paid
    and reconcile exited 0."""
    m = _rc_manifest([10 * U])
    deep, shallow = _log(50, 1, 6 * U), _log(100, 2, 4 * U)
    r = reconcile([m], [deep, shallow], None, CEILINGS, 3, 100)
    (p,) = r.payments
    assert (p.status, p.paid) == ("pending", 10 * U)
    assert _kinds(r) == ["pending"] and r.exit_code == 1
    (d,) = r.discrepancies
    assert d["depth"] == 1
    later = reconcile([m], [deep, shallow], None, CEILINGS, 3, 102)
    assert later.payments[0].status == "paid" and later.exit_code == 0

