"""Approvers need not use disburser: `manifest typed-data` prints EIP-712 JSON that Foundry's
real `cast wallet sign --data` signs, and `manifest add-signature` attaches the result."""

from __future__ import annotations

import subprocess
from pathlib import Path

from typer.testing import CliRunner

from disburser import devnet as dn
from disburser import manifest as mf
from disburser.cli import app
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
    assert err.strip() == (f"disburser: error: {dn.DEV_ADDRESSES[3]} has already signed this "
                           "manifest")


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
    assert r.stdout.strip() == f"signed by {address} (1 signature(s))"
    # Without --keystore the setting is used.
    r = CliRunner().invoke(app, ["manifest", "sign", str(m)],
                           env={**ENV, "DISBURSER_PRIVATE_KEY_ENV": "APPROVER_KEY",
                                "APPROVER_KEY": dn.DEV_KEYS[2]}, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == f"signed by {dn.DEV_ADDRESSES[2]} (2 signature(s))"


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
    assert r.stdout.strip() == f"signed by {address} (1 signature(s))"
