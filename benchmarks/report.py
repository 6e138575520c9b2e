"""Render a bench's results as BENCHMARKS.md: the summary table against the targets, the
details of each measurement, the profile, and the hand-written notes (benchmarks/NOTES.md,
included as they are)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

NOTES = Path(__file__).resolve().parent / "NOTES.md"


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f} MB" if b >= 1e6 else f"{b / 1e3:,.0f} kB"


def _met(ok: bool | None, quick: bool) -> str:
    if ok is None:
        return "—"
    if quick:
        return "(quick run: not judged)"
    return "**yes**" if ok else "**NO**"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def summary_rows(r: dict[str, Any], quick: bool) -> list[list[str]]:
    rows: list[list[str]] = []

    def add(what: str, figure: str, target: str, ok: bool | None) -> None:
        rows.append([what, figure, target, _met(ok, quick)])

    if g := r.get("gas"):
        bp, pd = g["batch_payout"], g["plain_disperse"]
        big = g["sizes"][1]
        add(f"1. Gas per fresh recipient, BatchPayout vs PlainDisperse (batch of {big})",
            f"{_n(bp['per_recipient'])} vs {_n(pd['per_recipient'])} = {g['vs_plain']:.3f}×",
            "within 3 % (≤ 1.03×)", g["vs_plain"] <= 1.03)
        add("1. BatchPayout vs a lone `transfer` (fresh recipient)",
            f"{_n(bp['per_recipient'])} vs {_n(g['lone_transfer'])} = {g['vs_lone']:.3f}×",
            "< 0.53×", g["vs_lone"] < 0.53)
        add("1. Marginal gas per recipient above the floor (24,388 + 2,100 = 26,488)",
            f"{_n(bp['marginal'])}: +{_n(g['above_floor'])} "
            f"(+{100 * g['above_floor'] / g['floor']:.1f} %); PlainDisperse "
            f"+{_n(g['above_floor_plain'])}", "report", None)
    if t := r.get("throughput"):
        b, d, ty = t["batch"], t["direct"], t["typical"]
        measured = t.get("measured", t["raw_measured"]["rate"])
        add(f"2. Batch mode, {_n(t['n_batch'])} recipients, ledger + log on (recipients/s)",
            f"{_n(b['rate'])}/s = {100 * t['batch_vs_raw']:.0f} % of the raw ceiling "
            f"{_n(t['raw'])}/s (`{t['raw_best']}`); {100 * t['batch_vs_measured']:.0f} % of "
            f"the {_n(measured)}/s the faster push reaches when every batch is simulated "
            "first, as issue 3 requires"
            + (f"; {100 * t['batch_vs_pairs']:.0f} % of the push in the engine's own "
               f"conditions (automine, two batches per request, the later nonce first: "
               f"{_n(t['raw_pairs']['rate'])}/s)" if "batch_vs_pairs" in t
               else f"; {100 * t['batch_vs_lanes']:.0f} % of the push in the engine's own "
               f"conditions (automine, one request per batch on each of two connections: "
               f"{_n(t['raw_lanes']['rate'])}/s)" if "batch_vs_lanes" in t
               else f"; {100 * t['batch_vs_sequential']:.0f} % of the push in the engine's "
               f"own conditions (automine, one request per batch: "
               f"{_n(t['raw_sequential']['rate'])}/s)" if "batch_vs_sequential" in t else ""),
            "≥ 80 % of the raw ceiling", t["batch_vs_raw"] >= 0.8)
        add("2. Batch mode vs the typical web3.py script",
            f"{_n(b['rate'])}/s vs {ty['rate']:,.1f}/s = {t['batch_vs_typical']:,.0f}×",
            "≥ 200×", t["batch_vs_typical"] >= 200)
        add(f"2. Direct mode, {_n(t['n_direct'])} recipients, blocks every "
            f"{t['block_time']} s, vs the typical script on automine (its best case)",
            f"{d['rate']:,.1f}/s = {t['direct_vs_typical']:,.1f}× (the typical script on the "
            f"same blocks: {t['typical_interval']['rate']:,.1f}/s; direct mode on automine, where "
            f"Anvil mines a block per arrival: {t['direct_automine']['rate']:,.0f}/s = "
            f"{t['direct_automine_vs_typical']:,.1f}×)", "≥ 20×", t["direct_vs_typical"] >= 20)
    if m := r.get("mainnet"):
        x = m["mainnet"]
        add(f"3. 300,000 recipients, mainnet-like ({x['gas_limit'] / 1e6:.0f}M gas blocks every "
            f"12 s, 16 in flight, {x['confirmations']} confirmations)",
            f"{_n(x['blocks_300k'])} blocks = {x['minutes_300k']:,.0f} min "
            f"({x['recipients_per_block']:,.0f} recipients/block)",
            "< 60 min (deadline 96 h)", x["minutes_300k"] < 60)
    if s := r.get("scaling"):
        sizes = s["sizes"]
        add("4. Time per payment, " + " / ".join(_n(z["n"]) for z in sizes),
            " / ".join(f"{z['ms_per_payment']:.3f} ms" for z in sizes), "report", None)
        top = sizes[-1]
        add(f"4. Peak RSS of the send, {_n(top['n'])} payments", _mb(top["peak_rss"]),
            "< 300 MB", top["peak_rss"] < 300e6)
        add(f"4. Ledger size, {_n(top['n'])} payments", _mb(top["ledger_bytes"]), "report", None)
        add(f"4. Reconcile, {_n(top['n'])} payments", f"{top['reconcile_seconds']:.2f} s",
            "< 3 s", top["reconcile_seconds"] < 3)
        a = s["allocation"]
        add(f"4. Allocate {_n(a['rows'])} liquidation rows (`disburser allocate`)",
            f"{a['seconds']:.1f} s", "< 60 s", a["seconds"] < 60)
    if u := r.get("startup"):
        add("5. `disburser --help`", f"{u['help']:.3f} s", "< 0.3 s", u["help"] < 0.3)
        add(f"5. `disburser status` ({_n(u['status_ledger_payments'])}-payment ledger)",
            f"{u['status']:.3f} s", "report", None)
    return rows


def _details(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if g := r.get("gas"):
        small, big = g["sizes"]
        out += ["", "### 1. Gas (from receipts, fresh recipients, a fresh Anvil per variant)", ""]
        out += _table(
            ["variant", f"gasUsed, {small}", f"gasUsed, {big}", f"per recipient at {big}",
             f"marginal ({small}→{big})"],
            [[name, _n(v["gas_small"]), _n(v["gas_big"]), _n(v["per_recipient"]),
              _n(v["marginal"])]
             for name, v in (("BatchPayout.disburse", g["batch_payout"]),
                             ("PlainDisperse.disperse", g["plain_disperse"]))]
            + [["lone `transfer` (median of " + str(g["lone_n"]) + ")", "", "",
                _n(g["lone_transfer"]), ""]])
        out += ["", f"Marginal ratio BatchPayout / PlainDisperse: {g['vs_plain_marginal']:.3f}×."]
    if t := r.get("throughput"):
        bt = t["block_time"]
        out += ["", f"### 2. Throughput (local Anvil, confirmations 1; median of "
                f"{t['runs']} runs, {len(t['typical']['samples'])} for the typical script, "
                "taken round by round (every measurement once a round), a fresh Anvil each; "
                "automine unless a block time is given)", ""]
        rows: list[list[str]] = []
        for key, label, n in (
            ("batch", "engine, batch mode (`send` in-process)", t["n_batch"]),
            ("raw_sequential", "raw ceiling: pre-signed, one request per tx", t["n_batch"]),
            ("raw_lanes", "raw ceiling: pre-signed, one request per tx on each of two "
             "connections", t["n_batch"]),
            ("raw_pairs", "raw ceiling: pre-signed, two txs per request, the later nonce "
             "first (the engine's broadcasting thread)", t["n_batch"]),
            ("raw_rpc_batch", "raw ceiling: pre-signed, JSON-RPC batches + evm_mine",
             t["n_batch"]),
            ("raw_measured", "raw ceiling, one request per tx, each window of 16 batches "
             "simulated first (GasMeter, eth_calls in JSON-RPC batches of ≤ 1 MB)",
             t["n_batch"]),
            ("raw_measured_rpc_batch", "raw ceiling, JSON-RPC batches + evm_mine, each "
             "request's 8 batches simulated first", t["n_batch"]),
            ("direct", f"engine, direct mode, blocks every {bt} s, "
             f"DISBURSER_MAX_IN_FLIGHT={t['direct_in_flight']}", t["n_direct"]),
            ("raw_direct_interval", f"direct ceiling: pre-signed transfers, JSON-RPC batches "
             f"of 500, blocks every {bt} s", t["n_direct"]),
            ("direct_automine", "engine, direct mode, automine (a block per arrival)",
             t["n_direct_automine"]),
            ("raw_direct_sequential", "direct ceiling on automine: pre-signed transfers, one "
             "request per tx", t["n_direct_automine"]),
            ("raw_direct_rpc_batch", "direct ceiling: pre-signed transfers, JSON-RPC batches "
             "of 500 + evm_mine", t["n_direct_automine"]),
            ("typical", "typical web3.py script", t["n_typical"]),
            ("typical_interval", f"typical web3.py script, blocks every {bt} s",
             t["n_typical_interval"]),
        ):
            if key not in t:  # results saved before this measurement existed
                continue
            v = t[key]
            extra = ""
            if "run_rate" in v:
                verify = f", verify {v['verify']:.2f} s" if "verify" in v else ""
                extra = (f"Sender.run alone {_n(v['run_rate'])}/s; load {v['load']:.2f} s"
                         f"{verify}, accept {v['accept']:.2f} s")
            elif "sign" in v:
                extra = f"signing beforehand {v['sign']:.2f} s; resent {v['resent']:.0f}"
            if v.get("nudges"):
                extra += f"; watchdog blocks {v['nudges']:.0f} (over the runs)"
            rows.append([label, _n(n), f"{v['rate']:,.1f}/s",
                         ", ".join(str(x) for x in v["samples"]), extra])
        out += _table(["what", "recipients", "rate (median)", "runs", "notes"], rows)
        out += ["", f"Raw ceiling used: `{t['raw_best']}`. Batch mode's `Sender.run` alone "
                f"reaches {100 * t['batch_run_vs_raw']:.0f} % of it. Blocks mined by the "
                f"automine watchdog (a transaction stranded in the pool for 0.1 s): "
                f"{t.get('nudges', 0)}."]
    if m := r.get("mainnet"):
        out += ["", "### 3. Mainnet-like run (virtual 12 s slots, base fee pinned at 1 gwei, "
                "per-tx gas cap on, DISBURSER_MAX_IN_FLIGHT=16, polls every 4 s)", ""]
        rows2 = []
        for key, label in (("mainnet", "as the ethereum profile"),
                           ("conf1", "confirmations 1 (pipeline not held by confirmations)"),
                           ("conf1_b450", "confirmations 1 and DISBURSER_BATCH_SIZE=450 (three "
                            "batches fit a block)"),
                           ("gas36", "36M gas blocks")):
            if key not in m:
                continue
            x = m[key]
            rows2.append([
                label, f"{x['gas_limit'] / 1e6:.0f}M", str(x["confirmations"]), _n(x["n"]),
                _n(x["blocks"]), f"{x['batches_per_block']:.2f} × {x['batch_size']}",
                _n(x["recipients_per_block"]), f"{100 * x['block_fill']:.0f} %",
                _n(x["fixed_blocks"]), f"{_n(x['blocks_300k'])} / {x['minutes_300k']:,.0f} min",
                f"{x['real_per_slot_max']:.2f} s", str(x["bumps"]),
                ", ".join(f"{k} {v}" for k, v in x.get("warnings", {}).items()) or "none"])
        out += _table(["run", "block gas", "conf.", "recipients", "blocks", "batches/block × "
                       "size", "recipients/block", "block fill", "fixed blocks",
                       "300k: blocks / time", "max real s per slot", "fee bumps",
                       "engine warnings"], rows2)
    if s := r.get("scaling"):
        out += ["", "### 4. Scaling (batch mode, a fresh Anvil per size, the send in its own "
                "process)", ""]
        out += _table(
            ["payments", "send (load → done)", "per payment", "rate", "manifest load",
             "accept", "ledger", "log", "peak RSS", "reconcile (median)"],
            [[_n(z["n"]), f"{z['send_seconds']:.2f} s", f"{z['ms_per_payment']:.3f} ms",
              f"{_n(z['rate'])}/s", f"{z['load_seconds']:.2f} s", f"{z['accept_seconds']:.2f} s",
              _mb(z["ledger_bytes"]), _mb(z["log_bytes"]), _mb(z["peak_rss"]),
              f"{z['reconcile_seconds']:.2f} s"] for z in s["sizes"]])
        a = s["allocation"]
        out += ["", f"Allocation: `scripts/gen_eligibility.py --users {_n(a['users'])} --rows "
                f"{_n(a['rows'])}` ({a['generate_seconds']:.0f} s to generate), then "
                f"`disburser allocate` (a new process: start-up, reading, rules, Merkle root, "
                f"manifest and report written): {a['seconds']:.1f} s, {_n(a['payments'])} "
                f"payments, peak RSS {_mb(a['peak_rss'])}."]
    if u := r.get("startup"):
        out += ["", f"### 5. Start-up (median of {len(u['help_samples'])})", "",
                f"`disburser --help`: {u['help']:.3f} s (runs: {u['help_samples']}); "
                f"`disburser status`: {u['status']:.3f} s (runs: {u['status_samples']})."]
    if p := r.get("profile"):
        out += ["", f"### Profile of a batch-mode send ({_n(p['n'])} recipients, cProfile)",
                "", f"Under the profiler: send {p['send_seconds']:.2f} s, `Sender.run` "
                f"{p['run_seconds']:.2f} s. cProfile sees the send loop's thread only: the "
                "broadcasting threads' sends (`eth_sendRawTransaction`, where the node mines "
                "under automine) are not in these tables. disburser's functions by cumulative "
                "time:", ""]
        out += _table(["function", "calls", "cumulative", "% of Sender.run"],
                      [[f"`{c['fn']}`", _n(c["calls"]), f"{c['cum']:.3f} s",
                        f"{100 * c['pct_run']:.0f} %"] for c in p["cumulative"]])
        out += ["", "Every function by own time:", ""]
        out += _table(["function", "calls", "own time", "% of the send"],
                      [[f"`{c['fn']}`", _n(c["calls"]), f"{c['own']:.3f} s",
                        f"{100 * c['pct_send']:.0f} %"] for c in p["own_time"]])
    return out


def render(doc: dict[str, Any]) -> str:
    """BENCHMARKS.md from a bench's saved document (machine, quick, finished, elapsed,
    results)."""
    results, machine, quick = doc["results"], doc["machine"], doc["quick"]
    v = machine["versions"]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by scripts/bench; edit benchmarks/NOTES.md, not this file. -->",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(doc['finished']))} "
        f"({'quick: small sizes, targets not judged' if quick else 'full'}; the bench took "
        f"{doc['elapsed'] / 60:.1f} min) at commit {machine['commit']}.",
        "",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['ram_gib']} GiB RAM, "
        f"{machine['os']}. Shared cores: expect ±10-20 % between runs; ratios travel better "
        "than rates.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "## Results against the targets",
        "",
    ]
    lines += _table(["measurement", "figure", "target", "met?"], summary_rows(results, quick))
    lines += ["", "## Details"]
    lines += _details(results)
    if NOTES.exists():
        lines += ["", NOTES.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines) + "\n"
