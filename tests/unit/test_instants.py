"""FHIR instants: the strict parser (a zone required), the lenient one for user-given bounds, millisecond
arithmetic and formatting, and the bulk ``_since`` normaliser."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pendulum
import pytest

from airflow_provider_modmed.client.instants import (
    InvalidInstantError,
    day_start_ms,
    duration_ms,
    epoch_ms,
    format_instant,
    from_epoch_ms,
    instant_ms,
    normalize_since,
    now_ms,
    parse_bound_ms,
    parse_instant,
    utc_day,
)
from airflow_provider_modmed.errors import ConfigurationError

T0 = 1_773_187_199_990  # 2026-03-10T23:59:59.990Z
MIDNIGHT = T0 + 10      # 2026-03-11T00:00:00.000Z


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-03-10T23:59:59.990Z", T0),
    ("2026-03-10T23:59:59.9901234Z", T0),              # ModMed's 7 fraction digits: floored to the ms
    ("2026-03-10T23:59:59.990999Z", T0),               # floored, never rounded up
    ("2026-03-11T00:59:59.990+01:00", T0),
    ("2026-03-10T18:59:59.990-0500", T0),              # an offset without a colon
    ("2026-03-10T23:59:59.99Z", T0),
    ("2026-03-10 23:59:59.990+00:00", T0),             # str(datetime) puts a space before the time
    ("2026-03-11T00:00:00Z", MIDNIGHT),
])
def test_strict_instants_parse_to_epoch_ms(text: str, expected: int) -> None:
    assert instant_ms(text) == expected
    assert parse_bound_ms(text) == expected  # the lenient parser agrees on every real instant


@pytest.mark.parametrize("text", ["2026-03-11", "2026-03-11T00:00:00", "2026-03-11T00:00Z", "2026-03",
                                  "yesterday", "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", ""])
def test_strict_parsing_refuses_partial_and_zone_less_values_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidInstantError, match=r"meta\.lastUpdated") as info:
        instant_ms(text, "meta.lastUpdated")
    assert isinstance(info.value, ConfigurationError) and isinstance(info.value, ValueError)


def test_strict_parsing_of_datetimes() -> None:
    aware = datetime(2026, 3, 10, 23, 59, 59, 990999, tzinfo=timezone.utc)
    assert instant_ms(aware) == T0
    assert isinstance(parse_instant("2026-03-10T23:59:59.990Z"), pendulum.DateTime)
    assert parse_instant("2026-03-11T01:00:00+01:00") == pendulum.datetime(2026, 3, 11, tz="UTC")
    with pytest.raises(InvalidInstantError, match="_since must carry a time zone"):
        parse_instant(datetime(2026, 3, 10), "_since")
    with pytest.raises(InvalidInstantError, match="x must be a FHIR instant string"):
        instant_ms(5, "x")  # type: ignore[arg-type]


def test_lenient_bounds() -> None:
    assert parse_bound_ms("2026-03-11") == MIDNIGHT                      # a date is midnight UTC
    assert parse_bound_ms("2026-03-11T00:00:00") == MIDNIGHT             # no zone: UTC
    assert parse_bound_ms("2026-03-11T00:00:00z") == MIDNIGHT
    assert parse_bound_ms(date(2026, 3, 11)) == MIDNIGHT
    assert parse_bound_ms(datetime(2026, 3, 10, 23, 59, 59, 990999)) == T0  # naive: UTC, floored
    assert parse_bound_ms(pendulum.datetime(2026, 3, 11, 1, tz="Europe/Paris")) == MIDNIGHT
    assert parse_bound_ms(T0) == T0 and parse_bound_ms(T0 + 0.7) == T0
    for bad in ("yesterday", "2026-13-01", "", "P1D", True, float("nan"), None):
        with pytest.raises(ConfigurationError):
            parse_bound_ms(bad, "since")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="since 'soon' is not an ISO 8601 date-time"):
        parse_bound_ms("soon", "since")


def test_millisecond_arithmetic_and_formatting() -> None:
    assert format_instant(T0) == "2026-03-10T23:59:59.990Z"
    assert format_instant(0) == "1970-01-01T00:00:00.000Z" and format_instant(-1) == "1969-12-31T23:59:59.999Z"
    assert instant_ms(format_instant(T0 + 11)) == T0 + 11
    assert utc_day(T0) == date(2026, 3, 10) and utc_day(MIDNIGHT) == date(2026, 3, 11)
    assert day_start_ms(date(2026, 3, 11)) == MIDNIGHT
    assert from_epoch_ms(T0) == pendulum.datetime(2026, 3, 10, 23, 59, 59, 990000, tz="UTC")
    assert epoch_ms(from_epoch_ms(T0)) == T0
    with pytest.raises(InvalidInstantError):
        epoch_ms(datetime(2026, 3, 10))
    assert duration_ms(timedelta(seconds=1.5)) == 1500 and duration_ms(2) == 2000 and duration_ms(0.25) == 250
    assert duration_ms(pendulum.duration(minutes=2)) == 120_000
    before = int(datetime.now(timezone.utc).timestamp() * 1000)
    assert before - 1 <= now_ms() <= int(datetime.now(timezone.utc).timestamp() * 1000) + 1


def test_normalize_since_for_bulk() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert normalize_since(None) is None and normalize_since("") is None and normalize_since("None") is None
    assert normalize_since("2024-01-01 10:00:00+00:00", now) == "2024-01-01T10:00:00+00:00"
    assert normalize_since("2024-01-01T10:00:00.123456789-0700", now) == "2024-01-01T10:00:00.123456789-0700"
    assert normalize_since(pendulum.datetime(2024, 1, 2, tz="UTC"), now) == "2024-01-02T00:00:00Z"
    for bad in ("2024-01-01", "2024-01-01T00:00:00", "2026-01-02T00:00:00Z", datetime(2024, 1, 1), 5):
        with pytest.raises(InvalidInstantError, match="_since"):
            normalize_since(bad, now)
