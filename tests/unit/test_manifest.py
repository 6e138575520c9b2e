"""Manifest parsing, the EIP-712 digest (checked against eth-account's own encoder), and
every structural refusal with its exact message."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from disburser import manifest as mf
from disburser.domain import Payment
from disburser.errors import InputError, ManifestError

TOKEN = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"
PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
TO2 = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
KEYS = [bytes.fromhex(k) for k in (
    "5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
)]
ADDRS = [Account.from_key(k).address for k in KEYS]


def doc(**over: object) -> dict[str, object]:
    d: dict[str, object] = {
        "format": "disburser.manifest/1", "program": "p", "chain_id": 31337, "token": TOKEN,
        "payer": PAYER, "not_after": 2_000_000_000,
        "payments": [{"id": "a", "to": TO, "amount": "1250000"},
                     {"id": "b", "to": TO2, "amount": "7"}],
        "signatures": [],
    }
    d.update(over)
    return d


def parse(d: dict[str, object]) -> mf.Manifest:
    return mf.parse(json.dumps(d), "m.json")


def test_digest_matches_eth_account_typed_data() -> None:
    m = parse(doc())
    signable = encode_typed_data(full_message=mf.typed_data(m))
    assert signable.header == mf.domain_separator(m.chain_id)
    assert signable.body == mf.struct_hash(m)
    sig = Account.sign_message(signable, KEYS[0]).signature
    assert mf.recover(m, "0x" + bytes(sig).hex()) == ADDRS[0]
    assert mf.recover(m, mf.sign(m, KEYS[0])) == ADDRS[0]


def test_roundtrip_json_is_canonical(tmp_path: Path) -> None:
    m = mf.with_signature(parse(doc()), mf.sign(parse(doc()), KEYS[1]))
    p = tmp_path / "m.json"
    mf.write(m, p)
    again = mf.load(p)
    assert again == m
    assert mf.to_json(again) == p.read_text()


def _verify(m: mf.Manifest, **over: object) -> mf.Verification:
    kw: dict[str, object] = dict(source="m.json", approvers=ADDRS, quorum=2, chain_id=31337,
                                 token=TOKEN, payer=PAYER, now=1_000)
    kw.update(over)
    return mf.verify(m, **kw)  # type: ignore[arg-type]


def signed(m: mf.Manifest, *keys: bytes) -> mf.Manifest:
    for k in keys:
        m = mf.with_signature(m, mf.sign(m, k))
    return m


def test_quorum_met() -> None:
    v = _verify(signed(parse(doc()), KEYS[0], KEYS[2]))
    assert v.approved == (ADDRS[0], ADDRS[2]) and v.quorum_met


@pytest.mark.parametrize("over, message", [
    (dict(chain_id=1), "m.json: manifest is for chain 31337, this is chain 1"),
    (dict(token=PAYER), f"m.json: manifest pays token {TOKEN}, configured is {PAYER}"),
    (dict(payer=TO), f"m.json: manifest payer is {PAYER}, the configured payer is {TO}"),
    (dict(now=2_000_000_001), "m.json: manifest expired at not_after=2000000000 (2033-05-18 "
     "03:33:20 UTC; now 2033-05-18 03:33:21 UTC): rebuild the same payments with a later "
     "--not-after and have them signed again (same paymentsRoot, nothing paid twice)"),
    (dict(quorum=3), "m.json: quorum not met: 2 of 3 required approver signatures"),
    (dict(approvers=ADDRS[1:]), f"m.json: quorum not met: 1 of 2 required approver signatures "
     f"(signatures[0] by {ADDRS[0]}: not configured approvers, or the manifest was changed "
     "after signing)"),
])
def test_verify_refusals(over: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError) as e:
        _verify(signed(parse(doc()), KEYS[0], KEYS[1]), **over)
    assert str(e.value) == message


def test_tampered_amount_is_refused() -> None:
    m = signed(parse(doc()), KEYS[0], KEYS[1])
    d = json.loads(mf.to_json(m))
    d["payments"][0]["amount"] = "1250001"
    with pytest.raises(ManifestError, match=r"^m.json: quorum not met: 0 of 2 required approver "
                       r"signatures \(signatures\[0\] by 0x[0-9a-fA-F]{40}, signatures\[1\] by "
                       r"0x[0-9a-fA-F]{40}: not configured approvers, or the manifest was "
                       r"changed after signing\)$"):
        _verify(parse(d))


def test_same_signer_twice_is_refused() -> None:
    m = parse(doc())
    sig = mf.sign(m, KEYS[0])
    with pytest.raises(ManifestError, match="has already signed this manifest"):
        mf.with_signature(mf.with_signature(m, sig), sig)
    # And a hand-edited file with the signature twice (or a malleated twin) is refused too.
    d = doc(signatures=[sig, sig])
    with pytest.raises(ManifestError) as e:
        _verify(parse(d))
    assert str(e.value) == f"m.json: signatures[1]: {ADDRS[0]} signed twice"


BAD_ADDR = "0x3c44CdDdB6a900fa2b585dd299e03d12FA4293BC"


@pytest.mark.parametrize("text_or_doc, message", [
    ("{not json", "m.json: not valid JSON (Expecting property name enclosed in double quotes "
     "at line 1)"),
    ("[]", "m.json: a manifest is a JSON object"),
    ({k: v for k, v in doc().items() if k != "payer"}, "m.json: missing field 'payer'"),
    (doc(format="x/2"), "m.json: format is 'x/2', expected 'disburser.manifest/1'"),
    (doc(payments=[]), "m.json: payments must be a non-empty list"),
    (doc(payments=[{"id": "a", "to": TO}]), "m.json: payments[0]: missing field 'amount'"),
    (doc(payments=[{"id": "a", "to": TO, "amount": "0"}]),
     "m.json: payments[0].amount: '0' is not a positive integer string of base units"),
    (doc(payments=[{"id": "a", "to": TO, "amount": "-5"}]),
     "m.json: payments[0].amount: '-5' is not a positive integer string of base units"),
    (doc(payments=[{"id": "a", "to": TO, "amount": "1.5"}]),
     "m.json: payments[0].amount: '1.5' is not a positive integer string of base units"),
    (doc(payments=[{"id": "a", "to": TO, "amount": "5\n"}]),
     "m.json: payments[0].amount: '5\\n' is not a positive integer string of base units"),
    (doc(payments=[{"id": "a", "to": TO, "amount": 5}]),
     "m.json: payments[0].amount: 5 is not a positive integer string of base units"),
    (doc(payments=[{"id": "a", "to": "0x1234", "amount": "5"}]),
     "m.json: payments[0].to: '0x1234' is not a 0x-prefixed 20-byte hex address"),
    (doc(payments=[{"id": "a", "to": BAD_ADDR, "amount": "5"}]),
     f"m.json: payments[0].to: {BAD_ADDR} fails its EIP-55 checksum (expected {TO})"),
    (doc(payments=[{"id": "a", "to": "0x" + "0" * 40, "amount": "5"}]),
     "m.json: payments[0].to: the zero address cannot be paid"),
    (doc(payments=[{"id": "a", "to": TO, "amount": "5"}, {"id": "a", "to": TO, "amount": "6"}]),
     "m.json: payments[1]: duplicate id 'a' (also payments[0])"),
    (doc(payments=[{"id": "", "to": TO, "amount": "5"}]),
     "m.json: payments[0]: id must be 1-128 printable characters, got ''"),
    (doc(chain_id="1"), "m.json: chain_id must be a positive integer, got '1'"),
    (doc(signatures=["0x12"]), "m.json: signatures[0] is not a 65-byte 0x-hex signature"),
])
def test_structural_refusals(text_or_doc: object, message: str) -> None:
    text = text_or_doc if isinstance(text_or_doc, str) else json.dumps(text_or_doc)
    with pytest.raises(ManifestError) as e:
        mf.parse(text, "m.json")
    assert str(e.value) == message


def test_build_from_csv_converts_exactly_and_refuses_bad_rows(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text(f"id,to,amount\nu1,{TO.lower()},1.25\nu2,{TO2},300000000\n")
    m = mf.build_from_csv(p, program="p", chain_id=1, token=TOKEN, payer=PAYER,
                          not_after=5, decimals=6)
    assert [(x.to, x.amount) for x in m.payments] == [(TO, 1_250_000), (TO2, 3 * 10**14)]
    for row, msg in [
        (f"u1,{TO},1.2500001", f"{p}:2: amount: amount '1.2500001' has more than 6 decimal places"),
        (f"u1,{TO},0", f"{p}:2: amount must be greater than zero"),
        (f"u1,{TO},-1", f"{p}:2: amount: amount '-1' is not a plain decimal number"),
        (f"u1,{TO},1e3", f"{p}:2: amount: amount '1e3' is not a plain decimal number"),
        (f"u1,{BAD_ADDR},1", f"{p}:2: to: {BAD_ADDR} fails its EIP-55 checksum (expected {TO})"),
        (f"u1,{TO},1{'0' * 80}", f"{p}:2: amount does not fit in uint256"),
    ]:
        p.write_text(f"id,to,amount\n{row}\n")
        with pytest.raises(InputError) as e:
            mf.build_from_csv(p, program="p", chain_id=1, token=TOKEN, payer=PAYER,
                              not_after=5, decimals=6)
        assert str(e.value) == msg
    p.write_text("id,to,amount,amount\nu1,{TO},1,5\n")
    with pytest.raises(InputError, match=f"{p}: column 'amount' appears twice in the header "
                       r"\(id,to,amount,amount\)"):
        mf.build_from_csv(p, program="p", chain_id=1, token=TOKEN, payer=PAYER, not_after=5,
                          decimals=6)
    p.write_text("id,amount\nu1,1\n")
    with pytest.raises(InputError, match=r"missing column 'to' \(header: id,amount\)"):
        mf.build_from_csv(p, program="p", chain_id=1, token=TOKEN, payer=PAYER, not_after=5,
                          decimals=6)


def test_build_from_csv_names_the_line_a_row_ends_on_and_refuses_what_csv_cannot_read(
        tmp_path: Path) -> None:
    def build(p: Path) -> str:
        with pytest.raises(InputError) as e:
            mf.build_from_csv(p, program="p", chain_id=1, token=TOKEN, payer=PAYER,
                              not_after=5, decimals=6)
        return str(e.value)

    p = tmp_path / "p.csv"
    # a quoted note over two lines: the next row is on line 4, not record 3
    p.write_text(f'id,to,amount,note\nu1,{TO},1,"two\nlines"\nu2,{TO},1.0000001,\n')
    assert build(p) == f"{p}:4: amount: amount '1.0000001' has more than 6 decimal places"
    p.write_text(f"id,to,amount\nu1,{TO},1\n\nu1,{TO},2\n")
    assert build(p) == f"{p}:4: duplicate id 'u1' (first on line 2)"
    p.write_text(f"id,to,amount\nu1,{TO},{'1' * 200_000}\n")
    assert build(p) == f"{p}:2: field larger than field limit (131072)"
    assert build(tmp_path) == f"{tmp_path}: cannot read (Is a directory)"


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3 * 10**26), min_size=1, max_size=8))
def test_any_change_of_amount_changes_the_digest(amounts: list[int]) -> None:
    pays = [Payment(i, f"id{i}", TO, a) for i, a in enumerate(amounts)]
    m = mf.make_manifest(program="p", chain_id=1, token=TOKEN, payer=PAYER, not_after=9,
                         payments=pays)
    bumped = [*pays[:-1], Payment(pays[-1].index, pays[-1].id, TO, pays[-1].amount + 1)]
    m2 = mf.make_manifest(program="p", chain_id=1, token=TOKEN, payer=PAYER, not_after=9,
                          payments=bumped)
    assert mf.digest(m) != mf.digest(m2)


# --- the fast path of parse -------------------------------------------------------------
# parse checks every payment at once with C loops and falls back to the payment-by-payment
# loop for anything unusual: a fault anywhere must still be named, with the same message.

LONG = [{"id": f"u{i}", "to": TO if i % 2 else TO2, "amount": str(i + 1)} for i in range(50)]


@pytest.mark.parametrize("bad, message", [
    ({"id": "u37", "to": TO}, "m.json: payments[37]: missing field 'amount'"),
    (["u37", TO, "5"], "m.json: payments[37]: must be an object with id, to, amount"),
    ({"id": "u3", "to": TO, "amount": "5"},
     "m.json: payments[37]: duplicate id 'u3' (also payments[3])"),
    ({"id": "x" * 129, "to": TO, "amount": "5"},
     f"m.json: payments[37]: id must be 1-128 printable characters, got '{'x' * 129}'"),
    ({"id": "a\tb", "to": TO, "amount": "5"},
     "m.json: payments[37]: id must be 1-128 printable characters, got 'a\\tb'"),
    ({"id": 37, "to": TO, "amount": "5"},
     "m.json: payments[37]: id must be 1-128 printable characters, got 37"),
    ({"id": "u37", "to": BAD_ADDR, "amount": "5"},
     f"m.json: payments[37].to: {BAD_ADDR} fails its EIP-55 checksum (expected {TO})"),
    ({"id": "u37", "to": TO.lower(), "amount": "5"},
     f"m.json: payments[37].to: {TO.lower()} fails its EIP-55 checksum (expected {TO})"),
    ({"id": "u37", "to": TO + "\n", "amount": "5"},
     f"m.json: payments[37].to: {TO + chr(10)!r} is not a 0x-prefixed 20-byte hex address"),
    ({"id": "u37", "to": "0x" + "0" * 40, "amount": "5"},
     "m.json: payments[37].to: the zero address cannot be paid"),
    ({"id": "u37", "to": TO, "amount": "05"},
     "m.json: payments[37].amount: '05' is not a positive integer string of base units"),
    ({"id": "u37", "to": TO, "amount": "5\n6"},
     "m.json: payments[37].amount: '5\\n6' is not a positive integer string of base units"),
    ({"id": "u37", "to": TO, "amount": str(2**256)},
     "m.json: payments[37].amount: does not fit in uint256"),
])
def test_a_fault_deep_in_a_long_manifest_is_named(bad: object, message: str) -> None:
    payments: list[object] = [*LONG]
    payments[37] = bad
    with pytest.raises(ManifestError) as e:
        parse(doc(payments=payments))
    assert str(e.value) == message


def test_long_manifest_edge_values_are_accepted() -> None:
    assert mf._payments_fast(LONG) is not None  # a plain manifest takes the fast path
    payments = [*LONG]
    payments[10] = {"id": "x" * 128, "to": TO, "amount": str(10**77)}  # 78 digits
    payments[11] = {"id": "é ☃ 𝄞", "to": TO, "amount": "9" * 76}
    m = parse(doc(payments=payments))
    assert [(p.index, p.id, p.to, p.amount) for p in m.payments] == [
        (i, p["id"], p["to"], int(p["amount"])) for i, p in enumerate(payments)]


def test_an_amount_of_exactly_the_uint256_maximum_is_accepted() -> None:
    m = parse(doc(payments=[{"id": "a", "to": TO, "amount": str(2**256 - 1)}]))
    assert m.total == m.payments[0].amount == 2**256 - 1


def test_a_total_past_uint256_is_refused() -> None:
    """Each amount fits, their sum does not: the signature's uint256 total could not carry
    it (and its Merkle leaves could not be hashed)."""
    payments = [{"id": "a", "to": TO, "amount": str(2**255)},
                {"id": "b", "to": TO2, "amount": str(2**255)}]
    with pytest.raises(ManifestError, match=f"^m.json: the payments total {2**256} base "
                       "units, more than the signature's uint256 total can hold$"):
        parse(doc(payments=payments))


@pytest.mark.parametrize("to, what", [(TOKEN, "the token contract"), (PAYER, "the payer")])
def test_the_token_contract_and_the_payer_are_never_recipients(to: str, what: str) -> None:
    payments = [{"id": "a", "to": TO, "amount": "1"}, {"id": "b", "to": to, "amount": "2"}]
    with pytest.raises(ManifestError) as e:
        parse(doc(payments=payments))
    assert str(e.value) == (f"m.json: payments[1] (id 'b').to: {to} is {what}; it cannot be a "
                            "recipient")


_id = st.sampled_from(["a", "b", "", "x" * 128, "x" * 129, "é", "a\nb", 7])
_to = st.sampled_from([TO, PAYER, TO.lower(), BAD_ADDR, "0x" + "0" * 40, TO + "\n", "0x12",
                       None])
_amount = st.sampled_from(["1", "5", "0", "05", "1.5", "5\n", "5\n6", str(2**256 - 1),
                           str(2**256), 5, "٥"])
_payment = st.one_of(
    st.fixed_dictionaries({"id": _id, "to": _to, "amount": _amount}),
    st.fixed_dictionaries({"id": _id, "to": _to}),
    st.just(["a", TO, "5"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_payment, min_size=1, max_size=6))
def test_fast_path_agrees_with_the_checking_loop(raw: list[object]) -> None:
    """Whatever the fast path accepts, the checking loop accepts identically; what it
    declines is left to the loop (which may accept it: '5\\n', a 78-digit amount)."""
    fast = mf._payments_fast(raw)
    try:
        checked = mf._payments_checked(raw, "m.json")
    except ManifestError:
        assert fast is None
    else:
        assert fast is None or fast == checked


# --- review fixes: numbers, nesting, duplicate keys, unknown fields, high s, strangers ------


BIG = '"@BIG@"'  # where a number too long for json.dumps goes


@pytest.mark.parametrize("over, number, message", [
    (dict(not_after="@BIG@"), "1" + "0" * 4999, "m.json: not_after must be a positive "
     "integer, got a number of 5000 digits"),
    (dict(chain_id="@BIG@"), "-" + "9" * 5000, "m.json: chain_id must be a positive integer, "
     "got a number of 5000 digits"),
    (dict(not_after="@BIG@"), "1" + "0" * 78, "m.json: not_after must be a positive integer, "
     "got a number of 79 digits"),
    (dict(payments=[{"id": "a", "to": TO, "amount": "@BIG@"}]), "7" * 5000,
     "m.json: payments[0].amount: a number of 5000 digits is not a positive integer string of "
     "base units"),
], ids=["not_after", "chain_id", "79-digits", "amount"])
def test_a_number_of_thousands_of_digits_is_refused_naming_the_field(
        over: dict[str, object], number: str, message: str) -> None:
    """json.loads raised ValueError ("Exceeds the limit (4300 digits)") past 4,300 digits:
    an internal error. Numbers past a uint256's 78 digits are now never converted."""
    with pytest.raises(ManifestError) as e:
        mf.parse(json.dumps(doc(**over)).replace(BIG, number), "m.json")
    assert str(e.value) == message


def test_the_largest_integers_still_parse() -> None:
    m = parse(doc(not_after=2**256 - 1, chain_id=2**256 - 1))
    assert m.not_after == m.chain_id == 2**256 - 1


DEEP = "m.json: not a manifest: JSON nested more than 32 levels deep (a manifest nests 3)"


@pytest.fixture
def _default_recursion_limit() -> Iterator[None]:
    """The interpreter's default: at the 100,000 eth-account's import (above) sets, a
    regression would crash this test process instead of failing the test."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(old)


@pytest.mark.usefixtures("_default_recursion_limit")
@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,
    "[" * 100_000,  # not even closed
    json.dumps(doc())[:-1] + ', "x": ' + "{\"a\": " * 33 + "1" + "}" * 33 + "}",
], ids=["arrays", "unclosed", "in-a-field"])
def test_deep_nesting_is_refused_before_json_loads(text: str) -> None:
    """With eth-account imported (recursion limit 100,000) json.loads of 100,000 levels
    crashes the interpreter (tests/cli/test_external_signing.py runs it in a process of its
    own); at the default limit it raised RecursionError, an internal error."""
    with pytest.raises(ManifestError) as e:
        mf.parse(text, "m.json")
    assert str(e.value) == DEEP


@pytest.mark.parametrize("text, deep", [
    ('{"a": "[[[[[[[[[["}', False),  # brackets in strings do not count
    ('{"a": "\\"[[[[[[[[[[\\""}', False),  # nor after an escaped quote
    ('[[[[[[[[[[]]]]]]]]]]', True),
    ('[[["]]]"[[["]]]"[[["]]]"[[[]]]]]]]]]]]]', True),  # strings' brackets do not cancel
    ('[[[[[]]]]][[[[[]]]]]', False),
    ('{"a": [{"b": [{"c": [{}]}]}]}', True),
    ('{"a": [{"b": [{"c": []}]}]}', False),
])
def test_json_too_deep_counts_only_the_structure(text: str, deep: bool) -> None:
    assert mf.json_too_deep(text, limit=6) is deep


def test_a_manifest_with_brackets_in_its_ids_is_not_deep() -> None:
    payments = [{"id": "[" * 128, "to": TO, "amount": "1"},
                {"id": "{" * 64 + "\\\"" + "[" * 60, "to": TO2, "amount": "2"}]
    assert [p.id for p in parse(doc(payments=payments)).payments] == [
        "[" * 128, "{" * 64 + "\\\"" + "[" * 60]


@pytest.mark.parametrize("text, message", [
    (json.dumps(doc())[:-1] + ', "payments": []}', "m.json: key 'payments' appears twice in one "
     "object (a reader could take either value)"),
    (json.dumps(doc()).replace('"amount": "7"', '"amount": "7", "amount": "700"'),
     "m.json: key 'amount' appears twice in one object (a reader could take either value)"),
], ids=["payments", "amount"])
def test_a_duplicate_key_is_refused(text: str, message: str) -> None:
    """Python keeps the last value of a key given twice; another reader (an approver's
    viewer) may show the first."""
    with pytest.raises(ManifestError) as e:
        mf.parse(text, "m.json")
    assert str(e.value) == message


@pytest.mark.parametrize("over, message", [
    (dict(memo="pay twice"), "m.json: unknown field 'memo' (fields: format, program, "
     "chain_id, token, payer, not_after, payments, signatures)"),
    (dict(payments=[{"id": "a", "to": TO, "amount": "5", "note": "x"}]),
     "m.json: payments[0]: unknown field 'note' (fields: id, to, amount)"),
    (dict(payments=[*LONG[:37], {"id": "u37", "to": TO, "amount": "5", "amout": "6"}]),
     "m.json: payments[37]: unknown field 'amout' (fields: id, to, amount)"),
    ({"x\n" * 1000: 1}, "m.json: unknown field " + repr("x\n" * 20) + "… (fields: format, "
     "program, chain_id, token, payer, not_after, payments, signatures)"),  # cut short
])
def test_an_unknown_field_is_refused(over: dict[str, object], message: str) -> None:
    """What the signature does not cover must not be shown to an approver (and `manifest
    sign` would silently drop it)."""
    with pytest.raises(ManifestError) as e:
        parse(doc(**over))
    assert str(e.value) == message


def _malleate(sig: str) -> str:
    """The high-s twin of a signature: (r, n - s) with the other recovery byte."""
    raw = bytes.fromhex(sig[2:])
    s = int.from_bytes(raw[32:64], "big")
    return "0x" + (raw[:32] + (mf.SECP256K1_N - s).to_bytes(32, "big")
                   + bytes([55 - raw[64]])).hex()


HIGH_S = ("not canonical: its s is above secp256k1n/2 (a malleated form; signers make the low-s "
          "one)")


def test_a_high_s_signature_is_refused() -> None:
    m = parse(doc())
    sig = mf.sign(m, KEYS[1])
    twin = _malleate(sig)
    from eth_keys import keys

    raw = bytes.fromhex(twin[2:])  # the twin does recover the same signer: it must not count
    assert keys.Signature(signature_bytes=raw[:64] + bytes([raw[64] - 27])) \
        .recover_public_key_from_msg_hash(mf.digest(m)).to_checksum_address() == ADDRS[1]
    with pytest.raises(ManifestError) as e:
        _verify(parse(doc(signatures=[mf.sign(m, KEYS[0]), twin])))
    assert str(e.value) == f"m.json: signatures[1]: {HIGH_S}"
    with pytest.raises(ManifestError) as e:
        mf.with_signature(m, twin)
    assert str(e.value) == f"signature {twin[:12]}…: {HIGH_S}"
    with pytest.raises(ManifestError) as e:  # one already in the file, when another signs
        mf.with_signature(parse(doc(signatures=[twin])), mf.sign(m, KEYS[0]), "m.json")
    assert str(e.value) == f"m.json: signatures[0]: {HIGH_S}"
    # its low-s form, as add-signature stores it, with either spelling of the recovery byte
    assert mf.low_s_form(twin) == sig and mf.low_s_form(sig) is None
    as01 = sig[:-2] + f"{int(sig[-2:], 16) - 27:02x}"
    assert mf.low_s_form(twin[:-2] + f"{int(twin[-2:], 16) - 27:02x}") == as01


def test_signatures_by_non_approvers_do_not_count_and_do_not_refuse() -> None:
    """DESIGN.md: valid when at least `quorum` distinct configured approvers signed."""
    stranger = bytes.fromhex("8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba")
    m = signed(parse(doc()), stranger, KEYS[0], KEYS[2])
    v = _verify(m)
    assert v.approved == (ADDRS[0], ADDRS[2]) and v.quorum_met
    assert v.strangers == ((0, Account.from_key(stranger).address),)
    with pytest.raises(ManifestError) as e:
        _verify(m, quorum=3)
    assert str(e.value) == (
        "m.json: quorum not met: 2 of 3 required approver signatures (signatures[0] by "
        f"{Account.from_key(stranger).address}: not configured approvers, or the manifest was "
        "changed after signing)")
    # the same stranger twice refuses nothing either (an approver twice does: see below)
    twice = dataclasses.replace(m, signatures=(m.signatures[0], *m.signatures))
    assert _verify(twice).approved == (ADDRS[0], ADDRS[2])
    again = dataclasses.replace(m, signatures=(*m.signatures, m.signatures[1]))
    with pytest.raises(ManifestError, match=rf"signatures\[3\]: {ADDRS[0]} signed twice"):
        _verify(again)


def test_a_csv_with_a_byte_order_mark_builds(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text(f"\ufeffid,to,amount\nu1,{TO},1.25\n", encoding="utf-8")
    m = mf.build_from_csv(p, program="p", chain_id=1, token=TOKEN, payer=PAYER, not_after=5,
                          decimals=6)
    assert [(x.id, x.to, x.amount) for x in m.payments] == [("u1", TO, 1_250_000)]
    p.write_bytes(b"id,to,amount\nu\xe9,0x,1\n")  # Latin-1
    with pytest.raises(InputError) as e:
        mf.build_from_csv(p, program="p", chain_id=1, token=TOKEN, payer=PAYER, not_after=5,
                          decimals=6)
    assert str(e.value) == f"{p}: not UTF-8 text"
