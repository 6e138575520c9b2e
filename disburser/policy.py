"""Pure decisions of the send loop: fees, fee bumps, batch sizes, confirmation depth.
No I/O; each is tested by a table and by properties."""

from __future__ import annotations

from dataclasses import dataclass

# geth refuses a replacement unless both the tip and the fee cap rise by at least 10 %
# (txpool.pricebump); Anvil and most clients copy the rule. We add one wei on top so that
# integer rounding never leaves a replacement exactly at the limit.
PRICE_BUMP_PERCENT = 10

# EIP-7825: no transaction may use more than 2^24 gas (Osaka). Nodes refuse bigger ones at
# submission, while eth_estimateGas ignores the cap - so we size batches under it ourselves.
TX_GAS_CAP = 16_777_216


@dataclass(frozen=True)
class Fees:
    max_fee: int  # wei per gas, the cap this attempt may pay
    tip: int  # wei per gas, max priority fee

    def __post_init__(self) -> None:
        if self.tip > self.max_fee:
            raise ValueError("tip above max fee")


def initial_fees(base_fee: int, tip: int, cap: int) -> Fees:
    """Twice the current base fee plus the tip covers six full blocks of +12.5 % base fee
    growth; never above the operator's cap."""
    tip = min(tip, cap)
    return Fees(max_fee=min(cap, 2 * base_fee + tip), tip=tip)


def fee_cap(max_fee: int, max_tx_fee: int, gas: int) -> int:
    """Max fee per gas for a transaction of ``gas``: the operator's cap, and no more than
    the node accepts for the whole transaction (gas x max fee <= max_tx_fee)."""
    return min(max_fee, max_tx_fee // max(gas, 1))


def _bumped(value: int) -> int:
    return value + (value * PRICE_BUMP_PERCENT + 99) // 100 + 1


def bump_fees(old: Fees, base_fee: int, cap: int) -> Fees | None:
    """The fees of a replacement at the same nonce, or None when the cap does not leave room
    for a valid replacement (then the transaction waits: a replacement the node refuses as
    underpriced helps no one)."""
    tip = _bumped(old.tip)
    max_fee = max(_bumped(old.max_fee), 2 * base_fee + tip)
    if max_fee > cap:
        max_fee = cap
    if max_fee < _bumped(old.max_fee) or tip > max_fee:
        return None
    return Fees(max_fee=max_fee, tip=tip)


def next_base_fee(base_fee: int, gas_used: int | None, gas_limit: int) -> int:
    """The next block's base fee, as EIP-1559 sets it from its parent (elasticity 2, a
    change of at most an eighth); the parent's own when its gas used is not known (or it
    has no base fee: a chain without EIP-1559)."""
    target = gas_limit // 2
    if gas_used is None or base_fee == 0 or target == 0 or gas_used == target:
        return base_fee
    if gas_used > target:
        return base_fee + max(base_fee * (gas_used - target) // target // 8, 1)
    return base_fee - base_fee * (target - gas_used) // target // 8


def priced_out(max_fee: int, base_fee: int) -> bool:
    """A fee cap under the base fee cannot be included now: Anvil refuses such a transaction
    (and silently drops one already in its pool), geth parks it. Waiting, not re-sending,
    is the only useful move until the base fee falls back or a bump raises the cap."""
    return max_fee < base_fee


def should_bump(sent_at_block: int, head: int, bump_after_blocks: int) -> bool:
    """A transaction still unmined ``bump_after_blocks`` blocks after its last attempt."""
    return head - sent_at_block >= bump_after_blocks


def is_deep(mined_block: int, head: int, confirmations: int) -> bool:
    """Confirmed at depth ``confirmations``: the block that includes the transaction counts
    as the first confirmation (so with 1 a mined transaction is confirmed at once)."""
    return head - mined_block + 1 >= confirmations


def batch_gas_limit(estimate: int) -> int:
    """Gas limit for a batch from its estimate: 10 % headroom plus 25k for the refund that
    ``gasUsed`` already subtracts (a limit at gasUsed runs out of gas)."""
    return estimate + estimate // 10 + 25_000


def gas_limit_from_used(used: int) -> int:
    """Gas limit from a simulation's gasUsed (one exact run against the latest state): 2 %
    for state that moves before it is mined, 30k for refunds already netted out of gasUsed
    and the 63/64 rule on the last external call."""
    return used + used // 50 + 30_000


def pack_batch_size(block_gas_limit: int, per_recipient: int, fixed: int,
                    tx_cap: int = TX_GAS_CAP) -> int:
    """The batch size that moves the most payments per block: k batches of n, each under
    the per-transaction cap, k of them under the block gas limit. Two batches of 489 leave a
    third of a 45M block empty; three of 450 fill it."""
    best_n, best_total = 1, 0
    for k in range(1, 65):
        budget = min(tx_cap, block_gas_limit // k)
        n = (budget - 30_000 - fixed) * 50 // (51 * per_recipient)
        while n > 1 and gas_limit_from_used(fixed + per_recipient * n) > budget:
            n -= 1
        if n < 1:
            break
        if k * n > best_total:
            best_n, best_total = n, k * n
    return best_n


def max_batch_size(block_gas_limit: int, per_recipient: int, fixed: int,
                   tx_cap: int = TX_GAS_CAP) -> int:
    """How many payments fit one transaction: under the per-transaction cap and under the
    block gas limit, with the same headroom as ``batch_gas_limit``."""
    budget = min(tx_cap, block_gas_limit)
    n = 1
    while batch_gas_limit(fixed + per_recipient * (n + 1)) <= budget:
        n += 1
    return n


def split(items_count: int) -> tuple[int, int]:
    """Halves of a batch whose gas limit is too high."""
    half = items_count // 2
    return half, items_count - half
