"""The HTML report of a real reconcile opens in headless Chromium without a console error
and renders something (several colours, the status bars), with no external asset."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from disburser import chain as ch
from disburser import devnet as dn
from disburser import manifest as mf
from tests.conftest import Env, fresh_address

pytestmark = pytest.mark.chain

CHROMIUM = Path("/usr/bin/chromium")
PAID_GREEN = (0x2E, 0x7D, 0x32)  # report.STATUS_COLORS["paid"]: the status bar
GAS_TEAL = (0x00, 0x83, 0x8F)  # the gas bars


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG with zlib and struct only: (width, height, rows of
    RGB(A) bytes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, channels = 8, bytearray(), 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _c, _f, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        ftype = raw[start]
        line = bytearray(raw[start + 1:start + 1 + stride])
        if ftype == 1:  # Sub
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif ftype == 2:  # Up
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif ftype == 3:  # Average
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:  # Paeth
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b = prev[i]
                c = prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, channels, rows


@pytest.fixture
def report(env: Env) -> Path:
    """A reconcile with findings of several kinds, rendered to HTML by the real CLI."""
    path = env.signed_manifest(30, program="relief")
    m = mf.load(path)
    dn.send_as(env.chain, dn.OWNER, env.devnet.token,
               dn.abi_call("blacklist(address)", ["address"], [m.payments[7].to]))
    r = env.cli("send", str(path), "--yes", extra={"DISBURSER_BATCH_SIZE": "8"})
    assert r.code == 1, r.err
    dn.send_as(env.chain, dn.PAYER, env.devnet.token,
               ch.enc_transfer(fresh_address("<script>alert(1)</script>"), 5))
    out = env.tmp / "report.html"
    r = env.cli("reconcile", "--format", "html", "-o", str(out))
    assert r.code == 1, r.err
    return out


def test_html_report_is_self_contained(report: Path) -> None:
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "@import" not in html and "url(" not in html
    assert html.count("<svg") == 4  # the ceiling dwarfs these payments: a zoomed chart too
    for text in ("Cumulative amount paid", "Payments by status", "Gas per payout",
                 "unexplained_outflow", "failed", "Blacklistable: account is blacklisted",
                 dn.DEV_ADDRESSES[2], "<rect"):
        assert text in html, text


def test_html_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        found = shutil.which("chromium")
        pytest.fail(f"{CHROMIUM} is not installed{' (found ' + found + ')' if found else ''}: "
                    "install Debian's chromium (apt-get install -y chromium); "
                    "scripts/test installs it")
    shot = tmp_path / "report.png"
    args = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1280,2000", "--enable-logging=stderr",
        "--v=0", report.resolve().as_uri(),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    log = proc.stdout + proc.stderr
    console = [line for line in log.splitlines()
               if "Uncaught" in line or ("CONSOLE" in line and "rror" in line)
               or "Failed to load resource" in line]
    assert not console, "console errors:\n" + "\n".join(console)
    assert shot.is_file() and shot.stat().st_size > 10_000, (proc.returncode, log[-2000:])

    width, channels, rows = png_pixels(shot)
    assert width == 1280 and len(rows) == 2000
    colours: set[tuple[int, ...]] = set()
    for row in rows[::4]:
        for x in range(0, len(row), channels * 3):
            colours.add(tuple(row[x:x + 3]))
    assert len(colours) >= 12, f"screenshot looks blank: {len(colours)} colour(s)"
    full = {tuple(row[x:x + 3]) for row in rows for x in range(0, len(row), channels)}
    assert PAID_GREEN in full, "the status bars did not render"
    assert GAS_TEAL in full, "the gas bars did not render"
