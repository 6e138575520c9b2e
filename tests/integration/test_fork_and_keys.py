"""Rehearsal on a fork of a chain disburser did not create, with a keystore made by another
tool (Foundry's cast); no secret in any file the tool wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disburser import chain as ch
from disburser import devnet as dn
from disburser import manifest as mf
from tests.conftest import ROOT, fresh_address

CAST = ROOT / "node_modules/@foundry-rs/cast-linux-amd64/bin/cast"
PASSWORD = "correct horse battery staple 42"


def _cast_keystore(tmp: Path) -> tuple[Path, str, str]:
    kdir = tmp / "keys"
    kdir.mkdir()
    out = subprocess.run([str(CAST), "wallet", "new", str(kdir), "--unsafe-password", PASSWORD],
                         capture_output=True, text=True, check=True).stdout
    address = next(ln.split()[-1] for ln in out.splitlines() if ln.strip().startswith("Address"))
    (path,) = list(kdir.iterdir())
    key = subprocess.run([str(CAST), "wallet", "decrypt-keystore", "-k", str(kdir),
                          path.name, "--unsafe-password", PASSWORD],
                         capture_output=True, text=True).stdout
    return path, address, key.strip().split()[-1] if key.strip() else ""


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read() if proc.stderr else "devnet exited")
        if time.monotonic() > end:
            raise AssertionError("devnet did not write its settings")
        time.sleep(0.1)


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


@pytest.mark.slow
def test_fork_rehearsal_with_cast_keystore(tmp_path: Path) -> None:
    keystore, address, key_hex = _cast_keystore(tmp_path)
    # The "real" chain: chain id 1, the USDC-like token at the mainnet address, some history.
    with dn.Anvil(chain_id=1) as origin:
        oc = ch.RpcChain(origin.url)
        token = dn.place_token(oc)
        for i in range(5):
            dn.mint(oc, token, fresh_address(f"holder{i}"), 10**9)
        origin_head = oc.head().number
        env_file = tmp_path / ".env.devnet"
        port = dn.free_port()
        base = {**os.environ, "DISBURSER_PAYER": address, "DISBURSER_ENV_FILE": "/dev/null"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "disburser.cli", "devnet", "--fork-url", origin.url,
             "--port", str(port), "--env-out", str(env_file)],
            env=base, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(env_file, proc)
            fork_env = _read_env(env_file)
            assert fork_env["DISBURSER_CHAIN_ID"] == "1"
            assert fork_env["DISBURSER_NETWORK"] == "ethereum"
            assert "DISBURSER_PRIVATE_KEY" not in fork_env  # the operator's own key is used
            # and no override for plain keys, which would outlive the rehearsal's shell
            assert "DISBURSER_ALLOW_PLAIN_KEY" not in fork_env
            # a ledger and a log of the rehearsal's own, never the real run's default ledger
            assert (fork_env["DISBURSER_DB"], fork_env["DISBURSER_LOG_FILE"]) == (
                "disburser-fork.sqlite", "disburser-fork.log.jsonl")
            fc = ch.RpcChain(fork_env["DISBURSER_RPC_URL"])
            assert fc.token_balance(token, address) == 400_000_000 * 10**6
            run_env = {
                **os.environ, **fork_env, "DISBURSER_ENV_FILE": "/dev/null",
                "DISBURSER_KEYSTORE": str(keystore),
                "DISBURSER_KEYSTORE_PASSWORD": PASSWORD,
                "DISBURSER_DB": str(tmp_path / "ledger.sqlite"),
                "DISBURSER_LOG_FILE": str(tmp_path / "log.jsonl"),
                "DISBURSER_LOCK_DIR": str(tmp_path / "locks"),
                "APPROVER_0": dn.DEV_KEYS[2], "APPROVER_1": dn.DEV_KEYS[3],
            }

            def run(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([sys.executable, "-m", "disburser.cli", *args],
                                      env=run_env, cwd=tmp_path, capture_output=True, text=True,
                                      timeout=120)

            csv_path = tmp_path / "p.csv"
            rows = [f"u{i},{fresh_address(f'fork{i}')},{i + 1}.5" for i in range(25)]
            csv_path.write_text("id,to,amount\n" + "\n".join(rows) + "\n")
            m = tmp_path / "m.json"
            r = run("manifest", "build", str(csv_path), "--program", "rehearsal", "-o", str(m))
            assert r.returncode == 0, r.stderr
            for i in (0, 1):
                assert run("manifest", "sign", str(m), "--private-key-env",
                           f"APPROVER_{i}").returncode == 0
            r = run("send", str(m), "--yes")
            assert r.returncode == 0, r.stderr
            for p in mf.load(m).payments:
                assert fc.token_balance(token, p.to) == p.amount
                assert oc.token_balance(token, p.to) == 0  # the origin is untouched
            r = run("reconcile", "--format", "json")
            assert r.returncode == 0, r.stdout + r.stderr
            # No secret in any file the tool wrote.
            secrets = [PASSWORD]
            if key_hex:
                secrets += [key_hex.removeprefix("0x"), key_hex]
            for f in tmp_path.rglob("*"):
                if f.is_file() and f != keystore and "keys" not in f.parts:
                    data = f.read_bytes()
                    for sec in secrets:
                        assert sec.encode() not in data, f"{sec[:6]}… leaked into {f}"
                        assert sec.lower().encode() not in data.lower(), f
            for stream in (r.stdout, r.stderr):
                assert PASSWORD not in stream
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
        assert oc.head().number == origin_head


def test_bnb_like_18_decimal_token_refuses_a_6_decimal_manifest(tmp_path: Path) -> None:
    with dn.Anvil(chain_id=56) as a:
        d = dn.setup(a.url, decimals=18)
        env = {**os.environ, **d.env(), "DISBURSER_ENV_FILE": "/dev/null",
               "DISBURSER_DB": str(tmp_path / "l.sqlite"),
               "DISBURSER_LOCK_DIR": str(tmp_path / "locks"),
               "DISBURSER_LOG_FILE": str(tmp_path / "log.jsonl"),
               "DISBURSER_CHAIN_ID": "56", "DISBURSER_DECIMALS": "6",
               # a devnet under a real chain's id: its dev key needs the override
               "DISBURSER_ALLOW_PLAIN_KEY": "1",
               "APPROVER_0": dn.DEV_KEYS[2], "APPROVER_1": dn.DEV_KEYS[3]}

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "disburser.cli", *args], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60)

        csv_path = tmp_path / "p.csv"
        csv_path.write_text(f"id,to,amount\nu1,{fresh_address('b1')},5\n")
        m = tmp_path / "m.json"
        assert run("manifest", "build", str(csv_path), "--program", "p", "-o",
                   str(m)).returncode == 0
        for i in (0, 1):
            run("manifest", "sign", str(m), "--private-key-env", f"APPROVER_{i}")
        nonce = ch.RpcChain(a.url).nonce(d.payer)
        r = run("send", str(m), "--yes")
        assert r.returncode == 2
        assert r.stderr.strip() == (
            f"disburser: error: token {d.token} has 18 decimals on chain, the network profile "
            "expects 6: refusing to pay amounts built for 6")
        assert ch.RpcChain(a.url).nonce(d.payer) == nonce


def test_key_new_and_address(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    ks = tmp_path / "k.json"
    env = {**os.environ, "DISBURSER_ENV_FILE": "/dev/null"}
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "key", "new", "-o", str(ks),
                        "--password-file", str(pw)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    address = r.stdout.strip()
    assert oct(ks.stat().st_mode & 0o777) == "0o600"
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "key", "address", str(ks)],
                       env=env, capture_output=True, text=True)
    assert r.stdout.strip() == address
    # cast reads it too: the format is the standard V3 keystore.
    r = subprocess.run([str(CAST), "wallet", "address", "--keystore", str(ks), "--password",
                        PASSWORD], capture_output=True, text=True)
    assert r.stdout.strip() == address, r.stderr
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "key", "new", "-o", str(ks),
                        "--password-file", str(pw)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_a_fork_url_that_fails_is_named_without_its_secrets(tmp_path: Path) -> None:
    """Anvil cannot fork from a node that does not answer: the error shows its command line,
    with the fork URL's password and API key left out."""
    url = "http://user:pw-s3cret@127.0.0.1:9/v2/KEY-s3cret"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISBURSER_")}
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "devnet", "--fork-url", url,
                        "--port", str(dn.free_port())], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "s3cret" not in r.stdout + r.stderr
    assert "--fork-url http://127.0.0.1:9 " in r.stderr
