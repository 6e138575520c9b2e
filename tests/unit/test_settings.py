from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from disburser import settings as st
from disburser.errors import InputError, SettingsError

ROOT = Path(__file__).resolve().parents[2]


def test_env_example_documents_every_setting() -> None:
    used: set[str] = set()
    for p in (ROOT / "disburser").rglob("*.py"):
        used |= set(re.findall(r"DISBURSER_[A-Z_]+[A-Z]", p.read_text()))
    # _env("NAME") in cli.py builds DISBURSER_NAME
    used |= {"DISBURSER_" + n for n in re.findall(r'_env\("([A-Z_]+)"\)',
                                                   (ROOT / "disburser/cli.py").read_text())}
    used |= {"DISBURSER_" + n for n in re.findall(r'_[a-z]+\(env, "([A-Z_]+)"',
                                                   (ROOT / "disburser/settings.py").read_text())}
    used -= {"DISBURSER_"}
    documented = set(re.findall(r"DISBURSER_[A-Z_]+[A-Z]", (ROOT / ".env.example").read_text()))
    assert used - documented == set()
    # and every one is known, so that no variable disburser reads is refused as a misspelling
    import typer

    from disburser.cli import app, known_variables

    assert used - known_variables(typer.main.get_command(app)) == set()


def test_defaults_and_ceilings() -> None:
    s = st.load({})
    assert s.network.name == "anvil" and s.chain_id == 31337 and s.decimals == 6
    assert s.ceilings.for_program("x") == 300_000_000 * 10**6
    c = st.parse_ceilings("relief=300000000,loans=100000000,*=0", 6)
    assert c.for_program("relief") == 3 * 10**14
    assert c.for_program("loans") == 10**14
    assert c.for_program("other") == 0
    # Named programs only: any other is refused, not given the default.
    c = st.parse_ceilings("relief=300000000,loans=100000000", 6)
    assert c.for_program("loans") == 10**14
    with pytest.raises(SettingsError, match="DISBURSER_CEILING: no ceiling for program "
                       "'releif' \\(it names loans, relief\\)"):
        c.for_program("releif")
    assert st.parse_ceilings("loans=1,7", 6).for_program("x") == 7 * 10**6
    assert st.parse_ceilings("", 6).for_program("x") == 300_000_000 * 10**6


@pytest.mark.parametrize("env, message", [
    ({"DISBURSER_NETWORK": "moon"}, "DISBURSER_NETWORK: unknown network 'moon' (one of anvil, "
     "ethereum, arbitrum, base, bnb)"),
    ({"DISBURSER_QUORUM": "0"}, "DISBURSER_QUORUM: must be at least 1, got 0"),
    ({"DISBURSER_APPROVERS": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
      "DISBURSER_QUORUM": "2"}, "DISBURSER_QUORUM: 2 is more than the 1 configured approvers"),
    ({"DISBURSER_TOKEN": "0x1234"}, "DISBURSER_TOKEN: '0x1234' is not a 0x-prefixed 20-byte "
     "address"),
    ({"DISBURSER_CEILING": "1.5x"}, "DISBURSER_CEILING: amount '1.5x' is not a plain decimal "
     "number"),
    ({"DISBURSER_MAX_FEE_GWEI": "1.0000000001"}, "DISBURSER_MAX_FEE_GWEI: amount "
     "'1.0000000001' has more than 9 decimal places"),
])
def test_bad_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(InputError) as e:  # SettingsError or an amount's InputError
        st.load(env)
    assert str(e.value) == message


def test_secrets_not_in_repr() -> None:
    s = st.load({"DISBURSER_PRIVATE_KEY": "0x" + "ab" * 32, "DISBURSER_KEYSTORE_PASSWORD": "pw"})
    assert "abab" not in repr(s) and "'pw'" not in repr(s)


def test_bnb_profile_expects_18_decimals() -> None:
    s = st.load({"DISBURSER_NETWORK": "bnb"})
    assert s.decimals == 18 and s.chain_id == 56
    assert s.token == "0x8AC76a51cc950d9822D68b83fE1Ad97B32Cd580d"


@pytest.mark.parametrize("value, message", [
    ("٢", "DISBURSER_QUORUM: '٢' is not an integer"),  # Arabic-Indic two: int() takes it
    ("２", "DISBURSER_QUORUM: '２' is not an integer"),  # fullwidth two
    ("1_0", "DISBURSER_QUORUM: '1_0' is not an integer"),
    ("9" * 5000, "DISBURSER_QUORUM: has 5000 digits, more than any setting takes"),
], ids=["arabic-indic", "fullwidth", "underscore", "5000-digits"])
def test_integer_settings_take_ascii_digits_only(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as e:
        st.load({"DISBURSER_APPROVERS": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8,"
                 "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "DISBURSER_QUORUM": value})
    assert str(e.value) == message


def test_integer_settings_still_take_plain_digits() -> None:
    s = st.load({"DISBURSER_QUORUM": " 1 ", "DISBURSER_CONFIRMATIONS": "12",
                 "DISBURSER_FROM_BLOCK": "0"})
    assert (s.quorum, s.confirmations, s.from_block) == (1, 12, 0)


@pytest.mark.parametrize("line, value", [
    ("DISBURSER_DB=prod.sqlite # moved 2026-11-20", "prod.sqlite"),
    ("DISBURSER_DB=prod.sqlite\t# moved", "prod.sqlite"),
    ("DISBURSER_DB='prod ledger.sqlite' # moved", "prod ledger.sqlite"),
    ('DISBURSER_DB="a #b.sqlite"', "a #b.sqlite"),
    ("DISBURSER_DB=a#b.sqlite", "a#b.sqlite"),  # no space before #: the shell keeps it too
    ("DISBURSER_DB=", ""),
    ("DISBURSER_DB= # set on the day", ""),
    ("DISBURSER_DB=#1.sqlite", "#1.sqlite"),
    ("DISBURSER_DB=''", ""),
], ids=["comment", "tab-comment", "quoted-comment", "hash-in-quotes", "hash-in-word",
        "empty", "comment-only", "hash-first", "empty-quotes"])
def test_env_file_values_are_read_as_the_shell_reads_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, value: str) -> None:
    """An inline comment was part of the value: a DISBURSER_DB so written named a new,
    empty ledger."""
    monkeypatch.delenv("DISBURSER_DB", raising=False)
    f = tmp_path / "x.env"
    f.write_text(line + "\n")
    assert st.load_dotenv(f) == {"DISBURSER_DB": 1}
    assert os.environ["DISBURSER_DB"] == value


@pytest.mark.parametrize("line, message", [
    ('DISBURSER_DB="prod.sqlite', "the value opens a quote it does not close"),
    ("DISBURSER_DB='prod'.sqlite", "text after the value's closing quote (quote the whole "
     "value, or put a comment after a space and #)"),
    ('DISBURSER_DB="prod"#2.sqlite', "text after the value's closing quote (quote the whole "
     "value, or put a comment after a space and #)"),
], ids=["unclosed", "after-quote", "hash-after-quote"])
def test_env_file_values_with_broken_quotes_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, message: str) -> None:
    monkeypatch.delenv("DISBURSER_DB", raising=False)
    f = tmp_path / "x.env"
    f.write_text("# ledger\n" + line + "\n")
    with pytest.raises(SettingsError) as e:
        st.load_dotenv(f)
    assert str(e.value) == f"{f}:2: DISBURSER_DB: {message}"


@pytest.mark.parametrize("value, on", [
    ("1", True), ("true", True), ("TRUE", True), (" Yes ", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("OFF", False), ("", False), (" ", False),
])
def test_on_off_settings_read_every_usual_spelling(value: str, on: bool) -> None:
    """TRUE and on read as off."""
    assert st.load({"DISBURSER_ALLOW_PLAIN_KEY": value}).allow_plain_key is on


@pytest.mark.parametrize("env, message", [
    ({"DISBURSER_ALLOW_PLAIN_KEY": "0n"}, "DISBURSER_ALLOW_PLAIN_KEY: '0n' is neither on (1, "
     "true, yes, on) nor off (0, false, no, off)"),
    ({"DISBURSER_CONFIRMATIONS": "10001"}, "DISBURSER_CONFIRMATIONS: must be at most 10000, "
     "got 10001"),
    ({"DISBURSER_POLL_INTERVAL": "1e-300"}, "DISBURSER_POLL_INTERVAL: '1e-300' is not a "
     "number of seconds"),
    ({"DISBURSER_POLL_INTERVAL": "nan"}, "DISBURSER_POLL_INTERVAL: 'nan' is not a number of "
     "seconds"),
    ({"DISBURSER_RPC_TIMEOUT": "٣٠"}, "DISBURSER_RPC_TIMEOUT: '٣٠' is not a number of seconds"),
    ({"DISBURSER_RPC_TIMEOUT": "0.0001"}, "DISBURSER_RPC_TIMEOUT: must be between 0.001 and "
     "3600 seconds, got 0.0001"),
    ({"DISBURSER_POLL_INTERVAL": "3600.5"}, "DISBURSER_POLL_INTERVAL: must be between 0.001 "
     "and 3600 seconds, got 3600.5"),
], ids=["flag", "confirmations", "tiny-exponent", "nan", "arabic-indic", "too-small",
        "too-large"])
def test_settings_that_would_silently_misbehave_are_refused(env: dict[str, str],
                                                           message: str) -> None:
    with pytest.raises(SettingsError) as e:
        st.load(env)
    assert str(e.value) == message


def test_seconds_settings_still_take_plain_decimals() -> None:
    s = st.load({"DISBURSER_POLL_INTERVAL": " 0.05 ", "DISBURSER_RPC_TIMEOUT": ".5",
                 "DISBURSER_CONFIRMATIONS": "10000"})
    assert (s.poll_interval, s.rpc_timeout, s.confirmations) == (0.05, 0.5, 10_000)


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:pw-1@h/db", "postgresql://u:***@h/db"),
    ("postgresql://:pw-1@h/db", "postgresql://:***@h/db"),  # no user name: was shown whole
    ("postgresql://u:p/w@h/db", "postgresql://u:***@h/db"),  # a / in the password
    ("postgresql://u@h/db?password=pw-1&sslmode=require",
     "postgresql://u@h/db?password=***&sslmode=require"),  # libpq's query parameter
    ("postgresql://u@h/db?sslmode=require&sslpassword=pw-1", "postgresql://u@h/db?"
     "sslmode=require&sslpassword=***"),
    ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
])
def test_urls_in_messages_hide_every_password(url: str, shown: str) -> None:
    assert st.redact_url(url) == shown
