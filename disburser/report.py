"""Render a reconcile ``Result`` as a table, JSON, CSV or one self-contained HTML page.

Pure: no chain, no ledger, no files. JSON and CSV carry amounts as decimal strings of base
units (DESIGN); the table and the HTML page show tokens (``format_units``). The HTML page
has inline CSS and inline SVG charts only: no script, no external asset, every string
escaped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from disburser import csvcell
from disburser.amounts import format_units
from disburser.errors import InputError
from disburser.manifest import utc_text

if TYPE_CHECKING:
    from disburser.reconcile import GasPoint, ManifestSummary, PaymentResult, Progress, Result

CSV_COLUMNS = ("manifest", "index", "id", "to", "amount", "paid", "status", "reason",
               "tx_hashes")
TABLE_FINDINGS_MAX = 200
HTML_FINDINGS_MAX = 2000


def render(result: Result, fmt: str) -> str:
    """The report text in ``fmt``: table, json, csv or html."""
    if fmt == "json":
        return to_json(result)
    if fmt == "csv":
        return to_csv(result)
    if fmt == "table":
        return to_table(result)
    if fmt == "html":
        return to_html(result)
    raise InputError(f"--format {fmt}: one of table, json, csv, html")


# --- JSON ----------------------------------------------------------------------------------


def _progress_dict(p: Progress) -> dict[str, Any]:
    return {
        "payments_total": p.payments_total,
        "payments_done": p.payments_done,
        "payments_left": p.payments_left,
        "payments_failed": p.payments_failed,
        "amount_done": str(p.amount_done),
        "amount_total": str(p.amount_total),
        "started_at": p.started_at,
        "deadline": p.deadline,
        "now": p.now,
        "payments_per_hour": p.payments_per_hour,
        "amount_per_hour": None if p.amount_per_hour is None else str(p.amount_per_hour),
        "projected_finish": p.projected_finish,
        "finished": p.finished,
        "on_track": p.on_track,
    }


def _manifest_dict(m: ManifestSummary) -> dict[str, Any]:
    return {
        "root": m.root, "program": m.program, "payer": m.payer, "count": m.count,
        "total": str(m.total), "paid_total": str(m.paid_total), "not_after": m.not_after,
        "signers": list(m.signers), "sources": list(m.sources),
    }


def to_dict(r: Result, *, payments_too: bool = True) -> dict[str, Any]:
    """The DESIGN reconcile contract, plus context and per-program figures (without the
    ``payments`` list when not ``payments_too``: ``to_json`` writes those itself)."""
    from disburser.reconcile import RESULT_FORMAT

    payments: list[dict[str, Any]] = []
    for p in r.payments if payments_too else ():
        d: dict[str, Any] = {
            "manifest": p.manifest, "program": p.program, "index": p.idx, "id": p.id,
            "to": p.to, "amount": str(p.amount), "paid": str(p.paid), "status": p.status,
            "tx_hashes": list(p.tx_hashes),
        }
        if p.reason is not None:
            d["reason"] = p.reason
        payments.append(d)
    return {
        "format": RESULT_FORMAT,
        "program": r.program,
        "ceiling": str(r.ceiling),
        "committed": str(r.committed),
        "paid_total": str(r.paid_total),
        "remaining": str(r.remaining),
        "unexplained_total": str(r.unexplained_total),
        "consistent": r.consistent,
        "counts": dict(r.counts),
        "chain_id": r.chain_id,
        "token": r.token,
        "payer": r.payers[0] if len(r.payers) == 1 else None,
        "payers": list(r.payers),
        "head_block": r.head_block,
        "head_time": r.head_time,
        "from_block": r.from_block,
        "confirmations": r.confirmations,
        "transfers_scanned": r.transfers_scanned,
        "zero_transfers_ignored": r.zero_transfers,
        "notes": ([FROM_LEDGER_START] if r.from_ledger_start else []) + list(r.notes),
        "started_at": r.started_at,
        "deadline": r.deadline,
        "progress": _progress_dict(r.progress),
        "programs": [
            {
                "program": s.program, "ceiling": str(s.ceiling), "committed": str(s.committed),
                "paid_total": str(s.paid_total), "remaining": str(s.remaining),
                "counts": dict(s.counts), "started_at": s.started_at, "deadline": s.deadline,
                "progress": _progress_dict(s.progress),
            }
            for s in r.programs
        ],
        "manifests": [_manifest_dict(m) for m in r.manifests],
        "discrepancies": [dict(d) for d in r.discrepancies],
        "payments": payments,
    }


def to_json(r: Result) -> str:
    """Indented JSON with one payment (and one finding) per line: readable, and fast for
    100,000 payments (json's C encoder is used only without ``indent``)."""
    from disburser.transfers import bulk

    with bulk():
        doc = to_dict(r, payments_too=False)
        del doc["payments"]
        findings = doc.pop("discrepancies")
        head = json.dumps(doc, indent=2)
        parts = [head[:-2]]  # without the closing "\n}"
        for key, lines in (("discrepancies", [json.dumps(x) for x in findings]),
                           ("payments", [_payment_json(p) for p in r.payments])):
            if lines:
                body = ",\n    ".join(lines)
                parts.append(f',\n  "{key}": [\n    {body}\n  ]')
            else:
                parts.append(f',\n  "{key}": []')
    parts.append("\n}\n")
    return "".join(parts)


def _payment_json(p: PaymentResult) -> str:
    """``json.dumps`` of the payment's ``to_dict`` entry, byte for byte, written directly
    (strings through json's own C escaper): 100,000 ``json.dumps`` calls were the largest
    step of a reconcile."""
    esc = encode_basestring_ascii
    line = (f'{{"manifest": {esc(p.manifest)}, "program": {esc(p.program)}, '
            f'"index": {int(p.idx)}, "id": {esc(p.id)}, "to": {esc(p.to)}, '
            f'"amount": "{int(p.amount)}", "paid": "{int(p.paid)}", '
            f'"status": {esc(p.status)}, '
            f'"tx_hashes": [{", ".join(map(esc, p.tx_hashes))}]')
    if p.reason is not None:
        line += f', "reason": {esc(p.reason)}'
    return line + "}"


# --- CSV -----------------------------------------------------------------------------------


def to_csv(r: Result) -> str:
    """One row per payment; then one row per finding that no payment's status shows (an
    unexplained outflow, a ceiling passed, the ledger disagreeing, an id in two manifests),
    its kind as the status and what it says as the reason. Amounts in base units; tx hashes
    separated by spaces; an id or reason a spreadsheet would take for a formula begins with
    ' (``csvcell``)."""
    from disburser.reconcile import STATUSES

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csvcell.QUOTING)
    w.writerow(CSV_COLUMNS)
    for p in r.payments:
        w.writerow((p.manifest, p.idx, csvcell.text(p.id), p.to, p.amount, p.paid, p.status,
                    csvcell.text(p.reason or ""), " ".join(p.tx_hashes)))
    for d in r.discrepancies:
        if d["kind"] in STATUSES:  # shown by its payment's row
            continue
        hashes = d.get("tx_hashes") or ([d["tx_hash"]] if d.get("tx_hash") else [])
        w.writerow((d.get("manifest", ""), d.get("index", ""), csvcell.text(d.get("id", "")),
                    d.get("to", ""), d.get("expected", ""), d.get("paid", ""), d["kind"],
                    csvcell.text(_finding_reason(d)), " ".join(hashes)))
    return buf.getvalue()


def _finding_reason(d: Mapping[str, Any]) -> str:
    """What a finding's CSV row says beyond its columns."""
    parts = [f"{k} {d[k]}" for k in ("program", "from", "block", "ceiling", "committed",
                                     "excess", "ledger_status", "chain_status") if k in d]
    if d.get("ledger_tx_hashes"):
        parts.append("ledger tx " + " ".join(d["ledger_tx_hashes"]))
    if d.get("detail"):
        parts.append(str(d["detail"]))
    return "; ".join(parts)


# --- helpers ---------------------------------------------------------------------------


def tokens(value: int, decimals: int) -> str:
    """Exact token amount with thousands separators: 1234567500000 -> '1,234,567.5'."""
    text = format_units(value, decimals)
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("-").partition(".")
    return sign + f"{int(whole):,}" + ("." + frac if frac else "")


def _compact(value: int, decimals: int) -> str:
    """Axis label: whole tokens, shortened (300M, 1.5k)."""
    whole = value // 10**decimals
    if whole < 1000:
        return format_units(value - value % 10 ** max(decimals - 2, 0), decimals)
    for div, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if whole >= div:
            tenths = whole * 10 // div
            return f"{tenths // 10}.{tenths % 10}{suffix}".replace(".0" + suffix, suffix)
    if whole == 0 and value:
        return format_units(value, decimals)
    return str(whole)


def zero_note(n: int) -> str:
    return (f"{n} Transfer log(s) of 0 from the payer ignored: they move nothing, and anyone "
            "can emit one (address poisoning)")


def when(ts: int | None) -> str:
    return "-" if ts is None else utc_text(ts)


def _short(h: str, keep: int = 10) -> str:
    return h if len(h) <= 2 * keep + 1 else f"{h[:keep]}…{h[-6:]}"


def _finding_where(d: dict[str, Any]) -> tuple[str, str, str, str]:
    """(manifest or tx, index or log index, id, to) of a finding, as text."""
    if "manifest" in d:
        return (str(d["manifest"]), str(d.get("index", "")), str(d.get("id", "")),
                str(d.get("to", "")))
    if "tx_hash" in d:
        return (str(d["tx_hash"]), f"log {d.get('log_index', '')}", "", str(d.get("to", "")))
    return (str(d.get("program", "")), "", "", "")


def _printable(text: str) -> str:
    """A token's revert reason as the table can show it: newlines and escape sequences
    (control characters) written as escapes, not passed to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _finding_detail(d: dict[str, Any], decimals: int) -> str:
    kind = d.get("kind")
    parts: list[str] = []
    if "reason" in d:
        parts.append(_printable(str(d["reason"])))
    if "detail" in d:
        parts.append(_printable(str(d["detail"])))
    if kind == "pending" and "depth" in d:
        parts.append(f"depth {d['depth']}")
    if "excess" in d:
        parts.append(f"excess {tokens(int(d['excess']), decimals)}")
    if "committed" in d:
        parts.append(f"committed {tokens(int(d['committed']), decimals)}")
    if "transfers" in d:
        parts.append(f"{d['transfers']} transfer(s)")
    if "block" in d:
        parts.append(f"block {d['block']}")
    hashes = d.get("tx_hashes") or []
    if hashes and kind != "ledger_disagrees":
        parts.append("tx " + ", ".join(_short(str(h)) for h in hashes))
    return "; ".join(parts)


def _amount_cell(d: dict[str, Any], key: str, decimals: int) -> str:
    v = d.get(key)
    return "" if v is None else tokens(int(v), decimals)


def _progress_line(p: Progress, decimals: int) -> str:
    parts = [f"{p.payments_done}/{p.payments_total} payments done",
             f"{tokens(p.amount_done, decimals)}/{tokens(p.amount_total, decimals)} tokens"]
    if p.payments_failed:
        parts.append(f"{p.payments_failed} failed")
    if p.started_at is not None:
        parts.append(f"started {when(p.started_at)}")
    if p.deadline is not None:
        after = (f" ({(p.deadline - p.started_at) // 3600} h after the start)"
                 if p.started_at is not None else "")
        parts.append(f"deadline {when(p.deadline)}{after}")
    if p.payments_per_hour is not None and p.amount_per_hour is not None:
        parts.append(f"rate {p.payments_per_hour:,} payments/h, "
                     f"{tokens(p.amount_per_hour, decimals)} tokens/h")
    if p.finished:
        parts.append("finished")
    elif p.projected_finish is not None:
        parts.append(f"projected finish {when(p.projected_finish)}")
    if p.on_track is not None:
        parts.append("on track" if p.on_track else
                     f"NOT on track: {p.payments_failed} failed (--retry-failed)"
                     if p.payments_failed else "BEHIND the deadline")
    return "; ".join(parts)


# --- table ---------------------------------------------------------------------------------


def _grid(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right_set = set(right)
    out: list[str] = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i in right_set else c.ljust(widths[i])
                 for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return out


FROM_LEDGER_START = ("the scan starts at the program's first block in the ledger: earlier "
                     "transfers from the payer are not counted (--from-block 0 counts them)")


def to_table(r: Result) -> str:
    """A human summary and the findings, amounts in tokens."""
    dec = r.decimals
    lines: list[str] = []
    payer = r.payers[0] if len(r.payers) == 1 else ", ".join(r.payers)
    lines.append(f"reconcile: program {r.program}  chain {r.chain_id}  token {r.token}  "
                 f"payer {payer}")
    lines.append(f"scanned blocks {r.from_block}..{r.head_block} (head {when(r.head_time)}): "
                 f"{r.transfers_scanned} Transfer log(s) from the payer; "
                 f"confirmations {r.confirmations}")
    if r.from_ledger_start:
        lines.append(FROM_LEDGER_START)
    if r.zero_transfers:
        lines.append(zero_note(r.zero_transfers))
    lines.extend(r.notes)
    lines.append("")
    rows = [["PROGRAM", "CEILING", "COMMITTED", "PAID", "REMAINING", "PAYMENTS"]]
    for s in r.programs:
        rows.append([s.program, tokens(s.ceiling, dec), tokens(s.committed, dec),
                     tokens(s.paid_total, dec), tokens(s.remaining, dec),
                     str(sum(s.counts.values()))])
    if len(r.programs) > 1:
        rows.append(["* (all)", tokens(r.ceiling, dec), tokens(r.committed, dec),
                     tokens(r.paid_total, dec), tokens(r.remaining, dec),
                     str(len(r.payments))])
    lines.extend(_grid(rows, right=(1, 2, 3, 4, 5)))
    lines.append("amounts in tokens; unexplained outflow from the payer: "
                 f"{tokens(r.unexplained_total, dec)}")
    lines.append("")
    lines.append("payments: " + ", ".join(f"{k} {v}" for k, v in r.counts.items()))
    for s in r.programs:
        lines.append(f"progress {s.program}: {_progress_line(s.progress, dec)}")
    lines.append("")
    lines.append("manifests:")
    for m in r.manifests:
        lines.append(f"  {m.root}  {m.program}  {m.count} payments  "
                     f"{tokens(m.total, dec)} tokens  paid {tokens(m.paid_total, dec)}  "
                     f"not_after {when(m.not_after)}")
        lines.append(f"    signers: {', '.join(m.signers) or '-'}  "
                     f"from: {', '.join(m.sources) or '-'}")
    lines.append("")
    if r.discrepancies:
        lines.append(f"findings ({len(r.discrepancies)}):")
        frows = [["KIND", "MANIFEST/TX", "INDEX", "ID", "TO", "EXPECTED", "PAID", "DETAIL"]]
        for d in r.discrepancies[:TABLE_FINDINGS_MAX]:
            where, index, pid, to = _finding_where(d)
            frows.append([str(d["kind"]), _short(where), index, pid, to,
                          _amount_cell(d, "expected", dec), _amount_cell(d, "paid", dec),
                          _finding_detail(d, dec)])
        lines.extend(_grid(frows, right=(5, 6)))
        if len(r.discrepancies) > TABLE_FINDINGS_MAX:
            lines.append(f"... and {len(r.discrepancies) - TABLE_FINDINGS_MAX} more: see "
                         "--format json or csv")
        lines.append("")
    if r.consistent:
        lines.append("result: consistent: every payment paid at depth, nothing unexplained")
    else:
        notpaid = len(r.payments) - r.counts.get("paid", 0)
        lines.append(f"result: NOT consistent: {len(r.discrepancies)} finding(s), "
                     f"{notpaid} payment(s) not paid")
    return "\n".join(lines) + "\n"


# --- HTML ----------------------------------------------------------------------------------

STATUS_COLORS = {
    "paid": "#2e7d32", "pending": "#f9a825", "unpaid": "#9e9e9e", "failed": "#c62828",
    "underpaid": "#ef6c00", "overpaid": "#6a1b9a", "paid_twice": "#ad1457",
}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;
color:#1c1c1c;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555;font-size:13px}.mono{font-family:ui-monospace,Menlo,Consolas,monospace}
.banner{padding:10px 14px;border-radius:6px;margin:14px 0;font-weight:600}
.ok{background:#e8f5e9;color:#1b5e20;border:1px solid #a5d6a7}
.bad{background:#ffebee;color:#b71c1c;border:1px solid #ef9a9a}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}
.card .k{font-size:12px;color:#666}.card .v{font-size:17px;font-weight:600}
table{border-collapse:collapse;background:#fff;font-size:13px;max-width:100%}
td.mono,td.wrap{word-break:break-all}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.chart{background:#fff;border:1px solid #ddd;border-radius:6px;margin:6px 0}
.kind{font-weight:600}.note{color:#666;font-size:12px}
"""


def _svg_text(x: int, y: int, text: str, *, anchor: str = "start", size: int = 11,
              fill: str = "#333") -> str:
    return (f'<text x="{x}" y="{y}" font-size="{size}" fill="{fill}" '
            f'text-anchor="{anchor}">{escape(text)}</text>')


def _cumulative_chart(r: Result, *, zoom: bool = False) -> str:
    """Cumulative paid over time against the ceiling; ``zoom`` scales the y axis to what
    the manifests commit (a 300M ceiling flattens a first day's curve to nothing)."""
    w, h, left, right, top, bottom = 900, 320, 80, 20, 20, 40
    pw, ph = w - left - right, h - top - bottom
    timeline = r.charts.timeline if r.charts else ()
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" '
             f'height="{h}" viewBox="0 0 {w} {h}" role="img" '
             'aria-label="cumulative amount paid over time">']
    if not timeline:
        parts.append(_svg_text(w // 2, h // 2, "no transfer attributed to these manifests yet",
                               anchor="middle", size=14, fill="#777"))
        parts.append("</svg>")
        return "".join(parts)
    ymax = max(r.committed, r.paid_total, 1) if zoom else max(r.ceiling, r.committed,
                                                                 r.paid_total, 1)
    ymax += ymax // 20
    t0 = min(t for t, _ in timeline)
    t1 = max(t for t, _ in timeline)
    if r.started_at is not None and r.started_at < t0:
        t0 = r.started_at
    if t1 - t0 < 60:
        t0, t1 = t0 - 30, t1 + 30
    span = t1 - t0

    def x(t: int) -> int:
        return left + (t - t0) * pw // span

    def y(v: int) -> int:
        return top + ph - v * ph // ymax

    # grid and axes
    for k in range(6):
        v = ymax * k // 5
        yy = y(v)
        parts.append(f'<line x1="{left}" y1="{yy}" x2="{left + pw}" y2="{yy}" '
                     'stroke="#eee"/>')
        parts.append(_svg_text(left - 6, yy + 4, _compact(v, r.decimals), anchor="end"))
    fmt = "%H:%M:%S" if span < 6 * 3600 else "%m-%d %H:%M"
    for k in range(5):
        t = t0 + span * k // 4
        parts.append(_svg_text(x(t), top + ph + 18,
                               datetime.fromtimestamp(t, UTC).strftime(fmt),
                               anchor="middle"))
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#999"/>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
                 'stroke="#999"/>')
    # ceiling (when on the scale) and committed
    if r.ceiling <= ymax:
        yc = y(r.ceiling)
        parts.append(f'<line x1="{left}" y1="{yc}" x2="{left + pw}" y2="{yc}" '
                     'stroke="#c62828" stroke-width="2" stroke-dasharray="8 5"/>')
        parts.append(_svg_text(left + pw - 4, yc - 5,
                               f"ceiling {_compact(r.ceiling, r.decimals)}", anchor="end",
                               fill="#c62828"))
    else:
        parts.append(_svg_text(left + pw - 4, top + 12,
                               f"ceiling {_compact(r.ceiling, r.decimals)} above this scale",
                               anchor="end", fill="#c62828"))
    if r.committed != r.ceiling:
        ym = y(r.committed)
        parts.append(f'<line x1="{left}" y1="{ym}" x2="{left + pw}" y2="{ym}" '
                     'stroke="#777" stroke-dasharray="2 4"/>')
        parts.append(_svg_text(left + 4, ym - 5,
                               f"committed {_compact(r.committed, r.decimals)}", fill="#555"))
    # cumulative paid, as steps; at most ~1000 points
    step = max(1, len(timeline) // 1000)
    pts = [timeline[i] for i in range(0, len(timeline), step)]
    if pts[-1] != timeline[-1]:
        pts.append(timeline[-1])
    coords = [f"{x(t0)},{y(0)}"]
    prev = 0
    for t, v in pts:
        coords.append(f"{x(t)},{y(prev)}")
        coords.append(f"{x(t)},{y(v)}")
        prev = v
    parts.append(f'<polyline fill="none" stroke="#1565c0" stroke-width="2.5" '
                 f'points="{" ".join(coords)}"/>')
    last_t, last_v = timeline[-1]
    parts.append(f'<circle cx="{x(last_t)}" cy="{y(last_v)}" r="4" fill="#1565c0"/>')
    parts.append(_svg_text(min(x(last_t) + 6, left + pw - 150), max(y(last_v) - 8, top + 12),
                           f"paid {tokens(last_v, r.decimals)}", fill="#1565c0"))
    parts.append("</svg>")
    return "".join(parts)


def _status_chart(r: Result) -> str:
    w, row, left = 900, 30, 110
    h = row * len(r.counts) + 20
    biggest = max(list(r.counts.values()) + [1])
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" '
             f'height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="payments by status">']
    for k, (status, n) in enumerate(r.counts.items()):
        yy = 10 + k * row
        bw = (w - left - 120) * n // biggest
        parts.append(_svg_text(left - 8, yy + 17, status, anchor="end", size=12))
        parts.append(f'<rect x="{left}" y="{yy + 3}" width="{max(bw, 1 if n else 0)}" '
                     f'height="{row - 8}" fill="{STATUS_COLORS.get(status, "#607d8b")}"/>')
        parts.append(_svg_text(left + bw + 8, yy + 17, f"{n:,}", size=12))
    parts.append("</svg>")
    return "".join(parts)


def _bucket(gas: Sequence[GasPoint], limit: int) -> list[tuple[str, int, int]]:
    """(label, gas, recipients) bars: one per transaction, or averaged buckets."""
    if len(gas) <= limit:
        return [(g.tx_hash, g.gas_used, g.recipients) for g in gas]
    size = -(-len(gas) // limit)
    out: list[tuple[str, int, int]] = []
    for i in range(0, len(gas), size):
        part = gas[i:i + size]
        out.append((f"transactions {i + 1}-{i + len(part)} (average)",
                    sum(g.gas_used for g in part) // len(part),
                    sum(g.recipients for g in part) // len(part)))
    return out


def _gas_chart(r: Result) -> str:
    gas = r.charts.gas if r.charts else ()
    w, h, left, right, top, bottom = 900, 260, 80, 20, 20, 40
    pw, ph = w - left - right, h - top - bottom
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" '
             f'height="{h}" viewBox="0 0 {w} {h}" role="img" '
             'aria-label="gas used per payout transaction">']
    if not gas:
        parts.append(_svg_text(w // 2, h // 2, "no payout transaction to show", anchor="middle",
                               size=14, fill="#777"))
        parts.append("</svg>")
        return "".join(parts)
    bars = _bucket(gas, 150)
    gmax = max(g for _, g, _ in bars) or 1
    gmax += gmax // 10
    for k in range(5):
        v = gmax * k // 4
        yy = top + ph - v * ph // gmax
        parts.append(f'<line x1="{left}" y1="{yy}" x2="{left + pw}" y2="{yy}" stroke="#eee"/>')
        parts.append(_svg_text(left - 6, yy + 4, f"{v:,}", anchor="end"))
    bw = max(pw // len(bars), 2)
    for k, (label, g, n) in enumerate(bars):
        bh = g * ph // gmax
        xx = left + k * pw // len(bars)
        per = f", {g // n:,} per recipient" if n else ""
        parts.append(f'<rect x="{xx + 1}" y="{top + ph - bh}" width="{max(bw - 2, 1)}" '
                     f'height="{bh}" fill="#00838f"><title>{escape(label)}: {g:,} gas, '
                     f'{n} recipient(s){escape(per)}</title></rect>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
                 'stroke="#999"/>')
    parts.append(_svg_text(left + pw // 2, top + ph + 22, "payout transactions, in block order",
                           anchor="middle"))
    parts.append("</svg>")
    return "".join(parts)


def _card(k: str, v: str) -> str:
    return (f'<div class="card"><div class="k">{escape(k)}</div>'
            f'<div class="v">{escape(v)}</div></div>')


def to_html(r: Result) -> str:
    """One self-contained page: summary, charts, findings, manifests and signers."""
    dec = r.decimals
    payer = ", ".join(r.payers)
    title = f"disburser reconcile: {r.program}"
    out: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="meta">chain {escape(str(r.chain_id))} · token '
        f'<span class="mono">{escape(str(r.token))}</span> · payer '
        f'<span class="mono">{escape(payer)}</span><br>blocks {r.from_block}..{r.head_block} '
        f"(head at {escape(when(r.head_time))}) · {r.transfers_scanned:,} Transfer log(s) "
        f"from the payer · confirmations {r.confirmations}"
        + (f"<br>{escape(FROM_LEDGER_START)}" if r.from_ledger_start else "")
        + (f"<br>{escape(zero_note(r.zero_transfers))}" if r.zero_transfers else "")
        + "".join(f"<br>{escape(n)}" for n in r.notes) + "</div>",
    ]
    if r.consistent:
        out.append('<div class="banner ok">Consistent: every payment paid at depth, nothing '
                   "unexplained.</div>")
    else:
        notpaid = len(r.payments) - r.counts.get("paid", 0)
        out.append(f'<div class="banner bad">Not consistent: {len(r.discrepancies):,} '
                   f"finding(s), {notpaid:,} payment(s) not paid.</div>")
    out.append('<div class="cards">')
    out.append(_card("ceiling (tokens)", tokens(r.ceiling, dec)))
    out.append(_card("committed", tokens(r.committed, dec)))
    out.append(_card("paid", tokens(r.paid_total, dec)))
    out.append(_card("remaining under ceiling", tokens(r.remaining, dec)))
    out.append(_card("unexplained outflow", tokens(r.unexplained_total, dec)))
    out.append(_card("payments", f"{len(r.payments):,}"))
    out.append("</div>")

    out.append("<h2>Programs</h2><table><tr><th>program</th><th>ceiling</th><th>committed"
               "</th><th>paid</th><th>remaining</th><th>progress</th></tr>")
    for s in r.programs:
        out.append(f"<tr><td>{escape(s.program)}</td><td class=n>{escape(tokens(s.ceiling, dec))}"
                   f"</td><td class=n>{escape(tokens(s.committed, dec))}</td><td class=n>"
                   f"{escape(tokens(s.paid_total, dec))}</td><td class=n>"
                   f"{escape(tokens(s.remaining, dec))}</td><td>"
                   f"{escape(_progress_line(s.progress, dec))}</td></tr>")
    out.append("</table>")

    out.append("<h2>Cumulative amount paid against the ceiling</h2>")
    out.append(_cumulative_chart(r))
    if r.charts and r.charts.timeline and max(r.committed, r.paid_total) * 10 < r.ceiling:
        out.append("<h2>Cumulative amount paid against the manifests' commitment</h2>")
        out.append(_cumulative_chart(r, zoom=True))
    out.append('<div class="note">Block timestamps of the blocks holding the transfers '
               "(sampled and interpolated on long runs). Red dashed: ceiling; dotted: "
               "committed by the manifests.</div>")
    out.append("<h2>Payments by status</h2>")
    out.append(_status_chart(r))
    out.append("<h2>Gas per payout transaction</h2>")
    out.append(_gas_chart(r))
    if r.charts and r.charts.gas_note:
        out.append(f'<div class="note">{escape(r.charts.gas_note)}</div>')

    out.append(f"<h2>Findings ({len(r.discrepancies):,})</h2>")
    if not r.discrepancies:
        out.append("<p>None.</p>")
    else:
        out.append("<table><tr><th>kind</th><th>manifest / transaction</th><th>index</th>"
                   "<th>id</th><th>to</th><th>expected</th><th>paid</th><th>detail</th></tr>")
        for d in r.discrepancies[:HTML_FINDINGS_MAX]:
            where, index, pid, to = _finding_where(d)
            kind = str(d["kind"])
            color = STATUS_COLORS.get(kind, "#37474f")
            out.append(
                f'<tr><td class="kind" style="color:{color}">{escape(kind)}</td>'
                f'<td class="mono" title="{escape(where)}">{escape(_short(where))}</td>'
                f"<td>{escape(index)}</td><td>{escape(pid)}</td>"
                f'<td class="mono">{escape(to)}</td>'
                f"<td class=n>{escape(_amount_cell(d, 'expected', dec))}</td>"
                f"<td class=n>{escape(_amount_cell(d, 'paid', dec))}</td>"
                f"<td>{escape(_finding_detail(d, dec))}</td></tr>")
        out.append("</table>")
        if len(r.discrepancies) > HTML_FINDINGS_MAX:
            out.append(f'<p class="note">… and {len(r.discrepancies) - HTML_FINDINGS_MAX:,} '
                       "more: see the JSON or CSV report.</p>")

    out.append("<h2>Manifests and signers</h2><table><tr><th>paymentsRoot</th><th>program"
               "</th><th>payments</th><th>total</th><th>paid</th><th>not after</th>"
               "<th>signers</th><th>from</th></tr>")
    for m in r.manifests:
        signers = "<br>".join(escape(x) for x in m.signers) or "-"
        out.append(f'<tr><td class="mono">{escape(m.root)}</td><td>{escape(m.program)}</td>'
                   f"<td class=n>{m.count:,}</td><td class=n>{escape(tokens(m.total, dec))}</td>"
                   f"<td class=n>{escape(tokens(m.paid_total, dec))}</td>"
                   f"<td>{escape(when(m.not_after))}</td><td class=mono>{signers}</td>"
                   f"<td>{escape(', '.join(m.sources))}</td></tr>")
    out.append("</table>")
    out.append('<p class="note">Amounts in tokens. Generated by disburser reconcile; the '
               "chain is the truth, the ledger only adds attribution.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
