"""The payer's past transfers against a manifest's queued payments: what a ledger that did not
see the payer's first transaction (a lost ledger re-created, or a payer used before) must not
pay again. Pure decisions; ``Sender._skip_paid_by_transfers`` fetches the logs, reads the
ledger, and carries them out (a refusal, or a recorded check).

The steps, in order:

1. ``keyed``: each transfer gets its identity, "tx hash:place among the payer's transfers in
   it" (block and log index change when a transaction is mined again, the place does not);
   the ledger's own transactions are left out, and transfers of 0 (anyone can make one).
2. ``set_aside``: the Disbursed logs say which manifest a transaction paid. A transaction
   that paid only other manifests this ledger knows, or this manifest through the contract
   whose bitmap the run reads, is set aside: the bitmap says exactly what it paid. A
   transaction that paid a manifest this ledger does not know is kept (its transfers may be
   these payments under another root: the same users re-sorted) and the manifest noted.
   Anyone can emit a Disbursed log naming the payer, so only a transaction with the payer's
   own transfers counts.
3. ``drop_bitmap_paid``: in a kept batch transaction of contract C, a transfer of a payment
   that C's bitmap marked paid in an earlier run is that payment's, not another's.
4. The transfers that earlier checks recorded as a payment are left out (each pays one
   payment, once): the caller filters by ``Ledger.explained_transfers``.
5. ``match``: what is left is matched to the queued payments by recipient and amount, as
   reconcile matches them, first come first served; then by recipient alone.

A match may be this fund's payment (of this amount or, for a re-signed allocation, of
another) or an unrelated transfer: the run stops and does not guess (``refusal``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import NamedTuple

from disburser.errors import FailClosed
from disburser.ledger import Queued
from disburser.transfers import Disbursed, Transfer

Keyed = tuple[Transfer, str]  # a transfer and its identity ("tx hash:place")


class Unknown(NamedTuple):
    """The first transaction in which the payer paid a manifest the ledger does not know."""

    tx_hash: str
    block: int


class Match(NamedTuple):
    payment: Queued
    transfer: Transfer
    key: str


def keyed(found: Iterable[Transfer], ours: Container[str]) -> list[Keyed]:
    """Each transfer with its identity, those of transactions in ``ours`` left out, and
    those of 0: anyone can make one "from" the payer (USDC's transferFrom of 0 needs no
    allowance), with a Disbursed log of their own beside it, and it pays no one."""
    place: dict[str, int] = {}
    out: list[Keyed] = []
    for t in found:
        k = place[t.tx_hash] = place.get(t.tx_hash, -1) + 1
        if t.amount and t.tx_hash not in ours:
            out.append((t, f"{t.tx_hash}:{k}"))
    return out


def set_aside(logs: Sequence[Keyed], disbursed: Iterable[Disbursed], root: str, *,
              trusted: str | None, known: set[str]
              ) -> tuple[list[Keyed], dict[str, str | None], dict[str, Unknown]]:
    """(the transfers kept, transaction -> the contract that paid this manifest in it where
    its bitmap is not read ("" for a transaction that paid an unknown manifest, None for
    one with no such contract), unknown manifest root -> where the payer first paid it).

    ``trusted``: the batch contract whose bitmap this run reads (already applied), if any;
    ``known``: the manifest roots in the ledger. Only transactions with a transfer in
    ``logs`` count, so the ledger's own (left out by ``keyed``) are ignored here too."""
    root = root.lower()
    kept: dict[str, str | None] = {}
    unknown: dict[str, Unknown] = {}
    paying = {t.tx_hash for t, _ in logs}
    for d in disbursed:
        if d.tx_hash not in paying:
            continue
        if d.root == root:
            if d.contract != trusted:
                kept[d.tx_hash] = d.contract
            else:
                kept.setdefault(d.tx_hash, None)
        elif d.root not in known:
            unknown.setdefault(d.root, Unknown(d.tx_hash, d.block))
            if kept.get(d.tx_hash) is None:
                kept[d.tx_hash] = ""
        else:
            kept.setdefault(d.tx_hash, None)
    # A transaction with no Disbursed log at all (a plain transfer) is kept.
    return ([(t, key) for t, key in logs if kept.get(t.tx_hash, "") is not None], kept,
            unknown)


def drop_bitmap_paid(logs: Sequence[Keyed], kept: Mapping[str, str | None], root: str,
                     marks: Mapping[int, str], paid_elsewhere: Iterable[Queued]
                     ) -> list[Keyed]:
    """``logs`` less, in each kept batch transaction of a contract C, one transfer per
    payment that C's bitmap marked paid in an earlier run (``marks``: index -> contract, ""
    when an older ledger did not name it; ``paid_elsewhere``: this manifest's payments
    recorded paid elsewhere). Raises FailClosed when a mark without its contract meets a
    batch transaction that pays the same recipient and amount: which contract's bitmap
    made it cannot be told."""
    if not marks:
        return list(logs)
    by_bitmap = Counter((marks[p.idx], p.to.lower(), int(p.amount))
                        for p in paid_elsewhere if p.idx in marks)
    rest: list[Keyed] = []
    for t, key in logs:
        contract = kept.get(t.tx_hash)
        mark = (contract or "", t.to, t.amount)
        if contract and by_bitmap[mark] > 0:
            by_bitmap[mark] -= 1
            continue
        if contract and by_bitmap[("", t.to, t.amount)] > 0:
            raise FailClosed(
                f"manifest {root}: payments were marked paid by a batch contract's bitmap "
                f"in an earlier run, and transaction {t.tx_hash} of contract {contract} pays "
                "the same recipient and amount; set DISBURSER_BATCH_CONTRACT to that "
                "contract so that its bitmap is read. Nothing was sent")
        rest.append((t, key))
    return rest


def match(logs: Iterable[Keyed], queued: Iterable[Queued]) -> list[Match]:
    """Queued payments matched to transfers: first of the same recipient and amount, then,
    for the payments left, of the same recipient whatever the amount (a corrected allocation
    signed after a lost ledger, its amounts changed by a base unit, paid everyone again), each
    transfer to one payment, in the order given (payments by index, transfers by block)."""
    logs = list(logs)
    by_key: dict[tuple[str, int], list[Keyed]] = {}
    for t, key in logs:
        by_key.setdefault((t.to, t.amount), []).append((t, key))
    out: list[Match] = []
    if not by_key:
        return out
    used: set[str] = set()
    rest: list[Queued] = []
    for q in queued:
        left = by_key.get((q.to.lower(), int(q.amount)))
        if left:
            t, key = left.pop(0)
            used.add(key)
            out.append(Match(q, t, key))
        else:
            rest.append(q)
    by_to: dict[str, list[Keyed]] = {}
    for t, key in logs:
        if key not in used:
            by_to.setdefault(t.to, []).append((t, key))
    for q in rest:
        left = by_to.get(q.to.lower())
        if left:
            out.append(Match(q, *left.pop(0)))
    return sorted(out, key=lambda m: m.payment.idx)


def listing(matched: Sequence[Match], unknown_roots: Sequence[str]) -> list[str]:
    """What a refusal lists and ``--accept-past-transfers`` accepts: the matched transfers'
    identities and the unknown manifests."""
    return [m.key for m in matched] + [f"manifest:{r}" for r in unknown_roots]


def refusal(root: str, matched: Sequence[Match], unknown_roots: Sequence[str],
            unknown: Mapping[str, Unknown]) -> str:
    """The one line a stopped run prints (the details are in the log)."""
    msg = []
    if unknown_roots:
        other = unknown_roots[0]
        msg.append(
            f"the payer paid {len(unknown_roots)} manifest(s) that this ledger does not know "
            f"(first: {other}, in transaction {unknown[other].tx_hash} in block "
            f"{unknown[other].block}; all in the log as payer_paid_unknown_manifest): they "
            "may hold this program's users and count against its ceiling, which only a "
            "ledger that knows them checks. If they are this fund's, send each of them with "
            "this ledger (their contract's paid bitmap makes that pay nothing already paid; "
            "approvers re-sign an expired one with a later not_after), then manifest "
            f"{root} again; if they are not, run `send --accept-past-transfers` or set "
            "DISBURSER_FROM_BLOCK after them.")
    if matched:
        q, t, _ = matched[0]
        paid = "" if t.amount == int(q.amount) else f" {t.amount} base units"
        msg.append(
            f"{len(matched)} payment(s) of manifest {root} go to recipients of transfers from "
            f"the payer that this ledger did not send (first: payments[{q.idx}] {q.amount} "
            f"base units to {q.to}, paid{paid} by transaction {t.tx_hash} in block {t.block}; "
            "all in the log as past_transfer_matches_payment). If this fund paid them (a lost "
            "ledger; a corrected amount is then a top-up to pay by a manifest of its own), run "
            "`send --accept-past-transfers` to record them as paid elsewhere; if those "
            "transfers were for something else, set DISBURSER_FROM_BLOCK after them and "
            "before the fund's first payment.")
    return " Also: ".join(msg) + " Nothing was sent"
