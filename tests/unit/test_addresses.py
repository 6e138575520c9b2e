"""EIP-55 computed directly must equal eth-utils' to_checksum_address, one at a time and
many at once."""

from __future__ import annotations

from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from disburser.addresses import checksum_address, to_checksum, to_checksum_many

_address = st.binary(min_size=20, max_size=20).flatmap(
    lambda b: st.sampled_from(["0x" + b.hex(), "0x" + b.hex().upper(),
                               to_checksum_address(b)]))


@settings(max_examples=200, deadline=None)
@given(st.lists(_address, max_size=12))
def test_checksums_match_eth_utils(addresses: list[str]) -> None:
    expected = [to_checksum_address(a) for a in addresses]
    assert [to_checksum(a) for a in addresses] == expected
    assert to_checksum_many(addresses) == expected
    assert [checksum_address(a) for a in expected] == [
        None if int(a, 16) == 0 else a for a in expected]


def test_edge_addresses() -> None:
    for body in ("0" * 40, "f" * 40, "F" * 40, "9" * 40, "a" * 40):
        a = "0x" + body
        assert to_checksum(a) == to_checksum_many([a])[0] == to_checksum_address(a)
    assert to_checksum_many([]) == []
