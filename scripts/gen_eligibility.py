#!/usr/bin/env python3
"""Write realistic synthetic inputs for ``disburser allocate``.

    python scripts/gen_eligibility.py --users 300000 --rows 1000000 --seed 1 --out /tmp/elig

writes into OUT: liquidations.csv, snapshot.csv, compensated.csv, addresses.csv,
factors.csv, and expected.csv (the boundary users below and the reason each must get under
the default policy).

- The first users are boundary cases, one rule each: a loss of exactly $50 and of $49.99,
  a ratio of exactly 30 % and of 29.99 %, times on each window edge and one second
  outside, spot/options only, compensated, no snapshot, net assets 0 and negative, no
  address, a mis-checksummed, zero or short address, lower/upper case addresses, factors.
- The others get heavy-tailed losses (lognormal, with a Pareto tail for whales) written as
  exact decimal strings with 2 places, times mostly inside the window (Z, +00:00, some
  fractional seconds), some spot/options rows, ~2 % compensated, ~1 % without a snapshot,
  ~0.5 % with net assets <= 0, ~1 % without an address, ~0.3 % with an invalid one, ~5 %
  with a factor, ~2 % never liquidated (snapshot and address only).
- Addresses are keccak(address-seed, user id)'s last 20 bytes: fresh, no keys exist.
- The same arguments give byte-identical files (``random.Random(seed)``, sorted output).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_START = (datetime(2025, 10, 10, tzinfo=UTC) - EPOCH) // timedelta(seconds=1)
WINDOW_SECONDS = 2 * 86400  # 2025-10-10 00:00:00 .. 2025-10-11 23:59:59 inclusive
IN = "2025-10-10T12:00:00Z"


@dataclass(frozen=True)
class Case:
    """A boundary user: its rows, snapshot, address kind, factor, and expected reason."""

    name: str
    expected: str
    rows: tuple[tuple[str, str, str], ...] = ((IN, "futures", "100.00"),)  # time, product, loss
    net: str | None = "100.00"
    compensated: bool = False
    address: str = "checksummed"  # checksummed|lower|upper|none|empty|bad_checksum|zero|short
    factor: str | None = None


CASES: tuple[Case, ...] = (
    Case("loss_exactly_min", "in_manifest", ((IN, "futures", "50.00"),)),
    Case("loss_one_cent_below_min", "below_min_loss", ((IN, "futures", "49.99"),)),
    Case("loss_min_in_two_rows", "in_manifest", ((IN, "futures", "25.00"), (IN, "margin", "25"))),
    Case(
        "loss_min_half_outside",
        "below_min_loss",
        ((IN, "futures", "30.00"), ("2025-10-12T00:00:00Z", "futures", "30.00")),
    ),
    Case("ratio_exactly_30", "in_manifest", ((IN, "margin", "300.00"),), net="1000.00"),
    Case("ratio_29_99", "below_loss_ratio", ((IN, "margin", "299.90"),), net="1000.00"),
    Case("ratio_just_below_30", "below_loss_ratio", ((IN, "margin", "299.99"),), net="1000.00"),
    Case("ratio_exactly_60", "in_manifest", ((IN, "futures", "600.00"),), net="1000.00"),
    Case("ratio_59_99", "in_manifest", ((IN, "futures", "599.90"),), net="1000.00"),
    Case("ratio_exactly_90", "in_manifest", ((IN, "futures", "900.00"),), net="1000.00"),
    Case("ratio_over_100", "in_manifest", ((IN, "futures", "5000.00"),), net="1000.00"),
    Case("time_end_edge_in", "in_manifest", (("2025-10-11T23:59:59Z", "futures", "100.00"),)),
    Case("time_end_edge_out", "outside_window", (("2025-10-12T00:00:00Z", "futures", "100.00"),)),
    Case("time_start_edge_in", "in_manifest", (("2025-10-10T00:00:00Z", "margin", "100.00"),)),
    Case("time_start_edge_out", "outside_window", (("2025-10-09T23:59:59Z", "margin", "100.00"),)),
    Case(
        "time_end_fraction_in",
        "in_manifest",
        (("2025-10-11T23:59:59.999999Z", "futures", "100.00"),),
    ),
    Case("time_offset_form_in", "in_manifest", (("2025-10-11T23:59:59+00:00", "futures", "100"),)),
    Case(
        "time_offset_form_out",
        "outside_window",
        (("2025-10-12T00:00:00+00:00", "futures", "100"),),
    ),
    Case("spot_only", "no_futures_or_margin", ((IN, "spot", "100000.00"),)),
    Case("options_only", "no_futures_or_margin", ((IN, "options", "100000.00"),)),
    Case(
        "spot_does_not_count",
        "below_min_loss",
        ((IN, "spot", "100000.00"), (IN, "futures", "49.99")),
    ),
    Case("product_upper_case", "in_manifest", ((IN, "MARGIN", "100.00"),)),
    Case("compensated", "compensated", compensated=True),
    Case("compensated_below_min", "below_min_loss", ((IN, "futures", "10.00"),), compensated=True),
    Case("no_snapshot", "no_snapshot", net=None),
    Case("net_assets_zero", "non_positive_net_assets", net="0.00"),
    Case("net_assets_negative", "non_positive_net_assets", net="-10.00"),
    Case("no_address", "no_address", address="none"),
    Case("empty_address", "no_address", address="empty"),
    Case("address_bad_checksum", "invalid_address", address="bad_checksum"),
    Case("address_zero", "invalid_address", address="zero"),
    Case("address_short", "invalid_address", address="short"),
    Case("address_lower_case", "in_manifest", address="lower"),
    Case("address_upper_case", "in_manifest", address="upper"),
    Case("factor_zero", "zero_amount", factor="0"),
    Case("factor_one_and_half", "in_manifest", factor="1.5"),
    Case("never_liquidated", "no_liquidation", rows=()),
    Case(
        "ineligible_without_address", "below_min_loss", ((IN, "futures", "1.00"),), address="none"
    ),
)


# (cumulative probability, value)
PRODUCTS = ((0.55, "futures"), (0.90, "margin"), (0.96, "spot"), (1.0, "options"))
ADDRESS_KINDS = (
    (0.010, "none"), (0.011, "bad_checksum"), (0.012, "zero"), (0.013, "short"),
    (0.100, "lower"), (1.0, "checksummed"),
)  # fmt: skip


def pick(rng: random.Random, table: Sequence[tuple[float, str]]) -> str:
    r = rng.random()
    return next(value for limit, value in table if r < limit)


def user_ids(n: int) -> list[str]:
    width = max(6, len(str(n)))
    return [f"user-{i:0{width}d}" for i in range(1, n + 1)]


def fresh_address(address_seed: str, user_id: str) -> str:
    """A deterministic, keyless address: the last 20 bytes of keccak(seed/user)."""
    return "0x" + keccak(text=f"{address_seed}/{user_id}")[-20:].hex()


def render_address(kind: str, address_seed: str, user_id: str) -> str | None:
    lower = fresh_address(address_seed, user_id)
    if kind == "none":
        return None
    if kind == "empty":
        return ""
    if kind == "lower":
        return lower
    if kind == "upper":
        return "0x" + lower[2:].upper()
    if kind == "zero":
        return "0x" + "0" * 40
    if kind == "short":
        return lower[:-2]
    checksummed: str = to_checksum_address(lower)
    if kind == "bad_checksum":
        # Flip the case of one letter: a typo EIP-55 exists to catch.
        for i, ch in enumerate(checksummed[2:], 2):
            if ch.isalpha():
                typo = checksummed[:i] + ch.swapcase() + checksummed[i + 1 :]
                if typo[2:] not in (typo[2:].lower(), typo[2:].upper()):  # still mixed case
                    return typo
        return "0x" + "aB" * 20  # no such letter: vanishingly rare; a wrong mixed case will do
    return checksummed


def fmt_cents(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    q, r = divmod(abs(cents), 100)
    return f"{sign}{q}.{r:02d}"


def fmt_time(rng: random.Random, epoch: int) -> str:
    text = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    style = rng.random()
    if style < 0.80:
        return text + "Z"
    if style < 0.95:
        return text + "+00:00"
    return f"{text}.{rng.randrange(1000):03d}Z"


def random_loss_cents(rng: random.Random) -> int:
    if rng.random() < 0.01:  # whales: Pareto tail from $20k
        cents = int(2_000_000 * rng.paretovariate(1.3))
    else:
        cents = int(rng.lognormvariate(10.0, 1.8))  # median ~ $220
    return min(max(cents, 1), 5_000_000_000)  # $0.01 .. $50M


def generate(users: int, rows: int, seed: int, out: Path, address_seed: str | None = None) -> None:
    """Write the input files for ``users`` users and exactly ``rows`` liquidation rows."""
    rng = random.Random(seed)
    aseed = str(seed) if address_seed is None else address_seed
    ids = user_ids(users)
    cases = CASES[: min(users, len(CASES))]
    regular = ids[len(cases) :]

    liq: list[tuple[int, str, str, str, str]] = []  # (sort key, time, user, product, loss)
    net: dict[str, str | None] = {}
    comp: list[str] = []
    addr_kind: dict[str, str] = {}
    factor: dict[str, str] = {}
    expected: list[tuple[str, str, str]] = []

    for uid, case in zip(ids, cases, strict=False):
        for t, product, loss in case.rows:
            key = (datetime.fromisoformat(t) - EPOCH) // timedelta(microseconds=1)
            liq.append((key, t, uid, product, loss))
        net[uid] = case.net
        if case.compensated:
            comp.append(uid)
        addr_kind[uid] = case.address
        if case.factor is not None:
            factor[uid] = case.factor
        expected.append((uid, case.name, case.expected))

    liquidated = [uid for uid in regular if rng.random() >= 0.02]
    spare = rows - len(liq) - len(liquidated)
    if spare < 0:
        raise SystemExit(
            f"--rows {rows} is too few: {len(liq) + len(liquidated)} needed for {users} users"
        )
    per_user = dict.fromkeys(liquidated, 1)
    if liquidated:
        # Skewed: a few users are liquidated many times (cascading partial liquidations).
        for _ in range(spare):
            i = int(len(liquidated) * rng.random() ** 2)
            per_user[liquidated[i]] += 1

    in_window_loss: dict[str, int] = {}
    for uid in liquidated:
        total = 0
        for _ in range(per_user[uid]):
            product = pick(rng, PRODUCTS)
            inside = rng.random() < 0.93
            if inside:
                epoch = WINDOW_START + rng.randrange(WINDOW_SECONDS)
            elif rng.random() < 0.5:
                epoch = WINDOW_START - 1 - rng.randrange(3 * 86400)
            else:
                epoch = WINDOW_START + WINDOW_SECONDS + rng.randrange(3 * 86400)
            cents = random_loss_cents(rng)
            if inside and product in ("futures", "margin"):
                total += cents
            liq.append((epoch * 1_000_000, fmt_time(rng, epoch), uid, product, fmt_cents(cents)))
        in_window_loss[uid] = total

    for uid in regular:
        r = rng.random()
        window_loss = in_window_loss.get(uid, 0)
        if r < 0.01:
            net[uid] = None
        elif r < 0.015:
            net[uid] = fmt_cents(-rng.randrange(0, 100_000) if rng.random() < 0.5 else 0)
        elif window_loss > 0:
            # Loss ratio from 5 % to 150 %, so the 30 % line cuts through the crowd.
            net[uid] = fmt_cents(max(1, window_loss * 100 // rng.randint(5, 150)))
        else:
            net[uid] = fmt_cents(int(rng.lognormvariate(11.0, 1.5)))
        if rng.random() < 0.02:
            comp.append(uid)
        addr_kind[uid] = pick(rng, ADDRESS_KINDS)
        if rng.random() < 0.05:
            factor[uid] = ("0.5", "0.75", "1.25", "1.5", "2", "0")[rng.randrange(6)]

    out.mkdir(parents=True, exist_ok=True)
    liq.sort()
    _write(out / "liquidations.csv", ("user_id", "time", "product", "loss_usd"),
           ((u, t, p, loss) for _, t, u, p, loss in liq))  # fmt: skip
    _write(out / "snapshot.csv", ("user_id", "net_assets_usd"),
           ((u, v) for u, v in sorted(net.items()) if v is not None))  # fmt: skip
    _write(out / "compensated.csv", ("user_id",), ((u,) for u in sorted(comp)))
    addresses = []
    for uid in sorted(addr_kind):
        a = render_address(addr_kind[uid], aseed, uid)
        if a is not None:
            addresses.append((uid, a))
    _write(out / "addresses.csv", ("user_id", "address"), addresses)
    _write(out / "factors.csv", ("user_id", "factor"), sorted(factor.items()))
    _write(out / "expected.csv", ("user_id", "case", "expected_reason"), expected)


def _write(path: Path, header: Sequence[str], rows: object) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", type=int, required=True, help="number of users")
    ap.add_argument("--rows", type=int, required=True, help="number of liquidation rows")
    ap.add_argument("--seed", type=int, required=True, help="random seed")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--address-seed", help="seed of the payout addresses (default: --seed)")
    args = ap.parse_args(argv)
    if args.users < 1 or args.rows < 0:
        ap.error("--users must be >= 1 and --rows >= 0")
    generate(args.users, args.rows, args.seed, args.out, args.address_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
