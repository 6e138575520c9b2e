"""The machine and the versions a bench ran with."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

PACKAGES = ("web3", "eth-account", "coincurve", "sqlmodel", "structlog", "requests")


def _cpuinfo() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "unavailable"


def _git() -> str:
    rev = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return rev + (" (with uncommitted changes)" if dirty else "")


def describe() -> dict[str, Any]:
    from disburser.devnet import anvil_binary

    versions = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = "not installed"
    versions["anvil"] = _first_line([str(anvil_binary()), "--version"]).replace(
        "anvil Version: ", "")
    versions["solc"] = _first_line([str(ROOT / "node_modules/.bin/solcjs"), "--version"])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpuinfo(),
        "ram_gib": round(_ram_gib(), 1),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "commit": _git(),
    }
