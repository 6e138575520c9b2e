"""1. Gas per fresh recipient, from receipts: BatchPayout (with its paid-bitmap) against
PlainDisperse (a bare transferFrom loop) on the same token, and against lone `transfer`s.

Each variant gets its own fresh Anvil. A batch's gas per recipient is its gasUsed divided by
its size (fixed cost included); the marginal cost is the difference between a big and a
small batch divided by the difference in size (fixed cost removed), which is what to compare
with the floor."""

from __future__ import annotations

from typing import Any

from benchmarks.common import Ctx, amounts, approve, fresh_addresses, fresh_devnet, median
from disburser import chain as ch
from disburser import devnet as dn
from disburser.artifacts import load_artifact

# FIELD-NOTES "Gas": new balance slot 22,100 + Transfer log 1,756 + calldata 532 = 24,388,
# plus 2,100 for the cold read of this token's blacklist mapping (FiatToken v2.2 keeps the
# flag in the balance slot and saves it).
FLOOR = 24_388 + 2_100
BATCH_GAS = 16_000_000  # explicit: under the EIP-7825 cap, no estimate (it ignores the cap)


def _gas(receipt: dict[str, Any]) -> int:
    return int(receipt["gasUsed"], 16)


def _batch_payout(d: dn.Devnet, sizes: tuple[int, int]) -> list[int]:
    c = ch.RpcChain(d.url)
    out = []
    for k, n in enumerate(sizes):
        tos, ams = fresh_addresses(n, f"gas-bp-{k}"), amounts(n)
        approve(d, d.batch_contract, sum(ams))
        root = "0x" + f"{k + 1:064x}"  # a fresh root: the bitmap words start at zero
        data = ch.enc_disburse(d.token, root, list(range(n)), tos, ams)
        out.append(_gas(dn.send_as(c, d.payer, d.batch_contract, data, gas=BATCH_GAS)))
    return out


def _plain_disperse(d: dn.Devnet, sizes: tuple[int, int]) -> list[int]:
    from eth_utils import to_checksum_address

    c = ch.RpcChain(d.url)
    r = dn.send_as(c, dn.OWNER, None, str(load_artifact("PlainDisperse")["bytecode"]))
    plain = to_checksum_address(r["contractAddress"])
    out = []
    for k, n in enumerate(sizes):
        tos, ams = fresh_addresses(n, f"gas-pd-{k}"), amounts(n)
        approve(d, plain, sum(ams))
        data = dn.abi_call("disperse(address,address[],uint256[])",
                           ["address", "address[]", "uint256[]"], [d.token, tos, ams])
        out.append(_gas(dn.send_as(c, d.payer, plain, data, gas=BATCH_GAS)))
    return out


def _lone_transfers(d: dn.Devnet, n: int) -> list[int]:
    c = ch.RpcChain(d.url)
    return [_gas(dn.send_as(c, d.payer, d.token, ch.enc_transfer(to, a)))
            for to, a in zip(fresh_addresses(n, "gas-lone"), amounts(n), strict=True)]


def run(ctx: Ctx) -> dict[str, Any]:
    sizes = (10, 50) if ctx.quick else (100, 500)
    lone_n = 5 if ctx.quick else 50
    with fresh_devnet() as d:
        bp = _batch_payout(d, sizes)
    with fresh_devnet() as d:
        pd = _plain_disperse(d, sizes)
    with fresh_devnet() as d:
        lone = _lone_transfers(d, lone_n)
    small, big = sizes

    def per(g: list[int]) -> dict[str, float]:
        return {"per_recipient": g[1] / big, "marginal": (g[1] - g[0]) / (big - small),
                "gas_small": g[0], "gas_big": g[1]}

    bpr, pdr = per(bp), per(pd)
    lone_gas = median(lone)
    return {
        "sizes": list(sizes),
        "batch_payout": bpr,
        "plain_disperse": pdr,
        "lone_transfer": lone_gas,
        "lone_n": lone_n,
        "vs_plain": bpr["per_recipient"] / pdr["per_recipient"],
        "vs_plain_marginal": bpr["marginal"] / pdr["marginal"],
        "vs_lone": bpr["per_recipient"] / lone_gas,
        "floor": FLOOR,
        "above_floor": bpr["marginal"] - FLOOR,
        "above_floor_plain": pdr["marginal"] - FLOOR,
    }
