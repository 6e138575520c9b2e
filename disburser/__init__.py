"""disburser: pay a signed allocation manifest out in an ERC-20 token, crash-safely."""

__version__ = "0.1.0"

import os as _os

# eth-hash (used by eth-account, eth-utils and disburser) defaults to pycryptodome's keccak,
# ~8 us a hash; the pysha3 backend (the safe-pysha3 dependency) takes ~1 us. Paying 300,000
# recipients means millions of hashes (Merkle tree, checksums, transaction hashes).
_os.environ.setdefault("ETH_HASH_BACKEND", "pysha3")
