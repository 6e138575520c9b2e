"""Shared fixtures: a fresh real Anvil per test (Anvil slows as its state grows), the
settings that point disburser at it, and helpers to run the real CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_utils import keccak, to_checksum_address
from typer.testing import CliRunner

from disburser import chain as ch
from disburser import devnet as dn
from disburser.cli import app

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Env:
    """A devnet plus a private ledger, log file and lock dir for one test."""

    devnet: dn.Devnet
    anvil: dn.Anvil
    tmp: Path
    vars: dict[str, str]

    @property
    def chain(self) -> ch.RpcChain:
        return ch.RpcChain(self.devnet.url)

    def cli(self, *args: str, extra: dict[str, str] | None = None) -> CliResult:
        """Run the CLI in-process (fast); same code path as the console script."""
        env = {**self.vars, **(extra or {})}
        with _environ_kept():  # what a settings file put there leaves with the command
            r = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
        return CliResult(r.exit_code, r.stdout, r.stderr)

    def proc(self, *args: str, extra: dict[str, str] | None = None,
             timeout: float = 120) -> CliResult:
        """Run the CLI as a real process."""
        env = {**os.environ, **self.vars, **(extra or {})}
        r = subprocess.run([sys.executable, "-m", "disburser.cli", *args], env=env,
                           cwd=self.tmp, capture_output=True, text=True, timeout=timeout)
        return CliResult(r.returncode, r.stdout, r.stderr)

    def popen(self, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, **self.vars, **(extra or {})}
        return subprocess.Popen([sys.executable, "-m", "disburser.cli", *args], env=env,
                                cwd=self.tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def balance(self, who: str) -> int:
        return self.chain.token_balance(self.devnet.token, who)

    def payer_nonce(self) -> int:
        return self.chain.nonce(self.devnet.payer, "latest")

    def write_payments(self, n: int, *, name: str = "pay.csv", seed: str = "r",
                       amount: str | None = None) -> Path:
        path = self.tmp / name
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "to", "amount"])
            for i in range(n):
                pid = f"user-{i:06d}" if seed == "r" else f"{seed}-user-{i:06d}"
                w.writerow([pid, fresh_address(f"{seed}{i}"),
                            amount or f"{i % 7 + 1}.25"])
        return path

    def signed_manifest(self, n: int, *, name: str = "m.json", seed: str = "r",
                        signers: tuple[int, ...] = (0, 1),
                        program: str = "together-initiative-2025-10") -> Path:
        csv_path = self.write_payments(n, name=name + ".csv", seed=seed)
        out = self.tmp / name
        r = self.cli("manifest", "build", str(csv_path), "--program", program, "-o", str(out))
        assert r.code == 0, r.err
        for i in signers:
            r = self.cli("manifest", "sign", str(out), "--private-key-env", f"APPROVER_{i}")
            assert r.code == 0, r.err
        return out


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def fresh_address(seed: str) -> str:
    return str(to_checksum_address(keccak(text=seed)[12:]))


def make_env(tmp: Path, anvil: dn.Anvil, devnet: dn.Devnet) -> Env:
    vars_ = {
        **devnet.env(),
        "DISBURSER_DB": str(tmp / "ledger.sqlite"),
        "DISBURSER_LOG_FILE": str(tmp / "log.jsonl"),
        "DISBURSER_LOCK_DIR": str(tmp / "locks"),
        "DISBURSER_CONFIRMATIONS": "1",
        "DISBURSER_POLL_INTERVAL": "0.05",
        "DISBURSER_ENV_FILE": os.devnull,  # named: it must exist
        **{f"APPROVER_{i}": k for i, k in enumerate(devnet.approver_keys)},
    }
    return Env(devnet, anvil, tmp, vars_)



@contextmanager
def _environ_kept() -> Iterator[None]:
    """os.environ as it was: an in-process command's settings file writes its keys there
    (as a real process's would, for its own life), and CliRunner restores only the keys it
    was given, so that one test's DISBURSER_CEILING reached the next test's commands."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    with _environ_kept():
        yield


@pytest.fixture(autouse=True)
def _no_broadcasting_thread_outlives_its_run() -> Iterator[None]:
    """Every in-process send (unit, fault tests) closes its broadcasting thread: nothing may
    reach the node from a run that is over."""
    yield
    left = [t.name for t in threading.enumerate() if t.name == "disburser-broadcast"]
    assert not left, f"{len(left)} broadcasting thread(s) outlived their run"

@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with dn.Anvil() as anvil:
        yield make_env(tmp_path, anvil, dn.setup(anvil.url))
