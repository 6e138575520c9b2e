"""One runner at a time: an exclusive lock per ledger file and per payer on this machine.
The lock file names its holder so that the second process can say who runs."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import IO

from disburser.errors import LockedError


def _lock_dir(override: str | None = None) -> Path:
    default = Path(tempfile.gettempdir()) / "disburser-locks"
    d = Path(override or os.environ.get("DISBURSER_LOCK_DIR") or default)
    d.mkdir(parents=True, exist_ok=True)
    return d


class RunnerLock:
    def __init__(self, db: Path | str, payer: str, chain_id: int,
                 lock_dir: str | None = None) -> None:
        db_s = str(db)
        paths = []
        if "://" not in db_s:
            # Resolved: the same ledger through a symbolic link takes the same lock.
            real = Path(db_s).resolve()
            paths.append(real.with_name(real.name + ".lock"))
        paths.append(_lock_dir(lock_dir) / f"payer-{chain_id}-{payer.lower()}.lock")
        self.paths = paths
        self._files: list[IO[str]] = []

    def __enter__(self) -> RunnerLock:
        me = f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv[:3])}"
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            f = p.open("a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                self.__exit__()
                raise LockedError(f"another disburser is running ({holder}); lock {p}") from None
            f.seek(0)
            f.truncate()
            f.write(me + "\n")
            f.flush()
            self._files.append(f)
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files:
            try:
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)
            finally:
                f.close()
        self._files = []
