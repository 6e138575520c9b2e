"""The hot path of a batch-mode send under cProfile (stdlib): the same in-process `send` as
the throughput step, on a fresh Anvil. Reports disburser's own functions by cumulative time
(as a share of ``Sender.run``) and every function by own time; the raw profile is kept
next to the run's other files (open it with ``python -m pstats``)."""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Ctx, bench_env, fresh_devnet, send_like_cli, signed_manifest

TOP = 18


def _name(key: tuple[str, int, str]) -> str:
    file, line, func = key
    parts = Path(file).parts
    if "site-packages" in parts:
        file = "/".join(parts[parts.index("site-packages") + 1:])
    elif Path(file).is_relative_to(ROOT):
        file = str(Path(file).relative_to(ROOT))
    elif Path(file).is_absolute():
        file = Path(file).name
    return f"{file}:{line}({func})" if line else func


def run(ctx: Ctx) -> dict[str, Any]:
    n = 500 if ctx.quick else 20_000
    work = ctx.dir("profile")
    with fresh_devnet() as d:
        path = signed_manifest(d, n, work / "manifest.json", seed="profile")
        env = bench_env(d, work)
        prof = cProfile.Profile()
        prof.enable()
        r = send_like_cli(env, path, "batch")
        prof.disable()
    out_file = work / "send-batch.prof"
    prof.dump_stats(out_file)
    st = pstats.Stats(str(out_file))
    rows = st.stats  # type: ignore[attr-defined]
    run_ct = next(v[3] for k, v in rows.items()
                  if k[0].endswith("disburser/sender.py") and k[2] == "run")
    total_ct = next(v[3] for k, v in rows.items()
                    if k[0].endswith("benchmarks/common.py") and k[2] == "send_like_cli")
    own = [(k, v) for k, v in rows.items() if "/disburser/" in k[0] and "site-packages" not in
           k[0]]
    own.sort(key=lambda kv: kv[1][3], reverse=True)
    by_tt = sorted(rows.items(), key=lambda kv: kv[1][2], reverse=True)
    res = {
        "n": n, "profile_file": str(out_file), "send_seconds": total_ct,
        "run_seconds": run_ct, "rate_under_profiler": r.confirmed / r.total,
        "cumulative": [{"fn": _name(k), "calls": v[1], "cum": v[3], "pct_run": v[3] / run_ct}
                       for k, v in own[:TOP]],
        "own_time": [{"fn": _name(k), "calls": v[1], "own": v[2], "pct_send": v[2] / total_ct}
                     for k, v in by_tt[:12]],
    }
    ctx.log(f"  profile n={n}: send {total_ct:.2f} s under cProfile, Sender.run {run_ct:.2f} s;"
            f" {out_file}")
    return res
