"""The ledger's many-at-once writes (a fill of direct transfers, a poll's receipts) keep the
guards and the exact amounts of the one-at-a-time ones, on a real SQLite file."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from disburser.devnet import PAYER
from disburser.domain import Manifest, Payment, PaymentStatus, TxStatus
from disburser.errors import (
    CeilingError,
    DisburserError,
    LedgerUnavailable,
    LockedError,
    SettingsError,
)
from disburser.ledger import Ledger, Mined, NewTx
from disburser.locks import RunnerLock
from disburser.manifest import make_manifest

TOKEN = "0x" + "aa" * 20
# 18-decimal amounts: 3x10^26 does not fit SQLite's int64; every digit must survive the sums.
BIG = [3 * 10**26 - 1, 10**18 + 7, 123_456_789_012_345, 5, 10**12, 10**12 - 1]


def _ledger(tmp_path: Path) -> tuple[Ledger, Manifest]:
    pays = [Payment(i, f"u{i}", "0x" + f"{i + 1:040x}", a) for i, a in enumerate(BIG)]
    m = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=PAYER, not_after=2**40,
                      payments=pays)
    led = Ledger(tmp_path / "l.sqlite")
    led.accept_manifest(m, ceiling=10**27, signers=[])
    return led, m


def _tx(m: Manifest, nonce: int, idxs: tuple[int, ...]) -> NewTx:
    return NewTx(payer=PAYER, nonce=nonce, kind="direct", root=m.root, to=TOKEN, data="0x",
                 gas_limit=60_000, raw=f"0x{nonce:04x}", tx_hash=f"0x{nonce:064x}",
                 max_fee=10, tip=1, idxs=idxs, amount=sum(BIG[i] for i in idxs))


def test_counts_sum_amounts_exactly(tmp_path: Path) -> None:
    led, m = _ledger(tmp_path)
    c = led.counts([m.root])
    assert c.by_status == {PaymentStatus.QUEUED.value: len(BIG)}
    assert c.amount_by_status == {PaymentStatus.QUEUED.value: sum(BIG)}


def test_counts_of_amounts_past_int64_in_the_high_digits(tmp_path: Path) -> None:
    # 10^40: its digits above 10^12 do not fit SQLite's int64 (a CAST would saturate).
    pays = [Payment(0, "u0", "0x" + "01" * 20, 10**40 + 3), Payment(1, "u1", "0x" + "02" * 20, 9)]
    m = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=PAYER, not_after=2**40,
                      payments=pays)
    led = Ledger(tmp_path / "l.sqlite")
    led.accept_manifest(m, ceiling=10**41, signers=[])
    assert led.counts([m.root]).amount_by_status == {"queued": 10**40 + 12}


def test_counts_of_many_amounts_whose_high_parts_sum_past_int64(tmp_path: Path) -> None:
    """Each amount has 30 digits (the SQL path), eleven of them: the sum of their digits
    above 10^12 passes int64 and SQLite raised "integer overflow" (status and the funds
    check died on such a manifest)."""
    pays = [Payment(i, f"u{i}", "0x" + f"{i + 1:040x}", 9 * 10**29) for i in range(11)]
    m = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=PAYER, not_after=2**40,
                      payments=pays)
    led = Ledger(tmp_path / "l.sqlite")
    led.accept_manifest(m, ceiling=10**32, signers=[])
    assert led.counts([m.root]).amount_by_status == {"queued": 11 * 9 * 10**29}


def test_two_acceptances_on_one_sqlite_file_are_serialised(tmp_path: Path) -> None:
    """Two runners on one ledger (two payers, two lock directories, one reaching the file
    through a symbolic link): the second read the committed total before the first
    committed, and both manifests were accepted past the ceiling (110 of 100)."""
    real = tmp_path / "l.sqlite"
    alias = tmp_path / "alias.sqlite"
    a = Ledger(real)
    alias.symlink_to(real)
    b = Ledger(alias)

    def one(payer: str, tag: str, amount: int) -> Manifest:
        return make_manifest(program="p", chain_id=31337, token=TOKEN, payer=payer,
                             not_after=2**40,
                             payments=[Payment(0, tag, "0x" + "0c" * 20, amount)])

    a.accept_manifest(one(PAYER, "z", 10), ceiling=100, signers=[])
    first, second = one(PAYER, "a", 50), one("0x" + "22" * 20, "b", 50)
    refused: list[str] = []
    threads: list[threading.Thread] = []
    insert = Ledger._insert_payments

    def slow_insert(self: Ledger, s: Any, m: Manifest, now: int) -> None:
        insert(self, s, m, now)
        if m is first:  # the first has read and written, not committed: the second now
            threads.append(threading.Thread(target=_accept, args=(b, second, refused)))
            threads[0].start()
            threads[0].join(0.5)  # it waits for the first's write lock (it used not to)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Ledger, "_insert_payments", slow_insert)
        a.accept_manifest(first, ceiling=100, signers=[])
    threads[0].join(30)
    assert refused == ["program p: accepted 60 + this manifest 50 = 110 base units exceeds "
                       "the ceiling 100"]
    assert a.committed("p") == 60


def _accept(led: Ledger, m: Manifest, refused: list[str]) -> None:
    try:
        led.accept_manifest(m, ceiling=100, signers=[])
    except CeilingError as e:
        refused.append(str(e))


def test_the_runner_lock_of_a_ledger_is_the_same_through_a_symbolic_link(
        tmp_path: Path) -> None:
    real = tmp_path / "l.sqlite"
    real.touch()
    alias = tmp_path / "alias.sqlite"
    alias.symlink_to(real)
    second = RunnerLock(alias, "0x" + "22" * 20, 31337, str(tmp_path / "locks2"))
    with RunnerLock(real, PAYER, 31337, str(tmp_path / "locks1")), \
            pytest.raises(LockedError, match="another disburser is running"):
        second.__enter__()


def test_record_mine_and_finalize_many(tmp_path: Path) -> None:
    led, m = _ledger(tmp_path)
    ids = led.record_txs([_tx(m, 0, (0,)), _tx(m, 1, (1, 2, 3)), _tx(m, 2, (4,))])
    assert [t.nonce for t in led.open_txs(PAYER)] == [0, 1, 2]
    states = {p.idx: (p.status, p.tx_id) for p in led.payments(m.root)}
    assert states == {0: ("in_flight", ids[0]), 1: ("in_flight", ids[1]),
                      2: ("in_flight", ids[1]), 3: ("in_flight", ids[1]),
                      4: ("in_flight", ids[2]), 5: ("queued", None)}
    with led.atomic():
        led.mark_mined_many([Mined(ids[0], "0xa", 10, "0xb10", 1, 50_000),
                             Mined(ids[1], "0xc", 10, "0xb10", 1, 90_000),
                             Mined(ids[2], "0xd", 11, "0xb11", 0, 30_000)])
        finals = led.finalize_many(ids)
    assert finals == {ids[0]: TxStatus.CONFIRMED, ids[1]: TxStatus.CONFIRMED,
                      ids[2]: TxStatus.REVERTED}
    c = led.counts([m.root])
    assert c.by_status == {"confirmed": 4, "queued": 2}
    assert c.amount_by_status == {"confirmed": sum(BIG[:4]), "queued": BIG[4] + BIG[5]}
    # The reverted transfer's payment is queued again, bound to no transaction.
    assert {p.idx: p.tx_id for p in led.payments(m.root, [PaymentStatus.QUEUED])} == \
        {4: None, 5: None}
    kinds = [e.kind for e in led.events() if e.kind.startswith("tx_")]
    assert kinds.count("tx_signed") == 3 and kinds.count("tx_mined") == 3
    assert kinds.count("tx_confirmed") == 2 and kinds.count("tx_reverted") == 1


def test_a_payment_claimed_twice_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    led, m = _ledger(tmp_path)
    led.record_txs([_tx(m, 0, (0,))])
    with pytest.raises(DisburserError, match=r"claim of 2 payments changed 1 rows, expected 2"):
        led.record_txs([_tx(m, 1, (5,)), _tx(m, 2, (0,))])
    assert [t.nonce for t in led.txs(PAYER)] == [0]
    assert led.payments(m.root)[5].status == "queued"


@pytest.mark.parametrize("idxs", [(1, 2, 3), (1, 2, 4), (3, 3, 4), (3, 3, 5)],
                         ids=["consecutive", "scattered", "repeated", "repeated-spanning"])
def test_a_batch_claim_of_a_paid_payment_is_refused(tmp_path: Path,
                                                    idxs: tuple[int, ...]) -> None:
    """Consecutive indexes are claimed as a range, others as a list: either way every
    payment must still be queued, once, and a refused claim writes nothing."""
    led, m = _ledger(tmp_path)
    led.record_txs([_tx(m, 0, (2,))])
    with pytest.raises(DisburserError, match=r"claim of 3 payments .* changed 2 rows"):
        led.record_txs([_tx(m, 1, idxs)])
    assert [p.status for p in led.payments(m.root)][:5] == \
        ["queued", "queued", "in_flight", "queued", "queued"]


def test_a_batch_of_scattered_payments_is_claimed(tmp_path: Path) -> None:
    led, m = _ledger(tmp_path)
    (i,) = led.record_txs([_tx(m, 0, (0, 3, 5))])
    assert {p.idx: (p.status, p.tx_id) for p in led.payments(m.root)} == {
        0: ("in_flight", i), 1: ("queued", None), 2: ("queued", None), 3: ("in_flight", i),
        4: ("queued", None), 5: ("in_flight", i)}


def test_mined_twice_is_refused(tmp_path: Path) -> None:
    led, m = _ledger(tmp_path)
    (i,) = led.record_txs([_tx(m, 0, (0,))])
    led.mark_mined_many([Mined(i, "0xa", 10, "0xb", 1, 1)])
    with pytest.raises(DisburserError, match="pending -> mined changed 0 rows, expected 1"):
        led.mark_mined_many([Mined(i, "0xa", 10, "0xb", 1, 1)])


def test_a_ledger_made_before_an_index_existed_gets_it_on_open(tmp_path: Path) -> None:
    import sqlite3

    led, m = _ledger(tmp_path)
    led.record_txs([_tx(m, 0, (0, 1))])
    db = sqlite3.connect(tmp_path / "l.sqlite")
    db.execute("DROP INDEX ix_tx_payer_status")
    db.commit()
    Ledger(tmp_path / "l.sqlite")
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "ix_tx_payer_status" in names
    plan = " ".join(str(r) for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT count(*) FROM tx WHERE payer = ? AND status = ?",
        (PAYER, "pending")))
    assert "COVERING INDEX ix_tx_payer_status" in plan
    db.close()


def test_open_transactions_come_without_their_payload_which_is_read_by_id(
        tmp_path: Path) -> None:
    """The poll's rows leave out the calldata and the signed bytes; a bump and a
    re-broadcast read them by id, exactly as written ahead."""
    from sqlalchemy.exc import SQLAlchemyError

    led, m = _ledger(tmp_path)
    new = _tx(m, 0, (0, 1))
    new = dataclasses.replace(new, data="0x" + "ab" * 1000)
    (tx_id,) = led.record_txs([new])
    (t,) = led.open_txs(PAYER)
    (a,) = led.attempts_of([tx_id])[tx_id]
    with pytest.raises(SQLAlchemyError):
        _ = t.data
    with pytest.raises(SQLAlchemyError):
        _ = a.raw
    assert led.tx_data(tx_id) == new.data
    assert led.attempt_raw(a.id or 0) == new.raw


def test_a_manifest_is_looked_at_again_once_payments_are_queued_again(tmp_path: Path) -> None:
    """The look at the payer's past transfers covered the payments queued then: a reverted
    transaction's payments, or failed ones put back, are queued again and need a new look;
    a look from a later block does not cover an earlier one."""
    led, m = _ledger(tmp_path)
    (tx_id,) = led.record_txs([_tx(m, 0, (0, 1))])
    led.record_history_check(m.root, [], [], from_block=5, to_block=50)
    assert led.history_checked(m.root, 5) and led.history_checked(m.root, 9)
    assert not led.history_checked(m.root, 4)
    led.mark_mined_many([Mined(tx_id, "0xa", 10, "0xb10", 0, 50_000)])
    assert led.finalize_many([tx_id]) == {tx_id: TxStatus.REVERTED}
    assert not led.history_checked(m.root, 5)
    led.record_history_check(m.root, [], [], from_block=5, to_block=60)
    assert led.history_checked(m.root, 5)
    led.mark_failed(m.root, 2, "Blacklistable: account is blacklisted")
    assert led.requeue_failed(m.root) == 1
    assert not led.history_checked(m.root, 5)


def test_a_listing_of_matches_holds_until_anything_about_the_manifest_happens(
        tmp_path: Path) -> None:
    led, m = _ledger(tmp_path)
    led.list_matches(m.root, ["0xaa:0"], 0)
    assert led.listed_transfers(m.root, 0) == {"0xaa:0"}
    assert led.listed_transfers(m.root, 10) == set()  # listed reading from another block
    led.record_history_check(m.root, [], [], from_block=10, to_block=50)
    assert led.listed_transfers(m.root, 0) == set()  # a check since: the listing is spent


def test_status_rate_and_projection_are_per_program(tmp_path: Path) -> None:
    """A program that has confirmed nothing has no rate and no projected finish, even while
    another program of the same ledger is being paid; the paying one is on track."""
    import time
    from types import SimpleNamespace

    from disburser.settings import parse_ceilings
    from disburser.status import render_status, status_data

    led, m = _ledger(tmp_path)
    other = make_manifest(program="q", chain_id=31337, token=TOKEN, payer=PAYER,
                          not_after=2**40, payments=[Payment(0, "v0", "0x" + "07" * 20, 9)])
    led.accept_manifest(other, ceiling=10**27, signers=[])
    ids = led.record_txs([_tx(m, 0, (0, 1, 2))])
    with led.atomic():
        led.mark_mined_many([Mined(ids[0], "0xa", 10, "0xb10", 1, 50_000)])
        led.finalize_many(ids)
    s = SimpleNamespace(ceilings=parse_ceilings("*=10000000000000000000000", 6),
                        decimals=6, batch_contract=None)
    d = status_data(led, s, now=time.time() + 10)
    p, q = d["programs"]
    assert (p["program"], q["program"]) == ("p", "q")
    assert p["rate_per_s"] > 0 and p["projected_finish"] is not None and p["on_track"]
    assert (q["rate_per_s"], q["projected_finish"], q["on_track"]) == (0.0, None, False)
    assert not p["all_paid"] and not q["all_paid"]
    text = render_status(d).split("program q")[1]
    assert "  rate        0.0/s\n  finish      unknown (deadline " in text
    assert "h from the program's first manifest, NOT on track: nothing confirmed in the last " \
        "10 min)" in text


def test_status_rate_is_the_pace_since_the_start_not_since_the_first_confirmation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started at T, three payments confirmed at T+100, status at T+110: 3 in 110 s. It
    was 3 in 10 s (divided by the time since the first confirmation of the window), so
    the same ledger showed 500/s a second after a batch and 0.8/s ten minutes later."""
    from types import SimpleNamespace

    from disburser import ledger as lg
    from disburser.settings import parse_ceilings
    from disburser.status import status_data

    t0 = 1_800_000_000
    monkeypatch.setattr(lg.time, "time", lambda: float(t0))
    led, m = _ledger(tmp_path)
    ids = led.record_txs([_tx(m, 0, (0, 1, 2))])
    monkeypatch.setattr(lg.time, "time", lambda: float(t0 + 100))
    with led.atomic():
        led.mark_mined_many([Mined(ids[0], "0xa", 10, "0xb10", 1, 50_000)])
        led.finalize_many(ids)
    s = SimpleNamespace(ceilings=parse_ceilings("*=10000000000000000000000", 6),
                        decimals=6, batch_contract=None)
    (p,) = status_data(led, s, now=t0 + 110)["programs"]
    assert p["rate_per_s"] == round(3 / 110, 2)
    (p,) = status_data(led, s, now=t0 + 700)["programs"]  # the window: the last 600 s
    assert p["rate_per_s"] == round(3 / 600, 2)


def test_status_shows_the_recorded_ceiling_where_reconcile_checks_it(tmp_path: Path) -> None:
    """Accepted under a ceiling of 10^27 on the sending machine; on a machine without
    DISBURSER_CEILING (DESIGN's default of 300,000,000 tokens, 3*10^14), status showed the
    default and its room as 'uncommitted', where reconcile checks the recorded one."""
    from types import SimpleNamespace

    from disburser.settings import parse_ceilings
    from disburser.status import render_status, status_data

    led, m = _ledger(tmp_path)
    s = SimpleNamespace(ceilings=parse_ceilings("", 6), decimals=6, batch_contract=None)
    recorded = 10**27
    assert s.ceilings.for_program("p") < recorded  # the default is below: no change
    (p,) = status_data(led, s)["programs"]
    assert (p["ceiling"], p["settings_ceiling"]) == (str(3 * 10**14), None)
    small = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=PAYER,
                          not_after=2**40, payments=[Payment(0, "s0", "0x" + "07" * 20, 9)])
    led2 = Ledger(tmp_path / "l2.sqlite")
    led2.accept_manifest(small, ceiling=10**14, signers=[])  # below the default
    (p,) = status_data(led2, s)["programs"]
    assert (p["ceiling"], p["settings_ceiling"]) == (str(10**14), str(3 * 10**14))
    assert "  ceiling     100000000 (recorded when its manifests were accepted; the " \
        "settings say 300000000)" in render_status(status_data(led2, s))


def test_the_program_records_the_ceiling_of_its_latest_acceptance(tmp_path: Path) -> None:
    led, m = _ledger(tmp_path)  # accepted under 10^27
    assert [p.ceiling for p in led.programs()] == [str(10**27)]
    more = make_manifest(program="p", chain_id=31337, token=TOKEN, payer=PAYER,
                         not_after=2**40, payments=[Payment(0, "new", "0x" + "09" * 20, 5)])
    assert led.accept_manifest(more, ceiling=10**27 + 5, signers=[])
    assert [p.ceiling for p in led.programs()] == [str(10**27 + 5)]
    # the same manifest again (re-signed) is no new acceptance: the record stays
    assert not led.accept_manifest(more, ceiling=10**28, signers=[])
    assert [p.ceiling for p in led.programs()] == [str(10**27 + 5)]


def test_a_postgresql_ledger_that_cannot_be_used_is_one_line_without_its_password() -> None:
    """A port that is not a number, and a server that refuses the connection, were internal
    errors (the second with three lines of SQLAlchemy's text)."""
    with pytest.raises(SettingsError) as e:
        Ledger("postgresql://u:pw-s3cret@127.0.0.1:xx/db")
    assert str(e.value) == ("DISBURSER_DB postgresql://u:***@127.0.0.1:xx/db: not a usable "
                            "PostgreSQL URL")
    with pytest.raises(LedgerUnavailable) as u:
        Ledger("postgresql://u:pw-s3cret@127.0.0.1:1/db")  # nothing listens on port 1
    assert str(u.value).startswith("ledger DISBURSER_DB postgresql://u:***@127.0.0.1:1/db: "
                                   "cannot be reached (")
    assert "\n" not in str(u.value) and "s3cret" not in str(u.value)
    assert u.value.exit_code == 1
