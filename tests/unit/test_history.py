"""The payer's past transfers against a manifest (``disburser.history``): which logs are left
out, and which payments they match. Pure: tables of logs, no chain."""

from __future__ import annotations

import pytest

from disburser import history
from disburser.errors import FailClosed
from disburser.ledger import Queued
from disburser.transfers import Disbursed, Transfer

PAYER = "0x" + "aa" * 20
ROOT, OTHER, STRANGER = "0x" + "01" * 32, "0x" + "02" * 32, "0x" + "03" * 32
BATCH, OLD_BATCH = "0x" + "bb" * 20, "0x" + "cc" * 20
ALICE, BOB = "0x" + "a1" * 20, "0x" + "b0" * 20


def tx(n: int) -> str:
    return f"0x{n:064x}"


def tr(n: int, to: str = ALICE, amount: int = 5, block: int = 10) -> Transfer:
    return Transfer(block, n, tx(n), PAYER, to, amount)


def q(idx: int, to: str = ALICE, amount: int = 5) -> Queued:
    return Queued(ROOT, idx, to.upper().replace("0X", "0x"), str(amount))


def test_keyed_names_each_transfer_by_its_place_in_its_transaction() -> None:
    a, b, c = tr(1), tr(1, BOB), tr(2)
    assert history.keyed([a, b, c], set()) == [(a, f"{tx(1)}:0"), (b, f"{tx(1)}:1"),
                                              (c, f"{tx(2)}:0")]
    # The ledger's own transactions are left out.
    assert history.keyed([a, b, c], {tx(1)}) == [(c, f"{tx(2)}:0")]
    # So are transfers of 0, which anyone can make "from" the payer (a stranger's
    # transferFrom(payer, x, 0) beside a Disbursed log of their own naming a new root): they
    # pay no one, and must not make a fresh ledger refuse to send. The places stay.
    zero = tr(3, amount=0)
    assert history.keyed([zero, Transfer(10, 4, tx(3), PAYER, BOB, 5)], set()) == [
        (Transfer(10, 4, tx(3), PAYER, BOB, 5), f"{tx(3)}:1")]
    out, _, unknown = history.set_aside(history.keyed([zero], set()),
                                        [Disbursed(tx(3), STRANGER[:42], STRANGER, 10)], ROOT,
                                        trusted=BATCH, known={ROOT})
    assert (out, unknown) == ([], {})


@pytest.mark.parametrize(("disbursed", "kept_txs", "unknown"), [
    # a plain transfer: no Disbursed log, kept
    ([], [1], {}),
    # this manifest through the contract whose bitmap the run reads: the bitmap settles it
    ([Disbursed(tx(1), BATCH, ROOT, 10)], [], {}),
    # this manifest through another contract: kept, its bitmap is not read
    ([Disbursed(tx(1), OLD_BATCH, ROOT, 10)], [1], {}),
    # only manifests this ledger knows: their own bitmaps settle them
    ([Disbursed(tx(1), BATCH, OTHER, 10)], [], {}),
    # a manifest this ledger does not know: kept (the same users under another root) and
    # noted, with its first transaction
    ([Disbursed(tx(1), BATCH, STRANGER, 10)], [1], {STRANGER: (tx(1), 10)}),
    ([Disbursed(tx(1), BATCH, OTHER, 10), Disbursed(tx(1), BATCH, STRANGER, 10)], [1],
     {STRANGER: (tx(1), 10)}),
    # anyone may emit Disbursed naming the payer: a transaction without the payer's own
    # transfers is no payment, and names no unknown manifest
    ([Disbursed(tx(9), BATCH, STRANGER, 12)], [1], {}),
], ids=["plain", "trusted", "untrusted", "known", "unknown", "known-and-unknown", "fake"])
def test_set_aside(disbursed: list[Disbursed], kept_txs: list[int],
                   unknown: dict[str, tuple[str, int]]) -> None:
    logs = history.keyed([tr(1)], set())
    out, _, found = history.set_aside(logs, disbursed, ROOT.upper().replace("0X", "0x"),
                                      trusted=BATCH, known={ROOT, OTHER})
    assert [t.tx_hash for t, _ in out] == [tx(n) for n in kept_txs]
    assert found == unknown


def test_drop_bitmap_paid_takes_one_transfer_per_mark_of_the_same_contract() -> None:
    logs = history.keyed([tr(1), tr(2), tr(3)], set())
    kept = {tx(1): OLD_BATCH, tx(2): OLD_BATCH}  # tx 3: a plain transfer
    out = history.drop_bitmap_paid(logs, kept, ROOT, {4: OLD_BATCH}, [q(4)])
    # the mark explains one batch transfer; the second is another payment's, and the plain
    # transfer is never explained by a bitmap
    assert [t.tx_hash for t, _ in out] == [tx(2), tx(3)]
    assert history.drop_bitmap_paid(logs, kept, ROOT, {}, []) == logs


def test_drop_bitmap_paid_refuses_a_mark_that_does_not_name_its_contract() -> None:
    logs = history.keyed([tr(1)], set())
    with pytest.raises(FailClosed, match=f"transaction {tx(1)} of contract {OLD_BATCH} pays "
                       "the same recipient and amount; set DISBURSER_BATCH_CONTRACT"):
        history.drop_bitmap_paid(logs, {tx(1): OLD_BATCH}, ROOT, {4: ""}, [q(4)])


def test_match_is_first_come_first_served_one_transfer_per_payment() -> None:
    logs = history.keyed([tr(1), tr(2, BOB, 7), tr(3)], set())
    got = history.match(logs, [q(0), q(1, BOB, 7), q(2), q(3), q(4, BOB, 8)])
    assert [(m.payment.idx, m.key) for m in got] == [(0, f"{tx(1)}:0"), (1, f"{tx(2)}:0"),
                                                     (2, f"{tx(3)}:0")]
    assert history.match([], [q(0)]) == []


def test_a_transfer_to_the_recipient_of_another_amount_matches_too() -> None:
    """A lost ledger, then the allocation corrected by a base unit and re-signed: no
    transfer has the new amounts, and direct mode (no bitmap, no Disbursed log) paid every
    recipient again. Exact matches are taken first, then one transfer per recipient."""
    logs = history.keyed([tr(1, BOB, 7), tr(2), tr(3, BOB, 9)], set())
    got = history.match(logs, [q(0, BOB, 9), q(1, BOB, 8), q(2, BOB, 10), q(3)])
    assert [(m.payment.idx, m.key) for m in got] == [(0, f"{tx(3)}:0"), (1, f"{tx(1)}:0"),
                                                     (3, f"{tx(2)}:0")]
    msg = history.refusal(ROOT, got[1:2], [], {})
    assert (f"payments[1] 8 base units to {got[1].payment.to}, paid 7 base units by "
            f"transaction {tx(1)} in block 10;") in msg


def test_refusal_lists_both_kinds_in_one_line() -> None:
    logs = history.keyed([tr(1, block=12)], set())
    matched = history.match(logs, [q(3)])
    unknown = {STRANGER: history.Unknown(tx(7), 9)}
    assert history.listing(matched, [STRANGER]) == [f"{tx(1)}:0", f"manifest:{STRANGER}"]
    msg = history.refusal(ROOT, matched, [STRANGER], unknown)
    assert msg.startswith(f"the payer paid 1 manifest(s) that this ledger does not know "
                          f"(first: {STRANGER}, in transaction {tx(7)} in block 9;")
    assert (f" Also: 1 payment(s) of manifest {ROOT} go to recipients of transfers from the "
            f"payer that this ledger did not send (first: payments[3] 5 base units to "
            f"{q(3).to}, paid by transaction {tx(1)} in block 12;") in msg
    assert msg.endswith("before the fund's first payment. Nothing was sent")
    assert "\n" not in msg
