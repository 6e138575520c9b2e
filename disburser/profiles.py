"""Built-in network profiles. Every field can be overridden by its DISBURSER_* setting; the
chain's own answers (chain id, token decimals) must match before anything is signed."""

from __future__ import annotations

from dataclasses import dataclass

USDC_MAINNET = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"
# Chain ids of local development chains (Anvil and Hardhat 31337, Ganache and geth --dev
# 1337): the only ones where a plain private key is taken without an override.
LOCAL_CHAIN_IDS = frozenset({31337, 1337})


@dataclass(frozen=True)
class Profile:
    name: str
    chain_id: int
    token: str
    decimals: int
    confirmations: int
    max_fee_gwei: str
    priority_fee_gwei: str
    poll_interval: float
    # A plain private key (DISBURSER_PRIVATE_KEY) is only accepted where tokens are worthless.
    local: bool
    default_rpc: str = "http://127.0.0.1:8545"


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        # Local Anvil: the test token sits at the canonical mainnet USDC address so that
        # settings look like production.
        Profile("anvil", 31337, USDC_MAINNET, 6, 1, "100", "1", 0.05, local=True),
        Profile("ethereum", 1, USDC_MAINNET, 6, 12, "100", "1", 4.0, local=False),
        Profile(
            "arbitrum", 42161, "0xaf88d065e77c8cC2239327C5EDb3A432268e5831", 6, 20, "10",
            "0.01", 1.0, local=False,
        ),
        Profile(
            "base", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", 6, 20, "10", "0.01",
            1.0, local=False,
        ),
        # Binance-Peg USDC has 18 decimals, not 6: a manifest built for 6 must be refused.
        Profile(
            "bnb", 56, "0x8AC76a51cc950d9822D68b83fE1Ad97B32Cd580d", 18, 15, "10", "1", 1.5,
            local=False,
        ),
    )
}
