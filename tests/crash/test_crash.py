"""Crash safety: a real `disburser send` process is SIGKILLed at chosen points and at
random moments, then run again; every recipient must end up paid exactly once."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from disburser import devnet as dn
from disburser import manifest as mf
from disburser.domain import TxStatus
from disburser.ledger import Ledger
from tests.conftest import Env, make_env

N = 120


@pytest.fixture
def slow_env(tmp_path: Path) -> Iterator[Env]:
    """Blocks every second, so transactions spend time in flight and kills land mid-flight."""
    with dn.Anvil() as anvil:
        d = dn.setup(anvil.url)  # automine while setting up
        anvil_chain = dn.ch.RpcChain(anvil.url)
        anvil_chain.rpc("evm_setAutomine", [False])
        anvil_chain.rpc("evm_setIntervalMining", [1])
        env = make_env(tmp_path, anvil, d)
        env.vars.update({"DISBURSER_BATCH_SIZE": "10", "DISBURSER_MAX_IN_FLIGHT": "4",
                         "DISBURSER_CONFIRMATIONS": "2", "DISBURSER_POLL_INTERVAL": "0.1"})
        yield env


def _check_exactly_once(env: Env, m: Path) -> None:
    """Balances alone cannot see a recovery that went wrong in batch mode: the contract
    skips what it already paid. So the ledger (never lost here) must also account for
    every payment through its own transactions, no batch may have skipped anything, and
    no approval may have allowed more than was still owed when it was signed."""
    manifest = mf.load(m)
    paid = [env.balance(p.to) for p in manifest.payments]
    assert paid == [p.amount for p in manifest.payments]
    led = Ledger(Path(env.vars["DISBURSER_DB"]))
    txs = led.txs(dn.PAYER)
    assert [t.nonce for t in txs] == list(range(len(txs)))  # no gaps
    assert all(t.status == TxStatus.CONFIRMED.value for t in txs)
    assert env.payer_nonce() == len(txs)
    assert env.chain.allowance(env.devnet.token, dn.PAYER, env.devnet.batch_contract) == 0
    rows = led.payments(manifest.root)
    assert {r.status for r in rows} == {"confirmed"}
    assert all(r.tx_id is not None for r in rows)
    paying = [t for t in txs if t.kind in ("batch", "direct")]
    assert sum(int(t.amount) for t in paying) == manifest.total
    logs = env.chain.rpc("eth_getLogs", [{"address": env.devnet.batch_contract,
                                          "topics": [dn.ch.DISBURSED_TOPIC],
                                          "fromBlock": "0x0", "toBlock": "latest"}])
    assert [int(log["data"][2 + 128:], 16) for log in logs] == [0] * len(logs)  # skipped
    paid_before = 0
    for t in txs:  # invariant 2: what the contract may move never passes what is owed
        if t.kind == "approve":
            assert int(t.amount) <= manifest.total - paid_before, (t.nonce, t.amount)
        elif t.kind in ("batch", "direct"):
            paid_before += int(t.amount)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_record", "after_broadcast", "after_mined",
                                   "after_confirm"])
@pytest.mark.parametrize("mode", ["batch", "direct"])
def test_sigkill_at_each_point_then_resume(slow_env: Env, point: str, mode: str) -> None:
    env = slow_env
    n = N if mode == "batch" else 12
    m = env.signed_manifest(n)
    # The 3rd time the point is reached, the process SIGKILLs itself.
    r = env.proc("send", str(m), "--yes", "--mode", mode,
                 extra={"DISBURSER_TEST_CRASH_AT": f"{point}:3"})
    assert r.code == -signal.SIGKILL, (r.code, r.err)
    r = env.proc("send", str(m), "--yes", "--mode", mode)
    assert r.code == 0, r.err
    _check_exactly_once(env, m)


@pytest.mark.slow
def test_batch_run_killed_then_resumed_in_direct_mode_withdraws_the_allowance(
        slow_env: Env) -> None:
    """Killed in batch mode, the allowance stays at what was owed; resumed in direct mode
    (the batch contract no longer even configured), nothing is owed through the contract
    any more: the run sets it back to 0 (invariant 2), and pays everyone once."""
    env = slow_env
    m = env.signed_manifest(N)
    r = env.proc("send", str(m), "--yes", extra={"DISBURSER_TEST_CRASH_AT": "after_broadcast:2"})
    assert r.code == -signal.SIGKILL, (r.code, r.err)
    deadline = time.monotonic() + 10  # the approval, broadcast before the kill, is mined
    while env.chain.allowance(env.devnet.token, dn.PAYER, env.devnet.batch_contract) == 0:
        assert time.monotonic() < deadline, "the approval was never mined"
        time.sleep(0.1)
    r = env.proc("send", str(m), "--yes", "--mode", "direct",
                 extra={"DISBURSER_BATCH_CONTRACT": ""})
    assert r.code == 0, r.err
    _check_exactly_once(env, m)  # allowance 0 among the rest
    approvals = [t for t in Ledger(Path(env.vars["DISBURSER_DB"])).txs(dn.PAYER)
                 if t.kind == "approve"]
    assert [t.amount for t in approvals] == [str(mf.load(m).total), "0"]


@pytest.mark.slow
def test_sigkill_at_random_moments(slow_env: Env) -> None:
    env = slow_env
    m = env.signed_manifest(N)
    rng = random.Random(20251010)
    kills = 0
    for _ in range(12):
        p = env.popen("send", str(m), "--yes")
        try:
            p.wait(timeout=rng.uniform(0.4, 2.5))
        except Exception:  # noqa: BLE001 - still running: kill it
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        if p.returncode == 0:
            break
    assert kills >= 3
    r = env.proc("send", str(m), "--yes")
    assert r.code == 0, r.err
    _check_exactly_once(env, m)


@pytest.mark.slow
def test_sigkill_then_lost_ledger_batch_mode(slow_env: Env) -> None:
    env = slow_env
    m = env.signed_manifest(N)
    r = env.proc("send", str(m), "--yes", extra={"DISBURSER_TEST_CRASH_AT": "after_mined:4"})
    assert r.code == -signal.SIGKILL
    # Let what was broadcast be mined, then lose the ledger.
    time.sleep(1.5)
    for f in Path(env.vars["DISBURSER_DB"]).parent.glob("ledger.sqlite*"):
        f.unlink()
    r = env.proc("send", str(m), "--yes")
    assert r.code == 0, r.err
    manifest = mf.load(m)
    assert [env.balance(p.to) for p in manifest.payments] == [p.amount for p in manifest.payments]


@pytest.mark.slow
def test_deploy_killed_after_its_broadcast_then_run_again_deploys_once(slow_env: Env) -> None:
    """The second run settled the first deployment, then deployed a second contract at the
    next nonce and printed only that one: gas wasted, and two addresses an operator could
    configure, each with its own paid bitmap."""
    env = slow_env
    nonce = env.payer_nonce()
    r = env.proc("deploy", extra={"DISBURSER_TEST_CRASH_AT": "after_broadcast:1"})
    assert r.code == -signal.SIGKILL, (r.code, r.err)
    r = env.proc("deploy")
    assert r.code == 0, r.err
    address = r.out.strip().splitlines()[-1]
    (t,) = Ledger(Path(env.vars["DISBURSER_DB"])).txs(dn.PAYER)
    assert (t.kind, t.nonce, t.status) == ("deploy", nonce, TxStatus.CONFIRMED.value)
    assert env.payer_nonce() == nonce + 1
    assert env.chain.code(address)
    r = env.proc("deploy")  # and again, with nothing in flight: the same address
    assert (r.code, r.out.strip().splitlines()[-1]) == (0, address)
    assert env.payer_nonce() == nonce + 1


@pytest.mark.slow
def test_sigkill_after_a_fee_bump_is_written_ahead_then_resume(slow_env: Env) -> None:
    """Priced out by a base fee spike, a transfer is bumped: the new attempt is committed,
    then the process dies before broadcasting it. The next run sends those stored bytes (or
    finds the first attempt mined), never a third signature at a new nonce."""
    env = slow_env
    c = env.chain
    c.rpc("evm_setIntervalMining", [0])  # blocks only when this test mines them
    extra = {"DISBURSER_MAX_FEE_GWEI": "5000", "DISBURSER_BUMP_AFTER_BLOCKS": "2"}
    m = env.signed_manifest(2)
    p = env.popen("send", str(m), "--yes", "--mode", "direct",
                  extra={**extra, "DISBURSER_TEST_CRASH_AT": "after_bump:1"})
    led = Ledger(Path(env.vars["DISBURSER_DB"]))
    deadline = time.monotonic() + 60
    while not (Path(env.vars["DISBURSER_DB"]).exists() and led.txs(dn.PAYER)):
        assert time.monotonic() < deadline and p.poll() is None, "nothing was signed"
        time.sleep(0.05)
    while p.poll() is None:  # a base fee over every first attempt's cap: each block
        assert time.monotonic() < deadline, "no bump"
        c.rpc("anvil_setNextBlockBaseFeePerGas", [hex(1000 * 10**9)])
        c.rpc("evm_mine", [])
        time.sleep(0.3)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    bumped = [t for t in led.txs(dn.PAYER) if len(led.attempts(t.id or 0)) == 2]
    assert bumped, "killed before a bump was written"
    second = led.attempts(bumped[0].id or 0)[1].hash
    assert c.rpc("eth_getTransactionByHash", [second]) is None  # never broadcast
    c.rpc("anvil_setNextBlockBaseFeePerGas", [hex(10**9)])
    c.rpc("evm_setIntervalMining", [1])
    r = env.proc("send", str(m), "--yes", "--mode", "direct", extra=extra)
    assert r.code == 0, r.err
    _check_exactly_once(env, m)
    for t in led.txs(dn.PAYER):
        assert len(led.attempts(t.id or 0)) <= 2
        assert t.mined_hash in {a.hash for a in led.attempts(t.id or 0)}
