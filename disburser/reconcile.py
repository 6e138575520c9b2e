"""Reconcile: the token's Transfer logs from the payer against the manifests and ceilings.

The chain is the truth (DESIGN invariant 7). Payments are settled from Transfer logs alone;
the ledger, when there is one, only adds attribution (which transaction carried which
payment, why a payment failed, when a program started and its deadline) and is itself
checked against the chain (``ledger_disagrees``).

Three layers, so that tests can drive each:

- ``reconcile(...)``: pure. Manifests, decoded transfers, what the ledger says, ceilings,
  depth and head in; a ``Result`` out. No I/O.
- ``transfers.fetch_transfers(...)``: ``eth_getLogs`` in block chunks, decoded by hand.
- ``run_reconcile(...)``: settings -> manifests (ledger and files) -> logs -> result ->
  report text and exit code. The CLI's ``reconcile`` command calls it. The ledger's
  manifests are its signed documents with the payments of its payment rows, which must
  match them (``ledger_manifests``).

Matching. Transfers and payments are grouped by (payer, recipient). Within a group, logs
are given to payments (1) by ledger attribution: a log of exactly the payment's amount in
a transaction the ledger signed for it; (2) by exact amount, in manifest order and chain
order; (3) what is left: a log whose amount equals one of the group's payments is a
repeat of it (``paid_twice``); any other log goes to the first payment not yet paid in
full (``underpaid`` / ``paid`` when parts add up / ``overpaid``), or to the first payment
of the group when all are paid (``overpaid``). A log to an address that no manifest pays
is an ``unexplained_outflow``. A payment whose logs are all deep enough is ``paid``; one
whose full amount arrived in a block shallower than the configured confirmations is
``pending`` (depth = head - block + 1, as in ``policy.is_deep``).

Scope. Transfers are always matched against every manifest known (ledger and files), so
that another program's payments never show up as unexplained outflows. ``--program P``
then reports only P's payments, figures and findings, plus the payer-level
``unexplained_outflow`` findings of P's payers, which no program explains and which
therefore concern every program paid from that payer (not those of a payer that pays only
other programs).

Several programs and no ``--program``: the top-level ``program`` is ``"*"``, ``ceiling``
is the sum of the programs' ceilings and ``committed``/``paid_total``/``remaining``/
``counts`` add up all programs; each program's own figures, against its own ceiling
(``Ceilings.for_program``), are in ``programs``, and ``over_ceiling`` is judged per
program. With one program in scope, the top level is that program.

Exit code: 0 when every payment in scope is ``paid`` and there is no finding; 1 otherwise.
"""

from __future__ import annotations

import enum
import json
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby, starmap
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from disburser.amounts import format_units
from disburser.domain import Manifest
from disburser.errors import ChainMismatchError, InputError
from disburser.settings import redact_url
from disburser.transfers import FETCH_WORKERS, Transfer, bulk, fetch_transfers

if TYPE_CHECKING:
    from disburser.chain import RpcChain
    from disburser.ledger import Ledger, ManifestRow
    from disburser.settings import Ceilings, Settings

FORMATS = ("table", "json", "csv", "html")
RESULT_FORMAT = "disburser.reconcile/1"


class Status(enum.StrEnum):
    """What the chain shows for one manifest payment."""

    # Transfers of exactly the amount (one, or parts adding up), every one deep enough.
    PAID = "paid"
    # The full amount arrived, but in a block shallower than the configured confirmations:
    # becomes ``paid`` as blocks are added (or ``unpaid`` if that block is reorganised away).
    PENDING = "pending"
    # No transfer to the recipient explains it; the ledger does not say it failed.
    UNPAID = "unpaid"
    # No transfer, and the ledger says the token refused it (``reason``): needs an operator.
    FAILED = "failed"
    # Transfers to the recipient add up to less than the amount.
    UNDERPAID = "underpaid"
    # Transfers to the recipient add up to more than the amount (not whole repeats).
    OVERPAID = "overpaid"
    # The exact amount was transferred two or more times.
    PAID_TWICE = "paid_twice"


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)


class Kind(enum.StrEnum):
    """Kinds of findings (discrepancies). Each one makes the exit code 1."""

    UNPAID = "unpaid"
    FAILED = "failed"
    UNDERPAID = "underpaid"
    OVERPAID = "overpaid"
    PAID_TWICE = "paid_twice"
    PENDING = "pending"
    # A Transfer from the payer that no manifest payment explains.
    UNEXPLAINED_OUTFLOW = "unexplained_outflow"
    # A program's paid total is above its ceiling (invariant 2 broken on chain).
    OVER_CEILING = "over_ceiling"
    # A program's manifests add up to more than its ceiling (files never accepted, or the
    # ceiling was lowered since).
    COMMITTED_OVER_CEILING = "committed_over_ceiling"
    # The ledger says confirmed but the chain shows no transfer, or the ledger says
    # queued/failed but the chain shows one, or another transaction than the ledger's.
    LEDGER_DISAGREES = "ledger_disagrees"
    # One user id in two manifests (two roots) of one program: a user is paid once per
    # program, and the ledger refuses such a manifest; files (or a lost ledger) may not.
    DUPLICATE_ID = "duplicate_id"


# Ledger payment statuses (domain.PaymentStatus values) that claim the money went out, and
# those that claim it did not. ``in_flight`` claims neither: its transaction may be mined.
_LEDGER_SAYS_PAID = frozenset({"confirmed", "paid_elsewhere"})
_LEDGER_SAYS_NOT_SENT = frozenset({"queued", "failed"})


# --- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestIn:
    """A manifest in scope, with who signed it and where it came from."""

    manifest: Manifest
    signers: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


class LedgerPayment(NamedTuple):
    """What the ledger says about one payment. A tuple: there may be 100,000 of them."""

    status: str  # domain.PaymentStatus value
    reason: str | None
    tx_hashes: tuple[str, ...]  # lower-case hashes of every signed attempt of its transaction
    mined_hash: str | None  # the attempt the ledger saw mined


@dataclass(frozen=True)
class ProgramInfo:
    started_at: int  # unix seconds
    deadline: int  # unix seconds
    first_block: int | None
    ceiling: int | None = None  # as recorded at the latest acceptance (older ledgers: first)
    committed: int = 0  # what the ledger accepted for the program (its manifests' totals)


@dataclass(frozen=True)
class GasPoint:
    """Gas of one payout transaction (a batch, or a direct transfer)."""

    tx_hash: str
    block: int
    gas_used: int
    recipients: int
    root: str | None = None


@dataclass(frozen=True)
class LedgerInfo:
    payments: Mapping[tuple[str, int], LedgerPayment] = field(default_factory=dict)
    programs: Mapping[str, ProgramInfo] = field(default_factory=dict)
    gas: tuple[GasPoint, ...] = ()


# --- the result --------------------------------------------------------------------------


class PaymentResult(NamedTuple):
    """One payment as the chain shows it. A tuple: there may be 100,000 of them."""

    manifest: str  # paymentsRoot
    program: str
    idx: int  # index in the manifest ("index" in reports)
    id: str
    to: str  # EIP-55, as in the manifest
    amount: int
    paid: int
    status: str
    tx_hashes: tuple[str, ...]
    reason: str | None = None


@dataclass(frozen=True)
class Progress:
    """Progress of a program (or of all in scope) against its deadline."""

    payments_total: int
    payments_done: int  # the full amount arrived: paid, pending, overpaid, paid_twice
    payments_left: int  # still to pay: unpaid and underpaid
    payments_failed: int  # refused by the token: need an operator, not counted as left
    amount_done: int  # sum of min(paid, amount)
    amount_total: int  # sum of the manifests' amounts
    started_at: int | None
    deadline: int | None
    now: int | None  # the head block's timestamp
    payments_per_hour: int | None  # average since started_at
    amount_per_hour: int | None
    projected_finish: int | None  # unix seconds, at the average rate
    finished: bool
    on_track: bool | None  # projected finish (or finished) no later than the deadline


@dataclass(frozen=True)
class ProgramSummary:
    program: str
    ceiling: int
    committed: int
    paid_total: int
    counts: dict[str, int]
    started_at: int | None
    deadline: int | None
    progress: Progress

    @property
    def remaining(self) -> int:
        return self.ceiling - self.paid_total


@dataclass(frozen=True)
class ManifestSummary:
    root: str
    program: str
    payer: str
    count: int
    total: int
    paid_total: int
    not_after: int
    signers: tuple[str, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Charts:
    """Data for the HTML report's charts, fetched only for that format."""

    timeline: tuple[tuple[int, int], ...] = ()  # (unix time, cumulative amount paid)
    gas: tuple[GasPoint, ...] = ()
    gas_note: str = ""


@dataclass(frozen=True)
class Result:
    program: str  # the selected or only program, or "*" for several
    programs: tuple[ProgramSummary, ...]
    manifests: tuple[ManifestSummary, ...]
    payments: tuple[PaymentResult, ...]
    discrepancies: tuple[dict[str, Any], ...]
    counts: dict[str, int]
    ceiling: int
    committed: int
    paid_total: int  # transfers attributed to the payments in scope, at any depth
    unexplained_total: int  # transfers from the payer that no payment explains
    head_block: int
    head_time: int | None
    from_block: int
    confirmations: int
    transfers_scanned: int
    decimals: int
    progress: Progress
    chain_id: int | None = None
    token: str | None = None
    payers: tuple[str, ...] = ()
    paid_by_block: tuple[tuple[int, int], ...] = ()  # (block, amount) attributed in scope
    tx_logs: tuple[tuple[str, int, int], ...] = ()  # (tx hash, block, logs) attributed in scope
    charts: Charts | None = None
    # The scan began at the program's first block in the ledger (no --from-block given):
    # earlier transfers from the payer, a hand payment before the fund say, are not counted.
    from_ledger_start: bool = False
    # Transfer logs of 0 from the payer (anyone can emit them): not matched, only counted.
    zero_transfers: int = 0
    notes: tuple[str, ...] = ()  # said in the table and HTML reports, and in the JSON

    @property
    def remaining(self) -> int:
        return self.ceiling - self.paid_total

    @property
    def started_at(self) -> int | None:
        return self.progress.started_at

    @property
    def deadline(self) -> int | None:
        return self.progress.deadline

    @property
    def consistent(self) -> bool:
        return not self.discrepancies and all(p.status == Status.PAID for p in self.payments)

    @property
    def exit_code(self) -> int:
        return 0 if self.consistent else 1


# --- the pure core -------------------------------------------------------------------------


def dedupe(manifests: Iterable[Manifest | ManifestIn]) -> list[ManifestIn]:
    """One entry per paymentsRoot: the same payments re-signed (another deadline, other
    approvers) are the same payments. The first document seen wins; signers and sources
    are merged. The same payments under another program, chain, token or payer are
    refused: which one the report would judge them under is not this function's to pick."""
    by_root: dict[str, ManifestIn] = {}
    for item in manifests:
        e = item if isinstance(item, ManifestIn) else ManifestIn(item)
        old = by_root.get(e.manifest.root)
        if old is None:
            by_root[e.manifest.root] = e
            continue
        for name in ("program", "chain_id", "token", "payer"):
            a, b = getattr(old.manifest, name), getattr(e.manifest, name)
            if a != b:
                where = ", ".join((*old.sources, *e.sources)) or e.manifest.root
                raise InputError(f"manifest {e.manifest.root} appears with {name} {a!r} "
                                 f"and {b!r} ({where})")
        signers = old.signers + tuple(x for x in e.signers if x not in old.signers)
        sources = old.sources + tuple(x for x in e.sources if x not in old.sources)
        by_root[e.manifest.root] = replace(old, signers=signers, sources=sources)
    return list(by_root.values())


@bulk()
def _duplicate_ids(results: Sequence[PaymentResult], programs: set[str]
                   ) -> list[dict[str, Any]]:
    """A finding for each user id found in more than one manifest of its program (of
    ``programs``, those with several manifests), at its last one, with what every
    occurrence was paid."""
    seen: dict[tuple[str, str], list[PaymentResult]] = {}
    for r in results:
        if r.program in programs:
            seen.setdefault((r.program, r.id), []).append(r)
    out: list[dict[str, Any]] = []
    for (name, pid), rs in seen.items():
        if len({r.manifest for r in rs}) < 2:
            continue
        last = rs[-1]
        others = "; ".join(f"{r.manifest} index {r.idx} paid {r.paid} base units"
                           for r in rs[:-1])
        out.append({
            "kind": Kind.DUPLICATE_ID.value, "program": name, "manifest": last.manifest,
            "index": last.idx, "id": pid, "to": last.to, "expected": str(last.amount),
            "paid": str(sum(r.paid for r in rs)),
            "detail": f"id also in {others} (a user is paid once per program)",
        })
    return out


def reconcile(
    manifests: Sequence[Manifest | ManifestIn],
    transfers: Sequence[Transfer],
    ledger_info: LedgerInfo | None,
    ceilings: Ceilings,
    confirmations: int,
    head: int,
    *,
    now: int | None = None,
    program: str | None = None,
    decimals: int = 6,
    from_block: int = 0,
    chain_id: int | None = None,
    token: str | None = None,
) -> Result:
    """Settle every manifest payment from the chain's transfers. Pure.

    ``transfers`` are the token's Transfer logs from the manifests' payers (any order);
    ``ledger_info`` is None without a ledger; ``now`` is the head block's timestamp (for
    progress against the deadline); ``program`` limits what is reported (see the module
    docstring). Raises InputError when there is no manifest or ``program`` is not in
    scope.
    """
    entries = dedupe(manifests)
    if not entries:
        raise InputError("no manifests to reconcile")
    all_programs = sorted({e.manifest.program for e in entries})
    if program is not None and program not in all_programs:
        raise InputError(f"--program {program}: no manifest of that program in scope "
                         f"(programs: {', '.join(all_programs)})")
    lp_map: Mapping[tuple[str, int], LedgerPayment] = (
        ledger_info.payments if ledger_info is not None else {})

    # Flat, parallel lists of every payment of every manifest (matching needs them all):
    # position j -> (root, index) and amount; (payer, recipient) -> positions.
    pay_ids: list[tuple[str, int]] = []
    amounts: list[int] = []
    groups: dict[tuple[str, str], list[int]] = {}
    for e in entries:
        m = e.manifest
        root, payer = m.root, m.payer.lower()
        for p in m.payments:
            j = len(amounts)
            pay_ids.append((root, p.index))
            amounts.append(p.amount)
            key = (payer, p.to.lower())
            g = groups.get(key)
            if g is None:
                groups[key] = [j]
            else:
                g.append(j)
    n_pay = len(amounts)
    assigned: list[list[int] | None] = [None] * n_pay  # indices into ``logs``

    # Only the manifests' payers' transfers count (the fetch asks for no others).
    payer_set = {e.manifest.payer.lower() for e in entries}
    ours = [t for t in transfers if t.sender.lower() in payer_set]
    # A Transfer of 0 moves no money, and anyone can make one "from" the payer: USDC's
    # transferFrom(payer, x, 0) passes with no allowance (address poisoning). Counted, not
    # matched: it pays no one and explains nothing.
    logs = sorted((t for t in ours if t.amount), key=itemgetter(0, 1))  # (block, log_index)
    zero_transfers = len(ours) - len(logs)
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, t in enumerate(logs):
        key = (t.sender.lower(), t.to.lower())
        lst = by_key.get(key)
        if lst is None:
            by_key[key] = [i]
        else:
            lst.append(i)

    for key, pjs in groups.items():
        lis = by_key.pop(key, None)
        if not lis:
            continue
        if len(pjs) == 1 and len(lis) == 1:
            assigned[pjs[0]] = [lis[0]]
            continue
        _match_group(pjs, lis, logs, amounts, assigned, pay_ids, lp_map)
    unexplained = sorted(i for lis in by_key.values() for i in lis)

    # --- settle each payment --------------------------------------------------------
    results: list[PaymentResult] = []
    findings: list[dict[str, Any]] = []
    paid_by_program: dict[str, int] = {}
    paid_by_root: dict[str, int] = {}
    block_paid: dict[int, int] = {}
    tx_logs: dict[str, list[int]] = {}
    paid_s, pending_s = Status.PAID.value, Status.PENDING.value
    confirmed_s = "confirmed"
    new = tuple.__new__  # PaymentResult without its Python-level __new__: 100,000 of them
    j = 0
    for e in entries:
        m = e.manifest
        root, prog = m.root, m.program
        reported = program is None or prog == program
        root_paid = 0
        for p in m.payments:
            lis = assigned[j]
            j += 1
            amount = p.amount
            hashes: tuple[str, ...]
            if lis is None:
                paid, shallow, hashes = 0, False, ()
            elif len(lis) == 1:
                # Shallow: head - block + 1 < confirmations, as policy.is_deep counts the
                # including block as the first confirmation (inlined: 100,000 payments).
                t = logs[lis[0]]
                paid, shallow, hashes = t.amount, head - t.block + 1 < confirmations, (t.tx_hash,)
            else:
                paid, shallow, seen = 0, False, []
                for i in lis:
                    t = logs[i]
                    paid += t.amount
                    shallow = shallow or head - t.block + 1 < confirmations
                    if t.tx_hash not in seen:
                        seen.append(t.tx_hash)
                hashes = tuple(seen)
            root_paid += paid
            if not reported:
                continue
            for i in lis or ():
                t = logs[i]
                block_paid[t.block] = block_paid.get(t.block, 0) + t.amount
                tx = tx_logs.get(t.tx_hash)
                if tx is None:
                    tx_logs[t.tx_hash] = [t.block, 1]
                else:
                    tx[1] += 1
            lp = lp_map.get((root, p.index)) if lp_map else None
            if lis is not None and paid == amount:
                # the common case, kept lean for 100,000 payments (``_status`` gives the
                # same whatever the ledger says)
                status, reason = (pending_s if shallow else paid_s), None
            else:
                st, reason = _status(amount, paid, lis or (), logs, shallow, lp)
                status = st.value
            r: PaymentResult = new(PaymentResult, (root, prog, p.index, p.id, p.to, amount,
                                                   paid, status, hashes, reason))
            results.append(r)
            if status != paid_s:
                findings.append(_payment_finding(r, Status(status), lis or (), logs, head))
            # Skipped only where ``_ledger_disagreement`` finds nothing for certain: paid,
            # and the ledger says confirmed by one of the transactions that paid it.
            if lp is not None and not (
                    paid and lp.status == confirmed_s and lp.mined_hash is not None
                    and lp.mined_hash.lower() in hashes):
                d = _ledger_disagreement(r, lp, from_block, head)
                if d is not None:
                    findings.append(d)
        paid_by_root[root] = paid_by_root.get(root, 0) + root_paid
        if reported:
            paid_by_program[prog] = paid_by_program.get(prog, 0) + root_paid

    from disburser.addresses import to_checksum

    # ``--program P``: the payers of P's manifests, and only their unexplained outflows (a
    # stray transfer from another program's payer is not P's finding).
    scope_payers = sorted({e.manifest.payer for e in entries
                           if program is None or e.manifest.program == program})
    scope_senders = {x.lower() for x in scope_payers}
    outflows: list[dict[str, Any]] = []
    unexplained_total = 0
    for i in unexplained:
        t = logs[i]
        if t.sender.lower() not in scope_senders:
            continue
        unexplained_total += t.amount
        outflows.append({
            "kind": Kind.UNEXPLAINED_OUTFLOW.value, "tx_hash": t.tx_hash,
            "log_index": t.log_index, "block": t.block, "from": to_checksum(t.sender),
            "to": to_checksum(t.to), "expected": "0", "paid": str(t.amount),
        })

    # --- programs ---------------------------------------------------------------------
    scope_programs = [program] if program is not None else all_programs
    infos = ledger_info.programs if ledger_info is not None else {}
    summaries: list[ProgramSummary] = []
    program_findings: list[dict[str, Any]] = []
    notes: list[str] = []
    totals = {e.manifest.root: e.manifest.total for e in entries}  # a sum each: once
    for name in scope_programs:
        # With one program in scope every result is of it (only those are reported).
        rs = results if len(scope_programs) == 1 else [r for r in results if r.program == name]
        committed = sum(totals[e.manifest.root] for e in entries
                        if e.manifest.program == name)
        info = infos.get(name)
        recorded = info.ceiling if info else None
        ceiling = ceilings.for_program(name, recorded)
        if (info is not None and recorded is not None and not ceilings.from_setting
                and info.committed <= recorded < ceiling):
            # An audit without the send's DISBURSER_CEILING (DESIGN's default instead) must
            # not pass a payout over the ceiling the manifests were accepted under. A record
            # below what the ledger accepted is a ledger from before records were kept per
            # acceptance (the first one's ceiling, raised since): not a ceiling to check.
            notes.append(f"program {name}: checked against the ceiling of "
                         f"{format_units(recorded, decimals)} tokens the ledger recorded "
                         f"when its latest manifest was accepted; the settings say "
                         f"{format_units(ceiling, decimals)}")
            ceiling = recorded
        paid_total = paid_by_program.get(name, 0)
        summaries.append(ProgramSummary(
            program=name, ceiling=ceiling, committed=committed, paid_total=paid_total,
            counts=_counts(rs), started_at=info.started_at if info else None,
            deadline=info.deadline if info else None,
            progress=_progress(rs, committed, info.started_at if info else None,
                               info.deadline if info else None, now),
        ))
        if paid_total > ceiling:
            program_findings.append({
                "kind": Kind.OVER_CEILING.value, "program": name, "ceiling": str(ceiling),
                "expected": str(ceiling), "paid": str(paid_total),
                "excess": str(paid_total - ceiling),
            })
        if committed > ceiling:
            program_findings.append({
                "kind": Kind.COMMITTED_OVER_CEILING.value, "program": name,
                "ceiling": str(ceiling), "expected": str(ceiling), "committed": str(committed),
                "excess": str(committed - ceiling),
            })

    per_program = Counter(e.manifest.program for e in entries)
    program_findings += _duplicate_ids(results, {n for n, k in per_program.items() if k > 1})

    manifest_summaries = tuple(
        ManifestSummary(
            root=e.manifest.root, program=e.manifest.program, payer=e.manifest.payer,
            count=e.manifest.count, total=totals[e.manifest.root],
            paid_total=paid_by_root.get(e.manifest.root, 0), not_after=e.manifest.not_after,
            signers=e.signers, sources=e.sources,
        )
        for e in entries if program is None or e.manifest.program == program
    )
    starts = [s.started_at for s in summaries if s.started_at is not None]
    deadlines = [s.deadline for s in summaries if s.deadline is not None]
    committed_all = sum(s.committed for s in summaries)
    if len(summaries) == 1:
        top_progress = summaries[0].progress
    else:
        # All programs together: from the first start, against the last deadline (each
        # program's own figures are in ``programs``).
        top_progress = _progress(results, committed_all, min(starts, default=None),
                                 max(deadlines, default=None), now)
        # On track only if every program is: pooled, a finished program's pace hid one
        # that will miss its own (earlier) deadline.
        verdicts = [s.progress.on_track for s in summaries]
        ends = [s.progress.projected_finish for s in summaries if not s.progress.finished]
        known_ends = [e for e in ends if e is not None]
        top_progress = replace(
            top_progress,
            on_track=(False if any(v is False for v in verdicts) else
                      True if all(v is True for v in verdicts) else None),
            projected_finish=(max(known_ends) if known_ends and len(known_ends) == len(ends)
                              else None))
    return Result(
        program=scope_programs[0] if len(scope_programs) == 1 else "*",
        programs=tuple(summaries),
        manifests=manifest_summaries,
        payments=tuple(results),
        discrepancies=tuple(program_findings + findings + outflows),
        counts=_counts(results),
        ceiling=sum(s.ceiling for s in summaries),
        committed=committed_all,
        paid_total=sum(s.paid_total for s in summaries),
        unexplained_total=unexplained_total,
        head_block=head,
        head_time=now,
        from_block=from_block,
        confirmations=confirmations,
        transfers_scanned=(len(logs) if program is None else
                           sum(1 for t in logs if t.sender.lower() in scope_senders)),
        zero_transfers=zero_transfers,
        notes=tuple(notes),
        decimals=decimals,
        progress=top_progress,
        chain_id=chain_id,
        token=token,
        payers=tuple(scope_payers),
        paid_by_block=tuple(sorted(block_paid.items())),
        tx_logs=tuple((h, b, n) for h, (b, n) in tx_logs.items()),
    )


def _match_group(pjs: list[int], lis: list[int], logs: Sequence[Transfer], amounts: list[int],
                 assigned: list[list[int] | None], pay_ids: list[tuple[str, int]],
                 lp_map: Mapping[tuple[str, int], LedgerPayment]) -> None:
    """Give one (payer, recipient) group's logs to its payments (see the module docstring)."""
    used: set[int] = set()
    # 1. Ledger attribution: a log of exactly the amount in a transaction signed for it.
    if lp_map:
        by_tx_amount: dict[tuple[str, int], deque[int]] = {}
        for i in lis:
            t = logs[i]
            by_tx_amount.setdefault((t.tx_hash, t.amount), deque()).append(i)
        for j in pjs:
            lp = lp_map.get(pay_ids[j])
            if lp is None or not lp.tx_hashes:
                continue
            for h in lp.tx_hashes:
                q = by_tx_amount.get((h.lower(), amounts[j]))
                while q:
                    i = q.popleft()
                    if i not in used:
                        used.add(i)
                        assigned[j] = [i]
                        break
                if assigned[j] is not None:
                    break
    # 2. Exact amount, in manifest order and chain order.
    by_amount: dict[int, deque[int]] = {}
    for i in lis:
        if i not in used:
            by_amount.setdefault(logs[i].amount, deque()).append(i)
    for j in pjs:
        if assigned[j] is None:
            q = by_amount.get(amounts[j])
            if q:
                i = q.popleft()
                used.add(i)
                assigned[j] = [i]
    # 3. What is left, in chain order.
    with_amount: dict[int, list[int]] = {}
    for j in pjs:
        with_amount.setdefault(amounts[j], []).append(j)
    for i in sorted(i for i in lis if i not in used):
        amount = logs[i].amount
        same = with_amount.get(amount)
        if same:
            # A repeat of a payment of exactly this amount: the one with fewest logs so far.
            j = min(same, key=lambda k: len(assigned[k] or ()))
        else:
            j = next((k for k in pjs
                      if sum(logs[x].amount for x in assigned[k] or ()) < amounts[k]), pjs[0])
        lst = assigned[j]
        if lst is None:
            assigned[j] = [i]
        else:
            lst.append(i)


def _status(amount: int, paid: int, lis: Sequence[int], logs: Sequence[Transfer],
            shallow: bool, lp: LedgerPayment | None) -> tuple[Status, str | None]:
    if not lis:
        if lp is not None and lp.status == "failed":
            return Status.FAILED, lp.reason or "failed (no reason recorded)"
        return Status.UNPAID, None
    if paid == amount:
        return (Status.PENDING if shallow else Status.PAID), None
    if paid < amount:
        return Status.UNDERPAID, None
    exact = sum(1 for i in lis if logs[i].amount == amount)
    return (Status.PAID_TWICE if exact >= 2 else Status.OVERPAID), None


def _payment_finding(r: PaymentResult, status: Status, lis: Sequence[int],
                     logs: Sequence[Transfer], head: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "kind": status.value, "program": r.program, "manifest": r.manifest, "index": r.idx,
        "id": r.id, "to": r.to, "expected": str(r.amount), "paid": str(r.paid),
        "tx_hashes": list(r.tx_hashes),
    }
    if r.reason is not None:
        d["reason"] = r.reason
    if status == Status.PENDING and lis:
        d["depth"] = min(head - logs[i].block + 1 for i in lis)
    if status in (Status.UNDERPAID, Status.OVERPAID, Status.PAID_TWICE):
        d["difference"] = str(r.paid - r.amount)
        d["transfers"] = len(lis)
    return d


def _ledger_disagreement(r: PaymentResult, lp: LedgerPayment, from_block: int,
                         head: int) -> dict[str, Any] | None:
    detail: str | None = None
    if r.paid == 0 and lp.status in _LEDGER_SAYS_PAID:
        detail = (f"the ledger says {lp.status} but no Transfer to {r.to} from the payer "
                  f"is in blocks {from_block}..{head}")
    elif r.paid > 0 and lp.status in _LEDGER_SAYS_NOT_SENT:
        detail = (f"the ledger says {lp.status} but the chain shows {r.paid} base units "
                  f"transferred to {r.to}")
    elif (r.paid > 0 and lp.status == "confirmed" and lp.mined_hash
          and lp.mined_hash.lower() not in r.tx_hashes):
        detail = (f"the ledger says transaction {lp.mined_hash} paid it; the chain shows "
                  f"{', '.join(r.tx_hashes)}")
    if detail is None:
        return None
    return {
        "kind": Kind.LEDGER_DISAGREES.value, "program": r.program, "manifest": r.manifest,
        "index": r.idx, "id": r.id, "to": r.to, "ledger_status": lp.status,
        "chain_status": r.status, "expected": str(r.amount), "paid": str(r.paid),
        "tx_hashes": list(r.tx_hashes),
        "ledger_tx_hashes": [lp.mined_hash] if lp.mined_hash else list(lp.tx_hashes),
        "detail": detail,
    }


def _counts(results: Iterable[PaymentResult]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    counts.update(Counter(map(_STATUS_OF, results)))  # C loops: 100,000 payments
    return counts


_STATUS_OF = itemgetter(7)  # PaymentResult.status
_PAID_AND_AMOUNT = itemgetter(6, 5)  # PaymentResult.paid, .amount


_DONE = frozenset({Status.PAID, Status.PENDING, Status.OVERPAID, Status.PAID_TWICE})
_LEFT = frozenset({Status.UNPAID, Status.UNDERPAID})


def _progress(results: Sequence[PaymentResult], committed: int, started_at: int | None,
              deadline: int | None, now: int | None) -> Progress:
    """Integer arithmetic only: rates are floored per hour, the projection is exact."""
    counts = _counts(results)
    done = sum(counts[st] for st in _DONE)
    left = sum(counts[st] for st in _LEFT)
    failed = counts[Status.FAILED]
    amount_done = sum(starmap(min, map(_PAID_AND_AMOUNT, results)))
    per_hour: int | None = None
    amount_per_hour: int | None = None
    projected: int | None = None
    if started_at is not None and now is not None:
        elapsed = max(now - started_at, 1)
        per_hour = done * 3600 // elapsed
        amount_per_hour = amount_done * 3600 // elapsed
        if left and done:
            projected = now + -(-left * elapsed // done)
    finished = left == 0
    on_track: bool | None = None
    if deadline is not None:
        if failed:
            on_track = False  # failed payments are not paid by waiting
        elif finished:
            on_track = True
        elif projected is not None:
            on_track = projected <= deadline
        elif now is not None and now > deadline:
            on_track = False
    return Progress(
        payments_total=len(results), payments_done=done, payments_left=left,
        payments_failed=failed, amount_done=amount_done, amount_total=committed,
        started_at=started_at, deadline=deadline, now=now, payments_per_hour=per_hour,
        amount_per_hour=amount_per_hour, projected_finish=projected, finished=finished,
        on_track=on_track,
    )


# --- logs from the node -------------------------------------------------------------------


# --- the ledger's side ------------------------------------------------------------------


# (root, idx, pid, to, amount, status, reason, tx_id): ``Ledger.payment_rows``
PaymentRowTuple = tuple[str, int, str, str, str, str, str | None, int | None]


@bulk()
def ledger_manifests(ledger: Ledger, where: str,
                     known: Mapping[str, Manifest] | None = None,
                     rows: Sequence[PaymentRowTuple] | None = None) -> list[ManifestIn]:
    """Every manifest the ledger accepted: its signed document, with the payments of the
    ledger's payment rows (``rows``: ``Ledger.payment_rows()``, read when None) when those
    are exactly the document's (see ``_manifest_from_rows``). Otherwise the document is
    parsed and its Merkle root recomputed, and must be the accepted paymentsRoot, as on
    every run before (0.8 s at 100,000 payments, against 0.2 s). A manifest also given as
    a file (``known``, by paymentsRoot) is taken from the file when it has the ledger's
    program, chain, token and payer (only its signatures and deadline may differ)."""
    from disburser import manifest as mf

    if rows is None:
        rows = ledger.payment_rows()
    # rows are sorted by root then index: each manifest's rows are one slice
    spans: dict[str, tuple[int, int]] = {}
    lo = 0
    for root, run in groupby(rows, key=itemgetter(0)):
        hi = lo + len(list(run))
        spans[root] = (lo, hi)
        lo = hi
    out: list[ManifestIn] = []
    for row in ledger.manifests():
        m = (known or {}).get(row.root)
        if m is not None and (m.program, m.chain_id, m.token, m.payer) != (
                row.program, row.chain_id, row.token, row.payer):
            m = None  # the ledger's stands; dedupe refuses the file's other header
        if m is None:
            lo, hi = spans.get(row.root, (0, 0))
            m = _manifest_from_rows(row, rows[lo:hi])
        if m is None:
            m = mf.parse(row.document, f"{where}: manifest {row.root}")
            if m.root != row.root:
                raise InputError(f"{where}: manifest {row.root}: its document has "
                                 f"paymentsRoot {m.root}; the ledger is corrupt")
        try:
            signers = tuple(str(x) for x in json.loads(row.signers))
        except (ValueError, TypeError):
            signers = ()
        out.append(ManifestIn(m, signers, ("ledger",)))
    return out


_DOC_PAYMENT = itemgetter("id", "to", "amount")
_ROW_PAYMENT = itemgetter(2, 3, 4)  # pid, to, amount of a PaymentRowTuple


def _manifest_from_rows(row: ManifestRow, rows: Sequence[PaymentRowTuple]) -> Manifest | None:
    """The accepted manifest ``row`` built from its payment ``rows`` (sorted by index), or
    None unless its stored document has the same header and exactly those payments, in
    index order: ids, addresses and amounts as text.

    What this trusts: the document was parsed, its paymentsRoot recomputed and its
    approvers' signatures recovered when it was accepted (``send``), and the ledger wrote
    the rows from it in the same transaction. What it still catches: rows or a document
    changed since on their own (a payment redirected in the ledger is then judged by the
    document, as before). What it no longer catches: a document and its rows changed
    alike after acceptance with the paymentsRoot left as it was (recomputing the root on
    every run costs 0.4 s at 100,000 payments). Reconcile never re-checked the signatures
    of ledger manifests: a MANIFEST file given on the command line (or ``--no-ledger``)
    is parsed and its root recomputed, whatever the ledger says."""
    from disburser.domain import Payment

    if not rows or len(rows) != row.count or rows[0][1] != 0 or rows[-1][1] != row.count - 1:
        return None  # the primary key (root, idx) makes the sorted indices distinct
    try:
        doc = json.loads(row.document)
        header = (doc["program"], doc["chain_id"], doc["token"], doc["payer"],
                  doc["not_after"])
        if header != (row.program, row.chain_id, row.token, row.payer, row.not_after):
            return None
        if list(map(_DOC_PAYMENT, doc["payments"])) != list(map(_ROW_PAYMENT, rows)):
            return None
        signatures = tuple(str(x).lower() for x in doc.get("signatures") or ())
        payments = tuple([Payment(r[1], r[2], r[3], int(r[4])) for r in rows])
    except (ValueError, TypeError, KeyError, AttributeError):  # not a document we wrote
        return None
    return Manifest(program=row.program, chain_id=row.chain_id, token=row.token,
                    payer=row.payer, not_after=row.not_after, payments=payments,
                    signatures=signatures, root=row.root)


@bulk()
def ledger_info(ledger: Ledger, rows: Sequence[PaymentRowTuple] | None = None) -> LedgerInfo:
    """Attribution from the ledger: each payment's status, reason and the hashes of every
    signed attempt of its transaction; each program's start, deadline and first block; the
    gas of each mined payout transaction. ``rows``: ``Ledger.payment_rows``, read when
    None."""
    attempt_hashes: dict[int, list[str]] = {}
    for h, (tx_id, _root) in ledger.tx_hashes().items():
        attempt_hashes.setdefault(tx_id, []).append(h.lower())
    mined: dict[int, str | None] = {}
    gas: list[GasPoint] = []
    for tid, kind, mined_hash, block_number, gas_used, count, tx_root in ledger.tx_outcomes():
        mined[tid] = mined_hash.lower() if mined_hash else None
        if kind in ("batch", "direct") and gas_used is not None and mined_hash:
            gas.append(GasPoint(mined_hash.lower(), block_number or 0, gas_used, count,
                                tx_root))
    if rows is None:
        rows = ledger.payment_rows()
    # A batch's 500 payments say the same thing: one (immutable) LedgerPayment for them all.
    shared: dict[tuple[str, str | None, int | None], LedgerPayment] = {}
    payments: dict[tuple[str, int], LedgerPayment] = {}
    for root, idx, _pid, _to, _amount, status, reason, pay_tx in rows:
        lp = shared.get((status, reason, pay_tx))
        if lp is None:
            hashes = tuple(attempt_hashes.get(pay_tx, ())) if pay_tx is not None else ()
            lp = shared[(status, reason, pay_tx)] = LedgerPayment(
                status, reason, hashes, mined.get(pay_tx) if pay_tx is not None else None)
        payments[(root, idx)] = lp
    programs = {p.name: ProgramInfo(p.started_at, p.deadline, p.first_block, int(p.ceiling),
                                    ledger.committed(p.name))
                for p in ledger.programs()}
    gas.sort(key=lambda g: g.block)
    return LedgerInfo(payments, programs, tuple(gas))


def default_from_block(entries: Sequence[ManifestIn], info: LedgerInfo | None) -> int:
    """The earliest first block the ledger knows for the programs in scope; 0 when any
    of them has none (a file-only program, or no ledger), when a manifest in scope is not
    in the ledger (a MANIFEST file another ledger paid), or when the ledger found
    payments already made before it existed (``paid_elsewhere``: a lost ledger was
    re-created, so its first block is too late). A scan that starts late would report
    paid payments as unpaid."""
    if info is None:
        return 0
    if any(lp.status == "paid_elsewhere" for lp in info.payments.values()):
        return 0
    # A MANIFEST file the ledger has no payment of: paid (if at all) by another ledger,
    # perhaps before this one's first block.
    in_ledger = {root for root, _ in info.payments}
    if any(e.manifest.root not in in_ledger for e in entries):
        return 0
    firsts: list[int] = []
    for name in {e.manifest.program for e in entries}:
        p = info.programs.get(name)
        if p is None or p.first_block is None:
            return 0
        firsts.append(p.first_block)
    return min(firsts, default=0)


def check_approved(m: Manifest, source: str, s: Settings) -> None:
    """A MANIFEST file the ledger did not accept explains transfers only with the approvers'
    quorum, as `send` requires (its expiry aside: reconcile looks back). An unsigned file
    built by anyone made an outflow no approver signed for reconcile as paid."""
    from disburser import manifest as mf
    from disburser.errors import SettingsError

    if not s.approvers:
        raise SettingsError(f"{source}: reconcile checks a manifest file's approvals against "
                            "DISBURSER_APPROVERS, which is not set (the approvers' "
                            "addresses, as for send)")
    mf.verify(m, source=source, approvers=s.approvers, quorum=s.quorum, chain_id=m.chain_id,
              token=m.token, payer=None, now=0)


def file_signers(m: Manifest) -> tuple[str, ...]:
    """Who signed a manifest file; an unrecoverable signature is left out (reconcile needs
    the payments, not the approvals: ``manifest verify`` judges those)."""
    from disburser import manifest as mf
    from disburser.errors import ManifestError

    out: list[str] = []
    for sig in m.signatures:
        try:
            who = mf.recover(m, sig)
        except ManifestError:
            continue
        if who not in out:
            out.append(who)
    return tuple(out)


# --- chart data (HTML only) ----------------------------------------------------------------

_TIMESTAMP_SAMPLES = 400
_GAS_RECEIPTS = 60


def block_times(chain: RpcChain, blocks: Sequence[int],
                samples: int = _TIMESTAMP_SAMPLES) -> dict[int, int]:
    """Timestamps of ``blocks``: up to ``samples`` of them fetched in JSON-RPC batches, the
    others interpolated between their neighbours (a chart needs no more precision)."""
    uniq = sorted(set(blocks))
    if not uniq:
        return {}
    if len(uniq) <= samples:
        picked = uniq
    else:
        step = (len(uniq) - 1) / (samples - 1)
        picked = sorted({uniq[round(k * step)] for k in range(samples)})
    known: dict[int, int] = {}
    for i in range(0, len(picked), 200):
        part = picked[i:i + 200]
        res = chain.t.batch([("eth_getBlockByNumber", [hex(b), False]) for b in part])
        for b, r in zip(part, res, strict=True):
            if isinstance(r, Exception):
                raise r
            if r is not None:
                known[b] = int(r["timestamp"], 16)
    if not known:
        return {}
    ks = sorted(known)
    out: dict[int, int] = {}
    k = 0
    for b in uniq:
        while k + 1 < len(ks) and ks[k + 1] <= b:
            k += 1
        lo = ks[k]
        if b <= lo or k + 1 >= len(ks):
            out[b] = known[lo]
        else:
            hi = ks[k + 1]
            out[b] = known[lo] + (known[hi] - known[lo]) * (b - lo) // (hi - lo)
    return out


def chart_data(result: Result, chain: RpcChain, info: LedgerInfo | None) -> Charts:
    """Cumulative paid over time (block timestamps) and gas per payout transaction (from the
    ledger when it has them, otherwise from receipts of the transfers' transactions)."""
    times = block_times(chain, [b for b, _ in result.paid_by_block])
    timeline: list[tuple[int, int]] = []
    total = 0
    for b, amount in result.paid_by_block:
        total += amount
        if b in times:
            timeline.append((times[b], total))
    roots = {m.root for m in result.manifests}
    gas: list[GasPoint] = []
    note = ""
    if info is not None:
        gas = [g for g in info.gas if g.root is None or g.root in roots]
        if gas:
            note = f"{len(gas)} payout transaction(s), gas used from the ledger"
    if not gas and result.tx_logs:
        # Receipts carry every log (a 500-transfer batch is ~250 kB): sample evenly.
        txs = sorted(result.tx_logs, key=lambda x: x[1])
        step = max(1, -(-len(txs) // _GAS_RECEIPTS))
        picked = txs[::step]
        receipts = chain.receipts([h for h, _, _ in picked])
        for h, b, n in picked:
            rc = receipts.get(h)
            if rc is not None:
                gas.append(GasPoint(h, b, rc.gas_used, n))
        note = f"{len(gas)} transaction(s), gas used from their receipts"
        if len(txs) > len(picked):
            note += f" (every {step}th of {len(txs)})"
    return Charts(tuple(timeline), tuple(gas), note)


# --- the command ---------------------------------------------------------------------------


@bulk()
def run_reconcile(s: Settings, manifest_paths: list[Path], *, program: str | None,
                  use_ledger: bool, fmt: str, from_block: int | None,
                  program_from_env: bool = False) -> tuple[str, int]:
    """Reconcile the manifests of the ledger (unless ``use_ledger`` is False) and of
    ``manifest_paths`` with the chain; returns the rendered report and the exit code
    (0 consistent, 1 findings). Bad input raises InputError; a node that is not the
    configured chain raises ChainMismatchError.

    No cyclic garbage collection for the whole command (``bulk``): nearly everything it
    builds is kept to the end, and the collections the steps between the bulk ones
    triggered each scanned every object alive (a caller's previous 100,000-payment report
    too)."""
    from disburser import ledger as lg
    from disburser import manifest as mf
    from disburser import report
    from disburser.chain import RpcChain, check_decimals, display_url

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if from_block is not None and from_block < 0:
        raise InputError(f"--from-block {from_block}: must be 0 or more")
    files: list[ManifestIn] = []
    for path in manifest_paths:
        m = mf.load(path)
        files.append(ManifestIn(m, file_signers(m), (str(path),)))
    entries: list[ManifestIn] = []
    info: LedgerInfo | None = None
    ledger = lg.Ledger(s.db) if use_ledger and lg.exists(s.db) else None
    if ledger is not None:
        known = {e.manifest.root: e.manifest for e in files}
        rows = ledger.payment_rows()
        entries.extend(ledger_manifests(ledger, f"DISBURSER_DB {redact_url(s.db)}", known,
                                        rows))
        info = ledger_info(ledger, rows)
        del rows
    entries.extend(files)
    if not entries:
        if not use_ledger:
            raise InputError("reconcile --no-ledger needs at least one MANIFEST file")
        held = "has none" if ledger is not None else "does not exist"
        raise InputError(f"no manifests to reconcile: the ledger DISBURSER_DB "
                         f"{redact_url(s.db)} {held} and no MANIFEST file was given")
    entries = dedupe(entries)
    for e in entries:
        where = ", ".join(e.sources) or e.manifest.root
        if e.manifest.chain_id != s.chain_id:
            raise InputError(f"{where}: manifest is for chain {e.manifest.chain_id}, the "
                             f"settings say chain {s.chain_id} (DISBURSER_CHAIN_ID)")
        if e.manifest.token != s.token:
            raise InputError(f"{where}: manifest pays token {e.manifest.token}, the "
                             f"configured token is {s.token} (DISBURSER_TOKEN)")
    programs = sorted({e.manifest.program for e in entries})
    # Named as it was given: a standing DISBURSER_PROGRAM (the one allocate and manifest
    # build read) is easily forgotten.
    where = f"DISBURSER_PROGRAM={program}" if program_from_env else f"--program {program}"
    if program is not None and program not in programs:
        raise InputError(f"{where}: no manifest of that program in scope "
                         f"(programs: {', '.join(programs)})")
    for e in files:
        if program is not None and e.manifest.program != program:
            # A file named on purpose and then left out: such a run reported all well.
            raise InputError(f"{e.sources[0]}: a manifest of program {e.manifest.program}, "
                             f"outside {where}: leave the file out, or the program filter")
    accepted = ledger.manifest_roots() if ledger is not None else set()
    for e in files:
        if e.manifest.root.lower() not in accepted:
            check_approved(e.manifest, e.sources[0], s)

    chain = RpcChain(s.rpc_url)
    cid = chain.chain_id()
    if cid != s.chain_id:
        raise ChainMismatchError(f"node at {display_url(s.rpc_url)} is chain {cid}, the "
                                 f"settings say {s.chain_id} (DISBURSER_CHAIN_ID / "
                                 "DISBURSER_NETWORK)")
    if not chain.code(s.token):
        raise ChainMismatchError(f"DISBURSER_TOKEN {s.token}: no contract on chain {cid}")
    # Ceilings are settings in whole tokens: with the wrong decimals they are checked at
    # the wrong scale.
    check_decimals(chain, s.token, s.decimals, " (DISBURSER_DECIMALS / DISBURSER_NETWORK)")
    head = chain.head()
    start = from_block if from_block is not None else default_from_block(entries, info)
    if start > head.number:
        if from_block is not None:
            raise InputError(f"--from-block {start} is above the chain head {head.number}")
        raise ChainMismatchError(
            f"the ledger DISBURSER_DB {redact_url(s.db)} paid from block {start}, above the "
            f"chain head {head.number} of the node at {display_url(s.rpc_url)}: a ledger "
            "of another chain, or a node reset since (--from-block sets the start)")
    payers = sorted({e.manifest.payer for e in entries})
    transfers = fetch_transfers(chain, s.token, payers, start, head.number,
                                workers=FETCH_WORKERS, connect=lambda: RpcChain(s.rpc_url))
    result = reconcile(entries, transfers, info, s.ceilings, s.confirmations, head.number,
                       now=head.timestamp, program=program, decimals=s.decimals,
                       from_block=start, chain_id=cid, token=s.token)
    if from_block is None and start > 0:
        result = replace(result, from_ledger_start=True)
    if fmt == "html":
        result = replace(result, charts=chart_data(result, chain, info))
    return report.render(result, fmt), result.exit_code
