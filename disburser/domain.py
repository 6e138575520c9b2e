"""Frozen value types and status enums shared by every layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass

MANIFEST_FORMAT = "disburser.manifest/1"
ZERO_ADDRESS = "0x" + "00" * 20


@dataclass(frozen=True, slots=True)
class Payment:
    """One line of a manifest: pay ``amount`` base units to ``to``."""

    index: int
    id: str
    to: str  # EIP-55 checksummed
    amount: int  # base units, > 0


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed, structurally valid manifest (signatures not yet checked)."""

    program: str
    chain_id: int
    token: str
    payer: str
    not_after: int
    payments: tuple[Payment, ...]
    signatures: tuple[str, ...]
    root: str  # paymentsRoot, 0x-prefixed hex

    @property
    def count(self) -> int:
        return len(self.payments)

    @property
    def total(self) -> int:
        return sum(p.amount for p in self.payments)


class PaymentStatus(enum.StrEnum):
    """Ledger state of one payment. Moves only by guarded compare-and-set."""

    # Recorded from an accepted manifest; no transaction carries it yet. The sender claims it.
    QUEUED = "queued"
    # Bound to a transaction (a batch or a direct transfer) whose signed bytes are in the
    # ledger. The sender moves it to CONFIRMED, or back to QUEUED only when the chain proves
    # that transaction can never be mined (its nonce was used by a replacement of ours
    # that does not carry it - which never happens, as replacements keep the same payload).
    IN_FLIGHT = "in_flight"
    # Its transaction is mined with success at the configured depth. Final.
    CONFIRMED = "confirmed"
    # The token refuses it (blacklisted recipient, say): found by simulation before signing;
    # `reason` says why. Final for this run; `send --retry-failed` puts it back to QUEUED.
    FAILED = "failed"
    # Already paid on chain before this ledger knew it (the batch contract's bitmap says so).
    PAID_ELSEWHERE = "paid_elsewhere"


class TxStatus(enum.StrEnum):
    """Ledger state of one logical transaction (one nonce)."""

    # Signed and committed; maybe broadcast. The sender (re)broadcasts its latest attempt
    # until one attempt is mined.
    PENDING = "pending"
    # One of its attempts is in a block, not yet at the configured depth. Back to PENDING
    # if that block leaves the canonical chain.
    MINED = "mined"
    # Mined with status 1 at the configured depth. Final.
    CONFIRMED = "confirmed"
    # Mined with status 0 at the configured depth (its payments go back to QUEUED). Final.
    REVERTED = "reverted"


class Mode(enum.StrEnum):
    BATCH = "batch"
    DIRECT = "direct"
