"""What every benchmark shares: a fresh devnet, signed manifests, the settings that point
disburser at the devnet, and ``send_like_cli``, the `disburser send` command's steps run
in-process with a timer around each."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disburser import chain as ch
from disburser import devnet as dn

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = "together-initiative-2025-10"


@dataclass
class Ctx:
    """One bench run: where its files go, how big and how often each measurement is."""

    tmp: Path
    quick: bool
    runs: int  # repetitions of the short measurements (median reported)
    log: Callable[[str], None] = print
    shared: dict[str, Any] = field(default_factory=dict)  # results later steps reuse

    def dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# Blocks mined by ``Nudger`` across the run (reported by the throughput step).
NUDGES = [0]
# Set while nothing is being sent (``nudger_paused``): its polling of the pool slowed a
# reconcile's eth_getLogs by a third (measured), and only a send can strand a transaction.
NUDGER_PAUSED = threading.Event()
NUDGE_AFTER = 0.1  # seconds a transaction may wait in an automine pool with no new block


class Nudger:
    """Under automine Anvil mines when a transaction arrives; one that arrives while a block
    is being mined can be left in the pool until another arrives (benchmarks/NOTES.md). A
    real chain keeps making blocks; on automine a run whose last transactions were stranded
    would wait forever. This thread mines a block when the pool has held transactions for
    NUDGE_AFTER seconds with no new block, and counts it in NUDGES."""

    def __init__(self, url: str) -> None:
        self.c = ch.RpcChain(url)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        from disburser.errors import DisburserError

        last, since = -1, time.monotonic()
        while not self._stop.wait(0.05):
            if NUDGER_PAUSED.is_set():
                continue
            try:
                if int(self.c.rpc("txpool_status")["pending"], 16) == 0:
                    last = -1
                    continue
                block = int(self.c.rpc("eth_blockNumber"), 16)
                now = time.monotonic()
                if block != last:
                    last, since = block, now
                elif now - since >= NUDGE_AFTER:
                    self.c.rpc("evm_mine")
                    NUDGES[0] += 1
                    since = now
            except DisburserError:
                continue  # the node is going away at the end of a measurement

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)


@contextmanager
def nudger_paused() -> Iterator[None]:
    NUDGER_PAUSED.set()
    try:
        yield
    finally:
        NUDGER_PAUSED.clear()


@contextmanager
def fresh_devnet(*, nudge: bool = True, **anvil_kw: Any) -> Iterator[dn.Devnet]:
    """A new Anvil (Anvil slows as its state grows: one per measurement) with the test USDC,
    a funded payer and BatchPayout deployed; on automine with a ``Nudger`` unless ``nudge``
    is False (one transaction at a time is never stranded, and the watchdog's requests
    would slow a latency-bound sender down)."""
    with dn.Anvil(**anvil_kw) as anvil:
        d = dn.setup(anvil.url)
        automine = anvil_kw.get("block_time") is None and "--no-mining" not in anvil_kw.get(
            "extra", ())
        nudger = Nudger(anvil.url) if automine and nudge else None
        try:
            yield d
        finally:
            if nudger is not None:
                nudger.close()


def fresh_addresses(n: int, seed: str) -> list[str]:
    """``n`` addresses nobody holds tokens at (keccak of a seed: no key exists)."""
    from eth_hash.auto import keccak
    from eth_utils import to_checksum_address

    return [to_checksum_address(keccak(f"{seed}-{i}".encode())[12:]) for i in range(n)]


def amounts(n: int) -> list[int]:
    """Varied amounts, 1.25 .. 7.25 tokens, like the tests'."""
    return [(i % 7 + 1) * 1_000_000 + 250_000 for i in range(n)]


def signed_manifest(d: dn.Devnet, n: int, path: Path, *, seed: str) -> Path:
    """A manifest of ``n`` fresh recipients, signed by two approvers, written to ``path``:
    what `manifest build` + two `manifest sign` produce."""
    from disburser import manifest as mf
    from disburser.domain import Payment

    tos = fresh_addresses(n, seed)
    pays = [Payment(i, f"user-{i:07d}", to, a) for i, (to, a) in enumerate(zip(tos, amounts(n),
                                                                               strict=True))]
    m = mf.make_manifest(program=PROGRAM, chain_id=d.chain_id, token=d.token, payer=d.payer,
                         not_after=int(time.time()) + 96 * 3600, payments=pays)
    for key in d.approver_keys[:2]:
        m = mf.with_signature(m, mf.sign(m, bytes.fromhex(key[2:])))
    mf.write(m, path)
    return path


def bench_env(d: dn.Devnet, work: Path, **extra: str) -> dict[str, str]:
    """Settings for disburser on devnet ``d`` with a private ledger, log file and locks."""
    return {
        **d.env(),
        "DISBURSER_DB": str(work / "ledger.sqlite"),
        "DISBURSER_LOG_FILE": str(work / "disburser.log.jsonl"),
        "DISBURSER_LOCK_DIR": str(work / "locks"),
        "DISBURSER_CONFIRMATIONS": "1",
        **extra,
    }


@dataclass
class SendRun:
    """Timings of one `send`, seconds."""

    n: int
    load: float  # manifest.load (parse + Merkle root)
    verify: float  # signatures, quorum, ceiling
    accept: float  # ledger.accept_manifest
    run: float  # Sender.run
    total: float
    confirmed: int
    failed: int
    txs: int

    @property
    def rate(self) -> float:
        """Recipients per second over the whole command (load .. run done)."""
        return self.confirmed / self.total

    @property
    def run_rate(self) -> float:
        return self.confirmed / self.run


def send_like_cli(env: dict[str, str], manifest_path: Path, mode: str = "batch", *,
                  clock: Callable[[], float] = time.time,
                  sleep: Callable[[float], None] = time.sleep) -> SendRun:
    """`disburser send MANIFEST --yes --mode MODE` in-process, step for step as
    ``cli.send`` does it (settings, logging to the file, load, verify with quorum and
    ceiling, runner lock, accept into the ledger, ``Sender.run`` with a progress callback),
    with a timer around each step. ``clock`` and ``sleep`` go to the Sender."""
    from disburser import keys, settings
    from disburser import manifest as mf
    from disburser.domain import Mode
    from disburser.errors import CeilingError
    from disburser.ledger import Ledger
    from disburser.locks import RunnerLock
    from disburser.logging import configure
    from disburser.sender import Sender, config_from_settings

    s = settings.load(env)
    assert s.private_key is not None
    signer = keys.Signer(bytes.fromhex(s.private_key.removeprefix("0x")))
    c = ch.RpcChain(s.rpc_url)
    configure(s.log_file)
    try:
        t0 = time.perf_counter()
        m = mf.load(manifest_path)
        t1 = time.perf_counter()
        v = mf.verify(m, source=str(manifest_path), approvers=s.approvers, quorum=s.quorum,
                      chain_id=s.chain_id, token=s.token, payer=signer.address,
                      now=int(clock()))
        cfg = config_from_settings(s, Mode(mode), m.program)
        if m.total > cfg.ceiling:
            raise CeilingError("over the ceiling")
        t2 = time.perf_counter()
        with RunnerLock(s.db, signer.address, s.chain_id, env.get("DISBURSER_LOCK_DIR")):
            ledger = Ledger(s.db)
            ledger.accept_manifest(m, ceiling=cfg.ceiling, signers=v.approved,
                                   first_block=c.head().number)
            t3 = time.perf_counter()
            # The CLI passes a progress printer; the Sender computes the progress for it on
            # every loop, so a callback must be there for the cost to be the same.
            sender = Sender(ledger, c, signer, cfg, clock=clock, sleep=sleep,
                            on_progress=lambda _p: None)
            r = sender.run(m)
            t4 = time.perf_counter()
    finally:
        silence_logs()
    return SendRun(n=m.count, load=t1 - t0, verify=t2 - t1, accept=t3 - t2, run=t4 - t3,
                   total=t4 - t0, confirmed=r.confirmed, failed=r.failed, txs=r.txs_sent)


def silence_logs() -> None:
    """Drop every structlog event (``disburser.logging.quiet`` raises KeyError on
    structlog 26: there is no filtering logger above CRITICAL)."""
    import logging

    import structlog

    def drop(*_: Any) -> Any:
        raise structlog.DropEvent

    structlog.configure(processors=[drop],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def payer_signer(d: dn.Devnet) -> Any:
    from disburser.keys import Signer

    assert d.payer_key is not None, "the devnet's payer is a development key"
    return Signer(bytes.fromhex(d.payer_key[2:]))


def approve(d: dn.Devnet, spender: str, amount: int) -> None:
    c = ch.RpcChain(d.url)
    dn.send_as(c, d.payer, d.token, ch.enc_approve(spender, amount))


def wait_receipt(c: ch.RpcChain, tx_hash: str, timeout: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = c.rpc("eth_getTransactionReceipt", [tx_hash])
        if r is not None:
            return dict(r)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no receipt for {tx_hash}")
        time.sleep(0.002)


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def fmt_s(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"
