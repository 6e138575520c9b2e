"""Text fit for a spreadsheet cell. The CSV reports (reconcile's, allocate's) are opened in
spreadsheets, and a cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return is read there as a formula (``=HYPERLINK(...)``, ``+cmd|...``): CSV injection. Such a
text cell is written with a leading ``'``, which spreadsheets show as text; so is one that
already begins with ``'``, so that two ids never print alike (strip one leading ``'`` to
get the text back). Only text that comes from outside (payment and user ids, addresses as
written, revert reasons) goes through it; amounts, valid addresses and hashes are written
as they are. The JSON report and the manifest keep every id exactly.

Every cell is quoted (``QUOTING``): a spreadsheet set to split on ``;`` (the list separator
of many locales) would otherwise cut ``x;=1+1`` in two and run the second part."""

from __future__ import annotations

import csv
from typing import Final, Literal

QUOTING: Final[Literal[1]] = csv.QUOTE_ALL

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def text(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value
