from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from disburser.amounts import format_units, parse_units
from disburser.errors import InputError


@pytest.mark.parametrize("text, dec, want", [
    ("1.25", 6, 1_250_000), ("300000000", 6, 300_000_000_000_000), ("0.000001", 6, 1),
    ("1.250000", 6, 1_250_000), ("300000000", 18, 3 * 10**26), ("7", 0, 7),
])
def test_parse(text: str, dec: int, want: int) -> None:
    assert parse_units(text, dec, where="x") == want


@pytest.mark.parametrize("text, msg", [
    ("1.0000001", "x: amount '1.0000001' has more than 6 decimal places"),
    ("1,5", "x: amount '1,5' is not a plain decimal number"),
    ("-1", "x: amount '-1' is not a plain decimal number"),
    ("1e6", "x: amount '1e6' is not a plain decimal number"),
    ("", "x: amount '' is not a plain decimal number"),
])
def test_refuse(text: str, msg: str) -> None:
    with pytest.raises(InputError) as e:
        parse_units(text, 6, where="x")
    assert str(e.value) == msg


@given(st.integers(0, 10**30), st.sampled_from([0, 2, 6, 18]))
def test_roundtrip(value: int, dec: int) -> None:
    assert parse_units(format_units(value, dec), dec, where="x") == value
