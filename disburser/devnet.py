"""A local chain for rehearsals, demos and tests: Anvil (the pinned npm binary) on loopback,
the USDC-like test token at the canonical mainnet USDC address, a funded payer and a
deployed batch contract."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disburser import chain as ch
from disburser.artifacts import load_artifact
from disburser.errors import DisburserError, InputError
from disburser.profiles import USDC_MAINNET

# Anvil's well-known development accounts (mnemonic "test test ... junk"). Worthless keys,
# public in every Foundry install; used only on local chains.
DEV_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",  # 0: owner, deployer
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",  # 1: payer
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",  # 2: approver
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",  # 3: approver
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",  # 4: approver
)
DEV_ADDRESSES = (
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
    "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
    "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65",
)
OWNER = DEV_ADDRESSES[0]
PAYER_KEY, PAYER = DEV_KEYS[1], DEV_ADDRESSES[1]


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def anvil_binary() -> Path:
    """The pinned Anvil binary (not the Node wrapper: a SIGKILL to the wrapper leaves anvil
    running on its port)."""
    env = os.environ.get("DISBURSER_ANVIL")
    candidates = [Path(env)] if env else []
    candidates.append(project_root() / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
    for c in candidates:
        if c.is_file():
            return c
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise DisburserError("anvil not found: run ./scripts/bootstrap (installs the pinned "
                         "@foundry-rs/anvil) or set DISBURSER_ANVIL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Anvil:
    """An Anvil process on a free loopback port; stop() kills it."""

    def __init__(self, *, port: int | None = None, chain_id: int = 31337,
                 block_time: float | None = None, tx_gas_cap: bool = True,
                 gas_limit: int | None = None, fork_url: str | None = None,
                 fork_block: int | None = None, extra: Sequence[str] = ()) -> None:
        self._chosen_port = port is not None
        self._fork = fork_url is not None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(self.port),
                "--silent"]
        if fork_url:
            args += ["--fork-url", fork_url]
            if fork_block is not None:
                args += ["--fork-block-number", str(fork_block)]
        else:
            args += ["--chain-id", str(chain_id)]
        if block_time is not None:
            args += ["--block-time", str(block_time)]
        if tx_gas_cap:
            # Enforce EIP-7825's 2^24 per-transaction gas cap, as mainnet does after Osaka.
            args += ["--enable-tx-gas-limit"]
        if gas_limit is not None:
            args += ["--gas-limit", str(gas_limit)]
        args += list(extra)
        self.args = args
        # What messages may show of the command line: the fork URL may carry a password
        # or a provider's API key.
        self.shown_args = [ch.display_url(a) if a == fork_url else a for a in args]
        self.proc: subprocess.Popen[bytes] | None = None
        self._err: Any = None  # Anvil's stderr, read if it exits at start

    def start(self, timeout: float = 20.0) -> Anvil:
        if self._chosen_port:
            # Whatever answers on a port in use (another devnet, a fork rehearsal) would be
            # taken for this Anvil, and `devnet` would write its token over that node's.
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", self.port))
                except OSError:
                    raise InputError(f"port {self.port} on 127.0.0.1 is in use (another node?):"
                                     " choose another --port") from None
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                     stderr=self._err, start_new_session=True)
        t = ch.Transport(self.url, retries=0, timeout=1.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                t.call("eth_chainId")
                return self
            except DisburserError:
                if self.proc.poll() is not None:
                    self._err.seek(0)
                    # Its last line says why; not with a fork URL, which it may quote
                    # with a password or a provider's key in any form.
                    said = self._err.read().decode(errors="replace").strip().splitlines()
                    said = [x for x in said if x.lower().startswith("error")] or said[-1:]
                    why = f": {said[0][:200]}" if said and not self._fork else ""
                    raise DisburserError(f"anvil exited with code {self.proc.returncode} "
                                         f"({' '.join(self.shown_args[1:])}){why}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise DisburserError(f"anvil did not answer on {self.url}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._err is not None:
            self._err.close()
            self._err = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Devnet:
    url: str
    chain_id: int
    token: str
    batch_contract: str
    payer: str
    payer_key: str | None  # None when the payer is the operator's own (keystore) address
    approvers: tuple[str, ...]
    approver_keys: tuple[str, ...]

    def env(self) -> dict[str, str]:
        """The settings that point disburser at this devnet."""
        return {
            "DISBURSER_NETWORK": "anvil",
            "DISBURSER_RPC_URL": self.url,
            "DISBURSER_CHAIN_ID": str(self.chain_id),
            "DISBURSER_TOKEN": self.token,
            "DISBURSER_BATCH_CONTRACT": self.batch_contract,
            "DISBURSER_PAYER": self.payer,
            **({"DISBURSER_PRIVATE_KEY": self.payer_key} if self.payer_key else {}),
            "DISBURSER_APPROVERS": ",".join(self.approvers),
            "DISBURSER_QUORUM": "2",
        }


def send_as(c: ch.RpcChain, sender: str, to: str | None, data: str, *, value: int = 0,
            gas: int | None = None) -> dict[str, Any]:
    """A transaction from an unlocked or impersonated account; waits for its receipt."""
    tx: dict[str, str] = {"from": sender, "data": data}
    if to:
        tx["to"] = to
    if value:
        tx["value"] = hex(value)
    if gas:
        tx["gas"] = hex(gas)
    h = c.rpc("eth_sendTransaction", [tx])
    for _ in range(600):
        r = c.rpc("eth_getTransactionReceipt", [h])
        if r is not None:
            if int(r["status"], 16) != 1:
                raise DisburserError(f"setup transaction {h} reverted")
            return dict(r)
        c.rpc("evm_mine") if _automine_off(c) else time.sleep(0.05)
    raise DisburserError(f"setup transaction {h} was not mined")


def _automine_off(c: ch.RpcChain) -> bool:
    try:
        return not bool(c.rpc("anvil_getAutomine"))
    except DisburserError:
        return False


def abi_call(signature: str, types: Sequence[str], args: Sequence[Any]) -> str:
    from eth_abi import encode

    return "0x" + ch.selector(signature) + encode(list(types), list(args)).hex()


def place_token(c: ch.RpcChain, *, address: str = USDC_MAINNET, decimals: int = 6,
                owner: str = OWNER, name: str = "USD Coin", symbol: str = "USDC") -> str:
    """Put the test token's runtime code at ``address`` and initialize its empty storage."""
    c.rpc("anvil_setCode", [address, load_artifact("TestUSDC")["deployedBytecode"]])
    send_as(c, owner, address, abi_call("initialize(string,string,uint8,address)",
                                        ["string", "string", "uint8", "address"],
                                        [name, symbol, decimals, owner]))
    return address


def mint(c: ch.RpcChain, token: str, to: str, amount: int, owner: str = OWNER) -> None:
    send_as(c, owner, token, abi_call("mint(address,uint256)", ["address", "uint256"],
                                      [to, amount]))


def deploy_batch_contract(c: ch.RpcChain, deployer: str = OWNER) -> str:
    r = send_as(c, deployer, None, load_artifact("BatchPayout")["bytecode"])
    from eth_utils import to_checksum_address

    addr: str = to_checksum_address(r["contractAddress"])
    return addr


def setup(url: str, *, decimals: int = 6, payer_tokens: int = 400_000_000,
          payer_eth: int = 10_000, payer: str | None = None) -> Devnet:
    """Token at the USDC address, the payer (Anvil's dev account 1 unless ``payer`` is
    given) funded with tokens and ETH, BatchPayout deployed."""
    c = ch.RpcChain(url)
    who = payer or PAYER
    token = place_token(c, decimals=decimals)
    mint(c, token, who, payer_tokens * 10**decimals)
    c.rpc("anvil_setBalance", [who, hex(payer_eth * 10**18)])
    batch = deploy_batch_contract(c)
    return Devnet(url=url, chain_id=c.chain_id(), token=token, batch_contract=batch,
                  payer=who, payer_key=PAYER_KEY if payer in (None, PAYER) else None,
                  approvers=DEV_ADDRESSES[2:5], approver_keys=DEV_KEYS[2:5])


def fund_token(c: ch.RpcChain, token: str, to: str, amount: int) -> str:
    """Give ``to`` exactly ``amount`` of a token whose code we do not control (a fork of a
    real chain): Anvil's ``anvil_dealERC20`` first, then a search of the balance mapping's
    storage slot. Returns the method that worked."""
    try:
        c.rpc("anvil_dealERC20", [token, to, hex(amount)])
        if c.token_balance(token, to) == amount:
            return "anvil_dealERC20"
    except DisburserError:
        pass
    from eth_hash.auto import keccak

    holder = bytes(12) + bytes.fromhex(to[2:])
    for slot in range(0, 64):
        key = "0x" + keccak(holder + slot.to_bytes(32, "big")).hex()
        old = c.rpc("eth_getStorageAt", [token, key, "latest"])
        c.rpc("anvil_setStorageAt", [token, key, "0x" + format(amount, "064x")])
        if c.token_balance(token, to) == amount:
            return f"storage slot {slot}"
        c.rpc("anvil_setStorageAt", [token, key, "0x" + str(old)[2:].rjust(64, "0")])
    raise DisburserError(f"cannot fund {to} with token {token} on this fork: neither "
                         "anvil_dealERC20 nor a balance-slot search worked")


def setup_fork(url: str, *, token: str, payer: str | None = None,
               payer_tokens: int = 400_000_000, payer_eth: int = 1_000) -> Devnet:
    """On a fork of a real chain: keep the real token's code, fund the payer with it and
    with ETH, deploy BatchPayout. Decimals come from the token itself."""
    c = ch.RpcChain(url)
    payer_key = PAYER_KEY if payer in (None, PAYER) else None
    payer = payer or PAYER
    if not c.code(token):
        raise DisburserError(f"token {token}: no contract at this address on the forked chain")
    decimals = c.decimals(token)
    fund_token(c, token, payer, payer_tokens * 10**decimals)
    c.rpc("anvil_setBalance", [payer, hex(payer_eth * 10**18)])
    c.rpc("anvil_setBalance", [OWNER, hex(10**20)])
    batch = deploy_batch_contract(c)
    return Devnet(url=url, chain_id=c.chain_id(), token=token, batch_contract=batch,
                  payer=payer, payer_key=payer_key, approvers=DEV_ADDRESSES[2:5],
                  approver_keys=DEV_KEYS[2:5])
