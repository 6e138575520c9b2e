"""Compiled contract artifacts (ABI and bytecode), written by scripts/build-contracts so
that running disburser needs no compiler."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

_DIR = Path(__file__).parent


@cache
def load_artifact(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((_DIR / f"{name}.json").read_text())
    return doc
