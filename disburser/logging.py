"""structlog set-up: JSON lines to the log file, short human lines on the terminal for
warnings. Event names are stable snake_case (`transfer_broadcast`, nonce=..., tx_hash=...)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

_SECRET_KEYS = ("key", "password", "secret", "raw")


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]
            ) -> MutableMapping[str, Any]:
    """Defence in depth: no field whose name suggests a secret is ever written."""
    for k in list(event):
        if any(s in k.lower() for s in _SECRET_KEYS):
            event[k] = "<redacted>"
    return event


class _Tee:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def msg(self, message: str) -> None:
        self.file.write(message + "\n")
        self.file.flush()

    debug = info = warning = warn = error = critical = exception = log = msg


class _TerminalAndFile:
    """Every event goes to the file as JSON; warnings and errors also to stderr."""

    def __init__(self, path: Path) -> None:
        self.tee = _Tee(path)

    def __call__(self, _logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        import json

        line = json.dumps(event, default=str, sort_keys=True)
        self.tee.msg(line)
        if event.get("level") in ("warning", "error", "critical"):
            fields = " ".join(f"{k}={v}" for k, v in event.items()
                              if k not in ("event", "level", "timestamp", "logger"))
            sys.stderr.write(f"\n{event.get('level')}: {event.get('event')} {fields}\n")
        raise structlog.DropEvent


def configure(log_file: Path) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            _TerminalAndFile(log_file),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )


def quiet() -> None:
    """Tests and library use: drop every event."""
    structlog.configure(
        processors=[lambda *_: (_ for _ in ()).throw(structlog.DropEvent)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL + 1),
    )
