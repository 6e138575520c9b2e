"""`disburser allocate` end to end through the CLI: the manifest header comes from the
settings, output is byte-identical run to run, bad input is one line and exit 2."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from disburser import devnet as dn
from disburser import manifest as mf
from disburser.cli import app
from tests.conftest import ROOT

ENV = {"DISBURSER_ENV_FILE": "/dev/null", "DISBURSER_PAYER": dn.PAYER,
       "DISBURSER_NOT_AFTER": "2000000000"}


def _gen(out: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_eligibility.py"), "--users", "300",
                    "--rows", "900", "--seed", "11", "--out", str(out)], check=True,
                   capture_output=True)
    return out


def _allocate(data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [
        "allocate", str(data / "liquidations.csv"), str(data / "snapshot.csv"),
        "--compensated", str(data / "compensated.csv"), "--addresses",
        str(data / "addresses.csv"), "--factors", str(data / "factors.csv"),
        "--program", "together-initiative-2025-10", "-o", str(out / "m.json"),
        "--report", str(out / "eligibility.csv"), *extra], env=ENV, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_allocate_writes_manifest_and_report_deterministically(tmp_path: Path) -> None:
    data = _gen(tmp_path / "data")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code, out, err = _allocate(data, tmp_path / "a")
    assert code == 0, err
    assert _allocate(data, tmp_path / "b")[0] == 0
    for f in ("m.json", "eligibility.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    m = mf.load(tmp_path / "a" / "m.json")
    assert (m.chain_id, m.token, m.payer, m.not_after) == (
        31337, "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", dn.PAYER, 2_000_000_000)
    assert m.signatures == ()
    rows = list(csv.DictReader((tmp_path / "a" / "eligibility.csv").open()))
    in_manifest = [r for r in rows if r["reason"] == "in_manifest"]
    assert len(in_manifest) == m.count
    assert {p.id for p in m.payments} == {r["user_id"] for r in in_manifest}
    # the generator's boundary users got exactly the reasons it expects
    expected = {r["user_id"]: r["expected_reason"]
                for r in csv.DictReader((data / "expected.csv").open())}
    got = {r["user_id"]: r["reason"] for r in rows}
    assert {u: got[u] for u in expected} == expected
    assert f"paymentsRoot    {m.root}" in out


def test_allocate_bad_row_is_one_line_exit_2(tmp_path: Path) -> None:
    data = _gen(tmp_path / "data")
    liq = data / "liquidations.csv"
    lines = liq.read_text().splitlines()
    user = lines[3].split(",")[0]
    lines[3] = f"{user},2025-10-10T12:00:00+02:00,futures,100"
    liq.write_text("\n".join(lines) + "\n")
    code, _, err = _allocate(data, tmp_path)
    assert code == 2
    assert err == (f"disburser: error: {liq}:4: time: '2025-10-10T12:00:00+02:00' is not UTC "
                   "(write Z or +00:00)\n")
    assert not (tmp_path / "m.json").exists()


def test_allocate_over_the_ceiling_is_refused(tmp_path: Path) -> None:
    data = _gen(tmp_path / "data")
    r = CliRunner().invoke(app, [
        "allocate", str(data / "liquidations.csv"), str(data / "snapshot.csv"),
        "--compensated", str(data / "compensated.csv"), "--addresses",
        str(data / "addresses.csv"), "--program", "p", "-o", str(tmp_path / "m.json")],
        env={**ENV, "DISBURSER_CEILING": "100"}, catch_exceptions=False)
    assert r.exit_code == 2
    assert "exceeds the ceiling 100000000 of program p" in r.stderr
    assert not (tmp_path / "m.json").exists()
