"""Every DISBURSER_* setting, read from the environment (and a ``.env`` file) and validated
before any client is built. Values that are secret are kept out of ``repr``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from disburser.addresses import to_checksum
from disburser.amounts import parse_units
from disburser.errors import SettingsError
from disburser.profiles import PROFILES, Profile

PREFIX = "DISBURSER_"
DEFAULT_CEILING_TOKENS = "300000000"
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
# [0-9], not \d or int() alone: both take other scripts' digits ("٢" is 2 to int()).
_INTEGER = re.compile(r"-?[0-9]+")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The one setting an empty environment variable may clear when the file sets it: reconcile's
# program filter, left in .env for `allocate` (OPERATIONS: `DISBURSER_PROGRAM=`).
_CLEARABLE = frozenset({PREFIX + "PROGRAM"})


# Every DISBURSER_* variable read other than as a command-line option's (those: the options'
# own, see cli.known_variables): settings.load's, the settings file's name, the lock
# directory, the Anvil binary, the password variables and the crash tests' hook.
OTHER_NAMES = frozenset(PREFIX + n for n in (
    "NETWORK", "RPC_URL", "DB", "CHAIN_ID", "TOKEN", "DECIMALS", "APPROVERS", "QUORUM",
    "CEILING", "BATCH_CONTRACT", "CONFIRMATIONS", "MAX_FEE_GWEI", "PRIORITY_FEE_GWEI",
    "MAX_TX_FEE_ETH", "MAX_IN_FLIGHT", "BATCH_SIZE", "BUMP_AFTER_BLOCKS", "POLL_INTERVAL",
    "RPC_TIMEOUT", "LOG_FILE", "KEYSTORE", "KEYSTORE_PASSWORD", "PRIVATE_KEY",
    "ALLOW_PLAIN_KEY", "FROM_BLOCK", "ENV_FILE", "LOCK_DIR", "ANVIL", "PASSWORD_FILE",
    "APPROVER_PASSWORD", "TEST_CRASH_AT"))


def load_dotenv(path: Path = Path(".env"), *, strict: bool = True) -> dict[str, int]:
    """Put ``KEY=VALUE`` lines of ``path`` into the environment without overriding what is
    already set (the environment wins over the file); the keys it set, each with its line.
    A key given twice is refused: the shell would take the last, a reader of the file may
    see the first, and for a ceiling or a fee cap the difference is money. So is a
    DISBURSER_* key the file sets and the environment holds empty (but DISBURSER_PROGRAM):
    neither value would apply (not ``strict``: a command's --help, which applies neither)."""
    set_here: dict[str, int] = {}
    if not path.is_file():
        return set_here
    seen: dict[str, int] = {}
    try:
        # utf-8-sig: a byte-order mark from a Windows editor must not hide the first key.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: cannot be read ({type(e).__name__})") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"export\s", line):
            line = line[7:].lstrip()
        if "=" not in line:
            raise SettingsError(f"{path}:{lineno}: expected KEY=VALUE")
        key, _, raw_value = line.partition("=")
        key = key.strip()
        if not _ENV_KEY.fullmatch(key):
            # Never echoed whole: the line may be a secret pasted in the wrong place.
            raise SettingsError(f"{path}:{lineno}: expected KEY=VALUE with KEY a variable name "
                                "(letters, digits, _)")
        if "\0" in raw_value:
            raise SettingsError(f"{path}:{lineno}: {key}: a NUL character in the value")
        if key in seen:
            raise SettingsError(f"{path}:{lineno}: {key} is already set on line {seen[key]}")
        seen[key] = lineno
        value = _dotenv_value(raw_value, where=f"{path}:{lineno}: {key}")
        if key not in os.environ:
            os.environ[key] = value
            set_here[key] = lineno
        elif (strict and os.environ[key] == "" and value and key.startswith(PREFIX)
              and key not in _CLEARABLE):
            # An empty value means the built-in default: DISBURSER_QUORUM= left by a compose
            # file (`- X=${X}`) or a unit's `Environment=X=` put quorum 2 and a 300,000,000
            # ceiling in place of the file's 3 and 5.
            raise SettingsError(
                f"{path}:{lineno}: {key} is set here and empty in the environment, where "
                f"empty means the built-in default; unset it (unset {key}) to use this "
                "file's value, or give it a value")
    return set_here


def _dotenv_value(raw: str, *, where: str) -> str:
    """What follows ``KEY=`` as a shell's ``set -a; . ./.env`` and python-dotenv read it: in
    quotes, what is between them; unquoted, up to a ``#`` after a space (a comment), so
    ``KEY= # note`` is empty and ``KEY=#x`` is ``#x``. ``KEY=x # old`` was the value
    ``x # old``: a DISBURSER_DB so written named a new, empty ledger."""
    if re.match(r"\s+#", raw):
        return ""
    value = raw.strip()
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        if end < 0:
            raise SettingsError(f"{where}: the value opens a quote it does not close")
        rest = value[end + 1:]
        if rest.strip() and not re.match(r"\s+#", rest):  # '"a"#b' is a#b to the shell
            raise SettingsError(f"{where}: text after the value's closing quote (quote the "
                                "whole value, or put a comment after a space and #)")
        return value[1:end]
    return re.split(r"\s#", value, maxsplit=1)[0].rstrip()


def checksum(address: str, *, where: str) -> str:
    """Validate an address strictly (EIP-55 when mixed case) and return its checksum form."""
    if not _ADDRESS.fullmatch(address):
        raise SettingsError(f"{where}: {address!r} is not a 0x-prefixed 20-byte address")
    cs = to_checksum(address)
    body = address[2:]
    if body != body.lower() and body != body.upper() and address != cs:
        raise SettingsError(f"{where}: {address} fails its EIP-55 checksum (expected {cs})")
    return cs


@dataclass(frozen=True)
class Ceilings:
    """Ceiling per program in base units; ``default`` applies to programs not named (None:
    a program not named has no ceiling, and is refused)."""

    default: int | None
    per_program: dict[str, int] = field(default_factory=dict)
    # False when DISBURSER_CEILING is not set at all (DESIGN's default applies): a report
    # then also weighs the ceiling a ledger recorded (reconcile on an auditor's machine).
    from_setting: bool = True

    def for_program(self, program: str, recorded: int | None = None) -> int:
        """The program's ceiling; for one this list does not name, ``recorded`` (the
        ceiling a ledger recorded at an acceptance of the program's manifests: reports on
        what was accepted before the list was written) if given, else refused."""
        if program in self.per_program:
            return self.per_program[program]
        if self.default is not None:
            return self.default
        if recorded is not None:
            return recorded
        # A list of programs is a list of what may be paid: a mistyped program name must
        # not get a fresh ceiling of its own.
        raise SettingsError(
            f"{PREFIX}CEILING: no ceiling for program {program!r} (it names "
            f"{', '.join(sorted(self.per_program))}); add {program}=<whole tokens>, or "
            "*=<whole tokens> for every program it does not name")


def parse_ceilings(text: str, decimals: int) -> Ceilings:
    """``300000000`` (every program), or ``together-2025=300000000,loans=100000000`` (only
    the programs named: any other is refused), or the same with ``*=N`` for the others
    (whole tokens). Nothing at all: 300000000 for every program."""
    where = f"{PREFIX}CEILING"
    if re.fullmatch(r"\s*[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?\s*", text):
        raise SettingsError(f"{where}: {text.strip()!r}: write whole tokens without thousands "
                            f"separators ({text.strip().replace(',', '')}); a comma separates "
                            "programs (name=amount,...)")
    default: int | None = None
    per: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, named, value = (x.strip() for x in part.partition("="))
        # A plain number is the ceiling of every program the list does not name, as *=N.
        amount = parse_units(value if named else name, decimals,
                             where=f"{where} ({name})" if named else where)
        if named and name != "*":
            if name in per:
                raise SettingsError(f"{where}: names program {name!r} twice")
            per[name] = amount
        else:
            if default is not None:
                raise SettingsError(f"{where}: gives the ceiling of every other program twice")
            default = amount
    if default is None and not per:
        return Ceilings(parse_units(DEFAULT_CEILING_TOKENS, decimals, where=where), per,
                        from_setting=False)
    return Ceilings(default, per)


@dataclass(frozen=True)
class Settings:
    network: Profile
    rpc_url: str
    db: str  # a SQLite path, or a postgresql:// URL (may carry a password: see redact_url)
    chain_id: int
    token: str
    decimals: int
    approvers: tuple[str, ...]
    quorum: int
    ceilings: Ceilings
    batch_contract: str | None
    confirmations: int
    max_fee_wei: int
    max_tx_fee_wei: int
    priority_fee_wei: int
    max_in_flight: int
    batch_size: int
    bump_after_blocks: int
    poll_interval: float
    rpc_timeout: float
    log_file: Path
    keystore: Path | None = field(default=None)
    keystore_password: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)
    allow_plain_key: bool = False
    # First block of the payer's Transfer logs that reconcile scans by default and that
    # send reads once per manifest in a ledger that did not see the payer's first nonce.
    from_block: int = 0


def _get(env: dict[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(PREFIX + name)
    return value if value not in (None, "") else default


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0,
         maximum: int | None = None) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    text = raw.strip()
    if not _INTEGER.fullmatch(text):
        raise SettingsError(f"{PREFIX}{name}: {raw[:40]!r} is not an integer")
    if len(text) > 40:  # int() refuses over 4,300 digits; no setting takes a tenth of 40
        raise SettingsError(f"{PREFIX}{name}: has {len(text)} digits, more than any setting "
                            "takes")
    value = int(text)
    if value < minimum:
        raise SettingsError(f"{PREFIX}{name}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{PREFIX}{name}: must be at most {maximum}, got {value}")
    return value


def _flag(env: dict[str, str], name: str) -> bool:
    """On or off. Anything else is refused: ``TRUE`` read as off (or ``0n`` as on) would
    be a setting that silently does not do what it says."""
    raw = _get(env, name, "0") or "0"
    text = raw.strip().lower() or "0"
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{PREFIX}{name}: {raw[:40]!r} is neither on (1, true, yes, on) nor "
                        "off (0, false, no, off)")


# Plain decimal seconds: float() also takes "1e-300", "nan", "٢" and "1_0".
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?|\.[0-9]+")


def _seconds(env: dict[str, str], name: str, default: str) -> float:
    raw = _get(env, name, default) or default
    if not _SECONDS.fullmatch(raw.strip()):
        raise SettingsError(f"{PREFIX}{name}: {raw[:40]!r} is not a number of seconds")
    value = float(raw)
    # A poll every microsecond would hammer the node; a timeout of one would fail every call.
    if not 0.001 <= value <= 3600:
        raise SettingsError(f"{PREFIX}{name}: must be between 0.001 and 3600 seconds, got "
                            f"{raw.strip()}")
    return value


def _wei(env: dict[str, str], name: str, default: str, decimals: int, *,
         positive: bool = False) -> int:
    """A decimal setting in gwei (``decimals`` 9) or ether (18), in wei. ``positive``: a cap,
    where 0 would sign transactions no block ever takes, then wait for ever."""
    raw = _get(env, name, default)
    assert raw is not None
    wei = parse_units(raw, decimals, where=f"{PREFIX}{name}")
    if positive and wei == 0:
        raise SettingsError(f"{PREFIX}{name}: must be greater than 0")
    return wei


def _rpc_url(raw: str) -> str:
    """An http(s) URL (the only transport): anything else is refused here, naming the
    setting, never echoing the URL (it may carry a password or an API key)."""
    from urllib.parse import urlsplit

    if not re.match(r"^https?://[^/\s]+", raw, re.IGNORECASE):
        raise SettingsError(f"{PREFIX}RPC_URL: not an http:// or https:// URL")
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises on a port that is not one
    except ValueError:
        raise SettingsError(f"{PREFIX}RPC_URL: its port is not a number from 0 to "
                            "65535") from None
    host = parts.hostname or ""
    try:
        # As the HTTP client will: an IPv6 address as it is, a name through IDNA
        # ("127.0.0..1" has an empty label, "a b" a space).
        name = host if ":" in host else host.encode("idna").decode("ascii")
    except UnicodeError:
        name = ""
    if not (":" in name or re.fullmatch(r"[A-Za-z0-9._-]+", name)):
        raise SettingsError(f"{PREFIX}RPC_URL: its host is not a host name or an address")
    return raw


def load(env: dict[str, str] | None = None) -> Settings:
    """Build and validate the settings from ``env`` (default: the process environment)."""
    env = dict(os.environ) if env is None else env
    net_name = _get(env, "NETWORK", "anvil")
    assert net_name is not None
    if net_name not in PROFILES:
        raise SettingsError(
            f"{PREFIX}NETWORK: unknown network {net_name!r} (one of {', '.join(PROFILES)})"
        )
    prof = PROFILES[net_name]
    # A uint256 has 78 digits: no token has more decimals than that (and 10**decimals of
    # a number past int()'s 4,300 digits was an internal error).
    decimals = _int(env, "DECIMALS", prof.decimals, maximum=77)
    token = checksum(_get(env, "TOKEN", prof.token) or "", where=f"{PREFIX}TOKEN")
    approvers_raw = _get(env, "APPROVERS", "") or ""
    approvers = tuple(
        checksum(a.strip(), where=f"{PREFIX}APPROVERS")
        for a in approvers_raw.split(",")
        if a.strip()
    )
    if len(set(approvers)) != len(approvers):
        raise SettingsError(f"{PREFIX}APPROVERS: lists the same address twice")
    quorum = _int(env, "QUORUM", min(2, max(1, len(approvers))), minimum=1)
    if approvers and quorum > len(approvers):
        raise SettingsError(
            f"{PREFIX}QUORUM: {quorum} is more than the {len(approvers)} configured approvers"
        )
    batch_contract_raw = _get(env, "BATCH_CONTRACT")
    keystore = _get(env, "KEYSTORE")
    return Settings(
        network=prof,
        rpc_url=_rpc_url(_get(env, "RPC_URL", prof.default_rpc) or ""),
        db=_get(env, "DB", "disburser.sqlite") or "",
        chain_id=_int(env, "CHAIN_ID", prof.chain_id, minimum=1),
        token=token,
        decimals=decimals,
        approvers=approvers,
        quorum=quorum,
        ceilings=parse_ceilings(_get(env, "CEILING", DEFAULT_CEILING_TOKENS) or "", decimals),
        batch_contract=(
            checksum(batch_contract_raw, where=f"{PREFIX}BATCH_CONTRACT")
            if batch_contract_raw
            else None
        ),
        # Past finality on every chain profiled (Ethereum's 64 blocks; an L2's L1 finality,
        # ~15 min, is 3,600 of Arbitrum's blocks). More is a typo that would hold a run for
        # days after its last payment.
        confirmations=_int(env, "CONFIRMATIONS", prof.confirmations, minimum=1,
                           maximum=10_000),
        max_fee_wei=_wei(env, "MAX_FEE_GWEI", prof.max_fee_gwei, 9, positive=True),
        priority_fee_wei=_wei(env, "PRIORITY_FEE_GWEI", prof.priority_fee_gwei, 9),
        max_tx_fee_wei=_wei(env, "MAX_TX_FEE_ETH", "1", 18, positive=True),
        max_in_flight=_int(env, "MAX_IN_FLIGHT", 16, minimum=1),
        batch_size=_int(env, "BATCH_SIZE", 500, minimum=1),
        bump_after_blocks=_int(env, "BUMP_AFTER_BLOCKS", 3, minimum=1),
        poll_interval=_seconds(env, "POLL_INTERVAL", str(prof.poll_interval)),
        rpc_timeout=_seconds(env, "RPC_TIMEOUT", "30"),
        log_file=Path(_get(env, "LOG_FILE", "disburser.log.jsonl") or ""),
        keystore=Path(keystore) if keystore else None,
        keystore_password=_get(env, "KEYSTORE_PASSWORD"),
        private_key=_get(env, "PRIVATE_KEY"),
        allow_plain_key=_flag(env, "ALLOW_PLAIN_KEY"),
        from_block=_int(env, "FROM_BLOCK", 0),
    )


def redact_url(url: str) -> str:
    """A URL fit for messages and logs: any password replaced, in the user part (also with
    no user name: ``postgresql://:pw@h/db``) or as libpq's query parameters
    (``?password=pw``, ``sslpassword``)."""
    url = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    return re.sub(r"([?&](?:ssl)?password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def require_approvers(s: Settings) -> None:
    if not s.approvers:
        raise SettingsError(f"{PREFIX}APPROVERS is not set: no manifest can reach quorum")
