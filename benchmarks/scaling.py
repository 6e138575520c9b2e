"""4. Scaling: 1,000 / 10,000 / 100,000 payments in batch mode, each on a fresh Anvil.

The send runs in a child process (``benchmarks.sendproc``) that reports its own peak RSS
(VmHWM; see ``benchmarks.peak`` for why not ``ru_maxrss`` from outside); Anvil is started by
this process, not by the child. Then: the ledger's size on disk, `reconcile`
(``reconcile.run_reconcile`` with the ledger, JSON output: log fetch, hand decoding,
matching, rendering) against the same chain, and the allocation of 1,000,000 liquidation
rows (``scripts/gen_eligibility.py``, then the `disburser allocate` command in a child
process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    Ctx,
    bench_env,
    fresh_devnet,
    median,
    nudger_paused,
    signed_manifest,
)


def run_child(args: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> tuple[str, float]:
    """Run a child process to the end; its stdout and wall seconds."""
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})},
                       cwd=cwd or ROOT)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(args[:4])} exited {p.returncode}: {p.stderr[-2000:]}")
    return p.stdout, wall


def _db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))
               if p.exists())


def _reconcile(env: dict[str, str], n: int, runs: int) -> dict[str, Any]:
    from disburser import ledger, reconcile, report, settings  # noqa: F401 - before the clock

    s = settings.load(env)
    with nudger_paused():
        times = _reconcile_runs(s, n, runs)
    return {"seconds": median(times), "samples": [round(t, 3) for t in times]}


def _reconcile_runs(s: Any, n: int, runs: int) -> list[float]:
    from disburser.reconcile import run_reconcile

    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        text, code = run_reconcile(s, [], program=None, use_ledger=True, fmt="json",
                                   from_block=None)
        times.append(time.perf_counter() - t0)
        doc = json.loads(text)
        assert code == 0 and doc["counts"]["paid"] == n, (code, doc["counts"])
    return times


def one_size(ctx: Ctx, n: int) -> dict[str, Any]:
    """Send n payments on a fresh Anvil in a child process, then reconcile them."""
    work = ctx.dir(f"scaling-{n}")
    with fresh_devnet() as d:
        path = signed_manifest(d, n, work / "manifest.json", seed=f"scale-{n}")
        env = bench_env(d, work)
        env_file = work / "env.json"
        env_file.write_text(json.dumps(env))
        out, wall = run_child([sys.executable, "-m", "benchmarks.sendproc", str(env_file),
                               str(path), "batch"])
        r = json.loads(out.strip().splitlines()[-1])
        rss = r["peak_rss"]
        assert r["confirmed"] == n, f"scaling {n}: confirmed {r['confirmed']}"
        rec = _reconcile(env, n, ctx.runs)
    res = {
        "n": n, "send_seconds": r["total"], "run_seconds": r["run"], "load_seconds": r["load"],
        "accept_seconds": r["accept"], "process_seconds": wall,
        "ms_per_payment": 1000 * r["total"] / n, "rate": n / r["total"],
        "ledger_bytes": _db_bytes(work / "ledger.sqlite"),
        "log_bytes": (work / "disburser.log.jsonl").stat().st_size,
        "peak_rss": rss, "reconcile_seconds": rec["seconds"], "reconcile_samples": rec["samples"],
        "ledger_path": str(work / "ledger.sqlite"),
    }
    ctx.log(f"  scaling n={n}: {res['ms_per_payment']:.3f} ms/payment, ledger "
            f"{res['ledger_bytes'] / 1e6:.1f} MB, peak RSS {rss / 2**20:.0f} MiB, reconcile "
            f"{rec['seconds']:.2f} s")
    return res


def _allocation(ctx: Ctx) -> dict[str, Any]:
    rows = 20_000 if ctx.quick else 1_000_000
    users = rows * 3 // 10  # ~3.3 liquidation rows per user
    data = ctx.dir("allocation")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "scripts/gen_eligibility.py", "--users", str(users),
                    "--rows", str(rows), "--seed", "1", "--out", str(data)], cwd=ROOT,
                   check=True, capture_output=True)
    gen = time.perf_counter() - t0
    env = {"DISBURSER_PAYER": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
           "PYTHONPATH": str(ROOT)}
    peak_file = data / "peak"
    times, rss = [], []
    for _ in range(ctx.runs):
        # `disburser allocate ...` as the console script runs it (disburser.cli:main), in a
        # new process, through benchmarks.peak for its peak RSS.
        out, wall = run_child(
            [sys.executable, "-m", "benchmarks.peak", str(peak_file), "disburser.cli:main",
             "--env-file", "/dev/null", "allocate", "liquidations.csv",
             "snapshot.csv", "--compensated", "compensated.csv", "--addresses",
             "addresses.csv", "--factors", "factors.csv", "--program", "bench",
             "-o", "manifest.json", "--report", "eligibility.csv"], env=env, cwd=data)
        times.append(wall)
        rss.append(int(peak_file.read_text()))
    count = next(int(line.split()[2]) for line in out.splitlines()
                 if line.startswith("in manifest"))
    res = {"rows": rows, "users": users, "seconds": median(times), "peak_rss": max(rss),
           "payments": count, "generate_seconds": gen}
    ctx.log(f"  allocate {rows:,} rows ({users:,} users -> {count:,} payments): "
            f"{res['seconds']:.1f} s, peak RSS {max(rss) / 2**20:.0f} MiB")
    return res


def run(ctx: Ctx) -> dict[str, Any]:
    sizes = (200, 1_000) if ctx.quick else (1_000, 10_000, 100_000)
    out: dict[str, Any] = {"sizes": [one_size(ctx, n) for n in sizes]}
    out["allocation"] = _allocation(ctx)
    ctx.shared["ledgers"] = {s["n"]: s["ledger_path"] for s in out["sizes"]}
    return out
