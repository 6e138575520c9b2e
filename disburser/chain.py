"""The only module that talks to a node: a small JSON-RPC client with retries, batching and
one table that turns node error strings into typed errors, plus the hand-written ABI
encoding of the few calls disburser makes (web3's generic encoder is slow on hot paths)."""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import requests

from disburser.errors import ChainMismatchError, DisburserError, RpcError

# --- typed node errors ------------------------------------------------------------------


class NodeError(DisburserError):
    """The node answered a request with a JSON-RPC error."""

    exit_code = 1

    def __init__(self, message: str, code: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


class AlreadyKnown(NodeError):
    """The node already has this exact transaction: counts as sent."""


class NonceTooLow(NodeError):
    """The nonce is used: by this transaction (fine) or another one (look it up)."""


class NonceTooHigh(NodeError):
    """An earlier nonce has not reached the node yet, and this node keeps no gaps (Hardhat
    on automine): sent again once the earlier one is there."""


class Underpriced(NodeError):
    """A replacement did not raise fees enough, or fees are below the node's floor."""


class InsufficientFunds(NodeError):
    """The payer cannot pay gas * max fee."""


class GasCapExceeded(NodeError):
    """The gas limit is above the per-transaction cap (EIP-7825) or the block limit."""


class ServerTimeout(NodeError):
    """The node answered that it timed out handling the request (geth's -32002): it may have
    done it anyway."""


class Reverted(NodeError):
    """eth_call / eth_estimateGas reverted; ``data`` is the revert data (bytes)."""


# Substrings seen from geth, Anvil, Erigon, Nethermind and Besu, lower-cased.
_ERROR_TABLE: tuple[tuple[str, type[NodeError]], ...] = (
    ("already known", AlreadyKnown),
    ("alreadyknown", AlreadyKnown),  # Nethermind
    ("existing tx with same hash", AlreadyKnown),  # Erigon
    ("known transaction", AlreadyKnown),
    ("already imported", AlreadyKnown),
    ("transaction already exists", AlreadyKnown),
    ("nonce too low", NonceTooLow),
    ("nonce is too low", NonceTooLow),
    ("oldnonce", NonceTooLow),
    ("nonce too high", NonceTooHigh),
    ("nonce is too high", NonceTooHigh),
    ("noncegap", NonceTooHigh),  # Nethermind, a sender's future nonce it will not keep
    ("nonce gap", NonceTooHigh),
    ("future transaction tries to replace pending", NonceTooHigh),  # geth, a full pool
    ("gapped-nonce tx", NonceTooHigh),  # geth, a sender with an EIP-7702 delegation
    ("replacement transaction underpriced", Underpriced),
    ("underpriced", Underpriced),
    ("max fee per gas less than block base fee", Underpriced),
    ("fee too low", Underpriced),  # Erigon
    ("feetoolow", Underpriced),  # Nethermind
    ("replacementnotallowed", Underpriced),  # Nethermind: a replacement's fee too low
    ("gas price below", Underpriced),  # Besu: below the base fee or its minimum
    ("request timed out", ServerTimeout),  # geth -32002
    ("insufficient funds", InsufficientFunds),
    ("gas limit cap", GasCapExceeded),
    ("tx_gas_limit_cap", GasCapExceeded),
    ("exceeds block gas limit", GasCapExceeded),
    ("intrinsic gas too high", GasCapExceeded),
    ("execution reverted", Reverted),
    ("revert", Reverted),
)


def classify(code: int | None, message: str, data: Any = None) -> NodeError:
    low = message.lower()
    for needle, cls in _ERROR_TABLE:
        if needle in low:
            if cls is Reverted:
                return Reverted(message, code, _revert_bytes(data))
            return cls(message, code, data)
    return NodeError(message, code, data)


def error_of(err: Any) -> NodeError:
    """A JSON-RPC ``error`` member as an exception: an object with code, message and data,
    or (from some nodes and proxies) a bare string."""
    if not isinstance(err, dict):
        return classify(None, str(err))
    code = err.get("code")
    return classify(code if isinstance(code, int) else None, str(err.get("message", "")),
                    err.get("data"))


def _revert_bytes(data: Any) -> bytes:
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return b""
    return b""


# --- transport --------------------------------------------------------------------------


class Transport:
    """JSON-RPC over HTTP with retries (timeouts, resets, 429, 5xx) using backoff and jitter.
    Sleep and randomness are parameters so that tests drive them."""

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 8,
                 sleep: Callable[[float], None] = time.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self._sleep = sleep
        self._rand = rand
        self._ids = itertools.count(1)
        self._http = requests.Session()
        # No proxy/netrc lookups from the environment on every request (~0.1 ms each).
        self._http.trust_env = False

    def clone(self) -> Transport:
        """The same node and retry rules on a connection of its own (for another thread:
        a requests.Session is not shared between threads)."""
        return Transport(self.url, timeout=self.timeout, retries=self.retries,
                         sleep=self._sleep, rand=self._rand)

    def close(self) -> None:
        self._http.close()

    def _post(self, payload: Any) -> Any:
        body = json.dumps(payload, separators=(",", ":"))
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                r = self._http.post(self.url, data=body, timeout=self.timeout,
                                    headers={"Content-Type": "application/json"})
                if r.status_code == 429 or r.status_code >= 500:
                    raise _Retryable(f"HTTP {r.status_code}")
                if r.status_code != 200:
                    raise RpcError(f"node at {display_url(self.url)} answered HTTP "
                                   f"{r.status_code}")
                try:
                    return r.json()
                except ValueError:
                    raise _Retryable("invalid JSON from node") from None
            # A connection cut while the body is read surfaces as ChunkedEncodingError (or
            # ContentDecodingError), which is not a ConnectionError: without them a truncated
            # answer escaped the retries and killed the run as an "internal error".
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError, _Retryable) as e:
                if attempt == self.retries:
                    raise RpcError(
                        f"node at {display_url(self.url)} unreachable after "
                        f"{self.retries + 1} tries: "
                        f"{_short(e, self.url)}"
                    ) from None
                # Full jitter: spreads retries of many clients (and of our batches).
                self._sleep(delay * (0.5 + self._rand()))
                delay = min(delay * 2, 5.0)
            except requests.RequestException as e:  # a URL requests cannot use, say
                raise RpcError(f"node at {display_url(self.url)}: {_short(e, self.url)}"
                               ) from None
            except ValueError as e:  # a host urllib3 cannot parse (settings check them)
                raise RpcError(f"node at {display_url(self.url)}: not a usable URL "
                               f"({type(e).__name__})") from None
        raise AssertionError("unreachable")

    def _call_once(self, method: str, params: Sequence[Any] = ()) -> Any:
        resp = self._post({"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                           "params": list(params)})
        if not isinstance(resp, dict):
            raise RpcError(f"{method}: unexpected answer from node")
        if "error" in resp and resp["error"] is not None:
            raise error_of(resp["error"])
        return resp.get("result")

    def call(self, method: str, params: Sequence[Any] = ()) -> Any:
        """One request; a rate limit reported inside a 200 answer (providers' -32005
        "rate limit" / "too many requests") is retried with the same backoff as HTTP 429."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return self._call_once(method, params)
            except NodeError as e:
                if not rate_limited(e) or attempt == self.retries:
                    raise
                delay = self._rate_limit_pause(delay)
        raise AssertionError("unreachable")

    def _rate_limit_pause(self, delay: float) -> float:
        """Wait before sending again what a node refused for a rate limit (full jitter
        around ``delay``); the next delay, doubled up to 10 s."""
        self._sleep(delay * (0.5 + self._rand()))
        return min(delay * 2, 10.0)

    def batch(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Several requests in one HTTP round trip; each result is a value or a NodeError.
        A rate limit is retried with the same backoff as ``call``'s: the whole request when
        the node refused it as a whole, else only the elements it refused (providers
        throttle a batch element by element); after the retries the error is given back."""
        if not calls:
            return []
        out: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                got = self._batch_once([calls[i] for i in todo])
            except NodeError as e:
                if not rate_limited(e) or attempt == self.retries:
                    raise
            else:
                for i, r in zip(todo, got, strict=True):
                    out[i] = r
                todo = [i for i, r in zip(todo, got, strict=True)
                        if isinstance(r, NodeError) and rate_limited(r)]
                if not todo or attempt == self.retries:
                    return out
            delay = self._rate_limit_pause(delay)
        raise AssertionError("unreachable")

    def _batch_once(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        first = next(self._ids)
        ids = [first + i for i in range(len(calls))]
        self._ids = itertools.count(ids[-1] + 1)
        resp = self._post([
            {"jsonrpc": "2.0", "id": i, "method": m, "params": list(p)}
            for i, (m, p) in zip(ids, calls, strict=True)
        ])
        if not isinstance(resp, list):
            # Some nodes answer a whole batch with one error object (too big, rate limited).
            if isinstance(resp, dict) and resp.get("error"):
                raise error_of(resp["error"])
            raise RpcError("batch request: unexpected answer from node")
        by_id = {r.get("id"): r for r in resp if isinstance(r, dict)}
        out: list[Any] = []
        for i in ids:
            r = by_id.get(i)
            if r is None:
                out.append(RpcError("batch request: node left out an answer"))
            elif r.get("error") is not None:
                out.append(error_of(r["error"]))
            else:
                out.append(r.get("result"))
        return out


_RATE_LIMITED = ("rate limit", "too many requests", "exceeded the quota",
                 "compute units per second",  # Alchemy, code 429 in a batch element
                 "request rate exceeded")  # Infura


def rate_limited(e: NodeError) -> bool:
    """Throttled: by the code HTTP uses for it, or the providers' words (-32005, "limit
    exceeded", is also a node's answer to a log query too wide: not taken as one)."""
    low = str(e).lower()
    return e.code == 429 or any(needle in low for needle in _RATE_LIMITED)


def display_url(url: str) -> str:
    """Scheme, host and port only: providers put API keys in the path or the user part."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = parts.port
    except ValueError:  # not a number: say nothing of it
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


class _Retryable(Exception):
    pass


def _short(e: BaseException, url: str) -> str:
    """The first line of a transport error, without the parts of ``url`` that may carry
    secrets (requests quotes the path and query: "Max retries exceeded with url: /v3/KEY")."""
    from urllib.parse import quote, urlsplit

    text = (str(e) or type(e).__name__).replace(url, display_url(url))
    parts = urlsplit(url)
    for secret in (parts.path + ("?" + parts.query if parts.query else ""), parts.query,
                   parts.netloc.rpartition("@")[0], parts.path):
        if secret and secret != "/":
            # as given, and as requests quotes it ("%7B" for "{")
            for form in (secret, quote(secret, safe="/?=&:@")):
                text = text.replace(form, "…")
    # requests nests the reason deep in a long line ("HTTPConnectionPool(...): Max retries
    # exceeded ... Failed to establish a new connection: [Errno 111] Connection refused"),
    # past what a line can show: the operating system's words say it.
    reason = re.search(r"\[Errno -?\d+\] ([^'\"()\[\]]+)", text)
    if reason:
        return reason.group(1).strip().rstrip(".")
    return text.splitlines()[0][:200]


# --- ABI, by hand ------------------------------------------------------------------------

SEL_BALANCE_OF = "70a08231"
SEL_ALLOWANCE = "dd62ed3e"
SEL_APPROVE = "095ea7b3"
SEL_TRANSFER = "a9059cbb"
SEL_DECIMALS = "313ce567"
SEL_SYMBOL = "95d89b41"
SEL_PAUSED = "5c975abb"
SEL_IS_BLACKLISTED = "fe575a87"
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
# BatchPayout's Disbursed(address indexed payer, bytes32 indexed root, uint256, uint256, uint256)
DISBURSED_TOPIC = "0xa0dfb0083a1f7dfb82eb0b4f2d90bc10b8c9a17b118ca412283751d50f9a1b03"
ERROR_STRING = bytes.fromhex("08c379a0")  # Error(string)
# OpenZeppelin 5's ERC20InsufficientBalance/Allowance(address, uint256 have, uint256 needed)
OZ_SHORTFALLS = {bytes.fromhex("e450d38c"): ("ERC20InsufficientBalance", "exceeds balance"),
                 bytes.fromhex("fb8f41b2"): ("ERC20InsufficientAllowance", "exceeds allowance")}


def selector(signature: str) -> str:
    from eth_hash.auto import keccak

    return keccak(signature.encode()).hex()[:8]


SEL_DISBURSE = selector("disburse(address,bytes32,uint256[],address[],uint256[])")
SEL_PAID_WORD = selector("paidWord(address,address,bytes32,uint256)")
TRANSFER_FAILED = bytes.fromhex(selector("TransferFailed(uint256,bytes)"))


def w_uint(n: int) -> str:
    return format(n, "064x")


def w_addr(a: str) -> str:
    return a[2:].lower().rjust(64, "0")


def enc_transfer(to: str, amount: int) -> str:
    return "0x" + SEL_TRANSFER + w_addr(to) + w_uint(amount)


def enc_approve(spender: str, amount: int) -> str:
    return "0x" + SEL_APPROVE + w_addr(spender) + w_uint(amount)


def enc_disburse(token: str, root: str, idxs: Sequence[int], tos: Sequence[str],
                 amounts: Sequence[int]) -> str:
    n = len(idxs)
    head_words = 5
    off1 = head_words * 32
    off2 = off1 + 32 * (1 + n)
    off3 = off2 + 32 * (1 + n)
    parts = [SEL_DISBURSE, w_addr(token), root[2:].rjust(64, "0"), w_uint(off1), w_uint(off2),
             w_uint(off3), w_uint(n)]
    parts.extend(format(i, "064x") for i in idxs)
    parts.append(w_uint(n))
    parts.extend(t[2:].lower().rjust(64, "0") for t in tos)
    parts.append(w_uint(n))
    parts.extend(format(a, "064x") for a in amounts)
    return "0x" + "".join(parts)


def decode_revert(data: bytes) -> tuple[int | None, str]:
    """(payment index or None, human reason) from revert data of the token or BatchPayout."""
    if data[:4] == TRANSFER_FAILED and len(data) >= 4 + 64:
        index = int.from_bytes(data[4:36], "big")
        off = int.from_bytes(data[36:68], "big")
        ln = int.from_bytes(data[4 + off:4 + off + 32], "big")
        inner = data[4 + off + 32:4 + off + 32 + ln]
        return index, decode_revert(inner)[1]
    if data[:4] == ERROR_STRING and len(data) >= 4 + 64:
        ln = int.from_bytes(data[36:68], "big")
        return None, data[68:68 + ln].decode("utf-8", "replace")
    if data[:4] in OZ_SHORTFALLS and len(data) >= 4 + 96:
        # OpenZeppelin 5's custom errors say in words what its older tokens said in text,
        # so that a payer-wide shortfall is known as one (not blamed on each recipient).
        name, what = OZ_SHORTFALLS[data[:4]]
        have, need = (int.from_bytes(data[36 + 32 * k:68 + 32 * k], "big") for k in (0, 1))
        return None, f"{name}: transfer amount {what} ({have} of {need} base units)"
    if not data:
        return None, "reverted without a reason"
    if len(data) == 32:
        return None, "token returned false"
    return None, "reverted with data 0x" + data.hex()[:80]


METER_REQUEST_BYTES = 1_000_000


def _meter_code() -> str:
    from disburser.artifacts import load_artifact  # cached there

    return str(load_artifact("GasMeter")["deployedBytecode"])


def _enc_meter(to: str, data: str) -> str:
    """GasMeter's input: abi.encode(address to, bytes data)."""
    body = data[2:]
    n = len(body) // 2
    return ("0x" + w_addr(to) + w_uint(64) + w_uint(n) + body
            + "0" * ((-len(body)) % 64))


def _dec_meter(result: Any, data: str) -> tuple[bool, int, bytes] | None:
    """GasMeter's answer abi.encode(bool ok, uint256 used, bytes returned) -> (ok, gas the
    transaction would use before refunds, returned); None when it is not such an answer (a
    node that ignored the override answers 0x for a call to an account without code)."""
    try:
        b = bytes.fromhex(str(result)[2:])
    except ValueError:
        return None
    if len(b) < 128 or int.from_bytes(b[64:96], "big") != 96:
        return None
    ln = int.from_bytes(b[96:128], "big")
    if len(b) < 128 + ln or b[:31] != bytes(31) or b[31] > 1:
        return None
    used = int.from_bytes(b[32:64], "big")
    return b[31] == 1, tx_gas(data, used), b[128:128 + ln]


def tx_gas(data: str, execution: int) -> int:
    """Gas of a transaction with calldata ``data`` whose call uses ``execution``: 21,000 plus
    4 per zero byte and 16 per other byte plus the execution, or EIP-7623's calldata floor
    (21,000 + 10 per token, a nonzero byte being 4 tokens) when that is more."""
    b = bytes.fromhex(data[2:])
    zeros = b.count(0)
    nonzero = len(b) - zeros
    return max(21_000 + 4 * zeros + 16 * nonzero + execution,
               21_000 + 10 * (zeros + 4 * nonzero))


# --- the chain client ------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    block_number: int
    block_hash: str
    status: int
    gas_used: int
    effective_gas_price: int


@dataclass(frozen=True)
class Head:
    number: int
    hash: str
    base_fee: int
    gas_limit: int
    timestamp: int
    gas_used: int | None = None  # None: not known (the next base fee is taken as this one)


class ChainClient(Protocol):
    def chain_id(self) -> int: ...
    def head(self) -> Head: ...
    def block_hash(self, number: int) -> str | None: ...
    def nonce(self, address: str, block: str = "latest") -> int: ...
    def eth_balance(self, address: str) -> int: ...
    def call(self, to: str, data: str, sender: str | None = None) -> bytes: ...
    def estimate_gas(self, sender: str, to: str, data: str) -> int: ...
    def send_raw(self, raw: str) -> str: ...
    def receipts(self, hashes: Sequence[str]) -> dict[str, Receipt | None]: ...
    def known(self, hashes: Sequence[str]) -> dict[str, bool]: ...


class RpcChain:
    """ChainClient over JSON-RPC."""

    def __init__(self, url: str, transport: Transport | None = None) -> None:
        self.url = url
        self.t = transport or Transport(url)

    def own_connections(self) -> bool:
        """Whether other threads may have connections of their own (``for_thread``): not
        through a transport that is not a plain Transport (a scripted or fault-injecting
        one in tests), whose requests must not be bypassed."""
        return type(self.t) is Transport

    def for_thread(self) -> RpcChain | None:
        """A client of the same node for another thread (its own connection); None where
        ``own_connections`` says no."""
        if not self.own_connections():
            return None
        return type(self)(self.url, self.t.clone())

    def close(self) -> None:
        self.t.close()

    def chain_id(self) -> int:
        return int(self.t.call("eth_chainId"), 16)

    def head(self) -> Head:
        b = self.t.call("eth_getBlockByNumber", ["latest", False])
        used = b.get("gasUsed")
        return Head(int(b["number"], 16), b["hash"], int(b.get("baseFeePerGas") or "0x0", 16),
                    int(b["gasLimit"], 16), int(b["timestamp"], 16),
                    int(used, 16) if used else None)

    def block_hash(self, number: int) -> str | None:
        b = self.t.call("eth_getBlockByNumber", [hex(number), False])
        return None if b is None else str(b["hash"])

    def block_hashes(self, numbers: Sequence[int]) -> dict[int, str | None]:
        """The canonical hash at each block number (each distinct number asked once: a poll
        may hold hundreds of transfers mined in the same block)."""
        numbers = sorted(set(numbers))
        res = self.t.batch([("eth_getBlockByNumber", [hex(n), False]) for n in numbers])
        out: dict[int, str | None] = {}
        for n, b in zip(numbers, res, strict=True):
            if isinstance(b, Exception):
                raise b
            out[n] = None if b is None else str(b["hash"])
        return out

    def nonce(self, address: str, block: str = "latest") -> int:
        return int(self.t.call("eth_getTransactionCount", [address, block]), 16)

    def eth_balance(self, address: str) -> int:
        return int(self.t.call("eth_getBalance", [address, "latest"]), 16)

    def call(self, to: str, data: str, sender: str | None = None) -> bytes:
        tx: dict[str, str] = {"to": to, "data": data}
        if sender:
            tx["from"] = sender
        out = self.t.call("eth_call", [tx, "latest"])
        return bytes.fromhex(str(out)[2:])

    def call_uint(self, to: str, data: str) -> int:
        out = self.call(to, data)
        if len(out) < 32:
            raise ChainMismatchError(f"contract {to} gave no answer to call 0x{data[2:10]}")
        return int.from_bytes(out[:32], "big")

    def estimate_gas(self, sender: str, to: str, data: str) -> int:
        return int(self.t.call("eth_estimateGas", [{"from": sender, "to": to, "data": data}]),
                   16)

    def simulate(self, sender: str, to: str, data: str) -> tuple[bool, int, bytes]:
        """One run of a call against the latest state (eth_simulateV1): (succeeded, gas
        used, return or revert data). NodeError when the node lacks the method."""
        return self.simulate_many(sender, to, [data])[0]

    def simulate_many(self, sender: str, to: str, datas: Sequence[str]
                      ) -> list[tuple[bool, int, bytes]]:
        """Calls run one after the other in one simulated block (each sees the state the
        previous left, as the transactions will), in one request."""
        res = self.t.call("eth_simulateV1", [
            {"blockStateCalls": [{"calls": [{"from": sender, "to": to, "data": d}
                                            for d in datas]}]},
            "latest"])
        out = []
        for call in res[0]["calls"]:
            ok = int(call["status"], 16) == 1
            ret = bytes.fromhex(str(call.get("returnData") or "0x")[2:])
            if not ok and not ret:
                # geth leaves returnData empty for a failed call and puts the revert data in
                # error.data (Anvil uses returnData).
                ret = _revert_bytes(call.get("error"))
            out.append((ok, int(call["gasUsed"], 16), ret))
        return out

    def measure_many(self, sender: str, to: str, datas: Sequence[str]
                     ) -> list[tuple[bool, int, bytes] | None]:
        """Each call run on its own against the latest state, as ``sender``'s transaction
        would run it: GasMeter's code is put at ``sender`` for the call (an eth_call state
        override) and calls ``to``. Per call: (succeeded, gas the transaction would use
        before refunds, return or revert data), or None where the node gave no usable
        answer (no state overrides, an error): the caller simulates that one another way.
        The calls go in JSON-RPC batches of at most ~1 MB (Anvil refuses requests over 2 MB).
        One execution each and a 100-byte answer: eth_simulateV1 answers with every log of
        a batch (~300 kB for 500 transfers) and eth_estimateGas runs the call a dozen times.
        """
        override = {sender: {"code": _meter_code()}}
        calls = [("eth_call", [{"to": sender, "data": _enc_meter(to, d)}, "latest", override])
                 for d in datas]
        out: list[tuple[bool, int, bytes] | None] = []
        i = 0
        while i < len(calls):
            j, size = i, 0
            while j < len(calls) and (j == i or size + len(datas[j]) < METER_REQUEST_BYTES):
                size += len(datas[j])
                j += 1
            for data, res in zip(datas[i:j], self.t.batch(calls[i:j]), strict=True):
                out.append(None if isinstance(res, Exception) else _dec_meter(res, data))
            i = j
        return out

    def estimate_gas_create(self, sender: str, code: str) -> int:
        return int(self.t.call("eth_estimateGas", [{"from": sender, "data": code}]), 16)

    def send_raw(self, raw: str) -> str:
        return str(self.t.call("eth_sendRawTransaction", [raw]))

    def mines_on_arrival(self) -> bool:
        """Whether the node builds a block as soon as a transaction arrives (Anvil's
        automine, asked with ``anvil_getAutomine``). Any other node, one that knows no such
        method included, is taken to mine on a clock."""
        try:
            return self.t.call("anvil_getAutomine") is True
        except DisburserError:
            return False

    def send_raw_many(self, raws: Sequence[str]) -> list[Any]:
        return self.t.batch([("eth_sendRawTransaction", [r]) for r in raws])

    def receipts(self, hashes: Sequence[str]) -> dict[str, Receipt | None]:
        out: dict[str, Receipt | None] = {}
        for i in range(0, len(hashes), 200):
            chunk = hashes[i:i + 200]
            res = self.t.batch([("eth_getTransactionReceipt", [h]) for h in chunk])
            for h, r in zip(chunk, res, strict=True):
                if isinstance(r, Exception):
                    raise r
                out[h] = None if r is None else Receipt(
                    h, int(r["blockNumber"], 16), r["blockHash"], int(r["status"], 16),
                    int(r["gasUsed"], 16), int(r.get("effectiveGasPrice") or "0x0", 16))
        return out

    def known(self, hashes: Sequence[str]) -> dict[str, bool]:
        """Whether the node knows each transaction (pending in its pool or mined)."""
        out: dict[str, bool] = {}
        for i in range(0, len(hashes), 200):
            chunk = hashes[i:i + 200]
            res = self.t.batch([("eth_getTransactionByHash", [h]) for h in chunk])
            for h, r in zip(chunk, res, strict=True):
                if isinstance(r, Exception):
                    raise r
                out[h] = r is not None
        return out

    def find_tx_by_nonce(self, sender: str, nonce: int, max_blocks: int = 2000) -> str | None:
        """The hash of ``sender``'s mined transaction with ``nonce`` (scanning back from the
        head), to name it in a fail-closed message."""
        return self.locate_nonce(sender, nonce, max_blocks)[1]

    def locate_nonce(self, sender: str, nonce: int, max_blocks: int = 2000
                     ) -> tuple[bool, str | None]:
        """(whether the head block the node serves has ``sender``'s ``nonce`` used, the hash
        of the transaction that used it). (False, None): no block served yet holds it;
        (True, None): used, but more than ``max_blocks`` blocks ago."""
        head = self.head().number
        lo, hi = max(0, head - max_blocks), head
        # The nonce at a block tells which block included it: binary search.
        if self.nonce_at(sender, hi) <= nonce:
            return False, None
        while lo < hi:
            mid = (lo + hi) // 2
            if self.nonce_at(sender, mid) > nonce:
                hi = mid
            else:
                lo = mid + 1
        b = self.t.call("eth_getBlockByNumber", [hex(lo), True])
        for tx in (b or {}).get("transactions", []):
            if str(tx.get("from", "")).lower() == sender.lower() and int(tx["nonce"], 16) == nonce:
                return True, str(tx["hash"])
        return True, None

    def find_pending_tx(self, sender: str, nonce: int) -> str | None:
        """The hash of ``sender``'s transaction with ``nonce`` in the node's pool, to name it
        in a fail-closed message. Best effort: ``txpool_contentFrom`` (geth) keeps the
        answer small on a busy node; ``txpool_content`` (Anvil, Erigon) otherwise."""
        for method, params in (("txpool_contentFrom", [sender]), ("txpool_content", [])):
            try:
                content = self.t.call(method, params)
            except (NodeError, RpcError):
                continue
            if not isinstance(content, dict):
                continue
            for part in ("pending", "queued"):
                section = content.get(part) or {}
                # contentFrom answers {nonce: tx}; content answers {sender: {nonce: tx}}.
                by_nonce = section if method == "txpool_contentFrom" else next(
                    (v for k, v in section.items() if str(k).lower() == sender.lower()), {})
                tx = (by_nonce or {}).get(str(nonce))
                if isinstance(tx, dict) and tx.get("hash"):
                    return str(tx["hash"])
        return None

    def nonce_at(self, address: str, block: int) -> int:
        return int(self.t.call("eth_getTransactionCount", [address, hex(block)]), 16)

    # token views
    def decimals(self, token: str) -> int:
        return self.call_uint(token, "0x" + SEL_DECIMALS)

    def token_balance(self, token: str, holder: str) -> int:
        return self.call_uint(token, "0x" + SEL_BALANCE_OF + w_addr(holder))

    def allowance(self, token: str, owner: str, spender: str) -> int:
        return self.call_uint(token, "0x" + SEL_ALLOWANCE + w_addr(owner) + w_addr(spender))

    def paused(self, token: str) -> bool | None:
        """None when the token has no ``paused()`` view."""
        try:
            out = self.call(token, "0x" + SEL_PAUSED)
        except NodeError:
            return None
        return bool(int.from_bytes(out[:32], "big")) if len(out) >= 32 else None

    def blacklisted(self, token: str, who: str) -> bool:
        """USDC-style ``isBlacklisted(address)``; False when the token has no such view."""
        try:
            out = self.call(token, "0x" + SEL_IS_BLACKLISTED + w_addr(who))
        except NodeError:
            return False
        return len(out) >= 32 and int.from_bytes(out[:32], "big") != 0

    def code(self, address: str) -> bytes:
        return bytes.fromhex(str(self.t.call("eth_getCode", [address, "latest"]))[2:])

    def paid_words(self, contract: str, payer: str, token: str, root: str,
                   words: Sequence[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        calls = [("eth_call", [{"to": contract, "data": "0x" + SEL_PAID_WORD + w_addr(payer)
                                + w_addr(token) + root[2:] + w_uint(w)}, "latest"])
                 for w in words]
        for i in range(0, len(calls), 200):
            res = self.t.batch(calls[i:i + 200])
            for w, r in zip(words[i:i + 200], res, strict=True):
                if isinstance(r, Exception):
                    raise r
                out[w] = int(str(r), 16)
        return out

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        return self.t.call(method, params)


def check_decimals(chain: RpcChain, token: str, expected: int, then: str) -> None:
    """Fail closed unless ``token`` has ``expected`` decimals on chain (DESIGN.md: read from
    the chain, equal to the network profile's). ``then`` ends the message: what the
    mismatch would have done where it was caught."""
    dec = chain.decimals(token)
    if dec != expected:
        raise ChainMismatchError(f"token {token} has {dec} decimals on chain, the network "
                                 f"profile expects {expected}{then}")
