"""3. A mainnet-like run: 12-second slots on a virtual clock, mainnet's block gas limit, the
EIP-7825 per-transaction cap, 16 transactions in flight (geth keeps 16 pending per account;
Anvil does not limit, so DISBURSER_MAX_IN_FLIGHT=16 stands in for it), the ethereum
profile's 12 confirmations and 4-second polls.

Anvil runs with automine off. The Sender gets a virtual clock and a ``sleep`` that advances
it; whenever it crosses a 12-second slot boundary a block is mined (``evm_mine`` at the
slot's timestamp). The Sender sleeps only when a poll and a fill changed nothing, i.e. when
its pipeline is full or it waits for blocks, so blocks come exactly as fast as the engine
could use them on mainnet, and the number of blocks is what the run would take there.

The base fee is pinned (``anvil_setNextBlockBaseFeePerGas`` before every block): other
traffic is not simulated, and on mainnet a payout alone could not fill every block anyway;
without the pin, full blocks raise the base fee 12.5 % a block and the run becomes a test of
the fee cap instead. From the run, the projection for 300,000 recipients is the run's fixed
blocks (approval, the last confirmations) plus 300,000 / (recipients per block while
paying), times 12 s.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Ctx, bench_env, fresh_devnet, send_like_cli, signed_manifest
from disburser import chain as ch

SLOT = 12.0
BASE_FEE = 10**9  # 1 gwei, pinned
TARGET_RECIPIENTS = 300_000
DEADLINE_H = 96


class SlotMiner:
    """A virtual clock whose sleep mines a block at every 12-second slot boundary."""

    def __init__(self, c: ch.RpcChain) -> None:
        self.c = c
        self.now = float(int(time.time()))
        self.next_slot = self.now + SLOT
        self.mined: list[int] = []
        self.real_between: list[float] = []  # real seconds of engine + node work per slot
        self._real = time.perf_counter()

    def clock(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.now += dt
        while self.now >= self.next_slot:
            self._mine(int(self.next_slot))
            self.next_slot += SLOT

    def _mine(self, ts: int) -> None:
        self.c.rpc("anvil_setNextBlockBaseFeePerGas", [hex(BASE_FEE)])
        self.c.rpc("evm_mine", [ts])
        self.mined.append(self.c.head().number)
        now = time.perf_counter()
        self.real_between.append(now - self._real)
        self._real = now


def _warnings(log_file: Path) -> dict[str, int]:
    """Warning events of the engine's JSON log, by name."""
    out: dict[str, int] = {}
    for line in log_file.read_text().splitlines():
        e = json.loads(line)
        if e.get("level") == "warning":
            out[e["event"]] = out.get(e["event"], 0) + 1
    return out


def _simulate(ctx: Ctx, n: int, gas_limit: int, confirmations: int,
              batch_size: int | None = None) -> dict[str, Any]:
    from disburser.ledger import Ledger

    work = ctx.dir(f"mainnet-{gas_limit // 10**6}M-c{confirmations}-b{batch_size or 0}")
    with fresh_devnet(gas_limit=gas_limit, extra=["--no-mining"]) as d:
        c = ch.RpcChain(d.url)
        path = signed_manifest(d, n, work / "manifest.json", seed=f"mainnet-{confirmations}")
        c.rpc("anvil_setNextBlockBaseFeePerGas", [hex(BASE_FEE)])
        c.rpc("evm_mine")
        env = bench_env(d, work, DISBURSER_CONFIRMATIONS=str(confirmations),
                        DISBURSER_MAX_IN_FLIGHT="16", DISBURSER_POLL_INTERVAL="4",
                        **({"DISBURSER_BATCH_SIZE": str(batch_size)} if batch_size else {}))
        miner = SlotMiner(c)
        start_block = c.head().number
        t0 = time.perf_counter()
        r = send_like_cli(env, path, "batch", clock=miner.clock, sleep=miner.sleep)
        real = time.perf_counter() - t0
        assert r.confirmed == n, f"mainnet sim: confirmed {r.confirmed} of {n}"
        ledger = Ledger(work / "ledger.sqlite")
        txs = ledger.txs()
        batches = [t for t in txs if t.kind == "batch"]
        attempts = len(ledger.tx_hashes())
        blocks = {t.block_number for t in batches if t.block_number is not None}
        first, last = min(blocks), max(blocks)
        span = last - first + 1
        used = [int(c.rpc("eth_getBlockByNumber", [hex(b), False])["gasUsed"], 16)
                for b in range(first, last + 1)]
    total_blocks = len(miner.mined)
    per_block = n / span
    fixed = total_blocks - span
    blocks_300k = fixed + math.ceil(TARGET_RECIPIENTS / per_block)
    hours = blocks_300k * SLOT / 3600
    out = {
        "n": n, "gas_limit": gas_limit, "confirmations": confirmations,
        "blocks": total_blocks, "paying_blocks": span, "fixed_blocks": fixed,
        "recipients_per_block": per_block, "batch_size": max(t.count for t in batches),
        "batches": len(batches), "batches_per_block": len(batches) / span,
        "block_fill": sum(used) / (len(used) * gas_limit),
        "bumps": attempts - len(txs), "start_block": start_block,
        "warnings": _warnings(work / "disburser.log.jsonl"),
        "blocks_300k": blocks_300k, "hours_300k": hours, "minutes_300k": hours * 60,
        "real_seconds": real, "real_per_slot_max": max(miner.real_between),
        "real_per_slot_median": sorted(miner.real_between)[len(miner.real_between) // 2],
    }
    ctx.log(f"  mainnet sim {gas_limit / 1e6:.0f}M gas, {confirmations} conf, batch size "
            f"{out['batch_size']}, n={n}: "
            f"{total_blocks} blocks, {per_block:,.0f} recipients/block while paying -> "
            f"300k in {blocks_300k} blocks = {hours * 60:,.0f} min")
    return out


def run(ctx: Ctx) -> dict[str, Any]:
    n = 2_000 if ctx.quick else 20_000
    out: dict[str, Any] = {"mainnet": _simulate(ctx, n, 45_000_000, 12)}
    if not ctx.quick:
        # Same run with confirmations 1: separates the pipeline limit (mined-but-shallow
        # transactions count against max_in_flight) from the block space.
        out["conf1"] = _simulate(ctx, n, 45_000_000, 1)
        # ... and batches small enough that three fit a 45M block (gas limits of ~14.97M with
        # the engine's 10 % headroom, instead of two of ~16.3M): what both fixes would give.
        out["conf1_b450"] = _simulate(ctx, n, 45_000_000, 1, batch_size=450)
        out["gas36"] = _simulate(ctx, n, 36_000_000, 12)
    return out
