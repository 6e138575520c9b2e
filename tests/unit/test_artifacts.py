"""The committed contract artifacts are what the pinned compiler makes of contracts/."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "disburser" / "artifacts"
EXPECTED = {p.stem for p in (ROOT / "contracts").glob("*.sol")}  # one artifact a source
NAMES = sorted(p.stem for p in ARTIFACTS.glob("*.json"))


def test_artifacts_match_the_sources() -> None:
    assert shutil.which("node"), "node is required to check the contract artifacts"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-contracts"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_every_contract_has_an_artifact() -> None:
    assert not EXPECTED - set(NAMES), f"missing in {ARTIFACTS}: {sorted(EXPECTED - set(NAMES))}"


@pytest.mark.parametrize("name", NAMES)
def test_artifact_is_complete(name: str) -> None:
    art = json.loads((ARTIFACTS / f"{name}.json").read_text())
    assert art["contractName"] == name
    assert isinstance(art["abi"], list) and art["abi"]
    for key in ("bytecode", "deployedBytecode"):
        code = art[key]
        assert code.startswith("0x") and len(code) > 2, key
        bytes.fromhex(code[2:])
    assert art["compiler"].startswith("solc-0.8.")
    assert len(art["sourceHash"]) == 64
    bytes.fromhex(art["sourceHash"])


def test_the_event_topics_the_engine_filters_on_are_the_contracts() -> None:
    from eth_utils import keccak

    from disburser.chain import DISBURSED_TOPIC, TRANSFER_TOPIC

    def topic(contract: str, event: str) -> str:
        abi = json.loads((ARTIFACTS / f"{contract}.json").read_text())["abi"]
        (e,) = [x for x in abi if x.get("type") == "event" and x["name"] == event]
        sig = f"{event}({','.join(i['type'] for i in e['inputs'])})"
        return "0x" + keccak(text=sig).hex()

    assert topic("BatchPayout", "Disbursed") == DISBURSED_TOPIC
    assert topic("TestUSDC", "Transfer") == TRANSFER_TOPIC
