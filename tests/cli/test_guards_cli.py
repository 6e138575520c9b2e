"""Guards of the money paths that only a real chain exercises (the mutation review's
survivors; see tests/unit/test_guards.py for the rest): the real CLI against a fresh Anvil."""

from __future__ import annotations

import pytest
from eth_utils import to_checksum_address

from disburser import devnet as dn
from disburser.artifacts import load_artifact
from tests.cli.test_refusals import _assert_refused
from tests.conftest import Env


@pytest.mark.parametrize("impostor", ["token", "PlainDisperse"])
def test_send_refuses_a_batch_contract_that_is_not_batchpayout(env: Env, impostor: str) -> None:
    """Invariants 1, 2 and 5 (sender.py ``verify_batch_contract``, the code at
    DISBURSER_BATCH_CONTRACT compared with BatchPayout's): the setting names the token
    itself, or a PlainDisperse (a disperse contract with no paid bitmap, which would spend
    whatever it is approved for). `send --mode batch` must refuse with exit 2 and one line
    naming the setting, before anything is signed: the payer's nonce and balance unchanged,
    no transaction in the ledger and no allowance given to that address. Without the check
    any contract was trusted: these two stopped the run only by accident, when the read of
    the paid bitmap reverted (exit 1, "execution reverted", no setting named); a contract
    that answers that read would be approved for all that is owed and sent the batches,
    with no bitmap of BatchPayout's to stop a second payment."""
    if impostor == "token":
        address = env.devnet.token
    else:
        r = dn.send_as(env.chain, dn.OWNER, None, str(load_artifact("PlainDisperse")["bytecode"]))
        address = str(to_checksum_address(r["contractAddress"]))
    m = env.signed_manifest(3)
    _assert_refused(env, ["send", str(m), "--mode", "batch", "--yes"],
                    f"DISBURSER_BATCH_CONTRACT {address}: the code there is not disburser's "
                    "BatchPayout (deploy it with `disburser deploy`)",
                    {"DISBURSER_BATCH_CONTRACT": address}, exact=True)
    assert env.chain.allowance(env.devnet.token, env.devnet.payer, address) == 0
