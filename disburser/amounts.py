"""Exact conversion between human decimal strings and integer base units. No floats."""

from __future__ import annotations

import re

from disburser.errors import InputError

# [0-9], not \d: \d also matches other scripts' digits ("٣").
MAX_DIGITS = 120  # characters of a decimal amount: integer part, point and places
_DECIMAL = re.compile(r"^(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]+))?$")


def parse_units(text: str, decimals: int, *, where: str) -> int:
    """Turn ``"1.25"`` into ``1250000`` for 6 decimals, exactly.

    Refuses signs, exponents, separators and more fractional places than the token has;
    ``where`` names the file/row/field in the error message.
    """
    s = text.strip()
    if len(s) > MAX_DIGITS:
        # No amount is this long (a uint256 has 78 digits); Python refuses to convert
        # integers of over 4,300 digits anyway. The text is not echoed whole.
        raise InputError(f"{where}: amount {s[:20]!r}... has {len(s)} characters, more "
                         "than any amount")
    m = _DECIMAL.match(s)
    if m is None:
        raise InputError(f"{where}: amount {text!r} is not a plain decimal number")
    frac = m.group("frac") or ""
    if len(frac.rstrip("0")) > decimals:
        raise InputError(
            f"{where}: amount {text!r} has more than {decimals} decimal places"
        )
    frac = frac[:decimals] if len(frac) > decimals else frac
    unit: int = 10**decimals
    return int(m.group("int")) * unit + int(frac.ljust(decimals, "0") or "0")


def format_units(value: int, decimals: int) -> str:
    """``1250000`` with 6 decimals -> ``"1.25"``; exact, trailing zeros dropped."""
    sign = "-" if value < 0 else ""
    q, r = divmod(abs(value), 10**decimals)
    if r == 0 or decimals == 0:
        return f"{sign}{q}"
    return f"{sign}{q}.{str(r).rjust(decimals, '0').rstrip('0')}"
