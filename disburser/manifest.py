"""Manifests: parse and validate, build from CSV, EIP-712 digest, sign, verify. Pure: no
chain, no ledger. Every refusal is a ManifestError naming the file and the field."""

from __future__ import annotations

import csv
import gc
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, TypeGuard

from eth_hash.auto import keccak

from disburser.addresses import to_checksum, to_checksum_many
from disburser.amounts import parse_units
from disburser.domain import MANIFEST_FORMAT, ZERO_ADDRESS, Manifest, Payment
from disburser.errors import InputError, ManifestError, SettingsError
from disburser.merkle import MerkleTree

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_AMOUNT = re.compile(r"^[1-9][0-9]*$")
_SIG = re.compile(r"^0x[0-9a-fA-F]{130}$")
_FIELDS = ("format", "program", "chain_id", "token", "payer", "not_after", "payments")
_OPTIONAL_FIELDS = ("signatures",)
_PAYMENT_FIELDS = ("id", "to", "amount")
MAX_UINT256 = 2**256 - 1
# secp256k1's group order. A signature (r, s) has a twin (r, n - s) that recovers the same
# address: only the low-s form (EIP-2; what eth-account, cast and wallets make) is taken,
# so that a signature has one spelling.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
# A manifest nests 3 deep (the object, payments, a payment). json.loads recurses in C once
# a level: with the recursion limit eth-account's import raises to 100,000 (py_ecc), a
# file nested 100,000 deep would overflow the C stack and kill the process instead of
# being refused. Anything deeper than this is refused before json.loads sees it.
MAX_JSON_DEPTH = 32
_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_QUOTE_OR_BRACKET = bytes(b for b in range(256) if b not in b'"[]{}')  # bytes to delete
# Integers of more digits than a uint256 (78) are not converted: no field takes one, and
# Python refuses to convert more than 4,300 digits (sys.get_int_max_str_digits).
_MAX_INT_DIGITS = 78
# The fast path's shapes (see _payments_fast): a run of 42-character addresses, and amounts
# one a line of at most 77 digits (10**77 - 1 < 2**256: no uint256 check needed).
_ADDRESSES = re.compile(r"(?:0x[0-9a-fA-F]{40})*")
_AMOUNT_LINES = re.compile(r"[1-9][0-9]{0,76}(?:\n[1-9][0-9]{0,76})*")

DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId)"
MANIFEST_TYPE = (
    "Manifest(string program,address token,address payer,uint256 count,uint256 total,"
    "bytes32 paymentsRoot,uint256 notAfter)"
)


def check_address(value: object, where: str, *, strict_checksum: bool = True) -> str:
    """Return the EIP-55 form of ``value`` or refuse it. With ``strict_checksum`` the value
    must already be in EIP-55 form (manifests); otherwise all-lower/upper case is accepted
    (CSV input), but a mixed-case address with a wrong checksum never is."""
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ManifestError(f"{where}: {value!r} is not a 0x-prefixed 20-byte hex address")
    cs = to_checksum(value)
    body = value[2:]
    mixed = body != body.lower() and body != body.upper()
    if value != cs and (strict_checksum or mixed):
        raise ManifestError(f"{where}: {value} fails its EIP-55 checksum (expected {cs})")
    if cs == ZERO_ADDRESS:
        raise ManifestError(f"{where}: the zero address cannot be paid")
    return cs


def refuse_recipients(payments: Iterable[Payment], source: str,
                      refused: dict[str, str]) -> None:
    """No payment to an address of ``refused`` (checksummed address -> what it is): tokens
    sent to the token contract or the batch contract cannot be moved again (BatchPayout has
    no way out, by design), and a payment to the payer pays no one."""
    for p in payments:
        if p.to in refused:
            raise ManifestError(
                f"{source}: payments[{p.index}] (id {p.id!r}).to: {p.to} is "
                f"{refused[p.to]}; it cannot be a recipient")


def utc_text(ts: int) -> str:
    """A unix time as UTC text; one past year 9999 (a valid not_after) as words."""
    from datetime import UTC, datetime

    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return "far in the future"


def refuse_batch_contract(payments: Iterable[Payment], source: str,
                          batch_contract: str | None) -> None:
    """``refuse_recipients`` for the configured batch contract, which only the settings
    know (``verify``, and the commands that build a manifest)."""
    if batch_contract is not None:
        refuse_recipients(payments, source, {
            batch_contract: "the batch contract (DISBURSER_BATCH_CONTRACT)"})


def _is_name(value: object) -> TypeGuard[str]:
    """1-128 printable characters: a program's name, a payment's id."""
    return isinstance(value, str) and 1 <= len(value) <= 128 and value.isprintable()


def check_program(value: object, source: str) -> str:
    if not _is_name(value):
        raise ManifestError(f"{source}: program must be 1-128 printable characters")
    return value


def check_id(value: object, where: str) -> str:
    if not _is_name(value):
        raise ManifestError(f"{where}: id must be 1-128 printable characters, got {value!r}")
    return value


def make_manifest(
    *,
    program: str,
    chain_id: int,
    token: str,
    payer: str,
    not_after: int,
    payments: Sequence[Payment],
    signatures: Sequence[str] = (),
    source: str = "manifest",
) -> Manifest:
    """Assemble a manifest from validated parts, computing its paymentsRoot. Refused: no
    payments, a total that does not fit the signature's uint256, and a payment to the token
    contract or to the payer (``source`` names it in errors)."""
    if not payments:
        raise ManifestError(f"{source}: no payments")
    check_program(program, source)
    if not 0 < not_after <= MAX_UINT256:
        raise ManifestError(f"{source}: not_after must be a positive unix time, got "
                            f"{not_after}")
    total = sum(p.amount for p in payments)
    if total > MAX_UINT256:
        raise ManifestError(f"{source}: the payments total {total} base units, more than the "
                            "signature's uint256 total can hold")
    refuse_recipients(payments, source, {token: "the token contract", payer: "the payer"})
    return Manifest(
        program=program,
        chain_id=chain_id,
        token=token,
        payer=payer,
        not_after=not_after,
        payments=tuple(payments),
        signatures=tuple(signatures),
        root=MerkleTree(payments).root,
    )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a manifest is parsed: its 100,000 dicts and
    Payments hold no cycles, yet their allocation sets off ever longer collections of
    everything alive (a sixth of the parse time at 100,000)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _LongNumber:
    """A JSON integer of more than 78 digits, kept as its length: every check refuses it
    (it is not an int, nor a str) and its repr names it without echoing the digits."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"a number of {self.digits} digits"


def _json_int(text: str) -> int | _LongNumber:
    digits = len(text) - text.startswith("-")
    return int(text) if digits <= _MAX_INT_DIGITS else _LongNumber(digits)


class _DuplicateKey(Exception):
    pass


def _key_text(key: str) -> str:
    """A key as an error names it: quoted, escaped, and cut short past 40 characters."""
    return repr(key) if len(key) <= 40 else f"{key[:40]!r}…"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys; another reader may take the first (the
    one an approver saw): a key twice in one object is refused."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``text`` nests arrays and objects more than ``limit`` deep (brackets in
    strings do not count), found without recursion and, for a manifest of 100,000 payments,
    in a few milliseconds of C loops: escapes dropped, then every byte but quotes and
    brackets, then the strings (most are left empty: ``""``); then innermost pairs of
    brackets are removed, a level or two a pass. Only what does not empty so is walked a
    bracket at a time. (UTF-8 bytes of other characters are never ASCII.)"""
    raw = text.encode("utf-8", "surrogatepass")
    if b"\\" in raw:
        raw = _JSON_ESCAPE.sub(b"", raw)  # an escaped quote does not end its string
    kept = raw.translate(None, _NOT_QUOTE_OR_BRACKET).replace(b'""', b"")
    if b'"' in kept:  # strings holding brackets: every other piece is outside them
        kept = b"".join(kept.split(b'"')[::2])
    rest = kept
    for _ in range(limit // 2):  # each pass removes at most two levels
        if not rest:
            return False
        rest = rest.replace(b"[]", b"").replace(b"{}", b"")
    if not rest:
        return False
    depth = 0
    for c in kept:  # deep, or not well-formed (json.loads then names the fault)
        depth += 1 if c in b"[{" else -1
        if depth > limit:
            return True
        if depth < 0:  # a closer with nothing open: json.loads stops here
            return False
    return False


def _loads(text: str, source: str) -> Any:
    """json.loads, refusing as one ManifestError naming ``source``: text that is not JSON,
    nesting deeper than MAX_JSON_DEPTH, and a key twice in one object."""
    if json_too_deep(text):
        raise ManifestError(f"{source}: not a manifest: JSON nested more than "
                            f"{MAX_JSON_DEPTH} levels deep (a manifest nests 3)")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_json_int)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except _DuplicateKey as e:
        raise ManifestError(f"{source}: key {_key_text(e.args[0])} appears twice in one object "
                            "(a reader could take either value)") from None
    except RecursionError:  # not reached past json_too_deep; never a traceback if it is
        raise ManifestError(f"{source}: not a manifest: JSON nested too deep") from None


def _refuse_unknown(obj: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """A field the format does not have would be shown to an approver yet not be signed
    (and `manifest sign` would drop it): refused, naming it."""
    for k in obj:
        if k not in known:
            raise ManifestError(f"{where}: unknown field {_key_text(k)} (fields: "
                                f"{', '.join(known)})")


@_gc_paused()
def parse(text: str, source: str) -> Manifest:
    """Parse and structurally validate manifest JSON. ``source`` names it in errors."""
    doc = _loads(text, source)
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: a manifest is a JSON object")
    _refuse_unknown(doc, _FIELDS + _OPTIONAL_FIELDS, source)
    for f in _FIELDS:
        if f not in doc:
            raise ManifestError(f"{source}: missing field '{f}'")
    if doc["format"] != MANIFEST_FORMAT:
        raise ManifestError(
            f"{source}: format is {doc['format']!r}, expected {MANIFEST_FORMAT!r}"
        )
    program = check_program(doc["program"], source)
    for f in ("chain_id", "not_after"):
        if not isinstance(doc[f], int) or isinstance(doc[f], bool) or not (
                0 < doc[f] <= MAX_UINT256):
            raise ManifestError(f"{source}: {f} must be a positive integer, got {doc[f]!r}")
    token = check_address(doc["token"], f"{source}: token")
    payer = check_address(doc["payer"], f"{source}: payer")
    raw_payments = doc["payments"]
    if not isinstance(raw_payments, list) or not raw_payments:
        raise ManifestError(f"{source}: payments must be a non-empty list")
    payments = _payments_fast(raw_payments)
    if payments is None:
        payments = _payments_checked(raw_payments, source)
    sigs = doc.get("signatures", [])
    if not isinstance(sigs, list):
        raise ManifestError(f"{source}: signatures must be a list")
    for j, s in enumerate(sigs):
        if not isinstance(s, str) or not _SIG.fullmatch(s):
            raise ManifestError(f"{source}: signatures[{j}] is not a 65-byte 0x-hex signature")
    return make_manifest(
        program=program,
        chain_id=doc["chain_id"],
        token=token,
        payer=payer,
        not_after=doc["not_after"],
        payments=payments,
        signatures=[s.lower() for s in sigs],
        source=source,
    )


def _payments_fast(raw_payments: list[Any]) -> list[Payment] | None:
    """The payments of a well-formed manifest, every check of ``_payments_checked`` made on
    all of them at once by C loops (joined strings, one regex, one EIP-55 pass): a manifest
    of 100,000 is parsed on every `send`. None when any payment is not plainly valid: the
    checking loop then finds the first fault and names it (or accepts what this refuses to
    judge, such as a 78-digit amount)."""
    try:
        ids = [p["id"] for p in raw_payments]
        tos = [p["to"] for p in raw_payments]
        amounts = [p["amount"] for p in raw_payments]
        id_text = "".join(ids)
        to_text = "".join(tos)
        amount_text = "\n".join(amounts)
    except (TypeError, KeyError):  # not an object, a field missing, or not a string
        return None
    n = len(raw_payments)
    id_lengths = set(map(len, ids))
    if (
        set(map(len, raw_payments)) != {3}  # id, to, amount and nothing else
        or min(id_lengths) < 1
        or max(id_lengths) > 128
        or not id_text.isprintable()
        or len(set(ids)) != n
        or set(map(len, tos)) != {42}
        or not _ADDRESSES.fullmatch(to_text)
        or ZERO_ADDRESS in tos
        or not _AMOUNT_LINES.fullmatch(amount_text)
        or amount_text.count("\n") != n - 1  # no amount with a line break of its own
        or to_checksum_many(tos) != tos
    ):
        return None
    return list(map(Payment, range(n), ids, tos, map(int, amounts)))


def _payments_checked(raw_payments: list[Any], source: str) -> list[Payment]:
    """Each payment checked in turn; the first fault is refused, naming the payment."""
    payments: list[Payment] = []
    seen: dict[str, int] = {}
    for i, p in enumerate(raw_payments):
        where = f"{source}: payments[{i}]"
        if not isinstance(p, dict):
            raise ManifestError(f"{where}: must be an object with id, to, amount")
        _refuse_unknown(p, _PAYMENT_FIELDS, where)
        for f in _PAYMENT_FIELDS:
            if f not in p:
                raise ManifestError(f"{where}: missing field '{f}'")
        pid = check_id(p["id"], where)
        if pid in seen:
            raise ManifestError(f"{where}: duplicate id {pid!r} (also payments[{seen[pid]}])")
        seen[pid] = i
        to = check_address(p["to"], f"{where}.to")
        amount = p["amount"]
        if not isinstance(amount, str) or not _AMOUNT.fullmatch(amount):
            raise ManifestError(
                f"{where}.amount: {amount!r} is not a positive integer string of base units"
            )
        value = int(amount)
        if value > MAX_UINT256:
            raise ManifestError(f"{where}.amount: does not fit in uint256")
        payments.append(Payment(index=i, id=pid, to=to, amount=value))
    return payments


def load(path: Path) -> Manifest:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    except OSError as e:  # a directory, no permission: an internal error (exit 1) until now
        raise InputError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    return parse(text, str(path))


def to_json(m: Manifest) -> str:
    """Canonical JSON text of a manifest (stable key order, one payment per line)."""
    head = {
        "format": MANIFEST_FORMAT,
        "program": m.program,
        "chain_id": m.chain_id,
        "token": m.token,
        "payer": m.payer,
        "not_after": m.not_after,
    }
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
    lines.append('  "payments": [')
    # What json.dumps({"id": ..., "to": ..., "amount": str(amount)}, ensure_ascii=False)
    # writes, built directly with the string encoder it uses (a fifth of the cost).
    enc = encode_basestring
    rows = [
        f'    {{"id": {enc(p.id)}, "to": {enc(p.to)}, "amount": "{p.amount}"}}'
        for p in m.payments
    ]
    lines.append(",\n".join(rows))
    lines.append("  ],")
    lines.append(f'  "signatures": {json.dumps(list(m.signatures))}')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write(m: Manifest, path: Path) -> None:
    """Write atomically (a temporary file, then a rename): a reader never sees half a
    manifest. A path that cannot be written is refused, leaving nothing behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(to_json(m), encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write ({e.strerror})") from None


def build_from_csv(
    path: Path,
    *,
    program: str,
    chain_id: int,
    token: str,
    payer: str,
    not_after: int,
    decimals: int,
) -> Manifest:
    """CSV ``id,to,amount`` (amount in whole tokens, up to ``decimals`` places) -> manifest."""
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") must not hide the first column.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:  # a directory, no permission
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        try:
            payments = _csv_payments(reader, path, decimals)
        except csv.Error as e:  # a field over the csv module's limit, a NUL
            raise InputError(f"{path}:{reader.line_num}: {e}") from None
    if not payments:
        raise InputError(f"{path}: no payment rows")
    return make_manifest(
        program=program,
        chain_id=chain_id,
        token=token,
        payer=payer,
        not_after=not_after,
        payments=payments,
        source=str(path),
    )


def _csv_payments(reader: Any, path: Path, decimals: int) -> list[Payment]:
    """The rows of ``manifest build``'s CSV; a fault names the file and the line it ends on
    (a quoted cell may span lines)."""
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path}: empty file")
    cols = [h.strip() for h in header]
    for c in ("id", "to", "amount"):
        if cols.count(c) > 1:
            raise InputError(f"{path}: column '{c}' appears twice in the header "
                             f"({','.join(cols)})")
    for c in ("id", "to", "amount"):
        if c not in cols:
            raise InputError(f"{path}: missing column '{c}' (header: {','.join(cols)})")
    ci, ct, ca = cols.index("id"), cols.index("to"), cols.index("amount")
    payments: list[Payment] = []
    seen: dict[str, int] = {}
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        lineno = reader.line_num
        where = f"{path}:{lineno}"
        if len(row) != len(cols):
            raise InputError(f"{where}: expected {len(cols)} columns, got {len(row)}")
        pid = check_id(row[ci].strip(), where)
        if pid in seen:
            raise InputError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = lineno
        to = check_address(row[ct].strip(), f"{where}: to", strict_checksum=False)
        amount = parse_units(row[ca], decimals, where=f"{where}: amount")
        if amount <= 0:
            raise InputError(f"{where}: amount must be greater than zero")
        if amount > MAX_UINT256:
            raise InputError(f"{where}: amount does not fit in uint256")
        payments.append(Payment(len(payments), pid, to, amount))
    return payments


# --- EIP-712 ---------------------------------------------------------------------------


# Past 2**53 a JSON number reaches a JavaScript wallet rounded (a not_after of 2**64 - 1 for
# "no expiry" becomes another number, and its signature verifies nowhere).
JS_SAFE_INT = 2**53 - 1


def _json_uint(n: int) -> int | str:
    """A uint256 for typed-data JSON: a number where every reader takes it exactly, else its
    decimal string (which eth_signTypedData_v4 wallets and cast take for a uint)."""
    return n if n <= JS_SAFE_INT else str(n)


def typed_data(m: Manifest) -> dict[str, Any]:
    """The EIP-712 JSON any wallet, `cast wallet sign --data` or eth_signTypedData_v4 signs."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
            ],
            "Manifest": [
                {"name": "program", "type": "string"},
                {"name": "token", "type": "address"},
                {"name": "payer", "type": "address"},
                {"name": "count", "type": "uint256"},
                {"name": "total", "type": "uint256"},
                {"name": "paymentsRoot", "type": "bytes32"},
                {"name": "notAfter", "type": "uint256"},
            ],
        },
        "primaryType": "Manifest",
        "domain": {"name": "disburser", "version": "1", "chainId": _json_uint(m.chain_id)},
        "message": {
            "program": m.program,
            "token": m.token,
            "payer": m.payer,
            "count": _json_uint(m.count),
            "total": str(m.total),
            "paymentsRoot": m.root,
            "notAfter": _json_uint(m.not_after),
        },
    }


def _word(n: int) -> bytes:
    return n.to_bytes(32, "big")


def _addr_word(a: str) -> bytes:
    return bytes(12) + bytes.fromhex(a[2:])


def domain_separator(chain_id: int) -> bytes:
    return keccak(
        keccak(DOMAIN_TYPE.encode())
        + keccak(b"disburser")
        + keccak(b"1")
        + _word(chain_id)
    )


def struct_hash(m: Manifest) -> bytes:
    return keccak(
        keccak(MANIFEST_TYPE.encode())
        + keccak(m.program.encode("utf-8"))
        + _addr_word(m.token)
        + _addr_word(m.payer)
        + _word(m.count)
        + _word(m.total)
        + bytes.fromhex(m.root[2:])
        + _word(m.not_after)
    )


def digest(m: Manifest) -> bytes:
    """The 32-byte EIP-712 hash approvers sign."""
    return keccak(b"\x19\x01" + domain_separator(m.chain_id) + struct_hash(m))


def signature_fault(signature: str) -> str | None:
    """What makes a 65-byte 0x-hex signature unusable before any recovery: a recovery byte
    other than 0, 1, 27, 28, or a high s (the malleated twin of a valid signature:
    eth-account, cast and wallets only make low s). None when it has neither."""
    raw = bytes.fromhex(signature[2:])
    if raw[64] not in (0, 1, 27, 28):
        return "invalid recovery byte"
    if int.from_bytes(raw[32:64], "big") > SECP256K1_N // 2:
        return ("not canonical: its s is above secp256k1n/2 (a malleated form; signers make "
                "the low-s one)")
    return None


def is_signature_text(signature: str) -> bool:
    """A 65-byte 0x-hex string (what a signature field holds)."""
    return bool(_SIG.fullmatch(signature))


def low_s_form(signature: str) -> str | None:
    """The low-s twin of a high-s 65-byte 0x-hex signature ((r, n - s), the other recovery
    byte): the same approval in the one form that is taken. None when it is not high-s (or
    its recovery byte is unusable anyway). Some signing services (KMS, HSM) return either."""
    raw = bytes.fromhex(signature[2:])
    s = int.from_bytes(raw[32:64], "big")
    if s <= SECP256K1_N // 2 or raw[64] not in (0, 1, 27, 28):
        return None
    v = 55 - raw[64] if raw[64] >= 27 else 1 - raw[64]  # 27 <-> 28, 0 <-> 1
    return "0x" + (raw[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([v])).hex()


def recover(m: Manifest, signature: str) -> str:
    """The address that produced ``signature`` over this manifest's digest."""
    from eth_keys import keys
    from eth_keys.exceptions import BadSignature

    if fault := signature_fault(signature):
        raise ManifestError(f"signature {signature[:12]}…: {fault}")
    raw = bytes.fromhex(signature[2:])
    v = raw[64]
    if v >= 27:
        v -= 27
    try:
        sig = keys.Signature(signature_bytes=raw[:64] + bytes([v]))
        return to_checksum(sig.recover_public_key_from_msg_hash(digest(m)).to_address())
    except (BadSignature, ValueError):
        raise ManifestError(f"signature {signature[:12]}…: cannot be recovered") from None


def sign(m: Manifest, private_key: bytes) -> str:
    """Sign the manifest's digest; returns 0x r||s||v with v in {27, 28}."""
    from eth_keys import keys

    sig = keys.PrivateKey(private_key).sign_msg_hash(digest(m))
    r, s, v = sig.r, sig.s, sig.v
    return "0x" + (_word(r) + _word(s) + bytes([v + 27])).hex()


def with_signature(m: Manifest, signature: str, source: str = "manifest") -> Manifest:
    """A copy of ``m`` with ``signature`` appended (refused if it adds no new signer, or if
    it or one already there is not a usable signature)."""
    if not _SIG.fullmatch(signature):
        raise ManifestError("signature is not a 65-byte 0x-hex string")
    signer = recover(m, signature.lower())  # refuses a high s or a bad recovery byte
    if signer in signers_of(m, source):
        raise ManifestError(f"{source}: {signer} has already signed this manifest")
    return Manifest(
        program=m.program,
        chain_id=m.chain_id,
        token=m.token,
        payer=m.payer,
        not_after=m.not_after,
        payments=m.payments,
        signatures=(*m.signatures, signature.lower()),
        root=m.root,
    )


@dataclass(frozen=True)
class Verification:
    signers: tuple[str, ...]  # in signature order
    approved: tuple[str, ...]  # distinct configured approvers among them
    quorum: int

    @property
    def quorum_met(self) -> bool:
        return len(self.approved) >= self.quorum

    @property
    def strangers(self) -> tuple[tuple[int, str], ...]:
        """(j, signer) of each signatures[j] not by a configured approver: not counted."""
        return tuple((j, w) for j, w in enumerate(self.signers) if w not in self.approved)


def signers_of(m: Manifest, source: str = "manifest") -> tuple[str, ...]:
    """Who signed, in signature order; a signature no one can have made (a bad recovery
    byte, a high s) is refused, naming it as signatures[j] of ``source``."""
    out: list[str] = []
    for j, s in enumerate(m.signatures):
        if fault := signature_fault(s):
            raise ManifestError(f"{source}: signatures[{j}]: {fault}")
        out.append(recover(m, s))
    return tuple(out)


def verify(
    m: Manifest,
    *,
    source: str,
    approvers: Iterable[str],
    quorum: int,
    chain_id: int,
    token: str,
    payer: str | None,
    now: int,
    batch_contract: str | None = None,
) -> Verification:
    """Refuse the manifest unless it is for this chain, token and payer, has not expired,
    pays nothing to ``batch_contract``, and carries ``quorum`` distinct approver
    signatures. Returns who signed."""
    if m.chain_id != chain_id:
        raise ManifestError(
            f"{source}: manifest is for chain {m.chain_id}, this is chain {chain_id}"
        )
    if m.token != token:
        raise ManifestError(f"{source}: manifest pays token {m.token}, configured is {token}")
    if payer is not None and m.payer != payer:
        raise ManifestError(
            f"{source}: manifest payer is {m.payer}, the configured payer is {payer}")
    if now > m.not_after:
        raise ManifestError(
            f"{source}: manifest expired at not_after={m.not_after} ({utc_text(m.not_after)}; now "
            f"{utc_text(now)}): rebuild the same payments with a later --not-after and have them "
            "signed again (same paymentsRoot, nothing paid twice)")
    refuse_batch_contract(m.payments, source, batch_contract)
    allowed = set(approvers)
    if m.payer in allowed:
        # The key that sends would be one of the M: M of N by M - 1 people.
        raise SettingsError(f"DISBURSER_APPROVERS lists the payer {m.payer} of {source}: the "
                            "key that sends must not approve its own payments")
    signers = signers_of(m, source)
    # DESIGN.md: valid when at least `quorum` distinct configured approvers signed. Others'
    # signatures do not count, and do not refuse a manifest the approvers carry.
    seen: set[str] = set()
    for j, signer in enumerate(signers):
        if signer in allowed:  # an approver twice would be counted twice
            if signer in seen:
                raise ManifestError(f"{source}: signatures[{j}]: {signer} signed twice")
            seen.add(signer)
    result = Verification(signers, tuple(w for w in signers if w in allowed), quorum)
    if not result.quorum_met:
        # A manifest changed after signing shows its signatures as strangers' too.
        others = ", ".join(f"signatures[{j}] by {w}" for j, w in result.strangers)
        raise ManifestError(
            f"{source}: quorum not met: {len(result.approved)} of {quorum} required approver "
            "signatures" + (f" ({others}: not configured approvers, or the manifest was "
                            "changed after signing)" if others else ""))
    return result
