"""5. Start-up: wall time of `disburser --help` and `disburser status` (the installed console
script, a new process each time, median of 5). `status` reads the biggest ledger the
scaling step left (or a small one made here)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Ctx, median

RUNS = 5


def _time(args: list[str], env: dict[str, str], runs: int) -> list[float]:
    import os

    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(args, env={**os.environ, **env}, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out.append(time.perf_counter() - t0)
    return out


def run(ctx: Ctx) -> dict[str, Any]:
    from disburser.devnet import free_port

    exe = str(Path(sys.executable).parent / "disburser")
    ledgers: dict[int, str] = ctx.shared.get("ledgers", {})
    if not ledgers:  # run alone (--only startup): make a small ledger
        from benchmarks.scaling import one_size

        ledgers = {1_000: one_size(ctx, 1_000)["ledger_path"]}
    n = max(ledgers)
    # No node behind the URL: status shows the ledger without the allowance (it tries the
    # node once, without retries), as on an operator's laptop.
    env = {"DISBURSER_DB": ledgers[n], "DISBURSER_RPC_URL": f"http://127.0.0.1:{free_port()}",
           "DISBURSER_ENV_FILE": "/dev/null"}
    runs = 3 if ctx.quick else RUNS
    help_t = _time([exe, "--help"], env, runs)
    status_t = _time([exe, "status"], env, runs)
    ctx.log(f"  --help {median(help_t):.3f} s, status ({n:,} payments) {median(status_t):.3f} s")
    return {"help": median(help_t), "help_samples": [round(t, 3) for t in help_t],
            "status": median(status_t), "status_samples": [round(t, 3) for t in status_t],
            "status_ledger_payments": n}
