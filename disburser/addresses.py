"""EIP-55 addresses, computed directly with keccak: the same result as
``eth_utils.to_checksum_address`` (a test checks) at a third of its cost, which matters for
manifests and allocations of 300,000 recipients."""

from __future__ import annotations

try:  # the C keccak of safe-pysha3 (a dependency), without eth-hash's dispatch (~1 us a call)
    from sha3 import keccak_256 as _keccak_256

    def keccak(data: bytes) -> bytes:
        return bytes(_keccak_256(data).digest())
except ImportError:  # pragma: no cover - only without the dependency
    from eth_hash.auto import keccak as _eth_keccak

    def keccak(data: bytes) -> bytes:
        return bytes(_eth_keccak(data))

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_ZERO_BODY = "0" * 40
# For EIP-55 without a Python loop over characters: digest nibbles 8-f -> 0x20 (the
# lower/upper case bit), and hex letters -> 0xff; the AND of the two masks, XORed into the
# lower-case address, upper-cases exactly the letters under a high nibble.
_HIGH_NIBBLE = str.maketrans({**{c: "\x00" for c in "01234567"},
                              **{c: "\x20" for c in "89abcdef"}})
_LETTER = str.maketrans({**{c: "\x00" for c in "0123456789"},
                         **{c: "\xff" for c in "abcdef"}})


def eip55(lower: str) -> str:
    """EIP-55 of 40 lower-case hex digits: a letter is upper case where keccak(lower)'s hex
    digit is >= 8."""
    digest = keccak(lower.encode("ascii")).hex()[:40]
    high = int.from_bytes(digest.translate(_HIGH_NIBBLE).encode("latin-1"), "big")
    letters = int.from_bytes(lower.translate(_LETTER).encode("latin-1"), "big")
    mixed = int.from_bytes(lower.encode("ascii"), "big") ^ (high & letters)
    return "0x" + mixed.to_bytes(40, "big").decode("ascii")


def is_hex_address(text: str) -> bool:
    return len(text) == 42 and text.startswith("0x") and _HEX_DIGITS.issuperset(text[2:])


def to_checksum(address: str) -> str:
    """The EIP-55 form of a 0x-prefixed 20-byte hex address (any case)."""
    return eip55(address[2:].lower())


def checksum_address(text: str) -> str | None:
    """The EIP-55 form of a usable payout address, or None.

    Usable: ``0x`` and 40 hex digits, all-lower or all-upper case or a correct EIP-55
    checksum (a wrong one is a typo we must not pay), and not the zero address.
    """
    if not is_hex_address(text):
        return None
    body = text[2:]
    lower = body.lower()
    if lower == _ZERO_BODY:
        return None
    checksummed = eip55(lower)
    if body != lower and body != body.upper() and checksummed != text:
        return None
    return checksummed
