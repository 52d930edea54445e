"""Sizes as people type them, and back: one parser for the CLI, the config file and init.

`K/M/G/T/P` and `KiB/MiB/GiB/TiB/PiB` are binary (1K = 1024), a bare number is bytes and
`B` may follow it. `KB/MB/GB/TB` are refused rather than guessed: a disk maker's "GB" is
10^9 and most tools' "G" is 2^30, and a store sized by the wrong guess is 7% off. Fractions
are fine when they come out in whole bytes ("1.5G").
"""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE_RE = re.compile(r"^\s*([+-]?)(\d+(?:\.\d+)?)\s*(?:([kmgtp])(ib?|b)?|(b)?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
EXAMPLES = "e.g. 8G, 512M, 64K, 1.5GiB or 4096 (bytes; K/M/G/T are binary: 1K = 1024)"


class SizeError(ValueError):
    """Not a size; the message says what was typed and what is accepted."""


def parse_size(text: str | int, *, allow_zero: bool = False) -> int:
    """'1G', '512M', '4KiB', '1.5G', '65536' -> bytes. Zero only when allow_zero."""
    if isinstance(text, bool):
        raise SizeError(f"size {text!r} is not a size: {EXAMPLES}")
    if isinstance(text, int):
        value = text
    else:
        value = _parse_text(str(text))
    if value < 0:
        raise SizeError(f"size {text} is negative: give a positive size, {EXAMPLES}")
    if value == 0 and not allow_zero:
        raise SizeError(f"size {text} is zero: give a positive size, {EXAMPLES}")
    return value


def _parse_text(text: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise SizeError(f"size {text!r} is not a size: {EXAMPLES}")
    sign, number, prefix, suffix = m.group(1), m.group(2), (m.group(3) or ""), m.group(4)
    if suffix and suffix.lower() == "b":  # "GB": decimal or binary? refuse to guess
        p = prefix.upper()
        power = "kmgtp".index(prefix.lower()) + 1
        decimal = Fraction(number) * 10 ** (3 * power)
        raise SizeError(
            f"size {text.strip()!r} is ambiguous: write {number}{p} (or "
            f"{number}{p}iB) for binary, 1{p} = {_SCALE[prefix.lower()]} bytes, "
            f"or {int(decimal)} bytes for decimal"
        )
    value = Fraction(number) * _SCALE[prefix.lower()]
    if value.denominator != 1:
        raise SizeError(f"size {text.strip()!r} is not a whole number of bytes")
    return -int(value) if sign == "-" else int(value)


def human(n: float) -> str:
    """Bytes for people: '512 B', '64.0 KiB', '1.5 GiB' (binary, like parse_size)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
