"""Every command has help, every option has its DISBURSER_<NAME> variable (DESIGN.md) and
--help names it, and a usage error is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from disburser.cli import app

COMMANDS = [
    [], ["manifest"], ["manifest", "build"], ["manifest", "sign"], ["manifest", "verify"],
    ["manifest", "proof"], ["manifest", "typed-data"], ["manifest", "add-signature"],
    ["deploy"], ["send"], ["status"], ["reconcile"], ["devnet"], ["allocate"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help(cmd: list[str]) -> None:
    r = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) > 3


def test_send_help_shows_env_vars() -> None:
    r = CliRunner().invoke(app, ["send", "--help"], env={"COLUMNS": "200"})
    assert "DISBURSER_MODE" in r.output and "DISBURSER_YES" in r.output


def test_help_does_not_import_web3() -> None:
    code = ("import sys; sys.argv=['disburser','--help']\n"
            "from disburser.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "bad=[m for m in ('web3','eth_account','sqlmodel') if m in sys.modules]\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# Options without DISBURSER_<NAME> (cli._env says why), and those named otherwise.
NO_ENVVAR = {("allocate", "--output"), ("manifest build", "--output"),
             ("reconcile", "--output"), ("key new", "--output"), ("manifest sign", "--keystore"),
             ("send", "--accept-past-transfers")}
OTHER_NAME = {("devnet", "--port"): "DISBURSER_DEVNET_PORT",
              ("manifest sign", "--password-file"): "DISBURSER_APPROVER_PASSWORD_FILE",
              ("key new", "--password-file"): "DISBURSER_NEW_KEY_PASSWORD_FILE"}


def _options() -> list[tuple[str, str, object]]:
    """(command path, long option name, its envvar) for every option of every command."""
    out: list[tuple[str, str, object]] = []

    def walk(cmd: typer.core.TyperCommand | typer.core.TyperGroup, path: str) -> None:
        for p in cmd.params:
            if p.param_type_name == "option" and "--help" not in p.opts:
                long = max(p.opts, key=len)
                out.append((path, long, p.envvar))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return out


def test_every_option_has_its_environment_variable() -> None:
    options = _options()
    assert len(options) > 30
    for path, long, envvar in options:
        if (path, long) in NO_ENVVAR:
            assert envvar is None, (path, long)
            continue
        want = OTHER_NAME.get((path, long),
                              "DISBURSER_" + long.removeprefix("--").upper().replace("-", "_"))
        assert envvar == want, (path, long, envvar)
    assert NO_ENVVAR | set(OTHER_NAME) <= {(p, o) for p, o, _ in options}


@pytest.mark.parametrize("path", sorted({p for p, _, _ in _options()}), ids=lambda p: p or "root")
def test_help_names_every_variable(path: str) -> None:
    r = CliRunner().invoke(app, [*path.split(), "--help"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the help is wrapped to the terminal's width
    for p, _long, envvar in _options():
        if p == path and envvar:
            assert f"env var: {envvar}" in text, (path, envvar)


@pytest.mark.parametrize("args, env, message", [
    (["send"], {}, "Missing argument 'manifest'."),
    (["send", "m.json", "--bogus"], {}, "No such option: --bogus"),
    (["send", "m.json", "--mode", "sideways"], {},
     "Invalid value for '--mode' (env var: 'DISBURSER_MODE'): Value error, 'sideways' is not "
     "one of 'batch', 'direct'."),
    (["send", "m.json"], {"DISBURSER_DRY_RUN": "maybe"},
     "Invalid value for '--dry-run' (env var: 'DISBURSER_DRY_RUN'): Input should be a valid "
     "boolean, unable to interpret input"),
    (["reconcile"], {"DISBURSER_FORMAT": "pdf"},
     "Invalid value for '--format' (env var: 'DISBURSER_FORMAT'): Value error, 'pdf' is not "
     "one of 'table', 'json', 'csv', 'html'."),
])
def test_usage_error_is_one_line(args: list[str], env: dict[str, str], message: str,
                                 tmp_path: Path) -> None:
    """The console script's path (a real process): exit 2, one line, no usage block."""
    r = subprocess.run([sys.executable, "-m", "disburser.cli", *args], capture_output=True,
                       text=True, env={**_clean_env(), **env}, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"disburser: error: {message}\n"
    assert r.stdout == ""


def test_root_usage_error_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "--bogus", "status"],
                       capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, "disburser: error: No such option: --bogus\n")


def test_no_arguments_still_shows_the_help(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "manifest"],
                       capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("Usage: ") and "sign" in r.stderr


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("DISBURSER_")}


def test_option_variables_from_the_env_file(tmp_path: Path) -> None:
    """The .env file feeds the options' variables too, and a bad value there says so."""
    (tmp_path / ".env").write_text("DISBURSER_FORMAT=pdf\n")
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "reconcile"], cwd=tmp_path,
                       capture_output=True, text=True, env=_clean_env())
    assert r.returncode == 2
    assert r.stderr == ("disburser: error: Invalid value for '--format' (env var: "
                        "'DISBURSER_FORMAT'): Value error, 'pdf' is not one of 'table', "
                        "'json', 'csv', 'html'. (set in .env)\n")


@pytest.mark.parametrize("value, traceback", [("1", True), ("0", False)])
def test_debug_from_the_env_file(tmp_path: Path, value: str, traceback: bool) -> None:
    """--debug is parsed before .env is read; its variable in the file still counts."""
    (tmp_path / ".env").write_text(f"DISBURSER_DEBUG={value}\nDISBURSER_DB=none.sqlite\n")
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "status"], cwd=tmp_path,
                       capture_output=True, text=True, env=_clean_env())
    assert r.returncode == 2
    assert r.stderr.rstrip().endswith("disburser: error: DISBURSER_DB none.sqlite: no ledger "
                                      "yet (nothing was sent)")
    assert ("Traceback" in r.stderr) is traceback


def test_bad_debug_in_the_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DISBURSER_DEBUG=maybe\n")
    r = subprocess.run([sys.executable, "-m", "disburser.cli", "status"], cwd=tmp_path,
                       capture_output=True, text=True, env=_clean_env())
    assert (r.returncode, r.stderr) == (
        2, "disburser: error: .env: DISBURSER_DEBUG: 'maybe' is not a boolean (1 or 0)\n")


def test_a_run_that_stops_prints_its_progress_as_it_stands(
        capsys: pytest.CaptureFixture[str]) -> None:
    """With stderr a log file the progress line is printed every 5 s; a run that ends in an
    error prints it once more, as the ledger holds it then (not as it stood up to 5 s
    before), with the rate from the run's start."""
    from disburser.cli import _ProgressPrinter
    from disburser.sender import Progress

    printer = _ProgressPrinter(6)
    printer(Progress(total=80, done=0, amount_total=334_000_000, started=100.0))
    printer(Progress(total=80, done=10, amount_done=1, amount_total=334_000_000))  # throttled
    printer.stopped(Progress(total=80, done=24, amount_done=100_000_000,
                             amount_total=334_000_000))
    lines = capsys.readouterr().err.splitlines()
    assert [x.split(")")[0] for x in lines] == ["paid 0/80 (  0.0%", "paid 24/80 ( 30.0%"]
    assert "100/334 tokens" in lines[-1]
    silent = _ProgressPrinter(6)  # nothing shown yet: nothing to correct
    silent.stopped(Progress(total=80, done=24))
    assert capsys.readouterr().err == ""
