"""The ledger: sqlmodel tables on SQLite (WAL) and the only code that opens a Session.

Every state change is a guarded compare-and-set (``UPDATE ... WHERE status IN (...)``) and
is written in the same database transaction as the event that records it. Amounts are
stored as decimal TEXT: 3x10^26 base units (18-decimal tokens) do not fit SQLite's int64.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Index,
    Integer,
    Numeric,
    Table,
    UniqueConstraint,
    bindparam,
    event,
    func,
    insert,
    inspect,
    literal,
    text,
    update,
)
from sqlalchemy import cast as sa_cast
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import defer
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from disburser.domain import Manifest, PaymentStatus, TxStatus
from disburser.errors import (
    CeilingError,
    DisburserError,
    LedgerUnavailable,
    LockedError,
    SettingsError,
)
from disburser.manifest import to_json

# Why a payment is paid_elsewhere: found by the batch contract's bitmap (certain: keyed by
# paymentsRoot and index), or by a Transfer log from the payer of its amount to its
# recipient that this ledger did not send (as reconcile matches them).
PAID_BY_BITMAP = "already paid on chain (batch contract bitmap)"
PAID_BY_TRANSFER = "already paid on chain (a Transfer from the payer this ledger did not send)"
HISTORY_CHECKED = "transfer_history_checked"
MATCHES_LISTED = "past_transfer_matches_listed"


class ProgramRow(SQLModel, table=True):
    __tablename__ = "program"
    name: str = Field(primary_key=True)
    # Base units: the ceiling in force when its latest manifest was accepted (ledgers of
    # earlier versions: when its first one was).
    ceiling: str
    first_block: int | None = None  # chain height when the program's first manifest landed
    started_at: int  # unix seconds
    deadline: int  # unix seconds


class ManifestRow(SQLModel, table=True):
    __tablename__ = "manifest"
    root: str = Field(primary_key=True)  # paymentsRoot: the manifest's identity
    program: str = Field(index=True)
    chain_id: int
    token: str
    payer: str
    not_after: int
    count: int
    total: str
    document: str  # the signed manifest JSON as accepted (latest signing)
    signers: str  # JSON list of approver addresses
    accepted_at: int


class PaymentRow(SQLModel, table=True):
    __tablename__ = "payment"
    __table_args__ = (Index("ix_payment_status", "root", "status", "idx"),)
    root: str = Field(primary_key=True)
    idx: int = Field(primary_key=True)
    pid: str
    to: str
    amount: str
    status: str = PaymentStatus.QUEUED.value
    reason: str | None = None
    tx_id: int | None = Field(default=None, index=True)
    updated_at: int = 0


class TxRow(SQLModel, table=True):
    """One logical transaction: one nonce of the payer, one payload, many attempts."""

    __tablename__ = "tx"
    # (payer, status): the loop counts and lists the payer's open transactions several
    # times a second; without it each look reads every row, calldata included (~95 kB a
    # batch), in its overflow pages.
    __table_args__ = (UniqueConstraint("payer", "nonce"),
                      Index("ix_tx_payer_status", "payer", "status"))
    id: int | None = Field(default=None, primary_key=True)
    payer: str
    nonce: int
    kind: str  # batch | direct | approve
    root: str | None = None
    to: str
    data: str  # 0x calldata, identical in every attempt
    gas_limit: int
    count: int = 0
    amount: str = "0"
    status: str = TxStatus.PENDING.value
    mined_hash: str | None = None
    block_number: int | None = None
    block_hash: str | None = None
    receipt_status: int | None = None
    gas_used: int | None = None
    created_at: int = 0
    updated_at: int = 0


class AttemptRow(SQLModel, table=True):
    """One signed version of a transaction (the first, or a fee bump at the same nonce)."""

    __tablename__ = "attempt"
    id: int | None = Field(default=None, primary_key=True)
    tx_id: int = Field(index=True)
    hash: str = Field(unique=True)
    raw: str  # the signed bytes, committed before the first broadcast
    max_fee: str
    tip: str
    created_at: int = 0


class EventRow(SQLModel, table=True):
    """Append-only audit trail of every state change."""

    __tablename__ = "event"
    id: int | None = Field(default=None, primary_key=True)
    ts: float
    kind: str = Field(index=True)
    data: str


class RunnerRow(SQLModel, table=True):
    """Who holds the runner lock of a payer (PostgreSQL ledgers; for the error message)."""

    __tablename__ = "runner"
    key: str = Field(primary_key=True)
    holder: str
    since: int


class PayerRow(SQLModel, table=True):
    __tablename__ = "payer"
    address: str = Field(primary_key=True)
    first_nonce: int  # the chain's nonce when this ledger first used the payer


class Mined(NamedTuple):
    """A receipt seen for a pending transaction (``Ledger.mark_mined_many``)."""

    tx_id: int
    tx_hash: str
    block_number: int
    block_hash: str
    receipt_status: int
    gas_used: int


@dataclass(frozen=True)
class NewTx:
    """A signed transaction about to be written ahead."""

    payer: str
    nonce: int
    kind: str  # batch | direct | approve | deploy
    root: str | None
    to: str
    data: str
    gas_limit: int
    raw: str
    tx_hash: str
    max_fee: int
    tip: int
    idxs: tuple[int, ...] = ()
    amount: int = 0


class Queued(NamedTuple):
    """A payment waiting to be sent: just the columns the send loop needs."""

    root: str
    idx: int
    to: str
    amount: str


@dataclass(frozen=True)
class Counts:
    by_status: dict[str, int]
    amount_by_status: dict[str, int]


def _now() -> int:
    return int(time.time())


def _refuse_other_header(existing: ManifestRow, m: Manifest) -> None:
    """The same paymentsRoot recorded for another program, chain, token or payer: the same
    payments re-signed for another would be paid twice."""
    header = (existing.program, existing.chain_id, existing.token, existing.payer)
    if header != (m.program, m.chain_id, m.token, m.payer):
        raise CeilingError(
            f"manifest {m.root} is already recorded for program {existing.program}, chain "
            f"{existing.chain_id}, token {existing.token}, payer {existing.payer}; the same "
            "payments cannot be re-signed for another")


POSTGRES_PREFIXES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def check_path(url: str) -> None:
    """A DISBURSER_DB that is no PostgreSQL URL must be a SQLite file in a directory that
    exists: a typo made a new, empty ledger, which then read the payer's history as a lost
    ledger's. One that looks like a URL of another kind is refused without its password."""
    if url.startswith(POSTGRES_PREFIXES):
        return
    if "://" in url:
        from disburser.settings import redact_url

        raise SettingsError(f"DISBURSER_DB {redact_url(url)}: neither a file path nor a "
                            "PostgreSQL URL (postgresql://...)")
    parent = Path(url).parent
    if not parent.is_dir():
        raise SettingsError(f"DISBURSER_DB {url}: no such directory {parent}")


class Ledger:
    """All reads and guarded writes of the ledger."""

    def __init__(self, path: Path | str) -> None:
        self.url = str(path)
        self._shared: Session | None = None
        self.is_postgres = self.url.startswith(POSTGRES_PREFIXES)
        if self.is_postgres:
            # Optional shared backend: several operators' machines, one ledger.
            url = "postgresql+psycopg://" + self.url.split("://", 1)[1]
            try:
                self.engine: Engine = create_engine(url, pool_pre_ping=True)
            except ValueError:  # a port that is not a number, say (the URL is not echoed)
                raise SettingsError(f"DISBURSER_DB {self.url_display}: not a usable "
                                    "PostgreSQL URL") from None
        else:
            check_path(self.url)
            self.engine = create_engine(f"sqlite:///{self.url}", connect_args={"timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            SQLModel.metadata.create_all(self.engine)
        except DBAPIError as e:
            if self.is_postgres:
                first = str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else ""
                raise LedgerUnavailable(f"ledger DISBURSER_DB {self.url_display}: cannot be "
                                        f"reached ({first[:160]})") from None
            # A file that is not a ledger (a manifest given as DISBURSER_DB, say), or one
            # that cannot be opened: bad settings, said in one line.
            what = "not a SQLite ledger" if "not a database" in str(e.orig) else \
                "cannot be opened"
            raise SettingsError(f"DISBURSER_DB {self.url}: {what} ({e.orig})") from None
        # create_all leaves a table that exists as it is: an index added since a ledger was
        # made is created here.
        for table in SQLModel.metadata.sorted_tables:
            for index in table.indexes:
                try:
                    index.create(self.engine, checkfirst=True)
                except DBAPIError:
                    # Another process may have made it meanwhile (PostgreSQL reports that as
                    # "already exists" or as a duplicate key in its catalogue).
                    names = {i["name"] for i in inspect(self.engine).get_indexes(table.name)}
                    if index.name not in names:
                        raise

    @property
    def url_display(self) -> str:
        """The ledger's path or URL without any password."""
        from disburser.settings import redact_url

        return redact_url(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        if self._shared is not None:  # inside atomic(): its transaction commits
            yield self._shared
            return
        # Rows outlive their session (callers read them after commit).
        with Session(self.engine, expire_on_commit=False) as s:
            yield s
            s.commit()

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Several state changes in one database transaction (one fsync instead of one per
        change): all or none. Only for changes that are re-derived from the chain if lost
        (mined, confirmed, reorged); never around a write that must precede a broadcast."""
        if self._shared is not None:
            yield
            return
        with Session(self.engine, expire_on_commit=False) as s:
            self._shared = s
            try:
                yield
                s.commit()
            finally:
                self._shared = None

    def _event(self, s: Session, kind: str, /, **data: Any) -> None:
        s.add(EventRow(ts=time.time(), kind=kind, data=json.dumps(data, sort_keys=True)))

    def _events(self, s: Session, kind: str, items: Sequence[dict[str, Any]]) -> None:
        """Many events of one kind in one executemany (no ORM objects)."""
        if items:
            ts = time.time()
            s.execute(insert(_table(EventRow)), [
                {"ts": ts, "kind": kind, "data": json.dumps(d, sort_keys=True)} for d in items])

    # --- manifests -------------------------------------------------------------------

    def accept_manifest(
        self, m: Manifest, *, ceiling: int, signers: Sequence[str], deadline_hours: int = 96,
        first_block: int | None = None,
    ) -> bool:
        """Record a verified manifest; True if new. Refuses (CeilingError) when the program's
        accepted manifests plus this one would exceed ``ceiling``. A manifest already known by
        its paymentsRoot is the same payments: only its document and not_after are updated."""
        with self.session() as s:
            if self.is_postgres:
                # Operators with different payers may share one PostgreSQL ledger: the
                # read-then-insert of the ceiling check is serialised per program.
                s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                          {"k": f"disburser-program-{m.program}"})
            else:
                # The same for two runners on one SQLite file (two payers, two lock
                # directories): the write lock is taken before the committed total is read,
                # not at the first insert (sqlite3 begins a transaction only then).
                s.execute(text("BEGIN IMMEDIATE"))
            existing = s.get(ManifestRow, m.root)
            if existing is not None:
                _refuse_other_header(existing, m)
                if m.not_after != existing.not_after or json.loads(existing.signers) != list(
                    signers
                ):
                    existing.not_after = m.not_after
                    existing.document = to_json(m)
                    existing.signers = json.dumps(list(signers))
                    s.add(existing)
                    self._event(s, "manifest_resigned", root=m.root, not_after=m.not_after)
                return False
            total = self._refuse_unacceptable(s, m, ceiling)
            now = _now()
            prog = s.get(ProgramRow, m.program)
            if prog is None:
                s.add(ProgramRow(name=m.program, ceiling=str(ceiling), first_block=first_block,
                                 started_at=now, deadline=now + deadline_hours * 3600))
            elif prog.ceiling != str(ceiling):
                # What the accepted total was last checked against: a reconcile without the
                # setting (an auditor's) still checks against it.
                prog.ceiling = str(ceiling)
                s.add(prog)
            s.add(ManifestRow(
                root=m.root, program=m.program, chain_id=m.chain_id, token=m.token,
                payer=m.payer, not_after=m.not_after, count=m.count, total=str(total),
                document=to_json(m), signers=json.dumps(list(signers)), accepted_at=now,
            ))
            s.flush()
            self._insert_payments(s, m, now)
            self._event(s, "manifest_accepted", root=m.root, program=m.program, count=m.count,
                        total=str(total), signers=list(signers))
            return True

    def check_acceptable(self, m: Manifest, *, ceiling: int) -> None:
        """What ``send`` would refuse (CeilingError) before sending, without recording
        anything: for ``send --dry-run``. A manifest already recorded is acceptable under the
        header it was recorded with, while its program's accepted total is within
        ``ceiling`` (a ceiling lowered since: ``check_ceiling``)."""
        with self.session() as s:
            existing = s.get(ManifestRow, m.root)
            if existing is None:
                self._refuse_unacceptable(s, m, ceiling)
                return
            _refuse_other_header(existing, m)
        self.check_ceiling(m.program, ceiling)

    def _refuse_unacceptable(self, s: Session, m: Manifest, ceiling: int) -> int:
        """Refuse a new manifest that repeats a user of its program or would take the
        program past ``ceiling``; its total otherwise."""
        # The same user in two manifests of one program would be paid twice (a re-sorted or
        # corrected allocation gets a new paymentsRoot). A later manifest may only add
        # users, as for those left out for want of an address.
        other_roots = list(s.exec(select(col(ManifestRow.root)).where(
            col(ManifestRow.program) == m.program)))
        if other_roots:
            seen = {pid: root for root, pid in s.execute(sa_select(
                col(PaymentRow.root), col(PaymentRow.pid)).where(
                col(PaymentRow.root).in_(other_roots)))}
            for p in m.payments:
                if p.id in seen:
                    raise CeilingError(
                        f"payments[{p.index}]: id {p.id!r} is already in manifest "
                        f"{seen[p.id]} of program {m.program}; a user is paid once per "
                        "program")
        committed = sum(
            int(t) for t in s.exec(select(col(ManifestRow.total)).where(
                col(ManifestRow.program) == m.program))
        )
        total = m.total  # a sum over every payment: once
        if committed + total > ceiling:
            raise CeilingError(
                f"program {m.program}: accepted {committed} + this manifest {total} "
                f"= {committed + total} base units exceeds the ceiling {ceiling}"
            )
        return total

    def _insert_payments(self, s: Session, m: Manifest, now: int) -> None:
        """The manifest's payment rows, all QUEUED, in the session's transaction: plain
        tuples through the driver's executemany. The ORM's bulk insert (and even Core's
        ``insert()``) builds and processes a parameter dict a row, which cost more than
        SQLite's own work; `send` accepts its manifest on every start."""
        conn = s.connection()
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"  # SQLite | psycopg
        sql = (f'INSERT INTO {PaymentRow.__tablename__} '
               f'(root, idx, pid, "to", amount, status, updated_at) '
               f'VALUES ({", ".join([mark] * 7)})')
        root, queued = m.root, PaymentStatus.QUEUED.value
        for i in range(0, m.count, 20_000):  # chunks: bounded memory at 300,000 rows
            conn.exec_driver_sql(sql, [
                (root, p.index, p.id, p.to, str(p.amount), queued, now)
                for p in m.payments[i:i + 20_000]
            ])

    def manifests(self, program: str | None = None) -> list[ManifestRow]:
        with self.session() as s:
            q = select(ManifestRow).order_by(col(ManifestRow.accepted_at), col(ManifestRow.root))
            if program is not None:
                q = q.where(col(ManifestRow.program) == program)
            return list(s.exec(q))

    def approved_spenders(self, payer: str, token: str) -> set[str]:
        """Every spender ``payer`` approved on ``token`` through this ledger (lower-case)."""
        with self.session() as s:
            datas = s.exec(select(col(TxRow.data)).where(
                col(TxRow.payer) == payer, col(TxRow.kind) == "approve",
                func.lower(col(TxRow.to)) == token.lower()))
            # chain.enc_approve's calldata: "0x", the 4-byte selector, then the spender
            # left-padded to 32 bytes (its last 20 are characters 34..74).
            return {"0x" + str(d)[34:74].lower() for d in datas}

    def manifest_roots(self) -> set[str]:
        """Every accepted manifest's root, lower-case (without the stored documents)."""
        with self.session() as s:
            return {str(r).lower() for r in s.exec(select(col(ManifestRow.root)))}

    def manifest(self, root: str) -> ManifestRow | None:
        with self.session() as s:
            return s.get(ManifestRow, root)

    def programs(self) -> list[ProgramRow]:
        with self.session() as s:
            return list(s.exec(select(ProgramRow).order_by(col(ProgramRow.name))))

    def committed(self, program: str) -> int:
        with self.session() as s:
            return sum(int(t) for t in s.exec(
                select(col(ManifestRow.total)).where(col(ManifestRow.program) == program)))

    def check_ceiling(self, program: str, ceiling: int) -> None:
        """Checked when `send` starts (a ceiling lowered since the manifests were accepted)
        and again whenever a batch is signed: every payment we may send belongs to an
        accepted manifest, so accepted totals within the ceiling bound what can be paid."""
        committed = self.committed(program)
        if committed > ceiling:
            raise CeilingError(
                f"program {program}: accepted manifests total {committed} base units, "
                f"over the ceiling {ceiling}"
            )

    # --- payments --------------------------------------------------------------------

    def payments(self, root: str, statuses: Iterable[PaymentStatus] | None = None,
                 limit: int | None = None) -> list[PaymentRow]:
        with self.session() as s:
            q = select(PaymentRow).where(col(PaymentRow.root) == root)
            if statuses is not None:
                q = q.where(col(PaymentRow.status).in_([st.value for st in statuses]))
            q = q.order_by(col(PaymentRow.idx))
            if limit is not None:
                q = q.limit(limit)
            return list(s.exec(q))

    def queued(self, root: str, limit: int | None = None) -> list[Queued]:
        """Queued payments of ``root`` by index, as plain tuples (no ORM objects: a manifest
        may hold 300,000 of them)."""
        with self.session() as s:
            q = sa_select(col(PaymentRow.root), col(PaymentRow.idx), col(PaymentRow.to),
                          col(PaymentRow.amount)).where(
                col(PaymentRow.root) == root,
                col(PaymentRow.status) == PaymentStatus.QUEUED.value,
            ).order_by(col(PaymentRow.idx))
            if limit is not None:
                q = q.limit(limit)
            return [Queued(r[0], r[1], r[2], r[3]) for r in s.execute(q)]

    def queued_idxs(self, root: str) -> list[int]:
        """Indexes of the queued payments of ``root``, in order."""
        pt = _table(PaymentRow)
        with self.session() as s:
            return [int(r[0]) for r in s.execute(sa_select(pt.c.idx).where(
                pt.c.root == root, pt.c.status == PaymentStatus.QUEUED.value,
            ).order_by(pt.c.idx))]

    def has_queued(self, root: str) -> bool:
        return bool(self.queued(root, limit=1))

    def all_payments(self) -> list[PaymentRow]:
        with self.session() as s:
            q = select(PaymentRow).order_by(col(PaymentRow.root), col(PaymentRow.idx))
            return list(s.exec(q))

    def payment_rows(self) -> list[tuple[str, int, str, str, str, str, str | None, int | None]]:
        """(root, idx, pid, to, amount, status, reason, tx_id) of every payment, by root and
        index, as plain tuples. Read-only: reconcile rebuilds 100,000s of accepted payments
        from them (and takes each one's state) instead of re-parsing the stored documents.
        The driver's own cursor returns the tuples: half the time of SQLAlchemy's rows
        (measured, 0.12 s against 0.23 s for 100,000)."""
        q = sa_select(col(PaymentRow.root), col(PaymentRow.idx), col(PaymentRow.pid),
                      col(PaymentRow.to), col(PaymentRow.amount), col(PaymentRow.status),
                      col(PaymentRow.reason), col(PaymentRow.tx_id)).order_by(
            col(PaymentRow.root), col(PaymentRow.idx))
        sql = str(q.compile(self.engine))  # no parameters
        with self.session() as s:
            cur = s.connection().connection.cursor()
            try:
                cur.execute(sql)
                return [tuple(r) for r in cur.fetchall()]
            finally:
                cur.close()

    def tx_outcomes(self) -> list[tuple[int, str, str | None, int | None, int | None, int,
                                        str | None]]:
        """(id, kind, mined_hash, block_number, gas_used, count, root) of every transaction
        by nonce, as plain tuples. Read-only, for reconcile: without the calldata that
        ``txs`` loads (~50 kB a batch of 500 payments)."""
        with self.session() as s:
            q = sa_select(col(TxRow.id), col(TxRow.kind), col(TxRow.mined_hash),
                          col(TxRow.block_number), col(TxRow.gas_used), col(TxRow.count),
                          col(TxRow.root)).order_by(col(TxRow.nonce))
            return [(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in s.execute(q)
                    if r[0] is not None]

    def counts(self, roots: Sequence[str] | None = None) -> Counts:
        """Payments and amounts by status, summed by the database (the send's progress asks
        once a second; reading 100,000 amounts into Python took 0.3 s). Amounts are decimal
        TEXT: PostgreSQL sums them as NUMERIC; SQLite, whose integers are 64-bit, sums the
        digits above and below 10^12 apart (each sum is bounded by the manifests' totals
        and their row count, far inside int64) and Python joins them exactly."""
        pt = _table(PaymentRow)
        hi: Any
        lo: Any
        sqlite = self.engine.dialect.name == "sqlite"
        if sqlite:  # amount = hi * cut + lo
            cut = 10**12
            hi = func.sum(sa_cast(func.substr(pt.c.amount, 1, func.length(pt.c.amount) - 12),
                                  Integer))
            lo = func.sum(sa_cast(func.substr(pt.c.amount, -12), Integer))
        else:
            cut, hi, lo = 1, func.sum(sa_cast(pt.c.amount, Numeric)), literal(0)
        q = sa_select(pt.c.status, func.count(), hi, lo,
                      func.max(func.length(pt.c.amount))).group_by(pt.c.status)
        if roots is not None:
            q = q.where(pt.c.root.in_(list(roots)))
        by: dict[str, int] = {}
        amt: dict[str, int] = {}
        with self.session() as s:
            try:
                rows: list[Any] | None = list(s.execute(q))
            except OperationalError as e:
                # Many amounts near 10^30: the sum of the high parts passes int64.
                if not sqlite or "overflow" not in str(e.orig):
                    raise
                rows = None
            if rows is None or (sqlite and any(int(row[4] or 0) > 30 for row in rows)):
                # An amount of 10^30 or more, or many near it (a ceiling set that high):
                # SQLite's CAST would saturate the high part at int64 without a word, or its
                # sum would overflow. Sum in Python, exactly.
                return self._counts_in_python(s, roots)
        for row in rows:
            st, n, h, low = row[0], row[1], row[2], row[3]
            by[st] = int(n)
            amt[st] = int(h or 0) * cut + int(low or 0)
        return Counts(by, amt)

    def _counts_in_python(self, s: Session, roots: Sequence[str] | None) -> Counts:
        pt = _table(PaymentRow)
        q = sa_select(pt.c.status, pt.c.amount)
        if roots is not None:
            q = q.where(pt.c.root.in_(list(roots)))
        by: dict[str, int] = {}
        amt: dict[str, int] = {}
        for row in s.execute(q):
            by[row[0]] = by.get(row[0], 0) + 1
            amt[row[0]] = amt.get(row[0], 0) + int(row[1])
        return Counts(by, amt)

    def mark_failed(self, root: str, idx: int, reason: str) -> None:
        with self.session() as s:
            r = s.execute(update(PaymentRow).where(
                col(PaymentRow.root) == root, col(PaymentRow.idx) == idx,
                col(PaymentRow.status) == PaymentStatus.QUEUED.value,
            ).values(status=PaymentStatus.FAILED.value, reason=reason, updated_at=_now()))
            _expect(r, 1, f"payment {root}[{idx}] queued -> failed")
            self._event(s, "payment_failed", root=root, idx=idx, reason=reason)

    def requeue_failed(self, root: str) -> int:
        with self.session() as s:
            r = s.execute(update(PaymentRow).where(
                col(PaymentRow.root) == root, col(PaymentRow.status) == PaymentStatus.FAILED.value,
            ).values(status=PaymentStatus.QUEUED.value, reason=None, updated_at=_now()))
            n = _rowcount(r)
            if n:
                self._event(s, "payments_requeued", root=root, count=n)
            return n

    def mark_paid_elsewhere(self, root: str, idxs: Sequence[int], *, contract: str) -> None:
        """Payments ``idxs`` of ``root`` found paid by the bitmap of batch contract
        ``contract``."""
        if not idxs:
            return
        with self.session() as s:
            self._paid_elsewhere(s, root, idxs, PAID_BY_BITMAP, contract=contract.lower())

    def bitmap_marks(self, root: str) -> dict[int, str]:
        """Payment index -> the batch contract whose bitmap marked it paid elsewhere ("" when
        a ledger written before marks named their contract does not say)."""
        with self.session() as s:
            return {i: data.get("contract") or "" for _, _, data in self._root_events(
                s, ("payments_paid_elsewhere",), root)
                if data.get("reason", PAID_BY_BITMAP) == PAID_BY_BITMAP for i in data["idxs"]}

    def _paid_elsewhere(self, s: Session, root: str, idxs: Sequence[int], reason: str,
                        transfers: Sequence[str] = (), contract: str | None = None) -> None:
        for chunk in _chunks(idxs):
            r = s.execute(update(PaymentRow).where(
                col(PaymentRow.root) == root, col(PaymentRow.idx).in_(list(chunk)),
                col(PaymentRow.status) == PaymentStatus.QUEUED.value,
            ).values(status=PaymentStatus.PAID_ELSEWHERE.value, reason=reason,
                     updated_at=_now()))
            _expect(r, len(chunk), "payments queued -> paid_elsewhere")
        by: dict[str, Any] = {"transfers": list(transfers)} if transfers else {}
        if contract:
            by["contract"] = contract
        self._event(s, "payments_paid_elsewhere", root=root, idxs=list(idxs), reason=reason,
                    **by)

    def explained_transfers(self) -> set[str]:
        """The transfers ("tx hash:place in it") that payments were recorded paid by
        (``record_history_check``): each pays one payment, once."""
        with self.session() as s:
            out: set[str] = set()
            for data in s.exec(select(col(EventRow.data)).where(
                    col(EventRow.kind) == "payments_paid_elsewhere")):
                out.update(json.loads(data).get("transfers") or ())
            return out

    def _root_events(self, s: Session, kinds: Sequence[str], root: str
                     ) -> list[tuple[int, str, dict[str, Any]]]:
        """(id, kind, data) of the events of ``kinds`` about ``root``, oldest first."""
        rows = s.exec(select(col(EventRow.id), col(EventRow.kind), col(EventRow.data)).where(
            col(EventRow.kind).in_(list(kinds)),
            col(EventRow.data).contains(json.dumps({"root": root})[1:-1]),
        ).order_by(col(EventRow.id)))
        return [(int(i or 0), k, json.loads(d)) for i, k, d in rows]

    # Events after which a manifest's payments are queued again, unchecked by an earlier
    # look at the payer's past transfers.
    _REQUEUED = ("payments_requeued", "tx_reverted")

    def history_checked(self, root: str, from_block: int) -> bool:
        """Whether the payer's Transfer logs were read for ``root`` from ``from_block`` or
        earlier (``record_history_check``) since any of its payments were last queued again
        (failed ones put back, or a reverted transaction's: they were not matched then)."""
        with self.session() as s:
            checked = False
            for _, kind, data in self._root_events(s, (HISTORY_CHECKED, *self._REQUEUED),
                                                   root):
                if kind == HISTORY_CHECKED:
                    checked = checked or data["from_block"] <= from_block
                else:
                    checked = False
            return checked

    def listed_transfers(self, root: str, from_block: int) -> set[str]:
        """The past transfers that the last refusal for ``root`` listed as matches, reading
        from ``from_block``, if nothing about ``root`` happened since (a check recorded,
        payments queued again): what ``--accept-past-transfers`` may accept."""
        with self.session() as s:
            events = self._root_events(s, (MATCHES_LISTED, HISTORY_CHECKED, *self._REQUEUED),
                                       root)
            if not events:
                return set()
            _, kind, data = events[-1]
            if kind != MATCHES_LISTED or data["from_block"] != from_block:
                return set()
            return set(data["transfers"])

    def list_matches(self, root: str, transfers: Sequence[str], from_block: int) -> None:
        with self.session() as s:
            self._event(s, MATCHES_LISTED, root=root, transfers=list(transfers),
                        from_block=from_block)

    def record_history_check(self, root: str, idxs: Sequence[int], transfers: Sequence[str],
                             *, from_block: int, to_block: int,
                             unknown_manifests: Sequence[str] = ()) -> None:
        """The payments ``idxs`` of ``root`` were found paid by the Transfer logs
        ``transfers`` ("tx hash:place in it", one each, in order) that this ledger did not send
        (blocks ``from_block``..``to_block``): paid elsewhere, in one transaction with the
        note that ``root`` was checked (and which manifests the payer paid that this ledger
        did not know, accepted by the operator)."""
        assert len(idxs) == len(transfers)
        with self.session() as s:
            if idxs:
                self._paid_elsewhere(s, root, idxs, PAID_BY_TRANSFER, transfers)
            extra = {"unknown_manifests": list(unknown_manifests)} if unknown_manifests else {}
            self._event(s, HISTORY_CHECKED, root=root, from_block=from_block,
                        to_block=to_block, found=len(idxs), **extra)

    # --- nonces and transactions -------------------------------------------------------

    def first_nonce(self, payer: str, chain_nonce: int) -> int:
        """The nonce this ledger started from for ``payer`` (recorded on first use)."""
        with self.session() as s:
            row = s.get(PayerRow, payer)
            if row is None:
                row = PayerRow(address=payer, first_nonce=chain_nonce)
                s.add(row)
                self._event(s, "payer_registered", payer=payer, first_nonce=chain_nonce)
            return row.first_nonce

    def payer_first_nonce(self, payer: str) -> int | None:
        """The nonce this ledger started from for ``payer``; None before its first use."""
        with self.session() as s:
            row = s.get(PayerRow, payer)
            return None if row is None else row.first_nonce

    def next_nonce(self, payer: str) -> int | None:
        with self.session() as s:
            n = s.exec(select(func.max(col(TxRow.nonce))).where(col(TxRow.payer) == payer)).one()
            return None if n is None else int(n) + 1

    def record_txs(self, txs: Sequence[NewTx]) -> list[int]:
        """Several transactions written ahead in one database transaction (one fsync): each
        transaction, its first signed attempt and the claim of its payments (queued ->
        in_flight). Core statements (executemany where no id is needed back), no ORM
        objects: a fill of direct transfers writes hundreds at once."""
        # Write-ahead: this commit must happen now, before the broadcast, never deferred
        # into an enclosing atomic() block.
        assert self._shared is None, "record_txs inside atomic()"
        now = _now()
        tt, at = _table(TxRow), _table(AttemptRow)
        ids: list[int] = []
        with self.session() as s:
            for part in _chunks(txs):
                # One INSERT a transaction for its id (SQLite's lastrowid, PostgreSQL's
                # RETURNING): an executemany with RETURNING needs SQLite 3.35.
                part_ids = [_inserted_id(s.execute(insert(tt).values(
                    payer=n.payer, nonce=n.nonce, kind=n.kind, root=n.root, to=n.to,
                    data=n.data, gas_limit=n.gas_limit, count=len(n.idxs),
                    amount=str(n.amount), status=TxStatus.PENDING.value, created_at=now,
                    updated_at=now))) for n in part]
                s.execute(insert(at), [
                    {"tx_id": i, "hash": n.tx_hash, "raw": n.raw, "max_fee": str(n.max_fee),
                     "tip": str(n.tip), "created_at": now}
                    for i, n in zip(part_ids, part, strict=True)])
                claims = [(n.root, idx, i) for i, n in zip(part_ids, part, strict=True)
                          for idx in n.idxs]
                self._claim(s, claims, now)
                self._events(s, "tx_signed", [
                    {"tx_id": i, "nonce": n.nonce, "kind": n.kind, "hash": n.tx_hash,
                     "count": len(n.idxs), "amount": str(n.amount), "max_fee": str(n.max_fee),
                     "tip": str(n.tip)} for i, n in zip(part_ids, part, strict=True)])
                ids.extend(part_ids)
        return ids

    def _claim(self, s: Session, claims: Sequence[tuple[str | None, int, int]],
               now: int) -> None:
        """Payments (root, idx) queued -> in_flight for transaction id, each guarded: every
        one must still be queued. A batch's payments go in one UPDATE (over their index range
        when they are consecutive, else IN (...)), single payments (direct transfers) in one
        executemany; all checked by their row count (SQLite's and psycopg's executemany
        report the sum)."""
        if not claims:
            return
        pt = _table(PaymentRow)
        groups: dict[tuple[str | None, int], list[int]] = {}
        for root, idx, tx_id in claims:
            groups.setdefault((root, tx_id), []).append(idx)
        singles: list[tuple[str | None, int, int]] = []
        for (root, tx_id), idxs in groups.items():
            if len(idxs) == 1:
                singles.append((root, idxs[0], tx_id))
                continue
            lo, hi = min(idxs), max(idxs)
            wheres: list[tuple[Any, int]]
            if hi - lo + 1 == len(idxs) == len(set(idxs)):
                # A run of consecutive indexes (the usual batch): a range, not an IN list of
                # hundreds of parameters (SQLAlchemy expands and names each one: ~3 ms a
                # batch of 500, measured). The row count still checks every one was queued.
                wheres = [(pt.c.idx.between(lo, hi), len(idxs))]
            else:
                wheres = [(pt.c.idx.in_(part), len(part)) for part in _chunks(idxs)]
            for where, n in wheres:
                r = s.execute(update(pt).where(
                    pt.c.root == root, where, pt.c.status == PaymentStatus.QUEUED.value,
                ).values(status=PaymentStatus.IN_FLIGHT.value, tx_id=tx_id, updated_at=now))
                _expect(r, n, f"claim of {n} payments for tx {tx_id}")
        if singles:
            r = s.execute(update(pt).where(
                pt.c.root == bindparam("b_root"), pt.c.idx == bindparam("b_idx"),
                pt.c.status == PaymentStatus.QUEUED.value,
            ).values(status=PaymentStatus.IN_FLIGHT.value, tx_id=bindparam("b_tx"),
                     updated_at=now),
                [{"b_root": r, "b_idx": i, "b_tx": t} for r, i, t in singles])
            _expect(r, len(singles), f"claim of {len(singles)} payments")

    def add_attempt(self, tx_id: int, *, raw: str, tx_hash: str, max_fee: int, tip: int) -> None:
        assert self._shared is None, "add_attempt inside atomic()"  # write-ahead, as above
        with self.session() as s:
            s.add(AttemptRow(tx_id=tx_id, hash=tx_hash, raw=raw, max_fee=str(max_fee),
                             tip=str(tip), created_at=_now()))
            self._event(s, "tx_bumped", tx_id=tx_id, hash=tx_hash, max_fee=str(max_fee),
                        tip=str(tip))

    def attempts(self, tx_id: int) -> list[AttemptRow]:
        with self.session() as s:
            return list(s.exec(select(AttemptRow).where(col(AttemptRow.tx_id) == tx_id)
                               .order_by(col(AttemptRow.id))))

    def attempts_of(self, tx_ids: Sequence[int]) -> dict[int, list[AttemptRow]]:
        """Every attempt of several transactions in one query, oldest first."""
        out: dict[int, list[AttemptRow]] = {i: [] for i in tx_ids}
        if not tx_ids:
            return out
        with self.session() as s:
            # Without the signed bytes (~95 kB a batch, read on every poll otherwise):
            # ``attempt_raw`` reads them for a re-broadcast; touching ``raw`` here raises.
            for a in s.exec(select(AttemptRow).where(col(AttemptRow.tx_id).in_(list(tx_ids)))
                            .options(defer(AttemptRow.raw, raiseload=True))  # type: ignore[arg-type]
                            .order_by(col(AttemptRow.id))):
                out[a.tx_id].append(a)
        return out

    def attempt_raw(self, attempt_id: int) -> str:
        """The signed bytes of one attempt, exactly as stored before its first broadcast."""
        with self.session() as s:
            raw = s.exec(select(col(AttemptRow.raw)).where(col(AttemptRow.id) == attempt_id)).one()
            return str(raw)

    def tx_data(self, tx_id: int) -> str:
        """The calldata of one transaction (every attempt's payload)."""
        with self.session() as s:
            return str(s.exec(select(col(TxRow.data)).where(col(TxRow.id) == tx_id)).one())

    def open_txs(self, payer: str) -> list[TxRow]:
        """Transactions not yet final (pending or mined-but-shallow), by nonce. Without their
        calldata (~95 kB a batch, read on every poll otherwise): ``tx_data`` reads it for a
        fee bump; touching ``data`` here raises."""
        with self.session() as s:
            return list(s.exec(select(TxRow).where(
                col(TxRow.payer) == payer,
                col(TxRow.status).in_([TxStatus.PENDING.value, TxStatus.MINED.value]),
            ).options(defer(TxRow.data, raiseload=True))  # type: ignore[arg-type]
                .order_by(col(TxRow.nonce))))

    def pending_count(self, payer: str) -> int:
        """How many of ``payer``'s transactions are not mined yet."""
        tt = _table(TxRow)
        with self.session() as s:
            n: int = s.execute(sa_select(func.count()).select_from(tt).where(
                tt.c.payer == payer, tt.c.status == TxStatus.PENDING.value)).scalar_one()
            return n

    def has_open_txs(self, payer: str) -> bool:
        """Whether any of ``payer``'s transactions is not final yet."""
        tt = _table(TxRow)
        with self.session() as s:
            return s.execute(sa_select(tt.c.id).where(
                tt.c.payer == payer,
                tt.c.status.in_([TxStatus.PENDING.value, TxStatus.MINED.value]),
            ).limit(1)).first() is not None

    def txs(self, payer: str | None = None) -> list[TxRow]:
        with self.session() as s:
            q = select(TxRow).order_by(col(TxRow.nonce))
            if payer is not None:
                q = q.where(col(TxRow.payer) == payer)
            return list(s.exec(q))

    def tx_at(self, payer: str, nonce: int) -> TxRow | None:
        with self.session() as s:
            q = select(TxRow).where(col(TxRow.payer) == payer, col(TxRow.nonce) == nonce)
            return s.exec(q).first()

    def mark_mined_many(self, mined: Sequence[Mined]) -> None:
        """Several transactions pending -> mined in one statement (a poll sees hundreds of
        direct transfers mined at once); each guarded: every one must have been pending."""
        if not mined:
            return
        now = _now()
        t = _table(TxRow)
        with self.session() as s:
            for part in _chunks(mined):
                r = s.execute(update(t).where(
                    t.c.id == bindparam("b_id"), t.c.status == TxStatus.PENDING.value,
                ).values(
                    status=TxStatus.MINED.value, mined_hash=bindparam("b_hash"),
                    block_number=bindparam("b_block"), block_hash=bindparam("b_bhash"),
                    receipt_status=bindparam("b_status"), gas_used=bindparam("b_gas"),
                    updated_at=now),
                    [{"b_id": m.tx_id, "b_hash": m.tx_hash, "b_block": m.block_number,
                      "b_bhash": m.block_hash, "b_status": m.receipt_status,
                      "b_gas": m.gas_used} for m in part])
                _expect(r, len(part), f"{len(part)} txs pending -> mined")
            self._events(s, "tx_mined", [
                {"tx_id": m.tx_id, "hash": m.tx_hash, "block": m.block_number,
                 "status": m.receipt_status, "gas_used": m.gas_used} for m in mined])

    def finalize_many(self, tx_ids: Sequence[int]) -> dict[int, TxStatus]:
        """Deep enough: confirmed (payments confirmed) or reverted (payments back to queued,
        their nonce is spent so they can never be paid by it), for several transactions in
        a few statements."""
        out: dict[int, TxStatus] = {}
        if not tx_ids:
            return out
        now = _now()
        t = _table(TxRow)
        with self.session() as s:
            events: dict[str, list[dict[str, Any]]] = {"tx_confirmed": [], "tx_reverted": []}
            for part in _chunks(list(tx_ids)):
                rows = s.execute(sa_select(t.c.id, t.c.receipt_status, t.c.nonce,
                                           t.c.mined_hash, t.c.count, t.c.root).where(
                    t.c.id.in_(part), t.c.status == TxStatus.MINED.value)).all()
                _expect_n(len(rows), len(part), f"{len(part)} txs mined -> final")
                for ok, final, pay in ((True, TxStatus.CONFIRMED, PaymentStatus.CONFIRMED),
                                       (False, TxStatus.REVERTED, PaymentStatus.QUEUED)):
                    group = [r for r in rows if (r.receipt_status == 1) == ok]
                    if not group:
                        continue
                    ids = [r.id for r in group]
                    r = s.execute(update(t).where(
                        t.c.id.in_(ids), t.c.status == TxStatus.MINED.value,
                    ).values(status=final.value, updated_at=now))
                    _expect(r, len(ids), f"{len(ids)} txs mined -> {final.value}")
                    values: dict[str, Any] = {"status": pay.value, "updated_at": now}
                    if not ok:
                        values["tx_id"] = None
                    s.execute(update(PaymentRow).where(
                        col(PaymentRow.tx_id).in_(ids),
                        col(PaymentRow.status) == PaymentStatus.IN_FLIGHT.value,
                    ).values(**values))
                    for g in group:
                        out[g.id] = final
                        ev = {"tx_id": g.id, "nonce": g.nonce, "hash": g.mined_hash,
                              "count": g.count if ok else 0}
                        if not ok:
                            # Its manifest's payments are queued again: ``history_checked``
                            # looks at them again.
                            ev["root"] = g.root
                        events["tx_confirmed" if ok else "tx_reverted"].append(ev)
            for kind, data in events.items():
                self._events(s, kind, data)
        return out

    def mark_reorged(self, tx_id: int) -> None:
        """Its block left the canonical chain: back to pending, to be re-broadcast."""
        with self.session() as s:
            r = s.execute(update(TxRow).where(
                col(TxRow.id) == tx_id, col(TxRow.status) == TxStatus.MINED.value,
            ).values(status=TxStatus.PENDING.value, mined_hash=None, block_number=None,
                     block_hash=None, receipt_status=None, gas_used=None, updated_at=_now()))
            _expect(r, 1, f"tx {tx_id} mined -> pending (reorg)")
            self._event(s, "tx_reorged", tx_id=tx_id)

    def log(self, kind: str, /, **data: Any) -> None:
        with self.session() as s:
            self._event(s, kind, **data)

    def events(self, kind: str | None = None) -> list[EventRow]:
        with self.session() as s:
            q = select(EventRow).order_by(col(EventRow.id))
            if kind:
                q = q.where(col(EventRow.kind) == kind)
            return list(s.exec(q))

    def tx_hashes(self) -> dict[str, tuple[int, str | None]]:
        """Every attempt hash we ever signed -> (tx id, root)."""
        with self.session() as s:
            rows = s.exec(select(col(AttemptRow.hash), col(TxRow.id), col(TxRow.root)).where(
                col(AttemptRow.tx_id) == col(TxRow.id)))
            return {h: (int(i), r) for h, i, r in rows if i is not None}


    @contextmanager
    def runner_lock(self, payer: str, chain_id: int, holder: str) -> Iterator[None]:
        """One runner per payer across every machine sharing a PostgreSQL ledger: a session
        advisory lock held for the whole run (released if the process dies, as its
        connection closes). A SQLite ledger is local: the file locks of locks.py suffice."""
        if not self.is_postgres:
            yield
            return
        key = f"disburser-runner-{chain_id}-{payer.lower()}"
        with self.engine.connect() as conn:
            got = conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"),
                               {"k": key}).scalar()
            if not got:
                row = conn.execute(text("SELECT holder FROM runner WHERE key = :k"),
                                   {"k": key}).first()
                who = row[0] if row else "another process"
                raise LockedError(f"another disburser is running for payer {payer} "
                                  f"({who}); shared ledger {self.engine.url.host}")
            conn.execute(text("INSERT INTO runner (key, holder, since) VALUES (:k, :h, :t) "
                              "ON CONFLICT (key) DO UPDATE SET holder = :h, since = :t"),
                         {"k": key, "h": holder, "t": _now()})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("DELETE FROM runner WHERE key = :k"), {"k": key})
                conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})
                conn.commit()


def _expect(result: Any, want: int, what: str) -> None:
    """The compare-and-set guard: an UPDATE ... WHERE status = <expected> must change
    exactly the rows we claimed, or another process moved them first."""
    got = int(result.rowcount)
    if got != want:
        raise DisburserError(f"ledger: {what} changed {got} rows, expected {want}; "
                             "another process changed the ledger")


def _table(model: type[SQLModel]) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


def _inserted_id(result: Any) -> int:
    return int(result.inserted_primary_key[0])


def _expect_n(got: int, want: int, what: str) -> None:
    """``_expect`` for a guard read before an executemany (whose rowcount not every driver
    reports)."""
    if got != want:
        raise DisburserError(f"ledger: {what} found {got} rows, expected {want}; "
                             "another process changed the ledger")


def _chunks(items: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    """Pieces small enough for the bound-parameter limits of SQLite and PostgreSQL."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we broadcast what it records (write-ahead).
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def exists(path: Path | str) -> bool:
    s = str(path)
    return "://" in s or os.path.exists(s)


__all__ = ["Ledger", "text"]
