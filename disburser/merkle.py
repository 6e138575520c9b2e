"""OpenZeppelin ``StandardMerkleTree`` over manifest payments, byte-compatible with the npm
package ``@openzeppelin/merkle-tree`` (leaves sorted, its default).

Leaf value: ``[index, to, amount, keccak256(utf8(id))]`` typed
``["uint256", "address", "uint256", "bytes32"]``; leaf hash is
``keccak256(keccak256(abi.encode(values)))`` (double hashing defeats second pre-image
attacks with 64-byte leaves). Inner nodes hash the sorted pair.
"""

from __future__ import annotations

from collections.abc import Sequence

from disburser.addresses import keccak
from disburser.domain import Payment

LEAF_ENCODING = ("uint256", "address", "uint256", "bytes32")


def leaf_hash(p: Payment) -> bytes:
    encoded = (
        p.index.to_bytes(32, "big")
        + bytes(12)
        + bytes.fromhex(p.to[2:])
        + p.amount.to_bytes(32, "big")
        + keccak(p.id.encode("utf-8"))
    )
    return keccak(keccak(encoded))


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


class MerkleTree:
    """The flat-array tree of ``@openzeppelin/merkle-tree``: leaves sorted by hash and put
    at the end of the array in reverse order, node ``i`` has children ``2i+1`` and ``2i+2``."""

    def __init__(self, payments: Sequence[Payment]) -> None:
        if not payments:
            raise ValueError("a Merkle tree needs at least one leaf")
        hashed = sorted(((leaf_hash(p), p.index) for p in payments), key=lambda t: t[0])
        n = len(hashed)
        tree: list[bytes] = [b""] * (2 * n - 1)
        self._tree_index: dict[int, int] = {}
        for i, (h, payment_index) in enumerate(hashed):
            pos = len(tree) - 1 - i
            tree[pos] = h
            self._tree_index[payment_index] = pos
        for i in range(len(tree) - 1 - n, -1, -1):
            tree[i] = _hash_pair(tree[2 * i + 1], tree[2 * i + 2])
        self._tree = tree

    @property
    def root(self) -> str:
        return "0x" + self._tree[0].hex()

    def proof(self, payment_index: int) -> list[str]:
        """Sibling hashes from the payment's leaf up to the root (OpenZeppelin order)."""
        i = self._tree_index[payment_index]
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
