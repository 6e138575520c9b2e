"""GasMeter on a real Anvil: the batch simulation the engine signs from. Its gas is what the
transaction then uses (never less), and a refused payment comes back with the token's own
revert data, as eth_simulateV1 gives it."""

from __future__ import annotations

import pytest

from disburser import chain as ch
from disburser import devnet as dn
from tests.conftest import Env

pytestmark = pytest.mark.chain

ROOT = "0x" + "ab" * 32


def _recipients(n: int) -> list[str]:
    return ["0x" + f"{0xB0B0 + i:040x}" for i in range(n)]


def test_measured_gas_covers_the_mined_transaction(env: Env) -> None:
    d, c = env.devnet, env.chain
    tos = _recipients(200)
    dn.send_as(c, d.payer, d.token, ch.enc_approve(d.batch_contract, 10**12))
    datas = [ch.enc_disburse(d.token, ROOT, list(range(i, i + 100)), tos[i:i + 100],
                             [1_000_000 + i] * 100) for i in (0, 100)]
    measured = c.measure_many(d.payer, d.batch_contract, datas)
    exact = c.simulate_many(d.payer, d.batch_contract, datas[:1])[0]
    assert measured[0] is not None and measured[1] is not None
    assert measured[0][0] and measured[1][0]
    # Each measured on its own against the same state: both as a first batch would be.
    assert abs(measured[0][1] - measured[1][1]) < 1_000
    receipt = dn.send_as(c, d.payer, d.batch_contract, datas[0], gas=measured[0][1] + 50_000)
    used = int(receipt["gasUsed"], 16)
    assert used == exact[1]
    assert used <= measured[0][1] <= used * 1.01
    assert [env.balance(t) for t in tos[:100]] == [1_000_000] * 100


def test_a_refused_payment_comes_back_with_the_tokens_reason(env: Env) -> None:
    d, c = env.devnet, env.chain
    tos = _recipients(5)
    dn.send_as(c, d.payer, d.token, ch.enc_approve(d.batch_contract, 10**12))
    dn.send_as(c, dn.OWNER, d.token, dn.abi_call("blacklist(address)", ["address"], [tos[3]]))
    data = ch.enc_disburse(d.token, ROOT, list(range(5)), tos, [7] * 5)
    (got,) = c.measure_many(d.payer, d.batch_contract, [data])
    (exact,) = c.simulate_many(d.payer, d.batch_contract, [data])
    assert got is not None and not got[0] and not exact[0]
    assert got[2] == exact[2]
    assert ch.decode_revert(got[2]) == (3, "Blacklistable: account is blacklisted")
    assert [env.balance(t) for t in tos] == [0] * 5
