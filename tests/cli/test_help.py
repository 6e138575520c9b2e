"""Every command has help, and --help names the DISBURSER_* variable of each option."""

from __future__ import annotations

import subprocess
import sys

import pytest
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
