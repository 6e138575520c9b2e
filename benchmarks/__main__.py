"""``python -m benchmarks [--quick] [--no-write] [--only gas,throughput,...] [--json FILE]``

Runs the measurements in order (gas, throughput, mainnet, scaling, startup, profile), each
on fresh Anvil chains, and writes BENCHMARKS.md (the table against the targets, details,
profile, and benchmarks/NOTES.md). Progress goes to stderr; with --no-write the Markdown
goes to stdout instead of the file."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Ctx

STEPS = ("gas", "throughput", "mainnet", "scaling", "startup", "profile")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[1])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (seconds), for CI; targets are not judged")
    ap.add_argument("--no-write", action="store_true",
                    help="print the Markdown instead of writing BENCHMARKS.md")
    ap.add_argument("--only", default=",".join(STEPS),
                    help=f"comma-separated steps to run (default: all of {','.join(STEPS)})")
    ap.add_argument("--runs", type=int, default=None,
                    help="repetitions of the short measurements (default 3; quick 1)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (ledgers, logs, manifests, profile)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="measure nothing: render the results saved by --json (after editing "
                    "benchmarks/NOTES.md, say)")
    args = ap.parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        _output(doc, args.no_write)
        return 0
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"--only: unknown step(s) {', '.join(unknown)} (known: {', '.join(STEPS)})")

    from benchmarks import machine
    from disburser.devnet import anvil_binary

    anvil_binary()  # fail early, with the bootstrap hint, if Anvil is missing
    # SIGTERM (a CI timeout, `timeout`) unwinds like Ctrl-C, so that every Anvil started
    # in a `with` is stopped: they run in their own session and would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine.describe()  # before the run: the commit measured, not the one after it
    tmp = Path(tempfile.mkdtemp(prefix="disburser-bench-"))
    ctx = Ctx(tmp=tmp, quick=args.quick, runs=args.runs or (1 if args.quick else 3),
              log=lambda s: print(s, file=sys.stderr, flush=True))
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        for step in STEPS:
            if step not in steps:
                continue
            ctx.log(f"bench: {step}")
            t = time.perf_counter()
            results[step] = importlib.import_module(f"benchmarks.{step}").run(ctx)
            ctx.log(f"bench: {step} done in {time.perf_counter() - t:.1f} s")
    finally:
        if args.keep:
            ctx.log(f"bench: work files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc = {"machine": info, "quick": args.quick, "finished": time.time(),
           "elapsed": time.perf_counter() - t0, "results": results}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    _output(doc, args.no_write)
    return 0


def _output(doc: dict[str, Any], no_write: bool) -> None:
    from benchmarks import report

    text = report.render(doc)
    if no_write:
        sys.stdout.write(text)
    else:
        (ROOT / "BENCHMARKS.md").write_text(text, encoding="utf-8")
        print(f"bench: wrote {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
