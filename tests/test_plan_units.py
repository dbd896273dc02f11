"""Units: sizes, durations and rates as plans write them."""

from __future__ import annotations

import pytest

from confplan.plan.units import format_size, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256MiB", 256 << 20),
        ("2 GiB", 2 << 30),
        ("1.5KiB", 1536),
        ("4096", 4096),
        (4096, 4096),
        ("1MB", 1_000_000),
        ("0.5MiB", 512 << 10),
        ("1TiB", 1 << 40),
        (" 8B ", 8),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("50ms", 0.05), ("2s", 2.0), ("1.5min", 90.0), ("1h", 3600.0), ("250us", 250e-6), (3, 3.0), ("7", 7.0)],
)
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64MiB/s", float(64 << 20)),
        ("1Gbit/s", 125_000_000.0),
        ("unlimited", None),
        (1000, 1000.0),
        ("10 MB/s", 10e6),
    ],
)
def test_rates(text: object, expected: float | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("parse", "value", "fragment"),
    [
        (parse_size, "256 MiBs", "B, KiB, MiB, GiB, TiB, kB, MB, GB, TB"),
        (parse_size, "1.5B", "not a whole number of bytes"),
        (parse_size, "-1MiB", "not a size"),
        (parse_size, -5, "must be a finite number >= 0"),
        (parse_size, True, "got the boolean true"),
        (parse_size, [1], "got a list"),
        (parse_duration, "5 parsecs", "ns, us, ms, s, min, h"),
        (parse_duration, float("inf"), "finite"),
        (parse_duration, None, "got null"),
        (parse_rate, "64MiB", "'unlimited' or a number with one of the units B/s"),
        (parse_rate, "fast/s", "Gbit/s"),
        (parse_rate, {"a": 1}, "got a mapping"),
    ],
)
def test_errors_name_the_accepted_units(parse: object, value: object, fragment: str) -> None:
    assert callable(parse)
    with pytest.raises(ValueError, match=None) as caught:
        parse(value)
    assert fragment in str(caught.value)


def test_format_size_uses_the_largest_exact_binary_unit() -> None:
    assert [format_size(s) for s in (2 << 20, 3 << 30, 1 << 40, 1536)] == [
        "2MiB",
        "3GiB",
        "1TiB",
        "1536 bytes",
    ]
