"""The optional PostgreSQL ledger: the same send on a shared database, and one runner per
payer across "machines" (separate processes with separate lock directories)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from disburser import devnet as dn
from disburser import manifest as mf
from disburser.ledger import Ledger
from tests.conftest import Env

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def pg_server() -> Iterator[tuple[list[str], int]]:
    """A throwaway PostgreSQL server on a free loopback port (Debian's postgresql; the test
    set-up installs it). It runs as the postgres user: the server refuses root."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail("PostgreSQL 15 server binaries missing: install Debian's `postgresql` "
                    "(./scripts/test does)")
    base = Path(tempfile.mkdtemp(prefix="disburser-pg-"))
    data = base / "data"
    os.chmod(base, 0o777)
    port = dn.free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "postgres"], check=True, capture_output=True)
    subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"),
                    "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield as_pg, port
    finally:
        subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: tuple[list[str], int], request: pytest.FixtureRequest) -> str:
    """A fresh database per test: a ledger belongs to one chain."""
    as_pg, port = pg_server
    name = "ledger_" + request.node.name.lower().replace("[", "_").replace("]", "")[:40]
    subprocess.run([*as_pg, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                    "-U", "postgres", name], check=True, capture_output=True)
    return f"postgresql://postgres@127.0.0.1:{port}/{name}"


def test_send_on_a_postgres_ledger(env: Env, pg_url: str) -> None:
    env.vars["DISBURSER_DB"] = pg_url
    m = env.signed_manifest(40)
    r = env.cli("send", str(m), "--yes", extra={"DISBURSER_BATCH_SIZE": "15"})
    assert r.code == 0, r.err
    manifest = mf.load(m)
    for p in manifest.payments:
        assert env.balance(p.to) == p.amount
    led = Ledger(pg_url)
    assert {p.status for p in led.payments(manifest.root)} == {"confirmed"}
    assert [t.kind for t in led.txs(dn.PAYER)] == ["approve", "batch", "batch", "batch"]
    r = env.cli("status", "--json")
    assert r.code == 0 and '"confirmed": 40' in r.out
    # reconcile reads the payments back from the shared ledger's rows, in index order
    assert [r[:5] for r in led.payment_rows()] == [
        (manifest.root, p.index, p.id, p.to, str(p.amount)) for p in manifest.payments]
    r = env.cli("reconcile", "--format", "json")
    assert r.code == 0, r.err
    assert '"paid": 40' in r.out and f'"paid_total": "{manifest.total}"' in r.out


def test_one_runner_per_payer_across_machines(env: Env, pg_url: str, tmp_path: Path) -> None:
    # Blocks every second so the first runner is still at work when the second starts.
    env.chain.rpc("evm_setAutomine", [False])
    env.chain.rpc("evm_setIntervalMining", [1])
    env.vars["DISBURSER_DB"] = pg_url
    m = env.signed_manifest(30, seed="pg2")
    env.vars["DISBURSER_CONFIRMATIONS"] = "3"
    first = env.popen("send", str(m), "--yes", extra={"DISBURSER_LOCK_DIR": str(tmp_path / "a"),
                                                      "DISBURSER_BATCH_SIZE": "5"})
    try:
        time.sleep(2.5)
        assert first.poll() is None, first.communicate()
        # another machine: its own lock directory, the same shared ledger and payer
        r = env.proc("send", str(m), "--yes", extra={"DISBURSER_LOCK_DIR": str(tmp_path / "b")},
                     timeout=60)
        assert r.code == 2, (r.out, r.err)
        assert f"another disburser is running for payer {dn.PAYER} (pid {first.pid} on" in r.err
        out, err = first.communicate(timeout=90)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    for p in mf.load(m).payments:
        assert env.balance(p.to) == p.amount
