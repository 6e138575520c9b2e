"""reconcile's side of the ledger, on a real SQLite file: the accepted manifests rebuilt from
the payment rows are exactly the signed documents the ledger stores (what reconcile parsed
before); rows changed since are not trusted (the document is judged, as before); a changed
document is still refused; attribution read from the same rows."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from disburser import manifest as mf
from disburser.devnet import DEV_KEYS, PAYER
from disburser.domain import Manifest, Payment
from disburser.errors import InputError
from disburser.ledger import Ledger, NewTx
from disburser.reconcile import (
    LedgerPayment,
    ManifestIn,
    ledger_info,
    ledger_manifests,
    reconcile,
)
from disburser.settings import Ceilings

TOKEN = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"
# 18-decimal sized amounts: every digit must survive the TEXT column
AMOUNTS = [3 * 10**26 - 1, 10**18 + 7, 5, 1_250_000, 7_250_000]


def _manifest(program: str = "relief", seed: int = 0) -> Manifest:
    pays = [Payment(i, f"{program}-u{i}", mf.to_checksum("0x" + f"{seed + i + 1:040x}"), a)
            for i, a in enumerate(AMOUNTS)]
    m = mf.make_manifest(program=program, chain_id=31337, token=TOKEN, payer=PAYER,
                         not_after=2_000_000_000, payments=pays)
    for key in DEV_KEYS[2:4]:
        m = mf.with_signature(m, mf.sign(m, bytes.fromhex(key[2:])))
    return m


def _ledger(tmp_path: Path, *ms: Manifest) -> Ledger:
    led = Ledger(tmp_path / "l.sqlite")
    for m in ms:
        led.accept_manifest(m, ceiling=10**27, signers=list(mf.signers_of(m)))
    return led


def _sql(led: Ledger, statement: str, *params: object) -> None:
    """A hand edit of the ledger file, as an operator (or a bug) could make."""
    with sqlite3.connect(led.url) as db:
        db.execute(statement, params)


def test_rows_give_the_stored_document(tmp_path: Path) -> None:
    relief, loans = _manifest(), _manifest("loans", seed=100)
    led = _ledger(tmp_path, relief, loans)
    got = ledger_manifests(led, "db")
    assert [e.manifest for e in got] == [relief, loans]
    # ... which is what parsing the stored documents (the old path) gives
    assert [e.manifest for e in got] == [mf.parse(r.document, "db") for r in led.manifests()]
    assert got[0].signers == mf.signers_of(relief) and got[0].sources == ("ledger",)
    # a manifest also given as a file is taken from the file
    known = mf.parse(mf.to_json(relief), "m.json")
    assert ledger_manifests(led, "db", {relief.root: known})[0].manifest is known


@pytest.mark.parametrize("edit", [
    ('UPDATE payment SET "to" = ? WHERE idx = 1', "0x" + "ee" * 20),
    ("UPDATE payment SET amount = ? WHERE idx = 2", "6"),
    ("UPDATE payment SET pid = ? WHERE idx = 0", "someone-else"),
    ("DELETE FROM payment WHERE idx = ?", 4),
])
def test_changed_rows_are_not_trusted(tmp_path: Path, edit: tuple[str, object]) -> None:
    m = _manifest()
    led = _ledger(tmp_path, m)
    _sql(led, *edit)
    (got,) = ledger_manifests(led, "db")
    assert got.manifest == m  # the signed document's payments, not the edited rows


def test_a_changed_document_is_refused_as_before(tmp_path: Path) -> None:
    m = _manifest()
    led = _ledger(tmp_path, m)
    doc = json.loads(led.manifests()[0].document)
    doc["payments"][3]["amount"] = "1250001"
    _sql(led, "UPDATE manifest SET document = ?", json.dumps(doc))
    with pytest.raises(InputError, match=f"db: manifest {m.root}: its document has "
                                         "paymentsRoot 0x.*; the ledger is corrupt"):
        ledger_manifests(led, "db")


def test_rows_path_reconciles_like_the_document_path(tmp_path: Path) -> None:
    m = _manifest()
    led = _ledger(tmp_path, m)
    rows_entries = ledger_manifests(led, "db")
    doc_entries = [ManifestIn(mf.parse(r.document, "db"), rows_entries[0].signers, ("ledger",))
                   for r in led.manifests()]
    info = ledger_info(led)
    ceilings = Ceilings(default=10**27, per_program={})
    a = reconcile(rows_entries, [], info, ceilings, 1, 100)
    b = reconcile(doc_entries, [], info, ceilings, 1, 100)
    assert a == b


def test_attribution_from_the_rows(tmp_path: Path) -> None:
    m = _manifest()
    led = _ledger(tmp_path, m)
    led.record_txs([
        NewTx(payer=PAYER, nonce=0, kind="batch", root=m.root, to=TOKEN, data="0x", gas_limit=1,
              raw="0x01", tx_hash="0x" + "AB" * 32, max_fee=2, tip=1, idxs=(0, 1), amount=9),
        NewTx(payer=PAYER, nonce=1, kind="batch", root=m.root, to=TOKEN, data="0x", gas_limit=1,
              raw="0x02", tx_hash="0x" + "cd" * 32, max_fee=2, tip=1, idxs=(2,), amount=5),
    ])
    led.mark_failed(m.root, 3, "blacklisted")
    info = ledger_info(led)
    assert info.payments == {
        (m.root, 0): LedgerPayment("in_flight", None, ("0x" + "ab" * 32,), None),
        (m.root, 1): LedgerPayment("in_flight", None, ("0x" + "ab" * 32,), None),
        (m.root, 2): LedgerPayment("in_flight", None, ("0x" + "cd" * 32,), None),
        (m.root, 3): LedgerPayment("failed", "blacklisted", (), None),
        (m.root, 4): LedgerPayment("queued", None, (), None),
    }
    assert set(info.programs) == {"relief"} and info.gas == ()
    assert info.programs["relief"].committed == m.total  # what the ledger accepted
