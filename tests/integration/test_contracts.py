"""BatchPayout, PlainDisperse and TestUSDC on a real Anvil (the pinned binary from npm).

One Anvil per module on a free loopback port; every test runs between evm_snapshot and
evm_revert, so each starts from the same freshly set-up chain.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_abi.abi import decode
from eth_typing import HexStr
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD
from web3.types import RPCEndpoint

pytestmark = pytest.mark.chain

ROOT = Path(__file__).resolve().parents[2]
ANVIL = ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
ARTIFACTS = ROOT / "disburser" / "artifacts"

USDC = Web3.to_checksum_address("0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48")
# Anvil's default dev accounts 0 and 1 (unlocked on Anvil).
PAYER = Web3.to_checksum_address("0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266")
OTHER = Web3.to_checksum_address("0x70997970c51812dc3a010c7d01b50e0d17dc79c8")

UNITS = 10**6  # USDC base units per token
ERROR_STRING = bytes.fromhex("08c379a0")  # Error(string)
BLACKLISTED = "Blacklistable: account is blacklisted"


def selector(signature: str) -> bytes:
    return bytes(Web3.keccak(text=signature)[:4])


TRANSFER_FAILED = selector("TransferFailed(uint256,bytes)")
LENGTH_MISMATCH = selector("LengthMismatch()")


def artifact(name: str) -> dict[str, Any]:
    art: dict[str, Any] = json.loads((ARTIFACTS / f"{name}.json").read_text())
    return art


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    req = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=1) as resp:
            return "result" in json.loads(resp.read())
    except OSError:
        return False


@pytest.fixture(scope="module")
def w3() -> Iterator[Web3]:
    assert ANVIL.is_file(), f"{ANVIL} is missing; run ./scripts/bootstrap"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # stderr to a file, not a pipe: a pipe nobody reads could fill and stall Anvil.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(ANVIL), "--port", str(port), "--host", "127.0.0.1", "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 15
            while not answers(url):
                if proc.poll() is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    pytest.fail(f"anvil exited with {proc.returncode}: {err}")
                if time.monotonic() > deadline:
                    pytest.fail(f"anvil did not answer on {url} within 15 s")
                time.sleep(0.02)
            yield Web3(HTTPProvider(url))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Chain:
    w3: Web3
    token: Contract
    batch: Contract
    plain: Contract


def send(fn: Any, sender: str = PAYER, **tx: Any) -> Any:
    """Send a contract call from an unlocked account and return its successful receipt."""
    w3: Web3 = fn.w3
    tx_hash = fn.transact({"from": sender, **tx})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30, poll_latency=0.01)
    if "gas" not in tx:
        assert receipt["status"] == 1, receipt
    return receipt


def deploy_code(w3: Web3, bytecode: str, abi: list[Any]) -> Contract:
    tx_hash = w3.eth.send_transaction({"from": PAYER, "data": HexStr(bytecode)})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30, poll_latency=0.01)
    assert receipt["status"] == 1
    contract = w3.eth.contract(address=receipt["contractAddress"], abi=abi)
    assert isinstance(contract, Contract)
    return contract


def deploy(w3: Web3, name: str) -> Contract:
    art = artifact(name)
    return deploy_code(w3, art["bytecode"], art["abi"])


@pytest.fixture(scope="module")
def setup(w3: Web3) -> Chain:
    usdc = artifact("TestUSDC")
    w3.provider.make_request(RPCEndpoint("anvil_setCode"), [USDC, usdc["deployedBytecode"]])
    token = w3.eth.contract(address=USDC, abi=usdc["abi"])
    send(token.functions.initialize("USD Coin", "USDC", 6, PAYER))
    batch = deploy(w3, "BatchPayout")
    plain = deploy(w3, "PlainDisperse")
    send(token.functions.mint(PAYER, 1_000_000_000 * UNITS))
    send(token.functions.approve(batch.address, 500_000_000 * UNITS))
    send(token.functions.approve(plain.address, 500_000_000 * UNITS))
    return Chain(w3, token, batch, plain)


@pytest.fixture
def chain(setup: Chain) -> Iterator[Chain]:
    snap = setup.w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    try:
        yield setup
    finally:
        assert setup.w3.provider.make_request(RPCEndpoint("evm_revert"), [snap])["result"] is True


def fresh(tag: str, n: int) -> list[str]:
    """`n` addresses that have never held anything."""
    return [Web3.to_checksum_address(Web3.keccak(text=f"{tag}-{i}")[12:]) for i in range(n)]


def root_of(tag: str) -> bytes:
    return bytes(Web3.keccak(text=f"root-{tag}"))


def revert_data(excinfo: pytest.ExceptionInfo[ContractLogicError]) -> bytes:
    data = excinfo.value.data
    assert isinstance(data, str), data
    return bytes.fromhex(data.removeprefix("0x"))


def decode_transfer_failed(data: bytes) -> tuple[int, bytes]:
    assert data[:4] == TRANSFER_FAILED, data.hex()
    index, reason = decode(["uint256", "bytes"], data[4:])
    return int(index), bytes(reason)


def error_string(reason: bytes) -> str:
    assert reason[:4] == ERROR_STRING, reason.hex()
    (message,) = decode(["string"], reason[4:])
    return str(message)


def disbursed(chain: Chain, receipt: Any) -> dict[str, Any]:
    (event,) = chain.batch.events.Disbursed().process_receipt(receipt, errors=DISCARD)
    return dict(event["args"])


def balances(chain: Chain, addrs: list[str]) -> list[int]:
    return [chain.token.functions.balanceOf(a).call() for a in addrs]


# --- TestUSDC ---------------------------------------------------------------------------


def test_token_is_initialized_once_at_the_usdc_address(chain: Chain) -> None:
    t = chain.token.functions
    assert chain.w3.eth.get_code(USDC) != b""
    assert (t.name().call(), t.symbol().call(), t.decimals().call()) == ("USD Coin", "USDC", 6)
    assert t.owner().call() == PAYER
    assert t.masterMinter().call() == t.pauser().call() == t.blacklister().call() == PAYER
    assert t.initialized().call() is True
    with pytest.raises(ContractLogicError, match="FiatToken: contract is already initialized"):
        t.initialize("Evil", "EVL", 18, OTHER).call({"from": OTHER})


def test_token_mint_and_minters(chain: Chain) -> None:
    t = chain.token.functions
    supply = t.totalSupply().call()
    send(t.mint(OTHER, 5 * UNITS))
    assert t.balanceOf(OTHER).call() == 5 * UNITS
    assert t.totalSupply().call() == supply + 5 * UNITS
    with pytest.raises(ContractLogicError, match="FiatToken: caller is not a minter"):
        t.mint(OTHER, 1).call({"from": OTHER})
    with pytest.raises(ContractLogicError, match="caller is not the masterMinter"):
        t.configureMinter(OTHER, 1).call({"from": OTHER})
    send(t.configureMinter(OTHER, 3))
    send(t.mint(OTHER, 2), sender=OTHER)
    assert t.minterAllowance(OTHER).call() == 1
    with pytest.raises(ContractLogicError, match="exceeds minterAllowance"):
        t.mint(OTHER, 2).call({"from": OTHER})


def test_token_erc20_reverts_like_fiat_token(chain: Chain) -> None:
    t = chain.token.functions
    send(t.mint(OTHER, 10))
    with pytest.raises(ContractLogicError, match="ERC20: transfer amount exceeds balance"):
        t.transfer(PAYER, 11).call({"from": OTHER})
    with pytest.raises(ContractLogicError, match="ERC20: transfer to the zero address"):
        t.transfer("0x" + "00" * 20, 1).call({"from": OTHER})
    with pytest.raises(ContractLogicError, match="ERC20: transfer amount exceeds allowance"):
        t.transferFrom(PAYER, OTHER, 1).call({"from": OTHER})
    send(t.approve(OTHER, 7))
    send(t.transferFrom(PAYER, OTHER, 7), sender=OTHER)
    assert t.allowance(PAYER, OTHER).call() == 0
    assert t.balanceOf(OTHER).call() == 17


def test_token_blacklist_checks_caller_sender_and_receiver(chain: Chain) -> None:
    t = chain.token.functions
    send(t.mint(OTHER, 10))
    send(t.approve(OTHER, 10))
    receipt = send(t.blacklist(OTHER))
    (event,) = chain.token.events.Blacklisted().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["_account"] == OTHER
    assert t.isBlacklisted(OTHER).call() is True
    for fn, sender in [
        (t.transfer(PAYER, 1), OTHER),  # sender
        (t.transfer(OTHER, 1), PAYER),  # receiver
        (t.transferFrom(PAYER, USDC, 1), OTHER),  # caller
        (t.approve(OTHER, 1), PAYER),  # spender
        (t.approve(PAYER, 1), OTHER),  # owner
    ]:
        with pytest.raises(ContractLogicError, match=BLACKLISTED):
            fn.call({"from": sender})
    with pytest.raises(ContractLogicError, match="caller is not the blacklister"):
        t.unBlacklist(OTHER).call({"from": OTHER})
    send(t.unBlacklist(OTHER))
    assert t.isBlacklisted(OTHER).call() is False
    send(t.transfer(PAYER, 1), sender=OTHER)


def test_token_pause(chain: Chain) -> None:
    t = chain.token.functions
    with pytest.raises(ContractLogicError, match="caller is not the pauser"):
        t.pause().call({"from": OTHER})
    send(t.pause())
    assert t.paused().call() is True
    with pytest.raises(ContractLogicError, match="Pausable: paused"):
        t.transfer(OTHER, 1).call({"from": PAYER})
    send(t.unpause())
    send(t.transfer(OTHER, 1))


# --- BatchPayout ------------------------------------------------------------------------


def test_disburse_pays_recipients_and_sets_bits(chain: Chain) -> None:
    root = root_of("pay")
    to = fresh("pay", 5)
    indices = [0, 1, 2, 3, 300]  # the last one is in bitmap word 1
    amounts = [1 * UNITS, 2 * UNITS, 3 * UNITS, 4 * UNITS, 5 * UNITS]
    payer_before = chain.token.functions.balanceOf(PAYER).call()
    receipt = send(chain.batch.functions.disburse(USDC, root, indices, to, amounts))

    assert balances(chain, to) == amounts
    assert chain.token.functions.balanceOf(PAYER).call() == payer_before - sum(amounts)
    transfers = chain.token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert [(e["args"]["from"], e["args"]["to"], e["args"]["value"]) for e in transfers] == [
        (PAYER, r, a) for r, a in zip(to, amounts, strict=True)
    ]
    assert disbursed(chain, receipt) == {
        "payer": PAYER,
        "root": root,
        "count": 5,
        "total": sum(amounts),
        "skipped": 0,
    }
    b = chain.batch.functions
    assert all(b.isPaid(PAYER, USDC, root, i).call() for i in indices)
    assert not any(b.isPaid(PAYER, USDC, root, i).call() for i in (4, 255, 256, 299, 301))
    assert b.paidWord(PAYER, USDC, root, 0).call() == 0b1111
    assert b.paidWord(PAYER, USDC, root, 1).call() == 1 << (300 - 256)
    assert not b.isPaid(PAYER, USDC, root_of("another"), 0).call()
    assert chain.token.functions.balanceOf(chain.batch.address).call() == 0


def test_second_disburse_of_same_payments_pays_nothing(chain: Chain) -> None:
    root = root_of("twice")
    to = fresh("twice", 3)
    args = (USDC, root, [5, 6, 7], to, [10, 20, 30])
    send(chain.batch.functions.disburse(*args))
    payer_before = chain.token.functions.balanceOf(PAYER).call()

    receipt = send(chain.batch.functions.disburse(*args))
    assert balances(chain, to) == [10, 20, 30]
    assert chain.token.functions.balanceOf(PAYER).call() == payer_before
    assert chain.token.events.Transfer().process_receipt(receipt, errors=DISCARD) == ()
    event = disbursed(chain, receipt)
    assert (event["count"], event["total"], event["skipped"]) == (0, 0, 3)

    # The same payments in a batch with one new one: only the new one is paid.
    more = fresh("twice-more", 1)
    receipt = send(
        chain.batch.functions.disburse(USDC, root, [6, 8, 7], [to[1], more[0], to[2]], [20, 40, 30])
    )
    event = disbursed(chain, receipt)
    assert (event["count"], event["total"], event["skipped"]) == (1, 40, 2)
    assert balances(chain, to + more) == [10, 20, 30, 40]


def test_repeated_and_unordered_indices_in_one_call(chain: Chain) -> None:
    root = root_of("order")
    to = fresh("order", 6)
    indices = [700, 5, 699, 5, 6, 700]  # words 2, 0, 2, 0, 0, 2; 5 and 700 repeat
    amounts = [1, 2, 3, 4, 5, 6]
    receipt = send(chain.batch.functions.disburse(USDC, root, indices, to, amounts))
    event = disbursed(chain, receipt)
    assert (event["count"], event["total"], event["skipped"]) == (4, 1 + 2 + 3 + 5, 2)
    assert balances(chain, to) == [1, 2, 3, 0, 5, 0]
    b = chain.batch.functions
    assert b.paidWord(PAYER, USDC, root, 0).call() == (1 << 5) | (1 << 6)
    assert b.paidWord(PAYER, USDC, root, 2).call() == (1 << (699 - 512)) | (1 << (700 - 512))
    assert b.paidWord(PAYER, USDC, root, 1).call() == 0


def test_another_sender_cannot_mark_the_payers_payments(chain: Chain) -> None:
    t = chain.token.functions
    send(t.mint(OTHER, 100))
    send(t.approve(chain.batch.address, 100), sender=OTHER)
    root = root_of("squat")
    indices = [0, 1, 2]
    # Someone who knows the (public) root "pays" every index to itself first: out of its own
    # balance, though the payer's allowance to the contract is far larger.
    payer_before = t.balanceOf(PAYER).call()
    send(chain.batch.functions.disburse(USDC, root, indices, [OTHER] * 3, [1, 1, 1]), sender=OTHER)
    assert t.balanceOf(PAYER).call() == payer_before
    assert t.balanceOf(OTHER).call() == 100
    b = chain.batch.functions
    assert all(b.isPaid(OTHER, USDC, root, i).call() for i in indices)
    assert not any(b.isPaid(PAYER, USDC, root, i).call() for i in indices)

    to = fresh("squat", 3)
    receipt = send(chain.batch.functions.disburse(USDC, root, indices, to, [7, 8, 9]))
    assert disbursed(chain, receipt)["count"] == 3
    assert balances(chain, to) == [7, 8, 9]


def test_payments_paid_in_another_token_are_not_paid_in_this_one(chain: Chain) -> None:
    """The root covers (index, to, amount, id), not the token. Keyed by (payer, root) alone,
    the same payments paid first in a rehearsal token (or USDC.e instead of native USDC)
    were marked paid for good: the real batch skipped them, and the engine recorded them as
    paid elsewhere."""
    other = deploy(chain.w3, "TestUSDC")
    o = other.functions
    send(o.initialize("Rehearsal", "RHS", 6, PAYER))
    send(o.mint(PAYER, 100))
    send(o.approve(chain.batch.address, 100))
    root = root_of("two-tokens")
    to = fresh("two-tokens", 3)
    send(chain.batch.functions.disburse(other.address, root, [0, 1, 2], to, [1, 2, 3]))
    b = chain.batch.functions
    assert all(b.isPaid(PAYER, other.address, root, i).call() for i in range(3))
    assert not any(b.isPaid(PAYER, USDC, root, i).call() for i in range(3))

    receipt = send(chain.batch.functions.disburse(USDC, root, [0, 1, 2], to, [7, 8, 9]))
    event = disbursed(chain, receipt)
    assert (event["count"], event["total"], event["skipped"]) == (3, 24, 0)
    assert balances(chain, to) == [7, 8, 9]
    assert [o.balanceOf(a).call() for a in to] == [1, 2, 3]


def test_blacklisted_recipient_is_named_by_its_manifest_index(chain: Chain) -> None:
    root = root_of("blacklist")
    to = fresh("blacklist", 3)
    send(chain.token.functions.blacklist(to[1]))
    fn = chain.batch.functions.disburse(USDC, root, [40, 41, 42], to, [1, 2, 3])
    with pytest.raises(ContractLogicError) as excinfo:
        fn.call({"from": PAYER})
    index, reason = decode_transfer_failed(revert_data(excinfo))
    assert index == 41
    assert error_string(reason) == BLACKLISTED

    # Mined anyway (explicit gas, no estimate): it fails as a whole, nothing paid or marked.
    receipt = send(fn, gas=1_000_000)
    assert receipt["status"] == 0
    assert balances(chain, to) == [0, 0, 0]
    assert not chain.batch.functions.isPaid(PAYER, USDC, root, 40).call()

    # Without the culprit the rest are paid.
    send(chain.batch.functions.disburse(USDC, root, [40, 42], [to[0], to[2]], [1, 3]))
    assert balances(chain, to) == [1, 0, 3]


def test_paused_token_reverts_the_batch(chain: Chain) -> None:
    root = root_of("paused")
    to = fresh("paused", 2)
    send(chain.token.functions.pause())
    fn = chain.batch.functions.disburse(USDC, root, [9, 3], to, [1, 2])
    with pytest.raises(ContractLogicError) as excinfo:
        fn.call({"from": PAYER})
    index, reason = decode_transfer_failed(revert_data(excinfo))
    assert (index, error_string(reason)) == (9, "Pausable: paused")
    send(chain.token.functions.unpause())
    send(fn)
    assert balances(chain, to) == [1, 2]


def test_insufficient_allowance_names_the_first_payment_over_it(chain: Chain) -> None:
    send(chain.token.functions.approve(chain.batch.address, 5))
    to = fresh("allowance", 3)
    with pytest.raises(ContractLogicError) as excinfo:
        chain.batch.functions.disburse(USDC, root_of("a"), [0, 1, 2], to, [2, 2, 2]).call(
            {"from": PAYER}
        )
    index, reason = decode_transfer_failed(revert_data(excinfo))
    assert (index, error_string(reason)) == (2, "ERC20: transfer amount exceeds allowance")


def test_token_without_code_is_refused(chain: Chain) -> None:
    nowhere = fresh("no-code", 1)[0]
    with pytest.raises(ContractLogicError) as excinfo:
        chain.batch.functions.disburse(nowhere, root_of("x"), [3], fresh("nc", 1), [1]).call(
            {"from": PAYER}
        )
    assert decode_transfer_failed(revert_data(excinfo)) == (3, b"")


@pytest.mark.parametrize("lengths", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_length_mismatch_reverts(chain: Chain, lengths: tuple[int, int, int]) -> None:
    n_idx, n_to, n_amt = lengths
    fn = chain.batch.functions.disburse(
        USDC, root_of("len"), list(range(n_idx)), fresh("len", n_to), [1] * n_amt
    )
    with pytest.raises(ContractLogicError) as excinfo:
        fn.call({"from": PAYER})
    assert revert_data(excinfo) == LENGTH_MISMATCH


def test_empty_batch_emits_zero_event(chain: Chain) -> None:
    receipt = send(chain.batch.functions.disburse(USDC, root_of("empty"), [], [], []))
    event = disbursed(chain, receipt)
    assert (event["count"], event["total"], event["skipped"]) == (0, 0, 0)


# Tokens that misbehave, compiled here with the pinned solcjs: they are test doubles, not
# shipped contracts, so they have no artifact.
ODD_TOKENS = """
// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;
interface IBatchPayout {
    function disburse(address, bytes32, uint256[] calldata, address[] calldata, uint256[] calldata)
        external;
}
contract FalseToken {
    function transferFrom(address, address, uint256) external pure returns (bool) { return false; }
}
contract NoReturnToken {
    uint256 public calls;
    function transferFrom(address, address, uint256) external { calls += 1; }
}
contract ReentrantToken {
    function transferFrom(address, address, uint256) external returns (bool) {
        IBatchPayout(msg.sender).disburse(
            address(this), bytes32(0), new uint256[](0), new address[](0), new uint256[](0)
        );
        return true;
    }
}
"""

COMPILE_JS = """
const solc = require(process.argv[1] + '/node_modules/solc');
const input = {language: 'Solidity', sources: {'Odd.sol': {content: process.argv[2]}},
  settings: {evmVersion: 'cancun', outputSelection: {'*': {'*': ['abi', 'evm.bytecode.object']}}}};
const out = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (out.errors || []).filter((e) => e.severity === 'error');
if (errors.length) {
  console.error(errors.map((e) => e.formattedMessage).join('\\n'));
  process.exit(1);
}
const res = {};
for (const [name, c] of Object.entries(out.contracts['Odd.sol'])) {
  res[name] = {abi: c.abi, bytecode: '0x' + c.evm.bytecode.object};
}
console.log(JSON.stringify(res));
"""


@pytest.fixture(scope="module")
def odd_tokens(setup: Chain) -> dict[str, Contract]:
    node = shutil.which("node")
    assert node, "node is required"
    proc = subprocess.run(
        [node, "-e", COMPILE_JS, str(ROOT), ODD_TOKENS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return {
        name: deploy_code(setup.w3, art["bytecode"], art["abi"])
        for name, art in json.loads(proc.stdout).items()
    }


def test_token_returning_false_fails_with_the_encoded_false(
    chain: Chain, odd_tokens: dict[str, Contract]
) -> None:
    token = odd_tokens["FalseToken"].address
    with pytest.raises(ContractLogicError) as excinfo:
        chain.batch.functions.disburse(token, root_of("f"), [4], fresh("f", 1), [1]).call(
            {"from": PAYER}
        )
    assert decode_transfer_failed(revert_data(excinfo)) == (4, bytes(32))


def test_token_without_return_value_is_accepted(
    chain: Chain, odd_tokens: dict[str, Contract]
) -> None:
    token = odd_tokens["NoReturnToken"]
    receipt = send(
        chain.batch.functions.disburse(token.address, root_of("nr"), [0, 1], fresh("nr", 2), [1, 2])
    )
    assert disbursed(chain, receipt)["count"] == 2
    assert token.functions.calls().call() == 2


def test_reentry_from_the_token_is_refused(chain: Chain, odd_tokens: dict[str, Contract]) -> None:
    token = odd_tokens["ReentrantToken"].address
    with pytest.raises(ContractLogicError) as excinfo:
        chain.batch.functions.disburse(token, root_of("re"), [8], fresh("re", 1), [1]).call(
            {"from": PAYER}
        )
    assert decode_transfer_failed(revert_data(excinfo)) == (8, selector("Reentered()"))


def test_gas_per_fresh_recipient_batch_vs_plain_loop(chain: Chain) -> None:
    n = 200
    amounts = [1 * UNITS + i for i in range(n)]

    lone = send(chain.token.functions.transfer(fresh("gas-lone", 1)[0], UNITS))["gasUsed"]

    to_plain = fresh("gas-plain", n)
    plain = send(chain.plain.functions.disperse(USDC, to_plain, amounts))["gasUsed"]

    to_batch = fresh("gas-batch", n)
    receipt = send(
        chain.batch.functions.disburse(USDC, root_of("gas"), list(range(n)), to_batch, amounts)
    )
    batch = receipt["gasUsed"]
    assert disbursed(chain, receipt)["count"] == n
    assert balances(chain, to_batch[:3] + to_batch[-3:]) == amounts[:3] + amounts[-3:]

    print(
        f"\ngas per fresh recipient, n={n}: BatchPayout {batch / n:,.0f}, "
        f"PlainDisperse {plain / n:,.0f} (ratio {batch / plain:.4f}), lone transfer {lone:,}"
    )
    assert batch <= plain * 1.03
