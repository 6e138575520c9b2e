"""The hand-built EIP-1559 signing path against eth-account, byte for byte."""

from __future__ import annotations

import random

from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from disburser.addresses import to_checksum
from disburser.keys import SignedTx, Signer

KEY = bytes.fromhex("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")
SIGNER = Signer(KEY)


def _eth_account(*, chain_id: int, nonce: int, to: str, data: str, gas: int, max_fee: int,
                 tip: int, value: int = 0) -> SignedTx:
    """The reference: eth-account's own EIP-1559 signing of the same fields."""
    tx: dict[str, object] = {"type": 2, "chainId": chain_id, "nonce": nonce, "data": data,
                             "gas": gas, "maxFeePerGas": max_fee,
                             "maxPriorityFeePerGas": tip, "value": value}
    if to:  # empty: contract creation
        tx["to"] = to
    signed = Account.from_key(KEY).sign_transaction(tx)
    return SignedTx("0x" + bytes(signed.raw_transaction).hex(),
                    "0x" + bytes(signed.hash).hex())

uint = st.integers(min_value=0, max_value=2**256 - 1)
small = st.integers(min_value=0, max_value=2**64 - 1)
address = st.binary(min_size=20, max_size=20).map(lambda b: to_checksum("0x" + b.hex()))
calldata = st.binary(max_size=300).map(lambda b: "0x" + b.hex())


@settings(max_examples=200, deadline=None)
@given(chain_id=st.integers(min_value=1, max_value=2**32), nonce=small, to=address | st.just(""),
       data=calldata, gas=st.integers(min_value=21_000, max_value=2**24), max_fee=uint,
       tip=uint, value=uint)
def test_sign_tx_matches_eth_account(chain_id: int, nonce: int, to: str, data: str, gas: int,
                                     max_fee: int, tip: int, value: int) -> None:
    kw = dict(chain_id=chain_id, nonce=nonce, to=to, data=data, gas=gas, max_fee=max_fee,
              tip=tip, value=value)
    assert SIGNER.sign_tx(**kw) == _eth_account(**kw)  # type: ignore[arg-type]


def test_sign_tx_long_calldata_matches_eth_account() -> None:
    # Batch calldata is ~95 kB: RLP length-of-length prefixes of 3 bytes.
    data = "0x" + random.Random(7).randbytes(95_000).hex()
    kw = dict(chain_id=31337, nonce=5, to=to_checksum("0x" + "11" * 20), data=data, gas=16_000_000,
              max_fee=100 * 10**9, tip=10**9)
    assert SIGNER.sign_tx(**kw) == _eth_account(**kw)  # type: ignore[arg-type]
