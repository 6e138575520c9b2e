"""The token's Transfer logs from given payers, fetched and decoded by hand.

``reconcile`` settles payments from them; ``send`` reads them (and the batch contracts'
Disbursed logs) when its ledger did not see the payer's first transaction (a lost or new
ledger), so that what was paid before the ledger existed is not paid again
(``Sender._skip_paid_by_transfers``).

``fetch_transfers(...)``: ``eth_getLogs`` in block chunks that halve when the node says the
range or the answer is too big and grow back on success, over a few ranges fetched at once;
logs decoded by hand (web3's event decoder is ~250x slower, FIELD-NOTES "Speed").
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from threading import Event, local
from typing import Any, NamedTuple, Protocol

from disburser.errors import DisburserError, RpcError


class Transfer(NamedTuple):
    """One decoded Transfer log. A tuple: 100,000 of them must stay cheap."""

    block: int
    log_index: int
    tx_hash: str  # lower-case 0x hex
    sender: str  # lower-case 0x address (topic 1)
    to: str  # lower-case 0x address (topic 2)
    amount: int  # base units


@contextmanager
def bulk() -> Iterator[None]:
    """No cyclic garbage collection while building 100,000s of small containers that are
    all kept: the collector's repeated scans would double the time (measured)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class RpcLike(Protocol):
    def rpc(self, method: str, params: Sequence[Any] = ...) -> Any: ...


# What nodes and providers say when an eth_getLogs range or answer is too big: Infura
# ("query returned more than 10000 results", -32005), Alchemy ("Log response size exceeded",
# "block range"), QuickNode ("is limited to a 10,000 range"), Erigon ("exceed maximum block
# range"), Besu ("exceeds maximum range limit"), Ankr ("block range is too wide"),
# Cloudflare/Chainstack ("block range too large", "limit exceeded"), others ("too many
# results", "response is too big", "max results").
_TOO_MUCH = (
    "query returned more than", "more than 10000", "too many", "limit exceeded",
    "limit exceed", "range too large", "range is too large", "too large", "too wide",
    "too big", "response size", "max results", "maximum block range", "max block range",
    "exceeds maximum", "exceed maximum", "exceeds max", "is limited to", "block range",
    "-32005", "query timeout", "timed out",
)
MAX_CHUNK = 100_000
# eth_getLogs requests in flight at once (``fetch_transfers``), few enough for a hosted
# provider's rate limits, over 4 block ranges each: smaller answers come back sooner and
# are decoded while the node serialises the others. 100,000 logs (~63 MB of JSON) from a
# local Anvil on 2 cores: ~1.2 s in one request, ~0.8 s in 4, ~0.5 s in 16 (measured).
FETCH_WORKERS = 4
_RANGES_PER_WORKER = 4
# After a refusal, growth stays below the refused size for this many chunks, then probes.
_PROBE_AFTER = 16


def too_much(e: BaseException) -> bool:
    """Whether a node error means "ask for fewer blocks"."""
    code = getattr(e, "code", None)
    if code == -32005:
        return True
    low = str(e).lower()
    return any(s in low for s in _TOO_MUCH) or "http 413" in low


def decode_logs(raw: Iterable[Mapping[str, Any]], out: list[Transfer]) -> None:
    """Append the ERC-20 Transfer logs of an eth_getLogs answer to ``out``, by hand.
    Logs flagged ``removed`` (reorganised away) and ERC-721 shaped ones are skipped."""
    with bulk():
        _decode(raw, out.append)


def _decode(raw: Iterable[Mapping[str, Any]], append: Callable[[Transfer], None]) -> int:
    """Decode into ``append``; returns how many Transfers were appended. Tuned: it runs once
    a log (the topic compared before lower-casing it; the tuple built without the named
    tuple's Python-level ``__new__``)."""
    from disburser.chain import TRANSFER_TOPIC

    new = tuple.__new__
    n = 0
    for lg in raw:
        if lg.get("removed"):
            continue
        topics: Sequence[Any] = lg.get("topics") or []
        data: str = lg.get("data") or "0x"
        if len(topics) != 3 or len(data) < 3:
            continue
        t0 = str(topics[0])
        if t0 != TRANSFER_TOPIC and t0.lower() != TRANSFER_TOPIC:
            continue
        append(new(Transfer, (
            int(lg["blockNumber"], 16), int(lg["logIndex"], 16),
            str(lg["transactionHash"]).lower(), "0x" + str(topics[1])[-40:].lower(),
            "0x" + str(topics[2])[-40:].lower(), int(data, 16),
        )))
        n += 1
    return n


def fetch_transfers(chain: RpcLike, token: str, payers: Sequence[str], start: int, end: int,
                    *, chunk: int = MAX_CHUNK, max_chunk: int = MAX_CHUNK,
                    on_chunk: Callable[[int, int, int], None] | None = None,
                    workers: int = 1,
                    connect: Callable[[], RpcLike] | None = None) -> list[Transfer]:
    """Every Transfer log of ``token`` from ``payers`` in blocks ``start..end``, in block
    order.

    Chunks halve when the node refuses a range as too large (see ``too_much``) and double
    after each success up to ``max_chunk``; after a refusal they stay below the refused
    size for a while instead of bouncing off the limit every other request.

    With ``workers`` > 1 the blocks are split into equal ranges (``_RANGES_PER_WORKER``
    per worker), each fetched as above, by ``workers`` threads with a client each
    (``connect()``, closed at the end if it has ``close``; without ``connect`` they share
    ``chain``, which must then be safe to call from several threads): the node serialises
    some answers while others are decoded here (100,000 logs are ~63 MB of JSON).
    ``on_chunk`` is then called from those threads. When a range fails the others stop at
    their next chunk and the error is raised (the earliest range's, if several).
    """
    out: list[Transfer] = []
    if not payers or start > end:
        return out
    padded = ["0x" + "0" * 24 + p[2:].lower() for p in payers]
    topics: list[Any] = [_transfer_topic(), padded[0] if len(padded) == 1 else padded]
    n = max(1, min(workers, end - start + 1))
    # No cyclic GC while ~1.3 million JSON values per 100,000 logs are built: its scans
    # of the growing heap doubled the time of json.loads (measured).
    with bulk():
        if n == 1:
            _fetch_range(chain, token, topics, start, end, chunk, max_chunk, on_chunk,
                         out.append, None)
            return out
        from concurrent.futures import ThreadPoolExecutor

        ranges = min(end - start + 1, n * _RANGES_PER_WORKER)
        edges = [start + (end - start + 1) * k // ranges for k in range(ranges + 1)]
        parts: list[list[Transfer]] = [[] for _ in range(ranges)]
        stop = Event()
        mine = local()  # each thread's client
        made: list[RpcLike] = []  # clients connect() made, closed at the end

        def work(k: int) -> None:
            if stop.is_set():
                return
            client: RpcLike | None = getattr(mine, "client", None)
            if client is None:
                client = mine.client = connect() if connect is not None else chain
                if client is not chain:
                    made.append(client)
            try:
                _fetch_range(client, token, topics, edges[k], edges[k + 1] - 1, chunk,
                             max_chunk, on_chunk, parts[k].append, stop)
            except BaseException:
                stop.set()
                raise

        try:
            with ThreadPoolExecutor(n, thread_name_prefix="getlogs") as ex:
                futures = [ex.submit(work, k) for k in range(ranges)]
                try:
                    for f in futures:
                        f.result()
                except BaseException:  # Ctrl-C too: the others stop at their next chunk
                    stop.set()
                    raise
        finally:
            for c in made:
                close = getattr(c, "close", None)
                if close is not None:
                    close()
        for part in parts:
            out.extend(part)
    return out


class Disbursed(NamedTuple):
    """One Disbursed log of a BatchPayout-shaped contract: which contract paid for which
    manifest in which transaction."""

    tx_hash: str  # lower-case 0x hex
    contract: str  # lower-case 0x address
    root: str  # lower-case 0x hex (topic 2)
    block: int


def fetch_disbursed(chain: RpcLike, topic: str, payer: str, start: int,
                    end: int) -> list[Disbursed]:
    """Every log with topics [``topic``, ``payer``, root] in blocks ``start..end``, from any
    contract (an event anyone may emit: the caller decides which contracts it trusts), in
    chunks as ``fetch_transfers`` reads them."""
    out: list[Disbursed] = []

    def decode(raw: Iterable[Mapping[str, Any]], append: Callable[[Any], None]) -> int:
        n = 0
        for lg in raw:
            topics: Sequence[Any] = lg.get("topics") or []
            if lg.get("removed") or len(topics) < 3:
                continue
            append(Disbursed(str(lg["transactionHash"]).lower(), str(lg["address"]).lower(),
                             str(topics[2]).lower(), int(lg["blockNumber"], 16)))
            n += 1
        return n

    if start <= end:
        _fetch_range(chain, None, [topic, "0x" + "0" * 24 + payer[2:].lower()], start, end,
                     MAX_CHUNK, MAX_CHUNK, None, out.append, None, decode=decode)
    return out


def _fetch_range(chain: RpcLike, token: str | None, topics: list[Any], start: int, end: int,
                 chunk: int, max_chunk: int, on_chunk: Callable[[int, int, int], None] | None,
                 append: Callable[[Any], None], stop: Event | None, *,
                 decode: Callable[[Iterable[Mapping[str, Any]], Callable[[Any], None]], int]
                 | None = None) -> None:
    """``fetch_transfers`` for one range of blocks, chunk by chunk; ``stop`` (an Event, or
    None) ends it early when another range failed. ``decode`` (default: Transfer logs)
    appends what it takes from an answer and says how many."""
    decode = decode or _decode
    size = max(1, min(chunk, max_chunk))
    limit = max_chunk
    streak = 0
    lo = start
    while lo <= end:
        if stop is not None and stop.is_set():
            return
        hi = min(end, lo + size - 1)
        try:
            query: dict[str, Any] = {"topics": topics, "fromBlock": hex(lo), "toBlock": hex(hi)}
            if token is not None:
                query["address"] = token
            raw = chain.rpc("eth_getLogs", [query])
        except DisburserError as e:
            if not too_much(e):
                raise
            if hi == lo:
                raise RpcError(f"eth_getLogs for {token or 'any contract'} refuses even the single "
                               f"block {lo}: {e}") from None
            size = max(1, (hi - lo + 1) // 2)
            limit = size
            streak = 0
            continue
        if not isinstance(raw, list):
            raise RpcError(f"eth_getLogs for blocks {lo}..{hi}: unexpected answer from node")
        got = decode(raw, append)
        del raw  # the answer's dicts go now, not when the next one replaces them
        if on_chunk is not None:
            on_chunk(lo, hi, got)
        lo = hi + 1
        streak += 1
        if streak >= _PROBE_AFTER:
            limit, streak = max_chunk, 0
        size = min(size * 2, limit, max_chunk)


def _transfer_topic() -> str:
    from disburser.chain import TRANSFER_TOPIC

    return TRANSFER_TOPIC
