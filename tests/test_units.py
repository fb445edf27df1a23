"""Budget parsing and size display: exact values, helpful rejections, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from ckptplan.errors import BudgetError
from ckptplan.units import describe_budget, format_bytes, format_flops, parse_budget

GiB = 2**30

# (suffix, bytes per unit): written out here, independently of the module's table.
UNIT_TABLE = [
    ("B", 1),
    ("b", 1),
    ("K", 10**3),
    ("KB", 10**3),
    ("kB", 10**3),
    ("kb", 10**3),
    ("M", 10**6),
    ("MB", 10**6),
    ("mb", 10**6),
    ("G", 10**9),
    ("GB", 10**9),
    ("gb", 10**9),
    ("gB", 10**9),
    ("T", 10**12),
    ("TB", 10**12),
    ("tb", 10**12),
    ("Ki", 2**10),
    ("KiB", 2**10),
    ("kib", 2**10),
    ("KIB", 2**10),
    ("Mi", 2**20),
    ("MiB", 2**20),
    ("mib", 2**20),
    ("Gi", 2**30),
    ("GiB", 2**30),
    ("gib", 2**30),
    ("GIB", 2**30),
    ("Ti", 2**40),
    ("TiB", 2**40),
    ("tib", 2**40),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GB", 8_000_000_000),
        ("8gb", 8_000_000_000),
        ("8G", 8_000_000_000),
        ("8GiB", 8 * GiB),
        ("8Gi", 8 * GiB),
        ("7.5GiB", 7 * GiB + GiB // 2),
        ("7.5 GiB", 7 * GiB + GiB // 2),
        ("  7.5   GiB  ", 7 * GiB + GiB // 2),
        ("0.5 GB", 500_000_000),
        ("512MiB", 512 * 2**20),
        ("1.5KiB", 1536),
        ("2TiB", 2 * 2**40),
        ("1_000", 1000),
        ("1_000MB", 10**9),
        ("123", 123),
        ("123B", 123),
        ("1.9B", 1),  # rounds down to whole bytes
        ("0.3333333333GiB", 357913941),  # exact: floor(0.3333333333 * 2^30)
        (1234, 1234),
    ],
)
def test_parse_exact_values(text: str | int, expected: int) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    ("text", "reference", "expected"),
    [
        ("70%", 1000, 700),
        ("70 %", 1000, 700),
        ("33.3%", 1000, 333),
        ("150%", 1000, 1500),
        ("100%", 8 * GiB, 8 * GiB),
        ("0.5%", 999, 4),
    ],
)
def test_parse_percent_of_reference(text: str, reference: int, expected: int) -> None:
    assert parse_budget(text, reference_bytes=reference) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("8Gb", "looks like gigabits"),
        ("8Gb", "write 8GB (10^9 bytes) or 8GiB (2^30 bytes)"),
        ("8 Mb", "looks like megabits"),
        ("8Kb", "looks like kilobits"),
        ("8Tb", "looks like terabits"),
        ("8Gib", "looks like gibibits"),
        ("8gbit", "looks like gigabits"),
        ("8Gbit", "looks like gigabits"),
        ("8mbits", "looks like megabits"),
        ("8bit", "looks like bits"),
        ("0.5", "ambiguous"),
        ("8.0", "write e.g. 8GB (10^9 bytes), 8GiB (2^30 bytes) or 50%"),
        ("1e9", "1GB"),
        ("2.5e9", "write 2500MB instead"),
        ("1e3GiB", "write 1000GiB instead"),
        ("1,000", "1_000"),
        ("", "empty"),
        ("   ", "empty"),
        ("-1GB", "negative"),
        ("-5", "negative"),
        ("0", "not positive"),
        ("0GiB", "not positive"),
        ("0.1B", "rounds down to 0 bytes"),
        ("abc", "'abc'"),
        ("abc", "8GB (10^9 B), 8GiB (2^30 B), 8000000000 (bytes), 70% (of the no-checkpointing peak)"),
        ("%", "accepted forms"),
        ("GB", "accepted forms"),
        ("nan", "not a finite size"),
        ("inf", "not a finite size"),
        ("8XB", "unknown unit 'XB'"),
        ("1__000", "accepted forms"),
        ("8 G B", "accepted forms"),
        ("9" * 100, "too many digits"),
    ],
)
def test_parse_rejects_with_a_hint(text: str, fragment: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize("text", ["70%", "0.5%", "abc%"])
def test_percent_needs_a_reference(text: str) -> None:
    with pytest.raises(BudgetError, match="traced model|accepted forms"):
        parse_budget(text)


@pytest.mark.parametrize(("text", "reference"), [("0%", 1000), ("0.0%", 1000), ("0.01%", 100), ("70%", 0)])
def test_percent_must_leave_at_least_one_byte(text: str, reference: int) -> None:
    with pytest.raises(BudgetError):
        parse_budget(text, reference_bytes=reference)


@pytest.mark.parametrize("value", [0, -1, True, False, 1.5, 8e9, None, b"8GB", [8]])
def test_parse_rejects_non_positive_and_non_str_int(value: object) -> None:
    with pytest.raises(BudgetError):
        parse_budget(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (8 * 10**9, "7.45 GiB"),
        (8 * GiB, "8.00 GiB"),
        (3 * 2**40, "3.00 TiB"),
        (2**60, "1048576.00 TiB"),
        (-1536, "-1.50 KiB"),
        (2**20 - 1, "1.00 MiB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected


def test_format_bytes_precision() -> None:
    assert format_bytes(1536, precision=0) == "2 KiB"
    assert format_bytes(8 * 10**9, precision=4) == "7.4506 GiB"


def test_describe_budget() -> None:
    assert describe_budget(8_000_000_000) == "8,000,000,000 B = 7.45 GiB"
    assert describe_budget(parse_budget("8GiB")) == "8,589,934,592 B = 8.00 GiB"
    assert describe_budget(512) == "512 B"


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 FLOP"),
        (512, "512 FLOP"),
        (1.23e12, "1.23 TFLOP"),
        (1500, "1.50 kFLOP"),
        (2e6, "2.00 MFLOP"),
        (3.5e9, "3.50 GFLOP"),
        (4e15, "4.00 PFLOP"),
        (4e18, "4000.00 PFLOP"),
        (-2e9, "-2.00 GFLOP"),
        (999.6, "1.00 kFLOP"),
    ],
)
def test_format_flops(n: int | float, expected: str) -> None:
    assert format_flops(n) == expected


# --- properties ---------------------------------------------------------------------------------


@given(st.text())
def test_any_text_parses_to_positive_int_or_budget_error(text: str) -> None:
    for reference in (None, 10**9):
        try:
            result = parse_budget(text, reference_bytes=reference)
        except BudgetError:
            continue
        assert type(result) is int and result >= 1


@given(st.from_regex(r"\A[ ]{0,2}-?[0-9._,%eE]{0,12}[ ]?[KkMmGgTtIiBb%]{0,4}[ ]{0,2}\Z"))
def test_budget_like_text_parses_or_raises_budget_error(text: str) -> None:
    try:
        result = parse_budget(text, reference_bytes=1000)
    except BudgetError:
        return
    assert type(result) is int and result >= 1


@given(st.integers(min_value=1, max_value=10**15))
def test_integer_strings_are_bytes(n: int) -> None:
    assert parse_budget(str(n)) == n
    assert parse_budget(f"{n}B") == n
    assert parse_budget(f"{n:_}") == n
    assert parse_budget(n) == n


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(UNIT_TABLE), st.sampled_from(["", " "]))
def test_integer_with_unit_is_exact(k: int, unit: tuple[str, int], space: str) -> None:
    suffix, factor = unit
    assert parse_budget(f"{k}{space}{suffix}") == k * factor


@given(st.integers())
def test_format_bytes_never_raises(n: int) -> None:
    text = format_bytes(n)
    assert text.startswith("-") == (n < 0)
    assert text.split(" ")[-1] in {"B", "KiB", "MiB", "GiB", "TiB"}


@given(st.integers(min_value=1, max_value=2**50))
def test_describe_budget_round_trips_the_byte_count(n: int) -> None:
    assert parse_budget(describe_budget(n).split(" B")[0].replace(",", "_")) == n
