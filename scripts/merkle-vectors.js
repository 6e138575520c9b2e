#!/usr/bin/env node
// Writes test vectors for paymentsRoot computed by @openzeppelin/merkle-tree itself, so the
// Python implementation is checked against the reference. Usage: node scripts/merkle-vectors.js > tests/vectors/merkle.json
const { StandardMerkleTree } = require("@openzeppelin/merkle-tree");
const { keccak256: k256 } = require("ethereum-cryptography/keccak");
const { utf8ToBytes, bytesToHex } = require("ethereum-cryptography/utils");
const keccak256 = (b) => "0x" + bytesToHex(k256(b));
const toUtf8Bytes = utf8ToBytes;
function getAddress(a) { // EIP-55
  const lower = a.toLowerCase().slice(2), h = bytesToHex(k256(utf8ToBytes(lower)));
  return "0x" + [...lower].map((c, i) => (parseInt(h[i], 16) >= 8 ? c.toUpperCase() : c)).join("");
}
function addr(i) { return getAddress("0x" + keccak256(toUtf8Bytes("addr-" + i)).slice(26)); }
const cases = [];
for (const n of [1, 2, 3, 4, 5, 7, 16, 33]) {
  const payments = [];
  for (let i = 0; i < n; i++) {
    const id = i === 2 ? "user-é-" + i : "user-" + String(i).padStart(6, "0");
    payments.push({ id, to: addr(n * 100 + i), amount: String(BigInt(i + 1) * 1250000n + (n === 33 ? 10n ** 26n : 0n)) });
  }
  const values = payments.map((p, i) => [String(i), p.to, p.amount, keccak256(toUtf8Bytes(p.id))]);
  const tree = StandardMerkleTree.of(values, ["uint256", "address", "uint256", "bytes32"]);
  const proofs = {};
  for (const [j, v] of tree.entries()) proofs[v[0]] = tree.getProof(j);
  cases.push({ payments, root: tree.root, proofs });
}
process.stdout.write(JSON.stringify({ generator: "@openzeppelin/merkle-tree " + require("@openzeppelin/merkle-tree/package.json").version, cases }, null, 1) + "\n");
