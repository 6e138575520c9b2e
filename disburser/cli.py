"""The `disburser` command line: options -> settings -> one core function -> print.

This is the only place where an error becomes an exit code and a message: 0 done and
consistent, 1 finished with failures or discrepancies, 2 refused (nothing was sent).
Heavy libraries are imported inside the commands that need them, so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from disburser.errors import DisburserError, InputError

if TYPE_CHECKING:
    from disburser.ledger import Ledger
    from disburser.settings import Settings

class _ErrorBoundary(TyperGroup):
    """The only place where an error becomes a message and an exit code: one line on
    stderr, no traceback unless --debug."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: Any = None, **extra: Any) -> Any:
        _state.pop("dotenv", None)  # the last invocation's (CliRunner reuses the process)
        try:
            return super().make_context(info_name, args, parent, **extra)
        except typer.TyperException as e:  # `disburser --bogus`
            _usage_fail(e)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DisburserError as e:
            _fail(e, e.exit_code)
        except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except typer.TyperException as e:  # a subcommand's usage error (parsed in here)
            _usage_fail(e)
        except BrokenPipeError:
            # `disburser manifest typed-data m.json | head -1`: the reader left. Not an
            # internal error; stdout goes nowhere from here so that the exit's flush is quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.stderr.write("disburser: standard output was closed before the command "
                             "finished (broken pipe)\n")
            raise SystemExit(1) from None
        except Exception as e:
            if type(e).__module__.startswith(("typer", "click")):
                raise
            if _state.get("debug"):
                raise
            sys.stderr.write(f"disburser: internal error: {type(e).__name__}: "
                             f"{str(e)[:300]} (run with --debug for the traceback)\n")
            raise SystemExit(1) from None


app = typer.Typer(
    cls=_ErrorBoundary,
    name="disburser",
    help="Pay a relief fund out on-chain from signed manifests: allocate, sign, send, "
    "reconcile. Every option can also be set as DISBURSER_<NAME> in the environment or .env "
    "(not -o/--output, manifest sign --keystore or send --accept-past-transfers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
manifest_app = typer.Typer(help="Build, sign, verify and prove allocation manifests.",
                           no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")
key_app = typer.Typer(help="Create and inspect encrypted keystores.", no_args_is_help=True)
app.add_typer(key_app, name="key")

_state: dict[str, Any] = {"debug": False}


def _env(name: str) -> str:
    """Every option's variable is DISBURSER_<NAME> (DESIGN.md), with three exceptions:
    ``-o/--output`` has none, because one variable for every command's output file would let
    one command write over another's (a report over a manifest); ``manifest sign
    --keystore`` has none, because DISBURSER_KEYSTORE is the payer's key; ``send
    --accept-past-transfers`` has none, because it accepts what the operator has read in the
    last refusal, and a standing setting would accept it with nobody reading. One is named
    otherwise: ``devnet --port`` reads DISBURSER_DEVNET_PORT (the bare name would read as
    the node's port); and DISBURSER_PASSWORD_FILE, the payer's password, is read by the
    commands about the payer's key only: ``manifest sign --password-file`` reads
    DISBURSER_APPROVER_PASSWORD_FILE and ``key new --password-file``
    DISBURSER_NEW_KEY_PASSWORD_FILE."""
    return "DISBURSER_" + name


# Options shared by the commands that write a manifest header.
PayerOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    envvar=_env("PAYER"), help="Paying address (default: the payer key's).")]
NotAfterOption = Annotated[Optional[int], typer.Option(  # noqa: UP045
    envvar=_env("NOT_AFTER"), help="Unix time after which nothing of it is sent "
    "(default: 96 hours from now).")]


class Fmt(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    html = "html"


class ModeOpt(str, Enum):
    batch = "batch"
    direct = "direct"


_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off", ""}


@app.callback()
def main_options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", envvar=_env("DEBUG"),
                                        help="Show tracebacks.")] = False,
    env_file: Annotated[Path, typer.Option("--env-file", envvar=_env("ENV_FILE"),
                                           help="Settings file read before the environment "
                                                "defaults (from the environment only, not "
                                                "from the file itself).")] = Path(".env"),
) -> None:
    _state.clear()  # one invocation, one set of settings (CliRunner reuses the process)
    _state["debug"] = debug
    from typer._click.core import ParameterSource

    from disburser.errors import SettingsError
    from disburser.settings import load_dotenv

    if ctx.get_parameter_source("env_file") is not ParameterSource.DEFAULT and (
            not env_file.exists() or env_file.is_dir()):
        # Named on purpose (--env-file or DISBURSER_ENV_FILE): running on the defaults
        # instead would pay from, or build for, the wrong chain with nothing said.
        raise SettingsError(f"{env_file}: no such settings file (--env-file / "
                            "DISBURSER_ENV_FILE)")
    # `<command> --help` is what an operator reads to find a setting's right name: the
    # checks of the variables wait for a command that runs (read from the process's argv,
    # so a program that calls disburser in-process has its own arguments read).
    helping = "--help" in sys.argv[1:]
    keys = load_dotenv(env_file, strict=not helping)
    _state["dotenv"] = (env_file, keys)
    if not helping:
        _refuse_unknown_variables(known_variables(ctx.find_root().command) | _key_variables(),
                                  env_file, keys)
    # The subcommands' options are parsed after this and see the file's variables; these
    # two were parsed before it was read.
    if _env("DEBUG") in keys and ctx.get_parameter_source("debug") is ParameterSource.DEFAULT:
        value = os.environ[_env("DEBUG")].strip().lower()
        if value not in _TRUE | _FALSE:
            raise SettingsError(f"{env_file}: DISBURSER_DEBUG: {value!r} is not a boolean "
                                "(1 or 0)")
        _state["debug"] = value in _TRUE


def known_variables(root: Any) -> set[str]:
    """Every DISBURSER_* variable disburser reads: each command-line option's, and the
    settings read elsewhere (``settings.OTHER_NAMES``)."""
    from disburser.settings import OTHER_NAMES

    names = set(OTHER_NAMES)
    todo = [root]
    while todo:
        cmd = todo.pop()
        for p in getattr(cmd, "params", ()):
            envvar = getattr(p, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or ())
        todo.extend(getattr(cmd, "commands", {}).values())
    return names


def _key_variables() -> set[str]:
    """The variables `--private-key-env NAME` (or DISBURSER_PRIVATE_KEY_ENV) names: a key an
    approver keeps in a DISBURSER_-prefixed variable is no misspelt setting."""
    argv = sys.argv[1:]
    names = {os.environ.get(_env("PRIVATE_KEY_ENV"), "")}
    for i, a in enumerate(argv):
        if a == "--private-key-env" and i + 1 < len(argv):
            names.add(argv[i + 1])
        elif a.startswith("--private-key-env="):
            names.add(a.split("=", 1)[1])
    return {n for n in names if n}


def _refuse_unknown_variables(known: set[str], env_file: Path, keys: dict[str, int]) -> None:
    """A DISBURSER_* variable that names no setting: a misspelt ceiling was ignored and the
    default of 300,000,000 applied; a misspelt quorum of 3 left it at 2."""
    import difflib

    from disburser.errors import SettingsError

    for key in sorted(os.environ):
        if not key.startswith("DISBURSER_") or key in known:
            continue
        # Alike after the prefix they all share (FOO is no FORMAT, CIELING is CEILING).
        close = difflib.get_close_matches(key[10:], sorted(k[10:] for k in known), n=1,
                                          cutoff=0.8)
        close = ["DISBURSER_" + c for c in close]
        where = f"{env_file}:{keys[key]}: {key}" if key in keys else f"{key} (environment)"
        raise SettingsError(f"{where} is not a disburser setting"
                            + (f" (did you mean {close[0]}?)" if close else "")
                            + ": it would be ignored; correct it or remove it")


def settings() -> Settings:
    from disburser import settings as st
    from disburser.errors import SettingsError

    if "settings" not in _state:
        try:
            _state["settings"] = st.load()
        except SettingsError as e:
            # "DISBURSER_QUORUM: 'two' is not an integer": from the settings file, say where.
            env_file, keys = _state.get("dotenv", (None, {}))
            name = str(e).split(":", 1)[0].split(" ", 1)[0]
            if name in keys:
                raise SettingsError(f"{env_file}:{keys[name]}: {e}") from None
            raise
    s: Settings = _state["settings"]
    return s


def _configure_logging(s: Settings) -> None:
    from disburser.logging import configure

    configure(s.log_file)


def _ledger(s: Settings) -> Ledger:
    from disburser.ledger import Ledger

    return Ledger(s.db)


def _ledger_settings() -> Settings:
    """settings() for a command that opens the ledger: its path checked first, alike in each
    (`status` said "no ledger yet" for a typo; `manifest sign` on an approver's machine
    never opens it, and is not stopped by it)."""
    from disburser.ledger import check_path

    s = settings()
    check_path(s.db)
    return s


def _out(text: str, output: Path | None) -> None:
    if output is None:
        # UTF-8 whatever the locale: the reports hold "…" and ids may hold any letter (a
        # latin-1 terminal was an internal error; a cp1252 one wrote an HTML page that
        # says it is UTF-8 in another encoding).
        data = text if text.endswith("\n") else text + "\n"
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:  # a text-only stream (an embedding caller's)
            sys.stdout.write(data)
            return
        sys.stdout.flush()
        buffer.write(data.encode("utf-8"))
        buffer.flush()
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as e:
            raise InputError(f"{output}: cannot write ({e.strerror})") from None
        typer.echo(f"wrote {output}", err=True)


def _now() -> int:
    return int(time.time())


# --- allocate ------------------------------------------------------------------------


@app.command()
def allocate(
    liquidations: Annotated[Path, typer.Argument(help="CSV user_id,time,product,loss_usd.")],
    snapshot: Annotated[Path, typer.Argument(help="CSV user_id,net_assets_usd at the "
                                             "snapshot.")],
    compensated: Annotated[Path, typer.Option(envvar=_env("COMPENSATED"),
                                              help="CSV user_id of users already "
                                                   "reimbursed.")],
    addresses: Annotated[Path, typer.Option(envvar=_env("ADDRESSES"),
                                            help="CSV user_id,address (payout addresses).")],
    program: Annotated[str, typer.Option(envvar=_env("PROGRAM"), help="Program name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Unsigned manifest to "
                                         "write.")],
    report: Annotated[Path, typer.Option(envvar=_env("REPORT"),
                                         help="Eligibility report CSV to write (one row per "
                                              "user).")] = Path("eligibility.csv"),
    factors: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        envvar=_env("FACTORS"), help="CSV user_id,factor (default factor 1).")] = None,
    policy: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        envvar=_env("POLICY"), help="TOML amount policy and fund size.")] = None,
    payer: PayerOption = None,
    not_after: NotAfterOption = None,
) -> None:
    """Apply the eligibility rules and the amount policy to the exchange's records: write an
    unsigned manifest and a report saying why each user got what they got."""
    from disburser import allocate as al
    from disburser import manifest as mf
    from disburser.amounts import format_units
    from disburser.errors import CeilingError

    s = settings()
    payer_addr = _payer_address(s, payer)
    _check_outputs([output, report], [liquidations, snapshot, compensated, addresses, factors,
                                      policy])
    pol = al.load_policy(policy)
    refused = {s.token, payer_addr} | ({s.batch_contract} if s.batch_contract else set())
    a = al.allocate(liquidations, snapshot, compensated, addresses, factors, pol, s.decimals,
                    refused)
    if not a.payments:
        raise InputError(f"{liquidations}: no eligible user with a valid address; no manifest")
    ceiling = s.ceilings.for_program(program)
    if a.total > ceiling:
        raise CeilingError(f"allocation total {a.total} base units exceeds the ceiling "
                           f"{ceiling} of program {program}")
    if a.owed > ceiling:
        # Users without an address yet are owed too: a later manifest of the same program
        # must pay them under the same ceiling, which this allocation would already pass.
        raise CeilingError(f"allocation owes {a.owed} base units (this manifest "
                           f"{a.total}, users without a valid address {a.owed - a.total}), "
                           f"over the ceiling {ceiling} of program {program}: the policy's "
                           "fund_usd is above DISBURSER_CEILING")
    m = mf.make_manifest(program=program, chain_id=s.chain_id, token=s.token, payer=payer_addr,
                         not_after=_not_after(not_after), payments=a.payments,
                         source=str(addresses))
    mf.refuse_batch_contract(m.payments, str(addresses), s.batch_contract)
    al.write_report(a, report, s.decimals)
    mf.write(m, output)
    eligible = sum(1 for d in a.decisions if d.eligible)
    by_reason = Counter(d.reason for d in a.decisions if d.eligible)
    no_address = by_reason[al.Reason.NO_ADDRESS] + by_reason[al.Reason.INVALID_ADDRESS]
    to_refused = by_reason[al.Reason.REFUSED_ADDRESS]
    typer.echo(f"users seen      {len(a.decisions)}")
    typer.echo(f"eligible        {eligible}")
    typer.echo(f"in manifest     {m.count} (others eligible: {no_address} without a valid "
               f"address, {by_reason[al.Reason.ZERO_AMOUNT]} with an amount of 0"
               + (f", {to_refused} with the token's, the payer's or the batch contract's "
                  "address (refused_address)" if to_refused else "") + ")")
    typer.echo(f"owed            {format_units(a.owed, s.decimals)} tokens"
               + (" (scaled down to fit the fund)" if a.scaled else ""))
    typer.echo(f"manifest total  {format_units(m.total, s.decimals)} tokens")
    typer.echo(f"paymentsRoot    {m.root}")
    typer.echo(f"wrote {output} and {report}")


# --- manifest ------------------------------------------------------------------------


@manifest_app.command("build")
def manifest_build(
    payments: Annotated[Path, typer.Argument(help="CSV with columns id,to,amount (whole "
                                             "tokens, up to the token's decimals).")],
    program: Annotated[str, typer.Option(envvar=_env("PROGRAM"), help="Program name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Manifest JSON to write.")],
    payer: PayerOption = None,
    not_after: NotAfterOption = None,
) -> None:
    """Build an unsigned manifest from a CSV of payments."""
    from disburser import manifest as mf

    s = settings()
    payer_addr = _payer_address(s, payer)
    _check_outputs([output], [payments])
    m = mf.build_from_csv(payments, program=program, chain_id=s.chain_id, token=s.token,
                          payer=payer_addr, not_after=_not_after(not_after),
                          decimals=s.decimals)
    mf.refuse_batch_contract(m.payments, str(payments), s.batch_contract)
    mf.write(m, output)
    _print_summary(m, s)


def _not_after(given: int | None) -> int:
    """--not-after as given (0 or less is refused with the manifest), else 96 hours on. One
    already past is written (a test of the refusal needs one) with a warning: `send` and
    `manifest verify` refuse it."""
    if given is not None and 0 < given <= _now():
        from disburser.manifest import utc_text

        typer.echo(f"warning: --not-after {given} ({utc_text(given)}) is already past: send "
                   "refuses this manifest", err=True)
    return given if given is not None else _now() + 96 * 3600


def _check_outputs(outputs: list[Path], inputs: list[Path | None]) -> None:
    """Files a command is about to write: each in an existing directory, not a directory,
    not one of its inputs, not twice, not a manifest that carries signatures. Checked
    before anything is written, so that a bad path does not leave one file written and the
    other not."""
    seen: dict[Path, Path] = {}
    ins = {p.resolve() for p in inputs if p is not None}
    for out in outputs:
        full = out.resolve()
        if full in seen:
            raise InputError(f"{out}: given for two outputs (also {seen[full]})")
        seen[full] = out
        if full in ins:
            raise InputError(f"{out}: is also an input; refusing to write over it")
        if out.is_dir():
            raise InputError(f"{out}: is a directory")
        if not out.parent.is_dir():
            raise InputError(f"{out}: no such directory {out.parent}")
        if what := _precious(out):
            raise InputError(f"{out}: {what}; refusing to write over it (write elsewhere, "
                             "or move it away first)")


# Files that settings name and no output may replace (DISBURSER_<NAME>, default).
_NAMED_FILES = (("DB", "disburser.sqlite", "the ledger (DISBURSER_DB)"),
                ("KEYSTORE", None, "the payer's keystore (DISBURSER_KEYSTORE)"),
                ("PASSWORD_FILE", None, "a password file (DISBURSER_PASSWORD_FILE)"),
                ("APPROVER_PASSWORD_FILE", None,
                 "a password file (DISBURSER_APPROVER_PASSWORD_FILE)"),
                ("NEW_KEY_PASSWORD_FILE", None,
                 "a password file (DISBURSER_NEW_KEY_PASSWORD_FILE)"),
                ("LOG_FILE", "disburser.log.jsonl", "the log (DISBURSER_LOG_FILE)"))


def _precious(path: Path) -> str | None:
    """What an existing file at ``path`` is, if an output must not replace it: a file the
    settings name (the ledger and its journal files, the payer's keystore, a password file,
    the log, the settings file in use), a settings file (``.env*``), any SQLite database or
    JSON keystore, a manifest that carries signatures, or any other file disburser did not
    write. None for no file, or one disburser wrote (an earlier report, an unsigned
    manifest, an empty file)."""
    if not path.is_file():
        return None
    full = path.resolve()
    dotenv = _state.get("dotenv")
    if dotenv is not None and full == Path(dotenv[0]).resolve():
        return "is the settings file in use"
    for name, default, what in _NAMED_FILES:
        named = os.environ.get(_env(name)) or default
        if not named:
            continue
        target = Path(named).resolve()
        if full == target or (name == "DB" and full.parent == target.parent and full.name in {
                target.name + suffix for suffix in ("-wal", "-shm", "-journal")}):
            return f"is {what}"
    if path.name.startswith(".env"):
        return "is a settings file"
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head == b"SQLite format 3\x00":
        return "is a SQLite database (a ledger?)"
    if _is_keystore(path):
        return "is a keystore"
    if signed := _signatures_in(path):
        return f"holds a manifest with {signed} signature(s)"
    if not _written_by_disburser(path):
        # A password file given on the command line (`--password-file a1.pw`), notes, a
        # payments CSV: only what disburser itself writes is written over.
        return "is a file disburser did not write (no manifest or report of its own)"
    return None


def _written_by_disburser(path: Path) -> bool:
    """An empty file, or one that begins as a manifest, a reconcile report (any format) or an
    eligibility report does."""
    from disburser.allocate import REPORT_COLUMNS
    from disburser.report import CSV_COLUMNS

    try:
        with path.open("rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    first = head.lstrip("\ufeff").split("\n", 1)[0].replace('"', "").strip()
    return (not head.strip() or head.startswith("reconcile: program ")
            or "<title>disburser reconcile" in head
            or '"format": "disburser.' in head
            or first in (",".join(CSV_COLUMNS), ",".join(REPORT_COLUMNS)))


def _is_keystore(path: Path) -> bool:
    """A JSON object with a "crypto" member (Web3 Secret Storage, any version)."""
    try:
        if path.stat().st_size > 1_000_000:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and any(k.lower() == "crypto" for k in doc)


def _signatures_in(path: Path) -> int:
    """How many signatures the manifest at ``path`` carries; 0 for no file, or one that is
    not a manifest. Collected signatures are not to be lost to a rebuild's ``-o``."""
    import json

    from disburser.manifest import json_too_deep

    try:
        text = path.read_text(encoding="utf-8")
        if json_too_deep(text):  # not a manifest (and json.loads could overflow the stack)
            return 0
        doc = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return 0
    sigs = doc.get("signatures") if isinstance(doc, dict) else None
    return len(sigs) if isinstance(sigs, list) else 0


def _payer_address(s: Settings, explicit: str | None) -> str:
    from disburser.manifest import check_address

    if explicit:
        # As the other address settings: all lower (or upper) case is taken and checksummed,
        # a mixed case that fails EIP-55 is a typo.
        return check_address(explicit, "--payer / DISBURSER_PAYER", strict_checksum=False)
    if s.keystore is not None:
        from disburser import keys

        # The address the keystore records: whom a manifest pays from needs no password.
        # A file that records none (Foundry's) is decrypted as send does (a prompt on a
        # terminal).
        if (recorded := keys.recorded_address(s.keystore)) is not None:
            return recorded
        return str(_payer_signer(s).address)
    if s.private_key:
        return str(_payer_signer(s).address)
    raise InputError("no payer: set --payer / DISBURSER_PAYER (or the payer's key)")


def _print_summary(m: Any, s: Settings) -> None:
    """What a signature over ``m`` covers (the EIP-712 Manifest). The total in tokens only
    at decimals that are the manifest's token's (a profile's, or the settings' when they
    name its chain and token): a 6-decimal reading of an 18-decimal total is 10^12 off."""
    from disburser import manifest as mf
    from disburser.amounts import format_units
    from disburser.profiles import PROFILES

    known = {(p.chain_id, p.token): p.decimals for p in PROFILES.values()}
    known[(s.chain_id, s.token)] = s.decimals
    dec = known.get((m.chain_id, m.token))
    typer.echo(f"program       {m.program}")
    typer.echo(f"chain_id      {m.chain_id}")
    typer.echo(f"token         {m.token}")
    typer.echo(f"payer         {m.payer}")
    typer.echo(f"not_after     {m.not_after} ({mf.utc_text(m.not_after)})")
    typer.echo(f"count         {m.count}")
    typer.echo(f"total         {m.total} base units" + (
        f" ({format_units(m.total, dec)} tokens at {dec} decimals)" if dec is not None
        else " (decimals of this chain and token unknown here)"))
    typer.echo(f"paymentsRoot  {m.root}")


@manifest_app.command("sign")
def manifest_sign(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Argument(help="Manifest JSON; the signature is added "
                                             "in place.")],
    # No DISBURSER_KEYSTORE here: that setting is the payer's key (DESIGN.md), and an
    # approver's signature must not default to it.
    keystore: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Approver's encrypted V3 keystore.")] = None,
    # Not DISBURSER_PASSWORD_FILE: that is the payer's password (as with --keystore).
    password_file: Annotated[Optional[str], typer.Option(  # noqa: UP045
        envvar=_env("APPROVER_PASSWORD_FILE"),
        help="File holding the keystore password.")] = None,
    private_key_env: Annotated[Optional[str], typer.Option(  # noqa: UP045
        envvar=_env("PRIVATE_KEY_ENV"),
        help="Name of an environment variable holding the approver's hex key.")] = None,
) -> None:
    """Sign a manifest (EIP-712) as one approver."""
    from typer._click.core import ParameterSource

    from disburser import keys
    from disburser import manifest as mf

    s = settings()  # for the summary's decimals; bad settings refuse before anything
    m = mf.load(manifest)
    if (keystore is not None and ctx.get_parameter_source("private_key_env")
            is ParameterSource.ENVIRONMENT):
        private_key_env = None  # --keystore on the command line wins over a standing setting
    if (keystore is None) == (private_key_env is None):
        raise InputError("give exactly one of --keystore or --private-key-env")
    if keystore is not None:
        pw = keys.read_password(os.environ.get(_env("APPROVER_PASSWORD")), password_file)
        if pw is None and sys.stdin.isatty():
            pw = typer.prompt(f"password for {keystore}", hide_input=True)
        signer = keys.from_keystore(keystore, pw, password_source="--password-file")
    else:
        assert private_key_env is not None
        signer = keys.from_env_var(private_key_env)
    sig = mf.sign(m, signer.key_bytes)
    signed = mf.with_signature(m, sig, str(manifest))
    mf.write(signed, manifest)
    typer.echo(f"signed by {signer.address} ({len(signed.signatures)} signature(s))")
    _print_summary(m, s)  # what the signature covers: no approver signs blind


@manifest_app.command("typed-data")
def manifest_typed_data(manifest: Annotated[Path, typer.Argument()]) -> None:
    """Print the EIP-712 JSON that any wallet or `cast wallet sign --data` can sign."""
    from disburser import manifest as mf

    typer.echo(json.dumps(mf.typed_data(mf.load(manifest)), indent=2))


@manifest_app.command("add-signature")
def manifest_add_signature(
    manifest: Annotated[Path, typer.Argument()],
    signature: Annotated[str, typer.Argument(help="0x r||s||v signature made elsewhere.")],
) -> None:
    """Attach an EIP-712 signature produced by another tool."""
    from disburser import manifest as mf

    m = mf.load(manifest)
    sig = signature.strip()
    if mf.is_signature_text(sig) and (low := mf.low_s_form(sig)):
        # The same approval; a file holds only the low-s form (verify refuses the other).
        typer.echo("note: the signature has a high s (as some signing services make): "
                   "stored in its low-s form, the same approval", err=True)
        sig = low
    signed = mf.with_signature(m, sig, str(manifest))
    mf.write(signed, manifest)
    typer.echo(f"added signature of {mf.recover(signed, sig.lower())}")


@manifest_app.command("verify")
def manifest_verify(manifest: Annotated[Path, typer.Argument()]) -> None:
    """Check a manifest against the settings: chain, token, payer, expiry, approvers, quorum
    and the program's ceiling."""
    from disburser import keys
    from disburser import manifest as mf

    s = settings()
    m = mf.load(manifest)
    _print_summary(m, s)
    signers = mf.signers_of(m, str(manifest))
    for j, who in enumerate(signers):
        tag = "approver" if who in s.approvers else "NOT AN APPROVER (not counted)"
        typer.echo(f"signature[{j}]  {who}  {tag}")
    approved = len({w for w in signers if w in s.approvers})
    typer.echo(f"quorum        {approved} of {s.quorum} required: "
               f"{'met' if approved >= s.quorum else 'NOT met'}")
    # The payer as send checks it: the payer key's address, else DISBURSER_PAYER. It was
    # checked only against DISBURSER_PAYER, so a manifest for another payer than the key's
    # verified, and send then refused it.
    # A keystore is not decrypted for this: the address it records, if any.
    payer = (keys.recorded_address(s.keystore) if s.keystore is not None
             else _payer_address(s, None) if s.private_key else None)
    if payer is None and not os.environ.get(_env("PAYER")):
        typer.echo("payer         not checked (no DISBURSER_PAYER, and no payer key "
                   "configured or a keystore that records no address)")
    _verify(s, m, str(manifest), payer=payer, warn_strangers=False)  # listed above


def _verify(s: Settings, m: Any, source: str, payer: str | None = None, *,
            warn_strangers: bool = True) -> Any:
    from disburser import manifest as mf
    from disburser.errors import CeilingError
    from disburser.settings import checksum, require_approvers

    require_approvers(s)
    if payer is None and (configured := os.environ.get(_env("PAYER"))):
        payer = checksum(configured, where=_env("PAYER"))  # any case, as the others
    v = mf.verify(m, source=source, approvers=s.approvers, quorum=s.quorum,
                  chain_id=s.chain_id, token=s.token, payer=payer, now=_now(),
                  batch_contract=s.batch_contract)
    ceiling = s.ceilings.for_program(m.program)
    if m.total > ceiling:
        raise CeilingError(f"{source}: total {m.total} base units exceeds the ceiling "
                           f"{ceiling} of program {m.program}")
    if warn_strangers and v.strangers:
        # Not counted, not refused (DESIGN.md: quorum of configured approvers); but said.
        others = ", ".join(f"signatures[{j}] by {w}" for j, w in v.strangers)
        typer.echo(f"warning: {source}: {others}: not configured approver(s), not counted; "
                   f"quorum met by {len(v.approved)} of {s.quorum} required", err=True)
    return v


@manifest_app.command("proof")
def manifest_proof(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Argument()],
    index: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--index", envvar=_env("INDEX"), help="Payment index.")] = None,
    payment_id: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--id", envvar=_env("ID"), help="Payment id (instead of --index).")] = None,
) -> None:
    """Print the Merkle proof of one payment (checkable with OpenZeppelin tooling), by its
    index or its id."""
    from eth_hash.auto import keccak
    from typer._click.core import ParameterSource

    from disburser import manifest as mf
    from disburser.merkle import MerkleTree

    # Both given, one by a standing DISBURSER_INDEX / DISBURSER_ID setting: the command
    # line wins.
    from_env = {n: ctx.get_parameter_source(n) is ParameterSource.ENVIRONMENT
                for n in ("index", "payment_id")}
    if index is not None and payment_id is not None \
            and from_env["index"] != from_env["payment_id"]:
        if from_env["index"]:
            index = None
        else:
            payment_id = None
    if (index is None) == (payment_id is None):
        raise InputError("give one of --index N or --id ID" if index is None else
                         "give --index or --id, not both")
    m = mf.load(manifest)
    if payment_id is not None:
        found = [p.index for p in m.payments if p.id == payment_id]
        if not found:
            raise InputError(f"--id {payment_id!r}: no payment of {manifest} has that id")
        index = found[0]
    assert index is not None
    if not 0 <= index < m.count:
        raise InputError(f"--index {index}: manifest has payments 0..{m.count - 1}")
    p = m.payments[index]
    typer.echo(json.dumps({
        "root": m.root,
        "index": index,
        "id": p.id,
        "to": p.to,
        "amount": str(p.amount),
        "leaf": [str(index), p.to, str(p.amount), "0x" + keccak(p.id.encode()).hex()],
        "leafEncoding": ["uint256", "address", "uint256", "bytes32"],
        "proof": MerkleTree(m.payments).proof(index),
    }, indent=2))


# --- chain commands ----------------------------------------------------------------------


def _payer_signer(s: Settings) -> Any:
    from disburser import keys
    from disburser.errors import SettingsError

    if "signer" in _state:
        return _state["signer"]
    if s.keystore is not None:
        pw = keys.read_password(s.keystore_password, os.environ.get(_env("PASSWORD_FILE")))
        if pw is None and sys.stdin.isatty():
            pw = typer.prompt(f"password for {s.keystore}", hide_input=True)
        signer = keys.from_keystore(s.keystore, pw,
                                    password_source="DISBURSER_KEYSTORE_PASSWORD")
    elif s.private_key is not None:
        # Local means the local profile on a local chain id: the anvil profile with
        # DISBURSER_CHAIN_ID=1 is a real chain's id (the node is checked to match it).
        from disburser.profiles import LOCAL_CHAIN_IDS

        local = s.network.local and s.chain_id in LOCAL_CHAIN_IDS
        if not local and not s.allow_plain_key:
            raise SettingsError(
                f"DISBURSER_PRIVATE_KEY is refused on network {s.network.name}, chain "
                f"{s.chain_id}: use DISBURSER_KEYSTORE (or DISBURSER_ALLOW_PLAIN_KEY=1 to "
                "override)")
        signer = keys.from_env_var(_env("PRIVATE_KEY"))
    else:
        raise SettingsError("no payer key: set DISBURSER_KEYSTORE (and its password) or, on "
                            "a local chain, DISBURSER_PRIVATE_KEY")
    _state["signer"] = signer
    return signer


def _chain(s: Settings) -> Any:
    from disburser.chain import RpcChain, Transport

    return RpcChain(s.rpc_url, Transport(s.rpc_url, timeout=s.rpc_timeout))


@app.command()
def deploy() -> None:
    """Deploy the batch payout contract from the payer's key and print its address."""
    from disburser.locks import RunnerLock
    from disburser.sender import deploy_batch_contract

    s = _ledger_settings()
    _configure_logging(s)
    signer = _payer_signer(s)
    ledger = _ledger(s)
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    # deploy uses a payer nonce: it must not race a running `send`.
    with RunnerLock(s.db, signer.address, s.chain_id), \
            ledger.runner_lock(signer.address, s.chain_id, holder):
        addr = deploy_batch_contract(ledger, _chain(s), signer, s)
    typer.echo(addr)


@app.command()
def send(
    manifest: Annotated[Path, typer.Argument(help="Signed manifest JSON.")],
    mode: Annotated[ModeOpt, typer.Option(envvar=_env("MODE"),
                                          help="batch: through the batch contract; direct: "
                                               "one transfer per payment.")] = ModeOpt.batch,
    dry_run: Annotated[bool, typer.Option("--dry-run", envvar=_env("DRY_RUN"),
                                          help="Show what would be sent; send "
                                               "nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", envvar=_env("YES"),
                                      help="Do not ask for confirmation.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", envvar=_env("RETRY_FAILED"),
                                               help="Put payments marked "
                                                    "failed back in the queue.")] = False,
    accept_past_transfers: Annotated[bool, typer.Option(
        "--accept-past-transfers",
        help="Record payments that the payer's transfers this ledger did not send already "
             "paid (a lost ledger) as paid elsewhere, instead of stopping.")] = False,
) -> None:
    """Verify a signed manifest, record it, pay it in batches and wait for confirmations."""
    from disburser import ledger as lg
    from disburser import manifest as mf
    from disburser.amounts import format_units
    from disburser.domain import Mode, PaymentStatus
    from disburser.locks import RunnerLock
    from disburser.sender import Sender, config_from_settings

    s = _ledger_settings()
    m = mf.load(manifest)
    signer = _payer_signer(s)
    v = _verify(s, m, str(manifest), payer=signer.address)
    c = _chain(s)
    cfg = dataclasses.replace(config_from_settings(s, Mode(mode.value), m.program),
                              accept_past_transfers=accept_past_transfers)
    if dry_run:
        _dry_run(s, m, cfg, c, signer.address, retry_failed=retry_failed)
        return
    if not yes:
        if not sys.stdin.isatty():
            raise InputError("send needs confirmation: pass --yes (or DISBURSER_YES=1)")
        ledger_now = _ledger(s) if lg.exists(s.db) else None
        owed = _owed(ledger_now, m, retry_failed)
        rest = "paid or in flight" if retry_failed else "paid, in flight or failed"
        others = "" if len(owed) == m.count else f" (of {m.count}; the others {rest})"
        try:
            agreed = typer.confirm(f"Pay {len(owed)} payments{others}, "
                                   f"{format_units(sum(p.amount for p in owed), s.decimals)} "
                                   f"tokens, from {m.payer} on chain {s.chain_id}?")
        except typer.Abort:  # Ctrl-C or Ctrl-D at the question: a no as well
            agreed = False
        if not agreed:
            raise InputError("not confirmed: nothing was sent")
    _configure_logging(s)
    ledger = _ledger(s)
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    with RunnerLock(s.db, signer.address, s.chain_id), \
            ledger.runner_lock(signer.address, s.chain_id, holder):
        stop = _StopFlag()
        progress = _ProgressPrinter(s.decimals)
        sender = Sender(ledger, c, signer, cfg, should_stop=stop, on_progress=progress)
        # The chain is checked before the manifest is recorded against the ceiling.
        sender.preflight()
        first_block = c.head().number
        ledger.accept_manifest(m, ceiling=cfg.ceiling, signers=v.approved,
                               first_block=first_block)
        if retry_failed:
            ledger.requeue_failed(m.root)
        try:
            with sender.exit_1_once_sent():
                result = sender.run(m)
        except DisburserError:
            try:
                progress.stopped(sender.snapshot(m.root) if progress.shown else None)
            except Exception:  # noqa: BLE001 - the run's own error is the one to report
                progress.done()
            raise
        progress.done()
    typer.echo(f"confirmed {result.confirmed}, failed {result.failed}, unpaid {result.unpaid}; "
               f"paid {format_units(result.amount_paid, s.decimals)} tokens in "
               f"{result.txs_sent} new transaction(s)")
    if result.failed:
        for p in ledger.payments(m.root, [PaymentStatus.FAILED]):
            typer.echo(f"failed: payments[{p.idx}] {p.pid} {p.to}: {p.reason}", err=True)
        typer.echo("(--retry-failed sends them again once the cause is fixed)", err=True)
    if result.expired and result.unpaid:
        typer.echo(f"manifest expired (not_after={m.not_after}) with {result.unpaid} unpaid",
                   err=True)
    if result.failed or result.unpaid:
        raise typer.Exit(1)


def _reads_bitmap(c: Any, cfg: Any) -> bool:
    """Whether a run reads the batch contract's bitmap (``Sender._reads_bitmap``): in batch
    mode, and in direct mode when DISBURSER_BATCH_CONTRACT holds BatchPayout."""
    from disburser.errors import ChainMismatchError
    from disburser.sender import verify_batch_contract

    if cfg.batch_contract is None:
        return False
    if cfg.mode.value == "batch":
        return True  # verified by check_chain
    try:
        verify_batch_contract(c, cfg.batch_contract)
    except ChainMismatchError:
        return False
    return True


def _owed(ledger: Ledger | None, m: Any, retry_failed: bool) -> list[Any]:
    """The manifest's payments a run would send: those the ledger holds queued (and failed,
    with --retry-failed); all of them when the ledger does not know the manifest."""
    from disburser.domain import PaymentStatus

    if ledger is None or ledger.manifest(m.root) is None:
        return list(m.payments)
    statuses = [PaymentStatus.QUEUED] + ([PaymentStatus.FAILED] if retry_failed else [])
    queued = {p.idx for p in ledger.payments(m.root, statuses)}
    return [p for p in m.payments if p.index in queued]


def _dry_run(s: Settings, m: Any, cfg: Any, c: Any, payer: str, *,
             retry_failed: bool) -> None:
    """What `send` would pay, after the checks it makes before sending: the chain, token
    and contract; the payer's nonces (no other signer's transaction past the ledger's or in
    the pool); the ceiling and the users already accepted for the program; the token
    not paused, nobody blacklisted that every payment needs, the tokens and the gas. Writes
    nothing (no ledger is created). Recipients the token refuses are found only by the
    simulation of a real run, and a run with a ledger that does not know the manifest (a
    lost ledger) first settles what the payer already paid: in batch mode the contract's
    bitmap is read here too; the payer's past transfers are not (a note says the real run
    reads them), and a shortfall of tokens or gas is a warning, not a refusal."""
    from disburser import ledger as lg
    from disburser.amounts import format_units
    from disburser.errors import FundsShortfall
    from disburser.sender import check_chain, check_funds, check_nonces

    check_chain(c, cfg)
    owed = list(m.payments)
    known = False
    ledger = _ledger(s) if lg.exists(s.db) else None
    # Another signer's transactions (mined past the ledger, or waiting in the pool) stop the
    # real run before anything is sent: the dry run says so too.
    latest = c.nonce(payer, "latest")
    first = ledger.payer_first_nonce(payer) if ledger is not None else None
    check_nonces(c, ledger, payer, latest=latest, pending=c.nonce(payer, "pending"),
                 first=latest if first is None else first)
    if ledger is not None:
        ledger.check_acceptable(m, ceiling=cfg.ceiling)
        known = ledger.manifest(m.root) is not None
        owed = _owed(ledger, m, retry_failed)
    if not known and owed and _reads_bitmap(c, cfg):
        # What the batch contract's bitmap says this payer paid of it, as the real run reads
        # it first (a lost ledger, or the manifest paid from another machine's ledger).
        words = c.paid_words(cfg.batch_contract, payer, cfg.token, m.root,
                             list(range((m.count + 255) // 256)))
        owed = [p for p in owed if not words[p.index // 256] >> (p.index % 256) & 1]
    if not known and (latest if first is None else first) != 0:
        typer.echo("note: this ledger does not know this manifest and did not see the payer's "
                   "first transaction: the real run first reads the payer's past transfers "
                   "and stops, sending nothing, if any may be these payments", err=True)
    total = sum(p.amount for p in owed)
    if owed:
        try:
            check_funds(c, cfg, payer, len(owed), total)
        except FundsShortfall as e:
            if known:
                raise
            typer.echo(f"warning: {e} (if this manifest was partly paid before this ledger "
                       "existed, a real run pays only the rest)", err=True)
    batches = (len(owed) + cfg.batch_size - 1) // cfg.batch_size if cfg.mode.value == "batch" \
        else len(owed)
    typer.echo(f"dry run: would pay {len(owed)} of {m.count} payments, "
               f"{format_units(total, s.decimals)} tokens, in about {batches} transaction(s) "
               f"({cfg.mode.value} mode) from {m.payer}; nothing was sent")


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after its current step."""

    def __init__(self) -> None:
        self.stopped = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.stopped:  # a second Ctrl-C: the operator means it
            raise KeyboardInterrupt
        self.stopped = True
        typer.echo("\nstopping after the current step (Ctrl-C again to abort now)", err=True)

    def __call__(self) -> bool:
        return self.stopped


class _ProgressPrinter:
    """One status line on stderr: payments done, amount paid, rate."""

    def __init__(self, decimals: int) -> None:
        self.decimals = decimals
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.first_done: int | None = None
        self.started: float | None = None
        self.shown = False

    def __call__(self, p: Any, *, force: bool = False) -> None:
        from disburser.amounts import format_units

        now = time.monotonic()
        if self.first_done is None:
            self.first_done = p.done
            self.started = p.started
        if now - self.last < (0.2 if self.tty else 5.0) and p.done < p.total and not force:
            return
        self.last = now
        elapsed = max(now - p.started, 1e-6)
        rate = (p.done - self.first_done) / elapsed
        pct = 100.0 * p.done / p.total if p.total else 100.0
        line = (f"paid {p.done}/{p.total} ({pct:5.1f}%)  failed {p.failed}  "
                f"{format_units(p.amount_done, self.decimals)}/"
                f"{format_units(p.amount_total, self.decimals)} tokens  {rate:,.0f}/s")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.shown = True

    def stopped(self, p: Any) -> None:
        """A run that ends in an error: the line as it stands now, not as it stood at the
        last print (up to 5 s before, when stderr is a log file)."""
        if self.shown and p is not None:
            if self.started is not None:
                p.started = self.started
            self(p, force=True)
        self.done()

    def done(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", envvar=_env("JSON"),
                                          help="Machine-readable output.")] = False,
) -> None:
    """Payments by state, amounts paid and owed, transactions in flight, and the rate."""
    from disburser import ledger as lg
    from disburser.status import render_status, status_data

    s = _ledger_settings()
    if not lg.exists(s.db):
        raise InputError(f"DISBURSER_DB {s.db}: no ledger yet (nothing was sent)")  # a path
    data = status_data(_ledger(s), s)
    typer.echo(json.dumps(data, indent=2) if as_json else render_status(data))


@app.command()
def reconcile(
    ctx: typer.Context,
    manifests: Annotated[Optional[list[Path]], typer.Argument(  # noqa: UP045
        help="Manifest files to reconcile (besides those in the ledger).")] = None,
    program: Annotated[Optional[str], typer.Option(envvar=_env("PROGRAM"),  # noqa: UP045
                                                   help="Only this program.")] = None,
    no_ledger: Annotated[bool, typer.Option("--no-ledger", envvar=_env("NO_LEDGER"),
                                            help="Use the manifest files and "
                                                 "the chain only.")] = False,
    fmt: Annotated[Fmt, typer.Option("--format", envvar=_env("FORMAT"),
                                     help="Report format.")] = Fmt.table,
    output: Annotated[Optional[Path], typer.Option("-o", "--output",  # noqa: UP045
                                                   help="Write the report here.")] = None,
    from_block: Annotated[Optional[int], typer.Option(  # noqa: UP045
        envvar=_env("FROM_BLOCK"), help="Scan Transfer logs from this block.")] = None,
) -> None:
    """Compare what the chain shows was paid with the manifests and the ceiling."""
    from typer._click.core import ParameterSource

    from disburser.reconcile import run_reconcile

    s = settings() if no_ledger else _ledger_settings()
    if output is not None:
        _check_outputs([output], list(manifests or []))
    from_env = ctx.get_parameter_source("program") is ParameterSource.ENVIRONMENT
    text, code = run_reconcile(s, manifests or [], program=program, use_ledger=not no_ledger,
                               fmt=fmt.value, from_block=from_block, program_from_env=from_env)
    if program is not None and from_env:
        # The same variable scopes allocate and manifest build: say that it scopes this too
        # (after the run: a refusal stays one line).
        typer.echo(f"reconcile: program {program} only (DISBURSER_PROGRAM)", err=True)
    _out(text, output)
    if code:
        raise typer.Exit(code)


DEVNET_MARK = "# written by `disburser devnet`"


def _written_by_devnet(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(DEVNET_MARK)) == DEVNET_MARK.encode()
    except OSError:
        return False


@app.command()
def devnet(
    fork_url: Annotated[Optional[str], typer.Option(  # noqa: UP045
        envvar=_env("FORK_URL"), help="Fork this chain instead of starting an empty one.")
    ] = None,
    fork_block: Annotated[Optional[int], typer.Option(  # noqa: UP045
        envvar=_env("FORK_BLOCK"), help="Fork at this block (default: latest).")] = None,
    port: Annotated[int, typer.Option(envvar=_env("DEVNET_PORT"), help="Loopback port.")]
    = 8545,
    block_time: Annotated[Optional[int], typer.Option(  # noqa: UP045
        envvar=_env("BLOCK_TIME"), help="Seconds per block (default: mine on demand).")
    ] = None,
    env_out: Annotated[Path, typer.Option("--env-out", envvar=_env("ENV_OUT"),
                                          help="Write the settings here.")]
    = Path(".env.devnet"),
) -> None:
    """Start a local Anvil chain with a USDC at the mainnet address and a funded payer.

    With --fork-url the chain is a fork of another one: the real token's code is kept (the
    DISBURSER_TOKEN setting, default the profile's USDC) and the payer is funded with it."""
    from disburser import devnet as dn
    from disburser.chain import RpcChain, display_url
    from disburser.profiles import PROFILES

    if env_out.is_dir():
        raise InputError(f"{env_out}: is a directory (--env-out)")
    if not env_out.parent.is_dir():
        raise InputError(f"{env_out}: no such directory {env_out.parent} (--env-out)")
    if not os.access(env_out.parent, os.W_OK):
        raise InputError(f"{env_out}: the directory {env_out.parent} is not writable "
                         "(--env-out)")
    if env_out.exists() and not _written_by_devnet(env_out):
        raise InputError(f"{env_out}: exists and was not written by `disburser devnet`; "
                         "refusing to write over it (--env-out elsewhere, or move it away)")
    serving = False
    anvil = dn.Anvil(port=port, block_time=block_time, fork_url=fork_url,
                     fork_block=fork_block).start()
    try:
        payer = os.environ.get(_env("PAYER")) or None
        if payer:
            from disburser.manifest import check_address

            payer = check_address(payer, "DISBURSER_PAYER")
        if fork_url:
            token = os.environ.get(_env("TOKEN")) or _fork_token(RpcChain(anvil.url))
            d = dn.setup_fork(anvil.url, token=token, payer=payer)
        else:
            d = dn.setup(anvil.url, payer=payer)
        env = d.env()
        if fork_url:
            known = [p for p in PROFILES.values() if p.chain_id == d.chain_id and not p.local]
            decimals = RpcChain(anvil.url).decimals(d.token)
            env["DISBURSER_NETWORK"] = known[0].name if known else "anvil"
            env["DISBURSER_DECIMALS"] = str(decimals)
            # A rehearsal on a fork of a real network uses Anvil's dev payer key (unless a
            # real DISBURSER_PAYER was given: its keystore signs), and the fork mines only
            # on demand: one confirmation, fast polls.
            if "DISBURSER_PRIVATE_KEY" in env:
                env["DISBURSER_ALLOW_PLAIN_KEY"] = "1"
            env["DISBURSER_CONFIRMATIONS"] = "1"
            env["DISBURSER_POLL_INTERVAL"] = "0.1"
        # A ledger and a log of its own: a rehearsal's in the real run's default ledger
        # would read as paid what the real chain never saw.
        kind = "fork" if fork_url else "devnet"
        env.setdefault("DISBURSER_DB", f"disburser-{kind}.sqlite")
        env.setdefault("DISBURSER_LOG_FILE", f"disburser-{kind}.log.jsonl")
        lines = [f"{k}={v}" for k, v in env.items()]
        try:
            env_out.write_text(f"{DEVNET_MARK}; local chain only\n"
                               + "\n".join(lines) + "\n")
        except OSError as e:
            raise InputError(f"{env_out}: cannot write ({e.strerror}) (--env-out)") from None
        what = f"fork of {display_url(fork_url)}" if fork_url else "empty chain"
        typer.echo(f"anvil on {anvil.url} ({what}, chain {d.chain_id}); settings written to "
                   f"{env_out}:")
        for k, v in env.items():
            shown = "<dev key, see " + str(env_out) + ">" if k == "DISBURSER_PRIVATE_KEY" else v
            typer.echo(f"  export {k}={shown}")
        typer.echo("Ctrl-C stops the chain.")
        serving = True
        stop = {"flag": False}

        def _h(*_: Any) -> None:
            stop["flag"] = True

        signal.signal(signal.SIGINT, _h)
        signal.signal(signal.SIGTERM, _h)
        while not stop["flag"] and anvil.proc is not None and anvil.proc.poll() is None:
            time.sleep(0.2)
    finally:
        anvil.stop()
        if serving:  # a refusal before is its one line alone
            typer.echo("devnet stopped", err=True)


def _fork_token(c: Any) -> str:
    from disburser.profiles import PROFILES

    cid = c.chain_id()
    for p in PROFILES.values():
        if p.chain_id == cid and not p.local:
            return p.token
    return PROFILES["anvil"].token


# --- keys -----------------------------------------------------------------------------


@key_app.command("new")
def key_new(
    output: Annotated[Path, typer.Option("-o", "--output", help="Keystore file to write.")],
    # Not DISBURSER_PASSWORD_FILE: a new key must not be given the payer's password
    # silently because a .env names it.
    password_file: Annotated[Optional[str], typer.Option(  # noqa: UP045
        envvar=_env("NEW_KEY_PASSWORD_FILE"), help="File holding the new password.")] = None,
) -> None:
    """Create a new key in an encrypted V3 keystore (scrypt) and print its address."""
    from disburser import keys

    if output.exists():
        raise InputError(f"{output}: already exists; refusing to overwrite a keystore")
    pw = keys.read_password(None, password_file)
    if pw is None:
        if not sys.stdin.isatty():
            raise InputError("key new needs --password-file (or a terminal to prompt)")
        pw = typer.prompt("new keystore password", hide_input=True, confirmation_prompt=True)
    if len(pw) < 8:
        raise InputError("keystore password must be at least 8 characters")
    address = keys.new_keystore(output, pw)
    typer.echo(address)


@key_app.command("address")
def key_address(
    keystore: Annotated[Path, typer.Argument(help="V3 keystore file.")],
    password_file: Annotated[Optional[str], typer.Option(  # noqa: UP045
        envvar=_env("PASSWORD_FILE"), help="Password file (only if the keystore does not "
        "record its address).")] = None,
) -> None:
    """Print the address of a keystore."""
    from disburser import keys

    typer.echo(keys.keystore_address(keystore, password_file))


def _usage_fail(e: typer.TyperException) -> NoReturn:
    """A usage error (a missing argument, an unknown option, a bad value on the command line
    or in a DISBURSER_* variable) as one line, without typer's usage block. A group called
    without a command still shows its help."""
    from typer._click.exceptions import NoArgsIsHelpError

    if isinstance(e, NoArgsIsHelpError):
        raise e
    msg = e.format_message()
    path, keys = _state.get("dotenv", (None, []))
    named = [k for k in keys if f"(env var: '{k}')" in msg]
    if named:
        msg += f" (set in {path})"
    sys.stderr.write(f"disburser: error: {msg}\n")
    raise SystemExit(e.exit_code)


def _fail(e: BaseException, code: int) -> NoReturn:
    if _state.get("debug"):
        import traceback

        traceback.print_exception(e)
    sys.stderr.write(f"disburser: error: {e}\n")
    raise SystemExit(code)


def main() -> None:
    """Entry point (errors are handled by the app's boundary)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("disburser: aborted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
