"""The send loop: claim -> simulate -> sign -> persist -> broadcast -> poll -> bump -> confirm.

It owns the payer's nonces through the ledger, keeps up to ``max_in_flight`` transactions
pipelined, and never re-signs a payload while an older signed version could still be
mined: replacements keep the nonce and the payload and only raise the fees. Clock, sleep
and the stop flag are parameters, so tests drive time.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from disburser import chain as ch
from disburser import policy
from disburser.broadcast import Broadcaster, NotSent, Outgoing, Send
from disburser.domain import Manifest, Mode, PaymentStatus, TxStatus
from disburser.errors import (
    ChainMismatchError,
    DisburserError,
    FailClosed,
    FundsShortfall,
    Interrupted,
    RpcError,
    SettingsError,
)
from disburser.keys import Signer
from disburser.ledger import Counts, Ledger, Mined, NewTx, Queued, TxRow

log = structlog.get_logger("disburser.send")

# Gas model used to size batches before the first estimate (FIELD-NOTES: ~29.9k per fresh
# recipient, ~41k fixed); the estimate of each batch is what sets its gas limit.
PER_RECIPIENT_GAS = 31_000
STALL_SECONDS = 60.0
PROGRESS_EVERY = 1.0
WINDOW = 4  # batches measured and written ahead together, with a broadcasting thread
LOOKUP_EVERY = 1.0  # seconds between lookups of a transaction while no block comes
RECEIPT_WAIT = 120.0  # seconds a mined transaction of ours may lack a receipt
# Seconds the chain's nonce may stay at or below a nonce the ledger holds final before the
# run stops (a node behind a load balancer may lag a moment; a rolled-back chain does not
# come back).
NONCE_BEHIND_WAIT = 30.0
DIRECT_GAS = 100_000  # an upper bound of one ERC-20 transfer, for the fee-cap check
BATCH_FIXED_GAS = 60_000
METER_TRIES = 3  # windows without a usable GasMeter answer before it is given up


@dataclass(frozen=True)
class SendConfig:
    mode: Mode
    chain_id: int
    token: str
    decimals: int
    batch_contract: str | None
    confirmations: int
    max_in_flight: int
    batch_size: int
    bump_after_blocks: int
    max_fee_wei: int
    max_tx_fee_wei: int
    priority_fee_wei: int
    poll_interval: float
    ceiling: int
    # Where the payer's past Transfer logs are read from, and whether payments they match
    # are recorded as paid elsewhere rather than stopping the run (_skip_paid_by_transfers).
    from_block: int = 0
    accept_past_transfers: bool = False


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    amount_done: int = 0
    amount_total: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SendResult:
    root: str
    confirmed: int
    failed: int
    unpaid: int
    amount_paid: int
    txs_sent: int
    expired: bool


ProgressFn = Callable[[Progress], None]


class Sender:
    def __init__(
        self,
        ledger: Ledger,
        chain: ch.RpcChain,
        signer: Signer,
        cfg: SendConfig,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: ProgressFn | None = None,
    ) -> None:
        self.ledger = ledger
        self.chain = chain
        self.signer = signer
        self.cfg = cfg
        self.payer = signer.address
        self.clock = clock
        self.sleep = sleep
        self.should_stop = should_stop
        self.on_progress = on_progress
        self._sent_at_block: dict[int, int] = {}
        # Block at which each transaction became the lowest pending nonce: a transaction
        # queued behind others is not "stuck" until it is first in line.
        self._lowest_since: dict[int, int] = {}
        self._head: ch.Head | None = None
        self._simulate_v1: bool | None = None  # None: not tried yet
        self._meter: bool | None = None  # eth_call with GasMeter's code; None: not judged yet
        self._meter_misses = 0  # windows in a row without a usable answer while undecided
        self._bitmap: bool | None = None  # whether the batch contract's bitmap is read
        # Head hash at which each open transaction was last looked up (see _poll).
        self._looked_up: dict[int, str] = {}
        self._pool_seen_at: dict[int, float] = {}  # tx id -> when last seen in the pool
        self._receipt_missing_since: dict[int, float] = {}
        self._pool_owner_checked: dict[int, float] = {}  # nonce -> when its pool was read
        self._lookup_all_at = float("-inf")
        # What a poll saw (receipts, depth), written together at its end.
        self._mined_now: list[tuple[TxRow, ch.Receipt]] = []
        self._deep_now: list[TxRow] = []
        self._per_recipient = PER_RECIPIENT_GAS
        self._at_cap_logged: set[int] = set()
        self._on_arrival: tuple[float, bool] | None = None  # (asked at, answer)
        self._priced_out_logged: set[str] = set()  # attempt hashes
        self._base_fee_over_cap = False
        self._idle = 0.0  # the current wait between polls that changed nothing
        self._batch_size = cfg.batch_size
        self._txs_sent = 0
        # The batch windows' broadcasting thread (see broadcast.py): None until first
        # needed, False where the chain client cannot give it a connection of its own.
        self._bcast: Broadcaster | None | bool = None
        self._one_at_a_time = False  # no pairs: the node keeps no nonce gaps
        self._gap_refused: set[str] = set()  # hashes so refused, not yet sent again
        # Whether this run put anything on the wire: an error after that is not "refused,
        # nothing sent" (exit 2) but "stopped with payments in progress" (exit 1).
        self.broadcast_any = False
        self._preflight_done = False
        self._first_nonce: int | None = None  # the ledger's first nonce of the payer
        self._final_nonce: int | None = None  # the highest nonce the ledger holds final
        self._behind_since: float | None = None  # when the chain's nonce fell to or below it
        self._head_seen, self._head_since, self._stall_logged = -1, clock(), False
        # Fault injection for the crash tests: "point:n" kills this process with SIGKILL the
        # n-th time the loop passes `point`. Never set in production.
        self._crash_at = _parse_crash_point(os.environ.get("DISBURSER_TEST_CRASH_AT", ""))

    @contextmanager
    def exit_1_once_sent(self) -> Iterator[None]:
        """An error raised inside, after this sender put anything on the wire, is not a
        refusal (exit 2 says nothing was sent): it leaves with exit 1."""
        try:
            yield
        except DisburserError as e:
            if self.broadcast_any and e.exit_code == 2:
                e.exit_code = 1
            raise

    def _crash_point(self, name: str) -> None:
        if self._crash_at and self._crash_at[0] == name:
            self._crash_at[1] -= 1
            if self._crash_at[1] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)

    # --- preflight ----------------------------------------------------------------------

    def preflight_chain_only(self) -> int:
        return check_chain_id(self.chain, self.cfg)

    def preflight(self) -> ch.Head:
        """Fail closed unless the chain, token and contract are what the settings say."""
        self._preflight_done = True
        return check_chain(self.chain, self.cfg)

    def sync_nonces(self) -> None:
        """The ledger owns the payer's nonces; the chain must not have moved without us."""
        latest = self.chain.nonce(self.payer, "latest")
        pending = self.chain.nonce(self.payer, "pending")
        first = self._first_nonce = self.ledger.first_nonce(self.payer, latest)
        self._final_nonce = check_nonces(self.chain, self.ledger, self.payer, latest=latest,
                                         pending=pending, first=first)

    # --- the run --------------------------------------------------------------------------

    def run(self, m: Manifest) -> SendResult:
        """Pay every queued payment of ``m`` (already verified and accepted)."""
        try:
            return self._run(m)
        finally:
            if isinstance(self._bcast, Broadcaster):
                self._bcast.close()
                self._bcast = None

    def _run(self, m: Manifest) -> SendResult:
        if m.payer != self.payer:
            raise ChainMismatchError(
                f"manifest payer is {m.payer} but the configured key is {self.payer}")
        if not self._preflight_done:  # the CLI checks before recording the manifest
            self.preflight()
        self.sync_nonces()
        log.info("send_started", root=m.root, program=m.program, mode=self.cfg.mode.value,
                 payer=self.payer)
        self._skip_paid_by_transfers(m.root, m.count)
        # Settle what an earlier run left in flight before new allowance or batches.
        self._drain()
        # A ceiling lowered since the program's manifests were accepted: refused before any
        # allowance or batch (what was in flight was signed under the ceiling of its day,
        # and is settled above: the ledger's figures stay true for the decision).
        self.ledger.check_ceiling(m.program, self.cfg.ceiling)
        if self._reads_bitmap():
            self._skip_paid_on_chain(m.root, m.count)
        owed = self._check_funds(m.root)
        # After the funds check: a refusal there (no gas, a paused token) stays a refusal
        # with nothing sent; a later run withdraws what is left.
        self._withdraw_unused_allowances()
        if self.cfg.mode is Mode.BATCH:
            self._set_allowance(owed)
        started = time.monotonic()  # the progress line's clock, as Progress's own
        last_progress = 0.0
        expired = False
        while True:
            if self.should_stop():
                # What is written ahead goes out first, as when this thread sent it itself.
                self._flush_broadcasts()
                self._withdraw_allowance_on_stop()
                raise Interrupted("stopped by operator; state is saved, run `send` again "
                                  "to resume")
            changed = self._poll()
            if not expired and self.clock() > m.not_after:
                expired = True
                log.warning("manifest_expired", root=m.root, not_after=m.not_after)
            if not expired:
                changed |= self._fill(m)
            if self.on_progress and self.clock() - last_progress >= PROGRESS_EVERY:
                # Counting every payment's state costs a table scan: once a second at most.
                last_progress = self.clock()
                self.on_progress(self._progress(m.root, started))
            if not self.ledger.has_open_txs(self.payer) and (
                expired or not self.ledger.has_queued(m.root)
            ):
                break
            if changed:
                self._idle = 0.0
            elif self._outstanding():
                # Waiting for our own broadcasts, not for the chain: no sleep (a virtual
                # clock would mine a block that the sends have not reached).
                self._collect_broadcasts(wait=self.cfg.poll_interval)
            else:
                self._wait()
        if self.cfg.mode is Mode.BATCH:
            # The run ends (all paid, or the manifest expired): nothing is owed through the
            # batch contract until the next run approves again.
            self._set_allowance(0)
            # _set_allowance only waits until the approval is mined; the run is done when it
            # is at depth like every other transaction (a reorg could still undo it, and the
            # ledger would show it in flight after a run that said "done").
            self._drain()
        counts = self.ledger.counts([m.root])
        if self.on_progress:
            self.on_progress(self._progress(m.root, started, counts))
        by = counts.by_status
        result = SendResult(
            root=m.root,
            confirmed=by.get(PaymentStatus.CONFIRMED.value, 0)
            + by.get(PaymentStatus.PAID_ELSEWHERE.value, 0),
            failed=by.get(PaymentStatus.FAILED.value, 0),
            unpaid=by.get(PaymentStatus.QUEUED.value, 0) + by.get(PaymentStatus.IN_FLIGHT.value, 0),
            amount_paid=counts.amount_by_status.get(PaymentStatus.CONFIRMED.value, 0)
            + counts.amount_by_status.get(PaymentStatus.PAID_ELSEWHERE.value, 0),
            txs_sent=self._txs_sent,
            expired=expired,
        )
        log.info("send_finished", root=m.root, confirmed=result.confirmed,
                 failed=result.failed, unpaid=result.unpaid, amount_paid=str(result.amount_paid))
        return result

    def snapshot(self, root: str) -> Progress:
        """Payments of ``root`` as the ledger holds them now (for a run's last words)."""
        return self._progress(root)

    def _progress(self, root: str, started: float | None = None,
                  counts: Counts | None = None) -> Progress:
        c = counts or self.ledger.counts([root])
        done = c.by_status.get(PaymentStatus.CONFIRMED.value, 0) + c.by_status.get(
            PaymentStatus.PAID_ELSEWHERE.value, 0)
        p = Progress(
            total=sum(c.by_status.values()),
            done=done,
            failed=c.by_status.get(PaymentStatus.FAILED.value, 0),
            amount_done=c.amount_by_status.get(PaymentStatus.CONFIRMED.value, 0)
            + c.amount_by_status.get(PaymentStatus.PAID_ELSEWHERE.value, 0),
            amount_total=sum(c.amount_by_status.values()),
        )
        if started is not None:
            p.started = started
        return p

    def _drain(self) -> None:
        while self.ledger.has_open_txs(self.payer):
            if self.should_stop():
                raise Interrupted("stopped by operator while settling transactions in flight")
            if self._poll():
                self._idle = 0.0
            else:
                self._wait()

    def _wait(self) -> None:
        """Sleep before the next poll: an eighth of DISBURSER_POLL_INTERVAL after a poll that
        changed something, doubling up to the interval while nothing does. A transaction
        just sent is often mined within a fraction of the interval (at once on automine);
        a node with nothing new is asked no more often than a few times an interval."""
        step = self.cfg.poll_interval
        self._idle = step / 8 if self._idle <= 0 else min(self._idle * 2, step)
        self.sleep(self._idle)

    def _reads_bitmap(self) -> bool:
        """Whether this run reads the batch contract's bitmap, which says exactly which
        payments of a manifest its transactions made: in batch mode always (``preflight``
        verified the contract); in direct mode when DISBURSER_BATCH_CONTRACT is set and
        holds BatchPayout (a manifest begun in batch mode and finished in direct mode)."""
        if self._bitmap is None:
            if self.cfg.batch_contract is None:
                self._bitmap = False
            elif self.cfg.mode is Mode.BATCH:
                self._bitmap = True
            else:
                try:
                    verify_batch_contract(self.chain, self.cfg.batch_contract)
                    self._bitmap = True
                except ChainMismatchError:
                    self._bitmap = False
        return self._bitmap

    def _skip_paid_on_chain(self, root: str, count: int) -> None:
        """With a lost or fresh ledger, the batch contract's bitmap still knows what this
        payer paid for this root in this token: those payments are never sent again. Every
        word of the manifest's bitmap is read (one request per 51,200 payments); the queued
        payments are looked up only when a bit is set."""
        assert self.cfg.batch_contract is not None
        words = list(range((count + 255) // 256))
        if not words or not self.ledger.has_queued(root):
            return
        bitmap = self.chain.paid_words(self.cfg.batch_contract, self.payer, self.cfg.token,
                                       root, words)
        if not any(bitmap.values()):
            return
        queued = self.ledger.queued_idxs(root)
        paid = [i for i in queued if bitmap[i // 256] >> (i % 256) & 1]
        if paid:
            log.warning("payments_already_paid_on_chain", root=root, count=len(paid))
            self.ledger.mark_paid_elsewhere(root, paid, contract=self.cfg.batch_contract)

    def _skip_paid_by_transfers(self, root: str, count: int) -> None:
        """A ledger that did not see the payer's first transaction (a lost ledger re-created,
        or a payer used before) does not know what the payer paid before it. Once per
        manifest in such a ledger (again if DISBURSER_FROM_BLOCK is lowered or failed
        payments are put back in the queue), the payer's Transfer logs from
        DISBURSER_FROM_BLOCK to the head are matched to the queued payments (``history``
        says how, and which logs are left out). A match, or a manifest the payer paid that
        this ledger does not know, stops the run before anything is sent: it may be this
        fund's payment (of this amount or, re-signed, of another), or an unrelated transfer,
        and the run does not guess. Each is logged (``past_transfer_matches_payment``,
        ``payer_paid_unknown_manifest``) and listed in the ledger. ``--accept-past-transfers``
        records the matched payments as paid elsewhere, each with its transfer, once an
        earlier refusal listed every one of them. Later transfers need no look: every
        transaction of the payer after the ledger's first nonce is the ledger's own
        (``sync_nonces`` stops on any other). It writes only the ledger, before anything in
        flight is settled: a refusal sends nothing."""
        if self._first_nonce == 0 or not self.ledger.has_queued(root):
            return
        start = self.cfg.from_block
        if self.ledger.history_checked(root, start):
            return
        from disburser import history
        from disburser.transfers import FETCH_WORKERS, fetch_disbursed, fetch_transfers

        head = self.chain.head().number
        if start > head:
            raise SettingsError(
                f"DISBURSER_FROM_BLOCK: {start} is above the chain's head {head}: the payer's "
                "past transfers cannot be read from there")
        log.info("reading_payer_transfers", root=root, from_block=start, to_block=head)
        # Several ranges at once, a connection each, as reconcile reads them; one at a time
        # through a client that cannot give a thread its own connection (tests' proxies).
        found = fetch_transfers(
            self.chain, self.cfg.token, [self.payer], start, head,
            workers=FETCH_WORKERS if self.chain.own_connections() else 1,
            connect=lambda: self.chain.for_thread() or self.chain)
        logs = history.keyed(found, self.ledger.tx_hashes())
        if self._reads_bitmap():
            # First: what the bitmap says this payer paid for this root is settled by it.
            self._skip_paid_on_chain(root, count)
        unknown: dict[str, history.Unknown] = {}
        if logs:
            logs, kept, unknown = history.set_aside(
                logs, fetch_disbursed(self.chain, ch.DISBURSED_TOPIC, self.payer, start, head),
                root, trusted=(self.cfg.batch_contract or "").lower() if self._reads_bitmap()
                else None, known=self.ledger.manifest_roots())
            marks = self.ledger.bitmap_marks(root)
            if marks:
                logs = history.drop_bitmap_paid(logs, kept, root, marks, [
                    Queued(root, p.idx, p.to, p.amount) for p in self.ledger.payments(
                        root, [PaymentStatus.PAID_ELSEWHERE])])
        if logs:
            explained = self.ledger.explained_transfers()
            logs = [(t, key) for t, key in logs if key not in explained]
        matched = history.match(logs, self.ledger.queued(root)) if logs else []
        for q, t, _ in matched:  # to the log file only: a refusal is one line on stderr
            log.info("past_transfer_matches_payment", root=root, index=q.idx, to=q.to,
                     amount=str(q.amount), transferred=str(t.amount), tx_hash=t.tx_hash,
                     block=t.block)
        # Manifests this ledger does not know that the payer paid: they may hold this
        # program's users and count against its ceiling, which only the ledger checks. Only
        # while this manifest has something left to pay (one the bitmap found all paid is
        # recorded freely: that is how a re-created ledger comes to know its manifests).
        unknown_roots = sorted(unknown) if unknown and self.ledger.has_queued(root) else []
        for r in unknown_roots:
            log.info("payer_paid_unknown_manifest", root=root, other=r,
                     tx_hash=unknown[r].tx_hash, block=unknown[r].block)
        listing = history.listing(matched, unknown_roots)
        listed = self.ledger.listed_transfers(root, start) if listing else set()
        if listing and not (self.cfg.accept_past_transfers and listed.issuperset(listing)):
            # Accepted only once listed: --accept-past-transfers takes the matches a refusal
            # showed, never ones the operator has not seen (settings may change between).
            self.ledger.list_matches(root, listing, start)
            raise FailClosed(history.refusal(root, matched, unknown_roots, unknown))
        keys = [m.key for m in matched]
        self.ledger.record_history_check(
            root, [m.payment.idx for m in matched], keys, from_block=start, to_block=head,
            unknown_manifests=unknown_roots)
        if matched:
            log.warning("payments_already_paid_by_transfers", root=root, count=len(matched),
                        from_block=start, to_block=head)

    def _owed(self, root: str) -> tuple[int, int]:
        """(payments still queued, their amount)."""
        c = self.ledger.counts([root])
        q = PaymentStatus.QUEUED.value
        return c.by_status.get(q, 0), c.amount_by_status.get(q, 0)

    def _paying_through(self) -> str | None:
        return paying_through(self.cfg)

    def _blacklisted(self, contract: str | None) -> str | None:
        return blacklisted_party(self.chain, self.cfg.token, self.payer, contract)

    def _check_funds(self, root: str) -> int:
        """What is still owed, once the payer is known to be able to pay it."""
        n, owed = self._owed(root)
        if owed:
            check_funds(self.chain, self.cfg, self.payer, n, owed)
        return owed

    # --- allowance ------------------------------------------------------------------------

    def _approve_call(self, spender: str, amount: int) -> tuple[str, int]:
        """Calldata and gas limit of the payer's ``approve(spender, amount)`` on the token
        (the node's estimate: NodeError, Reverted among them, when it refuses)."""
        data = ch.enc_approve(spender, amount)
        return data, policy.batch_gas_limit(self.chain.estimate_gas(self.payer,
                                                                    self.cfg.token, data))

    def _set_allowance(self, amount: int) -> None:
        """Allowance of the batch contract = exactly what is still to be sent, never more;
        waits until the approval is mined so that batch simulations see it."""
        assert self.cfg.batch_contract is not None
        current = self.chain.allowance(self.cfg.token, self.payer, self.cfg.batch_contract)
        if current == amount:
            return
        try:
            data, gas = self._approve_call(self.cfg.batch_contract, amount)
        except ch.Reverted as e:
            raise FailClosed(f"token {self.cfg.token} refuses approve: "
                             f"{ch.decode_revert(e.data)[1]}") from None
        self._sign_and_send(kind="approve", root=None, to=self.cfg.token, data=data, gas=gas,
                            rows=(), amount=amount)
        log.info("allowance_set", spender=self.cfg.batch_contract, amount=str(amount))
        # Batches are simulated against the latest state, so the approval must be mined.
        while any(t.status == TxStatus.PENDING.value for t in self.ledger.open_txs(self.payer)):
            if self.should_stop():
                raise Interrupted("stopped by operator while the approval was pending")
            if self._poll():
                self._idle = 0.0
            else:
                self._wait()

    def _withdraw_unused_allowances(self) -> None:
        """An allowance this run does not pay through is owed nothing (invariant 2): a batch
        run cut short and resumed in direct mode, or with another DISBURSER_BATCH_CONTRACT,
        left one at what was then owed. Each spender this ledger approved on the token,
        other than the batch contract of this run, is set back to 0 (without waiting: its
        nonce comes before any payment of this run)."""
        using = (self._paying_through() or "").lower()
        for spender in sorted(self.ledger.approved_spenders(self.payer, self.cfg.token)):
            if spender == using or self.chain.allowance(self.cfg.token, self.payer,
                                                        spender) == 0:
                continue
            try:
                data, gas = self._approve_call(spender, 0)
            except ch.NodeError as e:
                # A paused token refuses approve: the funds check says so next; the
                # allowance is withdrawn by a later run.
                log.warning("allowance_not_withdrawn", spender=spender, error=str(e))
                continue
            self._sign_and_send(kind="approve", root=None, to=self.cfg.token, data=data,
                                gas=gas, rows=(), amount=0)
            log.info("allowance_withdrawn", spender=spender, reason="not used by this run")

    def _withdraw_allowance_on_stop(self) -> None:
        """On Ctrl-C/SIGTERM in batch mode: sign and broadcast approve(0) without waiting.
        Its nonce is after every batch in flight, so they still execute; the next run
        settles it like any open transaction before approving again."""
        if self.cfg.mode is not Mode.BATCH or self.cfg.batch_contract is None:
            return
        try:
            if self.chain.allowance(self.cfg.token, self.payer, self.cfg.batch_contract) == 0:
                return
            if any(t.kind == "approve" for t in self.ledger.open_txs(self.payer)):
                return
            data, gas = self._approve_call(self.cfg.batch_contract, 0)
            self._sign_and_send(kind="approve", root=None, to=self.cfg.token, data=data,
                                gas=gas, rows=(), amount=0)
            log.info("allowance_withdrawn_on_stop", spender=self.cfg.batch_contract)
        except ch.NodeError as e:
            # A paused token refuses approve; the allowance stays at what is still owed.
            log.warning("allowance_not_withdrawn", error=str(e))

    # --- filling the pipeline ------------------------------------------------------------

    def _fill(self, m: Manifest) -> bool:
        changed = False
        if self._base_fee_above_cap():  # said even when the pipeline is full
            return changed
        # Only unmined transactions count: the node's per-sender limit (geth: 16) is on its
        # pool, and mined-but-shallow ones wait for depth without holding a slot.
        while (pending := self.ledger.pending_count(self.payer)) < self.cfg.max_in_flight:
            if self.should_stop():
                return changed
            if self._base_fee_above_cap():
                return changed
            slots = self.cfg.max_in_flight - pending
            if self._broadcaster_on():
                # Small windows keep the node fed: measuring and signing 16 batches takes
                # ~0.1 s, time in which the node would have mined four; the loop goes on
                # with the next window while the broadcasting thread sends this one. With
                # nothing in flight, one batch first: the node starts on it at once.
                slots = min(slots, WINDOW if pending else 1)
            sent = (self._send_batches(m, slots) if self.cfg.mode is Mode.BATCH
                    else self._send_direct(m, slots))
            if not sent:
                break
            changed = True
        return changed

    def _base_fee_above_cap(self) -> bool:
        """While the base fee is above DISBURSER_MAX_FEE_GWEI a new transaction could only be
        signed at the cap, which no block accepts: it would bind payments and a nonce for
        nothing (and Anvil refuses it outright). Sign no new batch or transfer until the base
        fee is back under the cap; say so once per episode. The approvals (of the batch
        contract before the first batch, of 0 at the end) are not held back here: an
        approval binds no payment."""
        base_fee = _next_base_fee(self.cfg.chain_id, self._head_now())
        # The cap of the next transaction: the operator's, or lower where gas x fee would
        # pass the node's per-transaction fee cap (a full batch).
        if self.cfg.mode is Mode.BATCH:
            gas = policy.gas_limit_from_used(BATCH_FIXED_GAS + self._per_recipient
                                             * max(1, self._batch_size))
        else:
            gas = DIRECT_GAS
        cap = self._fee_cap(min(gas, policy.TX_GAS_CAP))
        if policy.priced_out(cap, base_fee):
            if not self._base_fee_over_cap:
                self._base_fee_over_cap = True
                log.warning("fee_cap_below_base_fee_waiting", base_fee=base_fee, cap=cap)
            return True
        if self._base_fee_over_cap:
            self._base_fee_over_cap = False
            log.info("base_fee_back_under_cap", base_fee=base_fee, cap=self.cfg.max_fee_wei)
        return False

    def _send_batches(self, m: Manifest, slots: int) -> bool:
        """Up to ``slots`` batches. All of them are measured first in one round trip (each
        run on its own against the latest state by GasMeter: what the payer's transaction
        would do and the gas it would use), then all are signed and written ahead in one
        database transaction and broadcast one request each (the node starts on the first
        while the others are on their way). Measuring each on its own is sound because the
        batches hold distinct payments, the allowance is what all of them owe and the
        balance was checked to cover it; a batch that ran after another can only cost less
        (its recipients are no longer fresh).
        A batch the meter does not vouch for (it fails, or the node gave no usable answer)
        goes through the exact simulation, which isolates failures; the window ends there
        and the next fill measures again."""
        head = self._head_now()
        size = self._current_batch_size(head)
        rows = self.ledger.queued(m.root, limit=size * max(1, slots))
        if not rows:
            return False
        assert self.cfg.batch_contract is not None
        groups = [rows[i:i + size] for i in range(0, len(rows), size)]
        datas = [self._enc_batch(m.root, g) for g in groups]
        measured = self._measure(self.cfg.batch_contract, datas)
        items: list[tuple[str, int, Sequence[Queued], int]] = []
        exact = False
        for g, data, got in zip(groups, datas, measured, strict=True):
            gas = policy.gas_limit_from_used(got[1]) if got is not None and got[0] else None
            if gas is None or gas > min(policy.TX_GAS_CAP, head.gas_limit):
                exact = True  # a failure to isolate, or a batch to resize
                break
            assert got is not None
            self._learn_per_recipient(got[1], len(g))
            items.append((data, gas, g, sum(int(r.amount) for r in g)))
        if items:
            # Written ahead together (one fsync), then broadcast one request each: the node
            # starts on the first while the others are on their way.
            self._sign_and_send_many(kind="batch", root=m.root, to=self.cfg.batch_contract,
                                     items=items, program=m.program, one_by_one=True)
        if exact and not self.should_stop():
            self._send_batch(m)
        return True

    def _current_batch_size(self, head: ch.Head) -> int:
        cap = policy.pack_batch_size(head.gas_limit, self._per_recipient, BATCH_FIXED_GAS)
        return max(1, min(self._batch_size, cap))

    def _enc_batch(self, root: str, rows: Sequence[Queued]) -> str:
        assert self.cfg.batch_contract is not None
        return ch.enc_disburse(self.cfg.token, root, [r.idx for r in rows],
                               [r.to for r in rows], [int(r.amount) for r in rows])

    def _learn_per_recipient(self, used: int, n: int) -> None:
        if n >= 20:
            # Learn the real cost per payment (fresh holders or not) for packing.
            self._per_recipient = max(1, (used - BATCH_FIXED_GAS // 2) // n)

    def _measure(self, to: str, datas: Sequence[str]) -> list[tuple[bool, int, bytes] | None]:
        """GasMeter's answers for ``datas`` (see RpcChain.measure_many); all None when the
        node cannot run it (no eth_call state overrides), which is then not asked again.
        Judged on the first usable answer, or on METER_TRIES windows in a row without one
        (a node error at the first window is not taken for a node that cannot do it);
        meanwhile each batch is simulated the exact way (slower, never less safe)."""
        if self._meter is False:
            return [None] * len(datas)
        error = "no usable answer to eth_call with a state override"
        try:
            got = self.chain.measure_many(self.payer, to, datas)
        except ch.NodeError as e:
            got, error = [None] * len(datas), str(e)[:120]
        if self._meter is None:
            if got and got[0] is not None:
                self._meter = True
            else:
                self._meter_misses += 1
                if self._meter_misses >= METER_TRIES:
                    self._meter = False
                    log.info("gas_meter_unavailable", error=error,
                             simulating_with="eth_estimateGas" if self._simulate_v1 is False
                             else "eth_simulateV1")
        return got

    def _send_batch(self, m: Manifest) -> bool:
        """One batch from the head of the queue through the exact simulation
        (eth_simulateV1, else eth_estimateGas): failures are isolated here."""
        head = self._head_now()
        size = self._current_batch_size(head)
        while True:
            rows = self.ledger.queued(m.root, limit=size)
            if not rows:
                return False
            assert self.cfg.batch_contract is not None
            data = self._enc_batch(m.root, rows)
            try:
                gas, used, _ = self._gas_for(self.cfg.batch_contract, data)
            except ch.Reverted as e:
                self._isolate_failure(m.root, rows, e.data)
                continue
            if gas > min(policy.TX_GAS_CAP, head.gas_limit):
                size = policy.split(len(rows))[0] or 1
                self._batch_size = size
                log.info("batch_size_reduced", size=size, gas=gas)
                continue
            if used:
                self._learn_per_recipient(used, len(rows))
            self._sign_and_send(kind="batch", root=m.root, to=self.cfg.batch_contract, data=data,
                                gas=gas, rows=rows, amount=sum(int(r.amount) for r in rows),
                                program=m.program)
            return True

    def _gas_for(self, to: str, data: str) -> tuple[int, int | None, bytes]:
        """Simulate a call from the payer: (gas limit to sign, gas used if known, return
        data), or raise Reverted with the revert data. eth_simulateV1 runs the call once
        (eth_estimateGas runs it a dozen times in its search: half the send time at 500
        payments a batch); nodes without it get eth_estimateGas."""
        if self._simulate_v1 is not False:
            try:
                ok, used, ret = self.chain.simulate(self.payer, to, data)
                self._simulate_v1 = True
            except ch.Reverted:
                raise
            except ch.NodeError as e:
                if self._simulate_v1:
                    raise
                log.info("simulate_v1_unavailable", error=str(e)[:120])
                self._simulate_v1 = False
            else:
                if not ok:
                    raise ch.Reverted("execution reverted", 3, ret)
                return policy.gas_limit_from_used(used), used, ret
        estimate = self.chain.estimate_gas(self.payer, to, data)
        return policy.batch_gas_limit(estimate), None, self.chain.call(to, data, self.payer)

    def _send_direct(self, m: Manifest, slots: int) -> bool:
        """Up to ``slots`` transfers: simulated together in one request (one after the other,
        as they will run), signed, written ahead together, broadcast in one batch."""
        rows = self.ledger.queued(m.root, limit=max(1, slots))
        if not rows:
            return False
        datas = [ch.enc_transfer(r.to, int(r.amount)) for r in rows]
        sims = self._simulate_transfers(datas)
        if sims is None:  # no eth_simulateV1: one payment at a time
            rows, datas = rows[:1], datas[:1]
            try:
                gas, _, returned = self._gas_for(self.cfg.token, datas[0])
            except ch.Reverted as e:
                self._isolate_failure(m.root, rows, e.data)
                return True
            sims = [(True, gas, returned)]
        items: list[tuple[str, int, Sequence[Queued], int]] = []
        for r, data, (ok, gas, returned) in zip(rows, datas, sims, strict=True):
            if not ok:
                # Each transfer is simulated on its own state: the culprit is this one.
                self._isolate_failure(m.root, [r], returned)
                break  # later simulations saw a state without this transfer: redo them
            if len(returned) >= 32 and not any(returned[:32]):
                # A token may refuse by returning false instead of reverting: a mined
                # transaction would then look paid while nothing moved.
                log.warning("payment_failed", root=m.root, idx=r.idx,
                            reason="token returned false")
                self.ledger.mark_failed(m.root, r.idx, "token returned false")
                break
            items.append((data, gas, [r], int(r.amount)))
        if items:
            self._sign_and_send_many(kind="direct", root=m.root, to=self.cfg.token,
                                     items=items, program=m.program)
        return True

    def _simulate_transfers(self, datas: Sequence[str]) -> list[tuple[bool, int, bytes]] | None:
        """Gas limits and outcomes of transfers run in sequence, or None without
        eth_simulateV1."""
        if self._simulate_v1 is False:
            return None
        try:
            sims = self.chain.simulate_many(self.payer, self.cfg.token, datas)
            self._simulate_v1 = True
        except ch.NodeError as e:
            if self._simulate_v1:
                raise
            log.info("simulate_v1_unavailable", error=str(e)[:120])
            self._simulate_v1 = False
            return None
        return [(ok, policy.gas_limit_from_used(used), ret) for ok, used, ret in sims]

    def _isolate_failure(self, root: str, rows: Sequence[Queued], data: bytes) -> None:
        """A simulation failed. A paused token or a short balance stops the run; otherwise
        the payment at fault is marked failed with the token's reason and the rest go on."""
        index, reason = ch.decode_revert(data)
        self._fail_closed_if_global(reason)
        if index is None and len(rows) > 1:
            index = self._bisect(root, rows)
            if index is None:
                # The batch fails but no payment fails alone (an allowance or balance short
                # for the sum, a lagging node): blaming one recipient would be a guess.
                raise FailClosed(
                    f"a batch of {len(rows)} payments of {root} fails in simulation "
                    f"({reason}) but no single payment does; stopped before sending it")
            reason = self._reason_of(rows, index)
            self._fail_closed_if_global(reason)  # a short balance shows only now
        if index is None:
            index = rows[0].idx
        log.warning("payment_failed", root=root, idx=index, reason=reason)
        self.ledger.mark_failed(root, index, reason)

    def _fail_closed_if_global(self, reason: str) -> None:
        if self.chain.paused(self.cfg.token):
            # Also reached mid-run (a batch reverted because the token was paused after it
            # was signed): what is already in flight stays in the ledger and is settled by
            # the next run, so the message must not claim that nothing was sent.
            raise FailClosed(f"token {self.cfg.token} is paused; stopped before sending any "
                             "more. Run `send` again once it is unpaused")
        # Blacklisted after the run began: every recipient would be blamed in turn.
        if hit := self._blacklisted(self._paying_through()):
            raise FailClosed(f"the token {self.cfg.token} blacklists the {hit}; stopped "
                             "before sending any more. Run `send` again once it is lifted")
        low = reason.lower()
        # OpenZeppelin before 4.7 "exceeds balance/allowance", from 4.7 "insufficient
        # allowance", from 5 custom errors (chain.decode_revert words them the older way).
        if any(w in low for w in ("exceeds balance", "exceeds allowance",
                                  "insufficient balance", "insufficient allowance")):
            what = "batch" if self.cfg.mode is Mode.BATCH else "transfer"
            check = "balance" if "balance" in low else "allowance to the batch contract"
            raise FailClosed(f"token {self.cfg.token} refused the {what}: {reason}; "
                             f"check the payer's {check} and run `send` again")

    def _simulate(self, rows: Sequence[Queued], root: str) -> bytes | None:
        if self.cfg.mode is Mode.DIRECT:
            data, to = ch.enc_transfer(rows[0].to, int(rows[0].amount)), self.cfg.token
        else:
            assert self.cfg.batch_contract is not None
            to = self.cfg.batch_contract
            data = ch.enc_disburse(self.cfg.token, root, [r.idx for r in rows],
                                   [r.to for r in rows], [int(r.amount) for r in rows])
        try:
            self.chain.call(to, data, self.payer)
            return None
        except ch.Reverted as e:
            return bytes(e.data)

    def _bisect(self, root: str, rows: Sequence[Queued]) -> int | None:
        """Split a failing batch until one payment is left that fails alone."""
        while len(rows) > 1:
            a, _ = policy.split(len(rows))
            left = rows[:a]
            rows = left if self._simulate(left, root) is not None else rows[a:]
        return rows[0].idx if self._simulate(rows, root) is not None else None

    def _reason_of(self, rows: Sequence[Queued], index: int | None) -> str:
        for r in rows:
            if r.idx == index:
                data = self._simulate([r], r.root)
                return ch.decode_revert(data or b"")[1]
        return "simulation failed"

    # --- sign, persist, broadcast -------------------------------------------------------

    def _next_nonce(self) -> int:
        nxt = self.ledger.next_nonce(self.payer)
        if nxt is None:
            nxt = self.ledger.first_nonce(self.payer, self.chain.nonce(self.payer, "latest"))
        return nxt

    def _sign_and_send(self, *, kind: str, root: str | None, to: str, data: str, gas: int,
                       rows: Sequence[Queued], amount: int, program: str | None = None
                       ) -> None:
        self._sign_and_send_many(kind=kind, root=root, to=to,
                                 items=[(data, gas, rows, amount)], program=program)

    def _sign_and_send_many(self, *, kind: str, root: str | None, to: str,
                            items: Sequence[tuple[str, int, Sequence[Queued], int]],
                            program: str | None = None, one_by_one: bool = False) -> None:
        """Sign transactions at consecutive nonces, write them all ahead in one database
        transaction, then broadcast them: several in one JSON-RPC batch, or ``one_by_one``
        (batches: ~95 kB each, and a node refuses requests over a few MB) by the
        broadcasting thread where there is one, which sends them in nonce order (two
        at a time where they fit one block together) while this thread goes on; their
        outcomes are handled by the next poll. Anything else first waits for that thread to
        finish, so that nonces go out in order."""
        bcast = self._broadcaster() if one_by_one else None
        if bcast is None:
            self._flush_broadcasts()
        if program is not None:
            # Invariant 2, checked again at signing time.
            self.ledger.check_ceiling(program, self.cfg.ceiling)
        head = self._head_now()
        nonce = self._next_nonce()
        new: list[NewTx] = []
        for k, (data, gas, rows, amount) in enumerate(items):
            fees = policy.initial_fees(head.base_fee, self.cfg.priority_fee_wei,
                                       self._fee_cap(gas))
            next_base = _next_base_fee(self.cfg.chain_id, head)
            if policy.priced_out(fees.max_fee, next_base):
                log.warning("fee_cap_below_base_fee", base_fee=next_base, max_fee=fees.max_fee)
            signed = self.signer.sign_tx(chain_id=self.cfg.chain_id, nonce=nonce + k, to=to,
                                         data=data, gas=gas, max_fee=fees.max_fee,
                                         tip=fees.tip)
            new.append(NewTx(payer=self.payer, nonce=nonce + k, kind=kind, root=root, to=to,
                             data=data, gas_limit=gas, raw=signed.raw, tx_hash=signed.hash,
                             max_fee=fees.max_fee, tip=fees.tip,
                             idxs=tuple(r.idx for r in rows), amount=amount))
        ids = self.ledger.record_txs(new)
        self._crash_point("after_record")
        for tx_id, n in zip(ids, new, strict=True):
            self._sent_at_block[tx_id] = head.number
            self._txs_sent += 1
            log.info("transfer_signed", kind=kind, nonce=n.nonce, tx_hash=n.tx_hash,
                     count=len(n.idxs), amount=str(n.amount), gas=n.gas_limit,
                     max_fee=n.max_fee, tip=n.tip)
        if bcast is not None:
            self.broadcast_any = True
            out = [Outgoing(tx_id, n.nonce, n.raw, n.tx_hash, last_of_window=k == len(new) - 1)
                   for k, (tx_id, n) in enumerate(zip(ids, new, strict=True))]
            k = 0
            while k < len(out):
                # Two together only where they fit one block together (see broadcast.py).
                two = (not self._one_at_a_time and k + 1 < len(out)
                       and new[k].gas_limit + new[k + 1].gas_limit <= head.gas_limit)
                bcast.put(*out[k:k + 2 if two else k + 1])
                k += 2 if two else 1
            return  # "after_broadcast" is passed once the window's last send is handled
        if len(new) == 1 or one_by_one:
            for tx_id, n in zip(ids, new, strict=True):
                self._broadcast(tx_id, n.nonce, n.raw, n.tx_hash)
        else:
            self.broadcast_any = True
            try:
                results: list[Any] = self.chain.send_raw_many([n.raw for n in new])
            except DisburserError as e:
                # The whole batch request failed (unreachable, rate limited, too large):
                # ambiguous for every transaction in it. The poll looks each one up and
                # re-sends its stored bytes alone.
                log.warning("transfer_batch_broadcast_unknown", count=len(new), error=str(e))
                results = [RpcError(str(e))] * len(new)
            for tx_id, n, res in zip(ids, new, results, strict=True):
                if isinstance(res, Exception):
                    self._broadcast_failed(res, n.nonce, n.tx_hash, others_pending=False)
                else:
                    self._broadcast_accepted(tx_id, n.nonce, n.tx_hash)
        self._crash_point("after_broadcast")

    def _broadcaster(self) -> Broadcaster | None:
        if self._bcast is None:
            fork = getattr(self.chain, "for_thread", None)
            client = fork() if fork is not None else None
            if client is not None:
                later_first = client.mines_on_arrival()
                log.info("broadcasting", pairs_later_nonce_first=later_first)
                self._bcast = Broadcaster(_sender_of(client, later_first=later_first),
                                          on_close=getattr(client, "close", lambda: None))
            else:
                self._bcast = False
        return self._bcast if isinstance(self._bcast, Broadcaster) else None

    def _broadcaster_on(self) -> bool:
        return self.cfg.mode is Mode.BATCH and self._broadcaster() is not None

    def _outstanding(self) -> dict[int, Outgoing]:
        return self._bcast.outstanding if isinstance(self._bcast, Broadcaster) else {}

    def _collect_broadcasts(self, wait: float | None = None) -> bool:
        """Handle what the broadcasting thread has finished, as ``_broadcast`` would have.
        The sends that went out first (the later nonce of a pair may have gone out beside a
        failed earlier one), then failures in nonce order (one may stop the run), then the
        transactions held back are sent from here, in nonce order. True when anything came
        back."""
        bcast = self._bcast
        if not isinstance(bcast, Broadcaster) or not bcast.outstanding:
            return False
        got = bcast.results(wait)
        held: list[Outgoing] = []
        failed: list[tuple[Outgoing, Exception]] = []
        fatal: BaseException | None = None
        for item, err in got:
            if err is None:
                self._broadcast_accepted(item.tx_id, item.nonce, item.tx_hash)
            elif isinstance(err, NotSent):
                held.append(item)
            elif not isinstance(err, Exception):
                fatal = fatal or err  # raised once every send that went out is handled
            else:
                failed.append((item, err))
        if fatal is not None:
            raise fatal
        for item, err in sorted(failed, key=lambda f: f[0].nonce):
            self._broadcast_failed(err, item.nonce, item.tx_hash, others_pending=False)
        # A node that did not answer (after the transport's retries, minutes) is not asked
        # again here for each one held back: they stay written ahead, and the poll looks
        # them up and sends them again (or finds the node gone, and the run stops).
        unreachable = any(isinstance(err, RpcError) for _, err in failed)
        for item in sorted(held, key=lambda o: o.nonce):
            if unreachable:
                break
            unreachable = not self._broadcast(item.tx_id, item.nonce, item.raw, item.tx_hash)
        if held or failed:
            bcast.resume()
        # A window's broadcast is over, whatever its outcome, once its last send is back:
        # sends come back in nonce order, so every one before it is back too.
        for item, _ in got:
            if item.last_of_window:
                self._crash_point("after_broadcast")
        return bool(got)

    def _flush_broadcasts(self) -> None:
        while self._outstanding():
            self._collect_broadcasts(wait=1.0)

    def _broadcast(self, tx_id: int, nonce: int, raw: str, tx_hash: str,
                   *, others_pending: bool = False) -> bool:
        """Send stored bytes. ``others_pending``: another attempt at this nonce is in the
        node's pool, so a refusal of this one (a bump) leaves the nonce covered. False when
        the node did not answer at all."""
        self.broadcast_any = True
        try:
            self.chain.send_raw(raw)
        except DisburserError as e:
            self._broadcast_failed(e, nonce, tx_hash, others_pending=others_pending)
            return not isinstance(e, RpcError)
        self._broadcast_accepted(tx_id, nonce, tx_hash)
        return True

    def _broadcast_accepted(self, tx_id: int, nonce: int, tx_hash: str) -> None:
        log.info("transfer_broadcast", nonce=nonce, tx_hash=tx_hash)
        # Accepted into the node's pool just now: no pool lookup for LOOKUP_EVERY.
        self._pool_seen_at[tx_id] = self.clock()

    def _broadcast_failed(self, e: Exception, nonce: int, tx_hash: str, *,
                          others_pending: bool) -> None:
        """What a failed broadcast means: most answers are ambiguous and are resolved by the
        poll's lookups, never by re-signing; a definite refusal stops the run."""
        if isinstance(e, ch.AlreadyKnown):
            log.info("transfer_already_known", nonce=nonce, tx_hash=tx_hash)
        elif isinstance(e, ch.Underpriced):
            # A newer attempt at this nonce is in the pool, or the fee is below the node's
            # floor: the poll loop decides whether to bump. Or another signer's transaction
            # holds the nonce in the pool: a bump would replace it without a word.
            self._stop_if_pool_holds_a_foreign(nonce)
            log.info("transfer_underpriced", nonce=nonce, tx_hash=tx_hash, error=str(e))
        elif isinstance(e, ch.NonceTooHigh):
            if not any(t.nonce < nonce and t.status == TxStatus.PENDING.value
                       for t in self.ledger.open_txs(self.payer)):
                # Nothing of ours below it can fill the gap: the chain has not seen nonces
                # the ledger holds done (a node reset, another chain under the same id).
                raise FailClosed(
                    f"node refused transaction {tx_hash} at nonce {nonce}: {e}; the chain's "
                    f"nonce for {self.payer} is below what the ledger holds, and no "
                    "transaction of the ledger's can fill the gap (was the node reset, or "
                    "is this another chain?). Nothing more is sent") from None
            # A later nonce reached a node that keeps no gaps before the earlier one was in
            # its pool (a pair sent later nonce first, or the earlier one of the pair
            # failed): nothing at this nonce is in the pool, so the poll finds it missing
            # and sends the stored bytes again. No pairs from now on.
            self._one_at_a_time = True
            self._gap_refused.add(tx_hash)
            log.info("transfer_nonce_gap_refused", nonce=nonce, tx_hash=tx_hash,
                     error=str(e))
        elif isinstance(e, ch.NonceTooLow):
            # Mined already (by this attempt or another of ours) or taken by a foreign tx:
            # the poll resolves it by looking the hashes up, never by re-signing.
            log.info("transfer_nonce_used", nonce=nonce, tx_hash=tx_hash)
        elif isinstance(e, ch.InsufficientFunds):
            raise FailClosed(f"payer {self.payer} cannot pay gas for nonce {nonce}; fund it "
                             "with ETH and run `send` again") from None
        elif isinstance(e, (RpcError, ch.ServerTimeout)) or (
                isinstance(e, ch.NodeError) and ch.rate_limited(e)):
            # Ambiguous: the node may or may not have it (or throttled us, or gave up
            # waiting on itself). Looked up and re-sent at the next poll.
            log.warning("transfer_broadcast_unknown", nonce=nonce, tx_hash=tx_hash, error=str(e))
        elif isinstance(e, ch.NodeError):
            log.warning("transfer_broadcast_refused", nonce=nonce, tx_hash=tx_hash, error=str(e))
            if others_pending:
                return
            # A definite refusal (geth's tx fee cap, "txpool is full", "oversized data"...):
            # nothing at this nonce can be mined, and every later transaction would wait
            # behind the gap. Stop and say why instead of waiting forever.
            raise FailClosed(
                f"node refused transaction {tx_hash} at nonce {nonce}: {e}; nothing more is "
                "sent. Fix the cause and run `send` again (the same signed bytes are sent "
                "again, and those of any later transaction already signed)") from None
        else:
            raise e

    # --- polling ----------------------------------------------------------------------

    def _head_now(self) -> ch.Head:
        """The head fetched at the start of this step (one RPC a step, not one a use)."""
        if self._head is None:
            self._head = self.chain.head()
        return self._head

    def _poll(self) -> bool:
        """Advance every open transaction one step. True when anything changed."""
        self._head = None
        changed = self._collect_broadcasts()
        open_txs = self.ledger.open_txs(self.payer)
        if not open_txs:
            return changed
        head = self._head_now()
        self._watch_head(head.number, open_txs)
        lowest_pending = min((t.nonce for t in open_txs if t.status == TxStatus.PENDING.value),
                             default=None)
        # A transaction the broadcasting thread has not handed back is not looked at: the
        # node may not have it yet (it would look dropped), or may have mined it already.
        outstanding = self._outstanding()
        if outstanding:
            open_txs = [t for t in open_txs if t.id not in outstanding]
        # Receipts only appear, and blocks only leave the chain, when the head changes: a
        # transaction already looked up at this head (same hash: a reorg at the same height
        # changes it) is not asked about again until the next block, or LOOKUP_EVERY seconds
        # have passed (a node may drop a transaction from its pool between blocks). At 4
        # blocks a second and 20 polls a second this saves most lookups of a full pool.
        now = self.clock()
        open_ids = {t.id for t in open_txs}
        if not self._lookup_all_at <= now < self._lookup_all_at + LOOKUP_EVERY:
            # (also when the clock stepped back)
            self._looked_up, self._lookup_all_at = {}, now
        else:
            self._looked_up = {k: v for k, v in self._looked_up.items() if k in open_ids}
        open_txs = [t for t in open_txs if self._looked_up.get(t.id or 0) != head.hash]
        if not open_txs:
            return changed
        attempts = self.ledger.attempts_of([t.id for t in open_txs if t.id is not None])
        pending = [t for t in open_txs if t.status == TxStatus.PENDING.value]
        # The nonce is read only when a pending transaction is due for a check (see
        # _check_due): on a node mining back to back a state read waits for the block being
        # mined (~30 ms for a full batch), a wait that would hold up the next window. When
        # it is read, it is read before the receipts: a transaction below it was mined
        # before the receipts were asked for, so a missing receipt means a foreign
        # transaction (or a reorg), not a race with the block that was being mined
        # meanwhile; and only those below it can have a receipt, so a full pool of
        # transfers waiting for blocks costs no receipt lookups. When it is not, every
        # pending receipt is asked for, and a missing one waits for its next due check
        # (a nonce someone else used is then noticed that much later, like a drop).
        due = any(self._check_due(t, attempts[t.id or 0][-1], head, lowest_pending, now)
                  for t in pending)
        self._latest_nonce: int | None = (self.chain.nonce(self.payer, "latest")
                                          if due else None)
        if self._latest_nonce is not None:
            self._check_not_rolled_back(self._latest_nonce)
        hashes = [a.hash for t in pending
                  if self._latest_nonce is None or t.nonce < self._latest_nonce
                  for a in attempts[t.id or 0]]
        receipts = self.chain.receipts(hashes) if hashes else {}
        # One batched pool lookup for every attempt of every unmined transaction, rather
        # than a round trip per transaction in the loop below. Every attempt, not only the
        # latest: a replacement the node refused leaves the older attempt pending, and that
        # one still counts as "in the pool". A transaction seen in the pool less than
        # LOOKUP_EVERY seconds ago is not asked about again (a drop is noticed a second
        # later at most; _advance leaves the drop checks of those for later), unless the
        # next block's base fee passes its fee cap (a node drops such transactions: say so
        # now).
        self._pool_seen_at = {k: v for k, v in self._pool_seen_at.items() if k in open_ids}
        unmined = [a.hash for t in pending
                   if not any(receipts.get(a.hash) for a in attempts[t.id or 0])
                   and self._lookup_due(t, attempts[t.id or 0][-1], head, now)
                   for a in attempts[t.id or 0]]
        known = self.chain.known(unmined) if unmined else {}
        for t in pending:
            if any(known.get(a.hash) for a in attempts[t.id or 0]):
                self._pool_seen_at[t.id or 0] = now
        mined = [t for t in open_txs if t.status == TxStatus.MINED.value]
        canonical = self.chain.block_hashes([t.block_number for t in mined
                                             if t.block_number is not None]) if mined else {}
        to_bump: list[tuple[TxRow, Any]] = []
        # Mined/confirmed/reorged marks of this poll commit together (one fsync, not two per
        # transaction); a lost poll is re-derived from the chain. Bumps are written ahead
        # of their broadcast, so they run after this block, each in its own transaction.
        self._mined_now, self._deep_now = [], []
        with self.ledger.atomic():
            for t in open_txs:
                changed |= self._advance(t, attempts[t.id or 0], receipts, known, canonical,
                                         head, lowest_pending, to_bump)
            self._apply_mined(head)
        for t in open_txs:
            self._looked_up[t.id or 0] = head.hash
        for t, last in to_bump:
            changed |= self._bump(t, last, head)
        return changed

    def _advance(self, t: TxRow, atts: Sequence[Any], receipts: dict[str, ch.Receipt | None],
                 known: dict[str, bool], canonical: dict[int, str | None], head: ch.Head,
                 lowest_pending: int | None, to_bump: list[tuple[TxRow, Any]]) -> bool:
        """One open transaction, one step. True when anything changed."""
        assert t.id is not None
        if t.status == TxStatus.MINED.value:
            assert t.block_number is not None
            if canonical.get(t.block_number) != t.block_hash:
                log.warning("transfer_reorged", nonce=t.nonce, tx_hash=t.mined_hash,
                            block=t.block_number)
                self.ledger.mark_reorged(t.id)
                self._rebroadcast_all(t, atts)
                self._sent_at_block[t.id] = head.number
                return True
            if policy.is_deep(t.block_number, head.number, self.cfg.confirmations):
                self._deep_now.append(t)
                return True
            return False
        got = next((receipts[a.hash] for a in atts if receipts.get(a.hash)), None)
        if got is not None:
            self._mined_now.append((t, got))  # written by _apply_mined, all at once
            return True
        # No nonce read (nothing was due): neither a pool lookup nor a bump is due either.
        if self._latest_nonce is not None and t.nonce < self._latest_nonce:
            self._resolve_used_nonce(t, atts)
            return True
        changed = False
        last = atts[-1]
        priced_out = self._priced_out(last, head)
        if any(a.hash in known for a in atts) and not any(known.get(a.hash) for a in atts):
            if priced_out:
                # Neither mined nor pending because the base fee rose over its cap (Anvil
                # drops such transactions silently). Sending it now is refused: wait, and
                # send these same bytes once the base fee is back under the cap - one
                # warning, not one per poll.
                if last.hash not in self._priced_out_logged:
                    self._priced_out_logged.add(last.hash)
                    log.warning("transfer_priced_out_waiting", nonce=t.nonce,
                                tx_hash=last.hash, max_fee=int(last.max_fee),
                                base_fee=_next_base_fee(self.cfg.chain_id, head))
            else:
                # Dropped from the pool (or never arrived): the same bytes again.
                if last.hash in self._gap_refused:  # refused for a gap now filled
                    self._gap_refused.discard(last.hash)
                    log.info("transfer_resent_after_gap", nonce=t.nonce, tx_hash=last.hash)
                else:
                    log.warning("transfer_dropped_rebroadcast", nonce=t.nonce,
                                tx_hash=last.hash)
                assert self._latest_nonce is not None  # a pool lookup was due (_check_due)
                self._broadcast(t.id, t.nonce, self.ledger.attempt_raw(last.id), last.hash)
                changed = True
        if self._bump_due(t, last, head, lowest_pending, record=True):
            assert self._latest_nonce is not None  # a bump is due (_check_due)
            to_bump.append((t, last))
        return changed

    def _check_due(self, t: TxRow, last: Any, head: ch.Head, lowest_pending: int | None,
                   now: float) -> bool:
        """Whether pending ``t``, if it has no receipt, needs a decision this poll: a pool
        lookup or a bump, by the same rules as _poll's and _advance's (recording nothing).
        Only then is the chain's nonce needed; a used nonce with no receipt is noticed at
        that check."""
        return (self._lookup_due(t, last, head, now)
                or self._bump_due(t, last, head, lowest_pending, record=False))

    def _lookup_due(self, t: TxRow, last: Any, head: ch.Head, now: float) -> bool:
        """A pool lookup of pending ``t`` is due: not seen in the pool for LOOKUP_EVERY
        seconds, or priced out of the next block (a node drops such transactions: say so now).
        ``last``: its latest attempt."""
        seen = self._pool_seen_at.get(t.id or 0, -LOOKUP_EVERY)
        return (not seen <= now < seen + LOOKUP_EVERY
                or self._priced_out(last, head))

    def _bump_due(self, t: TxRow, last: Any, head: ch.Head, lowest_pending: int | None, *,
                  record: bool) -> bool:
        """A bump of pending ``t`` is due: it is the lowest pending transaction, or priced
        out, and still unmined bump_after_blocks blocks after its last attempt (the lowest:
        after it became the lowest, if later); priced out on a node that mines only on
        arrival, at once. ``record``: note the block where each wait began, as the poll's
        own pass does; else only look."""
        assert t.id is not None
        tx_id = t.id

        def began(at: dict[int, int]) -> int:
            return at.setdefault(tx_id, head.number) if record else at.get(tx_id, head.number)

        lowest = t.nonce == lowest_pending
        sent_at = began(self._sent_at_block)
        since = max(sent_at, began(self._lowest_since)) if lowest else sent_at
        priced_out = self._priced_out(last, head)
        if priced_out and self._mines_on_arrival():
            # The node dropped it, and blocks come only when a transaction arrives: the
            # blocks the rule below waits for would never come.
            return True
        return (lowest or priced_out) and \
            policy.should_bump(since, head.number, self.cfg.bump_after_blocks)

    def _priced_out(self, last: Any, head: ch.Head) -> bool:
        """``last`` (an attempt) cannot go into the next block: its fee cap is under that
        block's base fee (``_next_base_fee``, as the signing gate judges it)."""
        return policy.priced_out(int(last.max_fee), _next_base_fee(self.cfg.chain_id, head))

    def _mines_on_arrival(self) -> bool:
        """Whether the node makes a block only when a transaction arrives (Anvil's
        automine), asked again after LOOKUP_EVERY seconds (a devnet can be switched)."""
        now = self.clock()
        if self._on_arrival is None or now - self._on_arrival[0] >= LOOKUP_EVERY:
            ask = getattr(self.chain, "mines_on_arrival", None)
            self._on_arrival = (now, bool(ask()) if ask is not None else False)
        return self._on_arrival[1]

    def _apply_mined(self, head: ch.Head) -> None:
        """The poll's receipts and depths, written in a few statements (a poll can see
        hundreds of direct transfers mined): pending -> mined, then mined and deep ->
        confirmed or reverted."""
        mined = self._mined_now
        self.ledger.mark_mined_many([
            Mined(t.id or 0, r.tx_hash, r.block_number, r.block_hash, r.status, r.gas_used)
            for t, r in mined])
        for t, r in mined:
            log.info("transfer_mined", nonce=t.nonce, tx_hash=r.tx_hash, block=r.block_number,
                     status=r.status, gas_used=r.gas_used)
            self._crash_point("after_mined")
            if policy.is_deep(r.block_number, head.number, self.cfg.confirmations):
                # Deep already (confirmations 1): no need to wait for the next poll. The
                # receipt came from the canonical chain a moment ago.
                t.mined_hash = r.tx_hash
                self._deep_now.append(t)
        deep = self._deep_now
        finals = self.ledger.finalize_many([t.id or 0 for t in deep])
        if deep:
            self._final_nonce = max(self._final_nonce if self._final_nonce is not None else -1,
                                    *(t.nonce for t in deep))
        for t in deep:
            self._crash_point("after_confirm")
            final = finals[t.id or 0]
            log.info("transfer_confirmed" if final is TxStatus.CONFIRMED
                     else "transfer_reverted",
                     nonce=t.nonce, tx_hash=t.mined_hash, count=t.count, amount=t.amount)
        self._mined_now, self._deep_now = [], []

    def _check_not_rolled_back(self, latest: int) -> None:
        """The chain's nonce at or below a nonce this ledger holds final (confirmed at depth)
        means the chain went back deeper than the confirmations: a node reset or restored
        from an old state, or a deep reorg. What the lost transactions paid is not known
        here, and the pending ones behind the gap can never be mined: stop, rather than
        bump them up to the fee cap and wait for ever (``sync_nonces`` refuses the next
        run the same way). Only once it lasts NONCE_BEHIND_WAIT seconds: a node behind a
        load balancer may answer from behind for a moment."""
        final = self._final_nonce
        if final is None or latest > final:
            self._behind_since = None
            return
        if self._behind_since is None:
            self._behind_since = self.clock()
            log.warning("chain_nonce_behind_ledger", nonce=latest, final_nonce=final)
        if self.clock() - self._behind_since >= NONCE_BEHIND_WAIT:
            raise FailClosed(
                f"payer {self.payer}: the chain's nonce went back to {latest}, at or below "
                f"nonce {final} that this ledger holds confirmed at depth "
                f"{self.cfg.confirmations}: the chain was rolled back deeper than "
                "DISBURSER_CONFIRMATIONS (a node reset or restored from an old state, or a "
                "deep reorg), or the node lags that far behind. Stopped rather than "
                "guessing; the transactions in flight stay in the ledger. Check the node; "
                "`disburser reconcile` shows what the chain paid")

    def _watch_head(self, number: int, open_txs: Sequence[TxRow]) -> None:
        """Say so when the chain stops producing blocks while we wait for depth (a devnet
        that mines only on demand, a stalled node): silence would look like a hang."""
        now = self.clock()
        if number != self._head_seen:
            self._head_seen, self._head_since, self._stall_logged = number, now, False
        elif not self._stall_logged and now - self._head_since > STALL_SECONDS:
            self._stall_logged = True
            log.warning("no_new_blocks_waiting", head=number, seconds=int(now - self._head_since),
                        in_flight=len(open_txs), confirmations=self.cfg.confirmations)

    def _resolve_used_nonce(self, t: TxRow, attempts: Sequence[Any]) -> None:
        """The chain's nonce passed this transaction but no receipt was seen: look again
        (it may have been mined between the two queries); if none of our attempts is mined
        a foreign transaction took the nonce - stop."""
        assert t.id is not None
        receipts = self.chain.receipts([a.hash for a in attempts])
        got = next((r for r in receipts.values() if r is not None), None)
        if got is not None:
            self._mined_now.append((t, got))
            return
        if self.chain.nonce(self.payer, "latest") <= t.nonce:
            # The nonce went back (a reorg, or a node behind a load balancer that lags):
            # the transaction is not mined after all; it waits like any pending one.
            return
        served, h = self.chain.locate_nonce(self.payer, t.nonce)
        if served and h is None:
            raise FailClosed(
                f"payer {self.payer}: nonce {t.nonce} was used by a transaction more than 2000 "
                "blocks back, which this ledger did not send (none of its attempts has a "
                "receipt); its payments stay in flight. Stopping rather than guessing")
        if h is None or h.lower() in {a.hash.lower() for a in attempts}:
            # Ours, in a block whose receipts the node does not serve yet; or no block
            # served yet that holds the nonce (Anvil moves the nonce a moment before it
            # serves the block; a node behind a load balancer may answer the nonce from a
            # backend ahead of the one serving blocks). The next poll finds the receipt.
            # Not forever; and only a block holding another transaction is called foreign.
            since = self._receipt_missing_since.setdefault(t.id, self.clock())
            if self.clock() - since < RECEIPT_WAIT:
                log.info("transfer_mined_receipt_pending", nonce=t.nonce, tx_hash=h)
                return
            if h is None:
                raise FailClosed(
                    f"payer {self.payer}: the chain's nonce passed {t.nonce}, but for "
                    f"{RECEIPT_WAIT:.0f} s the node has served neither a receipt of this "
                    "ledger's transaction at that nonce nor a block holding it; its payments "
                    "stay in flight. Check the node (one behind a load balancer may serve "
                    "blocks from a backend that lags) and run `send` again")
            raise FailClosed(
                f"payer {self.payer}: transaction {h} at nonce {t.nonce} is in a block but "
                f"the node has served no receipt for it for {RECEIPT_WAIT:.0f} s; its "
                "payments stay in flight. Check the node (receipts indexing) and run `send` "
                "again")
        raise FailClosed(
            f"payer {self.payer}: nonce {t.nonce} was used by transaction {h}, which this "
            "ledger did not send; its payments stay in flight. Stopping rather than guessing")

    def _stop_if_pool_holds_a_foreign(self, nonce: int) -> None:
        """The node refused ours as underpriced: if what it holds at ``nonce`` is not one of
        this ledger's attempts, another signer uses the payer key (invariant 5: it stopped
        the run only once mined; until then our bumps could replace it). At most once a
        LOOKUP_EVERY per nonce (a reorg re-sends every attempt, the older ones refused so);
        a node without the txpool methods answers nothing, and the check is left to the
        mined nonce."""
        now = self.clock()
        if now - self._pool_owner_checked.get(nonce, -LOOKUP_EVERY) < LOOKUP_EVERY:
            return
        self._pool_owner_checked[nonce] = now
        t = self.ledger.tx_at(self.payer, nonce)
        ours = {a.hash.lower() for a in self.ledger.attempts(t.id or 0)} if t else set()
        h = self.chain.find_pending_tx(self.payer, nonce)
        if h is not None and h.lower() not in ours:
            raise FailClosed(
                f"payer {self.payer}: nonce {nonce} is taken by pending transaction {h}, "
                "which this ledger did not send; its payments stay in flight. Stopping "
                "rather than guessing")

    def _fee_cap(self, gas: int) -> int:
        """The operator's fee cap, lowered so that gas x max fee stays under the node's
        per-transaction fee cap (geth's rpc.txfeecap, 1 ETH by default): a 16M-gas batch
        at 100 gwei would be refused outright."""
        return policy.fee_cap(self.cfg.max_fee_wei, self.cfg.max_tx_fee_wei, gas)

    def _rebroadcast_all(self, t: TxRow, attempts: Sequence[Any]) -> None:
        # Not fatal here: if every attempt is refused, the next poll sees the nonce neither
        # mined nor pending and re-sends the latest, where a refusal stops the run.
        for a in reversed(attempts):
            self._broadcast(t.id or 0, t.nonce, self.ledger.attempt_raw(a.id), a.hash,
                            others_pending=True)

    def _bump(self, t: TxRow, last: Any, head: ch.Head) -> bool:
        assert t.id is not None
        old = policy.Fees(max_fee=int(last.max_fee), tip=int(last.tip))
        next_base = _next_base_fee(self.cfg.chain_id, head)
        new = policy.bump_fees(old, next_base, self._fee_cap(t.gas_limit))
        if new is None:
            if t.id not in self._at_cap_logged:
                self._at_cap_logged.add(t.id)
                log.warning("transfer_at_fee_cap_waiting", nonce=t.nonce, max_fee=old.max_fee,
                            base_fee=next_base, cap=self._fee_cap(t.gas_limit))
            return False
        signed = self.signer.sign_tx(chain_id=self.cfg.chain_id, nonce=t.nonce, to=t.to,
                                     data=self.ledger.tx_data(t.id), gas=t.gas_limit,
                                     max_fee=new.max_fee, tip=new.tip)
        self.ledger.add_attempt(t.id, raw=signed.raw, tx_hash=signed.hash, max_fee=new.max_fee,
                                tip=new.tip)
        self._crash_point("after_bump")  # written ahead, not broadcast
        self._sent_at_block[t.id] = head.number
        log.info("transfer_bumped", nonce=t.nonce, tx_hash=signed.hash, max_fee=new.max_fee,
                 tip=new.tip)
        self._broadcast(t.id, t.nonce, signed.raw, signed.hash, others_pending=True)
        return True


# Chains whose base fee follows Ethereum's EIP-1559 parameters (elasticity 2, an eighth a
# block): mainnet, Sepolia, Holesky, Hoodi and the local chains. Arbitrum's block gas limit
# (2^50) and the OP Stack's parameters would make the formula wrong there.
EIP1559_CHAINS = frozenset({1, 11155111, 17000, 560048, 31337, 1337})


def _next_base_fee(chain_id: int, head: ch.Head) -> int:
    """The base fee a transaction must meet to be included: on a chain of Ethereum's rules,
    the next block's as EIP-1559 sets it from the head, or the head's own where that is
    higher (never less careful than the head's own); elsewhere the head's own. Judged
    against the head's alone, a transaction a full block then priced out was sent again,
    dropped again, and on automine waited for a block (a benchmark run lost a second)."""
    if chain_id not in EIP1559_CHAINS:
        return head.base_fee
    return max(head.base_fee, policy.next_base_fee(head.base_fee, head.gas_used,
                                                   head.gas_limit))


def _sender_of(client: Any, *, later_first: bool) -> Send:
    """The broadcasting thread's send on ``client`` (see broadcast.py): one transaction
    alone; two in one JSON-RPC request, the later nonce first where ``later_first`` (a node
    that mines on arrival), else in nonce order. Outcomes come back in nonce order.

    - A request of two that fails in transport (unreachable after the retries) leaves both
      unknown: each gets an RpcError, and the poll looks them up and sends again what the
      node does not have.
    - A node that refuses a request of two as a whole (some providers take no JSON-RPC
      batches) gets them one at a time, in nonce order, from then on (only this once when
      it was a rate limit).
    - One of two still rate limited after the transport's retries (which send again only
      the elements refused) is sent again alone, with the transport's backoff.
    """
    batches_refused = False

    def one_by_one(raws: Sequence[str]) -> list[object]:
        out: list[object] = []
        for raw in raws:
            if out and isinstance(out[-1], BaseException):
                out.append(NotSent())  # after a failure nothing later goes out
                continue
            try:
                out.append(client.send_raw(raw))
            except DisburserError as e:
                out.append(e)
        return out

    def send(raws: Sequence[str]) -> Sequence[object]:
        nonlocal batches_refused
        if len(raws) == 1 or batches_refused:
            return one_by_one(raws)
        wire = list(raws[::-1]) if later_first else list(raws)
        try:
            got = list(client.send_raw_many(wire))
        except ch.NodeError as e:
            batches_refused = batches_refused or not ch.rate_limited(e)
            return one_by_one(raws)
        except DisburserError as e:
            return [RpcError(f"request of {len(raws)} transactions failed: {e}")] * len(raws)
        if later_first:
            got.reverse()
        for k, r in enumerate(got):
            if isinstance(r, ch.NodeError) and ch.rate_limited(r):
                got[k] = one_by_one([raws[k]])[0]
        return got
    return send


def check_chain_id(chain: ch.RpcChain, cfg: SendConfig) -> int:
    cid = chain.chain_id()
    if cid != cfg.chain_id:
        raise ChainMismatchError(
            f"node at {ch.display_url(chain.url)} is chain {cid}, settings say "
            f"{cfg.chain_id} (DISBURSER_CHAIN_ID / DISBURSER_NETWORK)")
    return cid


def check_chain(chain: ch.RpcChain, cfg: SendConfig) -> ch.Head:
    """Fail closed unless the chain, token and contract are what the settings say (every
    run, and ``send --dry-run``)."""
    cid = check_chain_id(chain, cfg)
    if not chain.code(cfg.token):
        raise ChainMismatchError(f"DISBURSER_TOKEN {cfg.token}: no contract on chain {cid}")
    ch.check_decimals(chain, cfg.token, cfg.decimals,
                      f": refusing to pay amounts built for {cfg.decimals}")
    if cfg.mode is Mode.BATCH:
        if cfg.batch_contract is None:
            raise ChainMismatchError(
                "DISBURSER_BATCH_CONTRACT is not set (run `disburser deploy`, or use "
                "--mode direct)")
        verify_batch_contract(chain, cfg.batch_contract)
    return chain.head()


def paying_through(cfg: SendConfig) -> str | None:
    """The batch contract a run pays through: none in direct mode, where a blacklisted
    batch contract (configured or not) stops nothing."""
    return cfg.batch_contract if cfg.mode is Mode.BATCH else None


def blacklisted_party(chain: ch.RpcChain, token: str, payer: str,
                      contract: str | None) -> str | None:
    """"payer 0x…" or "batch contract 0x…" when the token blacklists it (the payer first),
    else None: every recipient would otherwise be marked failed, one by one."""
    for who, what in ((payer, "payer"), (contract, "batch contract")):
        if who and chain.blacklisted(token, who):
            return f"{what} {who}"
    return None


def check_funds(chain: ch.RpcChain, cfg: SendConfig, payer: str, n: int, owed: int) -> None:
    """Fail closed unless ``payer`` can pay ``n`` payments of ``owed`` base units in all:
    the token not paused, neither the payer nor the batch contract it pays through
    blacklisted, the tokens and the gas at the current fees there (every run, and
    ``send --dry-run``)."""
    if chain.paused(cfg.token):
        raise FailClosed(f"token {cfg.token} is paused; no new transaction was signed. "
                         "Run `send` again once it is unpaused")
    if hit := blacklisted_party(chain, cfg.token, payer, paying_through(cfg)):
        raise FailClosed(f"the token {cfg.token} blacklists the {hit}; no new transaction was "
                         "signed")
    bal = chain.token_balance(cfg.token, payer)
    if bal < owed:
        raise FundsShortfall(
            f"payer {payer} holds {bal} base units of {cfg.token}, {owed} are still owed; "
            "fund it and run `send` again")
    head = chain.head()
    per = PER_RECIPIENT_GAS if cfg.mode is Mode.BATCH else 65_000
    fees = policy.initial_fees(head.base_fee, cfg.priority_fee_wei, cfg.max_fee_wei)
    need = (n * per + BATCH_FIXED_GAS) * fees.max_fee
    eth = chain.eth_balance(payer)
    if eth < need:
        raise FundsShortfall(
            f"payer {payer} has {eth} wei for gas, about {need} wei are needed at the "
            "current fees; fund it and run `send` again")


def verify_batch_contract(chain: ch.RpcChain, address: str) -> None:
    """The code at DISBURSER_BATCH_CONTRACT must be exactly our BatchPayout."""
    from disburser.artifacts import load_artifact

    want = load_artifact("BatchPayout")["deployedBytecode"]
    got = "0x" + chain.code(address).hex()
    if got.lower() != str(want).lower():
        raise ChainMismatchError(
            f"DISBURSER_BATCH_CONTRACT {address}: the code there is not disburser's "
            "BatchPayout (deploy it with `disburser deploy`)")


CRASH_POINTS = ("after_record", "after_broadcast", "after_mined", "after_confirm", "after_bump")


def _parse_crash_point(spec: str) -> list[Any] | None:
    """DISBURSER_TEST_CRASH_AT=POINT[:N], the fault tests' hook: SIGKILL at the Nth pass."""
    if not spec:
        return None
    name, _, n = spec.partition(":")
    if name not in CRASH_POINTS or not re.fullmatch(r"[1-9][0-9]{0,8}", n or "1"):
        raise SettingsError(f"DISBURSER_TEST_CRASH_AT: {spec[:40]!r} is not POINT[:N] with "
                            f"POINT one of {', '.join(CRASH_POINTS)} (a test hook: unset it)")
    return [name, int(n or "1")]


def config_from_settings(s: Any, mode: Mode, program: str | None) -> SendConfig:
    """SendConfig from validated Settings, for one program's ceiling (None: no payment is
    made, as for `deploy`: ceiling 0)."""
    return SendConfig(
        mode=mode, chain_id=s.chain_id, token=s.token, decimals=s.decimals,
        batch_contract=s.batch_contract, confirmations=s.confirmations,
        max_in_flight=s.max_in_flight, batch_size=s.batch_size,
        bump_after_blocks=s.bump_after_blocks, max_fee_wei=s.max_fee_wei,
        max_tx_fee_wei=s.max_tx_fee_wei,
        priority_fee_wei=s.priority_fee_wei, poll_interval=s.poll_interval,
        ceiling=s.ceilings.for_program(program) if program is not None else 0,
        from_block=s.from_block,
    )


def check_nonces(chain: ch.RpcChain, ledger: Ledger | None, payer: str, *, latest: int,
                 pending: int, first: int) -> int | None:
    """Fail closed unless the chain's nonces of ``payer`` are where ``ledger`` left them
    (``first``: the nonce it started from; no ledger: one that starts now); the deepest nonce
    it holds final. Reads only: the dry run checks what the real run will."""
    txs = ledger.txs(payer) if ledger is not None else []  # in nonce order
    ours_next = txs[-1].nonce + 1 if txs else first
    deepest = max((t.nonce for t in txs
                   if t.status in (TxStatus.CONFIRMED.value, TxStatus.REVERTED.value)),
                  default=None)
    if ledger is not None and deepest is not None and deepest >= latest:
        # Confirmed at depth in this ledger, absent from this chain: the ledger belongs to
        # another chain (or the chain was reset). Sending would open a nonce gap.
        raise FailClosed(
            f"payer {payer}: the ledger has nonce {deepest} confirmed but the chain's "
            f"nonce is {latest}: this ledger ({ledger.url_display}) is not for this "
            "chain; use the ledger of this chain")
    if latest > ours_next:
        foreign = ours_next
        h = chain.find_tx_by_nonce(payer, foreign)
        raise FailClosed(
            f"payer {payer}: nonce {foreign} was used by transaction "
            f"{h or '(hash not found in recent blocks)'} that this ledger did not send; "
            "stopping rather than guessing (another wallet or process uses this key, or "
            "this ledger is an older copy of the one that sent it)")
    if pending > max(latest, ours_next):
        # Name the transaction, not just the nonce: the operator has to find who else
        # signs with this key before anything more is sent from it.
        foreign = max(latest, ours_next)
        h = chain.find_pending_tx(payer, foreign)
        raise FailClosed(
            f"payer {payer}: nonce {foreign} is taken by pending transaction "
            f"{h or '(hash not found in the node pool)'}, which this ledger did not send "
            f"(the node holds pending transactions up to nonce {pending - 1}); stopping "
            "rather than guessing")
    return deepest


def deploy_batch_contract(ledger: Ledger, chain: ch.RpcChain, signer: Signer, s: Any) -> str:
    """Deploy BatchPayout from the payer through the ledger's write-ahead path (the payer's
    nonces belong to the ledger), wait for confirmation and verify the code."""
    import rlp
    from eth_hash.auto import keccak
    from eth_utils import to_checksum_address

    from disburser.artifacts import load_artifact

    def created_at(nonce: int) -> str:  # CREATE address: keccak(rlp([sender, nonce]))[12:]
        return str(to_checksum_address(
            keccak(rlp.encode([bytes.fromhex(signer.address[2:]), nonce]))[12:]))

    sender = Sender(ledger, chain, signer, config_from_settings(s, Mode.DIRECT, None))
    with sender.exit_1_once_sent():
        sender.preflight_chain_only()
        sender.sync_nonces()
        sender._drain()
        # A deployment this ledger already made (a run killed after its broadcast, settled
        # by the drain above; or an earlier `deploy`) is the answer: a second contract
        # would waste gas and split the paid bitmap between two addresses. One whose code
        # is not this BatchPayout (an older build) does not count.
        for done in reversed(ledger.txs(signer.address)):
            if done.kind == "deploy" and done.status == TxStatus.CONFIRMED.value:
                try:
                    verify_batch_contract(chain, created_at(done.nonce))
                except ChainMismatchError:
                    continue
                log.info("batch_contract_already_deployed", address=created_at(done.nonce),
                         nonce=done.nonce)
                return created_at(done.nonce)
        nonce = sender._next_nonce()
        code = str(load_artifact("BatchPayout")["bytecode"])
        gas = policy.batch_gas_limit(chain.estimate_gas_create(signer.address, code))
        sender._sign_and_send(kind="deploy", root=None, to="", data=code, gas=gas, rows=(),
                              amount=0)
        sender._drain()
        tx = ledger.tx_at(signer.address, nonce)
        if tx is None or tx.status != TxStatus.CONFIRMED.value:
            raise FailClosed(f"deployment at nonce {nonce} did not succeed")
        address = created_at(nonce)
        # Inside: a check that fails (a lagging node with no code yet) after the deployment
        # went out is exit 1, not the "nothing was sent" of exit 2.
        verify_batch_contract(chain, address)
    log.info("batch_contract_deployed", address=address, nonce=nonce)
    return address
