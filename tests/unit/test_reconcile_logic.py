"""The pure reconcile core with plain data: every status and finding, exact figures, exit
codes, programs with their own ceilings, ledger attribution; log decoding and the adaptive
eth_getLogs chunking against a fake node; the renderers."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from threading import Event
from typing import Any

import pytest

from disburser.chain import TRANSFER_TOPIC, NodeError
from disburser.domain import Manifest, Payment
from disburser.errors import InputError, RpcError
from disburser.manifest import make_manifest, to_checksum
from disburser.reconcile import (
    STATUSES,
    LedgerInfo,
    LedgerPayment,
    ManifestIn,
    ProgramInfo,
    Result,
    dedupe,
    default_from_block,
    reconcile,
)
from disburser.report import render, tokens, when
from disburser.settings import Ceilings
from disburser.transfers import Transfer, _fetch_range, decode_logs, fetch_transfers, too_much

TOKEN = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"
PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
OTHER_PAYER = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
U = 10**6  # base units per token
CEILINGS = Ceilings(default=300_000_000 * U, per_program={"loans": 100_000_000 * U})
HEAD = 100


def addr(n: int) -> str:
    return to_checksum("0x" + format(0xABC0000 + n, "040x"))


def manifest(rows: Sequence[tuple[str, int]], *, program: str = "relief",
             payer: str = PAYER, prefix: str = "u", not_after: int = 2_000_000_000) -> Manifest:
    return make_manifest(
        program=program, chain_id=31337, token=TOKEN, payer=payer, not_after=not_after,
        payments=[Payment(i, f"{prefix}-{i}", to, amount) for i, (to, amount) in enumerate(rows)],
    )


_log_counter = iter(range(10**9))


def tr(to: str, amount: int, *, block: int = 10, tx: str | None = None,
       sender: str = PAYER, log_index: int | None = None) -> Transfer:
    n = next(_log_counter)
    return Transfer(block, n if log_index is None else log_index,
                    tx or "0x" + format(n, "064x"), sender.lower(), to.lower(), amount)


def run(manifests: Sequence[Manifest | ManifestIn], transfers: Sequence[Transfer],
        ledger: LedgerInfo | None = None, *, confirmations: int = 1, head: int = HEAD,
        ceilings: Ceilings = CEILINGS, **kw: Any) -> Result:
    return reconcile(manifests, transfers, ledger, ceilings, confirmations, head, **kw)


def kinds(r: Result) -> list[str]:
    return [str(d["kind"]) for d in r.discrepancies]


def one(r: Result, kind: str) -> dict[str, Any]:
    found = [d for d in r.discrepancies if d["kind"] == kind]
    assert len(found) == 1, (kind, r.discrepancies)
    return found[0]


# --- statuses ----------------------------------------------------------------------------


def test_all_paid_is_consistent_with_exact_totals() -> None:
    m = manifest([(addr(1), 1_250_000), (addr(2), 7 * U), (addr(3), 1)])
    r = run([m], [tr(addr(1), 1_250_000), tr(addr(2), 7 * U), tr(addr(3), 1)])
    assert r.exit_code == 0 and r.consistent
    assert [p.status for p in r.payments] == ["paid"] * 3
    assert r.discrepancies == ()
    assert r.counts == {"paid": 3, "pending": 0, "unpaid": 0, "failed": 0, "underpaid": 0,
                        "overpaid": 0, "paid_twice": 0}
    assert r.program == "relief"
    assert r.ceiling == 300_000_000 * U
    assert r.committed == r.paid_total == 8_250_001
    assert r.remaining == 300_000_000 * U - 8_250_001
    assert r.unexplained_total == 0
    assert [p.paid for p in r.payments] == [1_250_000, 7 * U, 1]


def test_unpaid() -> None:
    m = manifest([(addr(1), 5 * U), (addr(2), 3 * U)])
    r = run([m], [tr(addr(1), 5 * U)])
    assert [p.status for p in r.payments] == ["paid", "unpaid"]
    d = one(r, "unpaid")
    assert (d["manifest"], d["index"], d["id"], d["to"]) == (m.root, 1, "u-1", addr(2))
    assert (d["expected"], d["paid"]) == ("3000000", "0")
    assert r.paid_total == 5 * U and r.exit_code == 1


def test_pending_until_deep_enough() -> None:
    m = manifest([(addr(1), 5 * U)])
    logs = [tr(addr(1), 5 * U, block=HEAD)]
    r = run([m], logs, confirmations=3)
    assert r.payments[0].status == "pending"
    d = one(r, "pending")
    assert d["depth"] == 1 and d["paid"] == "5000000" and r.exit_code == 1
    # two blocks later the same transfer is three deep: paid
    r2 = run([m], logs, confirmations=3, head=HEAD + 2)
    assert r2.payments[0].status == "paid" and r2.exit_code == 0
    # the off-by-one: at depth 2 with 3 required it is still pending
    assert run([m], logs, confirmations=3, head=HEAD + 1).payments[0].status == "pending"


def test_underpaid_and_overpaid_figures() -> None:
    m = manifest([(addr(1), 10 * U), (addr(2), 10 * U)])
    r = run([m], [tr(addr(1), 9_999_999), tr(addr(2), 10 * U + 1)])
    assert [p.status for p in r.payments] == ["underpaid", "overpaid"]
    u, o = one(r, "underpaid"), one(r, "overpaid")
    assert (u["expected"], u["paid"], u["difference"]) == ("10000000", "9999999", "-1")
    assert (o["expected"], o["paid"], o["difference"]) == ("10000000", "10000001", "1")
    assert r.paid_total == 20 * U


def test_paid_twice() -> None:
    m = manifest([(addr(1), 4 * U)])
    a, b = tr(addr(1), 4 * U, block=5), tr(addr(1), 4 * U, block=9)
    r = run([m], [b, a])
    p = r.payments[0]
    assert p.status == "paid_twice" and p.paid == 8 * U
    assert p.tx_hashes == (a.tx_hash, b.tx_hash)  # chain order
    d = one(r, "paid_twice")
    assert (d["expected"], d["paid"], d["transfers"]) == ("4000000", "8000000", 2)


def test_paid_in_parts_adds_up() -> None:
    m = manifest([(addr(1), 10 * U)])
    r = run([m], [tr(addr(1), 6 * U), tr(addr(1), 4 * U)])
    assert r.payments[0].status == "paid" and r.exit_code == 0


def test_extra_transfer_to_a_paid_recipient_is_overpaid_not_twice() -> None:
    m = manifest([(addr(1), 10 * U)])
    r = run([m], [tr(addr(1), 10 * U), tr(addr(1), 3)])
    assert r.payments[0].status == "overpaid" and r.payments[0].paid == 10 * U + 3


def test_unexplained_outflow() -> None:
    m = manifest([(addr(1), 2 * U)])
    stranger = addr(99)
    x = tr(stranger, 123_456_789, block=42, log_index=7)
    r = run([m], [tr(addr(1), 2 * U), x])
    assert r.payments[0].status == "paid"
    d = one(r, "unexplained_outflow")
    assert d == {"kind": "unexplained_outflow", "tx_hash": x.tx_hash, "log_index": 7,
                 "block": 42, "from": PAYER, "to": stranger, "expected": "0",
                 "paid": "123456789"}
    assert r.unexplained_total == 123_456_789
    assert r.paid_total == 2 * U  # unexplained money is not attributed to the program
    assert r.exit_code == 1


def test_transfers_from_another_sender_are_ignored() -> None:
    m = manifest([(addr(1), 2 * U)])
    r = run([m], [tr(addr(1), 2 * U, sender=OTHER_PAYER)])
    assert r.payments[0].status == "unpaid"
    assert "unexplained_outflow" not in kinds(r)


# --- the ledger: attribution, failures, disagreements --------------------------------------


def lpay(status: str, *, reason: str | None = None, hashes: Sequence[str] = (),
         mined: str | None = None) -> LedgerPayment:
    return LedgerPayment(status, reason, tuple(hashes), mined)


def test_ledger_failed_without_transfer_is_failed_with_reason() -> None:
    m = manifest([(addr(1), 2 * U), (addr(2), 3 * U)])
    reason = "Blacklistable: account is blacklisted"
    info = LedgerInfo({(m.root, 0): lpay("confirmed"), (m.root, 1): lpay("failed", reason=reason)})
    r = run([m], [tr(addr(1), 2 * U)], info)
    p = r.payments[1]
    assert (p.status, p.reason, p.paid) == ("failed", reason, 0)
    d = one(r, "failed")
    assert d["reason"] == reason and d["expected"] == "3000000" and d["paid"] == "0"
    assert "ledger_disagrees" not in kinds(r)
    assert r.exit_code == 1
    # without the ledger the same chain shows it merely unpaid
    r2 = run([m], [tr(addr(1), 2 * U)])
    assert r2.payments[1].status == "unpaid" and r2.payments[1].reason is None


def test_transfers_of_zero_from_the_payer_are_counted_not_matched() -> None:
    """Anyone can emit Transfer(payer, x, 0) (USDC's transferFrom of 0 needs no allowance):
    it neither pays a payment (a failed one stays failed, an unpaid one unpaid), nor adds
    its hash to a paid one, nor is an unexplained outflow; the reports count it."""
    m = manifest([(addr(1), 2 * U), (addr(2), 3 * U), (addr(3), 4 * U)])
    reason = "Blacklistable: account is blacklisted"
    info = LedgerInfo({(m.root, 0): lpay("confirmed"), (m.root, 1): lpay("failed", reason=reason),
                       (m.root, 2): lpay("queued")})
    paid = tr(addr(1), 2 * U, tx="0x" + "aa" * 32)
    zeros = [tr(addr(1), 0, block=20), tr(addr(2), 0, block=21), tr(addr(3), 0, block=22),
             tr(addr(9), 0, block=23)]
    r = run([m], [paid, *zeros], info)
    assert [(p.status, p.paid, p.tx_hashes) for p in r.payments] == [
        ("paid", 2 * U, ("0x" + "aa" * 32,)), ("failed", 0, ()), ("unpaid", 0, ())]
    assert r.payments[1].reason == reason
    assert sorted(kinds(r)) == ["failed", "unpaid"]
    assert (r.unexplained_total, r.transfers_scanned, r.zero_transfers) == (0, 1, 4)
    assert r.progress.payments_failed == 1 and r.progress.on_track is not True
    assert json.loads(render(r, "json"))["zero_transfers_ignored"] == 4
    note = ("4 Transfer log(s) of 0 from the payer ignored: they move nothing, and anyone can "
            "emit one (address poisoning)")
    assert note in render(r, "table") and note in render(r, "html")


def test_ledger_says_failed_but_chain_paid_it() -> None:
    m = manifest([(addr(1), 2 * U)])
    info = LedgerInfo({(m.root, 0): lpay("failed", reason="refused")})
    r = run([m], [tr(addr(1), 2 * U)], info)
    assert r.payments[0].status == "paid"  # the chain is the truth
    d = one(r, "ledger_disagrees")
    assert (d["ledger_status"], d["chain_status"], d["paid"]) == ("failed", "paid", "2000000")
    assert r.exit_code == 1


def test_ledger_says_confirmed_but_chain_shows_nothing() -> None:
    m = manifest([(addr(1), 2 * U)])
    info = LedgerInfo({(m.root, 0): lpay("confirmed", hashes=["0xaa"], mined="0xaa")})
    r = run([m], [], info)
    assert r.payments[0].status == "unpaid"
    assert sorted(kinds(r)) == ["ledger_disagrees", "unpaid"]
    d = one(r, "ledger_disagrees")
    assert d["ledger_tx_hashes"] == ["0xaa"] and d["chain_status"] == "unpaid"
    # it says where it looked: the transfer may be before a --from-block
    d = one(run([m], [], info, from_block=7), "ledger_disagrees")
    assert d["detail"] == (f"the ledger says confirmed but no Transfer to {addr(1)} from the "
                           f"payer is in blocks 7..{HEAD}")


def test_ledger_confirmed_by_another_transaction_disagrees() -> None:
    m = manifest([(addr(1), 2 * U)])
    info = LedgerInfo({(m.root, 0): lpay("confirmed", hashes=["0xaa"], mined="0xaa")})
    r = run([m], [tr(addr(1), 2 * U, tx="0xbb")], info)
    assert r.payments[0].status == "paid"
    assert one(r, "ledger_disagrees")["tx_hashes"] == ["0xbb"]


def test_in_flight_payment_paid_on_chain_is_no_disagreement() -> None:
    m = manifest([(addr(1), 2 * U)])
    info = LedgerInfo({(m.root, 0): lpay("in_flight", hashes=["0xaa"])})
    r = run([m], [tr(addr(1), 2 * U, tx="0xaa")], info)
    assert r.exit_code == 0


def test_same_recipient_in_two_payments_matched_by_exact_amount() -> None:
    who = addr(7)
    m1 = manifest([(who, 3 * U), (addr(8), U)], prefix="a")
    m2 = manifest([(who, 5 * U)], prefix="b")
    # the larger payment lands first on chain: exact amounts, not order, decide
    r = run([m1, m2], [tr(who, 5 * U, block=3), tr(addr(8), U), tr(who, 3 * U, block=4)])
    assert [(p.id, p.status, p.paid) for p in r.payments] == [
        ("a-0", "paid", 3 * U), ("a-1", "paid", U), ("b-0", "paid", 5 * U)]
    assert r.exit_code == 0


def test_same_recipient_same_amount_uses_ledger_attribution() -> None:
    who = addr(7)
    m1 = manifest([(who, 3 * U)], prefix="a")
    m2 = manifest([(who, 3 * U)], prefix="b")
    only = tr(who, 3 * U, tx="0xbbbb")
    # without a ledger the first manifest in order takes the one transfer
    r = run([m1, m2], [only])
    assert [p.status for p in r.payments] == ["paid", "unpaid"]
    # the ledger says m2's batch carried it: attribution wins
    info = LedgerInfo({(m1.root, 0): lpay("queued"),
                       (m2.root, 0): lpay("confirmed", hashes=["0xaaaa", "0xBBBB"],
                                          mined="0xbbbb")})
    r2 = run([m1, m2], [only], info)
    assert [p.status for p in r2.payments] == ["unpaid", "paid"]
    assert "ledger_disagrees" not in kinds(r2)


def test_same_recipient_same_amount_twice_both_paid_and_a_third_is_a_repeat() -> None:
    who = addr(7)
    m = manifest([(who, 3 * U), (who, 3 * U)])
    r = run([m], [tr(who, 3 * U), tr(who, 3 * U)])
    assert [p.status for p in r.payments] == ["paid", "paid"]
    r3 = run([m], [tr(who, 3 * U), tr(who, 3 * U), tr(who, 3 * U)])
    assert sorted(p.status for p in r3.payments) == ["paid", "paid_twice"]
    assert r3.paid_total == 9 * U


# --- programs and ceilings ---------------------------------------------------------------


def two_programs() -> tuple[Manifest, Manifest, list[Transfer]]:
    relief = manifest([(addr(1), 100 * U), (addr(2), 50 * U)], program="relief")
    loans = manifest([(addr(3), 1_000 * U)], program="loans", prefix="l")
    return relief, loans, [tr(addr(1), 100 * U), tr(addr(2), 50 * U), tr(addr(3), 400 * U)]


def test_two_programs_each_with_its_own_ceiling() -> None:
    relief, loans, logs = two_programs()
    r = run([relief, loans], logs)
    assert r.program == "*"
    by = {p.program: p for p in r.programs}
    assert by["relief"].ceiling == 300_000_000 * U
    assert by["loans"].ceiling == 100_000_000 * U
    assert (by["relief"].committed, by["relief"].paid_total) == (150 * U, 150 * U)
    assert (by["loans"].committed, by["loans"].paid_total) == (1_000 * U, 400 * U)
    assert by["loans"].remaining == 100_000_000 * U - 400 * U
    assert r.ceiling == 400_000_000 * U
    assert r.paid_total == 550 * U and r.committed == 1_150 * U
    assert by["relief"].counts["paid"] == 2 and by["loans"].counts["underpaid"] == 1
    assert kinds(r) == ["underpaid"]


def test_program_filter_reports_one_program_and_never_calls_others_unexplained() -> None:
    relief, loans, logs = two_programs()
    r = run([relief, loans], logs, program="relief")
    assert r.program == "relief" and r.ceiling == 300_000_000 * U
    assert [p.program for p in r.programs] == ["relief"]
    assert {p.program for p in r.payments} == {"relief"}
    assert r.discrepancies == () and r.exit_code == 0  # loans' transfer is explained
    assert [m.root for m in r.manifests] == [relief.root]
    r2 = run([relief, loans], logs, program="loans")
    assert r2.paid_total == 400 * U and kinds(r2) == ["underpaid"]


def test_program_filter_keeps_the_outflows_of_its_own_payers_only() -> None:
    """A stray transfer from the payer of loans alone is not relief's finding: it made
    `reconcile --program relief` exit 1 with both payers listed."""
    relief = manifest([(addr(1), 100 * U)], program="relief")
    loans = manifest([(addr(3), 10 * U)], program="loans", prefix="l", payer=OTHER_PAYER)
    logs = [tr(addr(1), 100 * U), tr(addr(3), 10 * U, sender=OTHER_PAYER),
            tr(addr(8), 3 * U, sender=OTHER_PAYER)]
    r = run([relief, loans], logs, program="relief")
    assert (r.exit_code, r.discrepancies, r.unexplained_total, r.payers) == (
        0, (), 0, (PAYER,))
    assert r.transfers_scanned == 1  # the logs of relief's payer
    r = run([relief, loans], logs, program="loans")
    assert kinds(r) == ["unexplained_outflow"] and r.unexplained_total == 3 * U
    assert r.payers == (OTHER_PAYER,)
    r = run([relief, loans], logs)
    assert kinds(r) == ["unexplained_outflow"] and r.payers == (PAYER, OTHER_PAYER)
    # a payer of both programs: its stray transfer concerns both
    both = manifest([(addr(4), U)], program="relief", prefix="b", payer=OTHER_PAYER)
    r = run([relief, loans, both], [*logs, tr(addr(4), U, sender=OTHER_PAYER)],
            program="relief")
    assert kinds(r) == ["unexplained_outflow"] and r.payers == (PAYER, OTHER_PAYER)


def test_the_same_payments_under_another_header_are_refused() -> None:
    """paymentsRoot covers the payments only: a file with the ledger's root and another
    program or payer must not relabel what the ledger paid (it moved the paid total under
    another program's ceiling)."""
    relief = manifest([(addr(1), U)], program="relief")
    pays = list(relief.payments)
    for field, other in (
            ("program", manifest([(addr(1), U)], program="loans")),
            ("payer", manifest([(addr(1), U)], payer=OTHER_PAYER)),
            ("chain_id", make_manifest(program="relief", chain_id=1, token=TOKEN, payer=PAYER,
                                       not_after=2_000_000_000, payments=pays)),
            ("token", make_manifest(program="relief", chain_id=31337, token=OTHER_PAYER,
                                    payer=PAYER, not_after=2_000_000_000, payments=pays))):
        assert other.root == relief.root
        with pytest.raises(InputError, match=f"manifest {relief.root} appears with {field} "):
            dedupe([ManifestIn(relief, (), ("ledger",)), ManifestIn(other, (), ("m.json",))])
    later = manifest([(addr(1), U)], not_after=2_100_000_000)  # re-signed: the same payments
    assert len(dedupe([relief, later])) == 1


def test_unknown_program_and_no_manifests_are_input_errors() -> None:
    relief, loans, logs = two_programs()
    with pytest.raises(InputError, match="--program grants.*loans, relief"):
        run([relief, loans], logs, program="grants")
    with pytest.raises(InputError, match="no manifests"):
        run([], logs)


def test_over_ceiling() -> None:
    m = manifest([(addr(1), 60 * U), (addr(2), 50 * U)], program="loans")
    ceilings = Ceilings(default=300 * U, per_program={"loans": 100 * U})
    r = run([m], [tr(addr(1), 60 * U), tr(addr(2), 50 * U)], ceilings=ceilings)
    assert [p.status for p in r.payments] == ["paid", "paid"]
    d = one(r, "over_ceiling")
    assert d == {"kind": "over_ceiling", "program": "loans", "ceiling": "100000000",
                 "expected": "100000000", "paid": "110000000", "excess": "10000000"}
    c = one(r, "committed_over_ceiling")
    assert c["committed"] == "110000000"
    assert r.remaining == -10 * U and r.exit_code == 1


def test_the_ceiling_the_ledger_recorded_is_checked_when_no_setting_is_given() -> None:
    """An auditor's reconcile without the send's DISBURSER_CEILING (DESIGN's default of
    300,000,000 instead) still checks the ceiling the ledger accepted under."""
    m = manifest([(addr(1), 60 * U), (addr(2), 50 * U)], program="loans")
    logs = [tr(addr(1), 60 * U), tr(addr(2), 50 * U), tr(addr(2), 50 * U)]  # one paid twice
    info = LedgerInfo({}, {"loans": ProgramInfo(0, 2_000_000_000, 1, ceiling=120 * U,
                                                committed=110 * U)})
    plain = Ceilings(default=300_000_000 * U, from_setting=False)  # no DISBURSER_CEILING
    r = run([m], logs, info, ceilings=plain)
    assert one(r, "over_ceiling")["ceiling"] == str(120 * U)
    assert r.programs[0].ceiling == 120 * U and r.exit_code == 1
    note = ("program loans: checked against the ceiling of 120 tokens the ledger recorded "
            "when its latest manifest was accepted; the settings say 300000000")
    assert r.notes == (note,)
    assert note in render(r, "table") and json.loads(render(r, "json"))["notes"] == [note]
    # a DISBURSER_CEILING that is set is the operator's word, higher or lower
    for setting in (90 * U, 300_000_000 * U):
        given = run([m], logs, info, ceilings=Ceilings(default=setting))
        assert given.programs[0].ceiling == setting and given.notes == ()
    # a record below what the ledger accepted: an earlier version's first-acceptance
    # ceiling, raised since, is no ceiling to check
    old = LedgerInfo({}, {"loans": ProgramInfo(0, 2_000_000_000, 1, ceiling=100 * U,
                                               committed=110 * U)})
    r = run([m], logs, old, ceilings=plain)
    assert r.programs[0].ceiling == 300_000_000 * U and r.notes == ()


def test_same_manifest_twice_is_counted_once() -> None:
    m = manifest([(addr(1), 2 * U)])
    r = run([ManifestIn(m, (addr(50),), ("ledger",)), ManifestIn(m, (addr(51),), ("m.json",)),
             m], [tr(addr(1), 2 * U)])
    assert len(r.payments) == 1 and r.committed == 2 * U and r.exit_code == 0
    assert r.manifests[0].signers == (addr(50), addr(51))
    assert r.manifests[0].sources == ("ledger", "m.json")


def test_one_user_in_two_manifests_of_a_program_is_a_finding() -> None:
    """The same payments re-sorted (another root) and paid again: each manifest alone looks
    paid; the same id in both is the finding. The same id in another program is not."""
    a = manifest([(addr(1), 2 * U), (addr(2), 3 * U)])
    rev = make_manifest(program="relief", chain_id=31337, token=TOKEN, payer=PAYER,
                        not_after=2_000_000_000,
                        payments=[Payment(0, "u-1", addr(2), 3 * U),
                                  Payment(1, "u-0", addr(1), 2 * U)])
    loans = manifest([(addr(1), 2 * U)], program="loans")
    assert rev.root != a.root
    r = run([a, rev, loans], [tr(addr(1), 2 * U), tr(addr(2), 3 * U), tr(addr(1), 2 * U),
                              tr(addr(2), 3 * U), tr(addr(1), 2 * U)])
    found = [d for d in r.discrepancies if d["kind"] == "duplicate_id"]
    assert [(d["program"], d["id"], d["manifest"], d["paid"]) for d in found] == [
        ("relief", "u-0", rev.root, str(4 * U)), ("relief", "u-1", rev.root, str(6 * U))]
    assert found[0]["detail"] == (f"id also in {a.root} index 0 paid {2 * U} base units (a "
                                  "user is paid once per program)")
    assert r.exit_code == 1
    assert "duplicate_id" in render(r, "table")


def test_default_from_block_is_safe() -> None:
    m1 = manifest([(addr(1), U)], program="relief")
    m2 = manifest([(addr(1), U)], program="loans")
    progs = {"relief": ProgramInfo(0, 1, 40), "loans": ProgramInfo(0, 1, 30)}
    e = [ManifestIn(m1), ManifestIn(m2)]
    both = {(m1.root, 0): lpay("confirmed"), (m2.root, 0): lpay("confirmed")}
    assert default_from_block(e, LedgerInfo(both, progs)) == 30
    assert default_from_block(e, None) == 0
    # a program the ledger does not know (a file): scan from the start
    assert default_from_block(e, LedgerInfo(both, {"relief": progs["relief"]})) == 0
    # a MANIFEST file of a known program that the ledger has no payment of (another
    # ledger paid it, perhaps before this one's first block): from the start
    m3 = manifest([(addr(2), U)], program="relief")
    assert default_from_block([*e, ManifestIn(m3)], LedgerInfo(both, progs)) == 0
    # a re-created ledger found payments made before it: its first block is too late
    lost = LedgerInfo({(m1.root, 0): lpay("paid_elsewhere")}, progs)
    assert default_from_block(e, lost) == 0


def test_progress_against_the_deadline() -> None:
    m = manifest([(addr(i), U) for i in range(10)])
    logs = [tr(addr(i), U) for i in range(4)]
    start = 1_760_000_000
    info = LedgerInfo({}, {"relief": ProgramInfo(start, start + 96 * 3600, 1)})
    r = run([m], logs, info, now=start + 2 * 3600)
    p = r.progress
    assert (p.payments_done, p.payments_left, p.payments_total) == (4, 6, 10)
    assert p.payments_per_hour == 2 and p.amount_per_hour == 2 * U
    assert p.projected_finish == start + 2 * 3600 + 3 * 3600  # 6 left at 2 per hour
    assert p.on_track is True and p.finished is False
    assert r.deadline == start + 96 * 3600 and r.started_at == start
    late = run([m], logs, LedgerInfo({}, {"relief": ProgramInfo(start, start + 4 * 3600, 1)}),
               now=start + 2 * 3600)
    assert late.progress.on_track is False
    # Everything paid but one payment failed: finished, and not on track (a failed payment
    # is not paid by waiting).
    two = manifest([(addr(1), U), (addr(2), U)])
    failed = run([two], [tr(addr(1), U)], LedgerInfo(
        {(two.root, 0): lpay("confirmed"), (two.root, 1): lpay("failed", reason="x")},
        {"relief": ProgramInfo(start, start + 96 * 3600, 1)}), now=start + 3600)
    assert failed.progress.finished is True and failed.progress.payments_failed == 1
    assert failed.progress.on_track is False
    assert "NOT on track: 1 failed (--retry-failed)" in render(failed, "table")
    assert "BEHIND the deadline" in render(late, "table")
    assert f"deadline {when(start + 4 * 3600)} (4 h after the start)" in render(late, "table")
    assert f"deadline {when(start + 96 * 3600)} (96 h after the start)" in render(
        failed, "table")


# --- decoding and chunking ---------------------------------------------------------------


def raw_log(to: str, amount: int, block: int, index: int, *, sender: str = PAYER,
            removed: bool = False) -> dict[str, Any]:
    return {
        "address": TOKEN.lower(),
        "topics": [TRANSFER_TOPIC, "0x" + "0" * 24 + sender[2:].lower(),
                   "0x" + "0" * 24 + to[2:].lower()],
        "data": "0x" + format(amount, "064x"),
        "blockNumber": hex(block), "logIndex": hex(index),
        "transactionHash": "0x" + format(block * 100_000 + index, "064x"),
        "removed": removed,
    }


def test_decode_skips_removed_and_non_erc20_logs() -> None:
    good = raw_log(addr(1), 3 * 10**26, 5, 2)  # 18-decimal sized amounts stay exact
    removed = raw_log(addr(2), 5, 6, 0, removed=True)
    nft = dict(raw_log(addr(3), 5, 7, 0))
    nft["topics"] = [*nft["topics"], "0x" + "0" * 63 + "1"]
    nft["data"] = "0x"
    out: list[Transfer] = []
    decode_logs([good, removed, nft], out)
    assert out == [Transfer(5, 2, good["transactionHash"], PAYER.lower(), addr(1).lower(),
                            3 * 10**26)]


class FakeNode:
    """eth_getLogs over a fixed set of logs, refusing ranges wider than ``max_range``."""

    def __init__(self, logs: list[dict[str, Any]], max_range: int,
                 message: str = "query returned more than 10000 results") -> None:
        self.logs = logs
        self.max_range = max_range
        self.message = message
        self.calls: list[tuple[int, int, bool]] = []

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        assert method == "eth_getLogs"
        f = params[0]
        lo, hi = int(f["fromBlock"], 16), int(f["toBlock"], 16)
        if hi - lo + 1 > self.max_range:
            self.calls.append((lo, hi, False))
            raise NodeError(self.message, -32005)
        self.calls.append((lo, hi, True))
        return [lg for lg in self.logs if lo <= int(lg["blockNumber"], 16) <= hi]


def test_adaptive_chunks_halve_on_refusal_and_cover_every_block_once() -> None:
    logs = [raw_log(addr(b % 17), 1000 + b, b, 0) for b in range(0, 50_000, 7)]
    node = FakeNode(logs, max_range=3_000)
    got = fetch_transfers(node, TOKEN, [PAYER], 0, 49_999)
    assert [t.block for t in got] == [int(lg["blockNumber"], 16) for lg in logs]
    ok = [(lo, hi) for lo, hi, success in node.calls if success]
    assert ok[0][0] == 0 and ok[-1][1] == 49_999
    assert all(b[0] == a[1] + 1 for a, b in zip(ok, ok[1:], strict=False))  # no gap, overlap
    refused = [c for c in node.calls if not c[2]]
    # 100k -> 50k ... -> 1,562: six refusals to learn the limit, then few probes
    assert 6 <= len(refused) <= 9, node.calls
    assert max(hi - lo + 1 for lo, hi in ok) <= 3_000


@pytest.mark.parametrize("message", [
    "query returned more than 10000 results",
    "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range",
    "eth_getLogs is limited to a 10,000 range",
    "block range is too wide",
    "exceed maximum block range: 5000",
    "Requested range exceeds maximum range limit",
    "limit exceeded",
])
def test_provider_phrasings_shrink_the_range(message: str) -> None:
    assert too_much(NodeError(message, -32000))
    node = FakeNode([raw_log(addr(1), 5, 900, 0)], max_range=1_000, message=message)
    assert len(fetch_transfers(node, TOKEN, [PAYER], 0, 9_999)) == 1


def test_other_node_errors_are_not_swallowed() -> None:
    class Broken:
        def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
            raise NodeError("method not found", -32601)

    assert not too_much(NodeError("execution reverted", 3))
    with pytest.raises(NodeError, match="method not found"):
        fetch_transfers(Broken(), TOKEN, [PAYER], 0, 10)


def test_a_single_refused_block_is_an_rpc_error() -> None:
    node = FakeNode([], max_range=0)
    with pytest.raises(RpcError, match="single block"):
        fetch_transfers(node, TOKEN, [PAYER], 0, 10)


def test_parallel_ranges_give_the_same_transfers_each_block_once() -> None:
    logs = [raw_log(addr(b % 17), 1000 + b, b, b % 3) for b in range(0, 50_000, 7)]
    want = fetch_transfers(FakeNode(logs, max_range=3_000), TOKEN, [PAYER], 0, 49_999)
    clients: list[FakeNode] = []
    closed: list[FakeNode] = []

    class Client(FakeNode):
        def close(self) -> None:
            closed.append(self)

    def connect() -> FakeNode:
        clients.append(Client(logs, max_range=3_000))
        return clients[-1]

    got = fetch_transfers(FakeNode([], 0), TOKEN, [PAYER], 0, 49_999, workers=4,
                          connect=connect)
    assert got == want  # block order, as one range gives
    assert 1 <= len(clients) <= 4  # a client per thread, not per range
    assert sorted(map(id, closed)) == sorted(map(id, clients))  # each closed once, at the end
    ok = sorted((lo, hi) for c in clients for lo, hi, success in c.calls if success)
    assert ok[0][0] == 0 and ok[-1][1] == 49_999
    assert all(b[0] == a[1] + 1 for a, b in zip(ok, ok[1:], strict=False))
    # more workers than blocks: one range a block
    assert fetch_transfers(FakeNode(logs, 3_000), TOKEN, [PAYER], 7, 8, workers=4) == [
        t for t in want if 7 <= t.block <= 8]


def test_a_failing_range_raises_and_stops_the_others() -> None:
    class FailsLate(FakeNode):
        def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
            if int(params[0]["fromBlock"], 16) >= 30_000:
                raise NodeError("header not found", -32000)
            return super().rpc(method, params)

    node = FailsLate([raw_log(addr(1), 5, b, 0) for b in range(0, 40_000, 10)], 1_000)
    with pytest.raises(NodeError, match="header not found"):
        fetch_transfers(node, TOKEN, [PAYER], 0, 39_999, workers=4)
    # the others stop before their next chunk once one range has failed
    stop = Event()
    stop.set()
    idle = FakeNode([], 1_000)
    _fetch_range(idle, TOKEN, [], 0, 9_999, 100, 100, None, [].append, stop)
    assert idle.calls == []


def test_one_hundred_thousand_logs_reconcile_in_seconds() -> None:
    n = 100_000
    tos = ["0x" + format(0xDD0000 + i, "040x") for i in range(n)]
    payments = tuple(Payment(i, f"u{i}", tos[i], 1_000_000 + i) for i in range(n))
    # built directly: the pure core does not recompute the Merkle root
    m = Manifest("relief", 31337, TOKEN, PAYER, 2_000_000_000, payments, (), "0x" + "ab" * 32)
    raw = [raw_log(tos[i], 1_000_000 + i, 1 + i // 500, i % 500) for i in range(n)]
    raw[5]["data"] = "0x" + format(1, "064x")  # one underpaid
    t0 = time.perf_counter()
    logs: list[Transfer] = []
    decode_logs(raw, logs)
    r = reconcile([m], logs, None, CEILINGS, 1, 1_000)
    text = render(r, "json")
    elapsed = time.perf_counter() - t0
    assert r.counts["paid"] == n - 1 and r.counts["underpaid"] == 1
    assert json.loads(text)["paid_total"] == str(sum(1_000_000 + i for i in range(n))
                                                  - 1_000_005 + 1)
    assert elapsed < 5.0, f"{n} logs took {elapsed:.2f} s"


# --- renderers -----------------------------------------------------------------------------


def mixed_result() -> Result:
    m = manifest([(addr(1), 2 * U), (addr(2), 3 * U), (addr(3), U)])
    info = LedgerInfo({(m.root, 2): lpay("failed", reason="<b>blacklisted</b> & more")})
    return run([m], [tr(addr(1), 2 * U), tr(addr(2), U), tr(addr(9), 5)], info)


def test_json_contract() -> None:
    r = mixed_result()
    doc = json.loads(render(r, "json"))
    for key in ("program", "ceiling", "paid_total", "remaining", "counts", "discrepancies",
                "payments", "committed", "programs", "manifests", "chain_id", "token",
                "payer", "head_block", "deadline", "started_at", "progress"):
        assert key in doc, key
    assert set(doc["counts"]) == set(STATUSES)
    assert doc["paid_total"] == "3000000" and doc["unexplained_total"] == "5"
    assert doc["remaining"] == str(300_000_000 * U - 3 * U)
    p = doc["payments"][2]
    assert p["status"] == "failed" and p["reason"] == "<b>blacklisted</b> & more"
    assert set(p) >= {"manifest", "index", "id", "to", "amount", "paid", "status",
                      "tx_hashes"}
    assert all(isinstance(x["amount"], str) and isinstance(x["paid"], str)
               for x in doc["payments"])
    assert "reason" not in doc["payments"][0]
    assert sorted(d["kind"] for d in doc["discrepancies"]) == [
        "failed", "underpaid", "unexplained_outflow"]


def test_csv_has_one_row_per_payment_then_one_per_finding_no_payment_row_shows() -> None:
    """An unexplained outflow was only in the exit code: the CSV showed every payment paid
    or failed and no trace of the stranger's transfer."""
    r = mixed_result()
    rows = list(csv.reader(io.StringIO(render(r, "csv"))))
    assert rows[0] == ["manifest", "index", "id", "to", "amount", "paid", "status", "reason",
                       "tx_hashes"]
    assert [r[6] for r in rows[1:]] == ["paid", "underpaid", "failed", "unexplained_outflow"]
    assert rows[2][4:6] == ["3000000", "1000000"]
    (out,) = [d for d in r.discrepancies if d["kind"] == "unexplained_outflow"]
    assert rows[4] == ["", "", "", addr(9), "0", "5", "unexplained_outflow",
                       f"from {PAYER}; block 10", out["tx_hash"]]


def test_csv_rows_of_ceiling_and_ledger_findings() -> None:
    m = manifest([(addr(1), 2 * U)])
    info = LedgerInfo({(m.root, 0): lpay("confirmed", hashes=("0x" + "ab" * 32,),
                                          mined="0x" + "ab" * 32)})
    r = run([m], [], info, ceilings=Ceilings(default=U))
    rows = {row[6]: row for row in csv.reader(io.StringIO(render(r, "csv")))}
    assert rows["committed_over_ceiling"] == [
        "", "", "", "", str(U), "", "committed_over_ceiling",
        f"program relief; ceiling {U}; committed {2 * U}; excess {U}", ""]
    dis = rows["ledger_disagrees"]
    assert dis[:7] == [m.root, "0", "u-0", addr(1), str(2 * U), "0", "ledger_disagrees"]
    assert dis[7].startswith("program relief; ledger_status confirmed; chain_status unpaid; "
                             "ledger tx 0x" + "ab" * 32)


def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_text() -> None:
    """Ids come from outside: one that begins like a formula is written with a leading '
    (CSV injection); the JSON report keeps it exactly."""
    # one that begins with ' gets one more, so that it does not print as the id after it
    ids = ['=HYPERLINK("http://evil","x")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)",
           "\t=tab", "'-2+3", "plain-id", "a=b", "a;=1+1"]
    pays = [Payment(i, pid, addr(i + 1), U) for i, pid in enumerate(ids)]
    m = make_manifest(program="relief", chain_id=31337, token=TOKEN, payer=PAYER,
                      not_after=2_000_000_000, payments=pays)
    r = run([m], [tr(addr(i + 1), U) for i in range(len(ids))])
    text = render(r, "csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert [row[2] for row in rows[1:]] == ["'" + i for i in ids[:6]] + ids[6:]
    # every cell quoted: a spreadsheet splitting on ';' keeps "a;=1+1" in one cell
    assert all(line.startswith('"') and line.endswith('"') for line in text.splitlines())
    assert [p["id"] for p in json.loads(render(r, "json"))["payments"]] == ids


def test_table_and_html_show_tokens_and_escape() -> None:
    r = mixed_result()
    table = render(r, "table")
    assert "300,000,000" in table and "underpaid" in table and "NOT consistent" in table
    html = render(r, "html")
    assert "<b>blacklisted</b>" not in html and "&lt;b&gt;blacklisted&lt;/b&gt;" in html
    assert "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert html.count("<svg") == 3  # no timeline without charts data: no zoomed chart
    assert tokens(1_234_567_500_000, 6) == "1,234,567.5"
    assert tokens(-5, 6) == "-0.000005"


def test_all_programs_are_on_track_only_if_each_is() -> None:
    """At 95 h, loans (deadline 96 h) has 5 of 10 paid and will miss it; relief (deadline
    186 h) is paid. Pooled from the first start against the last deadline, the top-level
    progress said on track, projected at 127 h: what a dashboard reading the JSON sees."""
    h = 3600
    a = manifest([(addr(i), U) for i in range(1, 11)], program="loans", prefix="a")
    b = manifest([(addr(i), U) for i in range(20, 30)], program="relief", prefix="b")
    info = LedgerInfo({}, {"loans": ProgramInfo(0, 96 * h, 5, 100_000_000 * U, 10 * U),
                           "relief": ProgramInfo(90 * h, 186 * h, 5, 300_000_000 * U,
                                                 10 * U)})
    transfers = [tr(addr(i), U) for i in range(1, 6)] + [tr(addr(i), U) for i in range(20, 30)]
    r = run([a, b], transfers, info, now=95 * h)
    doc = json.loads(render(r, "json"))
    progs = {p["program"]: p["progress"] for p in doc["programs"]}
    assert (progs["loans"]["on_track"], progs["relief"]["on_track"]) == (False, True)
    assert doc["progress"]["on_track"] is False
    assert doc["progress"]["projected_finish"] == progs["loans"]["projected_finish"] == 190 * h


def test_a_revert_reason_reaches_the_table_without_control_characters() -> None:
    """The token's revert reason is printed in the table: a newline broke its grid and an
    escape sequence reached the terminal. JSON keeps the reason as it was."""
    m = manifest([(addr(1), 2 * U)])
    reason = "blocked\n\x1b[31mred"
    info = LedgerInfo({(m.root, 0): lpay("failed", reason=reason)})
    r = run([m], [], info)
    table = render(r, "table")
    assert "blocked\\n\\x1b[31mred" in table and "\x1b" not in table
    assert json.loads(render(r, "json"))["payments"][0]["reason"] == reason
