"""The synthetic input generator is deterministic and its output allocates as it says."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from disburser.allocate import Policy, allocate

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gen_eligibility.py"
FILES = ("liquidations.csv", "snapshot.csv", "compensated.csv", "addresses.csv", "factors.csv")


def generate(out: Path, *extra: str, users: int = 400, rows: int = 1200, seed: int = 3) -> Path:
    subprocess.run(
        [sys.executable, str(SCRIPT), "--users", str(users), "--rows", str(rows),
         "--seed", str(seed), "--out", str(out), *extra],
        check=True,
    )  # fmt: skip
    return out


def contents(d: Path) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in (*FILES, "expected.csv")}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = contents(generate(tmp_path / "a"))
    assert a == contents(generate(tmp_path / "b"))
    assert a["liquidations.csv"] != contents(generate(tmp_path / "c", seed=4))["liquidations.csv"]
    other = contents(generate(tmp_path / "d", "--address-seed", "elsewhere"))
    assert other["addresses.csv"] != a["addresses.csv"]
    assert other["liquidations.csv"] == a["liquidations.csv"]


def test_exactly_the_rows_asked_for_amounts_with_two_places(tmp_path: Path) -> None:
    out = generate(tmp_path / "g", users=500, rows=2000)
    with open(out / "liquidations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2000
    products = {r["product"] for r in rows}
    assert {"futures", "margin", "spot", "options"} <= products
    random_rows = [r for r in rows if r["loss_usd"].count(".") == 1]
    assert all(len(r["loss_usd"].split(".")[1]) == 2 for r in random_rows)
    assert any(r["time"].endswith("+00:00") for r in rows)


def test_output_allocates_and_boundary_users_get_their_expected_reason(tmp_path: Path) -> None:
    out = generate(tmp_path / "g", users=3000, rows=9000)
    alloc = allocate(*(out / name for name in FILES), Policy())
    reasons = {d.user_id: str(d.reason) for d in alloc.decisions}
    with open(out / "expected.csv", newline="") as f:
        expected = {r["user_id"]: r["expected_reason"] for r in csv.DictReader(f)}
    assert len(expected) > 30
    assert {uid: reasons[uid] for uid in expected} == expected
    assert len(alloc.decisions) == 3000
    assert alloc.total <= alloc.fund
    seen = set(reasons.values())
    assert {"in_manifest", "below_loss_ratio", "below_min_loss", "outside_window",
            "compensated", "no_snapshot", "no_address", "invalid_address"} <= seen  # fmt: skip
