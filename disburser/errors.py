"""The one exception tree of disburser.

Every error the operator can see is a ``DisburserError``; its ``str()`` is the one line
the CLI prints, and ``exit_code`` is what the process returns. Messages name the thing
at fault (file, row, setting, address, nonce) and never carry a key or a password.
"""

from __future__ import annotations


class DisburserError(Exception):
    """Root of every error disburser raises on purpose."""

    exit_code = 2


class InputError(DisburserError):
    """Bad input: a file, a row, a field or an option. Nothing was sent."""


class ManifestError(InputError):
    """A manifest that is malformed, tampered, unsigned, expired or for another chain."""


class SettingsError(InputError):
    """A DISBURSER_* setting is missing or invalid."""


class CeilingError(InputError):
    """Accepting this would take a program over its ceiling."""


class ChainMismatchError(DisburserError):
    """The chain, the token or its decimals are not what the settings say."""


class FailClosed(DisburserError):
    """The run stopped because continuing would mean guessing (foreign nonce, paused
    token, too little balance...). Fix the cause and run again: it resumes."""


class FundsShortfall(FailClosed):
    """The payer holds too few tokens, or too little for gas, for what is still owed."""


class LockedError(DisburserError):
    """Another disburser process holds the runner lock for this ledger or payer."""


class RpcError(DisburserError):
    """The node failed in a way that retries could not fix."""

    exit_code = 1


class LedgerUnavailable(DisburserError):
    """The ledger's database server cannot be reached (a shared PostgreSQL ledger)."""

    exit_code = 1


class Interrupted(DisburserError):
    """The operator asked the run to stop (SIGINT/SIGTERM); state is saved."""

    exit_code = 1
