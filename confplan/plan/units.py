"""Human quantities in plans: sizes ("256MiB"), durations ("50ms") and rates ("64MiB/s", "unlimited").

Each parser takes what YAML gives (a string, or a bare number meaning bytes / seconds / bytes per second)
and returns plain numbers. A ``ValueError`` names the bad text and lists the units that are accepted, so the
plan loader can show it as is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
DURATION_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "min": 60.0,
    "h": 3600.0,
}
# Network-style rates; bits, so divided by 8 to get bytes.
BIT_RATE_UNITS: dict[str, float] = {"bit": 1 / 8, "kbit": 1e3 / 8, "Mbit": 1e6 / 8, "Gbit": 1e9 / 8}
UNLIMITED = "unlimited"
# Rates of events (page conversions): a count per unit of time, in seconds.
EVENT_RATE_UNITS: dict[str, float] = {"s": 1.0, "min": 60.0}

_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
_QUANTITY = re.compile(rf"^{_NUMBER}\s*(?P<unit>[A-Za-zµ]*)$")

SIZE_UNITS_TEXT = ", ".join(SIZE_UNITS)
DURATION_UNITS_TEXT = "ns, us, ms, s, min, h"
RATE_UNITS_TEXT = ", ".join(f"{u}/s" for u in [*SIZE_UNITS, *BIT_RATE_UNITS])

# Patterns for the JSON Schema, so editors flag a bad unit before confplan does.
SIZE_PATTERN = r"^\s*([0-9]+(\.[0-9]+)?|\.[0-9]+)\s*(" + "|".join(SIZE_UNITS) + r")?\s*$"
DURATION_PATTERN = r"^\s*([0-9]+(\.[0-9]+)?|\.[0-9]+)\s*(ns|us|µs|ms|s|min|h)?\s*$"
RATE_PATTERN = (
    r"^\s*(unlimited|([0-9]+(\.[0-9]+)?|\.[0-9]+)\s*("
    + "|".join([*SIZE_UNITS, *BIT_RATE_UNITS])
    + r")/s)\s*$"
)

EVENT_RATE_PATTERN = r"^\s*([0-9]+(\.[0-9]+)?|\.[0-9]+)\s*/(s|min)\s*$"


def _split(text: str) -> tuple[float, str] | None:
    match = _QUANTITY.match(text.strip())
    if match is None:
        return None
    return float(match["num"]), match["unit"]


def _scaled(text: str, units: Mapping[str, float], noun: str, units_text: str) -> float:
    """``text`` as a number with an optional unit from ``units``, times that unit's factor."""
    parts = _split(text)
    if parts is None or (parts[1] and parts[1] not in units):
        raise ValueError(f"{text!r} is not a {noun}; write a number with one of the units {units_text}")
    number, unit = parts
    return number * (units[unit] if unit else 1)


def _plain_number(value: object, what: str) -> float | None:
    """A bare YAML number (not a bool, finite, not negative), or None when ``value`` is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")
    return float(value)


def _require_text(value: object, what: str, example: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a number or a string like {example!r}, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def parse_size(value: object) -> int:
    """Bytes from "256MiB", "1.5GiB", "4096" or a bare integer; the result must be a whole number of bytes."""
    total = _plain_number(value, "a size")
    if total is None:
        total = _scaled(_require_text(value, "a size", "256MiB"), SIZE_UNITS, "size", SIZE_UNITS_TEXT)
    if total != math.floor(total):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(total)


def parse_duration(value: object) -> float:
    """Seconds from "50ms", "2s", "1.5min" or a bare number of seconds."""
    number = _plain_number(value, "a duration")
    if number is not None:
        return number
    text = _require_text(value, "a duration", "50ms")
    return _scaled(text, DURATION_UNITS, "duration", DURATION_UNITS_TEXT)


def parse_rate(value: object) -> float | None:
    """Bytes per second from "64MiB/s", "1Gbit/s" or a bare number; None for "unlimited"."""
    number = _plain_number(value, "a rate")
    if number is not None:
        return number
    text = _require_text(value, "a rate", "64MiB/s")
    if text.strip() == UNLIMITED:
        return None
    stripped = text.strip()
    parts = _split(stripped[:-2]) if stripped.endswith("/s") else None
    if parts is None or parts[1] not in {**SIZE_UNITS, **BIT_RATE_UNITS}:
        raise ValueError(
            f"{text!r} is not a rate; write 'unlimited' or a number with one of the units {RATE_UNITS_TEXT}"
        )
    number, unit = parts
    return number * (SIZE_UNITS[unit] if unit in SIZE_UNITS else BIT_RATE_UNITS[unit])


def parse_event_rate(value: object) -> float:
    """Events per second from "200/s", "12000/min" or a bare number (per second)."""
    number = _plain_number(value, "a rate")
    if number is not None:
        return number
    text = _require_text(value, "a rate", "200/s").strip()
    per = next((unit for unit in EVENT_RATE_UNITS if text.endswith(f"/{unit}")), None)
    parts = _split(text[: -len(per) - 1]) if per is not None else None
    if per is None or parts is None or parts[1]:
        raise ValueError(f"{text!r} is not a rate of events; write a number per s or min, e.g. '200/s'")
    return parts[0] / EVENT_RATE_UNITS[per]


def format_size(size: int) -> str:
    """``size`` in the largest binary unit from MiB up that divides it ("256MiB"), else in bytes."""
    for unit in ("TiB", "GiB", "MiB"):
        if size and size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return f"{size} bytes"
