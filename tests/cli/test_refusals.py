"""Every refusal: exit 2, one clear line on stderr, no traceback, and nothing sent (the
payer's nonce, its token balance and the ledger's transactions are unchanged)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from disburser import devnet as dn
from disburser import manifest as mf
from disburser.cli import app
from disburser.ledger import Ledger
from tests.conftest import Env, fresh_address


def _assert_refused(env: Env, args: list[str], expected: str,
                    extra: dict[str, str] | None = None, *, ledger_empty: bool = True,
                    exact: bool = False) -> None:
    """Exit 2, one line, no traceback, and nothing sent: the payer's nonce and balance are
    unchanged (and, unless an earlier send filled it, the ledger has no transaction)."""
    db = Path(env.vars["DISBURSER_DB"])
    txs_before = len(Ledger(db).txs()) if db.exists() else 0
    nonce, bal = env.payer_nonce(), env.balance(env.devnet.payer)
    r = env.cli(*args, extra=extra)
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert lines[0].startswith("disburser: error: ")
    assert expected in lines[0], lines[0]
    if exact:
        assert lines[0] == f"disburser: error: {expected}"
    assert env.payer_nonce() == nonce
    assert env.balance(env.devnet.payer) == bal
    if db.exists():
        assert len(Ledger(db).txs()) == (0 if ledger_empty else txs_before)


def _edit(path: Path, fn: Callable[[dict], None]) -> Path:  # type: ignore[type-arg]
    d = json.loads(path.read_text())
    fn(d)
    out = path.with_name("edited-" + path.name)
    out.write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("extra, expected", [
    ({"DISBURSER_MODE": "sideways"}, "Invalid value for '--mode' (env var: 'DISBURSER_MODE'): "
     "Value error, 'sideways' is not one of 'batch', 'direct'."),
    ({"DISBURSER_RETRY_FAILED": "perhaps"}, "Invalid value for '--retry-failed' (env var: "
     "'DISBURSER_RETRY_FAILED'): Input should be a valid boolean, unable to interpret input"),
], ids=["mode", "boolean"])
def test_bad_option_value_in_the_environment(env: Env, extra: dict[str, str],
                                             expected: str) -> None:
    m = env.signed_manifest(3)
    _assert_refused(env, ["send", str(m), "--yes"], expected, extra, exact=True)


def test_tampered_amount(env: Env) -> None:
    m = env.signed_manifest(3)
    bad = _edit(m, lambda d: d["payments"][1].__setitem__("amount", "99999999"))
    _assert_refused(env, ["send", str(bad), "--yes"],
                    "quorum not met: 0 of 2 required approver signatures (signatures[0] by ")
    _assert_refused(env, ["send", str(bad), "--yes"],
                    ": not configured approvers, or the manifest was changed after signing)")


def test_unknown_signer(env: Env) -> None:
    """A non-approver's signature does not count: with one approver's, short of quorum."""
    m = env.signed_manifest(3, signers=(0,))
    r = env.cli("manifest", "sign", str(m), "--private-key-env", "STRANGER",
                extra={"STRANGER": dn.DEV_KEYS[0]})
    assert r.code == 0
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"{m}: quorum not met: 1 of 2 required approver signatures (signatures[1] "
                    f"by {dn.DEV_ADDRESSES[0]}: not configured approvers, or the manifest was "
                    "changed after signing)", exact=True)


def test_payer_listed_as_an_approver(env: Env) -> None:
    """The payer's key signing as one of the M approvers would make M of N need one person
    fewer: a payer among DISBURSER_APPROVERS is refused, whoever signed."""
    approvers = {"DISBURSER_APPROVERS": f"{dn.DEV_ADDRESSES[2]},{dn.PAYER}"}
    m = env.signed_manifest(3, signers=(0,))
    r = env.cli("manifest", "sign", str(m), "--private-key-env", "PAYER_KEY_HEX",
                extra={"PAYER_KEY_HEX": dn.PAYER_KEY, **approvers})
    assert r.code == 0, r.err
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"DISBURSER_APPROVERS lists the payer {dn.PAYER} of {m}: the key that "
                    "sends must not approve its own payments", approvers, exact=True)


def test_quorum_not_met(env: Env) -> None:
    m = env.signed_manifest(3, signers=(0,))
    _assert_refused(env, ["send", str(m), "--yes"],
                    "quorum not met: 1 of 2 required approver signatures")


def test_same_signer_twice(env: Env) -> None:
    m = env.signed_manifest(3, signers=(0,))
    bad = _edit(m, lambda d: d["signatures"].append(d["signatures"][0]))
    _assert_refused(env, ["send", str(bad), "--yes"],
                    f"signatures[1]: {dn.DEV_ADDRESSES[2]} signed twice")
    r = env.cli("manifest", "sign", str(m), "--private-key-env", "APPROVER_0")
    assert r.code == 2 and "has already signed this manifest" in r.err


def test_another_chain(env: Env) -> None:
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(m), "--yes"],
                    "manifest is for chain 31337, this is chain 1",
                    extra={"DISBURSER_CHAIN_ID": "1", "DISBURSER_ALLOW_PLAIN_KEY": "1"})


def test_node_on_another_chain_than_settings(env: Env, tmp_path: Path) -> None:
    # Manifest and settings agree on chain 5, but the node is 31337: fail closed.
    csv_path = env.write_payments(2)
    out = tmp_path / "c5.json"
    extra = {"DISBURSER_CHAIN_ID": "5"}
    assert env.cli("manifest", "build", str(csv_path), "--program", "p", "-o", str(out),
                   extra=extra).code == 0
    for i in (0, 1):
        env.cli("manifest", "sign", str(out), "--private-key-env", f"APPROVER_{i}")
    _assert_refused(env, ["send", str(out), "--yes"], "is chain 31337, settings say 5",
                    extra={**extra, "DISBURSER_ALLOW_PLAIN_KEY": "1"})


def test_another_token(env: Env) -> None:
    m = env.signed_manifest(2)
    other = dn.DEV_ADDRESSES[4]
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"configured is {other}", extra={"DISBURSER_TOKEN": other})


def test_another_payer(env: Env) -> None:
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"manifest payer is {dn.PAYER}, the configured payer is {dn.DEV_ADDRESSES[0]}",
                    extra={"DISBURSER_PRIVATE_KEY": dn.DEV_KEYS[0]})


@pytest.mark.parametrize("key", ["plain", "keystore"])
def test_verify_checks_the_payer_of_the_configured_key(env: Env, key: str) -> None:
    """`manifest verify` checked the payer against DISBURSER_PAYER only: a manifest for
    another payer than the key's (the one send pays from) verified, exit 0. The keystore's
    recorded address is read without its password."""
    from eth_account import Account

    m = env.signed_manifest(2)
    if key == "plain":
        extra = {"DISBURSER_PRIVATE_KEY": dn.DEV_KEYS[0]}
    else:
        ks = env.tmp / "other.json"
        ks.write_text(json.dumps(Account.encrypt(bytes.fromhex(dn.DEV_KEYS[0][2:]), "pw",
                                                 kdf="pbkdf2", iterations=2)))
        extra = {"DISBURSER_PRIVATE_KEY": "", "DISBURSER_KEYSTORE": str(ks)}
    _assert_refused(env, ["manifest", "verify", str(m)],
                    f"manifest payer is {dn.PAYER}, the configured payer is "
                    f"{dn.DEV_ADDRESSES[0]}", extra=extra)
    r = env.cli("manifest", "verify", str(m),
                extra={"DISBURSER_PRIVATE_KEY": "", "DISBURSER_PAYER": ""})
    assert r.code == 0, r.err
    assert ("payer         not checked (no DISBURSER_PAYER, and no payer key configured or a "
            "keystore that records no address)") in r.out


def test_manifest_build_reads_the_keystores_address_without_its_password(env: Env) -> None:
    """It decrypted the keystore only to learn whom the manifest pays from, and with no
    password set refused: "no password (DISBURSER_KEYSTORE_PASSWORD is not set)"."""
    from eth_account import Account

    ks = env.tmp / "payer.json"
    ks.write_text(json.dumps(Account.encrypt(bytes.fromhex(dn.DEV_KEYS[0][2:]), "pw",
                                             kdf="pbkdf2", iterations=2)))
    out = env.tmp / "built.json"
    r = env.cli("manifest", "build", str(env.write_payments(2)), "--program", "p", "-o",
                str(out), extra={"DISBURSER_PRIVATE_KEY": "", "DISBURSER_PAYER": "",
                                 "DISBURSER_KEYSTORE": str(ks)})
    assert r.code == 0, r.err
    assert mf.load(out).payer == dn.DEV_ADDRESSES[0]


def test_manifest_build_prompts_for_a_keystore_that_records_no_address(env: Env) -> None:
    """Foundry's keystores record no address: the key is decrypted, with a prompt on a
    terminal as send has (a refusal naming a --password-file option build does not have,
    in between)."""
    import os
    import pty
    import select
    import sys

    from eth_account import Account

    doc = Account.encrypt(bytes.fromhex(dn.DEV_KEYS[0][2:]), "pw-1", kdf="pbkdf2",
                          iterations=2)
    del doc["address"]
    ks = env.tmp / "foundry.json"
    ks.write_text(json.dumps(doc))
    out = env.tmp / "built.json"
    argv = [sys.executable, "-m", "disburser.cli", "manifest", "build",
            str(env.write_payments(2)), "--program", "p", "-o", str(out)]
    child_env = {**os.environ, **env.vars, "DISBURSER_PRIVATE_KEY": "", "DISBURSER_PAYER": "",
                 "DISBURSER_KEYSTORE": str(ks)}
    pid, master = pty.fork()  # the child's controlling terminal: where getpass asks
    if pid == 0:
        os.chdir(env.tmp)
        os.execve(sys.executable, argv, child_env)
    seen = b""
    # click writes "password for …:", then getpass turns echo off, drops what was typed
    # ahead and writes " ": only then is the password read.
    while not (b"password for" in seen and seen.endswith(b" ")):
        assert select.select([master], [], [], 60)[0], seen  # no prompt: fail, not hang
        chunk = os.read(master, 1024)
        assert chunk, seen
        seen += chunk
    os.write(master, b"pw-1\n")
    while True:  # drain until the child is gone (EIO on Linux once it has exited)
        try:
            if not os.read(master, 1024):
                break
        except OSError:
            break
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mf.load(out).payer == dn.DEV_ADDRESSES[0]


@pytest.mark.parametrize("answer", [b"n\n", b"\x04", b"\x03"], ids=["no", "ctrl-d", "ctrl-c"])
def test_a_send_declined_at_the_prompt_says_so_and_exits_2(env: Env, answer: bytes) -> None:
    """Answering no (or Ctrl-D, Ctrl-C at the question) printed "Aborted!" and exited 1
    (the code of failed payments), and the prompt offered the whole manifest's total for one
    already paid. Now it asks for what is still owed, and a no is one line, exit 2, nothing
    sent."""
    import os
    import pty
    import select
    import sys

    m = env.signed_manifest(3)
    assert env.cli("send", str(m), "--yes").code == 0
    nonce = env.payer_nonce()
    pid, master = pty.fork()  # a terminal: send asks only there
    if pid == 0:
        os.chdir(env.tmp)
        os.execve(sys.executable, [sys.executable, "-m", "disburser.cli", "send", str(m)],
                  {**os.environ, **env.vars})
    seen = b""
    while not seen.rstrip().endswith(b"[y/N]:"):
        assert select.select([master], [], [], 60)[0], seen  # no prompt: fail, not hang
        chunk = os.read(master, 1024)
        assert chunk, seen
        seen += chunk
    os.write(master, answer)
    while True:  # drain until the child is gone (EIO on Linux once it has exited)
        try:
            chunk = os.read(master, 1024)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(master)
    text = seen.decode().replace("\r", "")
    assert (f"Pay 0 payments (of 3; the others paid, in flight or failed), 0 tokens, from "
            f"{dn.PAYER} ") in text
    assert text.rstrip().endswith("disburser: error: not confirmed: nothing was sent")
    assert "Aborted" not in text
    assert os.waitstatus_to_exitcode(status) == 2
    assert env.payer_nonce() == nonce


def test_expired(env: Env, tmp_path: Path) -> None:
    csv_path = env.write_payments(2)
    out = tmp_path / "old.json"
    r = env.cli("manifest", "build", str(csv_path), "--program", "p", "-o", str(out),
                "--not-after", "1700000000")
    assert (r.code, r.err) == (0, "warning: --not-after 1700000000 (2023-11-14 22:13:20 UTC) "
                               "is already past: send refuses this manifest\n")
    for i in (0, 1):
        env.cli("manifest", "sign", str(out), "--private-key-env", f"APPROVER_{i}")
    _assert_refused(env, ["send", str(out), "--yes"], "manifest expired at not_after=1700000000")


def test_over_the_ceiling(env: Env) -> None:
    m = env.signed_manifest(5)  # amounts 1.25 .. 5.25 tokens
    _assert_refused(env, ["send", str(m), "--yes"],
                    "exceeds the ceiling 10000000 of program together-initiative-2025-10",
                    extra={"DISBURSER_CEILING": "10"})


def test_a_program_the_ceiling_list_does_not_name_is_refused(env: Env) -> None:
    """A list of programs in DISBURSER_CEILING is what may be paid: a mistyped program name
    does not get a fresh ceiling of its own (300,000,000 by default)."""
    m = env.signed_manifest(3, program="together-initiative-2025-1O")
    ceilings = {"DISBURSER_CEILING": "together-initiative-2025-10=300000000,loans=100000000"}
    expected = ("DISBURSER_CEILING: no ceiling for program 'together-initiative-2025-1O' (it "
                "names loans, together-initiative-2025-10); add "
                "together-initiative-2025-1O=<whole tokens>, or *=<whole tokens> for every "
                "program it does not name")
    _assert_refused(env, ["send", str(m), "--yes"], expected, ceilings, exact=True)
    _assert_refused(env, ["manifest", "verify", str(m)], expected, ceilings, exact=True)
    # `*=N` gives every other program a ceiling, as a plain number does.
    r = env.cli("send", str(m), "--yes", extra={"DISBURSER_CEILING": "loans=1,*=10"})
    assert r.code == 0, r.err
    assert "confirmed 3, failed 0, unpaid 0" in r.out


def test_over_the_ceiling_across_manifests(env: Env) -> None:
    first = env.signed_manifest(3, name="a.json", seed="a")  # 1.25+2.25+3.25 = 6.75
    r = env.cli("send", str(first), "--yes", extra={"DISBURSER_CEILING": "10"})
    assert r.code == 0, r.err
    second = env.signed_manifest(3, name="b.json", seed="b")
    nonce = env.payer_nonce()
    message = ("program together-initiative-2025-10: accepted 6750000 + this manifest 6750000 "
               "= 13500000 base units exceeds the ceiling 10000000")
    r = env.cli("send", str(second), "--yes", extra={"DISBURSER_CEILING": "10"})
    assert r.code == 2 and message in r.err
    assert env.payer_nonce() == nonce
    # A dry run makes the same check (and records nothing).
    r = env.cli("send", str(second), "--dry-run", extra={"DISBURSER_CEILING": "10"})
    assert r.code == 2 and message in r.err and "would pay" not in r.out
    assert [x.root for x in Ledger(Path(env.vars["DISBURSER_DB"])).manifests()] == [
        mf.load(first).root]


def test_a_ceiling_lowered_below_what_was_accepted_refuses_before_anything_is_sent(
        env: Env) -> None:
    """Two manifests accepted under the default ceiling, one paid; the ceiling is then set
    below their total: sending the other is refused (a dry run too) before the approval or
    anything else goes out, and status shows the program over its ceiling."""
    first = env.signed_manifest(3, name="a.json", seed="a")  # 6.75 tokens
    assert env.cli("send", str(first), "--yes").code == 0
    second = env.signed_manifest(3, name="b.json", seed="b")
    m2 = mf.load(second)
    Ledger(Path(env.vars["DISBURSER_DB"])).accept_manifest(
        m2, ceiling=300_000_000 * 10**6, signers=list(mf.signers_of(m2)))
    message = ("program together-initiative-2025-10: accepted manifests total 13500000 base "
               "units, over the ceiling 10000000")
    for args in (["--yes"], ["--dry-run"]):
        _assert_refused(env, ["send", str(second), *args], message,
                        extra={"DISBURSER_CEILING": "10"}, ledger_empty=False, exact=True)
    (p,) = json.loads(env.cli("status", "--json", extra={"DISBURSER_CEILING": "10"}).out)[
        "programs"]
    assert (p["uncommitted"], p["over_ceiling_by"]) == ("0", "3500000")
    text = env.cli("status", extra={"DISBURSER_CEILING": "10"}).out
    assert "  uncommitted 0 (OVER the ceiling by 3.5: no new manifest fits)" in text


def test_the_same_payments_signed_for_another_program_are_refused(env: Env) -> None:
    """The paymentsRoot commits to the payments only: the same payments re-signed under
    another program would be paid twice. The real run and the dry run refuse alike."""
    first = env.signed_manifest(3, name="a.json", seed="a")
    r = env.cli("send", str(first), "--yes")
    assert r.code == 0, r.err
    again = env.signed_manifest(3, name="b.json", seed="a", program="loans")
    root = mf.load(first).root
    assert mf.load(again).root == root
    message = (f"manifest {root} is already recorded for program together-initiative-2025-10, "
               f"chain 31337, token {env.devnet.token}, payer {dn.PAYER}; the same payments "
               "cannot be re-signed for another")
    for args in (["--yes"], ["--dry-run"]):
        _assert_refused(env, ["send", str(again), *args], message, ledger_empty=False,
                        exact=True)


def test_decimals_mismatch_refused(env: Env) -> None:
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(m), "--yes"],
                    "has 6 decimals on chain, the network profile expects 18",
                    extra={"DISBURSER_DECIMALS": "18"})


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["payments"][0].__setitem__("amount", "0"),
     "payments[0].amount: '0' is not a positive integer string of base units"),
    (lambda d: d["payments"][0].__setitem__("amount", "1.5"),
     "payments[0].amount: '1.5' is not a positive integer string of base units"),
    (lambda d: d["payments"][0].__setitem__("to", d["payments"][0]["to"].swapcase()[:2].lower()
                                            + d["payments"][0]["to"][2:].swapcase()),
     "fails its EIP-55 checksum"),
    (lambda d: d["payments"][0].__setitem__("to", "0x" + "0" * 40),
     "payments[0].to: the zero address cannot be paid"),
    (lambda d: d["payments"][0].__setitem__("to", "0xnot-an-address"),
     "payments[0].to: '0xnot-an-address' is not a 0x-prefixed 20-byte hex address"),
    (lambda d: d["payments"][1].__setitem__("id", d["payments"][0]["id"]),
     "payments[1]: duplicate id 'user-000000' (also payments[0])"),
    (lambda d: d.pop("token"), "missing field 'token'"),
])
def test_malformed_manifests(env: Env, edit: Callable[[dict], None], expected: str) -> None:  # type: ignore[type-arg]
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(_edit(m, edit)), "--yes"], expected)


def test_malformed_json(env: Env, tmp_path: Path) -> None:
    p = tmp_path / "broken.json"
    p.write_text('{"format": ')
    _assert_refused(env, ["send", str(p), "--yes"], f"{p}: not valid JSON")


@pytest.mark.parametrize("args", [["send", "{m}", "--yes"], ["manifest", "verify", "{m}"],
                                  ["reconcile", "{m}", "--no-ledger"]])
def test_a_manifest_path_that_is_a_directory_is_refused(env: Env, args: list[str]) -> None:
    """An internal error (IsADirectoryError, exit 1) in every command that reads one."""
    d = env.tmp / "manifests"
    d.mkdir()
    _assert_refused(env, [a.format(m=d) for a in args], f"{d}: cannot read (Is a directory)",
                    exact=True)


def test_paused_token_stops_before_sending(env: Env) -> None:
    m = env.signed_manifest(3)
    dn.send_as(env.chain, dn.OWNER, env.devnet.token, dn.abi_call("pause()", [], []))
    nonce = env.payer_nonce()
    _assert_refused(env, ["send", str(m), "--yes"], "is paused; no new transaction was signed")
    assert env.payer_nonce() == nonce
    # Fixed: the run resumes and pays.
    dn.send_as(env.chain, dn.OWNER, env.devnet.token, dn.abi_call("unpause()", [], []))
    r = env.cli("send", str(m), "--yes")
    assert r.code == 0, r.err
    assert "confirmed 3, failed 0, unpaid 0" in r.out


def test_blacklisted_batch_contract_stops_batch_mode_only(env: Env) -> None:
    """Every recipient would fail through a batch contract the token blacklists: batch mode
    refuses before sending; direct mode does not pay through it and pays everyone."""
    m = env.signed_manifest(3)
    contract = env.devnet.batch_contract
    dn.send_as(env.chain, dn.OWNER, env.devnet.token,
               dn.abi_call("blacklist(address)", ["address"], [contract]))
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"the token {env.devnet.token} blacklists the batch contract {contract}; "
                    "no new transaction was signed", exact=True)
    r = env.cli("send", str(m), "--yes", "--mode", "direct")
    assert r.code == 0, r.err
    assert "confirmed 3, failed 0, unpaid 0" in r.out


def test_too_little_balance_stops_before_sending(env: Env) -> None:
    m = env.signed_manifest(3)
    bal = env.balance(dn.PAYER)
    data = dn.abi_call("transfer(address,uint256)", ["address", "uint256"],
                       [dn.OWNER, bal - 1_000_000])
    dn.send_as(env.chain, dn.PAYER, env.devnet.token, data)
    message = ("holds 1000000 base units of 0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48, "
               "6750000 are still owed")
    # A ledger that does not know the manifest: a real run would first settle what the
    # payer already paid (a lost ledger), so a dry run only warns.
    r = env.cli("send", str(m), "--dry-run")
    assert r.code == 0 and "would pay 3 of 3" in r.out
    assert "\nwarning: payer " in r.err and message in r.err
    assert r.err.startswith("note: this ledger does not know this manifest")  # nonce > 0
    assert not Path(env.vars["DISBURSER_DB"]).exists()
    _assert_refused(env, ["send", str(m), "--yes"], message)
    # Recorded by that refusal: the dry run refuses as the real run does.
    _assert_refused(env, ["send", str(m), "--dry-run"], message)


def test_plain_key_refused_on_a_real_chain_id_under_the_local_profile(env: Env) -> None:
    """The anvil profile with DISBURSER_CHAIN_ID=1 names a real chain: a plain key is not
    taken there without the override."""
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(m), "--yes"],
                    "DISBURSER_PRIVATE_KEY is refused on network anvil, chain 1: use "
                    "DISBURSER_KEYSTORE (or DISBURSER_ALLOW_PLAIN_KEY=1 to override)",
                    extra={"DISBURSER_CHAIN_ID": "1"}, exact=True)


def test_plain_key_refused_on_real_network(env: Env) -> None:
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(m), "--yes"],
                    "DISBURSER_PRIVATE_KEY is refused on network ethereum",
                    extra={"DISBURSER_NETWORK": "ethereum"})


def test_send_without_yes_when_not_interactive(env: Env) -> None:
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(m)], "send needs confirmation: pass --yes")


@pytest.mark.parametrize(("name", "value", "message"), [
    ("DISBURSER_CONFIRMATIONS", "many", "DISBURSER_CONFIRMATIONS: 'many' is not an integer"),
    ("DISBURSER_FROM_BLOCK", "-5", "DISBURSER_FROM_BLOCK: must be at least 0, got -5"),
    # A cap of 0 would sign transactions no block takes, then wait for ever.
    ("DISBURSER_MAX_FEE_GWEI", "0", "DISBURSER_MAX_FEE_GWEI: must be greater than 0"),
    ("DISBURSER_MAX_TX_FEE_ETH", "0", "DISBURSER_MAX_TX_FEE_ETH: must be greater than 0"),
    ("DISBURSER_CEILING", "relief=1,relief=2",
     "DISBURSER_CEILING: names program 'relief' twice"),
    # Never echoed: the URL may carry a password or an API key.
    ("DISBURSER_RPC_URL", "notaurl-s3cret", "DISBURSER_RPC_URL: not an http:// or https:// URL"),
    ("DISBURSER_RPC_URL", "ftp://user:s3cret@host/",
     "DISBURSER_RPC_URL: not an http:// or https:// URL"),
    ("DISBURSER_RPC_URL", "http://127.0.0.1:99999/v3/KEY-s3cret",
     "DISBURSER_RPC_URL: its port is not a number from 0 to 65535"),
    ("DISBURSER_RPC_URL", "http://user:s3cret@127.0.0..1:8545/",
     "DISBURSER_RPC_URL: its host is not a host name or an address"),
    ("DISBURSER_KEYSTORE", "/tmp", "keystore /tmp: cannot be read (Is a directory)"),
    # int() refuses 10**4400's digits: an internal error before the bound
    ("DISBURSER_DECIMALS", "4400", "DISBURSER_DECIMALS: must be at most 77, got 4400"),
    ("DISBURSER_DB", "postgresql://u:pw-s3cret@127.0.0.1:xx/db",
     "DISBURSER_DB postgresql://u:***@127.0.0.1:xx/db: not a usable PostgreSQL URL"),
    ("DISBURSER_TEST_CRASH_AT", "x:y", "DISBURSER_TEST_CRASH_AT: 'x:y' is not POINT[:N] with "
     "POINT one of after_record, after_broadcast, after_mined, after_confirm, after_bump (a "
     "test hook: unset it)"),
])
def test_bad_setting_names_it(env: Env, name: str, value: str, message: str) -> None:
    m = env.signed_manifest(2)
    extra = {name: value}
    if name == "DISBURSER_KEYSTORE":
        extra.update(DISBURSER_PRIVATE_KEY="", DISBURSER_KEYSTORE_PASSWORD="pw")
    _assert_refused(env, ["send", str(m), "--yes"], message, extra=extra, exact=True)


def test_an_env_file_that_sets_a_key_twice_is_refused(env: Env) -> None:
    """The shell takes the last value, a reader of the file may see the first: for a
    ceiling the difference is money. A byte-order mark does not hide the first line."""
    m = env.signed_manifest(2)
    dotenv = env.tmp / "twice.env"
    dotenv.write_text("\ufeffDISBURSER_CEILING=300000000\n# lowered for the pilot\n"
                      "DISBURSER_CEILING=10\n", encoding="utf-8")
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"{dotenv}:3: DISBURSER_CEILING is already set on line 1",
                    extra={"DISBURSER_ENV_FILE": str(dotenv)}, exact=True)


def test_verify_and_send_without_approvers_configured_say_so(env: Env) -> None:
    """With DISBURSER_APPROVERS unset no signature can count: said as such, by verify and
    by send, before anything is sent."""
    m = env.signed_manifest(2)
    for args in (["manifest", "verify", str(m)], ["send", str(m), "--yes"]):
        _assert_refused(env, args, "DISBURSER_APPROVERS is not set: no manifest can reach "
                        "quorum", extra={"DISBURSER_APPROVERS": ""}, exact=True)


def test_help_and_a_key_variable_are_no_misspelt_settings(env: Env) -> None:
    """`send --help` is where an operator looks up a setting's name: it printed the refusal
    of a misspelt one instead (and of an empty variable over the file's value). A key kept
    as DISBURSER_APPROVER_KEY for --private-key-env is not a setting misspelt. Real
    processes: the checks read the command line."""
    dotenv = env.tmp / "prod.env"
    dotenv.write_text("DISBURSER_QUORUM=2\n")
    r = env.proc("send", "--help", extra={"DISBURSER_FOO": "1", "DISBURSER_QUORUM": "",
                                          "DISBURSER_ENV_FILE": str(dotenv)})
    assert r.code == 0 and "--dry-run" in r.out, r.err
    r = env.proc("send", "x.json", extra={"DISBURSER_FOO": "1"})
    assert (r.code, r.err) == (2, "disburser: error: DISBURSER_FOO (environment) is not a "
                               "disburser setting: it would be ignored; correct it or remove "
                               "it\n")
    m = env.tmp / "m.json"
    assert env.cli("manifest", "build", str(env.write_payments(2)), "--program", "p", "-o",
                   str(m)).code == 0
    key = {"DISBURSER_APPROVER_KEY": env.vars["APPROVER_0"]}
    r = env.proc("manifest", "sign", str(m), "--private-key-env", "DISBURSER_APPROVER_KEY",
                 extra=key)
    assert r.code == 0, r.err
    r = env.proc("manifest", "sign", str(m), extra={
        **key, "DISBURSER_PRIVATE_KEY_ENV": "DISBURSER_APPROVER_KEY"})
    assert r.code == 2 and "has already signed this manifest" in r.err  # read, and refused


def test_a_bad_value_in_the_settings_file_names_its_line(env: Env) -> None:
    """A value from the settings file was refused without saying where it came from; a
    ceiling written with thousands separators was "the ceiling of every other program
    twice"."""
    m = env.signed_manifest(2)
    dotenv = env.tmp / "prod.env"
    dotenv.write_text("# pilot\nDISBURSER_BUMP_AFTER_BLOCKS=two\n")
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"{dotenv}:2: DISBURSER_BUMP_AFTER_BLOCKS: 'two' is not an integer",
                    extra={"DISBURSER_ENV_FILE": str(dotenv)},
                    exact=True)
    _assert_refused(env, ["send", str(m), "--yes"],
                    "DISBURSER_CEILING: '300,000,000': write whole tokens without thousands "
                    "separators (300000000); a comma separates programs (name=amount,...)",
                    extra={"DISBURSER_CEILING": "300,000,000"}, exact=True)


def test_a_misspelt_setting_is_refused_not_ignored(env: Env) -> None:
    """DISBURSER_CIELING=1 in the settings file was ignored: the default ceiling of
    300,000,000 applied and the manifest was paid. Refused, with the line and the setting
    meant; the same in the environment."""
    m = env.signed_manifest(2)
    dotenv = env.tmp / "prod.env"
    dotenv.write_text("# pilot\nDISBURSER_CIELING=1\n")
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"{dotenv}:2: DISBURSER_CIELING is not a disburser setting (did you mean "
                    "DISBURSER_CEILING?): it would be ignored; correct it or remove it",
                    extra={"DISBURSER_ENV_FILE": str(dotenv)}, exact=True)
    _assert_refused(env, ["send", str(m), "--yes"],
                    "DISBURSER_QUROUM (environment) is not a disburser setting (did you mean "
                    "DISBURSER_QUORUM?): it would be ignored; correct it or remove it",
                    extra={"DISBURSER_QUROUM": "3"}, exact=True)


def test_an_empty_environment_variable_over_a_file_setting_is_refused(env: Env) -> None:
    """The file asks quorum 3 and a ceiling of 5 tokens; a compose file's `- X=${X}` left
    both empty in the environment. Empty means the built-in default, so the manifest with 2
    of 3 signatures and 6.75 tokens was paid. Refused, naming the line; an empty
    DISBURSER_PROGRAM still clears the file's (reconcile's filter)."""
    m = env.signed_manifest(3)  # 2 approver signatures
    dotenv = env.tmp / "prod.env"
    dotenv.write_text("DISBURSER_PROGRAM=other\nDISBURSER_QUORUM=3\nDISBURSER_CEILING=5\n")
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"{dotenv}:2: DISBURSER_QUORUM is set here and empty in the environment, "
                    "where empty means the built-in default; unset it (unset "
                    "DISBURSER_QUORUM) to use this file's value, or give it a value",
                    extra={"DISBURSER_ENV_FILE": str(dotenv), "DISBURSER_PROGRAM": "",
                           "DISBURSER_QUORUM": "", "DISBURSER_CEILING": ""}, exact=True)
    r = env.cli("reconcile", str(m), "--no-ledger", "--format", "json",
                extra={"DISBURSER_ENV_FILE": str(dotenv), "DISBURSER_PROGRAM": "",
                       "DISBURSER_QUORUM": "2", "DISBURSER_CEILING": "5"})
    assert r.code == 1, r.err  # reconciled (its payments unpaid), not refused
    assert json.loads(r.out)["program"] == "together-initiative-2025-10"


@pytest.mark.parametrize("edit, message", [
    ({"version": 4}, "not a JSON V3 keystore (version '4')"),
    ({"C": 2**31 - 1}, "pbkdf2 with c=2147483647 rounds costs more than any standard "
     "keystore (at most 10000000); refusing to decrypt"),
], ids=["version_4", "upper_case_rounds"])
def test_a_keystore_read_otherwise_than_it_is_checked_is_refused(
        env: Env, edit: dict[str, int], message: str) -> None:
    """The payer's keystore as `send` reads it: a V4 file, or its pbkdf2 rounds as "C",
    went around the cost check (and ran for minutes); refused before anything is sent."""
    from eth_account import Account

    doc = Account.encrypt(bytes.fromhex(dn.PAYER_KEY[2:]), "password1", kdf="pbkdf2",
                          iterations=2)
    if "C" in edit:
        del doc["crypto"]["kdfparams"]["c"]
        doc["crypto"]["kdfparams"]["C"] = edit["C"]
    else:
        doc.update(edit)
    ks = env.tmp / "payer.json"
    ks.write_text(json.dumps(doc))
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(m), "--yes"], f"keystore {ks}: {message}",
                    extra={"DISBURSER_PRIVATE_KEY": "", "DISBURSER_KEYSTORE": str(ks),
                           "DISBURSER_KEYSTORE_PASSWORD": "password1"}, exact=True)


@pytest.mark.parametrize("text, message", [
    ("=5\n", "2: expected KEY=VALUE with KEY a variable name (letters, digits, _)"),
    ("export\tDISBURSER_CEILING=10\nDISBURSER_CEILING=20\n",
     "3: DISBURSER_CEILING is already set on line 2"),  # read, not a key "export\tDISB..."
    ("DISBURSER_DB=a\0b\n", "2: DISBURSER_DB: a NUL character in the value"),
    ("DISBURSER_CEILING='10\n", "2: DISBURSER_CEILING: the value opens a quote it does not "
     "close"),
])
def test_env_file_lines_that_are_no_setting_are_refused(env: Env, text: str,
                                                        message: str) -> None:
    """"=5" and a NUL were internal errors; "export<TAB>KEY=..." set a variable named
    "export\tKEY", so that the setting was silently not set."""
    m = env.signed_manifest(2)
    dotenv = env.tmp / "bad.env"
    dotenv.write_text("# settings\n" + text)
    _assert_refused(env, ["send", str(m), "--yes"], f"{dotenv}:{message}",
                    extra={"DISBURSER_ENV_FILE": str(dotenv)}, exact=True)


def test_reconcile_and_devnet_outputs_never_replace_the_ledger_or_a_settings_file(
        env: Env) -> None:
    """`reconcile --format html -o disburser.sqlite` wrote its report over the ledger and
    said "wrote"; `devnet --env-out .env` would replace the operator's settings. Refused
    before the chain is read or a node started, the files untouched."""
    m = env.signed_manifest(2)
    assert env.cli("send", str(m), "--yes").code == 0
    db = Path(env.vars["DISBURSER_DB"])
    _assert_refused(env, ["reconcile", "--format", "html", "-o", str(db)],
                    f"{db}: is the ledger (DISBURSER_DB); refusing to write over it (write "
                    "elsewhere, or move it away first)", ledger_empty=False, exact=True)
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"  # and its rows (_assert_refused)
    dotenv = env.tmp / ".env"
    dotenv.write_text("DISBURSER_CEILING=5\n")
    _assert_refused(env, ["devnet", "--port", "1", "--env-out", str(dotenv)],
                    f"{dotenv}: exists and was not written by `disburser devnet`; refusing to "
                    "write over it (--env-out elsewhere, or move it away)", ledger_empty=False,
                    exact=True)
    assert dotenv.read_text() == "DISBURSER_CEILING=5\n"
    report = env.tmp / "report.html"
    assert env.cli("reconcile", "--format", "html", "-o", str(report)).code == 0
    assert env.cli("reconcile", "--format", "html", "-o", str(report)).code == 0  # its own


def test_devnet_on_a_port_in_use_leaves_that_node_alone(env: Env) -> None:
    """`devnet --port P` with another node on P took that node's answers for its own Anvil
    and wrote its test token over the other node's token (a fork rehearsal's, say)."""
    code = env.chain.code(env.devnet.token)
    out = env.tmp / ".env.x"
    _assert_refused(env, ["devnet", "--port", str(env.anvil.port), "--env-out", str(out)],
                    f"port {env.anvil.port} on 127.0.0.1 is in use (another node?): choose "
                    "another --port", ledger_empty=False, exact=True)
    assert env.chain.code(env.devnet.token) == code and not out.exists()


def test_an_anvil_that_exits_at_start_says_why(tmp_path: Path) -> None:
    """"anvil exited with code 2 (args)" was all; its own error line is shown (never with a
    fork URL, which it may quote with a key). And devnet's --env-out in a directory that
    does not exist is refused before the chain is started (it was an internal error after)."""
    from disburser.errors import DisburserError

    with pytest.raises(DisburserError) as e:
        dn.Anvil(extra=["--no-such-flag"]).start()
    assert str(e.value).endswith(": error: unexpected argument '--no-such-flag' found")
    with pytest.raises(DisburserError) as e:
        dn.Anvil(fork_url="http://127.0.0.1:9/v3/KEY-s3cret", extra=["--no-such-flag"]).start()
    assert "s3cret" not in str(e.value) and "unexpected argument" not in str(e.value)
    out = tmp_path / "nodir" / "x.env"
    r = CliRunner().invoke(app, ["--env-file", "/dev/null", "devnet", "--port",
                                 str(dn.free_port()), "--env-out", str(out)])
    assert (r.exit_code, r.stderr) == (2, f"disburser: error: {out}: no such directory "
                                          f"{out.parent} (--env-out)\n")
    r = CliRunner().invoke(app, ["--env-file", "/dev/null", "devnet", "--port",
                                 str(dn.free_port()), "--env-out", "/proc/x.env"])
    assert (r.exit_code, r.stderr) == (2, "disburser: error: /proc/x.env: cannot write (No such "
                                       "file or directory) (--env-out)\n")
    assert "internal error" not in r.stderr


def test_a_ledger_in_a_directory_that_does_not_exist_is_refused(env: Env) -> None:
    """A typo in DISBURSER_DB made the directories and a new, empty ledger, which then took
    the payer's past transfers for a lost ledger's (a page of advice about a refusal)."""
    m = env.signed_manifest(2)
    db = env.tmp / "nonexist" / "dir" / "l.sqlite"
    for args in (["send", str(m), "--yes"], ["send", str(m), "--dry-run"], ["status"],
                 ["reconcile", str(m)]):  # every command alike (status said "no ledger yet")
        _assert_refused(env, args, f"DISBURSER_DB {db}: no such directory {db.parent}",
                        extra={"DISBURSER_DB": str(db)}, exact=True)
    assert not (env.tmp / "nonexist").exists()
    # a command that never opens the ledger is not stopped by it (an approver's machine
    # with the operator's settings file)
    r = env.cli("manifest", "verify", str(m), extra={"DISBURSER_DB": str(db)})
    assert r.code == 0, r.err
    # a URL of another kind than postgresql:// is refused without its password (the
    # directory message printed it whole)
    for url in ("postgresql+psycopg2://admin:S3cret@db.example/ledger",
                "PostgreSQL://admin:S3cret@db.example/ledger"):
        r = env.cli("status", extra={"DISBURSER_DB": url})
        assert r.code == 2 and "S3cret" not in r.err, r.err
        assert "neither a file path nor a PostgreSQL URL (postgresql://...)" in r.err


def test_a_settings_file_named_but_missing_is_refused(env: Env) -> None:
    """It ran on the defaults (chain 31337, the default ceiling) with nothing said."""
    m = env.signed_manifest(2)
    missing = env.tmp / "prod.env"
    _assert_refused(env, ["send", str(m), "--yes"],
                    f"{missing}: no such settings file (--env-file / DISBURSER_ENV_FILE)",
                    extra={"DISBURSER_ENV_FILE": str(missing)}, exact=True)
    _assert_refused(env, ["--env-file", str(env.tmp), "send", str(m), "--yes"],
                    f"{env.tmp}: no such settings file (--env-file / DISBURSER_ENV_FILE)",
                    exact=True)


@pytest.mark.parametrize("prefix", ["0x", ""])
def test_a_private_key_given_for_its_variables_name_is_not_echoed(env: Env,
                                                                  prefix: str) -> None:
    """Without 0x, a key that begins with a letter is a valid variable name: it was echoed
    in "environment variable <key> is not set"."""
    m = env.signed_manifest(1, signers=())
    key = prefix + "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
    for args, extra in ((["--private-key-env", key], {}),
                        ([], {"DISBURSER_PRIVATE_KEY_ENV": key})):
        r = env.cli("manifest", "sign", str(m), *args, extra=extra)
        assert r.code == 2 and key.removeprefix("0x") not in r.out + r.err
        assert r.err == ("disburser: error: --private-key-env: not the name of an "
                         "environment variable (give the name of the variable that holds "
                         "the key, not the key)\n")


@pytest.mark.parametrize("who", ["token", "payer", "batch contract"])
def test_the_token_the_payer_and_the_batch_contract_are_never_paid(env: Env, who: str) -> None:
    """Tokens sent to the token contract or to BatchPayout (which has no way out) are lost
    for good; a payment to the payer pays no one. Refused at build; a manifest made
    elsewhere is refused when loaded (the token, the payer: tests/unit/test_manifest.py) or,
    for the batch contract, which only the settings know, when verified before sending."""
    address = {"token": env.devnet.token, "payer": dn.PAYER,
               "batch contract": env.devnet.batch_contract}[who]
    what = {"token": "the token contract", "payer": "the payer",
            "batch contract": "the batch contract (DISBURSER_BATCH_CONTRACT)"}[who]
    csv_path = env.tmp / "p.csv"
    csv_path.write_text(f"id,to,amount\nu1,{fresh_address('ok')},1\nu2,{address},2\n")
    out = env.tmp / "m.json"
    _assert_refused(env, ["manifest", "build", str(csv_path), "--program", "p", "-o", str(out)],
                    f"{csv_path}: payments[1] (id 'u2').to: {address} is {what}; it cannot be "
                    "a recipient", exact=True)
    assert not out.exists()
    if who != "batch contract":
        return
    # Built where no batch contract is configured, signed, then sent where one is.
    unset = {"DISBURSER_BATCH_CONTRACT": ""}
    assert env.cli("manifest", "build", str(csv_path), "--program", "p", "-o", str(out),
                   extra=unset).code == 0
    for i in (0, 1):
        assert env.cli("manifest", "sign", str(out), "--private-key-env", f"APPROVER_{i}").code == 0
    _assert_refused(env, ["send", str(out), "--yes"],
                    f"{out}: payments[1] (id 'u2').to: {address} is {what}; it cannot be a "
                    "recipient", exact=True)


def test_a_from_block_above_the_head_is_refused_before_anything_is_sent(env: Env) -> None:
    """A ledger that did not see the payer's first nonce reads the payer's past transfers
    from DISBURSER_FROM_BLOCK: a block the chain has not reached is refused."""
    dn.send_as(env.chain, dn.PAYER, env.devnet.token, dn.abi_call(
        "transfer(address,uint256)", ["address", "uint256"], [dn.OWNER, 1]))
    m = env.signed_manifest(2)
    _assert_refused(env, ["send", str(m), "--yes", "--mode", "direct"],
                    "DISBURSER_FROM_BLOCK: 1000000 is above the chain's head ",
                    extra={"DISBURSER_FROM_BLOCK": "1000000"})


def test_same_user_in_a_second_manifest_of_the_program(env: Env) -> None:
    """A re-sorted or corrected allocation has a new paymentsRoot: its users must not be
    paid a second time."""
    first = env.signed_manifest(4, name="a.json")
    assert env.cli("send", str(first), "--yes").code == 0
    resorted = env.tmp / "resorted.csv"
    rows = (env.tmp / "a.json.csv").read_text().splitlines()
    resorted.write_text("\n".join([rows[0], *reversed(rows[1:])]) + "\n")
    out = env.tmp / "resorted.json"
    assert env.cli("manifest", "build", str(resorted), "--program",
                   "together-initiative-2025-10", "-o", str(out)).code == 0
    for i in (0, 1):
        env.cli("manifest", "sign", str(out), "--private-key-env", f"APPROVER_{i}")
    from disburser import manifest as mf

    _assert_refused(env, ["send", str(out), "--yes"],
                    f"payments[0]: id 'user-000003' is already in manifest "
                    f"{mf.load(first).root} of program together-initiative-2025-10; "
                    "a user is paid once per program", ledger_empty=False, exact=True)


def test_a_non_approvers_signature_beside_a_quorum_is_warned_of_and_paid(env: Env) -> None:
    """DESIGN.md: valid when `quorum` configured approvers signed. A further signature by
    someone else neither counts nor refuses (it refused the whole manifest): one warning."""
    m = env.signed_manifest(3)
    r = env.cli("manifest", "sign", str(m), "--private-key-env", "STRANGER",
                extra={"STRANGER": dn.DEV_KEYS[0]})
    assert r.code == 0, r.err
    r = env.cli("send", str(m), "--yes")
    assert r.code == 0, r.err
    assert "confirmed 3, failed 0, unpaid 0" in r.out
    assert [line for line in r.err.splitlines() if not line.startswith("paid ")] == [
        f"warning: {m}: signatures[2] by {dn.DEV_ADDRESSES[0]}: not configured approver(s), "
        "not counted; quorum met by 2 of 2 required"]  # besides the progress lines


def _malleated(sig: str) -> str:
    raw = bytes.fromhex(sig[2:])
    s = mf.SECP256K1_N - int.from_bytes(raw[32:64], "big")
    return "0x" + (raw[:32] + s.to_bytes(32, "big") + bytes([55 - raw[64]])).hex()


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.__setitem__("memo", "x"), "unknown field 'memo' (fields: format, program, "
     "chain_id, token, payer, not_after, payments, signatures)"),
    (lambda d: d["payments"][1].__setitem__("amount2", "1"),
     "payments[1]: unknown field 'amount2' (fields: id, to, amount)"),
    (lambda d: d["signatures"].__setitem__(1, _malleated(d["signatures"][1])),
     "signatures[1]: not canonical: its s is above secp256k1n/2 (a malleated form; signers "
     "make the low-s one)"),
], ids=["unknown-field", "unknown-payment-field", "high-s"])
def test_unsigned_fields_and_malleated_signatures_are_refused(
        env: Env, edit: Callable[[dict], None], expected: str) -> None:  # type: ignore[type-arg]
    m = env.signed_manifest(2)
    bad = _edit(m, edit)
    _assert_refused(env, ["send", str(bad), "--yes"], f"{bad}: {expected}", exact=True)


def test_a_duplicate_key_or_deep_json_is_refused(env: Env) -> None:
    m = env.signed_manifest(2)
    doubled = env.tmp / "doubled.json"
    doubled.write_text(m.read_text().replace('  "payments": [', '  "payments": [],\n'
                                             '  "payments": [', 1))
    _assert_refused(env, ["send", str(doubled), "--yes"],
                    f"{doubled}: key 'payments' appears twice in one object (a reader could "
                    "take either value)", exact=True)
    deep = env.tmp / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    r = env.proc("send", str(deep), "--yes")  # a process of its own: it crashed (SIGSEGV)
    assert (r.code, r.out, r.err) == (2, "", f"disburser: error: {deep}: not a manifest: JSON "
                                             "nested more than 32 levels deep (a manifest "
                                             "nests 3)\n")
