"""Data flows one way: cli -> services -> {ledger, chain, policy} -> {domain, errors}.
This test reads the imports and fails on an arrow pointing back up."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "disburser"

# A module may import only modules of a strictly lower layer (or its own layer's peers
# listed explicitly below).
LAYER = {
    "errors": 0, "domain": 0, "addresses": 0, "csvcell": 0,
    "amounts": 1, "profiles": 1, "policy": 1, "merkle": 1,
    "artifacts": 1, "broadcast": 1,
    "settings": 2, "manifest": 2, "logging": 2, "chain": 2, "keys": 2,
    "ledger": 3, "locks": 3, "transfers": 3, "allocate": 3, "devnet": 3,
    "history": 4,
    "sender": 5, "reconcile": 5, "report": 5, "status": 5,
    "cli": 6,
}
SAME_LAYER_OK = {("report", "reconcile"), ("reconcile", "report")}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("disburser"):
            parts = node.module.split(".")
            if len(parts) > 1:
                out.add(parts[1])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("disburser."):
                    out.add(a.name.split(".")[1])
    return out


def test_every_module_has_a_layer() -> None:
    mods = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"} | {"artifacts"}
    assert mods <= set(LAYER), f"unlayered modules: {mods - set(LAYER)}"


def test_imports_point_down() -> None:
    bad = []
    for p in PKG.glob("*.py"):
        if p.stem == "__init__":
            continue
        for dep in _imports(p):
            if dep not in LAYER or (p.stem, dep) in SAME_LAYER_OK:
                continue
            if LAYER[dep] >= LAYER[p.stem] and dep != p.stem:
                bad.append(f"{p.stem} -> {dep}")
    assert not bad, "imports pointing up or sideways: " + ", ".join(sorted(bad))


def test_only_chain_talks_to_the_node_and_only_ledger_opens_sessions() -> None:
    for p in PKG.glob("*.py"):
        text = p.read_text()
        if p.stem != "chain":
            assert "import requests" not in text and "from web3" not in text, p.name
        if p.stem != "ledger":
            assert "sqlmodel" not in text and "sqlalchemy" not in text, p.name
