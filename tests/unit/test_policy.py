"""The pure decisions of the send loop, by table and by property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from disburser import policy
from disburser.policy import Fees

GWEI = 10**9


@pytest.mark.parametrize("base, tip, cap, want", [
    (10 * GWEI, 1 * GWEI, 100 * GWEI, Fees(21 * GWEI, 1 * GWEI)),
    (60 * GWEI, 1 * GWEI, 100 * GWEI, Fees(100 * GWEI, 1 * GWEI)),  # capped
    (0, 1 * GWEI, 100 * GWEI, Fees(1 * GWEI, 1 * GWEI)),
    (200 * GWEI, 5 * GWEI, 3 * GWEI, Fees(3 * GWEI, 3 * GWEI)),  # tip never above the cap
])
def test_initial_fees(base: int, tip: int, cap: int, want: Fees) -> None:
    assert policy.initial_fees(base, tip, cap) == want


@pytest.mark.parametrize("old, base, cap, want", [
    # geth's rule: both +10 % at least; we add one wei after rounding up.
    (Fees(100, 10), 10, 1000, Fees(111, 12)),
    (Fees(21 * GWEI, GWEI), 10 * GWEI, 100 * GWEI, Fees(23_100_000_001, 1_100_000_001)),
    # base fee rose: the new cap follows 2*base + tip
    (Fees(21 * GWEI, GWEI), 30 * GWEI, 100 * GWEI, Fees(61_100_000_001, 1_100_000_001)),
    # room under the cap only for part of 2*base+tip, still a valid replacement
    (Fees(90 * GWEI, GWEI), 60 * GWEI, 100 * GWEI, Fees(100 * GWEI, 1_100_000_001)),
    # at the cap: no valid replacement exists -> wait
    (Fees(95 * GWEI, GWEI), 10 * GWEI, 100 * GWEI, None),
    (Fees(100 * GWEI, GWEI), 10 * GWEI, 100 * GWEI, None),
])
def test_bump_fees(old: Fees, base: int, cap: int, want: Fees | None) -> None:
    assert policy.bump_fees(old, base, cap) == want


@given(st.integers(1, 10**12), st.integers(0, 10**12), st.integers(0, 10**12),
       st.integers(1, 10**13))
def test_bump_is_a_valid_replacement_never_above_cap(max_fee: int, tip: int, base: int,
                                                     cap: int) -> None:
    tip = min(tip, max_fee)
    new = policy.bump_fees(Fees(max_fee, tip), base, cap)
    if new is not None:
        assert new.max_fee <= cap
        assert new.tip <= new.max_fee
        assert new.max_fee * 100 >= max_fee * 110
        assert new.tip * 100 >= tip * 110
        assert new.tip > tip and new.max_fee > max_fee


@pytest.mark.parametrize("mined, head, conf, deep", [
    (10, 10, 1, True),  # the including block is the first confirmation
    (10, 10, 2, False),
    (10, 11, 2, True),
    (10, 21, 12, True),
    (10, 20, 12, False),
])
def test_is_deep(mined: int, head: int, conf: int, deep: bool) -> None:
    assert policy.is_deep(mined, head, conf) is deep


@pytest.mark.parametrize("sent, head, after, bump", [
    (5, 5, 3, False), (5, 7, 3, False), (5, 8, 3, True), (5, 100, 3, True)])
def test_should_bump(sent: int, head: int, after: int, bump: bool) -> None:
    assert policy.should_bump(sent, head, after) is bump


def test_batch_size_fits_tx_cap_and_block_limit() -> None:
    n = policy.max_batch_size(30_000_000, 30_000, 60_000)
    assert policy.batch_gas_limit(60_000 + 30_000 * n) <= policy.TX_GAS_CAP
    assert policy.batch_gas_limit(60_000 + 30_000 * (n + 1)) > policy.TX_GAS_CAP
    small = policy.max_batch_size(3_000_000, 30_000, 60_000)
    assert policy.batch_gas_limit(60_000 + 30_000 * small) <= 3_000_000
    assert 400 < n < 560


@given(st.integers(2, 10_000))
def test_split_halves_cover_the_batch(n: int) -> None:
    a, b = policy.split(n)
    assert a + b == n and a >= 1 and b >= 1 and abs(a - b) <= 1


@pytest.mark.parametrize("max_fee, base, out", [
    (10 * GWEI, 10 * GWEI, False),  # exactly at the base fee: includable (tip 0)
    (10 * GWEI, 10 * GWEI + 1, True),
    (2 * GWEI, 40 * GWEI, True),  # a spike: Anvil drops it, geth parks it
    (100 * GWEI, 1 * GWEI, False),
    (0, 0, False),
])
def test_priced_out(max_fee: int, base: int, out: bool) -> None:
    assert policy.priced_out(max_fee, base) is out


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(1, 10**13))
def test_initial_fees_are_never_priced_out_while_the_base_fee_is_under_the_cap(
        base: int, tip: int, cap: int) -> None:
    """The engine signs new transactions only while base fee <= cap; then the first attempt
    is always includable, so a fresh transaction is never born priced out."""
    if base <= cap:
        assert not policy.priced_out(policy.initial_fees(base, tip, cap).max_fee, base)


@pytest.mark.parametrize("base, used, limit, expected", [
    (8 * 10**9, 30_000_000, 30_000_000, 9 * 10**9),  # full: an eighth up
    (8 * 10**9, 0, 30_000_000, 7 * 10**9),  # empty: an eighth down
    (8 * 10**9, 15_000_000, 30_000_000, 8 * 10**9),  # at the target
    (8 * 10**9, 22_500_000, 30_000_000, 8_500_000_000),  # half way: a sixteenth
    (7, 30_000_000, 30_000_000, 8),  # at least 1 up
    (8 * 10**9, None, 30_000_000, 8 * 10**9),  # gas used unknown: the head's own
    (0, 30_000_000, 30_000_000, 0),  # no EIP-1559
])
def test_next_base_fee_follows_eip_1559(base: int, used: int | None, limit: int,
                                        expected: int) -> None:
    assert policy.next_base_fee(base, used, limit) == expected
