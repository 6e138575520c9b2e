"""reconcile on a real Anvil, through the real CLI: a clean run, then a messy one (a hand
transfer from the payer, a repeat, a blacklisted recipient, a shallow transfer, a second
program paid by hand, a lost ledger), checked to the base unit against balanceOf; and
eth_getLogs through a loopback proxy that refuses wide ranges."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from disburser import chain as ch
from disburser import devnet as dn
from disburser import manifest as mf
from disburser.addresses import to_checksum
from disburser.reconcile import STATUSES, run_reconcile
from disburser.settings import load as load_settings
from tests.conftest import Env, fresh_address

pytestmark = pytest.mark.chain

U = 10**6
RELIEF, LOANS = "relief", "loans"
CEILINGS = f"{RELIEF}=300000000,{LOANS}=100000000"


def reconcile(env: Env, *args: str, extra: dict[str, str] | None = None
              ) -> tuple[int, dict[str, Any]]:
    r = env.cli("reconcile", "--format", "json", *args,
                extra={"DISBURSER_CEILING": CEILINGS, **(extra or {})})
    assert r.code in (0, 1), (r.code, r.err)
    return r.code, json.loads(r.out)


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{p['program']}/{p['id']}": p for p in doc["payments"]}


def findings(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [d for d in doc["discrepancies"] if d["kind"] == kind]


def hand_transfer(env: Env, to: str, amount: int) -> str:
    """A transfer from the payer that disburser did not send (dev accounts are unlocked)."""
    r = dn.send_as(env.chain, dn.PAYER, env.devnet.token, ch.enc_transfer(to, amount))
    return str(r["transactionHash"]).lower()


def set_blacklisted(env: Env, who: str, on: bool) -> None:
    fn = "blacklist(address)" if on else "unBlacklist(address)"
    dn.send_as(env.chain, dn.OWNER, env.devnet.token, dn.abi_call(fn, ["address"], [who]))


def test_clean_fully_paid_run_is_consistent(env: Env) -> None:
    path = env.signed_manifest(12, program=RELIEF)
    m = mf.load(path)
    before = env.balance(dn.PAYER)
    assert env.cli("send", str(path), "--yes").code == 0

    code, doc = reconcile(env)
    assert code == 0, doc["discrepancies"]
    assert doc["consistent"] is True and doc["discrepancies"] == []
    assert doc["program"] == RELIEF
    assert doc["counts"] == {"paid": 12, "pending": 0, "unpaid": 0, "failed": 0,
                             "underpaid": 0, "overpaid": 0, "paid_twice": 0}
    assert doc["paid_total"] == doc["committed"] == str(m.total)
    assert int(doc["paid_total"]) == before - env.balance(dn.PAYER)
    assert doc["ceiling"] == str(300_000_000 * U)
    assert doc["remaining"] == str(300_000_000 * U - m.total)
    assert doc["payer"] == dn.PAYER and doc["token"] == env.devnet.token
    for p in m.payments:
        got = by_id(doc)[f"{RELIEF}/{p.id}"]
        assert (got["to"], got["amount"], got["paid"], got["status"]) == (
            p.to, str(p.amount), str(env.balance(p.to)), "paid")
        assert len(got["tx_hashes"]) == 1
    (man,) = doc["manifests"]
    assert man["root"] == m.root and man["signers"] == list(env.devnet.approvers[:2])
    # the ledger knows when the program started, its 96 h deadline and where to scan from
    assert doc["deadline"] - doc["started_at"] == 96 * 3600
    assert doc["progress"]["finished"] is True and doc["progress"]["on_track"] is True
    assert doc["from_block"] > 0

    # the chain alone says the same
    code, alone = reconcile(env, "--no-ledger", str(path))
    assert code == 0 and alone["paid_total"] == doc["paid_total"] and alone["from_block"] == 0
    table = env.cli("reconcile", extra={"DISBURSER_CEILING": CEILINGS})
    assert table.code == 0 and "result: consistent" in table.out, table.err


def test_messy_run_every_finding_to_the_base_unit(env: Env) -> None:
    payer_start = env.balance(dn.PAYER)
    relief_path = env.signed_manifest(20, program=RELIEF, name="relief.json", seed="relief")
    relief = mf.load(relief_path)
    victim, twice, over = relief.payments[5], relief.payments[3], relief.payments[4]
    set_blacklisted(env, victim.to, True)
    r = env.cli("send", str(relief_path), "--yes")
    assert r.code == 1 and "confirmed 19, failed 1, unpaid 0" in r.out, (r.out, r.err)

    # A second program, signed but never sent by disburser: paid (badly) by hand.
    loans_path = env.signed_manifest(3, program=LOANS, name="loans.json", seed="loans")
    loans = mf.load(loans_path)
    short, exact, never = loans.payments
    hand_transfer(env, short.to, short.amount - 250_001)
    hand_transfer(env, exact.to, exact.amount)
    # Outside any manifest: a repeat, one base unit too many, and a stranger.
    hand_transfer(env, twice.to, twice.amount)
    hand_transfer(env, over.to, 1)
    stranger = fresh_address("stranger")
    stranger_tx = hand_transfer(env, stranger, 777_777)

    code, doc = reconcile(env, str(loans_path))
    assert code == 1
    pay = by_id(doc)
    assert pay[f"{RELIEF}/{victim.id}"]["status"] == "failed"
    assert pay[f"{RELIEF}/{victim.id}"]["reason"] == "Blacklistable: account is blacklisted"
    assert pay[f"{RELIEF}/{victim.id}"]["paid"] == "0"
    assert pay[f"{RELIEF}/{twice.id}"]["status"] == "paid_twice"
    assert pay[f"{RELIEF}/{twice.id}"]["paid"] == str(2 * twice.amount)
    assert len(pay[f"{RELIEF}/{twice.id}"]["tx_hashes"]) == 2
    assert pay[f"{RELIEF}/{over.id}"]["status"] == "overpaid"
    assert pay[f"{RELIEF}/{over.id}"]["paid"] == str(over.amount + 1)
    assert pay[f"{LOANS}/{short.id}"]["status"] == "underpaid"
    assert pay[f"{LOANS}/{short.id}"]["paid"] == str(short.amount - 250_001)
    assert pay[f"{LOANS}/{exact.id}"]["status"] == "paid"
    assert pay[f"{LOANS}/{never.id}"]["status"] == "unpaid"
    assert doc["counts"] == {"paid": 17 + 1, "pending": 0, "unpaid": 1, "failed": 1,
                             "underpaid": 1, "overpaid": 1, "paid_twice": 1}
    # The ledger's manifest comes from its payment rows; given as a file as well, it is
    # parsed from the file: the same report but for where the manifest came from.
    code, with_file = reconcile(env, str(loans_path), str(relief_path))
    assert code == 1
    sources = {m["root"]: m.pop("sources") for m in with_file["manifests"]}
    assert sources[relief.root] == ["ledger", str(relief_path)]
    assert with_file == {**doc, "manifests": [
        {k: v for k, v in m.items() if k != "sources"} for m in doc["manifests"]]}

    # every figure to the base unit, against balanceOf on chain
    for p in doc["payments"]:
        assert int(p["paid"]) == env.balance(p["to"]), p
    (outflow,) = findings(doc, "unexplained_outflow")
    assert (outflow["tx_hash"], outflow["to"], outflow["paid"]) == (
        stranger_tx, stranger, "777777")
    assert doc["unexplained_total"] == "777777" == str(env.balance(stranger))
    assert int(doc["paid_total"]) + int(doc["unexplained_total"]) == (
        payer_start - env.balance(dn.PAYER))
    assert sorted(d["kind"] for d in doc["discrepancies"]) == [
        "failed", "overpaid", "paid_twice", "underpaid", "unexplained_outflow", "unpaid"]
    under = findings(doc, "underpaid")[0]
    assert (under["expected"], under["paid"], under["difference"]) == (
        str(short.amount), str(short.amount - 250_001), "-250001")

    # two programs, each against its own ceiling; the top level adds them up
    assert doc["program"] == "*"
    progs = {p["program"]: p for p in doc["programs"]}
    assert progs[RELIEF]["ceiling"] == str(300_000_000 * U)
    assert progs[LOANS]["ceiling"] == str(100_000_000 * U)
    assert doc["ceiling"] == str(400_000_000 * U)
    relief_paid = relief.total - victim.amount + twice.amount + 1
    loans_paid = short.amount - 250_001 + exact.amount
    assert progs[RELIEF]["paid_total"] == str(relief_paid)
    assert progs[LOANS]["paid_total"] == str(loans_paid)
    assert progs[LOANS]["remaining"] == str(100_000_000 * U - loans_paid)
    assert progs[LOANS]["started_at"] is None  # never accepted by the ledger
    assert doc["paid_total"] == str(relief_paid + loans_paid)

    # --program: only that program, yet the other's transfers are not "unexplained"
    code, only = reconcile(env, str(loans_path), "--program", LOANS)
    assert code == 1 and {p["program"] for p in only["payments"]} == {LOANS}
    assert sorted(d["kind"] for d in only["discrepancies"]) == [
        "underpaid", "unexplained_outflow", "unpaid"]
    assert only["ceiling"] == str(100_000_000 * U)

    # a program over its ceiling (lowered for the check)
    code, over_doc = reconcile(env, str(loans_path), "--program", LOANS,
                               extra={"DISBURSER_CEILING": f"{LOANS}=3"})
    assert loans_paid > 3 * U
    (oc,) = findings(over_doc, "over_ceiling")
    assert (oc["ceiling"], oc["paid"], oc["excess"]) == (
        str(3 * U), str(loans_paid), str(loans_paid - 3 * U))
    assert over_doc["remaining"] == str(3 * U - loans_paid)
    assert findings(over_doc, "committed_over_ceiling")[0]["committed"] == str(loans.total)

    # the ledger deleted: the chain and the files tell the same story, minus attribution
    code, bare = reconcile(env, "--no-ledger", str(relief_path), str(loans_path),
                           extra={"DISBURSER_DB": str(env.tmp / "absent.sqlite")})
    assert not (env.tmp / "absent.sqlite").exists()  # --no-ledger never opens one
    bpay = by_id(bare)
    assert bpay[f"{RELIEF}/{victim.id}"]["status"] == "unpaid"  # no ledger, no reason
    assert bare["paid_total"] == doc["paid_total"]
    assert bare["unexplained_total"] == "777777"
    assert bare["from_block"] == 0

    # The victim is cleared and paid by hand: shallow at first, then deep. The ledger
    # still says failed: it disagrees with the chain, which wins.
    set_blacklisted(env, victim.to, False)
    victim_tx = hand_transfer(env, victim.to, victim.amount)
    code, shallow = reconcile(env, str(loans_path), extra={"DISBURSER_CONFIRMATIONS": "3"})
    vp = by_id(shallow)[f"{RELIEF}/{victim.id}"]
    assert (vp["status"], vp["paid"], vp["tx_hashes"]) == (
        "pending", str(victim.amount), [victim_tx])
    (pend,) = findings(shallow, "pending")
    assert pend["depth"] == 1 and pend["index"] == victim.index
    (dis,) = findings(shallow, "ledger_disagrees")
    assert (dis["ledger_status"], dis["index"]) == ("failed", victim.index)
    env.chain.rpc("evm_mine")
    env.chain.rpc("evm_mine")
    code, deep = reconcile(env, str(loans_path), extra={"DISBURSER_CONFIRMATIONS": "3"})
    assert by_id(deep)[f"{RELIEF}/{victim.id}"]["status"] == "paid"
    assert not findings(deep, "pending") and findings(deep, "ledger_disagrees")

    # CSV: one row per payment, then one per finding no payment row shows; the exit code
    # is the same in every format
    code, now = reconcile(env, str(loans_path))
    others = sorted(d["kind"] for d in now["discrepancies"] if d["kind"] not in STATUSES)
    assert "unexplained_outflow" in others and "ledger_disagrees" in others
    r = env.cli("reconcile", str(loans_path), "--format", "csv",
                extra={"DISBURSER_CEILING": CEILINGS})
    assert r.code == 1
    rows = list(csv.reader(io.StringIO(r.out)))
    assert len(rows) == 1 + 20 + 3 + len(others)
    assert sorted(row[6] for row in rows[24:]) == others

    # Ledger file deleted, no manifest file: nothing to reconcile is bad input (exit 2)
    Path(env.vars["DISBURSER_DB"]).unlink()
    r = env.cli("reconcile")
    assert (r.code, r.err) == (2, "disburser: error: no manifests to reconcile: the ledger "
                               f"DISBURSER_DB {env.vars['DISBURSER_DB']} does not exist and no "
                               "MANIFEST file was given\n")
    code, files_only = reconcile(env, str(relief_path), str(loans_path))
    assert files_only["paid_total"] == str(int(doc["paid_total"]) + victim.amount)


def test_a_recreated_ledger_scans_from_the_start(env: Env) -> None:
    """A lost ledger re-created by `send` starts at a later block; the payments it found
    already made (paid_elsewhere) are earlier, and must still be seen as paid."""
    path = env.signed_manifest(10, program=RELIEF)
    assert env.cli("send", str(path), "--yes").code == 0
    Path(env.vars["DISBURSER_DB"]).unlink()
    for _ in range(3):
        env.chain.rpc("evm_mine")
    assert env.cli("send", str(path), "--yes").code == 0
    code, doc = reconcile(env)
    assert code == 0, doc["discrepancies"]
    assert doc["from_block"] == 0 and doc["counts"]["paid"] == 10
    assert doc["paid_total"] == str(mf.load(path).total)


def test_the_report_says_when_the_scan_starts_at_the_ledger(env: Env) -> None:
    """With a ledger, the scan starts at the program's first block: a hand payment before
    the fund (left out of `send`'s history check with DISBURSER_FROM_BLOCK) is not counted,
    and the report says so; --from-block 0 counts it (paid twice)."""
    path = env.signed_manifest(3, program=RELIEF)
    first = mf.load(path).payments[0]
    hand_transfer(env, first.to, first.amount)
    env.chain.rpc("evm_mine")
    after = str(env.chain.head().number)
    assert env.cli("send", str(path), "--yes",
                   extra={"DISBURSER_FROM_BLOCK": after}).code == 0
    r = env.cli("reconcile", extra={"DISBURSER_CEILING": CEILINGS})
    assert r.code == 0, r.err
    assert ("the scan starts at the program's first block in the ledger: earlier transfers "
            "from the payer are not counted (--from-block 0 counts them)") in r.out
    html = env.cli("reconcile", "--format", "html", extra={"DISBURSER_CEILING": CEILINGS})
    assert "the scan starts at the program&#x27;s first block in the ledger" in html.out
    code, doc = reconcile(env, "--from-block", "0")
    assert code == 1 and doc["from_block"] == 0
    assert by_id(doc)[f"{RELIEF}/{first.id}"]["status"] == "paid_twice"
    r = env.cli("reconcile", "--from-block", "0", extra={"DISBURSER_CEILING": CEILINGS})
    assert "the scan starts at the program's first block" not in r.out
    # JSON says it too (it said "consistent" with empty notes while a payment was paid twice)
    code, doc = reconcile(env)
    assert (code, doc["consistent"], doc["from_block"] > 0) == (0, True, True)
    assert doc["notes"] == ["the scan starts at the program's first block in the ledger: "
                            "earlier transfers from the payer are not counted (--from-block 0 "
                            "counts them)"]
    assert reconcile(env, "--from-block", "0")[1]["notes"] == []


def test_a_manifest_file_cannot_relabel_what_the_ledger_paid(env: Env) -> None:
    """The same payments built under another program (unsigned, even) have the ledger's
    paymentsRoot: given as a file, it put what relief paid under the loans ceiling, exit 0.
    Now it is refused, exit 2, one line; the ledger alone still reconciles."""
    path = env.signed_manifest(3, program=RELIEF)
    assert env.cli("send", str(path), "--yes").code == 0
    other = env.tmp / "other.json"
    assert env.cli("manifest", "build", str(env.tmp / "m.json.csv"), "--program", LOANS,
                   "-o", str(other)).code == 0
    root = mf.load(path).root
    assert mf.load(other).root == root
    for args in ((str(other),), ("--program", RELIEF, str(other))):
        r = env.cli("reconcile", "--format", "json", *args,
                    extra={"DISBURSER_CEILING": CEILINGS})
        assert (r.code, r.out) == (2, "")
        assert r.err == (f"disburser: error: manifest {root} appears with program "
                         f"{RELIEF!r} and {LOANS!r} (ledger, {other})\n")
    code, doc = reconcile(env, str(path))  # the same manifest as a file: one manifest
    assert (code, doc["program"], len(doc["manifests"])) == (0, RELIEF, 1)
    assert doc["paid_total"] == str(sum(p.amount for p in mf.load(path).payments))


def _approve(env: Env, path: Path, extra: dict[str, str] | None = None) -> Path:
    """Two approvers sign ``path``: reconcile counts a manifest file only with its quorum."""
    for i in (0, 1):
        assert env.cli("manifest", "sign", str(path), "--private-key-env", f"APPROVER_{i}",
                       extra=extra).code == 0
    return path


def test_a_manifest_file_without_the_approvers_quorum_explains_no_outflow(env: Env) -> None:
    """500 tokens leave the payer to an outsider; an unsigned manifest built by anyone, given
    as a file, made reconcile say "consistent", exit 0 (review helper-55). A file the ledger
    did not accept needs the quorum of DISBURSER_APPROVERS, as `send` does; refused, exit 2."""
    m = env.signed_manifest(2, program=RELIEF)
    assert env.cli("send", str(m), "--yes").code == 0
    outsider = "0x" + "5a" * 20
    dn.send_as(env.chain, dn.PAYER, env.devnet.token, ch.enc_transfer(outsider, 500 * 10**6))
    code, doc = reconcile(env)
    assert code == 1 and [d["kind"] for d in doc["discrepancies"]] == ["unexplained_outflow"]
    csv_path = env.tmp / "fake.csv"
    csv_path.write_text(f"id,to,amount\nx-1,{to_checksum(outsider)},500\n")
    fake = env.tmp / "fake.json"
    assert env.cli("manifest", "build", str(csv_path), "--program", RELIEF, "-o",
                   str(fake)).code == 0
    assert env.cli("manifest", "sign", str(fake), "--private-key-env", "APPROVER_0").code == 0
    for args in ([str(fake)], ["--no-ledger", str(m), str(fake)]):
        r = env.cli("reconcile", "--format", "json", *args)
        assert (r.code, r.out) == (2, "")
        assert r.err == (f"disburser: error: {fake}: quorum not met: 1 of 2 required approver "
                         "signatures\n")
    r = env.cli("reconcile", str(fake), extra={"DISBURSER_APPROVERS": ""})
    assert (r.code, r.err) == (2, f"disburser: error: {fake}: reconcile checks a manifest "
                               "file's approvals against DISBURSER_APPROVERS, which is not set "
                               "(the approvers' addresses, as for send)\n")
    r = env.cli("reconcile", str(m))  # accepted by the ledger: no approvers needed again
    assert r.code == 1 and "unexplained_outflow" in r.out


def test_a_standing_program_setting_does_not_drop_a_manifest_file(env: Env) -> None:
    """DISBURSER_PROGRAM, set for allocate and manifest build, is also reconcile's
    --program. A loans manifest given as a file, wholly unpaid, was left out without a word:
    exit 0, no finding. Now the file is refused; with no file the report says its scope."""
    relief = env.signed_manifest(2, program=RELIEF)
    assert env.cli("send", str(relief), "--yes").code == 0
    loans = env.tmp / "loans.json"
    assert env.cli("manifest", "build", str(env.write_payments(2, seed="loans")),
                   "--program", LOANS, "-o", str(loans)).code == 0
    _approve(env, loans)
    standing = {"DISBURSER_CEILING": CEILINGS, "DISBURSER_PROGRAM": RELIEF}
    r = env.cli("reconcile", "--format", "json", str(loans), extra=standing)
    assert (r.code, r.out) == (2, "")
    assert r.err == (f"disburser: error: {loans}: a manifest of program {LOANS}, outside "
                     f"DISBURSER_PROGRAM={RELIEF}: leave the file out, or the program "
                     "filter\n")
    r = env.cli("reconcile", "--format", "json", "--program", RELIEF, str(loans),
                extra={"DISBURSER_CEILING": CEILINGS})
    assert r.err == (f"disburser: error: {loans}: a manifest of program {LOANS}, outside "
                     f"--program {RELIEF}: leave the file out, or the program filter\n")
    r = env.cli("reconcile", "--format", "json", "--no-ledger", str(loans), extra=standing)
    assert r.err == (f"disburser: error: DISBURSER_PROGRAM={RELIEF}: no manifest of that "
                     f"program in scope (programs: {LOANS})\n")
    r = env.cli("reconcile", "--format", "json", extra=standing)
    assert r.code == 0 and json.loads(r.out)["program"] == RELIEF
    assert r.err == f"reconcile: program {RELIEF} only (DISBURSER_PROGRAM)\n"
    code, doc = reconcile(env, str(loans))  # no filter: the unpaid loans are found
    assert code == 1 and doc["counts"]["unpaid"] == 2


def test_bad_input_is_refused(env: Env) -> None:
    path = env.signed_manifest(2, program=RELIEF)
    bad = env.tmp / "bad.json"
    bad.write_text('{"format": "disburser.manifest/1"')
    r = env.cli("reconcile", "--no-ledger", str(bad))
    assert r.code == 2 and str(bad) in r.err and "not valid JSON" in r.err
    r = env.cli("reconcile", "--no-ledger")
    assert r.code == 2 and "needs at least one MANIFEST" in r.err
    r = env.cli("reconcile", "--no-ledger", str(path), "--program", "grants")
    assert r.code == 2 and "--program grants" in r.err and RELIEF in r.err
    # another chain: named by scheme, host and port, never the URL's password or key
    port = env.devnet.url.rsplit(":", 1)[1]
    chain1 = env.tmp / "chain1.json"
    assert env.cli("manifest", "build", str(env.write_payments(2)), "--program", RELIEF,
                   "-o", str(chain1), extra={"DISBURSER_CHAIN_ID": "1"}).code == 0
    _approve(env, chain1, {"DISBURSER_CHAIN_ID": "1"})
    r = env.cli("reconcile", "--no-ledger", str(chain1), extra={
        "DISBURSER_RPC_URL": f"http://user:pw-s3cret@127.0.0.1:{port}/?apikey=K-s3cret",
        "DISBURSER_CHAIN_ID": "1"})
    assert r.code == 2 and "s3cret" not in r.err
    assert f"node at http://127.0.0.1:{port} is chain 31337, the settings say 1" in r.err
    # a manifest for another token is refused, not reported as all unpaid
    r = env.cli("reconcile", "--no-ledger", str(path),
                extra={"DISBURSER_TOKEN": "0x" + "11" * 20})
    assert r.code == 2 and "token" in r.err


def test_settings_that_would_mislead_the_report_are_refused(env: Env) -> None:
    """The wrong decimals (ceilings would be checked at the wrong scale), a DISBURSER_DB that
    is not a ledger, and a ledger whose first block the node has not reached: exit 2, one
    line each."""
    path = env.signed_manifest(2, program=RELIEF)
    r = env.cli("reconcile", "--no-ledger", str(path), extra={"DISBURSER_DECIMALS": "18"})
    assert (r.code, r.out) == (2, "")
    assert r.err == (f"disburser: error: token {env.devnet.token} has 6 decimals on chain, "
                     "the network profile expects 18 (DISBURSER_DECIMALS / "
                     "DISBURSER_NETWORK)\n")
    r = env.cli("reconcile", extra={"DISBURSER_DB": str(path)})
    assert (r.code, r.err) == (2, f"disburser: error: DISBURSER_DB {path}: not a SQLite "
                                  "ledger (file is not a database)\n")
    r = env.cli("reconcile", extra={"DISBURSER_DB": str(env.tmp)})  # a directory
    assert (r.code, r.err) == (2, f"disburser: error: DISBURSER_DB {env.tmp}: cannot be "
                                  "opened (unable to open database file)\n")
    assert env.cli("send", str(path), "--yes").code == 0
    db = env.vars["DISBURSER_DB"]
    with sqlite3.connect(db) as c:
        c.execute("UPDATE program SET first_block = 1000000")
    r = env.cli("reconcile", extra={"DISBURSER_CEILING": CEILINGS})
    head = env.chain.head().number
    assert (r.code, r.err) == (2, (
        f"disburser: error: the ledger DISBURSER_DB {db} paid from block 1000000, above the "
        f"chain head {head} of the node at {env.devnet.url}: a ledger of another chain, or a "
        "node reset since (--from-block sets the start)\n"))


def test_a_manifest_file_another_ledger_paid_is_scanned_from_the_start(env: Env) -> None:
    """A MANIFEST file given with a ledger that never paid it is read from block 0, not
    from this ledger's first block: its payments, made earlier, are seen as paid."""
    first = env.signed_manifest(3, name="a.json", seed="a", program=RELIEF)
    other = {"DISBURSER_DB": str(env.tmp / "other.sqlite")}
    assert env.cli("send", str(first), "--yes", extra=other).code == 0
    for _ in range(3):
        env.chain.rpc("evm_mine")
    second = env.signed_manifest(3, name="b.json", seed="b", program=RELIEF)
    after = str(env.chain.head().number)  # this ledger's history starts after the first
    assert env.cli("send", str(second), "--yes",
                   extra={"DISBURSER_FROM_BLOCK": after}).code == 0
    code, doc = reconcile(env, str(first))
    assert code == 0, doc["discrepancies"]
    assert doc["from_block"] == 0 and doc["counts"]["paid"] == 6


def test_a_not_after_past_year_9999_is_reported(env: Env) -> None:
    """not_after may be any uint256: the reports say it in words past year 9999."""
    path = env.tmp / "far.json"
    assert env.cli("manifest", "build", str(env.write_payments(2)), "--program", RELIEF,
                   "--not-after", str(2**40), "-o", str(path)).code == 0
    _approve(env, path)
    for fmt in ("table", "html"):
        r = env.cli("reconcile", "--no-ledger", str(path), "--format", fmt)
        assert r.code == 1 and r.err == "", r.err
        assert "far in the future" in r.out


def test_a_real_process_prints_the_report(env: Env) -> None:
    path = env.signed_manifest(3, program=RELIEF)
    r = env.proc("reconcile", "--no-ledger", str(path))
    assert r.code == 1, r.err
    assert "unpaid" in r.out and "NOT consistent" in r.out

    # A terminal that is not UTF-8: the table's "…" was an internal error (exit 1 all the
    # same, read as "discrepancies"); the report is written in UTF-8 whatever the locale.
    r = env.proc("reconcile", "--no-ledger", str(path), extra={"PYTHONIOENCODING": "latin-1"})
    assert r.code == 1 and "internal error" not in r.err, r.err
    assert "…" in r.out and "NOT consistent" in r.out


# --- eth_getLogs through a proxy that refuses wide ranges --------------------------------


class _Proxy(BaseHTTPRequestHandler):
    url = ""
    upstream = ""
    max_range = 0
    refused: list[tuple[int, int]] = []
    served: list[tuple[int, int]] = []

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        req = json.loads(body)
        if isinstance(req, dict) and req.get("method") == "eth_getLogs":
            f = req["params"][0]
            lo, hi = int(f["fromBlock"], 16), int(f["toBlock"], 16)
            if hi - lo + 1 > self.max_range:
                type(self).refused.append((lo, hi))
                self._send({"jsonrpc": "2.0", "id": req["id"], "error": {
                    "code": -32005, "message": "query returned more than 10000 results"}})
                return
            type(self).served.append((lo, hi))
        up = urllib.request.Request(self.upstream, data=body,
                                    headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(up, timeout=30) as resp:
            self._send(json.loads(resp.read()))

    def _send(self, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def proxy(env: Env) -> Iterator[type[_Proxy]]:
    handler: type[_Proxy] = type("Proxy", (_Proxy,), {"upstream": env.devnet.url, "max_range": 3,
                                        "refused": [], "served": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_log_ranges_adapt_to_a_node_that_refuses_wide_ones(env: Env,
                                                           proxy: type[_Proxy]) -> None:
    path = env.signed_manifest(6, program=RELIEF)
    m = mf.load(path)
    for p in m.payments:  # one block each: a chain long enough to need many chunks
        hand_transfer(env, p.to, p.amount)
    # ... and so that each of the block ranges fetched at once (transfers.FETCH_WORKERS x
    # _RANGES_PER_WORKER = 16) is wider than the proxy allows
    env.chain.rpc("anvil_mine", [hex(100)])
    head = env.chain.head().number
    direct = load_settings({**env.vars})
    via_proxy = load_settings({**env.vars, "DISBURSER_RPC_URL": proxy.url})
    want, want_code = run_reconcile(direct, [path], program=None, use_ledger=False,
                                    fmt="json", from_block=None)
    got, code = run_reconcile(via_proxy, [path], program=None, use_ledger=False, fmt="json",
                              from_block=None)
    assert code == want_code == 0
    assert json.loads(got)["payments"] == json.loads(want)["payments"]
    assert proxy.refused, "the proxy never refused: the test proves nothing"
    served = sorted(proxy.served)
    assert served[0][0] == 0 and served[-1][1] == head
    assert all(b[0] == a[1] + 1 for a, b in zip(served, served[1:], strict=False))
    assert all(hi - lo + 1 <= 3 for lo, hi in served)
