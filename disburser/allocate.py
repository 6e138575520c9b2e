"""Eligibility rules and the amount policy: liquidation records in, payments and a report out.

Inputs (CSV, UTF-8, a header row; columns are found by name, extra columns are ignored,
surrounding spaces are stripped from every field):

- liquidations ``user_id,time,product,loss_usd``: one forced liquidation.
- snapshot ``user_id,net_assets_usd``: net assets at the 2025-10-09 23:59 UTC snapshot
  (may be zero or negative; one row per user).
- compensated ``user_id``: users already reimbursed (repeats are harmless).
- addresses ``user_id,address``: the payout address (one row per user; may be empty).
- factors ``user_id,factor`` (optional): the "additional factors" multiplier, default 1.

Reading
-------
- Money is exact: USD amounts are read into integer micro-dollars (6 places) with
  ``parse_units``; a value with more than 6 significant decimal places is refused, never
  rounded, so no loss is silently changed. Factors are read the same way (micro-units,
  ``"1.5"`` is 1_500_000). No float is used anywhere.
- ``time`` is ISO-8601 as read by ``datetime.fromisoformat`` and must carry a zero UTC
  offset (``Z``, ``+00:00``, ``+0000``...). A time without an offset is refused ("no time
  zone") rather than guessed; any other offset is refused ("not UTC").
- ``product`` is compared in NFKC, case-folded: ``futures`` and ``margin`` count,
  ``spot`` and ``options`` do not (the policy's ``products_counted`` and
  ``products_not_counted``); any other label is refused, naming its line, rather than taken
  for a product that does not count.
- A user id is 1-128 printable characters (it becomes the manifest payment id), compared
  exactly (ids may differ by case alone). An id in the compensated or factors file that is
  no liquidated user's but differs from one only by case or Unicode form (NFKC,
  case-folded), where that one has no row of its own, is refused: "alice" compensated
  would leave "Alice" paid again. (In the snapshot or addresses file such an id leaves the
  liquidated user without a snapshot or an address: unpaid, and so reported.)
- Bad input raises ``InputError`` with one line ``FILE:LINE: COLUMN: problem`` where LINE
  is the 1-based line in the file (the header is line 1); see ``_where``.

Rules (the first that fails is the user's ``reason``, in this order)
-------------------------------------------------------------------
Only futures/margin liquidations with ``window_start <= time <= window_end`` count; the ends
are included to the second (23:59:59.5 is inside the second 23:59:59, 00:00:00 next day is
not). ``loss`` is the sum of their ``loss_usd``.

1. ``no_liquidation``          the user is in no liquidation row
2. ``no_futures_or_margin``    only other products (spot, options...)
3. ``outside_window``          futures/margin rows, none inside the window
4. ``below_min_loss``          loss < min_loss_usd ($50)
5. ``no_snapshot``             no snapshot row
6. ``non_positive_net_assets`` net assets <= 0
7. ``below_loss_ratio``        loss * 10_000 < min_ratio_bps * net assets (30 %), in integers
8. ``compensated``             listed in compensated
   Otherwise the user is eligible and owed an amount; then:
9. ``zero_amount``             the amount after scaling is 0 (factor 0, say)
10. ``no_address`` / ``invalid_address`` / ``refused_address``  no (or empty) address row /
   not a usable address: not ``0x`` + 40 hex digits, a mixed-case address failing its EIP-55
   checksum, or the zero address / an address no payment may go to (the token, the payer,
   the batch contract). All-lower or all-upper case is accepted and checksummed.
11. ``in_manifest``            paid by this manifest.
Eligible users of 9-10 stay in the report with their amount and count against the fund, so a
later manifest can pay them under the same ceiling.

Amount policy (every number configurable)
-----------------------------------------
    amount = floor(min(loss, cap_usd) * factor * weight(ratio))    in token base units

``weight`` is the ``weight_bps`` of the highest tier whose ``min_ratio_bps`` the loss ratio
reaches (``loss * 10_000 >= min_ratio_bps * net``). Defaults: no cap; tiers ratio >= 90 % ->
100 %, >= 60 % -> 90 %, >= 30 % -> 80 %. It is monotone in a user's loss: a larger loss gives
a larger-or-equal capped loss and, net assets fixed, a larger-or-equal ratio, hence weight;
tier weights are required to be non-decreasing for that reason. One floor, at the end.

Fund ceiling: if the amounts of all eligible users (addresses or not) sum to more than the
fund, each becomes ``floor(amount * fund / sum)``: the total stays <= fund, no amount grows,
and a user's own amount still never decreases as their loss grows (a' / (S + a' - a) >= a / S
because S >= a).

Policy TOML (all keys optional; unknown keys refused)::

    fund_usd = "300000000"                  # string or integer, USD
    min_loss_usd = "50"
    min_ratio_bps = 3000                    # 30 %
    window_start = "2025-10-10T00:00:00Z"   # inclusive, whole seconds, UTC
    window_end = "2025-10-11T23:59:59Z"     # inclusive
    cap_usd = "1000000"                     # absent: no cap
    [[tiers]]                               # replaces the default tiers if given
    min_ratio_bps = 3000                    # the lowest tier must be <= min_ratio_bps
    weight_bps = 8000                       # 0..10000, non-decreasing with min_ratio_bps
    products_counted = ["futures", "margin"]   # replaces the default list if given
    products_not_counted = ["spot", "options"] # the same; any other label is refused

Report (``write_report``): one row per user seen in any input, by user_id::

    user_id,decision,reason,total_loss_usd,net_assets_usd,loss_ratio,factor,
    amount_before,amount_after,address

``decision`` is ``eligible`` or ``ineligible``; ``reason`` as above; USD figures exact;
``loss_ratio`` is loss / net assets rounded *down* to 6 places (so ``0.300000`` really is
>= 30 %), empty without a positive net; amounts are token amounts (``format_units``);
``address`` is checksummed when valid, as written when not, empty when absent.

Everything is deterministic: users are processed and reported in ``user_id`` order (code
point order) and payments are indexed in that order.
"""

from __future__ import annotations

import csv
import enum
import os
import tomllib
import unicodedata
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from disburser import csvcell
from disburser.addresses import checksum_address
from disburser.amounts import format_units, parse_units
from disburser.domain import Payment
from disburser.errors import InputError

USD_DECIMALS = 6  # micro-dollars: the unit of every USD figure below
ONE_USD = 1_000_000  # 10**USD_DECIMALS
FACTOR_DECIMALS = 6
ONE_FACTOR = 1_000_000  # 10**FACTOR_DECIMALS
BPS = 10_000
RATIO_PLACES = 6  # the report's loss_ratio column
MAX_ID_LENGTH = 128

LIQUIDATION_COLUMNS = ("user_id", "time", "product", "loss_usd")
SNAPSHOT_COLUMNS = ("user_id", "net_assets_usd")
COMPENSATED_COLUMNS = ("user_id",)
ADDRESS_COLUMNS = ("user_id", "address")
FACTOR_COLUMNS = ("user_id", "factor")
REPORT_COLUMNS = (
    "user_id", "decision", "reason", "total_loss_usd", "net_assets_usd", "loss_ratio",
    "factor", "amount_before", "amount_after", "address",
)  # fmt: skip

COUNTED_PRODUCTS = frozenset({"futures", "margin"})
OTHER_PRODUCTS = frozenset({"spot", "options"})


def fold(text: str) -> str:
    """How labels and user ids are compared for sameness: NFKC, case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()

# What the liquidation file says about a user, before amounts are looked at.
SEEN_OTHER_PRODUCT = 0  # only rows of products that do not count
SEEN_OUTSIDE_WINDOW = 1  # futures/margin rows, none inside the window
SEEN_IN_WINDOW = 2  # at least one futures/margin row inside the window


class Reason(enum.StrEnum):
    """Why a user got what they got; the first rule that fails, in this order."""

    # Not in the liquidation file at all (only in snapshot, addresses, compensated, factors).
    NO_LIQUIDATION = "no_liquidation"
    # Liquidated only on products that do not count (spot, options...).
    NO_FUTURES_OR_MARGIN = "no_futures_or_margin"
    # Futures/margin liquidations, but none inside the window.
    OUTSIDE_WINDOW = "outside_window"
    # Loss inside the window below min_loss_usd.
    BELOW_MIN_LOSS = "below_min_loss"
    # No snapshot row, so no loss ratio.
    NO_SNAPSHOT = "no_snapshot"
    # Net assets <= 0 at the snapshot: the ratio is undefined.
    NON_POSITIVE_NET_ASSETS = "non_positive_net_assets"
    # Loss below min_ratio_bps of net assets.
    BELOW_LOSS_RATIO = "below_loss_ratio"
    # In the compensated list.
    COMPENSATED = "compensated"
    # Eligible, but the amount (after scaling) rounds to zero: nothing to pay.
    ZERO_AMOUNT = "zero_amount"
    # Eligible and owed, no address on file: left for a later manifest.
    NO_ADDRESS = "no_address"
    # Eligible and owed, the address is unusable: left for a later manifest.
    INVALID_ADDRESS = "invalid_address"
    # A valid address no payment may go to: the token, the payer, the batch contract.
    REFUSED_ADDRESS = "refused_address"
    # Eligible and paid by this manifest.
    IN_MANIFEST = "in_manifest"


@dataclass(frozen=True, slots=True)
class Tier:
    """Users whose loss ratio reaches ``min_ratio_bps`` get ``weight_bps`` of their loss."""

    min_ratio_bps: int
    weight_bps: int


DEFAULT_TIERS = (Tier(3000, 8000), Tier(6000, 9000), Tier(9000, 10000))


@dataclass(frozen=True)
class Policy:
    """The eligibility thresholds and the amount policy. USD figures in micro-dollars."""

    fund_usd: int = 300_000_000 * ONE_USD
    min_loss_usd: int = 50 * ONE_USD
    min_ratio_bps: int = 3000
    window_start: datetime = datetime(2025, 10, 10, 0, 0, 0, tzinfo=UTC)
    window_end: datetime = datetime(2025, 10, 11, 23, 59, 59, tzinfo=UTC)
    cap_usd: int | None = None
    tiers: tuple[Tier, ...] = field(default=DEFAULT_TIERS)
    # Product labels (compared in NFKC, case-folded): those whose liquidations count, and
    # those known not to. Any other label is refused: "perpetual" or "USDT-M futures" read as
    # spot dropped users the fund is for, with nothing said.
    products_counted: frozenset[str] = COUNTED_PRODUCTS
    products_not_counted: frozenset[str] = OTHER_PRODUCTS

    def __post_init__(self) -> None:
        problem = _policy_problem(self)
        if problem is not None:
            raise InputError(f"policy: {problem}")

    def weight_bps(self, loss: int, net_assets: int) -> int:
        """The tier weight for this loss ratio (net_assets > 0); 0 below every tier."""
        weight = 0
        for tier in self.tiers:
            if loss * BPS >= tier.min_ratio_bps * net_assets:
                weight = tier.weight_bps
        return weight

    def amount(self, loss: int, net_assets: int, factor: int, decimals: int) -> int:
        """Base units owed to an eligible user: floor(min(loss, cap) * factor * weight).

        ``loss`` and ``net_assets`` in micro-USD (net_assets > 0), ``factor`` in millionths.
        """
        capped = loss if self.cap_usd is None else min(loss, self.cap_usd)
        weight = self.weight_bps(loss, net_assets)
        unit: int = 10**decimals
        return capped * factor * weight * unit // (ONE_USD * ONE_FACTOR * BPS)

    def fund(self, decimals: int) -> int:
        """The fund in base units (1 USD = 1 token), rounded down."""
        unit: int = 10**decimals
        return self.fund_usd * unit // ONE_USD


def _policy_problem(p: Policy) -> str | None:
    if p.fund_usd <= 0:
        return "fund_usd must be greater than 0"
    if p.min_loss_usd < 0:
        return "min_loss_usd must not be negative"
    if p.min_ratio_bps < 0:
        return "min_ratio_bps must not be negative"
    if p.cap_usd is not None and p.cap_usd <= 0:
        return "cap_usd must be greater than 0 (leave it out for no cap)"
    for name, when in (("window_start", p.window_start), ("window_end", p.window_end)):
        if when.utcoffset() != timedelta(0):
            return f"{name} must be a UTC time"
        if when.microsecond:
            return f"{name} must be a whole second"
    if p.window_start > p.window_end:
        return "window_start is after window_end"
    if not p.tiers:
        return "tiers must not be empty"
    prev: Tier | None = None
    for t in p.tiers:
        if t.min_ratio_bps < 0 or not 0 <= t.weight_bps <= BPS:
            return f"tier {t.min_ratio_bps}: weight_bps must be 0..10000, min_ratio_bps >= 0"
        if prev is not None:
            if t.min_ratio_bps <= prev.min_ratio_bps:
                return "tiers must have distinct min_ratio_bps, in increasing order"
            if t.weight_bps < prev.weight_bps:
                # A higher ratio paying less would make amounts fall as a loss grows.
                return "tier weights must not decrease as min_ratio_bps increases"
        prev = t
    if p.tiers[0].min_ratio_bps > p.min_ratio_bps:
        return "the lowest tier's min_ratio_bps must be <= min_ratio_bps"
    if not p.products_counted:
        return "products_counted must not be empty"
    for key, labels in (("products_counted", p.products_counted),
                        ("products_not_counted", p.products_not_counted)):
        for x in sorted(labels):
            if not x.strip() or x != x.strip() or fold(x) != x:
                return (f"{key}: {x!r}: a label must be non-empty, without surrounding "
                        "spaces, in lower case (NFKC)")
    if both := sorted(p.products_counted & p.products_not_counted):
        return f"product {both[0]!r} is in both products_counted and products_not_counted"
    return None


_POLICY_KEYS = (
    "fund_usd", "min_loss_usd", "min_ratio_bps", "window_start", "window_end", "cap_usd",
    "tiers", "products_counted", "products_not_counted",
)  # fmt: skip
_TIER_KEYS = ("min_ratio_bps", "weight_bps")


def load_policy(path: Path | None) -> Policy:
    """Read a policy TOML file; ``None`` gives the default policy. Raises InputError."""
    if path is None:
        return Policy()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    for key in data:
        if key not in _POLICY_KEYS:
            raise InputError(f"{path}: unknown key {key!r} (known: {', '.join(_POLICY_KEYS)})")
    kw: dict[str, Any] = {}
    for key in ("fund_usd", "min_loss_usd", "cap_usd"):
        if key in data:
            kw[key] = _toml_usd(data[key], f"{path}: {key}")
    if "min_ratio_bps" in data:
        kw["min_ratio_bps"] = _toml_int(data["min_ratio_bps"], f"{path}: min_ratio_bps")
    for key in ("window_start", "window_end"):
        if key in data:
            kw[key] = _toml_time(data[key], f"{path}: {key}")
    for key in ("products_counted", "products_not_counted"):
        if key in data:
            labels = data[key]
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise InputError(f"{path}: {key} must be an array of strings")
            kw[key] = frozenset(fold(x.strip()) for x in labels)
    if "tiers" in data:
        tiers = data["tiers"]
        if not isinstance(tiers, list) or not all(isinstance(t, dict) for t in tiers):
            raise InputError(f"{path}: tiers must be an array of tables ([[tiers]])")
        parsed = []
        for n, t in enumerate(tiers, 1):
            where = f"{path}: tiers[{n}]"
            for key in t:
                if key not in _TIER_KEYS:
                    raise InputError(
                        f"{where}: unknown key {key!r} (known: {', '.join(_TIER_KEYS)})"
                    )
            for key in _TIER_KEYS:
                if key not in t:
                    raise InputError(f"{where}: missing {key}")
            parsed.append(
                Tier(
                    _toml_int(t["min_ratio_bps"], f"{where}.min_ratio_bps"),
                    _toml_int(t["weight_bps"], f"{where}.weight_bps"),
                )
            )
        kw["tiers"] = tuple(sorted(parsed, key=lambda t: t.min_ratio_bps))
    try:
        return Policy(**kw)
    except InputError as e:
        raise InputError(f"{path}: {str(e).removeprefix('policy: ')}") from None


def _toml_usd(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InputError(f'{where}: write the amount as a string, e.g. "50"')
    if isinstance(value, int) and value < 0:
        raise InputError(f"{where}: must not be negative")
    return parse_units(str(value), USD_DECIMALS, where=where)


def _toml_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: must be an integer (basis points)")
    return value


def _toml_time(value: object, where: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InputError(f"{where}: {value!r} is not an ISO-8601 time") from None
    if not isinstance(value, datetime):
        raise InputError(f'{where}: must be a time such as "2025-10-10T00:00:00Z"')
    if value.tzinfo is None:
        raise InputError(f"{where}: {value.isoformat()!r} has no time zone (write Z)")
    if value.utcoffset() != timedelta(0):
        raise InputError(f"{where}: {value.isoformat()!r} is not UTC (write Z)")
    return value


# ---------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True, slots=True)
class Decision:
    """One user's line in the report. USD in micro-dollars, amounts in base units."""

    user_id: str
    eligible: bool
    reason: Reason
    total_loss: int  # futures/margin loss inside the window
    net_assets: int | None  # None: no snapshot row
    factor: int  # millionths: 1_000_000 is 1
    amount_before: int  # before fund scaling; 0 when not eligible
    amount_after: int  # after fund scaling (<= amount_before)
    address: str | None  # checksummed when valid, as given when not, None when absent

    @property
    def loss_ratio(self) -> str:
        """loss / net assets, rounded down to 6 places; "" when net assets <= 0 or unknown.

        Rounded down, so a ratio shown as 0.300000 really is at least 30 %."""
        if self.net_assets is None or self.net_assets <= 0:
            return ""
        q = self.total_loss * 10**RATIO_PLACES // self.net_assets
        whole, frac = divmod(q, 10**RATIO_PLACES)
        return f"{whole}.{frac:0{RATIO_PLACES}d}"


@dataclass(frozen=True)
class Allocation:
    """The result: every user's decision, and the payments of the (unsigned) manifest."""

    decisions: list[Decision]  # one per user seen in any input, by user_id
    payments: list[Payment]  # index 0..n-1, by user_id; amount > 0
    fund: int  # base units
    total: int  # sum of payments (this manifest), <= fund
    scaled: bool  # amounts were scaled down to fit the fund
    requested: int = 0  # sum of amount_before over eligible users
    owed: int = 0  # sum of amount_after over eligible users (paid here or later), <= fund


@dataclass(frozen=True)
class Records:
    """What the input files say, validated; USD in micro-dollars, factors in millionths."""

    seen: dict[str, int]  # user -> SEEN_* (liquidation file)
    losses: dict[str, int]  # user -> loss inside the window (only SEEN_IN_WINDOW users)
    net_assets: dict[str, int]
    compensated: frozenset[str]
    addresses: dict[str, str]  # as written (may be empty or invalid)
    factors: dict[str, int]


def allocate(
    liquidations: Path,
    snapshot: Path,
    compensated: Path,
    addresses: Path,
    factors: Path | None,
    policy: Policy,
    decimals: int = 6,
    refused: Collection[str] = (),
) -> Allocation:
    """Read the input files and decide every user's amount. Raises InputError on bad input."""
    records = read_records(liquidations, snapshot, compensated, addresses, factors, policy)
    return decide(records, policy, decimals, refused)


def decide(records: Records, policy: Policy, decimals: int = 6,
           refused: Collection[str] = ()) -> Allocation:
    """Apply the rules, the amount policy and the fund ceiling. Pure. ``refused``:
    checksummed addresses no payment may go to (the token, the payer, the batch contract):
    a user with one of them is ``refused_address`` (owed, for a later manifest), and the
    others are paid (one such row stopped the whole allocation)."""
    if decimals < 0:
        raise InputError(f"decimals must not be negative, got {decimals}")
    users = sorted(
        records.seen.keys()
        | records.net_assets.keys()
        | records.compensated
        | records.addresses.keys()
        | records.factors.keys()
    )
    # First pass: eligibility and the unscaled amount.
    first: list[tuple[str, Reason | None, int]] = []
    for uid in users:
        reason = _ineligible_reason(uid, records, policy)
        before = 0
        if reason is None:
            net = records.net_assets[uid]
            factor = records.factors.get(uid, ONE_FACTOR)
            before = policy.amount(records.losses[uid], net, factor, decimals)
        first.append((uid, reason, before))

    fund = policy.fund(decimals)
    requested = sum(before for _, reason, before in first if reason is None)
    scaled = requested > fund

    decisions: list[Decision] = []
    payments: list[Payment] = []
    owed = 0
    for uid, reason, before in first:
        address = records.addresses.get(uid) or None  # an empty cell is no address
        checksummed = None if address is None else checksum_address(address)
        after = 0
        if reason is None:
            # floor(a * F / S) with one common F / S: the total stays <= F, and a larger
            # own amount a never gives a smaller result (S grows by less than a does).
            after = before * fund // requested if scaled else before
            owed += after
            if after == 0:
                reason = Reason.ZERO_AMOUNT
            elif address is None:
                reason = Reason.NO_ADDRESS
            elif checksummed is None:
                reason = Reason.INVALID_ADDRESS
            elif checksummed in refused:
                reason = Reason.REFUSED_ADDRESS
            else:
                reason = Reason.IN_MANIFEST
                payments.append(Payment(len(payments), uid, checksummed, after))
            eligible = True
        else:
            eligible = False
        decisions.append(
            Decision(
                user_id=uid,
                eligible=eligible,
                reason=reason,
                total_loss=records.losses.get(uid, 0),
                net_assets=records.net_assets.get(uid),
                factor=records.factors.get(uid, ONE_FACTOR),
                amount_before=before,
                amount_after=after,
                address=checksummed or address,
            )
        )
    total = sum(p.amount for p in payments)
    assert total <= owed <= fund, "scaling must keep the total within the fund"
    return Allocation(decisions, payments, fund, total, scaled, requested, owed)


def _ineligible_reason(uid: str, r: Records, policy: Policy) -> Reason | None:
    seen = r.seen.get(uid)
    if seen is None:
        return Reason.NO_LIQUIDATION
    if seen == SEEN_OTHER_PRODUCT:
        return Reason.NO_FUTURES_OR_MARGIN
    if seen == SEEN_OUTSIDE_WINDOW:
        return Reason.OUTSIDE_WINDOW
    loss = r.losses[uid]
    if loss < policy.min_loss_usd:
        return Reason.BELOW_MIN_LOSS
    net = r.net_assets.get(uid)
    if net is None:
        return Reason.NO_SNAPSHOT
    if net <= 0:
        return Reason.NON_POSITIVE_NET_ASSETS
    if loss * BPS < policy.min_ratio_bps * net:
        return Reason.BELOW_LOSS_RATIO
    if uid in r.compensated:
        return Reason.COMPENSATED
    return None


# ---------------------------------------------------------------------------------------
# Reading the files


def read_records(
    liquidations: Path,
    snapshot: Path,
    compensated: Path,
    addresses: Path,
    factors: Path | None,
    policy: Policy,
) -> Records:
    """Read and validate every input file. Raises InputError naming file, line and column.
    An id of the other files that is no liquidated user's but differs from one only by case
    or Unicode form is refused (``_LiquidatedIds``)."""
    ids = _LiquidatedIds()
    seen, losses = _read_liquidations(liquidations, policy, ids)
    net_assets: dict[str, int] = {}
    for line, (uid, value) in _unique_rows(snapshot, SNAPSHOT_COLUMNS):
        net_assets[uid] = _usd(value, snapshot, line, "net_assets_usd")
    comp_lines: dict[str, int] = {}
    for line, (uid,) in _table(compensated, COMPENSATED_COLUMNS):
        comp_lines.setdefault(uid, line)
    ids.check(compensated, comp_lines)
    comp = frozenset(comp_lines)
    addr = {uid: a for _, (uid, a) in _unique_rows(addresses, ADDRESS_COLUMNS)}
    fac: dict[str, int] = {}
    fac_lines: dict[str, int] = {}
    if factors is not None:
        for line, (uid, value) in _unique_rows(factors, FACTOR_COLUMNS):
            fac_lines[uid] = line
            where = _where(factors, line, "factor")
            f = _signed(value, FACTOR_DECIMALS, where)
            if f < 0:
                raise InputError(f"{where}: {value!r} is negative")
            fac[uid] = f
        ids.check(factors, fac_lines)
    return Records(seen, losses, net_assets, comp, addr, fac)


def _read_liquidations(path: Path, policy: Policy, ids: _LiquidatedIds
                       ) -> tuple[dict[str, int], dict[str, int]]:
    seen: dict[str, int] = {}
    losses: dict[str, int] = {}
    start = policy.window_start
    # Times are compared to the second with both ends included: t is inside when
    # start <= t < end + 1 s (start is a whole second, so flooring t changes nothing there).
    end_excl = policy.window_end + timedelta(seconds=1)
    utc = UTC
    zero = timedelta(0)
    fromiso = datetime.fromisoformat
    counted, others = policy.products_counted, policy.products_not_counted
    known: dict[str, str] = {}  # label as written -> folded
    for line, (uid, time_text, product, loss_text) in _table(path, LIQUIDATION_COLUMNS,
                                                             ids):
        state = seen.get(uid)
        if state is None:
            state = seen[uid] = SEEN_OTHER_PRODUCT
        try:
            t = fromiso(time_text)
        except ValueError:
            raise InputError(
                f"{_where(path, line, 'time')}: {time_text!r} is not an ISO-8601 time"
            ) from None
        if t.tzinfo is utc and not time_text.endswith(_UTC_SUFFIXES):
            # Python 3.11 reads "+00:00:00.5" as UTC, dropping the fraction of the offset.
            raise InputError(
                f"{_where(path, line, 'time')}: {time_text!r} has an offset with seconds "
                "(write Z or +00:00)")
        if t.tzinfo is not utc:  # fromisoformat returns the utc singleton for Z / +00:00
            if t.tzinfo is None:
                raise InputError(
                    f"{_where(path, line, 'time')}: {time_text!r} has no time zone "
                    "(write Z or +00:00)"
                )
            if t.utcoffset() != zero:
                raise InputError(
                    f"{_where(path, line, 'time')}: {time_text!r} is not UTC (write Z or +00:00)"
                )
        if not product:
            raise InputError(f"{_where(path, line, 'product')}: empty")
        loss = _usd(loss_text, path, line, "loss_usd")
        if loss < 0:
            raise InputError(f"{_where(path, line, 'loss_usd')}: amount {loss_text!r} is negative")
        label = known.get(product)
        if label is None:
            label = known[product] = fold(product)
            if label not in counted and label not in others:
                raise InputError(
                    f"{_where(path, line, 'product')}: {product!r} is neither a product that "
                    f"counts ({', '.join(sorted(counted))}) nor one known not to "
                    f"({', '.join(sorted(others))}): say which in the policy "
                    "(products_counted / products_not_counted)")
        if label in counted:
            if start <= t < end_excl:
                losses[uid] = losses.get(uid, 0) + loss
                seen[uid] = SEEN_IN_WINDOW
            elif state == SEEN_OTHER_PRODUCT:
                seen[uid] = SEEN_OUTSIDE_WINDOW
    return seen, losses


_UTC_SUFFIXES = ("Z", "+00:00", "-00:00", "+0000", "-0000", "+00", "-00")


def _where(path: Path, line: int, column: str | None = None) -> str:
    """``FILE:LINE`` or ``FILE:LINE: COLUMN``, the prefix of every input error."""
    return f"{path}:{line}" if column is None else f"{path}:{line}: {column}"


def _signed(text: str, decimals: int, where: str) -> int:
    """An exact decimal with an optional leading minus, in units of 10**-decimals."""
    if text.startswith("-"):
        try:
            return -parse_units(text[1:], decimals, where=where)
        except InputError:
            pass  # fall through for parse_units' message about the whole text
    return parse_units(text, decimals, where=where)


def _usd(text: str, path: Path, line: int, column: str) -> int:
    """A signed USD amount in micro-dollars; the location is built only on error."""
    if text.isascii():
        # Fast path for the usual "1234.56" (a million rows): the same numbers parse_units
        # accepts, without a regex match per row. Anything else takes the full path.
        whole, dot, frac = text.partition(".")
        if whole.isdigit() and len(whole) <= 60 and (
                not dot or (frac.isdigit() and len(frac) <= USD_DECIMALS)):
            return int(whole) * ONE_USD + (int(frac.ljust(USD_DECIMALS, "0")) if frac else 0)
    try:
        return _signed(text, USD_DECIMALS, "")
    except InputError:
        return _signed(text, USD_DECIMALS, _where(path, line, column))  # raises, located


def _check_id(uid: str, path: Path, line: int) -> None:
    if not 0 < len(uid) <= MAX_ID_LENGTH or not uid.isprintable():
        raise InputError(
            f"{_where(path, line, 'user_id')}: {uid!r} is not 1-{MAX_ID_LENGTH} "
            "printable characters"
        )


def _unique_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """Rows of a file where each user appears at most once."""
    first_line: dict[str, int] = {}
    for line, row in _table(path, columns):
        uid = row[0]
        if uid in first_line:
            raise InputError(
                f"{_where(path, line, 'user_id')}: {uid!r} appears again "
                f"(first on line {first_line[uid]})"
            )
        first_line[uid] = line
        yield line, row


def _table(path: Path, columns: tuple[str, ...], ids: _LiquidatedIds | None = None
           ) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, fields)`` for each data row, fields in ``columns`` order, stripped.

    The first column is always ``user_id`` and is checked (1-128 printable characters; with
    ``ids``, added to them).
    Blank lines are skipped; a row with a different number of fields than the header is
    refused (a stray comma must not shift a loss into another column).
    """
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        reader = csv.reader(f)
        try:
            try:
                header = next(reader)
            except StopIteration:
                raise InputError(
                    f"{path}: empty file (expected a header line: {','.join(columns)})"
                ) from None
            names = [h.strip().lower() for h in header]
            for name in names:
                if name and names.count(name) > 1:
                    raise InputError(f"{_where(path, 1)}: column {name!r} appears twice")
            for col in columns:
                if col not in names:
                    raise InputError(
                        f"{_where(path, 1)}: missing column {col!r} "
                        f"(header is: {','.join(h.strip() for h in header)})"
                    )
            idx = [names.index(col) for col in columns]
            width = len(header)
            checked: set[str] = set()
            for row in reader:
                if len(row) != width:
                    if not row:
                        continue
                    raise InputError(
                        f"{_where(path, reader.line_num)}: expected {width} fields, "
                        f"found {len(row)}"
                    )
                fields = [row[i].strip() for i in idx]
                uid = fields[0]
                if uid not in checked:
                    _check_id(uid, path, reader.line_num)
                    checked.add(uid)
                    if ids is not None:
                        ids.add(uid, _where(path, reader.line_num))
                yield reader.line_num, fields
        except UnicodeDecodeError:
            # Text files decode by blocks, so reader.line_num may be early: find the line.
            raise InputError(f"{_where(path, _undecodable_line(path))}: not UTF-8 text") from None
        except csv.Error as e:
            raise InputError(f"{_where(path, reader.line_num)}: {e}") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None


class _LiquidatedIds:
    """The liquidations file's user ids, as written and folded (folded -> first as written,
    where). Ids may differ by case alone (an exchange's case-sensitive ids)."""

    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.folded: dict[str, tuple[str, str]] = {}

    def add(self, uid: str, where: str) -> None:
        self.exact.add(uid)
        self.folded.setdefault(fold(uid), (uid, where))

    def check(self, path: Path, rows: dict[str, int]) -> None:
        """``rows`` (id -> line) of a file that decides against a user (compensated) or
        scales an amount (factors): an id of no liquidated user that folds to one without a
        row of its own there is refused, since "alice" compensated left "Alice" paid again.
        (A snapshot or address missing that way leaves the user unpaid, in the report.)"""
        for uid, line in rows.items():
            if uid in self.exact:
                continue
            first = self.folded.get(fold(uid))
            if first is not None and first[0] not in rows:
                raise InputError(
                    f"{_where(path, line)}: user_id {uid!r} is no liquidated user's, but "
                    f"{first[0]!r} ({first[1]}) differs from it only by case or Unicode form "
                    "and has no row of its own here: if they are one user, write the id as "
                    "the liquidations file does")


def _undecodable_line(path: Path) -> int:
    """The number of the first line of ``path`` that is not UTF-8 (only called on error)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return 1  # not reached: the file did not decode as a whole


# ---------------------------------------------------------------------------------------
# The report


def write_report(allocation: Allocation, path: Path, decimals: int) -> None:
    """Write the eligibility report CSV (one row per user, by user_id), atomically.

    USD figures with up to 6 places, amounts as decimal token strings (``format_units``),
    factor as a decimal, loss_ratio rounded down to 6 places. Same allocation, same bytes.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n", quoting=csvcell.QUOTING)
            w.writerow(REPORT_COLUMNS)
            w.writerows(_report_row(d, decimals) for d in allocation.decisions)
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror})") from None


def _report_row(d: Decision, decimals: int) -> tuple[str, ...]:
    return (
        csvcell.text(d.user_id),  # a spreadsheet must not take an id for a formula
        "eligible" if d.eligible else "ineligible",
        str(d.reason),
        format_units(d.total_loss, USD_DECIMALS),
        "" if d.net_assets is None else format_units(d.net_assets, USD_DECIMALS),
        d.loss_ratio,
        format_units(d.factor, FACTOR_DECIMALS),
        format_units(d.amount_before, decimals),
        format_units(d.amount_after, decimals),
        csvcell.text(d.address or ""),  # as written when invalid: it comes from users
    )
