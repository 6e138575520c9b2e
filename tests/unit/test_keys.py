"""The hand-built EIP-1559 signing path against eth-account, byte for byte."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from disburser.addresses import to_checksum
from disburser.errors import InputError, SettingsError
from disburser.keys import SignedTx, Signer

KEY = bytes.fromhex("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")
SIGNER = Signer(KEY)


def _eth_account(*, chain_id: int, nonce: int, to: str, data: str, gas: int, max_fee: int,
                 tip: int, value: int = 0) -> SignedTx:
    """The reference: eth-account's own EIP-1559 signing of the same fields."""
    tx: dict[str, object] = {"type": 2, "chainId": chain_id, "nonce": nonce, "data": data,
                             "gas": gas, "maxFeePerGas": max_fee,
                             "maxPriorityFeePerGas": tip, "value": value}
    if to:  # empty: contract creation
        tx["to"] = to
    signed = Account.from_key(KEY).sign_transaction(tx)
    return SignedTx("0x" + bytes(signed.raw_transaction).hex(),
                    "0x" + bytes(signed.hash).hex())

uint = st.integers(min_value=0, max_value=2**256 - 1)
small = st.integers(min_value=0, max_value=2**64 - 1)
address = st.binary(min_size=20, max_size=20).map(lambda b: to_checksum("0x" + b.hex()))
calldata = st.binary(max_size=300).map(lambda b: "0x" + b.hex())


@settings(max_examples=200, deadline=None)
@given(chain_id=st.integers(min_value=1, max_value=2**32), nonce=small, to=address | st.just(""),
       data=calldata, gas=st.integers(min_value=21_000, max_value=2**24), max_fee=uint,
       tip=uint, value=uint)
def test_sign_tx_matches_eth_account(chain_id: int, nonce: int, to: str, data: str, gas: int,
                                     max_fee: int, tip: int, value: int) -> None:
    kw = dict(chain_id=chain_id, nonce=nonce, to=to, data=data, gas=gas, max_fee=max_fee,
              tip=tip, value=value)
    assert SIGNER.sign_tx(**kw) == _eth_account(**kw)  # type: ignore[arg-type]


SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@settings(max_examples=200, deadline=None)
@given(k=st.integers(min_value=1, max_value=SECP256K1_N - 1))
def test_the_address_is_eth_accounts(k: int) -> None:
    key = k.to_bytes(32, "big")
    signer = Signer(key)
    assert signer.address == Account.from_key(key).address
    assert signer.key_bytes == key


@pytest.mark.parametrize("k", [0, SECP256K1_N, 2**256 - 1])
def test_a_key_outside_the_group_is_refused_without_quoting_it(k: int) -> None:
    with pytest.raises(InputError) as e:
        Signer(k.to_bytes(32, "big"))
    assert str(e.value) == "private key is not a valid secp256k1 key"


def test_a_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(InputError, match="^private key must be 32 bytes$"):
        Signer(b"\x01" * 31)


def test_sign_tx_long_calldata_matches_eth_account() -> None:
    # Batch calldata is ~95 kB: RLP length-of-length prefixes of 3 bytes.
    data = "0x" + random.Random(7).randbytes(95_000).hex()
    kw = dict(chain_id=31337, nonce=5, to=to_checksum("0x" + "11" * 20), data=data, gas=16_000_000,
              max_fee=100 * 10**9, tip=10**9)
    assert SIGNER.sign_tx(**kw) == _eth_account(**kw)  # type: ignore[arg-type]


def test_a_new_keystore_never_replaces_a_file_that_appears_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`key new -o X` run twice at once: the slower one finds X written by the other while
    it encrypted, and refuses instead of replacing it (its address was never printed). No
    temporary file is left; a keystore is readable by its owner only."""
    from disburser import keys

    ks = tmp_path / "k.json"
    address = keys.new_keystore(ks, "password one")
    assert oct(ks.stat().st_mode & 0o777) == "0o600"
    assert keys.from_keystore(ks, "password one", password_source="x").address == address
    real = Account.encrypt

    def racing(key: bytes, password: str) -> dict[str, object]:
        (tmp_path / "r.json").write_text("the other's keystore")
        return dict(real(key, password))

    monkeypatch.setattr(Account, "encrypt", racing)
    with pytest.raises(InputError) as e:
        keys.new_keystore(tmp_path / "r.json", "password two")
    assert str(e.value) == f"{tmp_path / 'r.json'}: already exists; refusing to overwrite a " \
                           "keystore"
    assert (tmp_path / "r.json").read_text() == "the other's keystore"
    with pytest.raises(InputError) as e:
        keys.new_keystore(tmp_path / "no" / "k.json", "password three")
    assert str(e.value) == f"{tmp_path / 'no' / 'k.json'}: no such directory {tmp_path / 'no'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "r.json"]


@pytest.mark.parametrize("kdf, params, message", [
    ("scrypt", {"n": 2**24, "r": 8, "p": 1}, "scrypt parameters n=16777216 r=8 p=1 cost more "
     "than any standard keystore (geth: n=262144 r=8 p=1); refusing to decrypt"),
    ("scrypt", {"n": 2**10, "r": 8, "p": 100_000}, "scrypt parameters n=1024 r=8 p=100000 cost "
     "more than any standard keystore (geth: n=262144 r=8 p=1); refusing to decrypt"),
    ("pbkdf2", {"c": 2**31 - 1}, "pbkdf2 with c=2147483647 rounds costs more than any standard "
     "keystore (at most 10000000); refusing to decrypt"),
    ("pbkdf2", {"dklen": 2**30}, "a derived key of 1073741824 bytes (a keystore's is 32); "
     "refusing to decrypt"),
])
def test_a_keystore_that_would_take_hours_or_gigabytes_is_refused(
        tmp_path: Path, kdf: str, params: dict[str, int], message: str) -> None:
    from disburser import keys

    doc = Account.encrypt(KEY, "pw", kdf=kdf, iterations=2 if kdf == "pbkdf2" else 2)
    doc["crypto"]["kdfparams"].update(params)
    ks = tmp_path / "k.json"
    ks.write_text(json.dumps(doc))
    with pytest.raises(SettingsError) as e:
        keys.from_keystore(ks, "pw", password_source="x")
    assert str(e.value) == f"keystore {ks}: {message}"


def test_standard_keystores_decrypt() -> None:
    """eth-account's and geth's scrypt (n=2^18 r=8 p=1, and eth-account's at
    iterations=2^20), Foundry's (n=2^13 r=8 p=1), geth's
    light one (n=2^12 r=8 p=6) and pbkdf2 at eth-account's default rounds stay under the
    limits."""
    from disburser import keys

    for kdf, params in (("scrypt", {"n": 2**18, "r": 8, "p": 1}),
                        ("scrypt", {"n": 2**20, "r": 8, "p": 1}),  # iterations=2**20
                        ("scrypt", {"n": 2**13, "r": 8, "p": 1}),
                        ("scrypt", {"n": 2**12, "r": 8, "p": 6}),
                        ("pbkdf2", {"c": 1_000_000})):
        keys._refuse_costly_kdf({"version": 3, "crypto": {"kdf": kdf, "kdfparams": params}},
                                Path("k"))


def _upper_c(d: dict[str, Any]) -> None:
    params = d["crypto"]["kdfparams"]
    del params["c"]
    params["C"] = 2**31 - 1


def _upper_kdfparams(d: dict[str, Any]) -> None:
    d["crypto"]["KDFPARAMS"] = {**d["crypto"].pop("kdfparams"), "c": 2**31 - 1}


HOURS = ("pbkdf2 with c=2147483647 rounds costs more than any standard keystore (at most "
         "10000000); refusing to decrypt")


@pytest.mark.parametrize("edit, message", [
    (_upper_c, HOURS),
    (_upper_kdfparams, HOURS),
    (lambda d: d.update({"version": 4}), "not a JSON V3 keystore (version '4')"),
])
def test_the_cost_check_reads_the_keystore_as_eth_keyfile_does(
        tmp_path: Path, edit: Any, message: str) -> None:
    """eth-keyfile lowercases every key before it decrypts, and also reads version 4: a
    "C" or "KDFPARAMS" in another case, or a V4 file, went around the check and ran for
    minutes."""
    from disburser import keys

    doc = Account.encrypt(KEY, "pw", kdf="pbkdf2", iterations=2)
    edit(doc)
    ks = tmp_path / "k.json"
    ks.write_text(json.dumps(doc))
    with pytest.raises(SettingsError) as e:
        keys.from_keystore(ks, "pw", password_source="x")
    assert str(e.value) == f"keystore {ks}: {message}"


def test_a_password_file_is_read_as_geth_reads_it(tmp_path: Path) -> None:
    """Every character but the line ending: CRLF or LF alike; a byte-order mark is kept, so
    a keystore made from such a file (by this tool or by geth) opens with the same file."""
    from disburser import keys

    for raw in (b"secret pw\n", b"secret pw\r\n", b"secret pw"):
        (tmp_path / "pw").write_bytes(raw)
        assert keys.read_password(None, str(tmp_path / "pw")) == "secret pw"
    (tmp_path / "bom").write_bytes(b"\xef\xbb\xbfsecret pw\r\n")
    pw = keys.read_password(None, str(tmp_path / "bom"))
    assert pw == "\ufeffsecret pw"
    address = keys.new_keystore(tmp_path / "k.json", pw)
    assert keys.from_keystore(tmp_path / "k.json", keys.read_password(None, str(
        tmp_path / "bom")), password_source="x").address == address


def test_a_keystore_is_written_where_hard_links_are_not_to_be_had(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FAT/exFAT, SMB and some FUSE mounts refuse hard links (EPERM, ENOTSUP): the keystore
    is written in place, still never over a file; a directory that cannot be written is one
    line."""
    import errno
    import os

    from disburser import keys

    def no_link(src: str, dst: Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    address = keys.new_keystore(tmp_path / "k.json", "password one")
    assert keys.from_keystore(tmp_path / "k.json", "password one",
                              password_source="x").address == address
    assert oct((tmp_path / "k.json").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(InputError, match="already exists; refusing to overwrite"):
        keys.new_keystore(tmp_path / "k.json", "password two")
    assert keys.from_keystore(tmp_path / "k.json", "password one",
                              password_source="x").address == address
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]

    def no_space(*a: object, **k: object) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tempfile.mkstemp", no_space)
    with pytest.raises(InputError) as e:
        keys.new_keystore(tmp_path / "n.json", "password three")
    assert str(e.value) == f"{tmp_path / 'n.json'}: cannot write (No space left on device)"
