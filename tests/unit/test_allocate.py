"""Allocation: every eligibility rule on its boundary, every bad input's exact message, the
amount policy, the fund ceiling, determinism, and properties (total <= fund, monotone in a
user's own loss, scaling never raises an amount)."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from disburser.allocate import (
    ONE_FACTOR,
    ONE_USD,
    SEEN_IN_WINDOW,
    Allocation,
    Policy,
    Reason,
    Records,
    Tier,
    _signed,
    _usd,
    allocate,
    checksum_address,
    decide,
    fold,
    load_policy,
    write_report,
)
from disburser.errors import InputError

IN = "2025-10-10T12:00:00Z"


def addr(seed: str) -> str:
    """A fresh checksummed address, fixed for a seed."""
    return str(to_checksum_address("0x" + keccak(text=seed)[-20:].hex()))


def usd(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * ONE_USD + int(frac.ljust(6, "0") or "0")


@dataclass
class Files:
    """Input files in a directory; rows are lists of CSV lines without the header."""

    root: Path
    liquidations: list[str] = field(default_factory=list)
    snapshot: list[str] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    factors: list[str] | None = None

    def user(
        self,
        uid: str,
        *rows: tuple[str, str, str],
        net: str | None = "100",
        address: str | None = "valid",
        compensated: bool = False,
        factor: str | None = None,
    ) -> None:
        """A user with liquidation rows (time, product, loss) and everything else valid."""
        self.liquidations += [f"{uid},{t},{p},{loss}" for t, p, loss in rows]
        if net is not None:
            self.snapshot.append(f"{uid},{net}")
        if address is not None:
            self.addresses.append(f"{uid},{addr(uid) if address == 'valid' else address}")
        if compensated:
            self.compensated.append(uid)
        if factor is not None:
            self.factors = (self.factors or []) + [f"{uid},{factor}"]

    def paths(self) -> tuple[Path, Path, Path, Path, Path | None]:
        def put(name: str, header: str, rows: list[str]) -> Path:
            path = self.root / name
            path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
            return path

        return (
            put("liquidations.csv", "user_id,time,product,loss_usd", self.liquidations),
            put("snapshot.csv", "user_id,net_assets_usd", self.snapshot),
            put("compensated.csv", "user_id", self.compensated),
            put("addresses.csv", "user_id,address", self.addresses),
            None if self.factors is None else put("factors.csv", "user_id,factor", self.factors),
        )

    def run(self, policy: Policy | None = None, decimals: int = 6) -> Allocation:
        return allocate(*self.paths(), policy or Policy(), decimals)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def one(alloc: Allocation, uid: str) -> tuple[bool, str]:
    (d,) = [d for d in alloc.decisions if d.user_id == uid]
    return d.eligible, str(d.reason)


# ---------------------------------------------------------------------------------------
# Every rule on its boundary

CASES: list[tuple[str, dict[str, object], str]] = [
    ("loss exactly $50", {"rows": [(IN, "futures", "50")]}, "in_manifest"),
    ("loss $50.000000", {"rows": [(IN, "futures", "50.000000")]}, "in_manifest"),
    ("loss $49.99", {"rows": [(IN, "futures", "49.99")]}, "below_min_loss"),
    ("loss $49.999999", {"rows": [(IN, "futures", "49.999999")]}, "below_min_loss"),
    ("$50 over two rows", {"rows": [(IN, "futures", "20"), (IN, "margin", "30")]}, "in_manifest"),
    ("ratio exactly 30 %", {"rows": [(IN, "margin", "300")], "net": "1000"}, "in_manifest"),
    ("ratio 29.99 %", {"rows": [(IN, "margin", "299.9")], "net": "1000"}, "below_loss_ratio"),
    (
        "ratio 30 % minus a micro-dollar",
        {"rows": [(IN, "margin", "299.999999")], "net": "1000"},
        "below_loss_ratio",
    ),
    (
        "ratio exactly 30 % of an odd net",
        {"rows": [(IN, "futures", "100.000002")], "net": "333.33334"},
        "in_manifest",
    ),
    ("end edge 23:59:59", {"rows": [("2025-10-11T23:59:59Z", "futures", "60")]}, "in_manifest"),
    (
        "end edge +00:00",
        {"rows": [("2025-10-11T23:59:59+00:00", "futures", "60")]},
        "in_manifest",
    ),
    (
        "end edge last microsecond",
        {"rows": [("2025-10-11T23:59:59.999999Z", "futures", "60")]},
        "in_manifest",
    ),
    (
        "day after 00:00:00",
        {"rows": [("2025-10-12T00:00:00Z", "futures", "60")]},
        "outside_window",
    ),
    ("start edge 00:00:00", {"rows": [("2025-10-10T00:00:00Z", "margin", "60")]}, "in_manifest"),
    (
        "day before 23:59:59",
        {"rows": [("2025-10-09T23:59:59Z", "margin", "60")]},
        "outside_window",
    ),
    (
        "day before 23:59:59.999999",
        {"rows": [("2025-10-09T23:59:59.999999Z", "margin", "60")]},
        "outside_window",
    ),
    (
        "only the in-window loss counts",
        {"rows": [(IN, "futures", "30"), ("2025-10-12T00:00:00Z", "futures", "30")]},
        "below_min_loss",
    ),
    ("spot only", {"rows": [(IN, "spot", "1000")]}, "no_futures_or_margin"),
    ("options only", {"rows": [(IN, "options", "1000")]}, "no_futures_or_margin"),
    (
        "spot is ignored",
        {"rows": [(IN, "spot", "1000"), (IN, "futures", "49.99")]},
        "below_min_loss",
    ),
    (
        "spot outside window, futures inside",
        {"rows": [("2025-10-12T00:00:00Z", "spot", "1"), (IN, "futures", "50")]},
        "in_manifest",
    ),
    ("product in upper case", {"rows": [(IN, "FUTURES", "60")]}, "in_manifest"),
    ("compensated", {"rows": [(IN, "futures", "60")], "compensated": True}, "compensated"),
    ("no snapshot", {"rows": [(IN, "futures", "60")], "net": None}, "no_snapshot"),
    ("net assets 0", {"rows": [(IN, "futures", "60")], "net": "0"}, "non_positive_net_assets"),
    (
        "net assets negative",
        {"rows": [(IN, "futures", "60")], "net": "-5.5"},
        "non_positive_net_assets",
    ),
    ("no address", {"rows": [(IN, "futures", "60")], "address": None}, "no_address"),
    ("empty address", {"rows": [(IN, "futures", "60")], "address": ""}, "no_address"),
    (
        "invalid address",
        {"rows": [(IN, "futures", "60")], "address": "not-an-address"},
        "invalid_address",
    ),
    (
        "mis-checksummed address",
        {"rows": [(IN, "futures", "60")], "address": "0x52908400098527886E0F7030069857D2E4169Ee7"},
        "invalid_address",
    ),
    (
        "zero address",
        {"rows": [(IN, "futures", "60")], "address": "0x" + "0" * 40},
        "invalid_address",
    ),
    (
        "address without 0x",
        {"rows": [(IN, "futures", "60")], "address": "52908400098527886e0f7030069857d2e4169ee7"},
        "invalid_address",
    ),
    (
        "lower-case address",
        {"rows": [(IN, "futures", "60")], "address": "0x52908400098527886e0f7030069857d2e4169ee7"},
        "in_manifest",
    ),
    (
        "upper-case address",
        {"rows": [(IN, "futures", "60")], "address": "0x52908400098527886E0F7030069857D2E4169EE7"},
        "in_manifest",
    ),
    ("factor 0", {"rows": [(IN, "futures", "60")], "factor": "0"}, "zero_amount"),
    ("never liquidated", {"rows": []}, "no_liquidation"),
    (
        "precedence: small loss and compensated",
        {"rows": [(IN, "futures", "10")], "compensated": True},
        "below_min_loss",
    ),
    (
        "precedence: no snapshot and compensated",
        {"rows": [(IN, "futures", "60")], "net": None, "compensated": True},
        "no_snapshot",
    ),
]


@pytest.mark.parametrize(("name", "kw", "reason"), CASES, ids=[c[0] for c in CASES])
def test_rule_boundaries(files: Files, name: str, kw: dict[str, object], reason: str) -> None:
    rows = kw.pop("rows")
    assert isinstance(rows, list)
    files.user("u1", *rows, **kw)  # type: ignore[arg-type]
    files.user("u2", (IN, "futures", "100"))  # someone else, so files are never empty
    alloc = files.run()
    eligible = reason in ("in_manifest", "no_address", "invalid_address", "zero_amount")
    assert one(alloc, "u1") == (eligible, reason)
    in_manifest = [p.id for p in alloc.payments]
    assert ("u1" in in_manifest) == (reason == "in_manifest")


def test_addresses_are_checksummed_in_the_manifest(files: Files) -> None:
    files.user("u1", (IN, "futures", "60"), address="0x52908400098527886e0f7030069857d2e4169ee7")
    (payment,) = files.run().payments
    assert payment.to == "0x52908400098527886E0F7030069857D2E4169EE7"


def test_time_zone_forms_with_zero_offset_are_accepted(files: Files) -> None:
    for n, t in enumerate(["2025-10-10T01:00:00+0000", "2025-10-10T01:00:00.5+00:00"]):
        files.user(f"u{n}", (t, "futures", "60"))
    assert all(d.reason == "in_manifest" for d in files.run().decisions)


def test_a_policy_window_moves_the_edges(files: Files) -> None:
    files.user("early", ("2025-10-09T23:59:59Z", "futures", "60"))
    files.user("late", ("2025-10-11T23:59:59Z", "futures", "60"))
    policy = Policy(
        window_start=datetime(2025, 10, 9, 23, 59, 59, tzinfo=UTC),
        window_end=datetime(2025, 10, 11, 23, 59, 58, tzinfo=UTC),
    )
    alloc = files.run(policy)
    assert one(alloc, "early") == (True, "in_manifest")
    assert one(alloc, "late") == (False, "outside_window")


def test_every_user_of_every_input_has_one_row(files: Files) -> None:
    files.user("a", (IN, "futures", "60"), (IN, "margin", "1"))
    files.snapshot.append("only-snapshot,5")
    files.addresses.append(f"only-address,{addr('x')}")
    files.compensated += ["only-compensated", "only-compensated"]  # repeats are harmless
    files.factors = ["only-factor,2"]
    alloc = files.run()
    assert [d.user_id for d in alloc.decisions] == [
        "a", "only-address", "only-compensated", "only-factor", "only-snapshot",
    ]  # fmt: skip
    assert [d.reason for d in alloc.decisions[1:]] == [Reason.NO_LIQUIDATION] * 4


# ---------------------------------------------------------------------------------------
# The amount policy and the fund


@pytest.mark.parametrize(
    ("loss", "net", "factor", "expected"),
    [
        ("100", "100", "1", "100"),  # ratio 100 % -> weight 100 %
        ("90", "100", "1", "90"),  # exactly 90 % -> 100 %
        ("89.999999", "100", "1", "80.999999"),  # just under 90 % -> 90 %, floor
        ("60", "100", "1", "54"),  # exactly 60 % -> 90 %
        ("59.99", "100", "1", "47.992"),  # -> 80 %
        ("30", "100", "1", "24"),  # exactly 30 % -> 80 %
        ("100", "100", "1.5", "150"),
        ("100", "100", "0.000001", "0.0001"),
        ("0.000003", "0.00001", "1", "0.000002"),  # floor(2.4) base units
    ],
)
def test_default_policy_amounts(loss: str, net: str, factor: str, expected: str) -> None:
    assert Policy().amount(usd(loss), usd(net), usd(factor), 6) == usd(expected)


def test_amount_with_cap_and_other_decimals() -> None:
    policy = Policy(cap_usd=usd("1000"))
    assert policy.amount(usd("5000"), usd("5000"), ONE_FACTOR, 6) == usd("1000")
    assert policy.amount(usd("5000"), usd("5000"), ONE_FACTOR, 18) == 1000 * 10**18
    assert policy.amount(usd("1.99"), usd("1.99"), ONE_FACTOR, 0) == 1  # floor
    assert policy.fund(18) == 300_000_000 * 10**18


def test_scaling_to_the_fund_counts_users_without_address(files: Files) -> None:
    files.user("a", (IN, "futures", "100"), net="100")  # 100 owed
    files.user("b", (IN, "futures", "50"), net="50", address=None)  # 50 owed, not payable now
    files.user("c", (IN, "futures", "70"), net="70", address="0xbad")  # 70, not payable now
    alloc = files.run(Policy(fund_usd=usd("100")))
    after = {d.user_id: d.amount_after for d in alloc.decisions}
    assert alloc.scaled
    assert alloc.requested == usd("220")
    assert after == {"a": 45_454_545, "b": 22_727_272, "c": 31_818_181}  # floor(x * 100/220)
    assert alloc.owed == sum(after.values()) <= alloc.fund == usd("100")
    assert [(p.id, p.amount) for p in alloc.payments] == [("a", 45_454_545)]
    assert alloc.total == 45_454_545


def test_no_scaling_when_the_fund_suffices(files: Files) -> None:
    files.user("a", (IN, "futures", "100"))
    alloc = files.run(Policy(fund_usd=usd("100")))
    assert not alloc.scaled
    assert alloc.total == alloc.fund == usd("100")


def test_scaled_to_zero_is_not_a_payment(files: Files) -> None:
    files.user("big", (IN, "futures", "1000000"), net="1000000")
    files.user("tiny", (IN, "futures", "50"))
    alloc = files.run(Policy(fund_usd=usd("0.01")))
    assert one(alloc, "tiny") == (True, "zero_amount")
    assert [p.id for p in alloc.payments] == ["big"]


def test_payments_are_indexed_by_user_id(files: Files) -> None:
    for uid in ["z", "b", "a10", "a9"]:
        files.user(uid, (IN, "futures", "60"))
    payments = files.run().payments
    assert [(p.index, p.id) for p in payments] == [(0, "a10"), (1, "a9"), (2, "b"), (3, "z")]
    assert all(p.amount == usd("54") for p in payments)  # ratio 60 % -> weight 90 %


def test_report_columns_and_values(files: Files) -> None:
    files.user("a", (IN, "futures", "60.5"), (IN, "spot", "7"), factor="1.5", net="200")
    files.user("b", (IN, "futures", "10"), net=None, address="0xnope")
    files.user("c", (IN, "spot", "99"), net="-1", address=addr("c").lower())
    # an id a spreadsheet would run as a formula is written as text (csvcell)
    files.user("=d", (IN, "futures", "10"), net=None)
    files.user("e", (IN, "futures", "10"), net=None, address="=HYPERLINK(1)")
    alloc = files.run()
    path = files.root / "report.csv"
    write_report(alloc, path, 6)
    def quoted(line: str) -> str:  # every cell is quoted (csvcell.QUOTING)
        return ",".join(f'"{c}"' for c in line.split(","))

    assert path.read_text().splitlines() == [quoted(x) for x in [
        "user_id,decision,reason,total_loss_usd,net_assets_usd,loss_ratio,factor,"
        "amount_before,amount_after,address",
        f"'=d,ineligible,below_min_loss,10,,,1,0,0,{addr('=d')}",
        f"a,eligible,in_manifest,60.5,200,0.302500,1.5,72.6,72.6,{addr('a')}",
        "b,ineligible,below_min_loss,10,,,1,0,0,0xnope",
        f"c,ineligible,no_futures_or_margin,0,-1,,1,0,0,{addr('c')}",
        "e,ineligible,below_min_loss,10,,,1,0,0,'=HYPERLINK(1)",
    ]]


# ---------------------------------------------------------------------------------------
# Bad input: one line naming file, line and problem


BAD_LIQUIDATIONS = [
    ("u1,yesterday,futures,60", "2: time: 'yesterday' is not an ISO-8601 time"),
    ("u1,2025-10-10,futures,60", "2: time: '2025-10-10' has no time zone (write Z or +00:00)"),
    (
        "u1,2025-10-10T12:00:00,futures,60",
        "2: time: '2025-10-10T12:00:00' has no time zone (write Z or +00:00)",
    ),
    (
        "u1,2025-10-10T12:00:00+02:00,futures,60",
        "2: time: '2025-10-10T12:00:00+02:00' is not UTC (write Z or +00:00)",
    ),
    ("u1,2025-10-10T12:00:00Z,,60", "2: product: empty"),
    ("u1,2025-10-10T12:00:00Z,futures,-5", "2: loss_usd: amount '-5' is negative"),
    (
        "u1,2025-10-10T12:00:00Z,futures,1e3",
        "2: loss_usd: amount '1e3' is not a plain decimal number",
    ),
    ("u1,2025-10-10T12:00:00Z,futures,", "2: loss_usd: amount '' is not a plain decimal number"),
    (
        "u1,2025-10-10T12:00:00Z,futures,1.0000001",
        "2: loss_usd: amount '1.0000001' has more than 6 decimal places",
    ),
    ("u1,2025-10-10T12:00:00Z,futures,60,extra", "2: expected 4 fields, found 5"),
    ("u1,2025-10-10T12:00:00Z,futures", "2: expected 4 fields, found 3"),
    (",2025-10-10T12:00:00Z,futures,60", "2: user_id: '' is not 1-128 printable characters"),
    (
        "u\x07,2025-10-10T12:00:00Z,futures,60",
        "2: user_id: 'u\\x07' is not 1-128 printable characters",
    ),
    (
        "x" * 129 + ",2025-10-10T12:00:00Z,futures,60",
        f"2: user_id: '{'x' * 129}' is not 1-128 printable characters",
    ),
]


@pytest.mark.parametrize(("row", "message"), BAD_LIQUIDATIONS)
def test_bad_liquidation_rows(files: Files, row: str, message: str) -> None:
    files.liquidations.append(row)
    with pytest.raises(InputError) as e:
        files.run()
    assert str(e.value) == f"{files.root / 'liquidations.csv'}:{message}"


def test_line_numbers_count_the_header_and_blank_lines(files: Files) -> None:
    files.liquidations += ["u1,2025-10-10T12:00:00Z,futures,60", "", "u2,nope,futures,1"]
    with pytest.raises(InputError, match=r"liquidations\.csv:4: time: 'nope' "):
        files.run()


@pytest.mark.parametrize("label", ["perpetual", "USDT-M Futures", "future", "futures\u200b"])
def test_a_product_label_neither_counted_nor_known_not_to_count_is_refused(
        files: Files, label: str) -> None:
    """"perpetual" or "USDT-M Futures" was read as spot: users the fund is for were left out
    (no_futures_or_margin), exit 0, nothing said (review helper-58). Refused with its line;
    the policy names the labels."""
    files.user("u1", (IN, "futures", "60"))
    files.user("u2", (IN, label, "60"))
    with pytest.raises(InputError) as e:
        files.run()
    liq = files.root / "liquidations.csv"
    assert str(e.value) == (
        f"{liq}:3: product: {label!r} is neither a product that counts (futures, margin) nor "
        "one known not to (options, spot): say which in the policy (products_counted / "
        "products_not_counted)")
    policy = Policy(products_counted=frozenset({"futures", "margin", fold(label)}))
    assert one(files.run(policy), "u2") == (True, "in_manifest")
    assert one(files.run(Policy(products_not_counted=frozenset({"spot", "options",
                                                                  fold(label)}))),
               "u2") == (False, "no_futures_or_margin")


def test_full_width_or_upper_case_labels_are_the_same_label(files: Files) -> None:
    files.user("u1", (IN, "ＦＵＴＵＲＥＳ", "60"))
    files.user("u2", (IN, " Margin ", "60"))
    alloc = files.run()
    assert one(alloc, "u1") == (True, "in_manifest") and one(alloc, "u2") == (True, "in_manifest")


@pytest.mark.parametrize("written, where", [
    ("alice", "compensated.csv:2"),
    ("Jose\u0301", "compensated.csv:2"),  # "José" decomposed (NFD)
])
def test_a_user_id_written_another_way_than_the_liquidated_one_is_refused(
        files: Files, written: str, where: str) -> None:
    """"Alice" liquidated and "alice" in the compensated file: compared as exact strings,
    Alice was paid again (review helper-58). An id of another file that is no liquidated
    user's but differs from one only by case or Unicode form is refused, naming both."""
    uid = "Alice" if written == "alice" else "Jos\u00e9"
    files.user(uid, (IN, "futures", "60"))
    files.compensated.append(written)
    with pytest.raises(InputError) as e:
        files.run()
    assert str(e.value) == (
        f"{files.root / where}: user_id {written!r} is no liquidated user's, but {uid!r} "
        f"({files.root / 'liquidations.csv'}:2) differs from it only by case or Unicode "
        "form and has no row of its own here: if they are one user, write the id as the "
        "liquidations file does")


def test_ids_that_differ_by_case_alone_are_two_users(files: Files) -> None:
    """Case-sensitive ids (base62, say) are distinct users: "aB3xK" and "Ab3xK" are each
    paid, each compensated only by its own id (review helper-59: refusing every pair that
    folds together would stop most allocations of 300,000 six-character ids)."""
    files.user("aB3xK", (IN, "futures", "60"))
    files.user("Ab3xK", (IN, "futures", "70"), compensated=True)
    files.snapshot.append("ABCD,100")  # not liquidated, beside a liquidated "abcD"
    files.user("abcD", (IN, "futures", "80"))
    alloc = files.run()
    assert one(alloc, "aB3xK") == (True, "in_manifest")
    assert one(alloc, "Ab3xK") == (False, "compensated")
    assert one(alloc, "abcD") == (True, "in_manifest")
    # a factor for another spelling, the liquidated user having none: refused (a factor of
    # 0 meant to exclude would be lost)
    files.factors = ["ABCD,0"]
    with pytest.raises(InputError, match="user_id 'ABCD' is no liquidated user's, but 'abcD'"):
        files.run()


def test_a_bad_row_of_a_product_that_does_not_count_is_still_refused(files: Files) -> None:
    files.liquidations.append("u1,2025-10-10T12:00:00,spot,60")
    with pytest.raises(InputError, match="has no time zone"):
        files.run()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "liquidations.csv",
            "user_id,time,product\nu1,2025-10-10T12:00:00Z,futures\n",
            "1: missing column 'loss_usd' (header is: user_id,time,product)",
        ),
        ("snapshot.csv", "", " empty file (expected a header line: user_id,net_assets_usd)"),
        (
            "snapshot.csv",
            "user_id,net_assets_usd\nu1,5\nu2,6\nu1,7\n",
            "4: user_id: 'u1' appears again (first on line 2)",
        ),
        (
            "snapshot.csv",
            "user_id,net_assets_usd\nu1,n/a\n",
            "2: net_assets_usd: amount 'n/a' is not a plain decimal number",
        ),
        (
            "addresses.csv",
            f"user_id,address\nu1,{addr('1')}\nu1,{addr('2')}\n",
            "3: user_id: 'u1' appears again (first on line 2)",
        ),
        (
            "addresses.csv",
            "user_id,wallet\n",
            "1: missing column 'address' (header is: user_id,wallet)",
        ),
        ("compensated.csv", "user\n", "1: missing column 'user_id' (header is: user)"),
        (
            "factors.csv",
            "user_id,factor\nu1,-1\n",
            "2: factor: '-1' is negative",
        ),
        (
            "factors.csv",
            "user_id,factor\nu1,1.0000001\n",
            "2: factor: amount '1.0000001' has more than 6 decimal places",
        ),
        (
            "factors.csv",
            "user_id,factor\nu1,1\nu1,2\n",
            "3: user_id: 'u1' appears again (first on line 2)",
        ),
        ("snapshot.csv", "user_id,user_id,net_assets_usd\n", "1: column 'user_id' appears twice"),
    ],
)
def test_bad_files(files: Files, name: str, content: str, message: str) -> None:
    files.user("u9", (IN, "futures", "60"))
    files.factors = []
    paths = files.paths()
    target = files.root / name
    target.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as e:
        allocate(*paths, Policy())
    assert str(e.value) == f"{target}:{message}"


def test_missing_and_undecodable_files(files: Files) -> None:
    files.user("u1", (IN, "futures", "60"))
    liq, snap, comp, addrs, _ = files.paths()
    missing = files.root / "nope.csv"
    with pytest.raises(InputError) as e:
        allocate(liq, snap, comp, missing, None, Policy())
    assert str(e.value) == f"{missing}: cannot read (No such file or directory)"
    snap.write_bytes(b"user_id,net_assets_usd\nu1,5\n\xff\xfe,1\n")
    with pytest.raises(InputError) as e:
        allocate(liq, snap, comp, addrs, None, Policy())
    assert str(e.value) == f"{snap}:3: not UTF-8 text"


def test_columns_found_by_name_with_extra_columns_and_a_bom(files: Files) -> None:
    files.user("u1")
    liq, snap, comp, addrs, _ = files.paths()
    liq.write_text(
        "\ufeffloss_usd, Product ,note,time,user_id\n 60 ,futures,x,2025-10-10T12:00:00Z,u1\n"
    )
    alloc = allocate(liq, snap, comp, addrs, None, Policy())
    assert one(alloc, "u1") == (True, "in_manifest")


# ---------------------------------------------------------------------------------------
# The policy file


def test_default_policy() -> None:
    p = load_policy(None)
    assert p == Policy()
    assert p.fund_usd == 300_000_000 * ONE_USD
    assert p.min_loss_usd == 50 * ONE_USD
    assert p.min_ratio_bps == 3000
    assert p.window_start == datetime(2025, 10, 10, tzinfo=UTC)
    assert p.window_end == datetime(2025, 10, 11, 23, 59, 59, tzinfo=UTC)
    assert p.cap_usd is None
    assert p.tiers == (Tier(3000, 8000), Tier(6000, 9000), Tier(9000, 10000))


def test_policy_file_sets_every_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        'fund_usd = "100000000.5"\nmin_loss_usd = 25\nmin_ratio_bps = 2000\n'
        'window_start = "2025-10-10T00:00:00+00:00"\nwindow_end = 2025-10-12T23:59:59Z\n'
        'cap_usd = "250000"\n'
        "[[tiers]]\nmin_ratio_bps = 5000\nweight_bps = 10000\n"
        "[[tiers]]\nmin_ratio_bps = 2000\nweight_bps = 5000\n"
    )
    assert load_policy(path) == Policy(
        fund_usd=100_000_000_500_000,
        min_loss_usd=25 * ONE_USD,
        min_ratio_bps=2000,
        window_start=datetime(2025, 10, 10, tzinfo=UTC),
        window_end=datetime(2025, 10, 12, 23, 59, 59, tzinfo=UTC),
        cap_usd=250_000 * ONE_USD,
        tiers=(Tier(2000, 5000), Tier(5000, 10000)),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'fund = "1"',
            "unknown key 'fund' (known: fund_usd, min_loss_usd, min_ratio_bps, window_start, "
            "window_end, cap_usd, tiers, products_counted, products_not_counted)",
        ),
        ('products_counted = ["futures"]\nproducts_not_counted = ["Futures"]',
         "product 'futures' is in both products_counted and products_not_counted"),
        ("products_counted = []", "products_counted must not be empty"),
        ('products_counted = [""]', "products_counted: '': a label must be non-empty, without "
         "surrounding spaces, in lower case (NFKC)"),
        ('products_counted = "futures"', "products_counted must be an array of strings"),
        ("fund_usd = 1.5", 'fund_usd: write the amount as a string, e.g. "50"'),
        ('fund_usd = "0"', "fund_usd must be greater than 0"),
        ('min_loss_usd = "-1"', "min_loss_usd: amount '-1' is not a plain decimal number"),
        ("min_ratio_bps = 0.3", "min_ratio_bps: must be an integer (basis points)"),
        (
            'window_end = "2025-10-11T23:59:59"',
            "window_end: '2025-10-11T23:59:59' has no time zone (write Z)",
        ),
        (
            'window_end = "2025-10-11T23:59:59+01:00"',
            "window_end: '2025-10-11T23:59:59+01:00' is not UTC (write Z)",
        ),
        ('window_end = "2025-10-09T00:00:00Z"', "window_start is after window_end"),
        (
            "[[tiers]]\nmin_ratio_bps = 3000\nweight_bps = 9000\n"
            "[[tiers]]\nmin_ratio_bps = 6000\nweight_bps = 8000\n",
            "tier weights must not decrease as min_ratio_bps increases",
        ),
        (
            "[[tiers]]\nmin_ratio_bps = 4000\nweight_bps = 9000\n",
            "the lowest tier's min_ratio_bps must be <= min_ratio_bps",
        ),
        ("[[tiers]]\nmin_ratio_bps = 3000\n", "tiers[1]: missing weight_bps"),
        (
            "[[tiers]]\nmin_ratio_bps = 3000\nweight_bps = 1\nweight = 2\n",
            "tiers[1]: unknown key 'weight' (known: min_ratio_bps, weight_bps)",
        ),
    ],
)
def test_bad_policy_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_policy(path)
    assert str(e.value) == f"{path}: {message}"


def test_unreadable_policy_files(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    with pytest.raises(InputError, match=r"policy\.toml: cannot read \(No such file"):
        load_policy(path)
    path.write_text("fund_usd = ")
    with pytest.raises(InputError, match=r"policy\.toml: not valid TOML \("):
        load_policy(path)
    path.write_bytes(b'fund_usd = "\xff"\n')  # not UTF-8: tomllib raises UnicodeDecodeError
    with pytest.raises(InputError) as e:
        load_policy(path)
    assert str(e.value) == f"{path}: not UTF-8 text"
    with pytest.raises(InputError, match=r": cannot read \(Is a directory\)"):
        load_policy(tmp_path)  # not a file


# ---------------------------------------------------------------------------------------
# Determinism


def test_same_inputs_in_any_order_give_identical_bytes(files: Files) -> None:
    rng = random.Random(5)
    for i in range(60):
        rows = [
            (
                f"2025-10-1{rng.randrange(3)}T0{rng.randrange(10)}:00:00Z",
                "futures",
                f"{rng.randrange(10_000)}.{rng.randrange(100):02d}",
            )
            for _ in range(3)
        ]
        files.user(
            f"user-{i:03d}",
            *rows,
            net=str(rng.randrange(-5, 5000)),
            address=rng.choice(["valid", "valid", None, "0x12"]),
            compensated=rng.random() < 0.1,
            factor=rng.choice([None, "0.5", "2"]),
        )
    policy = Policy(fund_usd=usd("20000"))  # scaling on
    first = files.run(policy)
    write_report(first, files.root / "r1.csv", 6)
    for rows in (files.liquidations, files.snapshot, files.addresses, files.compensated):
        rng.shuffle(rows)
    second = files.run(policy)
    write_report(second, files.root / "r2.csv", 6)
    assert first.scaled
    assert (files.root / "r1.csv").read_bytes() == (files.root / "r2.csv").read_bytes()
    assert first == second


# ---------------------------------------------------------------------------------------
# Properties, on the pure core


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    n = draw(st.integers(1, 4))
    ratios = sorted(draw(st.sets(st.integers(0, 15_000), min_size=n, max_size=n)))
    weights = sorted(draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n)))
    return Policy(
        fund_usd=draw(st.integers(1, 10**12)),
        min_loss_usd=draw(st.integers(0, 100 * ONE_USD)),
        min_ratio_bps=draw(st.integers(ratios[0], 20_000)),
        cap_usd=draw(st.none() | st.integers(1, 10**12)),
        tiers=tuple(Tier(r, w) for r, w in zip(ratios, weights, strict=True)),
    )


@st.composite
def records(draw: st.DrawFn) -> Records:
    n = draw(st.integers(1, 8))
    users = [f"u{i}" for i in range(n)]
    losses = {u: draw(st.integers(0, 10**12)) for u in users}
    return Records(
        seen=dict.fromkeys(users, SEEN_IN_WINDOW),
        losses=losses,
        net_assets={u: draw(st.integers(-10, 10**12)) for u in users},
        compensated=frozenset(u for u in users if draw(st.booleans()) and draw(st.booleans())),
        addresses={u: addr(u) for u in users if draw(st.integers(0, 4)) > 0},
        factors={u: draw(st.integers(0, 3 * ONE_FACTOR)) for u in users if draw(st.booleans())},
    )


def with_loss(r: Records, uid: str, loss: int) -> Records:
    return Records(r.seen, {**r.losses, uid: loss}, r.net_assets, r.compensated, r.addresses,
                   r.factors)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(records(), policies(), st.sampled_from([0, 2, 6, 18]))
def test_total_never_exceeds_the_fund(r: Records, policy: Policy, decimals: int) -> None:
    alloc = decide(r, policy, decimals)
    assert alloc.total == sum(p.amount for p in alloc.payments)
    assert alloc.total <= alloc.owed <= alloc.fund
    assert [p.index for p in alloc.payments] == list(range(len(alloc.payments)))
    assert all(p.amount > 0 for p in alloc.payments)
    for d in alloc.decisions:
        assert 0 <= d.amount_after <= d.amount_before  # scaling never raises an amount
        assert d.eligible or d.amount_before == 0


@settings(max_examples=500, deadline=None)
@given(records(), policies(), st.data())
def test_a_larger_loss_never_gets_less(r: Records, policy: Policy, data: st.DataObject) -> None:
    uid = data.draw(st.sampled_from(sorted(r.losses)))
    more = r.losses[uid] + data.draw(st.integers(0, 10**12) | st.integers(0, 10))
    before = {d.user_id: d for d in decide(r, policy).decisions}[uid]
    after = {d.user_id: d for d in decide(with_loss(r, uid, more), policy).decisions}[uid]
    assert after.amount_before >= before.amount_before
    assert after.amount_after >= before.amount_after
    assert after.eligible or not before.eligible


def test_a_larger_loss_never_gets_less_across_the_thresholds(tmp_path: Path) -> None:
    """Through the files, from $49.99 to $50 and from 29.99 % to 30 %, with the fund binding."""
    policy = Policy(fund_usd=usd("1000"))
    for net, losses in [
        ("100", ["49.99", "50", "60", "90", "5000", "1000000"]),
        ("1000", ["299.99", "300", "600", "900", "1000000"]),
    ]:
        seen: list[int] = []
        for loss in losses:
            with tempfile.TemporaryDirectory(dir=tmp_path) as d:
                f = Files(Path(d))
                f.user("me", (IN, "futures", loss), net=net)
                f.user("other", (IN, "futures", "2000"), net="2000")
                alloc = f.run(policy)
                seen.append({x.user_id: x.amount_after for x in alloc.decisions}["me"])
                assert alloc.total <= alloc.fund
        assert seen == sorted(seen)
        assert seen[0] == 0 < seen[1]
        assert seen[-1] < usd("1000")  # the fund binds


@settings(max_examples=300)
@given(st.binary(min_size=20, max_size=20))
def test_checksum_matches_eth_utils(raw: bytes) -> None:
    lower = "0x" + raw.hex()
    expected = to_checksum_address(lower)
    if raw == bytes(20):
        assert checksum_address(lower) is None
        return
    assert checksum_address(lower) == expected
    assert checksum_address("0x" + raw.hex().upper()) == expected
    assert checksum_address(expected) == expected
    flipped = expected.swapcase().replace("0X", "0x")
    if flipped[2:] not in (flipped[2:].lower(), flipped[2:].upper()):
        assert checksum_address(flipped) is None  # every letter's case wrong


@settings(max_examples=1000)
@given(
    st.text(alphabet="0123456789.-+e ٣", max_size=12)
    | st.decimals(allow_nan=False, allow_infinity=False, places=7).map(str)
)
def test_the_fast_amount_path_agrees_with_parse_units(text: str) -> None:
    try:
        expected: int | None = _signed(text, 6, "x")
    except InputError:
        expected = None
    try:
        got: int | None = _usd(text, Path("f.csv"), 2, "loss_usd")
    except InputError as e:
        assert str(e).startswith("f.csv:2: loss_usd: amount ")
        got = None
    assert got == expected
