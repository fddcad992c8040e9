"""The one ``_lastUpdated`` window: strategy per track and type, the query on both tracks (midnight edges
included), exact containment, and the tracker de-duplicating by id + version."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_modmed.capabilities import DEFAULT, Track
from airflow_provider_modmed.client.instants import instant_ms
from airflow_provider_modmed.client.window import (
    Change,
    Strategy,
    Tracker,
    Window,
    is_newer,
    last_updated_ms,
    strategy_for,
)
from airflow_provider_modmed.errors import ConfigurationError, ModMedError

T0 = instant_ms("2026-03-10T23:59:59.990Z")
MIDNIGHT = instant_ms("2026-03-11T00:00:00Z")
DAY = 86_400_000


def at(text: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "1", "meta": {"lastUpdated": text}}


# -- strategy ----------------------------------------------------------------------------------------

def test_strategy_per_track_and_type() -> None:
    assert strategy_for(Track.CERTIFIED, DEFAULT, "Condition") is Strategy.INSTANT
    assert strategy_for(Track.PROPRIETARY, DEFAULT, "Patient") is Strategy.DAY
    for rt in ("Condition", "AllergyIntolerance", "MedicationStatement", "DocumentReference", "ChargeItem"):
        assert strategy_for("proprietary", DEFAULT, rt) is Strategy.SCAN
    assert strategy_for(Track.PROPRIETARY, DEFAULT, "Patient", "scan") is Strategy.SCAN
    with pytest.raises(ConfigurationError, match="use the scan strategy"):
        strategy_for(Track.PROPRIETARY, DEFAULT, "Condition", Strategy.DAY)
    assert [s.mode for s in Strategy] == ["exact", "widened", "scan"]


# -- the query: one form per window and track ------------------------------------------------------------

def test_certified_asks_for_the_window_itself_in_milliseconds() -> None:
    assert Window(T0).query(Strategy.INSTANT) == [("_lastUpdated", "ge2026-03-10T23:59:59.990Z")]
    assert Window(T0, T0 + 20).query(Strategy.INSTANT) == [
        ("_lastUpdated", "ge2026-03-10T23:59:59.990Z"), ("_lastUpdated", "lt2026-03-11T00:00:00.010Z")]
    assert Window(None, MIDNIGHT).query(Strategy.INSTANT) == [("_lastUpdated", "lt2026-03-11T00:00:00.000Z")]


def test_proprietary_asks_whole_days_with_gt_and_le() -> None:
    # open: everything from the start of the low bound's day on (gt the day before)
    assert Window(T0).query(Strategy.DAY) == [("_lastUpdated", "gt2026-03-09")]
    # a window inside one day: the same gt/le form as any other window (not eq)
    assert Window(T0 - 5000, T0).query(Strategy.DAY) == [("_lastUpdated", "gt2026-03-09"),
                                                        ("_lastUpdated", "le2026-03-10")]
    # a window that crosses midnight: gt the day before the first, le the last
    assert Window(T0, T0 + 20).query(Strategy.DAY) == [("_lastUpdated", "gt2026-03-09"),
                                                      ("_lastUpdated", "le2026-03-11")]
    # a window ending exactly at midnight does not ask for the next day; one starting there does
    assert Window(MIDNIGHT - DAY, MIDNIGHT).query(Strategy.DAY) == [("_lastUpdated", "gt2026-03-09"),
                                                                   ("_lastUpdated", "le2026-03-10")]
    assert Window(MIDNIGHT, MIDNIGHT + 1).query(Strategy.DAY) == [("_lastUpdated", "gt2026-03-10"),
                                                                 ("_lastUpdated", "le2026-03-11")]
    assert Window(None, MIDNIGHT).query(Strategy.DAY) == [("_lastUpdated", "le2026-03-10")]
    assert Window(T0).query(Strategy.SCAN) == []


def test_sub_millisecond_bounds_are_floored_in_query_and_containment_alike() -> None:
    until = Window.of(None, "2026-03-11T00:00:00.000500Z")
    assert until is not None and until.end_ms == MIDNIGHT
    assert until.query(Strategy.INSTANT) == [("_lastUpdated", "lt2026-03-11T00:00:00.000Z")]
    assert until.query(Strategy.DAY) == [("_lastUpdated", "le2026-03-10")]
    assert until.contains(at("2026-03-11T00:00:00.000Z")) is False
    assert until.contains(at("2026-03-10T23:59:59.999Z")) is True


# -- containment -----------------------------------------------------------------------------------------

def test_window_bounds_are_half_open() -> None:
    w = Window.of("2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z")
    assert w is not None
    assert w.contains(at("2026-03-10T00:00:00.000Z")) is True
    assert w.contains(at("2026-03-10T23:59:59.999Z")) is True
    assert w.contains(at("2026-03-10T23:59:59.9999999Z")) is True  # floored to .999
    assert w.contains(at("2026-03-11T00:00:00.000Z")) is False
    assert w.contains(at("2026-03-09T23:59:59.999Z")) is False
    assert w.contains(at("2026-03-11T01:00:00+02:00")) is True  # 23:00Z on the 10th
    assert w.contains({"id": "1"}) is None
    assert w.contains(at("2026-03-10T12:00:00")) is None        # no zone: not an instant, cannot be placed
    assert last_updated_ms(at("2026-03-10T00:00:00Z")) == MIDNIGHT - DAY


def test_window_from_user_bounds() -> None:
    assert Window.of(None, "") is None
    assert Window.of("2026-03-11") == Window(MIDNIGHT)                  # a date is midnight UTC
    w = Window.of("2026-03-10T06:00:00.250Z", "2026-03-11T06:00:00Z")
    assert w is not None and w.start is not None and w.start.isoformat() == "2026-03-10T06:00:00.250000+00:00"
    assert w.describe() == "[2026-03-10T06:00:00.250Z, 2026-03-11T06:00:00.000Z)"
    assert Window(None, T0).describe() == "[-inf, 2026-03-10T23:59:59.990Z)"
    with pytest.raises(ConfigurationError, match=r"ends .* before it starts"):
        Window.of("2026-02-01", "2026-01-01")
    with pytest.raises(ConfigurationError, match="not an ISO 8601"):
        Window.of("yesterday")


# -- one observed version, and the tracker ---------------------------------------------------------------

def test_change_of_a_resource() -> None:
    res = {"resourceType": "Patient", "id": "7", "meta": {"versionId": "3", "lastUpdated": "2026-03-10T23:59:59.990Z"}}
    assert Change.of(res) == Change("7", "3", T0)
    assert Change.of({**res, "meta": {"lastUpdated": "2026-03-10T23:59:59.990Z"}}).version_id == f"@{T0}"
    with pytest.raises(ModMedError, match=r"no meta\.lastUpdated"):
        Change.of({"resourceType": "Patient", "id": "7"})
    with pytest.raises(ModMedError, match="no id"):
        Change.of({"resourceType": "Patient", "meta": res["meta"]})
    with pytest.raises(ModMedError, match=r"Patient/7 meta\.lastUpdated must be a FHIR instant with a time zone"):
        Change.of({**res, "meta": {"lastUpdated": "2026-03-10"}})
    assert Change.from_row(Change("7", "3", T0).to_row()) == Change("7", "3", T0)
    assert Change("7", "3", T0).to_json() == {"id": "7", "versionId": "3", "lastUpdated": "2026-03-10T23:59:59.990Z"}


def test_versions_compare_numerically_and_stale_versions_are_not_news() -> None:
    assert is_newer(Change("1", "10", T0), ("9", T0))
    assert not is_newer(Change("1", "9", T0 + 5), ("10", T0))   # a stale replica
    assert not is_newer(Change("1", "3", T0), ("3", T0))
    assert is_newer(Change("1", "b", T0 + 1), ("a", T0))         # opaque versions: by lastUpdated
    assert not is_newer(Change("1", "b", T0 - 1), ("a", T0))


def test_tracker_filters_exactly_and_deduplicates_by_id_and_version() -> None:
    tracker = Tracker(Window(T0), {"1": ("2", T0 + 1)})
    assert not tracker.offer(Change("0", "1", T0 - 1))           # before the window
    assert tracker.offer(Change("0", "1", T0))                   # the boundary itself is in
    assert not tracker.offer(Change("1", "2", T0 + 1))           # already reported
    assert tracker.offer(Change("1", "3", T0 + 1))               # same ms, new version
    assert tracker.offer(Change("2", "1", T0 + 1))               # same ms, another id
    assert not tracker.offer(Change("2", "1", T0 + 1))           # twice in one read
    assert not tracker.offer(Change("2", "0", T0 + 2))           # an older version after a newer one
    assert [c.id for c in tracker.new] == ["0", "1", "2"]
    assert tracker.seen == {"0": ("1", T0), "1": ("3", T0 + 1), "2": ("1", T0 + 1)} and tracker.max_lu == T0 + 1
    closed = Tracker(Window(T0, T0 + 100))
    assert closed.offer(Change("a", "1", T0 + 99)) and not closed.offer(Change("b", "1", T0 + 100))
    anywhere = Tracker()
    assert anywhere.offer(Change("a", "1", 0)) and not anywhere.offer(Change("a", "1", 0))


def test_a_baseline_tracker_records_without_reporting() -> None:
    tracker = Tracker(Window(T0), report=False)
    assert not tracker.offer(Change("a", "1", T0 + 5))
    assert tracker.new == [] and tracker.seen == {"a": ("1", T0 + 5)}
