"""Text fit for a spreadsheet cell. The CSV reports (reconcile's, allocate's) are opened in
spreadsheets, and a cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return is read there as a formula (``=HYPERLINK(...)``, ``+cmd|...``): CSV injection. Such a
text cell is written with a leading ``'``, which spreadsheets show as text; so is one that
already begins with ``'``, so that two ids never print alike (strip one leading ``'`` to
get the text back). Only text that comes from outside (payment and user ids, addresses as
written, revert reasons) goes through it; amounts, valid addresses and hashes are written
as they are. The JSON report and the manifest keep every id exactly."""

from __future__ import annotations

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def text(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value
