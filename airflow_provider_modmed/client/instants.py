"""FHIR instants, the one place they are parsed, compared and formatted (on pendulum).

Two parsers, on purpose, with different contracts:

* :func:`parse_instant` / :func:`instant_ms` are **strict**: for values FHIR types as ``instant``
  (``meta.lastUpdated``, a bulk ``_since``, a manifest's ``transactionTime``). A date, a time and a time
  zone are all required (``2026-01-05T10:11:12.345Z``, ``+02:00`` or ``+0200``; any number of fraction
  digits; a space instead of ``T`` is tolerated, as ``str(datetime)`` writes it). ``2026-01-05`` or a
  zone-less ``2026-01-05T10:11:12`` is refused with :class:`InvalidInstantError` naming the field: an
  instant without a zone is not a point in time, and guessing UTC would shift a ``_since`` silently.
* :func:`parse_bound_ms` is **lenient**: for window bounds a user gives (``since``, ``until``,
  ``last_updated_start``, a data interval): a ``datetime`` (naive = UTC), a ``date`` (midnight UTC),
  epoch milliseconds, or an ISO 8601 string (``2026-01-05`` = midnight UTC, zone-less = UTC).

Arithmetic is on integer epoch milliseconds, **floored**: sub-millisecond digits (ModMed writes seven
fraction digits) are dropped, so an inclusive lower bound stays exact and every layer compares the same
integers. :func:`format_instant` writes the FHIR form with milliseconds and ``Z``. Values handed back
as objects are pendulum ``DateTime`` values.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pendulum

from airflow_provider_modmed.errors import ConfigurationError

__all__ = [
    "InvalidInstantError",
    "day_start_ms",
    "duration_ms",
    "epoch_ms",
    "format_instant",
    "from_epoch_ms",
    "instant_ms",
    "normalize_since",
    "now_ms",
    "parse_bound_ms",
    "parse_instant",
    "utc_day",
]

DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: a FHIR instant: date, time with seconds, optional fraction, a zone (``Z`` or an offset)
_INSTANT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})$")


class InvalidInstantError(ConfigurationError, ValueError):
    """A value that is not the instant its field requires; the message names the field."""


# -- strict: FHIR ``instant`` ----------------------------------------------------------------------

def parse_instant(value: str | datetime, field: str = "instant") -> pendulum.DateTime:
    """A FHIR ``instant`` -> an aware pendulum ``DateTime``; a zone is required (see the module docstring).

    An aware ``datetime`` is accepted as is; a naive one is refused like a zone-less string.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInstantError(f"{field} must carry a time zone; got a naive datetime")
        return pendulum.instance(value)
    return pendulum.instance(_strict(value, field))


def instant_ms(value: str | datetime, field: str = "instant") -> int:
    """A FHIR ``instant`` (zone required) -> epoch milliseconds, floored."""
    if isinstance(value, datetime):
        return epoch_ms(parse_instant(value, field))
    return epoch_ms(_strict(value, field))


def _strict(value: Any, field: str) -> datetime:
    # the pattern decides what is an instant; the standard parser then reads it (about 3x faster than
    # pendulum.parse, and the sandbox reads a million of these when it loads its seed)
    if not isinstance(value, str):
        raise InvalidInstantError(f"{field} must be a FHIR instant string, got {type(value).__name__}")
    text = value.strip()
    if not _INSTANT_RE.match(text):
        raise InvalidInstantError(f"{field} must be a FHIR instant with a time zone (e.g. 2024-01-01T00:00:00Z); "
                                  f"got {text[:40]!r}")
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # a month, day or hour out of range
        raise InvalidInstantError(f"{field} is not a valid instant: {text[:40]!r}") from None


def normalize_since(value: Any, now: datetime | None = None, field: str = "_since") -> str | None:
    """The bulk ``_since`` to send: None for no value, else a FHIR instant string.

    A string is kept exactly as given (so a manifest's ``transactionTime`` round-trips), except that a
    space before the time becomes ``T``; an aware datetime is written in UTC with ``Z``. Refuses values
    without a zone and values in the future (the server would silently miss every change).
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        return None
    if isinstance(value, datetime):
        when = parse_instant(value, field)
        text = when.in_timezone("UTC").isoformat().replace("+00:00", "Z")
    elif isinstance(value, str):
        text = value.strip()
        when = parse_instant(text, field)
        if text[10] == " ":
            text = f"{text[:10]}T{text[11:]}"
    else:
        raise InvalidInstantError(f"{field} must be a string or an aware datetime, got {type(value).__name__}")
    if when > (now or datetime.now(timezone.utc)) + timedelta(seconds=1):
        raise InvalidInstantError(f"{field} {text!r} is in the future: the export would miss every change")
    return text


# -- lenient: user-given window bounds -------------------------------------------------------------

def parse_bound_ms(value: str | int | float | datetime | date, field: str = "bound") -> int:
    """A user-given window bound -> epoch milliseconds, floored (see the module docstring).

    Accepts a datetime (naive = UTC), a date (midnight UTC), epoch milliseconds, or an ISO 8601 string
    (``2026-01-05`` is midnight UTC; a string without a zone is UTC).
    """
    if isinstance(value, bool):
        raise InvalidInstantError(f"{field} is not an instant: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise InvalidInstantError(f"{field} is not an instant: {value!r}")
        return math.floor(value)
    if isinstance(value, datetime):
        return epoch_ms(value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc))
    if isinstance(value, date):
        return day_start_ms(value)
    if not isinstance(value, str):
        raise InvalidInstantError(f"{field} must be a date-time, got {type(value).__name__}")
    text = value.strip()
    try:
        parsed = pendulum.parse(text[:-1] + "Z" if text.endswith("z") else text) if text else None
    except ValueError:  # pendulum's ParserError
        parsed = None
    if isinstance(parsed, datetime):
        return epoch_ms(parsed)
    if isinstance(parsed, date):
        return day_start_ms(parsed)
    raise InvalidInstantError(f"{field} {text[:40]!r} is not an ISO 8601 date-time")


# -- millisecond arithmetic and formatting ---------------------------------------------------------

def epoch_ms(dt: datetime) -> int:
    """An aware datetime -> epoch milliseconds, floored (exact integer arithmetic, no float)."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise InvalidInstantError("a naive datetime has no place in time: give it a time zone")
    return calendar.timegm(dt.utctimetuple()) * 1000 + dt.microsecond // 1000


def from_epoch_ms(ms: int) -> pendulum.DateTime:
    """Epoch milliseconds -> a UTC pendulum ``DateTime``."""
    return pendulum.instance(_EPOCH + timedelta(milliseconds=ms))


def day_start_ms(day: date) -> int:
    """Midnight UTC starting ``day``, in epoch milliseconds."""
    return (date(day.year, day.month, day.day) - date(1970, 1, 1)).days * DAY_MS


def utc_day(ms: int) -> date:
    """The UTC calendar day an epoch-ms instant falls on."""
    return date(1970, 1, 1) + timedelta(days=ms // DAY_MS)


def duration_ms(value: timedelta | float | int) -> int:
    """A duration (timedelta, or seconds) -> milliseconds."""
    if isinstance(value, timedelta):
        return (value.days * 86_400 + value.seconds) * 1000 + value.microseconds // 1000
    return int(float(value) * 1000)


def format_instant(ms: int) -> str:
    """Epoch ms -> FHIR instant with millisecond precision in UTC (``2026-05-04T10:11:12.345Z``)."""
    seconds, frac = divmod(ms, 1000)
    t = time.gmtime(seconds)
    return f"{t[0]:04d}-{t[1]:02d}-{t[2]:02d}T{t[3]:02d}:{t[4]:02d}:{t[5]:02d}.{frac:03d}Z"


def now_ms() -> int:
    """The client's clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000
