"""Send on a real Anvil, both modes: balances on chain, rows in the ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from disburser import chain as ch
from disburser import devnet as dn
from disburser import manifest as mf
from disburser.amounts import format_units
from disburser.domain import PaymentStatus, TxStatus
from disburser.ledger import HISTORY_CHECKED, PAID_BY_BITMAP, PAID_BY_TRANSFER, Ledger
from tests.conftest import Env, fresh_address
from tests.faultproxy import FaultProxy


def _ledger(env: Env) -> Ledger:
    return Ledger(Path(env.vars["DISBURSER_DB"]))


def _signed_from_csv(env: Env, name: str, program: str, csv_text: str) -> Path:
    """A manifest built from ``csv_text`` (id,to,amount) and signed by two approvers."""
    csv_path = env.tmp / f"{name}.csv"
    csv_path.write_text(csv_text)
    out = env.tmp / f"{name}.json"
    assert env.cli("manifest", "build", str(csv_path), "--program", program, "-o",
                   str(out)).code == 0
    for i in (0, 1):
        assert env.cli("manifest", "sign", str(out), "--private-key-env",
                       f"APPROVER_{i}").code == 0
    return out


def _assert_all_paid_once(env: Env, manifest: Path) -> None:
    m = mf.load(manifest)
    for p in m.payments:
        assert env.balance(p.to) == p.amount, (p.index, p.to)


@pytest.mark.parametrize("mode", ["batch", "direct"])
def test_send_pays_everyone_exactly_once(env: Env, mode: str) -> None:
    n = 40 if mode == "direct" else 120
    m = env.signed_manifest(n)
    before = env.balance(dn.PAYER)
    r = env.cli("send", str(m), "--yes", "--mode", mode, extra={"DISBURSER_BATCH_SIZE": "50"})
    assert r.code == 0, r.err
    assert f"confirmed {n}, failed 0, unpaid 0" in r.out
    manifest = mf.load(m)
    _assert_all_paid_once(env, m)
    assert env.balance(dn.PAYER) == before - manifest.total
    led = _ledger(env)
    rows = led.payments(manifest.root)
    assert {r.status for r in rows} == {PaymentStatus.CONFIRMED.value}
    txs = led.txs(dn.PAYER)
    assert all(t.status == TxStatus.CONFIRMED.value for t in txs)
    # nonces are contiguous from the payer's first one, and the chain agrees
    assert [t.nonce for t in txs] == list(range(txs[0].nonce, txs[0].nonce + len(txs)))
    assert env.payer_nonce() == txs[-1].nonce + 1
    if mode == "batch":
        assert [t.kind for t in txs] == ["approve", "batch", "batch", "batch"]
        # allowance ends at zero: never more than what is still owed
        assert env.chain.allowance(env.devnet.token, dn.PAYER, env.devnet.batch_contract) == 0
    else:
        assert [t.kind for t in txs] == ["direct"] * n
    # every attempt's raw bytes were stored before broadcast: hash of raw == stored hash
    from eth_utils import keccak
    for t in txs:
        for a in led.attempts(t.id or 0):
            assert "0x" + keccak(bytes.fromhex(a.raw[2:])).hex() == a.hash

    # Re-running on a finished manifest sends nothing.
    nonce = env.payer_nonce()
    r = env.cli("send", str(m), "--yes", "--mode", mode)
    assert r.code == 0, r.err
    assert "in 0 new transaction(s)" in r.out
    assert env.payer_nonce() == nonce


@pytest.mark.parametrize("automine", [True, False])
def test_two_batches_go_in_one_request_later_nonce_first_only_to_a_node_mining_on_arrival(
        env: Env, automine: bool) -> None:
    """Six batches: windows of 1, 4 and 1, the window of 4 as two requests of two. To Anvil
    on automine the later nonce goes first (held for the gap, then mined with the earlier
    one in one block); to a node mining on a clock, in nonce order (a busy pool may refuse
    a nonce that arrives before the one below it)."""
    if not automine:
        env.chain.rpc("evm_setAutomine", [False])
        env.chain.rpc("evm_setIntervalMining", [1])
    assert env.chain.mines_on_arrival() is automine
    m = env.signed_manifest(120)
    with FaultProxy(env.devnet.url) as proxy:
        r = env.cli("send", str(m), "--yes", extra={"DISBURSER_RPC_URL": proxy.url,
                                                    "DISBURSER_BATCH_SIZE": "20"})
    assert r.code == 0, r.err
    _assert_all_paid_once(env, m)
    led = _ledger(env)
    nonce_of = {a.raw: t.nonce for t in led.txs(dn.PAYER) for a in led.attempts(t.id or 0)}
    sends = [[nonce_of[c["params"][0]] for c in req] for req in proxy.requests
             if isinstance(req, list) and req
             and all(c["method"] == "eth_sendRawTransaction" for c in req)]
    batches = [t.nonce for t in led.txs(dn.PAYER) if t.kind == "batch"]
    assert len(batches) == 6
    pairs = [[batches[1], batches[2]], [batches[3], batches[4]]]
    assert sends == ([p[::-1] for p in pairs] if automine else pairs)
    logged = [e for e in map(json.loads, Path(env.vars["DISBURSER_LOG_FILE"]).read_text()
                             .splitlines()) if e.get("event") == "broadcasting"]
    assert [e["pairs_later_nonce_first"] for e in logged] == [automine]


def test_lost_ledger_batch_mode_pays_no_one_twice(env: Env) -> None:
    m = env.signed_manifest(60)
    assert env.cli("send", str(m), "--yes").code == 0
    Path(env.vars["DISBURSER_DB"]).unlink()
    # The payer spent the rest: a dry run on the lost ledger reads the bitmap (all paid)
    # and does not refuse what the real run does.
    rest = env.balance(dn.PAYER)
    dn.send_as(env.chain, dn.PAYER, env.devnet.token, dn.abi_call(
        "transfer(address,uint256)", ["address", "uint256"], [dn.OWNER, rest]))
    r = env.cli("send", str(m), "--dry-run")
    assert r.code == 0 and r.out.startswith("dry run: would pay 0 of 60 payments")
    assert "warning" not in r.err and r.err.startswith("note: this ledger does not know")
    assert not Path(env.vars["DISBURSER_DB"]).exists()
    r = env.cli("send", str(m), "--yes")
    assert r.code == 0, r.err
    _assert_all_paid_once(env, m)
    led = _ledger(env)
    assert {p.status for p in led.payments(mf.load(m).root)} == {"paid_elsewhere"}
    assert [t.kind for t in led.txs()] == []  # the bitmap said all paid: nothing sent


def test_payments_paid_through_the_contract_in_another_token_are_paid_in_this_one(
        env: Env) -> None:
    """The payer once ran the manifest's payments through the batch contract in another
    token (a rehearsal token; USDC.e for native USDC). The bitmap was keyed by (payer, root):
    send recorded all three as paid elsewhere, sent nothing and exited 0, and no recipient
    held any USDC."""
    m = env.signed_manifest(3)
    man = mf.load(m)
    other = "0x" + "11" * 20
    dn.place_token(env.chain, address=other, name="Rehearsal", symbol="RHS")
    dn.mint(env.chain, other, dn.PAYER, 10**9)
    dn.send_as(env.chain, dn.PAYER, other, ch.enc_approve(env.devnet.batch_contract, 10**9))
    dn.send_as(env.chain, dn.PAYER, env.devnet.batch_contract, ch.enc_disburse(
        other, man.root, [p.index for p in man.payments], [p.to for p in man.payments],
        [p.amount for p in man.payments]))
    r = env.cli("send", str(m), "--yes")
    assert r.code == 0, r.err
    assert "confirmed 3, failed 0, unpaid 0" in r.out
    _assert_all_paid_once(env, m)
    assert {p.status for p in _ledger(env).payments(man.root)} == {"confirmed"}
    assert [t.kind for t in _ledger(env).txs()] == ["approve", "batch"]


def test_a_dry_run_with_a_lost_ledger_reads_the_bitmap_and_says_what_it_does_not_read(
        env: Env) -> None:
    """A manifest paid in full, then the ledger lost: the dry run said "would pay 3 of 3"
    (review helper-53). It reads the batch contract's bitmap as the real run does, and says
    that the real run also reads the payer's past transfers first."""
    m = env.signed_manifest(3)
    assert env.cli("send", str(m), "--yes").code == 0
    Path(env.vars["DISBURSER_DB"]).unlink()
    for mode in ("batch", "direct"):  # direct mode reads a configured BatchPayout's too
        r = env.cli("send", str(m), "--dry-run", "--mode", mode)
        assert r.code == 0, r.err
        assert r.out.startswith("dry run: would pay 0 of 3 payments, 0 tokens, in about 0 ")
    assert r.err == ("note: this ledger does not know this manifest and did not see the "
                     "payer's first transaction: the real run first reads the payer's past "
                     "transfers and stops, sending nothing, if any may be these payments\n")
    assert not Path(env.vars["DISBURSER_DB"]).exists()


@pytest.mark.parametrize("again", ["direct", "batch"])
def test_lost_ledger_direct_mode_pays_no_one_twice(env: Env, again: str) -> None:
    """Direct transfers leave no bitmap: a re-created ledger reads the payer's Transfer logs,
    stops before sending anything when they match payments, and with
    --accept-past-transfers records those payments as paid elsewhere, in either mode."""
    m = env.signed_manifest(6)
    manifest = mf.load(m)
    assert env.cli("send", str(m), "--yes", "--mode", "direct").code == 0
    Path(env.vars["DISBURSER_DB"]).unlink()
    nonce = env.payer_nonce()
    r = env.cli("send", str(m), "--yes", "--mode", again)
    assert r.code == 2, r.err
    p0 = manifest.payments[0]
    err = r.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"disburser: error: 6 payment(s) of manifest {manifest.root} go to recipients of "
        f"transfers from the payer that this ledger did not send (first: payments[0] "
        f"{p0.amount} base units to {p0.to}, paid by transaction 0x"), r.err
    assert "run `send --accept-past-transfers`" in err[0] and err[0].endswith(
        "Nothing was sent")
    assert env.payer_nonce() == nonce
    _assert_all_paid_once(env, m)
    lines = [json.loads(x) for x in Path(env.vars["DISBURSER_LOG_FILE"]).read_text()
             .splitlines()]
    matches = [x for x in lines if x["event"] == "past_transfer_matches_payment"]
    assert sorted(x["index"] for x in matches) == list(range(6))
    led = _ledger(env)
    assert led.txs() == [] and led.events(HISTORY_CHECKED) == []
    assert {p.status for p in led.payments(manifest.root)} == {"queued"}

    r = env.cli("send", str(m), "--yes", "--mode", again, "--accept-past-transfers")
    assert r.code == 0, r.err
    assert "confirmed 6, failed 0, unpaid 0" in r.out
    assert "in 0 new transaction(s)" in r.out
    assert env.payer_nonce() == nonce
    _assert_all_paid_once(env, m)
    assert {(p.status, p.reason) for p in led.payments(manifest.root)} == {
        ("paid_elsewhere", PAID_BY_TRANSFER)}
    assert led.txs() == []
    (checked,) = led.events(HISTORY_CHECKED)
    assert json.loads(checked.data)["found"] == 6
    # reconcile reads the same logs and agrees: every payment paid once
    r = env.cli("reconcile", "--format", "json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["counts"]["paid"] == 6 and report["discrepancies"] == []
    assert sum(report["counts"].values()) == 6


def test_payments_made_by_hand_before_the_ledger_are_not_paid_again(env: Env) -> None:
    """Two payments of one recipient and amount, one of them paid by hand: one Transfer
    pays one payment. A transfer of another amount to a recipient stops the run too (it may
    be a lost ledger's payment of an amount since corrected); accepted, the payment is
    recorded paid elsewhere and reconcile shows what the chain paid: underpaid."""
    a, b, c = (fresh_address(f"hand{i}") for i in range(3))
    out = _signed_from_csv(env, "hand", "p",
                           f"id,to,amount\nu0,{a},1\nu1,{a},1\nu2,{b},2\nu3,{c},3\n")
    for to, amount in ((a, 1_000_000), (b, 500_000), (c, 3_000_000)):
        dn.send_as(env.chain, dn.PAYER, env.devnet.token, dn.abi_call(
            "transfer(address,uint256)", ["address", "uint256"], [to, amount]))
    nonce = env.payer_nonce()
    r = env.cli("send", str(out), "--yes", "--mode", "direct")
    assert r.code == 2 and "3 payment(s) of manifest" in r.err, r.err
    assert env.payer_nonce() == nonce
    r = env.cli("send", str(out), "--yes", "--mode", "direct", "--accept-past-transfers")
    assert r.code == 0, r.err
    assert "confirmed 4, failed 0, unpaid 0" in r.out
    assert "in 1 new transaction(s)" in r.out
    assert (env.balance(a), env.balance(b), env.balance(c)) == (2_000_000, 500_000,
                                                                 3_000_000)
    rows = {p.idx: p.status for p in _ledger(env).payments(mf.load(out).root)}
    assert rows == {0: "paid_elsewhere", 1: "confirmed", 2: "paid_elsewhere",
                    3: "paid_elsewhere"}
    r = env.cli("reconcile", "--format", "json")
    assert r.code == 1
    assert [(p["index"], p["status"], p["paid"]) for p in json.loads(r.out)["payments"]] == [
        (0, "paid", "1000000"), (1, "paid", "1000000"), (2, "underpaid", "500000"),
        (3, "paid", "3000000")]


@pytest.mark.parametrize(("mode", "contract"), [
    ("batch", True), ("direct", True), ("direct", False)])
def test_a_new_ledger_and_the_batch_contracts_transfers(
        env: Env, mode: str, contract: bool) -> None:
    """Manifest A paid in batch mode, then the ledger is lost. A again pays nothing: the
    bitmap says so (read in direct mode too when DISBURSER_BATCH_CONTRACT is set); without
    the contract setting, A's transfers in a contract's transactions for A stop the run.
    Manifest B of another program, with A's recipients and amounts, is paid in full: A's
    batch transfers (their Disbursed logs name A) are not taken for B's payments."""
    extra = {} if contract else {"DISBURSER_BATCH_CONTRACT": ""}
    a = env.signed_manifest(5, name="a.json")
    assert env.cli("send", str(a), "--yes").code == 0
    Path(env.vars["DISBURSER_DB"]).unlink()
    nonce = env.payer_nonce()
    r = env.cli("send", str(a), "--yes", "--mode", mode, extra=extra)
    if contract:
        assert r.code == 0, r.err
        assert "confirmed 5, failed 0, unpaid 0" in r.out
        assert {p.reason for p in _ledger(env).payments(mf.load(a).root)} == {PAID_BY_BITMAP}
    else:
        assert r.code == 2 and "5 payment(s) of manifest" in r.err, r.err
    assert env.payer_nonce() == nonce
    rows = (env.tmp / "a.json.csv").read_text().splitlines()
    b = _signed_from_csv(env, "b", "other",
                         "\n".join([rows[0], *("b-" + row for row in rows[1:])]) + "\n")
    r = env.cli("send", str(b), "--yes", "--mode", mode, extra=extra)
    assert r.code == 0, r.err
    assert "confirmed 5, failed 0, unpaid 0" in r.out
    for p in mf.load(a).payments:
        assert env.balance(p.to) == 2 * p.amount


@pytest.mark.parametrize("again", ["direct", "batch"])
def test_a_lost_ledger_then_a_corrected_allocation_pays_no_one_twice(env: Env,
                                                                     again: str) -> None:
    """Paid in direct mode, the ledger lost, then the allocation corrected by one base unit
    a user and re-signed: no past transfer had the new amounts and direct mode leaves no
    Disbursed log, so every user was paid again, over the ceiling (review helper-55). The
    payer's past transfers to the same recipients now stop the run, nothing sent."""
    m1 = env.signed_manifest(4, name="m1.json")
    assert env.cli("send", str(m1), "--yes", "--mode", "direct").code == 0
    Path(env.vars["DISBURSER_DB"]).unlink()
    rows = (env.tmp / "m1.json.csv").read_text().splitlines()
    fixed = [rows[0]] + [r[:r.rindex(",")] + "," + r[r.rindex(",") + 1:] + "0001"
                         for r in rows[1:]]  # 1.25 -> 1.250001
    m2 = _signed_from_csv(env, "m2", "together-initiative-2025-10", "\n".join(fixed) + "\n")
    first = mf.load(m2).payments[0]
    assert first.amount == mf.load(m1).payments[0].amount + 1
    nonce = env.payer_nonce()
    r = env.cli("send", str(m2), "--yes", "--mode", again)
    assert r.code == 2, r.err
    assert (f"4 payment(s) of manifest {mf.load(m2).root} go to recipients of transfers from "
            f"the payer that this ledger did not send (first: payments[0] {first.amount} base "
            f"units to {first.to}, paid {first.amount - 1} base units by transaction 0x") in r.err
    assert env.payer_nonce() == nonce
    _assert_all_paid_once(env, m1)


def test_a_lost_ledger_does_not_pay_a_programs_users_again_under_another_root(
        env: Env) -> None:
    """Manifest A paid in batch mode, the ledger lost, then the same payments re-sorted (so
    another root, whose bitmap knows nothing): the payer's batch transfers for A, a
    manifest this ledger does not know, match them, and the run stops with nothing sent.
    Accepted, they are paid elsewhere. In a new ledger that records A first (its bitmap
    pays nothing), the re-sorted manifest is refused: a user is paid once per program."""
    a = env.signed_manifest(5, name="a.json")
    assert env.cli("send", str(a), "--yes").code == 0
    Path(env.vars["DISBURSER_DB"]).unlink()
    rows = (env.tmp / "a.json.csv").read_text().splitlines()
    rev = _signed_from_csv(env, "rev", "together-initiative-2025-10",
                           "\n".join([rows[0], *reversed(rows[1:])]) + "\n")
    assert mf.load(rev).root != mf.load(a).root
    nonce = env.payer_nonce()
    r = env.cli("send", str(rev), "--yes")
    assert r.code == 2, r.err
    assert f"5 payment(s) of manifest {mf.load(rev).root} go to recipients of transfers" in r.err
    assert env.payer_nonce() == nonce
    _assert_all_paid_once(env, a)
    r = env.cli("send", str(rev), "--yes", "--accept-past-transfers")
    assert r.code == 0, r.err
    assert "confirmed 5, failed 0, unpaid 0" in r.out and "in 0 new transaction(s)" in r.out
    assert {p.status for p in _ledger(env).payments(mf.load(rev).root)} == {"paid_elsewhere"}
    third = {"DISBURSER_DB": str(env.tmp / "third.sqlite")}
    r = env.cli("send", str(a), "--yes", extra=third)
    assert r.code == 0, r.err
    assert "in 0 new transaction(s)" in r.out
    r = env.cli("send", str(rev), "--yes", extra=third)
    assert r.code == 2 and "is already in manifest" in r.err, r.err
    assert env.payer_nonce() == nonce
    _assert_all_paid_once(env, a)


def test_a_second_ledger_does_not_go_over_the_ceiling(env: Env) -> None:
    """A ledger that does not know a manifest the payer paid stops before paying another:
    only a ledger counts a program's ceiling. Sending the paid manifest with that ledger,
    as the refusal says, brings the ceiling back into play."""
    program = "together-initiative-2025-10"
    first = _signed_from_csv(env, "first", program, "id,to,amount\n" + "".join(
        f"f{i},{fresh_address(f'first{i}')},10\n" for i in range(2)))
    second = _signed_from_csv(env, "second", program, "id,to,amount\n" + "".join(
        f"s{i},{fresh_address(f'second{i}')},10\n" for i in range(2)))
    ceiling = {"DISBURSER_CEILING": f"{program}=30"}
    assert env.cli("send", str(first), "--yes", extra=ceiling).code == 0
    other = {**ceiling, "DISBURSER_DB": str(env.tmp / "other.sqlite")}
    nonce = env.payer_nonce()
    r = env.cli("send", str(second), "--yes", extra=other)
    assert r.code == 2, r.err
    assert r.err.startswith(
        "disburser: error: the payer paid 1 manifest(s) that this ledger does not know "
        f"(first: {mf.load(first).root}, in transaction 0x"), r.err
    assert env.payer_nonce() == nonce
    assert [env.balance(p.to) for p in mf.load(second).payments] == [0, 0]
    lines = [json.loads(x) for x in Path(env.vars["DISBURSER_LOG_FILE"]).read_text()
             .splitlines()]
    assert [x["other"] for x in lines if x["event"] == "payer_paid_unknown_manifest"] == [
        mf.load(first).root]
    # As the refusal says: the paid manifest, with this ledger.
    r = env.cli("send", str(first), "--yes", extra=other)
    assert r.code == 2 and "exceeds the ceiling" in r.err, r.err
    assert env.payer_nonce() == nonce
    assert [env.balance(p.to) for p in mf.load(second).payments] == [0, 0]


def test_lost_ledger_with_a_batch_replayed_on_chain_pays_no_one_twice(env: Env) -> None:
    """Even sending the same batch calldata again (a lost ledger and no pre-check), the
    contract's bitmap skips every payment already made."""
    m = env.signed_manifest(20)
    assert env.cli("send", str(m), "--yes").code == 0
    led = _ledger(env)
    batch = next(t for t in led.txs() if t.kind == "batch")
    manifest = mf.load(m)
    dn.send_as(env.chain, dn.PAYER, env.devnet.token, dn.abi_call(
        "approve(address,uint256)", ["address", "uint256"],
        [env.devnet.batch_contract, manifest.total]))
    dn.send_as(env.chain, dn.PAYER, batch.to, batch.data)
    _assert_all_paid_once(env, m)


def test_blacklisted_recipient_blocks_no_one(env: Env) -> None:
    m = env.signed_manifest(30)
    manifest = mf.load(m)
    victim = manifest.payments[17]
    dn.send_as(env.chain, dn.OWNER, env.devnet.token,
               dn.abi_call("blacklist(address)", ["address"], [victim.to]))
    r = env.cli("send", str(m), "--yes")
    assert r.code == 1
    assert "confirmed 29, failed 1, unpaid 0" in r.out
    assert (f"failed: payments[17] {victim.id} {victim.to}: Blacklistable: account is "
            "blacklisted") in r.err
    for p in manifest.payments:
        assert env.balance(p.to) == (0 if p.index == 17 else p.amount)
    row = _ledger(env).payments(manifest.root, [PaymentStatus.FAILED])
    assert [(x.idx, x.reason) for x in row] == [(17, "Blacklistable: account is blacklisted")]
    # the allowance left for the failed payment is withdrawn at the end
    assert env.chain.allowance(env.devnet.token, dn.PAYER, env.devnet.batch_contract) == 0
    # a failed payment is not paid by waiting: status never says "on track" with one
    r = env.cli("status", "--json")
    (prog,) = json.loads(r.out)["programs"]
    assert prog["on_track"] is False and prog["payments"]["failed"] == 1
    text = env.cli("status").out
    assert "NOT on track: 1 failed (see OPERATIONS, --retry-failed)" in text
    # the failed payment is still committed: a new manifest may total only what is left
    failed = manifest.payments[17].amount
    assert int(prog["uncommitted"]) == int(prog["ceiling"]) - manifest.total
    assert int(prog["remaining_under_ceiling"]) == int(prog["uncommitted"]) + failed
    assert (f"uncommitted {format_units(int(prog['uncommitted']), 6)} (what a new manifest "
            "of this program may still total)") in text


def test_blacklisted_recipient_direct_mode(env: Env) -> None:
    m = env.signed_manifest(6)
    manifest = mf.load(m)
    dn.send_as(env.chain, dn.OWNER, env.devnet.token,
               dn.abi_call("blacklist(address)", ["address"], [manifest.payments[2].to]))
    r = env.cli("send", str(m), "--yes", "--mode", "direct")
    assert r.code == 1 and "confirmed 5, failed 1, unpaid 0" in r.out
    assert env.balance(manifest.payments[2].to) == 0
    assert "(--retry-failed sends them again once the cause is fixed)" in r.err
    # a dry run of the retry counts the failed payment
    r = env.cli("send", str(m), "--retry-failed", "--dry-run", "--mode", "direct")
    assert r.code == 0, r.err
    assert f"would pay 1 of 6 payments, {format_units(manifest.payments[2].amount, 6)} " in r.out


def test_foreign_nonce_fails_closed(env: Env) -> None:
    first = env.signed_manifest(5, name="a.json", seed="a")
    assert env.cli("send", str(first), "--yes").code == 0
    # Someone else uses the payer key.
    h = dn.send_as(env.chain, dn.PAYER, dn.OWNER, "0x", value=1)["transactionHash"]
    second = env.signed_manifest(5, name="b.json", seed="b")
    nonce = env.payer_nonce()
    # The dry run said "would pay": it now makes the same check as the real run.
    for args in (["--dry-run"], ["--yes"]):
        r = env.cli("send", str(second), *args)
        assert r.code == 2
        assert (f"nonce {nonce - 1} was used by transaction {h} that this ledger did not "
                "send; stopping rather than guessing (another wallet or process uses this "
                "key, or this ledger is an older copy of the one that sent it)") in r.err
        assert env.payer_nonce() == nonce


def test_status_json(env: Env) -> None:
    m = env.signed_manifest(10)
    assert env.cli("send", str(m), "--yes").code == 0
    r = env.cli("status", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    (p,) = d["programs"]
    assert p["payments"]["confirmed"] == 10
    assert p["paid"] == p["committed"] == str(mf.load(m).total)
    assert p["owed"] == "0"
    assert p["uncommitted"] == str(int(p["ceiling"]) - mf.load(m).total)
    assert p["remaining_under_ceiling"] == p["uncommitted"]  # all paid
    assert p["all_paid"] and p["on_track"]
    assert d["in_flight"] == []
    assert d["allowance"] == "0"
    assert "  finish      all paid (deadline " in env.cli("status").out
    # The same from the environment (DISBURSER_<NAME> for every option, DESIGN.md).
    r = env.cli("status", extra={"DISBURSER_JSON": "1"})
    assert r.code == 0, r.err

    def timeless(programs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The rate and the projected finish (now, once all is paid) move with the clock
        # between the two calls.
        return [{k: v for k, v in q.items() if k not in ("rate_per_s", "projected_finish")}
                for q in programs]

    assert timeless(json.loads(r.out)["programs"]) == timeless(d["programs"])
    r = env.cli("reconcile", extra={"DISBURSER_FORMAT": "json"})
    assert r.code == 0, r.err
    assert json.loads(r.out)["paid_total"] == str(mf.load(m).total)
    # The ceiling is the setting's, as acceptance checks it (raised since: more room)...
    total = mf.load(m).total
    (p,) = json.loads(env.cli("status", "--json", extra={"DISBURSER_CEILING": "50"}).out)[
        "programs"]
    assert (p["ceiling"], p["uncommitted"]) == ("50000000", str(50_000_000 - total))
    # ... or, for a program a later DISBURSER_CEILING list does not name, the one recorded
    # at its first acceptance; reconcile reports on it too rather than refuse.
    named = {"DISBURSER_CEILING": "another-program=5"}
    (p,) = json.loads(env.cli("status", "--json", extra=named).out)["programs"]
    assert p["ceiling"] == str(300_000_000 * 10**6)
    r = env.cli("reconcile", "--format", "json", extra=named)
    assert r.code == 0, r.err
    assert json.loads(r.out)["ceiling"] == str(300_000_000 * 10**6)


@pytest.mark.parametrize("args, extra", [
    (["--dry-run"], {}),
    # DISBURSER_DRY_RUN must hold even beside --yes: a wrapper that sets it expects nothing
    # to be sent.
    (["--yes"], {"DISBURSER_DRY_RUN": "1"}),
], ids=["flag", "environment"])
def test_dry_run_sends_nothing(env: Env, args: list[str], extra: dict[str, str]) -> None:
    m = env.signed_manifest(10)
    nonce = env.payer_nonce()
    r = env.cli("send", str(m), *args, extra=extra)
    assert r.code == 0, r.err
    assert "dry run: would pay 10 of 10 payments, 36.5 tokens" in r.out
    assert env.payer_nonce() == nonce
    assert not Path(env.vars["DISBURSER_DB"]).exists() or _ledger(env).txs() == []


def test_deploy_command_deploys_a_verified_contract(env: Env) -> None:
    # deploy pays no program: a DISBURSER_CEILING that names programs does not stop it
    r = env.cli("deploy", extra={"DISBURSER_CEILING": "together-initiative-2025-10=10"})
    assert r.code == 0, r.err
    addr = r.out.strip().splitlines()[-1]
    assert env.chain.code(addr)
    # and the ledger accounts for the payer nonce it used
    (t,) = _ledger(env).txs()
    assert t.kind == "deploy" and t.status == TxStatus.CONFIRMED.value
    m = env.signed_manifest(5)
    r = env.cli("send", str(m), "--yes", extra={"DISBURSER_BATCH_CONTRACT": addr})
    assert r.code == 0, r.err
    _assert_all_paid_once(env, m)


def test_a_deployment_that_fails_once_sent_exits_1_not_2(env: Env,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Exit 2 says nothing was sent. A deployment mined out of gas (its estimate cut to
    60,000 here) is refused after its transaction went out: exit 1."""
    from disburser import chain as ch
    from disburser import settings as st
    from disburser.errors import FailClosed
    from disburser.keys import Signer
    from disburser.sender import deploy_batch_contract

    monkeypatch.setattr(ch.RpcChain, "estimate_gas_create", lambda *_: 60_000)
    s = st.load({**env.vars})
    nonce = env.payer_nonce()
    with pytest.raises(FailClosed) as e:
        deploy_batch_contract(Ledger(s.db), ch.RpcChain(s.rpc_url),
                              Signer(bytes.fromhex(dn.PAYER_KEY[2:])), s)
    assert str(e.value) == f"deployment at nonce {nonce} did not succeed"
    assert e.value.exit_code == 1
    assert env.payer_nonce() == nonce + 1  # it went out, and was mined


def test_a_deployment_whose_code_check_fails_once_mined_exits_1_not_2(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check of the deployed code ran after the rule that an error once something went
    out is exit 1: a node that served no code yet made a sent deployment exit 2."""
    from disburser import chain as ch
    from disburser import sender as sd
    from disburser import settings as st
    from disburser.errors import ChainMismatchError
    from disburser.keys import Signer

    def no_code_yet(_chain: object, address: str) -> None:
        raise ChainMismatchError(f"{address}: no code there")

    monkeypatch.setattr(sd, "verify_batch_contract", no_code_yet)
    s = st.load({**env.vars})
    nonce = env.payer_nonce()
    with pytest.raises(ChainMismatchError) as e:
        sd.deploy_batch_contract(Ledger(s.db), ch.RpcChain(s.rpc_url),
                                 Signer(bytes.fromhex(dn.PAYER_KEY[2:])), s)
    assert e.value.exit_code == 1
    assert env.payer_nonce() == nonce + 1


def test_ledger_of_another_chain_is_refused(env: Env) -> None:
    """A ledger whose confirmed nonces the chain does not have (a reset chain, a ledger
    from another network) must not be used: signing would open a nonce gap."""
    snap = env.chain.rpc("evm_snapshot")
    m = env.signed_manifest(5)
    assert env.cli("send", str(m), "--yes").code == 0
    env.chain.rpc("evm_revert", [snap])
    assert env.payer_nonce() == 0
    second = env.signed_manifest(5, name="b.json", seed="b")
    r = env.cli("send", str(second), "--yes")
    assert r.code == 2
    assert (f"payer {dn.PAYER}: the ledger has nonce 1 confirmed but the chain's nonce is 0: "
            "this ledger") in r.err
    assert env.payer_nonce() == 0
