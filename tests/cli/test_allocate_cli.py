"""`disburser allocate` end to end through the CLI: the manifest header comes from the
settings, output is byte-identical run to run, bad input is one line and exit 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from disburser import devnet as dn
from disburser import manifest as mf
from disburser.cli import app
from disburser.profiles import USDC_MAINNET
from tests.conftest import ROOT

ENV = {"DISBURSER_ENV_FILE": "/dev/null", "DISBURSER_PAYER": dn.PAYER,
       "DISBURSER_NOT_AFTER": "2000000000"}


def _gen(out: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_eligibility.py"), "--users", "300",
                    "--rows", "900", "--seed", "11", "--out", str(out)], check=True,
                   capture_output=True)
    return out


def _allocate(data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [
        "allocate", str(data / "liquidations.csv"), str(data / "snapshot.csv"),
        "--compensated", str(data / "compensated.csv"), "--addresses",
        str(data / "addresses.csv"), "--factors", str(data / "factors.csv"),
        "--program", "together-initiative-2025-10", "-o", str(out / "m.json"),
        "--report", str(out / "eligibility.csv"), *extra], env=ENV, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_allocate_writes_manifest_and_report_deterministically(tmp_path: Path) -> None:
    data = _gen(tmp_path / "data")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code, out, err = _allocate(data, tmp_path / "a")
    assert code == 0, err
    assert _allocate(data, tmp_path / "b")[0] == 0
    for f in ("m.json", "eligibility.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    m = mf.load(tmp_path / "a" / "m.json")
    assert (m.chain_id, m.token, m.payer, m.not_after) == (
        31337, "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", dn.PAYER, 2_000_000_000)
    assert m.signatures == ()
    rows = list(csv.DictReader((tmp_path / "a" / "eligibility.csv").open()))
    in_manifest = [r for r in rows if r["reason"] == "in_manifest"]
    assert len(in_manifest) == m.count
    assert {p.id for p in m.payments} == {r["user_id"] for r in in_manifest}
    # the generator's boundary users got exactly the reasons it expects
    expected = {r["user_id"]: r["expected_reason"]
                for r in csv.DictReader((data / "expected.csv").open())}
    got = {r["user_id"]: r["reason"] for r in rows}
    assert {u: got[u] for u in expected} == expected
    assert f"paymentsRoot    {m.root}" in out


def test_allocate_over_the_ceiling_is_refused(tmp_path: Path) -> None:
    data = _gen(tmp_path / "data")
    r = CliRunner().invoke(app, [
        "allocate", str(data / "liquidations.csv"), str(data / "snapshot.csv"),
        "--compensated", str(data / "compensated.csv"), "--addresses",
        str(data / "addresses.csv"), "--program", "p", "-o", str(tmp_path / "m.json")],
        env={**ENV, "DISBURSER_CEILING": "100"}, catch_exceptions=False)
    assert r.exit_code == 2
    assert "exceeds the ceiling 100000000 of program p" in r.stderr
    assert not (tmp_path / "m.json").exists()


def test_allocate_owing_users_without_an_address_over_the_ceiling_is_refused(
        tmp_path: Path) -> None:
    """The manifest fits the ceiling, but what the users without an address are owed would
    pass it: a later manifest could never pay them. Nothing is written."""
    for name, text in {
        "liq.csv": "user_id,time,product,loss_usd\n"
                   "alice,2025-10-10T00:00:00Z,futures,1000\n"
                   "bob,2025-10-11T23:59:59Z,margin,1000\n",
        "snap.csv": "user_id,net_assets_usd\nalice,1000\nbob,2000\n",
        "comp.csv": "user_id\n",
        "addr.csv": f"user_id,address\nalice,{dn.OWNER}\nbob,\n",
    }.items():
        (tmp_path / name).write_text(text)
    args = ["allocate", str(tmp_path / "liq.csv"), str(tmp_path / "snap.csv"),
            "--compensated", str(tmp_path / "comp.csv"), "--addresses",
            str(tmp_path / "addr.csv"), "--program", "p", "-o", str(tmp_path / "m.json"),
            "--report", str(tmp_path / "r.csv")]
    r = CliRunner().invoke(app, args, env={**ENV, "DISBURSER_CEILING": "1000"},
                           catch_exceptions=False)
    assert (r.exit_code, r.stderr) == (
        2, "disburser: error: allocation owes 1800000000 base units (this manifest "
           "1000000000, users without a valid address 800000000), over the ceiling "
           "1000000000 of program p: the policy's fund_usd is above DISBURSER_CEILING\n")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r.csv").exists()
    r = CliRunner().invoke(app, args, env={**ENV, "DISBURSER_CEILING": "1800"},
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert mf.load(tmp_path / "m.json").total == 1_000_000_000


@pytest.mark.parametrize("row, message", [
    ("2025-10-10T12:00:00+02:00,futures,100",
     "time: '2025-10-10T12:00:00+02:00' is not UTC (write Z or +00:00)"),
    # Python 3.11 reads a zero offset with a fraction of a second as UTC, dropping it
    ("2025-10-10T00:00:00+00:00:00.000001,futures,100",
     "time: '2025-10-10T00:00:00+00:00:00.000001' has an offset with seconds (write Z or "
     "+00:00)"),
    # past Python's 4,300-digit limit of int(): a located refusal, not an internal error
    (f"2025-10-10T12:00:00Z,futures,{'9' * 5000}",
     "loss_usd: amount '99999999999999999999'... has 5000 characters, more than any amount"),
])
def test_allocate_bad_row_is_one_located_line_exit_2(tmp_path: Path, row: str,
                                                    message: str) -> None:
    data = _gen(tmp_path / "data")
    liq = data / "liquidations.csv"
    lines = liq.read_text().splitlines()
    user = lines[3].split(",")[0]
    lines[3] = f"{user},{row}"
    liq.write_text("\n".join(lines) + "\n")
    code, _, err = _allocate(data, tmp_path)
    assert (code, err) == (2, f"disburser: error: {liq}:4: {message}\n")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("output, report, message", [
    ("nodir/m.json", "rep.csv", "{out}/nodir/m.json: no such directory {out}/nodir"),
    ("d", "rep.csv", "{out}/d: is a directory"),
    ("m.json", "m.json", "{out}/m.json: given for two outputs (also {out}/m.json)"),
    ("m.json", "../data/addresses.csv",
     "{out}/../data/addresses.csv: is also an input; refusing to write over it"),
], ids=["missing-directory", "directory", "twice", "an-input"])
def test_allocate_checks_both_outputs_before_writing_either(
        tmp_path: Path, output: str, report: str, message: str) -> None:
    data = _gen(tmp_path / "data")
    out = tmp_path / "out"
    (out / "d").mkdir(parents=True)
    before = (data / "addresses.csv").read_bytes()
    r = CliRunner().invoke(app, [
        "allocate", str(data / "liquidations.csv"), str(data / "snapshot.csv"),
        "--compensated", str(data / "compensated.csv"), "--addresses",
        str(data / "addresses.csv"), "--program", "p", "-o", str(out / output),
        "--report", str(out / report)], env=ENV, catch_exceptions=False)
    assert (r.exit_code, r.stderr) == (2, f"disburser: error: {message.format(out=out)}\n")
    assert sorted(p.name for p in out.iterdir()) == ["d"]  # nothing written, no .tmp left
    assert (data / "addresses.csv").read_bytes() == before


def test_a_signed_manifest_is_not_written_over(tmp_path: Path) -> None:
    """Rebuilding over an unsigned manifest is fine; over one that carries approvals it is
    refused (by allocate and by manifest build), so that collected signatures are not lost."""
    data = _gen(tmp_path / "data")
    assert _allocate(data, tmp_path)[0] == 0
    assert _allocate(data, tmp_path)[0] == 0  # unsigned: written over
    m = tmp_path / "m.json"
    doc = json.loads(m.read_text())
    doc["signatures"] = ["0x" + "11" * 65, "0x" + "22" * 65]
    m.write_text(json.dumps(doc))
    before = m.read_bytes()
    message = (f"disburser: error: {m}: holds a manifest with 2 signature(s); "
               f"refusing to write over it (write elsewhere, or move it away first)\n")
    code, _, err = _allocate(data, tmp_path)
    assert (code, err) == (2, message)
    pay = tmp_path / "pay.csv"
    pay.write_text("id,to,amount\nu1,0x" + "12" * 20 + ",1\n")
    r = CliRunner().invoke(app, ["manifest", "build", str(pay), "--program", "p", "-o", str(m)],
                           env=ENV, catch_exceptions=False)
    assert (r.exit_code, r.stderr) == (2, message)
    assert m.read_bytes() == before


@pytest.mark.parametrize("name, make, what", [
    ("ledger.sqlite", "sqlite", "is a SQLite database (a ledger?)"),
    ("approver2.json", "keystore", "is a keystore"),
    (".env.fork", "text", "is a settings file"),
    ("named.sqlite", "text", "is the ledger (DISBURSER_DB)"),
    ("named.sqlite-wal", "text", "is the ledger (DISBURSER_DB)"),
    ("payer.key", "text", "is the payer's keystore (DISBURSER_KEYSTORE)"),
    ("pw.txt", "text", "is a password file (DISBURSER_PASSWORD_FILE)"),
    ("run.log", "text", "is the log (DISBURSER_LOG_FILE)"),
    ("settings.env", "text", "is the settings file in use"),
    # given on a command line (`key new --password-file a1.pw`), named by no setting
    ("a1.pw", "text", "is a file disburser did not write (no manifest or report of its own)"),
])
def test_outputs_never_replace_a_ledger_keystore_or_settings_file(
        tmp_path: Path, name: str, make: str, what: str) -> None:
    """`manifest build -o approver2.json` destroyed an approver's keystore, and `-o` could
    as well replace the ledger, the payer's keystore or the settings file: refused, the file
    untouched. (reconcile's and devnet's outputs: tests/cli/test_refusals.py.)"""
    import sqlite3

    target = tmp_path / name
    if make == "sqlite":
        sqlite3.connect(target).execute("create table t (x)").connection.commit()
    elif make == "keystore":
        target.write_text(json.dumps({"version": 3, "crypto": {"cipher": "aes-128-ctr"}}))
    else:
        target.write_text("# anything\n")
    before = target.read_bytes()
    dotenv = tmp_path / "settings.env"
    if not dotenv.exists():
        dotenv.write_text("")
    pay = tmp_path / "pay.csv"
    pay.write_text("id,to,amount\nu1,0x" + "12" * 20 + ",1\n")
    env = {**ENV, "DISBURSER_ENV_FILE": str(dotenv), "DISBURSER_DB": str(tmp_path / "named.sqlite"),
           "DISBURSER_KEYSTORE": str(tmp_path / "payer.key"),
           "DISBURSER_PASSWORD_FILE": str(tmp_path / "pw.txt"),
           "DISBURSER_LOG_FILE": str(tmp_path / "run.log")}
    r = CliRunner().invoke(app, ["manifest", "build", str(pay), "--program", "p", "-o",
                                 str(target)], env=env, catch_exceptions=False)
    assert (r.exit_code, r.stderr) == (
        2, f"disburser: error: {target}: {what}; refusing to write over it (write "
        "elsewhere, or move it away first)\n")
    assert target.read_bytes() == before


def test_a_user_whose_address_is_the_token_or_the_payer_is_invalid_not_a_stop(
        tmp_path: Path) -> None:
    """One user's address was the token contract: the whole allocation stopped (exit 2), and
    nobody could be paid within the 24 hours (review helper-58). That user is
    refused_address in the report, owed for a later manifest; the others are in it."""
    data = _gen(tmp_path / "data")
    rows = (data / "addresses.csv").read_text().splitlines()
    users = [r.split(",")[0] for r in rows[1:3]]
    rows[1] = f"{users[0]},{USDC_MAINNET}"
    rows[2] = f"{users[1]},{dn.PAYER.lower()}"
    (data / "addresses.csv").write_text("\n".join(rows) + "\n")
    code, out, err = _allocate(data, tmp_path)
    assert code == 0, err
    report = {r["user_id"]: r for r in csv.DictReader((tmp_path / "eligibility.csv").open())}
    m = mf.load(tmp_path / "m.json")
    for uid in users:
        if report[uid]["decision"] == "eligible":
            assert report[uid]["reason"] == "refused_address"
        assert uid not in {p.id for p in m.payments}
    refused = sum(report[uid]["decision"] == "eligible" for uid in users)
    assert refused > 0  # else the test shows nothing
    assert f", {refused} with the token's, the payer's or the batch contract's address " \
        "(refused_address))" in out
    assert {p.to for p in m.payments}.isdisjoint({USDC_MAINNET, dn.PAYER})


def test_allocate_summary_counts_zero_amounts_apart(tmp_path: Path) -> None:
    """A user eligible with a factor of 0 is not 'without a valid address'."""
    data = _gen(tmp_path / "data")
    rows = list(csv.DictReader((tmp_path / "data" / "expected.csv").open()))
    code, out, err = _allocate(data, tmp_path)
    assert code == 0, err
    report = list(csv.DictReader((tmp_path / "eligibility.csv").open()))
    counts = {reason: sum(1 for x in report if x["reason"] == reason)
              for reason in ("no_address", "invalid_address", "zero_amount")}
    assert counts["zero_amount"] > 0 and rows  # the generator makes some of each
    assert (f"(others eligible: {counts['no_address'] + counts['invalid_address']} without a "
            f"valid address, {counts['zero_amount']} with an amount of 0)") in out


@pytest.mark.parametrize("extra, message", [
    (["--not-after", "-5"], "not_after must be a positive unix time, got -5"),
    (["--not-after", "0"], "not_after must be a positive unix time, got 0"),
    (["--not-after", str(2**256)], f"not_after must be a positive unix time, got {2**256}"),
    (["--program", ""], "program must be 1-128 printable characters"),
], ids=["negative", "zero", "past-uint256", "empty-program"])
def test_allocate_refuses_a_manifest_its_own_verify_would(tmp_path: Path, extra: list[str],
                                                            message: str) -> None:
    data = _gen(tmp_path / "data")
    code, _, err = _allocate(data, tmp_path, *extra)
    assert (code, err) == (2, f"disburser: error: {data / 'addresses.csv'}: {message}\n")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "eligibility.csv").exists()
