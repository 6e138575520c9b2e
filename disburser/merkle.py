"""OpenZeppelin ``StandardMerkleTree`` over manifest payments, byte-compatible with the npm
package ``@openzeppelin/merkle-tree`` (leaves sorted, its default).

Leaf value: ``[index, to, amount, keccak256(utf8(id))]`` typed
``["uint256", "address", "uint256", "bytes32"]``; leaf hash is
``keccak256(keccak256(abi.encode(values)))`` (double hashing defeats second pre-image
attacks with 64-byte leaves). Inner nodes hash the sorted pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter

from disburser.addresses import keccak, keccak_256
from disburser.domain import Payment

LEAF_ENCODING = ("uint256", "address", "uint256", "bytes32")
_ADDRESS_PAD = bytes(12)


def leaf_hash(p: Payment) -> bytes:
    encoded = (
        p.index.to_bytes(32, "big")
        + bytes(12)
        + bytes.fromhex(p.to[2:])
        + p.amount.to_bytes(32, "big")
        + keccak(p.id.encode("utf-8"))
    )
    return keccak(keccak(encoded))


def leaf_hashes(payments: Sequence[Payment]) -> list[bytes]:
    """``[leaf_hash(p) for p in payments]``, inlined: three keccak calls a leaf and nothing
    else that can be left out (a manifest of 100,000 payments is hashed on every `send`)."""
    k = keccak_256
    fromhex = bytes.fromhex
    pad = _ADDRESS_PAD
    return [
        k(k(p.index.to_bytes(32, "big") + pad + fromhex(p.to[2:]) + p.amount.to_bytes(32, "big")
            + k(p.id.encode("utf-8")).digest()).digest()).digest()
        for p in payments
    ]


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


class MerkleTree:
    """The flat-array tree of ``@openzeppelin/merkle-tree``: leaves sorted by hash and put
    at the end of the array in reverse order, node ``i`` has children ``2i+1`` and ``2i+2``."""

    def __init__(self, payments: Sequence[Payment]) -> None:
        if not payments:
            raise ValueError("a Merkle tree needs at least one leaf")
        self._payments = payments
        self._leaves = leaf_hashes(payments)
        n = len(self._leaves)
        # Equal leaf hashes are equal bytes: sorting the hashes alone gives the same array.
        tree = [b""] * (n - 1) + sorted(self._leaves, reverse=True)
        # Parents level by level, a run [lo, hi) at a time whose children (from 2*lo+1 on)
        # are all at or past hi, so already hashed; a comprehension rather than an indexed
        # loop, for speed.
        k = keccak_256
        hi = n - 1
        while hi > 0:
            lo = hi // 2
            left = tree[2 * lo + 1:2 * hi + 1:2]
            right = tree[2 * lo + 2:2 * hi + 2:2]
            tree[lo:hi] = [k(a + b if a < b else b + a).digest() for a, b in zip(left, right,
                                                                                  strict=True)]
            hi = lo
        self._tree = tree
        self._positions: dict[int, int] | None = None

    def _tree_index(self) -> dict[int, int]:
        """Payment index -> position of its leaf in the array (built for the first proof)."""
        if self._positions is None:
            hashed = sorted(zip(self._leaves, (p.index for p in self._payments), strict=True),
                            key=itemgetter(0))
            last = len(self._tree) - 1
            self._positions = {index: last - i for i, (_, index) in enumerate(hashed)}
        return self._positions

    @property
    def root(self) -> str:
        return "0x" + self._tree[0].hex()

    def proof(self, payment_index: int) -> list[str]:
        """Sibling hashes from the payment's leaf up to the root (OpenZeppelin order)."""
        i = self._tree_index()[payment_index]
        out: list[str] = []
        while i > 0:
            sibling = i - 1 if i % 2 == 0 else i + 1
            out.append("0x" + self._tree[sibling].hex())
            i = (i - 1) // 2
        return out


def verify_proof(root: str, leaf: bytes, proof: Sequence[str]) -> bool:
    """What ``MerkleProof.verify`` in OpenZeppelin's Solidity library computes."""
    h = leaf
    for sibling in proof:
        h = _hash_pair(h, bytes.fromhex(sibling[2:]))
    return "0x" + h.hex() == root.lower()


def payments_root(payments: Sequence[Payment]) -> str:
    return MerkleTree(payments).root
