"""Memory budgets and sizes at the edges: "8GB" / "7.5GiB" / "70%" <-> int bytes, and back for display.

Conventions (bytes are ints everywhere inside ckptplan; units only live here):

* SI suffixes are powers of 1000: ``8GB`` = 8 * 10^9 bytes (also ``KB MB TB`` and bare ``K M G T``).
* IEC suffixes are powers of 1024: ``8GiB`` = 8 * 2^30 bytes (also ``Ki Mi Gi Ti``, with or without ``B``).
* Suffixes are case-insensitive (``8gb`` is 8 GB), except that bit units are refused: ``8Gb``, ``8Gbit``.
* A bare integer (``8000000000``, ``8_000_000_000``) is bytes; a bare decimal (``0.5``) is refused.
* ``70%`` is a fraction of ``reference_bytes``, the no-checkpointing peak of a traced model.
* Decimals are exact (``7.5GiB`` is exactly 7.5 * 2^30) and round down to whole bytes.
* Display always uses binary units (``7.45 GiB``), the way CUDA memory tools report it.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from ckptplan.errors import BudgetError

__all__ = ["parse_budget", "format_bytes", "describe_budget", "format_flops"]

ACCEPTED_FORMS = "8GB (10^9 B), 8GiB (2^30 B), 8000000000 (bytes), 70% (of the no-checkpointing peak)"

_PREFIXES = "kmgt"
# lowercase suffix -> bytes: "k"/"kb" = 1000, "ki"/"kib" = 1024, ..., "t"/"tb", "ti"/"tib"
_UNITS: dict[str, int] = {"b": 1} | {
    prefix + suffix: base**power
    for power, prefix in enumerate(_PREFIXES, start=1)
    for suffix, base in (("", 1000), ("b", 1000), ("i", 1024), ("ib", 1024))
}

_BIT_NAMES = dict(
    zip(
        ["", "k", "m", "g", "t", "ki", "mi", "gi", "ti"],
        ["bits", "kilobits", "megabits", "gigabits", "terabits", "kibibits", "mebibits", "gibibits", "tebibits"],
    )
)
_MAX_NUMBER_CHARS = 40  # beyond this a "size" is nonsense, and int() refuses > 4300 digits anyway

_NUMBER = r"[0-9]+(?:_[0-9]+)*(?:\.[0-9]+)?"
_QUANTITY = re.compile(rf"({_NUMBER})[ \t]*([A-Za-z]*)", re.ASCII)
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)[ \t]*%", re.ASCII)
_SCIENTIFIC = re.compile(r"([0-9]*\.?[0-9]+)[eE]([+-]?[0-9]{1,2})[ \t]*([A-Za-z]*)", re.ASCII)
# Bits: a capital prefix with a lowercase b ("Gb", "GIb"), or anything spelled "bit" ("gbit", "Mibits").
_BITS = re.compile(r"(?P<p>[KMGT][iI]?)b|(?i:(?P<q>(?:[kmgt]i?)?)bits?)", re.ASCII)


def parse_budget(text: str | int, *, reference_bytes: int | None = None) -> int:
    """Parse a memory budget into a positive int number of bytes; raise BudgetError otherwise."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise BudgetError(
            f"a budget must be a string such as '8GB' or an int number of bytes, "
            f"not {type(text).__name__}; accepted forms: {ACCEPTED_FORMS}"
        )
    if isinstance(text, int):
        return _positive(text, Fraction(text))
    s = text.strip()
    if not s:
        raise BudgetError(f"the budget is empty; accepted forms: {ACCEPTED_FORMS}")
    if s.startswith("-"):
        raise BudgetError(f"budget {text!r} is negative; give a positive size such as 8GiB or 70%")
    if s.endswith("%"):
        return _parse_percent(text, s, reference_bytes)
    match = _QUANTITY.fullmatch(s)
    if match is None:
        raise _explain_junk(text, s)
    number, unit = match.group(1), match.group(2)
    if len(number) > _MAX_NUMBER_CHARS:
        raise BudgetError(f"budget {text!r} has too many digits to be a memory size; try e.g. 80GiB")
    if not unit:
        if "." in number:
            raise BudgetError(
                f"budget {text!r} is ambiguous: a bare decimal has no unit; "
                f"write e.g. 8GB (10^9 bytes), 8GiB (2^30 bytes) or 50%"
            )
        return _positive(text, Fraction(int(number.replace("_", ""))))
    _reject_bits(text, number, unit)
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise BudgetError(
            f"budget {text!r} has unknown unit {unit!r}; use B, KB/MB/GB/TB (powers of 1000) "
            f"or KiB/MiB/GiB/TiB (powers of 1024); accepted forms: {ACCEPTED_FORMS}"
        )
    return _positive(text, Fraction(number.replace("_", "")) * factor)


def _parse_percent(text: str, s: str, reference_bytes: int | None) -> int:
    match = _PERCENT.fullmatch(s)
    if match is None or len(match.group(1)) > _MAX_NUMBER_CHARS:
        raise _explain_junk(text, s)
    if reference_bytes is None:
        raise BudgetError(
            f"budget {text!r} is a percentage of the no-checkpointing peak, which needs a "
            f"traced model; trace the model first or give an absolute size such as 8GiB"
        )
    if isinstance(reference_bytes, bool) or not isinstance(reference_bytes, int) or reference_bytes < 1:
        raise BudgetError(
            f"cannot take {text!r} of reference peak {reference_bytes!r}: "
            f"the reference must be a positive int number of bytes"
        )
    return _positive(text, reference_bytes * Fraction(match.group(1)) / 100)


def _positive(text: str | int, exact: Fraction) -> int:
    """Round an exact byte count down; refuse it unless at least one byte is left."""
    if exact >= 1:
        return math.floor(exact)
    reason = "rounds down to 0 bytes" if exact > 0 else "is not positive"
    raise BudgetError(f"budget {text!r} {reason}; give a size of at least one byte, such as 8GiB or 70%")


def _reject_bits(text: str, number: str, unit: str) -> None:
    match = _BITS.fullmatch(unit)
    if match is None:
        return
    prefix = (match.group("p") if match.group("p") is not None else match.group("q")).lower()
    hint = f"write {number}B"
    if prefix:
        p, power = prefix[0].upper(), _PREFIXES.index(prefix[0]) + 1
        hint = f"write {number}{p}B (10^{3 * power} bytes) or {number}{p}iB (2^{10 * power} bytes)"
    raise BudgetError(f"{text.strip()!r} looks like {_BIT_NAMES[prefix]}; ckptplan budgets are bytes: {hint}")


def _explain_junk(text: str, s: str) -> BudgetError:
    """Build the most helpful error for a string that matches no accepted form."""
    sci = _SCIENTIFIC.fullmatch(s)
    if sci is not None:
        value = Fraction(sci.group(1)) * Fraction(10) ** int(sci.group(2))
        return BudgetError(
            f"budget {text!r} uses scientific notation; write {_plain_suggestion(value, sci.group(3))} instead"
        )
    if re.fullmatch(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?[ \t]*[A-Za-z]*", s, re.ASCII):
        return BudgetError(
            f"budget {text!r} has thousands commas; write {s.replace(',', '_')!r} or {s.replace(',', '')!r}"
        )
    if s.lower().lstrip("+") in {"nan", "inf", "infinity"}:
        return BudgetError(f"budget {text!r} is not a finite size; accepted forms: {ACCEPTED_FORMS}")
    return BudgetError(f"cannot read budget {text!r}; accepted forms: {ACCEPTED_FORMS}")


def _plain_suggestion(value: Fraction, unit: str) -> str:
    """'1e9' -> '1GB', '2.5e9' -> '2500MB', '1e3GiB' -> '1000GiB'; a generic example when none is short."""
    choices = [(unit, 1)] if unit else [("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)]
    for name, factor in choices:
        scaled = value / factor
        if 1 <= scaled < 10**6 and scaled.denominator == 1:
            return f"{scaled.numerator}{name}"
    return "a plain number with a unit, such as 8GB (10^9 bytes) or 8GiB (2^30 bytes)"


_BYTE_UNITS = (("B", 1), ("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("TiB", 1024**4))
_FLOP_UNITS = (("FLOP", 1), ("kFLOP", 10**3), ("MFLOP", 10**6), ("GFLOP", 10**9), ("TFLOP", 10**12), ("PFLOP", 10**15))


def _human(value: Fraction, units: tuple[tuple[str, int], ...], precision: int) -> str:
    """Exact rounding of ``|value|`` in the largest unit it reaches; no float, so no overflow."""
    if precision < 0:
        raise ValueError(f"precision must be >= 0, got {precision}; use e.g. precision=2")
    sign, value = ("-" if value < 0 else ""), abs(value)
    idx = max((i for i, (_, factor) in enumerate(units) if value >= factor), default=0)
    while True:
        digits = precision if idx > 0 else 0  # whole bytes / FLOPs need no decimals
        scaled = math.floor(value / units[idx][1] * 10**digits + Fraction(1, 2))  # half up
        if idx + 1 < len(units) and scaled >= units[idx + 1][1] // units[idx][1] * 10**digits:
            idx += 1  # e.g. 1023.999 KiB would print as "1024.00 KiB": show "1.00 MiB"
            continue
        break
    whole, frac = divmod(scaled, 10**digits)
    number = f"{whole}.{frac:0{digits}d}" if digits else str(whole)
    return f"{sign}{number} {units[idx][0]}"


def format_bytes(n: int, *, precision: int = 2) -> str:
    """Human size in binary units: 0 -> '0 B', 1536 -> '1.50 KiB', 8*10**9 -> '7.45 GiB'."""
    return _human(Fraction(n), _BYTE_UNITS, precision)


def describe_budget(n: int) -> str:
    """Echo a parsed budget both ways: '8,000,000,000 B = 7.45 GiB' ('512 B' when below 1 KiB)."""
    human = format_bytes(n)
    return human if human.endswith(" B") else f"{n:,} B = {human}"


def format_flops(n: int | float, *, precision: int = 2) -> str:
    """Human FLOP count in SI units: 0 -> '0 FLOP', 1.23e12 -> '1.23 TFLOP'; nan/inf pass through."""
    if isinstance(n, float) and not math.isfinite(n):
        return f"{n} FLOP"
    # Fraction(repr(x)) is the decimal the user sees, so 1e30 is not shown as 1000000000000000.02 PFLOP
    return _human(Fraction(repr(n)) if isinstance(n, float) else Fraction(n), _FLOP_UNITS, precision)


def suggest_budget(minimum: int) -> str:
    """A budget string at or just above ``minimum`` bytes, in GiB or MiB: "5.53GiB", "1.35MiB"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if minimum >= size:
            hundredths = -(-minimum * 100 // size)  # round up, so the suggestion always fits
            return f"{hundredths // 100}.{hundredths % 100:02d}{unit}"
    return str(minimum)
