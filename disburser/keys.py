"""Keys: load the payer's or an approver's key and sign with it. The key never leaves this
object: no repr, no logging, no error message carries it."""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disburser.addresses import is_hex_address, keccak, to_checksum
from disburser.errors import InputError, SettingsError


@dataclass(frozen=True)
class SignedTx:
    raw: str  # 0x-hex signed bytes
    hash: str  # 0x-hex


class Signer:
    """Signs EIP-1559 transactions (and EIP-712 digests) with one private key."""

    def __init__(self, private_key: bytes) -> None:
        # libsecp256k1 (coincurve) alone: eth-account's import costs ~0.5 s of every `send`
        # (its BLS code), and the address is keccak of the public key (a test checks it
        # against eth-account's for many keys).
        from coincurve import PrivateKey

        if len(private_key) != 32:
            raise InputError("private key must be 32 bytes")
        try:
            self._secp = PrivateKey(private_key)  # refuses 0 and anything >= the group order
        except Exception:  # noqa: BLE001 - the library's message may quote the key
            raise InputError("private key is not a valid secp256k1 key") from None
        self._key = bytes(private_key)
        public = self._secp.public_key.format(compressed=False)[1:]
        self.address: str = to_checksum("0x" + keccak(public)[12:].hex())

    def __repr__(self) -> str:
        return f"Signer({self.address})"

    @property
    def key_bytes(self) -> bytes:
        return self._key

    def sign_tx(self, *, chain_id: int, nonce: int, to: str, data: str, gas: int,
                max_fee: int, tip: int, value: int = 0) -> SignedTx:
        """An EIP-1559 (type 2) transaction, RLP-encoded by hand and signed with libsecp256k1
        (coincurve): ~0.1 ms where eth-account's validating path takes ~0.4 ms, which counts
        at thousands of direct transfers. Byte-identical to eth-account's (a unit test signs
        many random transactions both ways)."""
        fields = [_rlp_int(chain_id), _rlp_int(nonce), _rlp_int(tip), _rlp_int(max_fee),
                  _rlp_int(gas), _rlp_bytes(bytes.fromhex(to[2:]) if to else b""),
                  _rlp_int(value), _rlp_bytes(bytes.fromhex(data[2:])), b"\xc0"]
        unsigned = b"\x02" + _rlp_list(fields)
        sig = self._secp.sign_recoverable(keccak(unsigned), hasher=None)
        raw = b"\x02" + _rlp_list(fields + [_rlp_int(sig[64]),
                                             _rlp_int(int.from_bytes(sig[:32], "big")),
                                             _rlp_int(int.from_bytes(sig[32:64], "big"))])
        return SignedTx("0x" + raw.hex(), "0x" + keccak(raw).hex())


def _rlp_int(n: int) -> bytes:
    return _rlp_bytes(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def _rlp_bytes(b: bytes) -> bytes:
    if len(b) == 1 and b[0] < 0x80:
        return b
    return _rlp_len(len(b), 0x80) + b


def _rlp_list(items: list[bytes]) -> bytes:
    payload = b"".join(items)
    return _rlp_len(len(payload), 0xC0) + payload


def _rlp_len(n: int, offset: int) -> bytes:
    if n <= 55:
        return bytes([offset + n])
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([offset + 55 + len(ln)]) + ln


def _parse_hex_key(text: str, where: str) -> bytes:
    t = text.strip()
    if t.startswith("0x"):
        t = t[2:]
    try:
        key = bytes.fromhex(t)
    except ValueError:
        raise SettingsError(f"{where}: not a hex private key") from None
    if len(key) != 32:
        raise SettingsError(f"{where}: a private key is 32 bytes, got {len(key)}")
    return key


def from_env_var(var: str) -> Signer:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var) or re.fullmatch(
            r"(0[xX])?[0-9a-fA-F]{32,}", var):
        # Never echoed: a key pasted where its variable's name belongs is the usual cause.
        raise SettingsError("--private-key-env: not the name of an environment variable "
                            "(give the name of the variable that holds the key, not the key)")
    value = os.environ.get(var)
    if not value:
        raise SettingsError(f"environment variable {var} is not set")
    return Signer(_parse_hex_key(value, var))


def _read_keystore(path: Path) -> Any:
    try:
        text = path.read_text()
        # A V3 keystore holds a handful of objects. json.loads recurses in C a level, and
        # eth-account's import lets recursion run 100,000 deep: a deeply nested file would
        # overflow the C stack rather than be refused (more brackets than this: not one).
        if text.count("{") + text.count("[") > 64:
            raise ValueError("not a keystore")
        return json.loads(text)
    except FileNotFoundError:
        raise SettingsError(f"keystore {path}: no such file") from None
    except OSError as e:
        raise SettingsError(f"keystore {path}: cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, a number of 4,300+ digits
        raise SettingsError(f"keystore {path}: not a JSON V3 keystore") from None


# What decrypting may cost: geth's "standard" scrypt is n=2^18, r=8, p=1 (256 MiB, ~1 s),
# eth-account's pbkdf2 default c=1,000,000. A file asking for far more would hang the run or
# exhaust memory before any password check: refused.
SCRYPT_MAX_MEMORY = 2**30  # bytes: 128 * n * r (n=2^20, r=8: eth-account's iterations=2^20)
SCRYPT_MAX_WORK = 2**23  # n * r * p
PBKDF2_MAX_ROUNDS = 10_000_000
MAX_DKLEN = 64  # every keystore derives 32 bytes


def _refuse_costly_kdf(doc: Any, path: Path) -> None:
    """Refuse, before any work, a keystore that is not V3 or whose key derivation would cost
    more than any standard keystore's. ``doc`` has its keys in lower case, as eth-keyfile
    reads them (``Crypto``, ``KDFPARAMS``, ``C`` are the same fields to it)."""
    if isinstance(doc, dict) and doc.get("version") != 3:
        # eth-keyfile also reads version 4 (EIP-2335), whose parameters sit elsewhere: a
        # payer's keystore is V3 (geth, cast wallet, `disburser key new`).
        raise SettingsError(f"keystore {path}: not a JSON V3 keystore (version "
                            f"{str(doc.get('version'))[:20]!r})")
    crypto = doc.get("crypto") if isinstance(doc, dict) else None
    if not isinstance(crypto, dict) or not isinstance(crypto.get("kdfparams"), dict):
        return  # decrypt names what is missing
    params, kdf = crypto["kdfparams"], crypto.get("kdf")
    try:
        if int(params.get("dklen", 32)) > MAX_DKLEN:
            raise SettingsError(f"keystore {path}: a derived key of {params['dklen']} bytes "
                                f"(a keystore's is 32); refusing to decrypt")
        if kdf == "scrypt":
            n, r, p = (int(params.get(k, 0)) for k in ("n", "r", "p"))
            if 128 * n * r > SCRYPT_MAX_MEMORY or n * r * p > SCRYPT_MAX_WORK:
                raise SettingsError(f"keystore {path}: scrypt parameters n={n} r={r} p={p} "
                                    "cost more than any standard keystore (geth: n=262144 "
                                    "r=8 p=1); refusing to decrypt")
        elif kdf == "pbkdf2":
            c = int(params.get("c", 0))
            if c > PBKDF2_MAX_ROUNDS:
                raise SettingsError(f"keystore {path}: pbkdf2 with c={c} rounds costs more "
                                    f"than any standard keystore (at most "
                                    f"{PBKDF2_MAX_ROUNDS}); refusing to decrypt")
    except (TypeError, ValueError):
        return  # not numbers: decrypt refuses them


def from_keystore(path: Path, password: str | None, *, password_source: str) -> Signer:
    from eth_account import Account
    from eth_keyfile.keyfile import normalize_keys

    doc = _read_keystore(path)
    if isinstance(doc, dict):
        doc = normalize_keys(doc)  # every object's keys in lower case, as decrypt reads them
    _refuse_costly_kdf(doc, path)
    if password is None:
        raise SettingsError(f"keystore {path}: no password ({password_source} is not set)")
    try:
        key = Account.decrypt(doc, password)
    except ValueError:
        raise SettingsError(f"keystore {path}: wrong password or corrupt keystore") from None
    except Exception:  # noqa: BLE001 - the library's errors may quote key material
        raise SettingsError(f"keystore {path}: cannot be decrypted") from None
    return Signer(bytes(key))


def read_password(value: str | None, file: str | None) -> str | None:
    if value is not None:
        return value
    if file:
        try:
            # As geth's --password: every character but the line ending, a byte-order mark
            # too (keystores made from such a file hold it in their password).
            return Path(file).read_text().rstrip("\r\n")
        except FileNotFoundError:
            raise SettingsError(f"password file {file}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not text"
            raise SettingsError(f"password file {file}: cannot be read ({why})") from None
    return None


def new_keystore(path: Path, password: str) -> str:
    """Write a new random key as a V3 keystore (scrypt, as geth and `cast wallet` do). The
    file appears whole (written and synced under a temporary name, then linked), and never
    over another: two `key new -o` of one path at once leave one key, and one error."""
    import secrets
    import tempfile

    from eth_account import Account

    if not path.parent.is_dir():
        raise InputError(f"{path}: no such directory {path.parent}")
    key = secrets.token_bytes(32)
    text = json.dumps(Account.encrypt(key, password))
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        _write_synced(fd, text)  # mkstemp: mode 0600
        try:
            os.link(tmp, path)  # fails if the path exists by now (no rename over it)
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            # FAT/exFAT (a USB stick), SMB, some FUSE mounts: no hard links. Written in
            # place instead, still only if nothing is there.
            _write_synced(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), text)
    except FileExistsError:
        raise InputError(f"{path}: already exists; refusing to overwrite a keystore") from None
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror})") from None
    finally:
        if tmp is not None:
            os.unlink(tmp)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the new name survives a crash once the address is printed
        finally:
            os.close(dfd)
    except OSError:
        pass  # a filesystem that cannot sync a directory: the file itself is synced
    address: str = Account.from_key(key).address
    return address


_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


def _write_synced(fd: int, text: str) -> None:
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def recorded_address(path: Path) -> str | None:
    """The address a keystore records (geth and eth-account write it; Foundry's keystores
    omit it): whom it signs for, read without its password."""
    doc = _read_keystore(path)
    recorded = doc.get("address") if isinstance(doc, dict) else None
    if isinstance(recorded, str) and is_hex_address("0x" + recorded.removeprefix("0x")):
        return to_checksum("0x" + recorded.removeprefix("0x"))
    return None


def keystore_address(path: Path, password_file: str | None) -> str:
    """The keystore's address: the one it records, else its key's, decrypted."""
    if (recorded := recorded_address(path)) is not None:
        return recorded
    pw = read_password(os.environ.get("DISBURSER_KEYSTORE_PASSWORD"), password_file)
    return from_keystore(path, pw, password_source="--password-file").address
