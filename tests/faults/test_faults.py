"""Fault injection against a real Anvil (issue 3, "a send engine that survives the real
world"): the send engine runs - as a real `disburser send` process or as the same loop in a
thread - while the test drops, reorganises, reprices and corrupts what it sees. Every test
asserts outcomes: exact balances on chain, ledger rows, messages, gapless nonces."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rlp
from eth_utils import keccak

from disburser import chain as ch
from disburser import devnet as dn
from disburser import manifest as mf
from disburser import sender as sender_mod
from disburser import settings as st
from disburser.domain import Mode, PaymentStatus, TxStatus
from disburser.errors import FailClosed, Interrupted
from disburser.keys import Signer
from disburser.ledger import Ledger, TxRow
from disburser.logging import configure
from disburser.sender import Sender, SendResult, config_from_settings
from tests.conftest import Env, make_env
from tests.faultproxy import FaultProxy

GWEI = 10**9


# --- harness -------------------------------------------------------------------------------


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll until ``pred()`` is truthy. The timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Miner:
    """Manual mining the test controls: one block on demand, or a block every ``interval``
    seconds in the background until paused."""

    def __init__(self, url: str) -> None:
        self.c = ch.RpcChain(url)
        self._auto = threading.Event()
        self._quit = threading.Event()
        self.interval = 0.05
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def mine(self, n: int = 1) -> None:
        for _ in range(n):
            self.c.rpc("evm_mine")

    def auto(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._auto.set()

    def close(self) -> None:
        self._quit.set()
        self._auto.set()
        self._t.join(5)

    def _loop(self) -> None:
        while not self._quit.is_set():
            self._auto.wait()
            if self._quit.is_set():
                return
            try:
                self.c.rpc("evm_mine")
            except Exception:  # noqa: BLE001 - the chain is being stopped
                return
            time.sleep(self.interval)


class Engine:
    """The send loop of `disburser send`, built the way the CLI builds it, in a thread:
    the test drives the chain meanwhile and stops it through ``should_stop``."""

    live: list[Engine] = []  # stopped by the fixture if a test fails half-way

    def __init__(self, env: Env, manifest: Path, extra: dict[str, str] | None = None, *,
                 mode: str = "batch", rpc_url: str | None = None, timeout: float = 30.0) -> None:
        s = st.load({**env.vars, **(extra or {})})
        configure(s.log_file)
        self.m = mf.load(manifest)
        assert s.private_key is not None
        signer = Signer(bytes.fromhex(s.private_key.removeprefix("0x")))
        v = mf.verify(self.m, source=str(manifest), approvers=s.approvers, quorum=s.quorum,
                      chain_id=s.chain_id, token=s.token, payer=signer.address,
                      now=int(time.time()))
        cfg = config_from_settings(s, Mode(mode), self.m.program)
        self.ledger = Ledger(s.db)
        self.ledger.accept_manifest(self.m, ceiling=cfg.ceiling, signers=v.approved)
        url = rpc_url or s.rpc_url
        self.chain = ch.RpcChain(url, ch.Transport(url, timeout=timeout))
        self._stop = threading.Event()
        self.sender = Sender(self.ledger, self.chain, signer, cfg, should_stop=self._stop.is_set)
        self.result: SendResult | None = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Engine:
        Engine.live.append(self)
        self._t.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self.sender.run(self.m)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._t.is_alive()

    def join(self, timeout: float = 90.0) -> SendResult:
        self._t.join(timeout)
        assert not self._t.is_alive(), "the send loop did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def ledger(env: Env) -> Ledger:
    return Ledger(Path(env.vars["DISBURSER_DB"]))


def events(env: Env, name: str) -> list[dict[str, Any]]:
    """Log events of that name from the run's JSON log file."""
    path = Path(env.vars["DISBURSER_LOG_FILE"])
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == name:
            out.append(e)
    return out


def pool(env: Env) -> set[str]:
    """Hashes of the payer's transactions in the node's pool (pending or queued)."""
    content = env.chain.rpc("txpool_content")
    out: set[str] = set()
    for part in ("pending", "queued"):
        for sender, by_nonce in content.get(part, {}).items():
            if sender.lower() == dn.PAYER.lower():
                out |= {str(tx["hash"]).lower() for tx in by_nonce.values()}
    return out


def raw_nonce(raw: str) -> int:
    """The nonce inside signed EIP-1559 bytes (0x02 || rlp([chainId, nonce, ...]))."""
    b = bytes.fromhex(raw.removeprefix("0x"))
    assert b[0] == 2
    return int.from_bytes(rlp.decode(b[1:])[1], "big")


def open_batches(env: Env, status: str = TxStatus.PENDING.value) -> list[TxRow]:
    return [t for t in ledger(env).txs(dn.PAYER) if t.kind == "batch" and t.status == status]


def in_pool(env: Env, txs: list[TxRow]) -> bool:
    led = ledger(env)
    p = pool(env)
    return all(led.attempts(t.id or 0)[-1].hash.lower() in p for t in txs)


def batches_in_pool(env: Env, miner: Miner, n: int) -> list[TxRow]:
    """Mine the engine's approval, then wait until ``n`` batches wait in the pool."""
    wait_for(lambda: ledger(env).txs(dn.PAYER) and in_pool(env, ledger(env).txs(dn.PAYER)[:1]),
             "the approval in the pool")
    miner.mine()
    return wait_for(lambda: len(open_batches(env)) == n and in_pool(env, open_batches(env))
                    and open_batches(env), f"{n} batches in the pool")


def assert_exactly_once(env: Env, manifest: Path, failed: frozenset[int] = frozenset(),
                        cap_wei: int | None = None) -> None:
    """Every recipient paid exactly its amount (failed ones nothing), the ledger agrees, the
    payer's nonces are gapless and each signed attempt carries its transaction's nonce."""
    m = mf.load(manifest)
    assert [env.balance(p.to) for p in m.payments] == [
        0 if p.index in failed else p.amount for p in m.payments]
    led = ledger(env)
    rows = led.payments(m.root)
    assert {r.idx for r in rows if r.status == PaymentStatus.FAILED.value} == set(failed)
    assert all(r.status == PaymentStatus.CONFIRMED.value for r in rows if r.idx not in failed)
    txs = led.txs(dn.PAYER)
    assert [t.nonce for t in txs] == list(range(txs[0].nonce, txs[0].nonce + len(txs)))
    assert env.payer_nonce() == txs[-1].nonce + 1
    assert {t.status for t in txs} <= {TxStatus.CONFIRMED.value, TxStatus.REVERTED.value}
    for t in txs:
        atts = led.attempts(t.id or 0)
        assert t.mined_hash in {a.hash for a in atts}
        for a in atts:
            assert "0x" + keccak(bytes.fromhex(a.raw[2:])).hex() == a.hash
            assert raw_nonce(a.raw) == t.nonce  # replacements only ever at the same nonce
            if cap_wei is not None:
                assert int(a.max_fee) <= cap_wei
    assert env.chain.allowance(env.devnet.token, dn.PAYER, env.devnet.batch_contract) == 0


def assert_never_resigned(env: Env) -> None:
    """One signed attempt per transaction: nothing was re-signed, not even at its nonce."""
    led = ledger(env)
    assert all(len(led.attempts(t.id or 0)) == 1 for t in led.txs(dn.PAYER))


def tx_from(env: Env, sender: str, to: str, data: str, *, tip_gwei: int = 50,
            nonce: int | None = None, value: int = 0, gas: int = 200_000) -> str:
    """A transaction from an unlocked dev account with a high tip (so that Anvil orders it
    first in the next block); returns its hash without mining."""
    tx: dict[str, str] = {"from": sender, "to": to, "data": data, "gas": hex(gas),
                          "maxFeePerGas": hex(200 * GWEI), "maxPriorityFeePerGas":
                          hex(tip_gwei * GWEI), "value": hex(value)}
    if nonce is not None:
        tx["nonce"] = hex(nonce)
    return str(env.chain.rpc("eth_sendTransaction", [tx]))


SMALL = {"DISBURSER_BATCH_SIZE": "10", "DISBURSER_POLL_INTERVAL": "0.05"}


@pytest.fixture
def manual(tmp_path: Path) -> Iterator[tuple[Env, Miner]]:
    """A fresh chain that mines only when the test says so."""
    with dn.Anvil() as anvil:
        d = dn.setup(anvil.url)  # automine while setting up
        env = make_env(tmp_path, anvil, d)
        env.vars.update(SMALL)
        env.chain.rpc("evm_setAutomine", [False])
        miner = Miner(anvil.url)
        try:
            yield env, miner
        finally:
            for eng in Engine.live:
                eng.stop()
                eng._t.join(10)
            Engine.live.clear()
            miner.close()


# --- 1. nonces ---------------------------------------------------------------------------


def test_dropped_transactions_are_rebroadcast_from_their_stored_bytes(
        manual: tuple[Env, Miner]) -> None:
    env, miner = manual
    m = env.signed_manifest(30)
    eng = Engine(env, m).start()
    batches = pending = batches_in_pool(env, miner, 3)
    first = {t.nonce: ledger(env).attempts(t.id or 0)[0].hash for t in batches}
    # Anvil drops the transaction and those after it (they could not be mined anyway).
    env.chain.rpc("anvil_dropTransaction", [ledger(env).attempts(pending[0].id or 0)[-1].hash])
    # The engine sees them neither mined nor pending and sends the same bytes again.
    wait_for(lambda: {e["nonce"] for e in events(env, "transfer_dropped_rebroadcast")}
             >= {t.nonce for t in pending}, "re-broadcast")
    wait_for(lambda: in_pool(env, pending), "the same bytes back in the pool")
    miner.auto()
    res = eng.join()
    assert (res.confirmed, res.failed, res.unpaid) == (30, 0, 0)
    assert_exactly_once(env, m)
    for t in ledger(env).txs(dn.PAYER):
        if t.kind == "batch":
            (a,) = ledger(env).attempts(t.id or 0)  # never re-signed
            assert a.hash == first[t.nonce] == t.mined_hash


def test_nonce_gap_is_filled_by_rebroadcasting_the_stored_bytes(
        manual: tuple[Env, Miner]) -> None:
    """The engine stops with three batches in the pool; the node loses the lowest one only
    (the others wait behind the gap); a new run fills the gap with the stored bytes."""
    env, miner = manual
    m = env.signed_manifest(30)
    eng = Engine(env, m).start()
    batches_in_pool(env, miner, 3)
    eng.stop()
    with pytest.raises(Interrupted, match="stopped by operator"):
        eng.join()
    led = ledger(env)
    batches = open_batches(env)
    raws = [led.attempts(t.id or 0)[0].raw for t in batches]
    env.chain.rpc("anvil_dropAllTransactions")
    for raw in raws[1:]:
        env.chain.send_raw(raw)
    latest = env.payer_nonce()
    assert latest == batches[0].nonce
    assert env.chain.nonce(dn.PAYER, "pending") == latest  # a gap: the rest is queued
    miner.mine()
    assert env.payer_nonce() == latest  # nothing can be mined past the gap
    miner.auto()
    res = Engine(env, m).start().join()
    assert (res.confirmed, res.unpaid, res.txs_sent) == (30, 0, 0)  # nothing new signed
    assert_exactly_once(env, m)
    hashes = {ev["tx_hash"] for ev in events(env, "transfer_dropped_rebroadcast")}
    assert led.attempts(batches[0].id or 0)[0].hash in hashes
    assert [len(led.attempts(t.id or 0)) for t in batches] == [1, 1, 1]


def test_foreign_pending_transaction_at_start_fails_closed(manual: tuple[Env, Miner]) -> None:
    env, _ = manual
    m = env.signed_manifest(5)
    nonce = env.payer_nonce()
    h = tx_from(env, dn.PAYER, dn.OWNER, "0x", value=1, gas=21_000)
    r = env.cli("send", str(m), "--dry-run")  # no ledger yet: the dry run creates none
    assert r.code == 2, r.err
    assert (f"payer {dn.PAYER}: nonce {nonce} is taken by pending transaction {h}, which "
            "this ledger did not send") in r.err
    assert not Path(env.vars["DISBURSER_DB"]).exists()
    r = env.cli("send", str(m), "--yes")
    assert r.code == 2, r.err
    assert (f"payer {dn.PAYER}: nonce {nonce} is taken by pending transaction {h}, which "
            "this ledger did not send") in r.err
    assert env.payer_nonce() == nonce and ledger(env).txs() == []


def test_foreign_transaction_taking_an_in_flight_nonce_fails_closed(
        manual: tuple[Env, Miner]) -> None:
    env, miner = manual
    m = env.signed_manifest(20)
    eng = Engine(env, m).start()
    victim = batches_in_pool(env, miner, 2)[0]
    # Someone else uses the payer key at that nonce, with a higher fee: it replaces ours.
    h = tx_from(env, dn.PAYER, dn.OWNER, "0x", value=1, gas=21_000, nonce=victim.nonce,
                tip_gwei=90)
    miner.mine()
    with pytest.raises(FailClosed) as exc:
        eng.join()
    assert exc.value.exit_code == 2
    assert str(exc.value) == (
        f"payer {dn.PAYER}: nonce {victim.nonce} was used by transaction {h}, which this "
        "ledger did not send; its payments stay in flight. Stopping rather than guessing")
    p = mf.load(m).payments
    assert [env.balance(x.to) for x in p[:10]] == [0] * 10


# --- 2. pipelining -------------------------------------------------------------------------


def test_foreign_pending_transaction_at_a_later_nonce_mid_run_fails_closed(
        manual: tuple[Env, Miner]) -> None:
    """Another signer's transaction waits in the pool at a nonce the engine has not sent yet,
    with a higher fee: the engine's own is refused as underpriced. That was only logged, and
    the engine re-sent and later bumped its own, which would replace the other one without
    a word (invariant 5 held only once the other was mined). Now the refusal stops the run,
    naming the transaction, with nothing mined of that nonce."""
    env, miner = manual
    m = env.signed_manifest(20)
    eng = Engine(env, m, {"DISBURSER_BATCH_SIZE": "5"}).start()
    wait_for(lambda: ledger(env).txs(dn.PAYER) and in_pool(env, ledger(env).txs(dn.PAYER)[:1]),
             "the approval in the pool")
    approval = ledger(env).txs(dn.PAYER)[0]
    assert approval.kind == "approve"
    taken = approval.nonce + 2  # the engine's second batch: held for the gap below it
    h = tx_from(env, dn.PAYER, dn.OWNER, "0x", value=1, gas=21_000, nonce=taken, tip_gwei=90)
    miner.mine()  # the approval only: the foreign transaction waits for nonce taken - 1
    with pytest.raises(FailClosed) as exc:
        eng.join(timeout=30)
    assert str(exc.value) == (
        f"payer {dn.PAYER}: nonce {taken} is taken by pending transaction {h}, which this "
        "ledger did not send; its payments stay in flight. Stopping rather than guessing")
    assert h.lower() in pool(env)
    assert env.payer_nonce() == approval.nonce + 1
    assert [env.balance(p.to) for p in mf.load(m).payments] == [0] * 20


def test_pipeline_holds_max_in_flight_and_never_more(manual: tuple[Env, Miner]) -> None:
    env, miner = manual
    m = env.signed_manifest(60)
    extra = {"DISBURSER_BATCH_SIZE": "5", "DISBURSER_MAX_IN_FLIGHT": "4"}
    eng = Engine(env, m, extra).start()
    batches_in_pool(env, miner, 4)
    time.sleep(0.3)  # let the loop poll a few times: it must not sign a fifth
    assert len(ledger(env).txs(dn.PAYER)) == 5 and len(pool(env)) == 4
    miner.mine()  # four mined at once
    wait_for(lambda: len(open_batches(env)) == 4 and len(ledger(env).txs(dn.PAYER)) == 9,
             "the next four")
    miner.auto()
    res = eng.join()
    assert res.confirmed == 60
    assert_exactly_once(env, m)
    # Replay the ledger's audit trail: transactions in the node's pool (signed, not yet
    # mined) never exceeded 4. Mined ones waiting for depth hold no pool slot.
    open_now = peak = 0
    for e in ledger(env).events():
        if e.kind in ("tx_signed", "tx_reorged"):
            open_now += 1
        elif e.kind == "tx_mined":
            open_now -= 1
        peak = max(peak, open_now)
    assert peak == 4
    assert st.load({**env.vars, "DISBURSER_MAX_IN_FLIGHT": ""}).max_in_flight == 16


# --- 3. fees -------------------------------------------------------------------------------


def test_priced_out_transactions_are_bumped_at_the_same_nonce(
        manual: tuple[Env, Miner]) -> None:
    """The base fee rises above the batches' fee cap (still under the operator's cap): Anvil
    drops them from its pool; after DISBURSER_BUMP_AFTER_BLOCKS blocks each is replaced at
    its own nonce with tip and fee cap both up at least 10 %."""
    env, miner = manual
    m = env.signed_manifest(30)
    eng = Engine(env, m, {"DISBURSER_BUMP_AFTER_BLOCKS": "2"}).start()
    batches = batches_in_pool(env, miner, 3)
    led = ledger(env)
    first = [led.attempts(t.id or 0)[0] for t in batches]
    assert max(int(a.max_fee) for a in first) < 5 * GWEI

    def bumped() -> bool:
        return all(len(led.attempts(t.id or 0)) >= 2 for t in batches)

    while not bumped():  # hold the base fee at 5 gwei until every batch was replaced
        env.chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(5 * GWEI)])
        miner.mine()
        assert not pool(env) & {a.hash.lower() for a in first}  # silently dropped
        time.sleep(0.15)  # a few polls of the engine per block
        assert eng.running
    miner.auto()
    res = eng.join()
    assert (res.confirmed, res.txs_sent) == (30, 4)  # approve + 3 batches: no new nonce
    assert_exactly_once(env, m, cap_wei=100 * GWEI)
    for t in led.txs(dn.PAYER)[1:]:
        atts = led.attempts(t.id or 0)
        assert len(atts) >= 2 and t.mined_hash == atts[-1].hash
        for old, new in zip(atts, atts[1:], strict=False):
            assert int(new.max_fee) * 100 >= int(old.max_fee) * 110
            assert int(new.tip) * 100 >= int(old.tip) * 110
    assert {e["nonce"] for e in events(env, "transfer_bumped")} == {t.nonce for t in batches}
    # Noticed once each, and not sent again while the node would refuse them.
    waited = events(env, "transfer_priced_out_waiting")
    assert sorted(e["tx_hash"] for e in waited) == sorted(a.hash for a in first)
    assert not events(env, "transfer_dropped_rebroadcast")


def test_priced_out_on_a_node_that_mines_on_arrival_is_bumped_without_waiting_for_blocks(
        manual: tuple[Env, Miner]) -> None:
    """On automine a block comes only when a transaction arrives. Batches the base fee
    priced out (Anvil dropped them) waited for DISBURSER_BUMP_AFTER_BLOCKS blocks that never
    came: the run hung (seen in a benchmark run, where full blocks raise the base fee past
    the caps of batches signed a few blocks earlier). They are bumped at once, and no block
    is mined but by their arrival."""
    env, miner = manual
    m = env.signed_manifest(30)
    eng = Engine(env, m, {"DISBURSER_BUMP_AFTER_BLOCKS": "2"}).start()
    batches = batches_in_pool(env, miner, 3)
    led = ledger(env)
    first = {a.hash.lower() for a in (led.attempts(t.id or 0)[0] for t in batches)}
    env.chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(5 * GWEI)])
    miner.mine()  # one block at 5 gwei: over every batch's cap, all three dropped
    assert not pool(env) & first
    head = env.chain.head().number
    env.chain.rpc("evm_setAutomine", [True])
    res = eng.join(timeout=30)
    assert (res.confirmed, res.txs_sent) == (30, 4)  # approve + 3 batches, each bumped
    assert_exactly_once(env, m, cap_wei=100 * GWEI)
    assert {e["nonce"] for e in events(env, "transfer_bumped")} == {t.nonce for t in batches}
    # the bumps' arrivals made the blocks (at most one each, and the closing approve(0))
    assert env.chain.head().number - head <= len(batches) + 1


def test_judged_base_fee_spike_above_the_cap_and_back_with_1s_blocks(tmp_path: Path) -> None:
    """One-second blocks, EIP-7825 cap on, a real `disburser send` process. With four
    batches in the pool (the mined approval holds no pool slot) the base fee jumps from
    ~1 gwei to 40 gwei, over the operator's 10 gwei cap: Anvil silently drops all four. The
    engine bumps them at their own nonces up to the cap, then waits at the cap and says so,
    signs nothing new; when the base fee is back down the same stored bytes go out again
    and everything is paid exactly once."""
    with dn.Anvil(block_time=1, tx_gas_cap=True) as anvil:
        d = dn.setup(anvil.url)
        env = make_env(tmp_path, anvil, d)
        c = env.chain
        c.rpc("evm_setIntervalMining", [0])  # held until the batches are in the pool
        env.vars.update({**SMALL, "DISBURSER_CONFIRMATIONS": "2", "DISBURSER_MAX_FEE_GWEI": "10",
                         "DISBURSER_BUMP_AFTER_BLOCKS": "1", "DISBURSER_MAX_IN_FLIGHT": "4"})
        m = env.signed_manifest(60)
        p = env.popen("send", str(m), "--yes")
        try:
            wait_for(lambda: ledger(env).txs(dn.PAYER) and in_pool(
                env, ledger(env).txs(dn.PAYER)[:1]), "the approval in the pool")
            c.rpc("evm_mine")
            batches = wait_for(lambda: len(open_batches(env)) == 4 and in_pool(
                env, open_batches(env)) and open_batches(env), "four batches in the pool")
            led = ledger(env)
            first = {t.nonce: led.attempts(t.id or 0)[0] for t in batches}
            assert all(int(a.max_fee) < 10 * GWEI for a in first.values())
            c.rpc("anvil_setNextBlockBaseFeePerGas", [hex(40 * GWEI)])
            c.rpc("evm_setIntervalMining", [1])
            wait_for(lambda: {e["nonce"] for e in events(env, "transfer_at_fee_cap_waiting")}
                     >= set(first), "every batch waiting at the cap")
            assert c.head().base_fee > 10 * GWEI
            assert not pool(env) & {a.hash.lower() for a in first.values()}
            assert [t.kind for t in led.txs(dn.PAYER)] == ["approve"] + ["batch"] * 4
            assert events(env, "fee_cap_below_base_fee_waiting")
            c.rpc("anvil_setNextBlockBaseFeePerGas", [hex(GWEI)])  # and back
            out, err = p.communicate(timeout=90)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err
        assert "confirmed 60, failed 0, unpaid 0" in out
        assert_exactly_once(env, m, cap_wei=10 * GWEI)
        txs = led.txs(dn.PAYER)
        assert [t.kind for t in txs] == ["approve"] + ["batch"] * 6  # no nonce re-signed
        for t in txs[1:4]:
            atts = led.attempts(t.id or 0)
            assert atts[0].hash == first[t.nonce].hash
            assert int(atts[-1].max_fee) == 10 * GWEI  # bumped to the cap, not above
        waited = {e["tx_hash"] for e in events(env, "transfer_priced_out_waiting")}
        assert {a.hash for a in first.values()} <= waited


def test_stuck_transaction_replaced_but_the_original_mined_is_recognised(
        manual: tuple[Env, Miner]) -> None:
    """The lowest batch stays in the pool unmined (the block gas limit drops under its gas
    limit): after DISBURSER_BUMP_AFTER_BLOCKS blocks a replacement is signed at the same
    nonce (the node refuses it: same gas). When blocks grow back the ORIGINAL is mined: the
    engine finds it by looking up every attempt, and pays no one twice."""
    env, miner = manual
    m = env.signed_manifest(30)
    eng = Engine(env, m, {"DISBURSER_BUMP_AFTER_BLOCKS": "2"}).start()
    batches = batches_in_pool(env, miner, 3)
    led = ledger(env)
    lowest = batches[0]
    env.chain.rpc("evm_setBlockGasLimit", [hex(100_000)])
    while len(led.attempts(lowest.id or 0)) < 2:
        miner.mine()
        time.sleep(0.1)  # a few polls per block
        assert eng.running
    assert in_pool(env, [lowest]) is False  # the replacement never made it to the pool
    assert led.attempts(lowest.id or 0)[0].hash.lower() in pool(env)
    env.chain.rpc("evm_setBlockGasLimit", [hex(30_000_000)])
    miner.auto()
    res = eng.join()
    assert (res.confirmed, res.txs_sent) == (30, 4)
    assert_exactly_once(env, m)
    t = led.tx_at(dn.PAYER, lowest.nonce)
    assert t is not None
    atts = led.attempts(t.id or 0)
    assert len(atts) >= 2 and t.mined_hash == atts[0].hash
    assert events(env, "transfer_bumped")[0]["nonce"] == lowest.nonce
    # The original stayed pending all along: nothing was "dropped", nothing re-sent.
    assert not events(env, "transfer_dropped_rebroadcast")


# --- 4. batch size from gas --------------------------------------------------------------


def test_large_manifest_batches_stay_under_the_eip7825_cap(env: Env) -> None:
    """1,200 payments with DISBURSER_BATCH_SIZE=1000 on a 30M-gas chain that enforces the
    2^24 per-transaction cap: a 1,000-payment batch would be refused, so batches shrink."""
    signer = Signer(bytes.fromhex(dn.PAYER_KEY[2:]))
    too_big = signer.sign_tx(chain_id=31337, nonce=env.payer_nonce(), to=dn.OWNER, data="0x",
                             gas=16_777_217, max_fee=100 * GWEI, tip=GWEI)
    with pytest.raises(ch.GasCapExceeded):  # the node really enforces EIP-7825
        env.chain.send_raw(too_big.raw)
    m = env.signed_manifest(1200)
    r = env.cli("send", str(m), "--yes", extra={"DISBURSER_BATCH_SIZE": "1000"})
    assert r.code == 0, r.err
    assert "confirmed 1200, failed 0, unpaid 0" in r.out
    assert_exactly_once(env, m)
    batches = [t for t in ledger(env).txs(dn.PAYER) if t.kind == "batch"]
    assert len(batches) >= 3 and sum(t.count for t in batches) == 1200
    assert all(t.gas_limit <= 16_777_216 for t in batches)
    assert all(t.receipt_status == 1 for t in batches)


def test_small_block_gas_limit_shrinks_batches(tmp_path: Path) -> None:
    with dn.Anvil(gas_limit=5_000_000) as anvil:
        env = make_env(tmp_path, anvil, dn.setup(anvil.url))
        assert env.chain.head().gas_limit == 5_000_000
        m = env.signed_manifest(300)
        r = env.cli("send", str(m), "--yes", extra={"DISBURSER_BATCH_SIZE": "1000"})
        assert r.code == 0, r.err
        assert_exactly_once(env, m)
        batches = [t for t in ledger(env).txs(dn.PAYER) if t.kind == "batch"]
        assert len(batches) >= 2 and sum(t.count for t in batches) == 300
        assert all(t.gas_limit <= 5_000_000 for t in batches)
        assert max(t.count for t in batches) < 200


def test_batches_that_do_not_fit_a_block_together_are_sent_one_at_a_time(
        tmp_path: Path) -> None:
    """A block of 16M gas holds one full batch. Under automine two sent at once would leave
    the second in the pool until something else arrived; after the last batch nothing does,
    and the run would wait forever (a real process, so that a hang is a timeout here)."""
    with dn.Anvil(gas_limit=16_000_000) as anvil:
        env = make_env(tmp_path, anvil, dn.setup(anvil.url))
        m = env.signed_manifest(2_000)
        r = env.proc("send", str(m), "--yes", timeout=90)
        assert r.code == 0, r.err
        assert_exactly_once(env, m)
        batches = [t for t in ledger(env).txs(dn.PAYER) if t.kind == "batch"]
        assert len(batches) >= 4 and sum(t.count for t in batches) == 2_000
        assert all(2 * t.gas_limit > 16_000_000 for t in batches[:-1])  # one a block
        assert env.chain.rpc("txpool_status")["pending"] == "0x0"


# --- 5. confirmations and reorgs ------------------------------------------------------------


@pytest.mark.parametrize("reincluded", [False, True], ids=["lost", "reincluded"])
def test_reorg_before_depth_puts_back_to_pending_and_rebroadcasts_same_bytes(
        manual: tuple[Env, Miner], reincluded: bool) -> None:
    env, miner = manual
    m = env.signed_manifest(30)
    eng = Engine(env, m, {"DISBURSER_CONFIRMATIONS": "5"}).start()
    batches = batches_in_pool(env, miner, 3)
    led = ledger(env)
    first = {t.nonce: led.attempts(t.id or 0)[0] for t in batches}
    miner.mine()
    mined = wait_for(lambda: len(open_batches(env, TxStatus.MINED.value)) == 3
                     and open_batches(env, TxStatus.MINED.value), "three batches mined")
    old_block = {t.nonce: t.block_hash for t in mined}
    miner.mine()  # depth 2 of 5
    # Replace the last two blocks; the batches lose their receipts and are not returned to
    # the pool - unless the first one is put in the new branch.
    again = [[first[batches[0].nonce].raw, 0]] if reincluded else []
    env.chain.rpc("anvil_reorg", [2, again])
    gone = [t for t in batches if not (reincluded and t.nonce == batches[0].nonce)]
    assert env.chain.receipts([first[t.nonce].hash for t in gone]) == {
        first[t.nonce].hash: None for t in gone}
    wait_for(lambda: {e["nonce"] for e in events(env, "transfer_reorged")} >=
             {t.nonce for t in batches}, "the reorg noticed")
    wait_for(lambda: in_pool(env, gone), "the same bytes re-broadcast")
    assert ledger(env).txs(dn.PAYER)[1].status != TxStatus.CONFIRMED.value
    miner.auto()
    res = eng.join()
    assert (res.confirmed, res.txs_sent) == (30, 4)
    assert_exactly_once(env, m)
    for t in ledger(env).txs(dn.PAYER)[1:]:
        (a,) = ledger(env).attempts(t.id or 0)
        assert a.hash == first[t.nonce].hash == t.mined_hash
        assert t.block_hash != old_block[t.nonce]
    assert len(ledger(env).events("tx_reorged")) == 3

def test_reorg_while_the_engine_is_stopped_is_noticed_by_the_next_run(
        manual: tuple[Env, Miner]) -> None:
    env, miner = manual
    m = env.signed_manifest(30)
    extra = {"DISBURSER_CONFIRMATIONS": "5"}
    eng = Engine(env, m, extra).start()
    batches = batches_in_pool(env, miner, 3)
    miner.mine()
    wait_for(lambda: len(open_batches(env, TxStatus.MINED.value)) == 3, "three batches mined")
    eng.stop()
    with pytest.raises(Interrupted):
        eng.join()
    env.chain.rpc("anvil_reorg", [1, []])  # their block is gone, and so are they
    assert env.payer_nonce() == batches[0].nonce
    miner.auto()
    res = Engine(env, m, extra).start().join()
    assert (res.confirmed, res.txs_sent) == (30, 0)
    assert_exactly_once(env, m)
    assert_never_resigned(env)
    assert {e["nonce"] for e in events(env, "transfer_reorged")} == {t.nonce for t in batches}


def test_chain_rolled_back_below_a_confirmed_nonce_mid_run_stops_the_run(
        manual: tuple[Env, Miner], monkeypatch: pytest.MonkeyPatch) -> None:
    """A node reset or restored from an old state mid-run takes away a transaction the
    ledger holds confirmed: the batches behind the gap can never be mined. The run stops
    (instead of bumping them to the fee cap and waiting for ever), and so does the next."""
    monkeypatch.setattr(sender_mod, "NONCE_BEHIND_WAIT", 1.0)
    env, miner = manual
    m = env.signed_manifest(30)
    eng = Engine(env, m).start()
    wait_for(lambda: ledger(env).txs(dn.PAYER) and in_pool(env, ledger(env).txs(dn.PAYER)[:1]),
             "the approval in the pool")
    approval = ledger(env).txs(dn.PAYER)[0]
    before = env.chain.rpc("evm_snapshot")
    miner.mine()
    wait_for(lambda: len(open_batches(env)) == 3 and in_pool(env, open_batches(env)),
             "three batches in the pool")
    assert ledger(env).txs(dn.PAYER)[0].status == TxStatus.CONFIRMED.value
    # The node goes back to before the approval, and its pool is lost.
    assert env.chain.rpc("evm_revert", [before]) is True
    env.chain.rpc("anvil_dropAllTransactions")
    assert env.payer_nonce() == approval.nonce
    miner.auto()
    with pytest.raises(FailClosed) as e:
        eng.join()
    assert str(e.value).startswith(
        f"payer {dn.PAYER}: the chain's nonce went back to {approval.nonce}, at or below nonce "
        f"{approval.nonce} that this ledger holds confirmed at depth 1: the chain was rolled "
        "back deeper than DISBURSER_CONFIRMATIONS")
    assert events(env, "chain_nonce_behind_ledger")
    assert [env.balance(p.to) for p in mf.load(m).payments] == [0] * 30
    # The batches stay in the ledger, in flight; the next run refuses at once.
    assert len(open_batches(env)) == 3
    with pytest.raises(FailClosed, match=f"the ledger has nonce {approval.nonce} confirmed "
                       f"but the chain's nonce is {approval.nonce}"):
        Engine(env, m).start().join()


# --- 6. failures isolated ------------------------------------------------------------------


def _token_call(sig: str, *args: Any) -> str:
    inner = sig[sig.index("(") + 1:-1]
    return dn.abi_call(sig, inner.split(",") if inner else [], list(args))


def test_several_refused_recipients_are_each_found_before_signing(env: Env) -> None:
    """Two refused recipients in one batch and one in another: each simulation names one
    culprit, which is marked failed with the token's reason; nothing refused is ever signed."""
    m = env.signed_manifest(30)
    p = mf.load(m).payments
    for i in (3, 7, 21):
        dn.send_as(env.chain, dn.OWNER, env.devnet.token,
                   _token_call("blacklist(address)", p[i].to))
    r = env.cli("send", str(m), "--yes", extra={"DISBURSER_BATCH_SIZE": "10"})
    assert r.code == 1, r.err
    assert "confirmed 27, failed 3, unpaid 0" in r.out
    for i in (3, 7, 21):
        assert (f"failed: payments[{i}] {p[i].id} {p[i].to}: Blacklistable: account is "
                "blacklisted") in r.err
    assert_exactly_once(env, m, failed=frozenset({3, 7, 21}))
    txs = ledger(env).txs(dn.PAYER)
    assert all(t.receipt_status == 1 for t in txs)  # no batch reverted: found by simulation
    assert sorted(t.count for t in txs if t.kind == "batch") == [7, 10, 10]


def test_recipient_blacklisted_after_signing_is_isolated_and_the_rest_paid(
        manual: tuple[Env, Miner]) -> None:
    """The blacklister's transaction lands in the same block just before our batches: the
    batch holding the victim reverts on chain (status 0); its payments go back to the queue,
    are simulated again, the victim is marked failed with the token's reason, the rest paid."""
    env, miner = manual
    m = env.signed_manifest(30)
    victim = mf.load(m).payments[14]
    eng = Engine(env, m, {"DISBURSER_CONFIRMATIONS": "2"}).start()
    batches = batches_in_pool(env, miner, 3)
    tx_from(env, dn.OWNER, env.devnet.token, _token_call("blacklist(address)", victim.to))
    miner.mine()
    hit = next(t for t in batches if t.nonce == batches[1].nonce)
    wait_for(lambda: ledger(env).tx_at(dn.PAYER, hit.nonce).status  # type: ignore[union-attr]
             != TxStatus.PENDING.value, "the batches mined")
    assert ledger(env).tx_at(dn.PAYER, hit.nonce).receipt_status == 0  # type: ignore[union-attr]
    miner.auto()
    res = eng.join()
    assert (res.confirmed, res.failed, res.unpaid) == (29, 1, 0)
    assert_exactly_once(env, m, failed=frozenset({14}))
    led = ledger(env)
    (row,) = led.payments(mf.load(m).root, [PaymentStatus.FAILED])
    assert (row.idx, row.reason) == (14, "Blacklistable: account is blacklisted")
    txs = led.txs(dn.PAYER)
    assert [t.status for t in txs if t.kind == "batch"].count(TxStatus.REVERTED.value) == 1
    resent = [t for t in txs if t.kind == "batch" and t.nonce > batches[-1].nonce]
    assert [t.count for t in resent] == [9]  # the other nine of the reverted batch
    assert txs[-1].kind == "approve"  # the victim's unused allowance withdrawn


@pytest.mark.parametrize(("stop", "lift", "stopped", "refused"), [
    (("pause()",), ("unpause()",),
     "token {token} is paused; stopped before sending any more. Run `send` again once it is "
     "unpaused", "is paused; no new transaction was signed"),
    # The payer blacklisted: without the stop, every recipient would be blamed in turn.
    (("blacklist(address)", dn.PAYER), ("unBlacklist(address)", dn.PAYER),
     "the token {token} blacklists the payer {payer}; stopped before sending any more. Run "
     "`send` again once it is lifted",
     "blacklists the payer {payer}; no new transaction was signed"),
], ids=["paused", "payer_blacklisted"])
def test_token_stops_the_payer_mid_run_then_a_rerun_finishes(
        manual: tuple[Env, Miner], stop: tuple[str, ...], lift: tuple[str, ...],
        stopped: str, refused: str) -> None:
    """The token pauses, or blacklists the payer, while its batches wait in the pool: they
    revert and the run stops with exit 2 (invariant 5), no recipient marked failed; a new
    run refuses before sending anything until it is lifted, then pays everyone once."""
    env, miner = manual
    fill = {"token": env.devnet.token, "payer": dn.PAYER}
    m = env.signed_manifest(30)
    eng = Engine(env, m, {"DISBURSER_CONFIRMATIONS": "2"}).start()
    batches_in_pool(env, miner, 3)
    tx_from(env, dn.OWNER, env.devnet.token, _token_call(*stop))
    miner.mine()
    miner.auto()
    with pytest.raises(FailClosed) as exc:
        eng.join()
    assert exc.value.exit_code == 2
    assert str(exc.value) == stopped.format(**fill)
    assert [env.balance(p.to) for p in mf.load(m).payments] == [0] * 30
    assert ledger(env).payments(mf.load(m).root, [PaymentStatus.FAILED]) == []
    # Still in force: a new run refuses before sending anything.
    nonce = env.payer_nonce()
    r = env.cli("send", str(m), "--yes", extra={"DISBURSER_CONFIRMATIONS": "2"})
    assert r.code == 2 and refused.format(**fill) in r.err, r.err
    assert env.payer_nonce() == nonce
    h = tx_from(env, dn.OWNER, env.devnet.token, _token_call(*lift))
    wait_for(lambda: env.chain.receipts([h])[h], "the token's lift mined")
    r = env.cli("send", str(m), "--yes", extra={"DISBURSER_CONFIRMATIONS": "2"})
    assert r.code == 0, r.err
    assert "confirmed 30, failed 0, unpaid 0" in r.out
    assert_exactly_once(env, m)
    assert [t.status for t in ledger(env).txs(dn.PAYER) if t.kind == "batch"] == \
        [TxStatus.REVERTED.value] * 3 + [TxStatus.CONFIRMED.value] * 3


@pytest.mark.parametrize("fault", ["paused", "token_balance", "eth_balance"])
def test_preflight_fails_closed_before_sending_and_resumes_after_the_fix(
        env: Env, fault: str) -> None:
    m = env.signed_manifest(6)
    owed = mf.load(m).total
    token, c = env.devnet.token, env.chain
    if fault == "paused":
        dn.send_as(c, dn.OWNER, token, _token_call("pause()"))
        want = (f"token {token} is paused; no new transaction was signed. Run `send` again "
                "once it is unpaused")
    elif fault == "token_balance":
        bal = env.balance(dn.PAYER)
        dn.send_as(c, dn.PAYER, token, _token_call("transfer(address,uint256)", dn.OWNER,
                                                   bal - 1_000_000))
        want = (f"payer {dn.PAYER} holds 1000000 base units of {token}, {owed} are still owed; "
                "fund it and run `send` again")
    else:
        c.rpc("anvil_setBalance", [dn.PAYER, hex(10**12)])
        want = f"payer {dn.PAYER} has {10**12} wei for gas, about "
    nonce = env.payer_nonce()
    r = env.cli("send", str(m), "--yes")
    assert r.code == 2, r.err
    assert r.err.startswith("disburser: error: " + want), r.err
    if fault == "eth_balance":
        assert r.err.rstrip().endswith("wei are needed at the current fees; fund it and run "
                                       "`send` again")
    assert env.payer_nonce() == nonce and ledger(env).txs() == []
    if fault == "paused":
        dn.send_as(c, dn.OWNER, token, _token_call("unpause()"))
    elif fault == "token_balance":
        dn.mint(c, token, dn.PAYER, owed)
    else:
        c.rpc("anvil_setBalance", [dn.PAYER, hex(10**22)])
    r = env.cli("send", str(m), "--yes")
    assert r.code == 0, r.err
    assert "confirmed 6, failed 0, unpaid 0" in r.out
    assert_exactly_once(env, m)


# --- 7. RPC faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["reset", "http429", "http502", "truncate", "drop_response",
                                   "error_after", "delay"])
def test_transport_retries_each_fault_and_a_lost_broadcast_answer_is_recognised(
        env: Env, fault: str) -> None:
    """Each fault twice in a row: the call is retried (backoff with jitter) and succeeds. A
    broadcast whose answer was lost is retried with the same bytes, and the node's "already
    known" says it arrived - never a new signature."""
    signer = Signer(bytes.fromhex(dn.PAYER_KEY[2:]))
    env.chain.rpc("evm_setAutomine", [False])
    tx = signer.sign_tx(chain_id=31337, nonce=env.payer_nonce(), to=dn.OWNER, data="0x",
                        gas=21_000, max_fee=100 * GWEI, tip=GWEI)
    waits: list[float] = []
    with FaultProxy(env.devnet.url, first={fault: 2}, delay=0.5) as proxy:
        c = ch.RpcChain(proxy.url, ch.Transport(proxy.url, timeout=0.25, sleep=waits.append,
                                                rand=lambda: 0.5))
        assert c.chain_id() == 31337
        assert proxy.count(fault, "eth_chainId") == 2
        assert waits == [0.1, 0.2]  # exponential backoff (jitter pinned to its middle)
        proxy.first = {fault: 2}
        proxy.faults = 0
        executed = fault in ("truncate", "drop_response", "error_after", "delay")
        if executed:  # the node got the transaction the first time
            with pytest.raises(ch.AlreadyKnown):
                c.send_raw(tx.raw)
        else:
            assert c.send_raw(tx.raw) == tx.hash
    assert env.chain.known([tx.hash]) == {tx.hash: True}
    assert pool(env) == {tx.hash}


# Every kind of provider failure on a seeded share of all requests, and the first three
# broadcasts reach the node but lose their answer (the ambiguous case, forced so that it
# happens whatever the timing).
NOISY = {"reset": 0.03, "http429": 0.03, "http502": 0.03, "truncate": 0.02, "error_after": 0.02,
         "drop_response": 0.1}
SEND = {"drop_response": ["eth_sendRawTransaction"]}


@pytest.mark.parametrize("mode, n", [("batch", 40), ("direct", 12)])
def test_send_through_a_faulty_rpc_pays_everyone_exactly_once(env: Env, mode: str,
                                                              n: int) -> None:
    m = env.signed_manifest(n)
    with FaultProxy(env.devnet.url, seed=7, rates=NOISY, only=SEND,
                    first={"drop_response": 3}) as proxy:
        # Direct mode sends a pipeline's worth of transfers per round trip: a small pipeline
        # makes enough requests for the faults to land.
        r = env.cli("send", str(m), "--yes", "--mode", mode,
                    extra={"DISBURSER_RPC_URL": proxy.url, "DISBURSER_BATCH_SIZE": "5",
                           "DISBURSER_MAX_IN_FLIGHT": "2" if mode == "direct" else "16"})
    assert r.code == 0, r.err
    assert f"confirmed {n}, failed 0, unpaid 0" in r.out
    assert_exactly_once(env, m)
    assert_never_resigned(env)
    assert proxy.count("drop_response", "eth_sendRawTransaction") >= 3, proxy.stats
    assert proxy.faults >= 6, proxy.stats
    # Automine: the retried broadcast finds its nonce used - by itself, found by lookup.
    assert events(env, "transfer_nonce_used")


@pytest.mark.parametrize("method", ["eth_getTransactionReceipt", "eth_call",
                                    "eth_sendRawTransaction"])
def test_send_through_a_provider_that_rate_limits_elements_of_a_batch(env: Env,
                                                                       method: str) -> None:
    """Providers throttle a JSON-RPC batch element by element: the first request of the
    first two batches that carry ``method`` (receipts, a window's measure, two broadcasts)
    is answered "rate limit exceeded" and never reaches the node. The transport sends those
    elements again after its backoff; the run pays everyone, once."""
    m = env.signed_manifest(40)
    with FaultProxy(env.devnet.url, only={"limit_element": [method]},
                    first={"limit_element": 2}) as proxy:
        r = env.cli("send", str(m), "--yes",
                    extra={"DISBURSER_RPC_URL": proxy.url, "DISBURSER_BATCH_SIZE": "5"})
        batches = [d for d in proxy.requests if isinstance(d, list) and len(d) > 1
                   and d[0].get("method") == method]
        # the transport's retry: each refused element again, alone in a JSON-RPC batch (the
        # engine's own fallbacks, a simulation or a lone broadcast, send other requests)
        alone = [(d[0]["method"], d[0]["params"]) for d in proxy.requests
                 if isinstance(d, list) and len(d) == 1]
        again = [x for x in proxy.limited if (x["method"], x["params"]) in alone]
    assert r.code == 0, r.err
    assert "confirmed 40, failed 0, unpaid 0" in r.out
    assert_exactly_once(env, m)
    assert_never_resigned(env)
    assert proxy.count("limit_element", method) == 2, proxy.stats
    assert batches, "no JSON-RPC batch of that method went through the proxy"
    assert len(again) == 2, "the rate-limited elements were not sent again by the transport"


def test_timeouts_and_lost_broadcast_answers_resolved_by_lookup(
        manual: tuple[Env, Miner]) -> None:
    """A client timeout of 0.3 s against a proxy that holds some requests 0.6 s (they still
    reach the node later) and loses the answer of broadcasts, with blocks every 0.1 s: the
    retried broadcast finds the transaction already in the pool."""
    env, miner = manual
    m = env.signed_manifest(40)
    rates = {**NOISY, "delay": 0.03}
    with FaultProxy(env.devnet.url, seed=11, rates=rates, only=SEND, delay=0.6,
                    first={"drop_response": 3, "delay": 2}) as proxy:
        eng = Engine(env, m, {"DISBURSER_BATCH_SIZE": "5"}, rpc_url=proxy.url,
                     timeout=0.3).start()
        # No block until each broadcast has its answer, so that a retried broadcast meets
        # its own transaction in the pool ("already known").
        wait_for(lambda: events(env, "allowance_set"), "the approval broadcast")
        miner.mine()
        outcomes = ("transfer_broadcast", "transfer_already_known", "transfer_nonce_used")
        wait_for(lambda: {e["nonce"] for o in outcomes for e in events(env, o)} >= set(range(9)),
                 "eight batches broadcast")
        miner.auto(0.1)
        res = eng.join()
    assert (res.confirmed, res.unpaid) == (40, 0)
    assert_exactly_once(env, m)
    assert_never_resigned(env)
    assert proxy.count("delay") >= 2 and proxy.count("drop_response") >= 3, proxy.stats
    assert events(env, "transfer_already_known")


# --- 8. one runner at a time -----------------------------------------------------------------


def _stop(p: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[str, str]:
    if p.poll() is None:
        p.send_signal(sig)
    try:
        return p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_second_runner_on_the_same_ledger_or_payer_exits_2_naming_the_first(
        manual: tuple[Env, Miner]) -> None:
    env, miner = manual
    m = env.signed_manifest(10)
    first = env.popen("send", str(m), "--yes")
    try:
        wait_for(lambda: ledger(env).txs(dn.PAYER), "the first runner's approval")
        nonce = env.payer_nonce()
        db = Path(env.vars["DISBURSER_DB"])
        r = env.proc("send", str(m), "--yes")
        assert r.code == 2, r.err
        assert r.err.startswith(f"disburser: error: another disburser is running (pid "
                                f"{first.pid} on "), r.err
        assert f"send {m}); lock {db}.lock" in r.err
        # Another ledger, same payer: the payer's lock names the same runner.
        other = {"DISBURSER_DB": str(env.tmp / "other.sqlite")}
        r = env.proc("send", str(m), "--yes", extra=other)
        assert r.code == 2, r.err
        assert f"another disburser is running (pid {first.pid} on " in r.err
        assert f"lock {env.tmp / 'locks' / ('payer-31337-' + dn.PAYER.lower())}.lock" in r.err
        assert len(ledger(env).txs()) == 1 and env.payer_nonce() == nonce
        assert not Ledger(env.tmp / "other.sqlite").txs()
    finally:
        _, err = _stop(first)
    assert first.returncode == 1, err
    miner.auto()
    r = env.cli("send", str(m), "--yes")  # the lock is free again
    assert r.code == 0, r.err
    assert_exactly_once(env, m)


# --- 9. operator control ----------------------------------------------------------------------


def test_a_lowered_ceiling_refuses_new_sends_after_settling_what_is_in_flight(
        manual: tuple[Env, Miner]) -> None:
    """A run killed with batches in the pool; they are mined; the ceiling is then set below
    what the program's two manifests total. The next `send` first settles the batches the killed run
    left (signed under the ceiling of their day: the chain mines them anyway), then refuses
    before any allowance or batch, so that `status` shows true figures for the decision."""
    env, miner = manual
    m = env.signed_manifest(30)
    p = env.popen("send", str(m), "--yes")
    try:
        batches = batches_in_pool(env, miner, 3)
    finally:
        p.kill()
        p.wait()
    miner.auto()
    wait_for(lambda: not pool(env), "the batches mined")
    # a second manifest of the program, accepted; the ceiling then fits each, not both
    other = mf.load(env.signed_manifest(3, name="b.json", seed="b"))
    ledger(env).accept_manifest(other, ceiling=10**20, signers=list(mf.signers_of(other)))
    nonce = env.payer_nonce()
    total = mf.load(m).total + other.total
    whole = -(-mf.load(m).total // 10**6)  # whole tokens: the first fits, both do not
    r = env.cli("send", str(m), "--yes", extra={"DISBURSER_CEILING": str(whole)})
    assert (r.code, r.err.strip().splitlines()[-1]) == (2, (
        f"disburser: error: program together-initiative-2025-10: accepted manifests total "
        f"{total} base units, over the ceiling {whole * 10**6}"))
    assert env.payer_nonce() == nonce  # nothing sent
    led = ledger(env)
    assert {t.nonce: t.status for t in led.txs(dn.PAYER) if t.kind == "batch"} == {
        t.nonce: TxStatus.CONFIRMED.value for t in batches}
    d = json.loads(env.cli("status", "--json", extra={"DISBURSER_CEILING": str(whole)}).out)
    assert d["programs"][0]["payments"]["confirmed"] == 30 and d["in_flight"] == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_status_shows_in_flight_and_a_rerun_resumes(
        manual: tuple[Env, Miner], sig: int) -> None:
    env, miner = manual
    m = env.signed_manifest(30)
    p = env.popen("send", str(m), "--yes")
    try:
        batches = batches_in_pool(env, miner, 3)
    finally:
        out, err = _stop(p, sig)
    assert p.returncode == 1, err
    assert "stopping after the current step (Ctrl-C again to abort now)" in err
    assert err.rstrip().endswith("disburser: error: stopped by operator; state is saved, run "
                                 "`send` again to resume")
    assert "Traceback" not in err
    # the progress line once more, as the ledger holds it at the stop (stderr is a pipe
    # here: the periodic line may be seconds old)
    assert err.rstrip().splitlines()[-2].startswith("paid 0/30 (  0.0%)  failed 0  0/")
    led = ledger(env)
    r = env.cli("status")
    assert r.code == 0, r.err
    for t in batches:
        (a,) = led.attempts(t.id or 0)
        assert (f"  nonce {t.nonce} batch pending 10 payments max_fee {a.max_fee} tip {a.tip} "
                f"attempts 1 {a.hash}") in r.out
    d = json.loads(env.cli("status", "--json").out)
    # Stopping also withdrew the batch contract's allowance: approve(0) at the next nonce,
    # after the batches in flight (so they still execute), broadcast without waiting.
    last = max(t.nonce for t in batches)
    assert [(x["nonce"], x["kind"], x["status"]) for x in d["in_flight"]] == [
        (t.nonce, "batch", "pending") for t in batches] + [(last + 1, "approve", "pending")]
    miner.auto()
    r = env.cli("send", str(m), "--yes")
    assert r.code == 0, r.err
    assert "confirmed 30, failed 0, unpaid 0" in r.out and "in 0 new transaction(s)" in r.out
    assert_exactly_once(env, m)
    assert_never_resigned(env)
    assert env.chain.allowance(env.devnet.token, dn.PAYER, env.devnet.batch_contract) == 0
