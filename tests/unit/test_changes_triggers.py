"""The triggers without a network: serialization, the shared-stream key, and a watcher applying synthetic
shared snapshots to its own cursor (baseline, de-duplication, inconsistent polls, catch-up, truncation)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from airflow_provider_modmed.client.changes import Change, Cursor, PollResult, Strategy
from airflow_provider_modmed.client.instants import instant_ms
from airflow_provider_modmed.errors import ConfigurationError
from airflow_provider_modmed.triggers import changes as trig
from airflow_provider_modmed.triggers.changes import ModMedChangesEventTrigger, ModMedChangesTrigger

T0 = instant_ms("2026-05-04T10:00:00Z")


def test_sensor_trigger_serializes_its_cursor_as_plain_json() -> None:
    cursor = Cursor(T0, None, {"7": ("2", T0 + 5)})
    trigger = ModMedChangesTrigger(resource_type="Patient", cursor=cursor.to_json(), search_params={"status": "x"},
                                   poll_interval=5, not_before="2026-05-04T10:05:00.000Z")
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_modmed.triggers.changes.ModMedChangesTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert Cursor.from_json(kwargs["cursor"]) == cursor and kwargs["search_params"] == [["status", "x"]]
    assert ModMedChangesTrigger(**kwargs).serialize() == (classpath, kwargs)
    with pytest.raises(ConfigurationError):
        ModMedChangesTrigger(resource_type="Patient", cursor={"nope": 1})
    with pytest.raises(ConfigurationError):
        ModMedChangesTrigger(resource_type="Patient", cursor=cursor.to_json(), search_params={"_count": 5})


def test_watchers_share_a_stream_only_when_they_would_send_the_same_requests() -> None:
    def key(**kw: Any) -> Any:
        return ModMedChangesEventTrigger(**{"resource_type": "Patient", **kw}).shared_stream_key()

    base = key()
    assert base == key(since="2026-01-01T00:00:00Z") == key(max_changes_in_event=3)  # per-watcher fields
    assert key(search_params={"a": "1", "b": "2"}) == key(search_params=[("b", "2"), ("a", "1")])  # order-free
    for other in ({"modmed_conn_id": "other"}, {"resource_type": "Appointment"}, {"poll_interval": 30.0},
                  {"lookback": 5.0}, {"search_params": {"status": "booked"}}, {"page_size": 10}):
        assert key(**other) != base, other
    assert key(share_stream=False) is None
    # the kwargs (Airflow's trigger identity) are deterministic: the same arguments, the same hash
    a, b = ModMedChangesEventTrigger(resource_type="Patient"), ModMedChangesEventTrigger(resource_type="Patient")
    assert a.serialize() == b.serialize()
    with pytest.raises(ConfigurationError):
        ModMedChangesEventTrigger(resource_type="Patient", since="last tuesday")


def snapshot(covered: int, rows: list[tuple[str, str, int]], next_low: int | None = None,
             consistent: bool = True) -> dict[str, Any]:
    return {"covered_from_ms": covered, "next_low_ms": covered if next_low is None else next_low,
            "observed": [list(r) for r in rows], "consistent": consistent, "calls": 1, "poll": 1}


async def feed(items: list[dict[str, Any]]) -> AsyncIterator[Any]:
    for item in items:
        yield item


class Store:
    def __init__(self, value: Any = None) -> None:
        self.values: dict[str, Any] = {}
        self.initial = value

    async def aget(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, self.initial if self.initial is not None else default)

    async def aset(self, key: str, value: Any) -> None:
        self.values[key] = value


def events_of(watcher: ModMedChangesEventTrigger, snapshots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [e.payload async for e in watcher.filter_shared_stream(feed(snapshots))]

    return asyncio.run(run())


def test_a_watcher_baselines_then_reports_each_version_once() -> None:
    watcher = ModMedChangesEventTrigger(resource_type="Patient", lookback=1, max_changes_in_event=2)
    store = Store()
    watcher.asset_state_store = store  # type: ignore[assignment]
    events = events_of(watcher, [
        snapshot(T0, [("old", "1", T0 + 1)]),                                         # baseline: not news
        snapshot(T0, [("old", "1", T0 + 1), ("a", "1", T0 + 2)]),                      # a is news
        snapshot(T0, [("old", "1", T0 + 1), ("a", "1", T0 + 2)]),                      # nothing new
        snapshot(T0, [("a", "2", T0 + 3), ("b", "1", T0 + 3), ("c", "1", T0 + 3)]),    # three: truncated at 2
        snapshot(T0, []),
    ])
    assert [e["count"] for e in events] == [1, 3]
    assert events[0]["changes"] == [{"id": "a", "versionId": "1", "lastUpdated": "2026-05-04T10:00:00.002Z"}]
    assert events[1]["truncated"] and len(events[1]["changes"]) == 2
    assert events[1]["from"] == events[1]["to"] == "2026-05-04T10:00:00.003Z"
    (saved,) = store.values.values()  # saved one snapshot after the event
    assert set(saved["seen"]) == {"old", "a", "b", "c"} and saved["seen"]["a"][0] == "2"


def test_an_inconsistent_snapshot_does_not_move_the_cursor() -> None:
    watcher = ModMedChangesEventTrigger(resource_type="Patient", lookback=0,
                                        since="2026-05-04T10:00:00Z")
    events = events_of(watcher, [
        snapshot(T0, [("a", "1", T0 + 500)], next_low=T0 + 500, consistent=False),
        snapshot(T0, [("a", "1", T0 + 500), ("b", "1", T0 + 100)], next_low=T0 + 500),  # b was skipped before
    ])
    assert [[c["id"] for c in e["changes"]] for e in events] == [["a"], ["b"]]


def test_a_watcher_behind_the_shared_loop_catches_up_with_its_own_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    polled: list[Cursor] = []

    async def fake_poll(client: Any, query: Any, cursor: Cursor, **kwargs: Any) -> PollResult:
        polled.append(cursor)
        found = (Change("x", "1", T0 - 50_000),)
        nxt = Cursor(cursor.low_ms, None, {"x": ("1", T0 - 50_000)})
        return PollResult(found, nxt, Strategy.DAY, 2, 2, 10, True, 0, cursor.low_ms)

    @contextlib.asynccontextmanager
    async def fake_client(conn_id: str) -> AsyncIterator[object]:
        yield object()
        polled.append(Cursor(0))  # released once, at the end

    monkeypatch.setattr(trig, "apoll_changes", fake_poll)
    monkeypatch.setattr(trig, "_client", fake_client)
    saved = Cursor(T0 - 86_400_000, None, {}).to_json()  # a day-old cursor in the state store
    watcher = ModMedChangesEventTrigger(resource_type="Patient", lookback=1)
    watcher.asset_state_store = Store(saved)  # type: ignore[assignment]
    events = events_of(watcher, [snapshot(T0 - 3_600_000, [("y", "1", T0)], next_low=T0 - 1000),
                                 snapshot(T0 - 1000, [("y", "1", T0), ("z", "1", T0 + 1)], next_low=T0)])
    assert polled[0].low_ms == T0 - 86_400_000 and len(polled) == 2  # one catch-up poll, then the close
    assert [[c["id"] for c in e["changes"]] for e in events] == [["x"], ["y", "z"]]
    assert events[0]["calls"] == 3  # the shared poll and the catch-up's two pages
