"""`disburser status`: what the ledger knows, summarised (plus the batch contract's allowance
when the node answers). Read-only."""

from __future__ import annotations

import json
import time
from typing import Any

from disburser.amounts import format_units
from disburser.domain import PaymentStatus, TxStatus
from disburser.ledger import Ledger


def status_data(ledger: Ledger, s: Any, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    txs = ledger.txs()
    confirmed = _recent_confirmations(ledger, {t.id: t.root for t in txs}, now)
    programs = []
    for prog in ledger.programs():
        # What acceptance checks against: the setting (the ledger's record, for a program a
        # DISBURSER_CEILING list does not name).
        recorded = int(prog.ceiling)
        ceiling = s.ceilings.for_program(prog.name, recorded)
        roots = [m.root for m in ledger.manifests(prog.name)]
        c = ledger.counts(roots)
        paid = c.amount_by_status.get(PaymentStatus.CONFIRMED.value, 0) + \
            c.amount_by_status.get(PaymentStatus.PAID_ELSEWHERE.value, 0)
        committed = ledger.committed(prog.name)
        settings_ceiling: int | None = None
        if not s.ceilings.from_setting and committed <= recorded < ceiling:
            # As reconcile: on a machine without the send's DISBURSER_CEILING (DESIGN's
            # default instead), the ceiling the manifests were accepted under, not room the
            # program never had.
            settings_ceiling, ceiling = ceiling, recorded
        done = c.by_status.get(PaymentStatus.CONFIRMED.value, 0) + \
            c.by_status.get(PaymentStatus.PAID_ELSEWHERE.value, 0)
        total = sum(c.by_status.values())
        rate = _rate(confirmed, set(roots), now, prog.started_at)
        failed = c.by_status.get(PaymentStatus.FAILED.value, 0)
        left = total - done - failed
        eta = now + left / rate if rate > 0 and left > 0 else (now if left == 0 else None)
        programs.append({
            "program": prog.name,
            "ceiling": str(ceiling),
            # Set when ``ceiling`` is the one recorded at acceptance, not the setting's.
            "settings_ceiling": None if settings_ceiling is None else str(settings_ceiling),
            "committed": str(committed),
            "paid": str(paid),
            "owed": str(committed - paid),
            "remaining_under_ceiling": str(ceiling - paid),
            # What a new manifest of this program may still total: acceptance checks the
            # ceiling against everything accepted, paid or not (invariant 2).
            "uncommitted": str(max(ceiling - committed, 0)),
            # A ceiling lowered below what was accepted: no new manifest fits, and `send`
            # refuses the program's manifests until it is raised again.
            "over_ceiling_by": str(max(committed - ceiling, 0)),
            "payments": {st.value: c.by_status.get(st.value, 0) for st in PaymentStatus},
            "started_at": prog.started_at,
            "deadline": prog.deadline,
            "rate_per_s": round(rate, 2),
            "projected_finish": int(eta) if eta is not None else None,
            # Failed payments are not paid by waiting: never on track while there are any.
            "on_track": eta is not None and eta <= prog.deadline and failed == 0,
            "all_paid": left == 0 and failed == 0,
            "manifests": roots,
        })
    in_flight = []
    for t in txs:
        if t.status in (TxStatus.PENDING.value, TxStatus.MINED.value):
            atts = ledger.attempts(t.id or 0)
            last = atts[-1] if atts else None
            in_flight.append({
                "nonce": t.nonce, "kind": t.kind, "status": t.status, "count": t.count,
                "amount": t.amount, "hash": last.hash if last else None,
                "max_fee": last.max_fee if last else None, "tip": last.tip if last else None,
                "attempts": len(atts), "block": t.block_number,
            })
    data: dict[str, Any] = {"programs": programs, "in_flight": in_flight,
                            "decimals": s.decimals}
    data["allowance"] = _allowance(s, ledger)
    return data


RATE_WINDOW = 600.0  # seconds of confirmations a rate is taken over


def _recent_confirmations(ledger: Ledger, tx_root: dict[int | None, str | None],
                          now: float) -> list[tuple[float, str | None, int]]:
    """(when, manifest root, payments) of each transaction confirmed in the last
    RATE_WINDOW seconds, in order: read once for every program."""
    out = []
    for e in ledger.events("tx_confirmed"):
        if e.ts >= now - RATE_WINDOW:
            data = json.loads(e.data)
            out.append((e.ts, tx_root.get(data.get("tx_id")), int(data.get("count", 0) or 0)))
    return out


def _rate(confirmed: list[tuple[float, str | None, int]], roots: set[str],
          now: float, started_at: float) -> float:
    """A program's payments (those of its manifests, ``roots``) confirmed per second over
    the last RATE_WINDOW seconds, or since the program started if that is later. Another
    program's run says nothing of this one's pace. (Divided by the time since the first
    confirmation in the window, it fell from 500/s to 0.8/s as the same ledger aged.)"""
    total = sum(n for _, root, n in confirmed if root in roots)
    if not total:
        return 0.0
    return total / max(now - max(now - RATE_WINDOW, started_at), 1.0)


def _allowance(s: Any, ledger: Ledger) -> str | None:
    if not s.batch_contract:
        return None
    payers = {t.payer for t in ledger.txs()}
    if len(payers) != 1:
        return None
    try:
        from disburser.chain import RpcChain, Transport

        c = RpcChain(s.rpc_url, Transport(s.rpc_url, retries=0, timeout=5.0))
        return str(c.allowance(s.token, payers.pop(), s.batch_contract))
    except Exception:  # noqa: BLE001 - status works without a node
        return None


def render_status(d: dict[str, Any]) -> str:
    dec = d["decimals"]
    lines: list[str] = []
    for p in d["programs"]:
        lines.append(f"program {p['program']}")
        lines.append(f"  ceiling     {format_units(int(p['ceiling']), dec)}" + (
            f" (recorded when its manifests were accepted; the settings say "
            f"{format_units(int(p['settings_ceiling']), dec)})" if p.get("settings_ceiling")
            else ""))
        lines.append(f"  committed   {format_units(int(p['committed']), dec)}")
        lines.append(f"  paid        {format_units(int(p['paid']), dec)}")
        lines.append(f"  owed        {format_units(int(p['owed']), dec)}")
        over = int(p["over_ceiling_by"])
        lines.append(f"  uncommitted {format_units(int(p['uncommitted']), dec)} " + (
            f"(OVER the ceiling by {format_units(over, dec)}: no new manifest fits)" if over
            else "(what a new manifest of this program may still total)"))
        pay = ", ".join(f"{k} {v}" for k, v in p["payments"].items() if v)
        lines.append(f"  payments    {pay or 'none'}")
        lines.append(f"  rate        {p['rate_per_s']}/s")
        fin = p["projected_finish"]
        fin_s = ("all paid" if p["all_paid"] else
                 time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(fin)) if fin else "unknown")
        dl = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(p["deadline"]))
        failed = p["payments"].get(PaymentStatus.FAILED.value, 0)
        track = (", on track" if p["on_track"] else
                 f", NOT on track: {failed} failed (see OPERATIONS, --retry-failed)" if failed
                 else "" if p["all_paid"] else
                 ", NOT on track: projected after the deadline" if fin else
                 ", NOT on track: nothing confirmed in the last "
                 f"{int(RATE_WINDOW) // 60} min")
        hours = (p["deadline"] - p["started_at"]) // 3600
        lines.append(f"  finish      {fin_s} (deadline {dl}, {hours} h from the program's "
                     f"first manifest{track})")
    if d.get("allowance") is not None:
        lines.append(f"allowance of the batch contract: {format_units(int(d['allowance']), dec)}")
    if d["in_flight"]:
        lines.append("in flight:")
        for t in d["in_flight"]:
            lines.append(f"  nonce {t['nonce']} {t['kind']} {t['status']} {t['count']} payments "
                         f"max_fee {t['max_fee']} tip {t['tip']} attempts {t['attempts']} "
                         f"{t['hash']}")
    else:
        lines.append("in flight: none")
    return "\n".join(lines)
