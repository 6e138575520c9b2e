"""Approvers need not use disburser: `manifest typed-data` prints EIP-712 JSON that Foundry's
real `cast wallet sign --data` signs, and `manifest add-signature` attaches the result."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from disburser import devnet as dn
from disburser import manifest as mf
from disburser.cli import app
from disburser.domain import Payment
from tests.conftest import ROOT, fresh_address

CAST = ROOT / "node_modules/@foundry-rs/cast-linux-amd64/bin/cast"
ENV = {"DISBURSER_ENV_FILE": "/dev/null", "DISBURSER_PAYER": dn.PAYER,
       "DISBURSER_APPROVERS": ",".join(dn.DEV_ADDRESSES[2:5]), "DISBURSER_QUORUM": "2"}


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args), env=ENV, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _build(tmp_path: Path, rows: list[str]) -> Path:
    """An unsigned manifest built by `manifest build` from CSV rows ``id,to,amount``."""
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,to,amount\n" + "\n".join(rows) + "\n")
    m = tmp_path / "m.json"
    assert _cli("manifest", "build", str(csv_path), "--program", "p", "-o", str(m))[0] == 0
    return m


def test_cast_signatures_verify_and_match_ours(tmp_path: Path) -> None:
    m = _build(tmp_path, [f"u{i},{fresh_address(f'x{i}')},{i + 1}.000001" for i in range(7)])
    code, typed, _ = _cli("manifest", "typed-data", str(m))
    assert code == 0
    (tmp_path / "typed.json").write_text(typed)
    sigs = []
    for key in dn.DEV_KEYS[2:4]:
        out = subprocess.run([str(CAST), "wallet", "sign", "--data", "--from-file",
                              str(tmp_path / "typed.json"), "--private-key", key],
                             capture_output=True, text=True, check=True).stdout.strip()
        sigs.append(out)
        code, out_text, err = _cli("manifest", "add-signature", str(m), out)
        assert code == 0, err
    # cast's bytes equal ours, byte for byte
    manifest = mf.load(m)
    assert sigs[0] == mf.sign(manifest, bytes.fromhex(dn.DEV_KEYS[2][2:]))
    assert list(manifest.signatures) == sigs
    code, out_text, err = _cli("manifest", "verify", str(m))
    assert code == 0, err
    assert "quorum        2 of 2 required: met" in out_text
    # the same cast signature again is refused
    code, _, err = _cli("manifest", "add-signature", str(m), sigs[1])
    assert code == 2
    assert err.strip() == (f"disburser: error: {m}: {dn.DEV_ADDRESSES[3]} has already signed "
                           "this manifest")


def test_typed_data_past_2_53_reaches_a_javascript_wallet_exactly(tmp_path: Path) -> None:
    """A not_after of 2**64 - 1 ("no expiry") as a JSON number would reach a JavaScript
    wallet as 18446744073709551616 and its signature would verify nowhere: past 2**53 the
    typed data carries decimal strings, which JavaScript reads exactly and cast signs into
    our own bytes."""
    m = _build(tmp_path, [f"u{i},{fresh_address(f'z{i}')},{i + 1}" for i in range(3)])
    doc = json.loads(m.read_text())
    doc["not_after"] = 2**64 - 1
    m.write_text(json.dumps(doc))
    code, typed, _ = _cli("manifest", "typed-data", str(m))
    assert code == 0
    script = ("const t=JSON.parse(require('fs').readFileSync(0,'utf8'));"
              "process.stdout.write([t.message.notAfter,t.message.count,t.domain.chainId]"
              ".map(x=>BigInt(x).toString()).join(' '));")
    r = subprocess.run(["node", "-e", script], input=typed, capture_output=True, text=True)
    assert r.stdout == f"{2**64 - 1} 3 {doc['chain_id']}", r.stderr
    (tmp_path / "typed.json").write_text(typed)
    out = subprocess.run([str(CAST), "wallet", "sign", "--data", "--from-file",
                          str(tmp_path / "typed.json"), "--private-key", dn.DEV_KEYS[2]],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == mf.sign(mf.load(m), bytes.fromhex(dn.DEV_KEYS[2][2:]))


def test_proof_checks_with_the_reference_library(tmp_path: Path) -> None:
    m = _build(tmp_path, [f"u{i},{fresh_address(f'y{i}')},{i + 2}" for i in range(9)])
    code, proof_json, _ = _cli("manifest", "proof", str(m), "--index", "4")
    assert code == 0
    script = (
        "const {StandardMerkleTree}=require('@openzeppelin/merkle-tree');"
        "const p=JSON.parse(require('fs').readFileSync(0,'utf8'));"
        "const ok=StandardMerkleTree.verify(p.root,p.leafEncoding,p.leaf,p.proof);"
        "process.stdout.write(String(ok));")
    r = subprocess.run(["node", "-e", script], input=proof_json, capture_output=True,
                       text=True, cwd=ROOT)
    assert r.stdout == "true", r.stderr
    code, _, err = _cli("manifest", "proof", str(m), "--index", "9")
    assert code == 2 and "--index 9: manifest has payments 0..8" in err
    # by id: the same proof
    code, by_id, err = _cli("manifest", "proof", str(m), "--id", "u4")
    assert (code, by_id) == (0, proof_json), err
    for args, message in ([["--id", "u9"], f"--id 'u9': no payment of {m} has that id"],
                          [[], "give one of --index N or --id ID"],
                          [["--id", "u4", "--index", "4"], "give --index or --id, not both"]):
        code, out, err = _cli("manifest", "proof", str(m), *args)
        assert (code, out, err) == (2, "", f"disburser: error: {message}\n")
    # the command line wins over a standing setting of the other
    for args, env in ((["--id", "u4"], {"DISBURSER_INDEX": "7"}),
                      (["--index", "4"], {"DISBURSER_ID": "u7"})):
        r = CliRunner().invoke(app, ["manifest", "proof", str(m), *args], env={**ENV, **env},
                               catch_exceptions=False)
        assert (r.exit_code, r.stdout) == (0, proof_json), r.stderr


def test_keystore_on_the_command_line_wins_over_the_private_key_env_setting(
        tmp_path: Path) -> None:
    """DISBURSER_PRIVATE_KEY_ENV standing in the environment does not make `manifest sign
    --keystore` a contradiction: the command line wins."""
    m = _build(tmp_path, [f"u1,{fresh_address('ks')},1"])
    pw = tmp_path / "pw"
    pw.write_text("a long enough password\n")
    ks = tmp_path / "approver.json"
    code, out, err = _cli("key", "new", "-o", str(ks), "--password-file", str(pw))
    assert code == 0, err
    address = out.strip()
    r = CliRunner().invoke(app, ["manifest", "sign", str(m), "--keystore", str(ks),
                                 "--password-file", str(pw)],
                           env={**ENV, "DISBURSER_PRIVATE_KEY_ENV": "APPROVER_KEY",
                                "APPROVER_KEY": dn.DEV_KEYS[2]}, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"signed by {address} (1 signature(s))"
    # Without --keystore the setting is used.
    r = CliRunner().invoke(app, ["manifest", "sign", str(m)],
                           env={**ENV, "DISBURSER_PRIVATE_KEY_ENV": "APPROVER_KEY",
                                "APPROVER_KEY": dn.DEV_KEYS[2]}, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"signed by {dn.DEV_ADDRESSES[2]} (2 signature(s))"


def test_the_payers_password_file_is_not_an_approvers_or_a_new_keys(tmp_path: Path) -> None:
    """DISBURSER_PASSWORD_FILE is the payer's: `key new` does not give a new key that
    password because a .env names it, and `manifest sign` does not try it on an approver's
    keystore; they read their own variables."""
    payer_pw, approver_pw = tmp_path / "payer.pw", tmp_path / "approver.pw"
    payer_pw.write_text("the payer's own password\n")
    approver_pw.write_text("the approver's password\n")
    ks = tmp_path / "approver.json"
    standing = {**ENV, "DISBURSER_PASSWORD_FILE": str(payer_pw)}
    r = CliRunner().invoke(app, ["key", "new", "-o", str(ks)], env=standing)
    assert r.exit_code == 2 and not ks.exists()
    assert r.stderr.strip() == ("disburser: error: key new needs --password-file (or a "
                                "terminal to prompt)")
    r = CliRunner().invoke(app, ["key", "new", "-o", str(ks)], env={
        **standing, "DISBURSER_NEW_KEY_PASSWORD_FILE": str(approver_pw)})
    assert r.exit_code == 0, r.stderr
    address = r.stdout.strip()
    m = _build(tmp_path, [f"u1,{fresh_address('pw')},1"])
    r = CliRunner().invoke(app, ["manifest", "sign", str(m), "--keystore", str(ks)], env={
        **standing, "DISBURSER_APPROVER_PASSWORD_FILE": str(approver_pw)})
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"signed by {address} (1 signature(s))"


# --- review fixes ------------------------------------------------------------------------


def _sign(m: Path, key: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, ["manifest", "sign", str(m), "--private-key-env", "K"],
                           env={**ENV, "K": key}, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def _default_recursion_limit() -> Iterator[None]:
    """The interpreter's default limit, as in a fresh `disburser` process: this test
    process imported eth-account, whose import raises it to 100,000, at which json.loads of
    100,000 levels crashes the interpreter (test_deep_json_does_not_crash_... runs that in
    a process of its own)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(old)


def _bad_manifests(tmp_path: Path) -> list[tuple[Path, str]]:
    m = _build(tmp_path, [f"u1,{fresh_address('deep')},1"])
    d = json.loads(m.read_text())
    d["not_after"] = "@"
    long_number = tmp_path / "long.json"
    long_number.write_text(json.dumps(d).replace('"@"', "1" + "0" * 5000))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    return [(long_number, f"{long_number}: not_after must be a positive integer, got a number "
             "of 5001 digits"),
            (deep, f"{deep}: not a manifest: JSON nested more than 32 levels deep (a manifest "
             "nests 3)")]


@pytest.mark.usefixtures("_default_recursion_limit")
def test_a_long_number_or_deep_nesting_is_a_one_line_refusal(tmp_path: Path) -> None:
    """Were `internal error`, exit 1 (ValueError past 4,300 digits, RecursionError)."""
    for path, message in _bad_manifests(tmp_path):
        for args in (["manifest", "verify", str(path)],
                     ["reconcile", "--no-ledger", str(path)],
                     ["manifest", "sign", str(path), "--private-key-env", "K"]):
            r = CliRunner().invoke(app, args, env={**ENV, "K": dn.DEV_KEYS[2]},
                                   catch_exceptions=False)
            assert (r.exit_code, r.stdout, r.stderr) == (
                2, "", f"disburser: error: {message}\n"), args


def test_deep_json_does_not_crash_a_process_that_imported_eth_account(tmp_path: Path) -> None:
    """eth-account's import (as `send` and a keystore do) raises the recursion limit to
    100,000: json.loads of a file nested 100,000 deep then overflowed the C stack (SIGSEGV,
    nothing printed). Refused before json.loads; a keystore likewise."""
    [_, (deep, message)] = _bad_manifests(tmp_path)
    script = ("import sys, eth_account; from disburser.cli import main; "
              "sys.argv = ['disburser', *sys.argv[1:]]; main()")
    for args, expected in (
            (["manifest", "verify", str(deep)], message),
            (["manifest", "sign", str(tmp_path / "m.json"), "--keystore", str(deep),
              "--password-file", str(deep)], f"keystore {deep}: not a JSON V3 keystore")):
        r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                           text=True, env={"PATH": "/usr/bin:/bin", **ENV}, cwd=ROOT,
                           timeout=120)
        assert (r.returncode, r.stderr) == (2, f"disburser: error: {expected}\n"), args


def test_a_duplicate_key_or_an_unknown_field_is_refused(tmp_path: Path) -> None:
    m = _build(tmp_path, [f"u1,{fresh_address('dup')},1", f"u2,{fresh_address('dup2')},2"])
    text = m.read_text()
    doubled = tmp_path / "doubled.json"
    doubled.write_text(text.replace('  "payments": [', '  "payments": [],\n  "payments": [', 1))
    extra = tmp_path / "extra.json"
    d = json.loads(text)
    d["payments"][1]["memo"] = "approved by the board"
    extra.write_text(json.dumps(d))
    for path, message in (
            (doubled, f"{doubled}: key 'payments' appears twice in one object (a reader could "
             "take either value)"),
            (extra, f"{extra}: payments[1]: unknown field 'memo' (fields: id, to, amount)")):
        for args in (["manifest", "verify", str(path)],
                     ["manifest", "sign", str(path), "--private-key-env", "K"]):
            r = CliRunner().invoke(app, args, env={**ENV, "K": dn.DEV_KEYS[2]},
                                   catch_exceptions=False)
            assert (r.exit_code, r.stderr) == (2, f"disburser: error: {message}\n"), args
    assert extra.read_text() == json.dumps(d)  # not rewritten without its field


def test_a_high_s_signature_is_stored_low_s_and_refused_in_a_file(tmp_path: Path) -> None:
    """The malleated twin (r, n - s) of a cast/eth-account signature recovers the same
    signer. `add-signature` (which takes what signing services return, some of them high-s)
    stores its low-s form and says so; in a file it is refused as not canonical, so that a
    signature has one form."""
    m = _build(tmp_path, [f"u1,{fresh_address('hs')},1"])
    low = mf.sign(mf.load(m), bytes.fromhex(dn.DEV_KEYS[2][2:]))
    raw = bytes.fromhex(low[2:])
    high = "0x" + (raw[:32] + (mf.SECP256K1_N - int.from_bytes(raw[32:64], "big"))
                   .to_bytes(32, "big") + bytes([55 - raw[64]])).hex()
    assert mf.low_s_form(high) == low and mf.low_s_form(low) is None
    code, out, err = _cli("manifest", "add-signature", str(m), high)
    assert (code, out, err) == (0, f"added signature of {dn.DEV_ADDRESSES[2]}\n",
                                "note: the signature has a high s (as some signing services "
                                "make): stored in its low-s form, the same approval\n")
    assert mf.load(m).signatures == (low,)
    m.write_text(m.read_text().replace(low, low[:-2] + "1f"))  # recovery byte 31
    code, _, err = _cli("manifest", "verify", str(m))
    assert (code, err) == (2, f"disburser: error: {m}: signatures[0]: invalid recovery "
                              "byte\n")
    d = json.loads(m.read_text())
    d["signatures"] = []
    m.write_text(json.dumps(d))
    assert _sign(m, dn.DEV_KEYS[3])[0] == 0
    d = json.loads(m.read_text())
    d["signatures"].append(high)
    m.write_text(json.dumps(d))
    code, _, err = _cli("manifest", "verify", str(m))
    assert (code, err) == (2, f"disburser: error: {m}: signatures[1]: not canonical: its s is "
                              "above secp256k1n/2 (a malleated form; signers make the low-s "
                              "one)\n")


def test_a_non_approvers_signature_is_listed_and_not_counted(tmp_path: Path) -> None:
    """DESIGN.md: valid when `quorum` configured approvers signed; a signature by anyone else
    neither counts nor refuses (it refused, after printing "quorum ... met")."""
    m = _build(tmp_path, [f"u1,{fresh_address('st')},1"])
    for key in (dn.DEV_KEYS[0], dn.DEV_KEYS[2], dn.DEV_KEYS[3]):
        assert _sign(m, key)[0] == 0
    code, out, err = _cli("manifest", "verify", str(m))
    assert (code, err) == (0, "")
    assert out.splitlines()[-4:] == [
        f"signature[0]  {dn.DEV_ADDRESSES[0]}  NOT AN APPROVER (not counted)",
        f"signature[1]  {dn.DEV_ADDRESSES[2]}  approver",
        f"signature[2]  {dn.DEV_ADDRESSES[3]}  approver",
        "quorum        2 of 2 required: met"]
    # Short of quorum without it: refused, naming it.
    r = CliRunner().invoke(app, ["manifest", "verify", str(m)],
                           env={**ENV, "DISBURSER_QUORUM": "3"}, catch_exceptions=False)
    assert r.exit_code == 2
    assert r.stdout.splitlines()[-1] == "quorum        2 of 3 required: NOT met"
    assert r.stderr == (f"disburser: error: {m}: quorum not met: 2 of 3 required approver "
                        f"signatures (signatures[0] by {dn.DEV_ADDRESSES[0]}: not configured "
                        "approvers, or the manifest was changed after signing)\n")


def test_manifest_sign_shows_what_was_signed(tmp_path: Path) -> None:
    m = _build(tmp_path, [f"u1,{fresh_address('s1')},1.25", f"u2,{fresh_address('s2')},2"])
    manifest = mf.load(m)
    code, out, err = _sign(m, dn.DEV_KEYS[2])
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"signed by {dn.DEV_ADDRESSES[2]} (1 signature(s))",
        "program       p",
        "chain_id      31337",
        f"token         {manifest.token}",
        f"payer         {dn.PAYER}",
        f"not_after     {manifest.not_after} ({mf.utc_text(manifest.not_after)})",
        "count         2",
        "total         3250000 base units (3.25 tokens at 6 decimals)",
        f"paymentsRoot  {manifest.root}"]
    assert mf.utc_text(manifest.not_after).endswith(" UTC")


def test_the_summary_reads_the_total_at_the_decimals_of_the_manifests_token(
        tmp_path: Path) -> None:
    """A BNB Chain manifest (Binance-Peg USDC: 18 decimals) signed on a machine set up for
    the local chain (6): its total in tokens at 18, as the bnb profile says; a manifest of a
    chain and token no profile or setting knows: base units only."""
    from disburser.profiles import PROFILES

    bnb = PROFILES["bnb"]
    pays = [Payment(0, "u0", fresh_address("b0"), 3 * 10**18 + 5 * 10**17)]
    for chain_id, token, total in (
            (bnb.chain_id, bnb.token, "3500000000000000000 base units (3.5 tokens at 18 "
                                      "decimals)"),
            (777, bnb.token, "3500000000000000000 base units (decimals of this chain and "
                             "token unknown here)")):
        m = tmp_path / f"m{chain_id}.json"
        mf.write(mf.make_manifest(program="p", chain_id=chain_id, token=token, payer=dn.PAYER,
                                  not_after=2**40, payments=pays), m)
        code, out, err = _sign(m, dn.DEV_KEYS[2])
        assert (code, err) == (0, "")
        assert f"total         {total}" in out.splitlines()


def test_a_lower_case_payer_setting_is_taken(tmp_path: Path) -> None:
    """DISBURSER_PAYER all lower case, as every other address setting accepts: `manifest
    build` checksums it (it refused it), `manifest verify` compares it (it refused the
    manifest); a mixed case that fails EIP-55 stays refused."""
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(f"id,to,amount\nu1,{fresh_address('lc')},1\n")
    m = tmp_path / "m.json"
    lower = {**ENV, "DISBURSER_PAYER": dn.PAYER.lower()}
    r = CliRunner().invoke(app, ["manifest", "build", str(csv_path), "--program", "p", "-o",
                                 str(m)], env=lower, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert mf.load(m).payer == dn.PAYER
    for key in dn.DEV_KEYS[2:4]:
        assert _sign(m, key)[0] == 0
    r = CliRunner().invoke(app, ["manifest", "verify", str(m)], env=lower,
                           catch_exceptions=False)
    assert (r.exit_code, r.stderr) == (0, "")
    bad = "0x" + dn.PAYER[2:].swapcase()
    for args, where in ((["manifest", "build", str(csv_path), "--program", "p", "-o",
                          str(tmp_path / "m2.json")], "--payer / DISBURSER_PAYER"),
                        (["manifest", "verify", str(m)], "DISBURSER_PAYER")):
        r = CliRunner().invoke(app, args, env={**ENV, "DISBURSER_PAYER": bad},
                               catch_exceptions=False)
        assert (r.exit_code, r.stderr) == (2, f"disburser: error: {where}: {bad} fails its "
                                              f"EIP-55 checksum (expected {dn.PAYER})\n")


def test_a_csv_with_a_byte_order_mark_builds(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark: it hid the 'id' column."""
    csv_path = tmp_path / "p.csv"
    to = fresh_address("bom")
    csv_path.write_text(f"\ufeffid,to,amount\nu1,{to},1\n", encoding="utf-8")
    code, _, err = _cli("manifest", "build", str(csv_path), "--program", "p", "-o",
                        str(tmp_path / "m.json"))
    assert (code, err) == (0, "")
    assert [(p.id, p.to) for p in mf.load(tmp_path / "m.json").payments] == [("u1", to)]


def test_build_input_that_is_no_csv_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A directory, and a field over the csv module's limit, were internal errors (exit 1
    with the exception's name)."""
    big = tmp_path / "big.csv"
    big.write_text(f"id,to,amount\nu1,{fresh_address('big')},{'1' * 200_000}\n")
    for src, message in ((tmp_path, f"{tmp_path}: cannot read (Is a directory)"),
                         (big, f"{big}:2: field larger than field limit (131072)")):
        code, _, err = _cli("manifest", "build", str(src), "--program", "p", "-o",
                            str(tmp_path / "m.json"))
        assert (code, err) == (2, f"disburser: error: {message}\n")
        assert not (tmp_path / "m.json").exists()


def test_typed_data_into_a_closed_pipe_is_no_internal_error(tmp_path: Path) -> None:
    """`manifest typed-data m.json | head -1`: the reader leaves before the writer is done.
    It was "internal error: BrokenPipeError"."""
    import os

    m = _build(tmp_path, [f"u0,{fresh_address('pipe')},1"])
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that already left: every write fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "disburser.cli", "manifest", "typed-data",
                            str(m)], env={**os.environ, **ENV}, stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert r.returncode == 1
    assert r.stderr == ("disburser: standard output was closed before the command finished "
                        "(broken pipe)\n")
