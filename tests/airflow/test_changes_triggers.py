"""The change-detection triggers' run() for real against the sandbox, through Airflow's connection API:
the sensor's trigger (including a triggerer restart rebuilt from its serialized kwargs), the asset
watcher's trigger (baseline, state store, catch-up) and the shared poll loop of sibling watchers under
Airflow's own SharedStreamManager."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from airflow.sdk.serde import deserialize, serialize
from airflow.triggers.base import TriggerEvent

from airflow_provider_modmed.client.changes import Cursor
from airflow_provider_modmed.client.instants import format_instant, now_ms
from airflow_provider_modmed.errors import ServerError
from airflow_provider_modmed.sandbox.server import SandboxServer
from airflow_provider_modmed.triggers import changes as trig
from airflow_provider_modmed.triggers.changes import ModMedChangesEventTrigger, ModMedChangesTrigger

pytestmark = [pytest.mark.airflow, pytest.mark.integration]


def create_patient(sb: SandboxServer, name: str = "Changes") -> str:
    row = sb.app_state.store.create({"resourceType": "Patient", "name": [{"family": name}]})
    return row.id


def search_calls(sb: SandboxServer) -> int:
    return sb.stats().get("requests:proprietary", 0)


def rebuild(trigger: Any) -> Any:
    """What a triggerer does after a restart: the classpath and the serde-encoded kwargs from the DB."""
    from airflow.sdk._shared.module_loading import import_string

    classpath, kwargs = trigger.serialize()
    stored = json.loads(json.dumps(serialize(kwargs)))
    return import_string(classpath)(**deserialize(stored))


async def stop(pending: asyncio.Future[Any], events: AsyncIterator[Any]) -> None:
    """Cancel a trigger mid-poll, as a triggerer shutdown does."""
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    await events.aclose()  # type: ignore[attr-defined]


async def first_event(events: AsyncIterator[TriggerEvent], timeout: float = 30) -> TriggerEvent:
    return await asyncio.wait_for(anext(events), timeout)


def test_sensor_trigger_resumes_from_its_serialized_cursor(sb: SandboxServer, modmed_connections: Any) -> None:
    seen_before = create_patient(sb, "Before")  # before the cursor's start: must not be reported
    time.sleep(0.01)
    cursor = Cursor(now_ms())
    trigger = ModMedChangesTrigger(resource_type="Patient", cursor=cursor.to_json(), poll_interval=0.2, lookback=1)
    kwargs = trigger.serialize()[1]
    assert kwargs["cursor"]["low_ms"] == cursor.low_ms  # the watermark travels in the kwargs
    assert json.loads(json.dumps(kwargs)) == kwargs       # plain JSON: no callables, nothing random

    async def scenario() -> tuple[TriggerEvent, int]:
        events = trigger.run()
        pending = asyncio.ensure_future(anext(events))
        before = search_calls(sb)
        await asyncio.sleep(1.0)                          # it polls, finds nothing, keeps waiting
        assert not pending.done()
        assert search_calls(sb) - before >= 2
        await stop(pending, events)                       # the triggerer goes away...
        restarted = rebuild(trigger)                      # ...and a new one rebuilds the trigger
        assert restarted.serialize() == trigger.serialize()
        new_id = create_patient(sb, "After")
        event = await first_event(restarted.run())
        return event, int(new_id)

    event, new_id = asyncio.run(scenario())
    assert event.payload["status"] == "changed" and event.payload["count"] == 1
    assert event.payload["calls"] >= event.payload["polls"] >= 1  # exact costs: tests/integration/test_changes_calls.py
    assert set(event.payload) == {"status", "count", "polls", "calls", "watermark"}  # small, no resources
    assert int(seen_before) < new_id


def test_sensor_trigger_waits_for_a_window_to_settle(sb: SandboxServer, modmed_connections: Any) -> None:
    start = now_ms()
    new_id = create_patient(sb, "Window")
    window = Cursor(start, now_ms() + 500)
    settles = window.settles_at_ms(500)
    assert settles is not None
    trigger = ModMedChangesTrigger(resource_type="Patient", cursor=window.to_json(), lookback=0.5,
                                   not_before=format_instant(settles), poll_interval=0.2)
    event = asyncio.run(first_event(trigger.run()))
    assert now_ms() >= settles
    assert event.payload["status"] == "changed" and event.payload["count"] == 1 and event.payload["polls"] == 1
    empty = ModMedChangesTrigger(resource_type="Patient",
                                 cursor=Cursor.since("1990-01-01T00:00:00Z", "1990-01-01T01:00:00Z").to_json())
    assert asyncio.run(first_event(empty.run())).payload["status"] == "empty"
    assert new_id


def test_sensor_trigger_reports_errors_as_events(sb: SandboxServer, modmed_connections: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    refused = ModMedChangesTrigger(resource_type="Immunization", cursor=Cursor(now_ms()).to_json())
    event = asyncio.run(first_event(refused.run()))
    assert event.payload["status"] == "error" and event.payload["error"] == "CapabilityError"
    assert "certified" in event.payload["message"]

    calls: list[int] = []

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise ServerError("poll Patient changes failed", status_code=503)

    monkeypatch.setattr(trig, "apoll_changes", flaky)
    failing = ModMedChangesTrigger(resource_type="Patient", cursor=Cursor(now_ms()).to_json(), poll_interval=0.01,
                                   max_consecutive_failures=3)
    event = asyncio.run(first_event(failing.run()))
    assert event.payload["status"] == "error" and event.payload["error"] == "ServerError" and len(calls) == 3


class FakeStateStore:
    """Stands in for the triggerer's asset_state_store accessor (aget/aset of JSON values)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    async def aget(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    async def aset(self, key: str, value: Any) -> None:
        self.values[key] = json.loads(json.dumps(value))


def test_event_trigger_baseline_events_and_resume_from_state(sb: SandboxServer, modmed_connections: Any) -> None:
    create_patient(sb, "PreExisting")  # changed before the watcher started: the baseline absorbs it
    store = FakeStateStore()

    async def first_life() -> tuple[TriggerEvent, str]:
        watcher = ModMedChangesEventTrigger(resource_type="Patient", poll_interval=0.2, lookback=1)
        watcher.asset_state_store = store  # type: ignore[assignment]
        events = watcher.run()
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.8)
        assert not pending.done()
        new_id = create_patient(sb, "Watched")
        event = await asyncio.wait_for(pending, 30)
        nxt = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.8)  # the cursor is saved one poll after the event left
        assert not nxt.done()
        await stop(nxt, events)
        return event, new_id

    event, new_id = asyncio.run(first_life())
    payload = event.payload
    assert payload["count"] == 1 and payload["changes"][0]["id"] == new_id
    assert payload["changes"][0]["versionId"] == "1" and payload["resource_type"] == "Patient"
    assert payload["shared"] is True and payload["calls"] >= 1
    (key, saved), = store.values.items()
    assert key.startswith("modmed_changes.modmed_default.Patient.") and new_id in saved["seen"]

    # while no triggerer runs: one update, one create. The next life resumes from the saved cursor.
    row = sb.app_state.store.get("Patient", new_id)
    assert row is not None
    sb.app_state.store.update({**row.body})
    other = create_patient(sb, "WhileDown")

    async def second_life() -> TriggerEvent:
        watcher = ModMedChangesEventTrigger(resource_type="Patient", poll_interval=0.2, lookback=1)
        watcher.asset_state_store = store  # type: ignore[assignment]
        events = watcher.run()
        try:
            return await first_event(events)
        finally:
            await events.aclose()

    resumed = asyncio.run(second_life()).payload
    assert sorted((c["id"], c["versionId"]) for c in resumed["changes"]) == sorted([(new_id, "2"), (other, "1")])


def test_event_trigger_since_catches_up_with_its_own_poll(sb: SandboxServer, modmed_connections: Any) -> None:
    new_id = create_patient(sb, "Earlier")
    since = format_instant(now_ms() - 2 * 3600 * 1000)  # before the shared loop's baseline reaches

    async def scenario() -> TriggerEvent:
        watcher = ModMedChangesEventTrigger(resource_type="Patient", poll_interval=0.2, lookback=1, since=since,
                                            max_changes_in_event=1000)
        events = watcher.run()
        try:
            return await first_event(events)
        finally:
            await events.aclose()

    payload = asyncio.run(scenario()).payload
    assert new_id in {c["id"] for c in payload["changes"]}
    assert payload["calls"] >= 2  # the shared snapshot's poll and the catch-up poll


def test_sibling_watchers_share_one_poll_loop(sb: SandboxServer, modmed_connections: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.triggers.shared_stream import SharedStreamManager

    opened: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []
    original = ModMedChangesEventTrigger.open_shared_stream.__func__  # type: ignore[attr-defined]

    async def counting(cls: Any, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        opened.append(kwargs)
        async for snapshot in original(cls, kwargs):
            snapshots.append(snapshot)
            yield snapshot

    monkeypatch.setattr(ModMedChangesEventTrigger, "open_shared_stream", classmethod(counting))
    # different watchers (their kwargs, hence Airflow's trigger identity, differ) on the same conn + type
    crm = ModMedChangesEventTrigger(resource_type="Patient", poll_interval=0.25, lookback=1, max_changes_in_event=5)
    dwh = ModMedChangesEventTrigger(resource_type="Patient", poll_interval=0.25, lookback=1, max_changes_in_event=50)
    assert crm.serialize() != dwh.serialize() and crm.shared_stream_key() == dwh.shared_stream_key()
    alone = ModMedChangesEventTrigger(resource_type="Patient", poll_interval=0.25, share_stream=False)
    assert alone.shared_stream_key() is None

    async def scenario() -> tuple[list[TriggerEvent], int]:
        manager = SharedStreamManager()
        key = crm.shared_stream_key()
        before = search_calls(sb)
        streams = [t.filter_shared_stream(manager.subscribe(trigger_id=i, trigger=t, key=key))
                   for i, t in enumerate((crm, dwh), start=1)]
        pending = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.sleep(1.0)  # the shared baseline and a few polls
        create_patient(sb, "Shared")
        events = [await asyncio.wait_for(p, 30) for p in pending]
        await asyncio.sleep(1.0)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        await manager.stop_all()
        return events, search_calls(sb) - before

    events, calls = asyncio.run(scenario())
    assert len(opened) == 1  # one poll loop for both watchers
    assert [e.payload["count"] for e in events] == [1, 1]
    assert events[0].payload["changes"] == events[1].payload["changes"]
    assert events[0].payload["calls"] == events[1].payload["calls"]  # the calls of the one shared poll
    # every search call came from the shared loop's polls (one more may have been cut short by the stop)
    polled = sum(s["calls"] for s in snapshots)
    assert len(snapshots) >= 4 and polled <= calls <= polled + max(s["calls"] for s in snapshots), (calls, polled)
