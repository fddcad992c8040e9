"""What one triggerer process shares between triggers, for real against the sandbox: one client (httpx
pool, TLS context) per connection in an event loop, kept open while any trigger of that connection runs;
and one poll loop for many watchers of the same stream, counted at the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from airflow.triggers.base import TriggerEvent

from airflow_provider_modmed.client.changes import Cursor, PollResult
from airflow_provider_modmed.client.instants import now_ms
from airflow_provider_modmed.hooks import modmed as hook_module
from airflow_provider_modmed.sandbox.server import SandboxServer
from airflow_provider_modmed.triggers import changes as trig
from airflow_provider_modmed.triggers.changes import ModMedChangesEventTrigger, ModMedChangesTrigger

pytestmark = [pytest.mark.airflow, pytest.mark.integration]


def search_calls(sb: SandboxServer) -> int:
    return sb.stats().get("requests:proprietary", 0)


async def stop(pending: asyncio.Future[Any], events: AsyncIterator[Any]) -> None:
    """Cancel a trigger mid-poll and close its generator, as the triggerer does when a trigger goes."""
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    await events.aclose()  # type: ignore[attr-defined]


class PollLog:
    """Wraps the triggers' poll: which client each trigger (by resource type) polled with, and how often."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clients: dict[str, list[Any]] = defaultdict(list)
        self.polled = asyncio.Condition()
        original = trig.apoll_changes

        async def polling(client: Any, query: Any, cursor: Cursor, **kwargs: Any) -> PollResult:
            result = await original(client, query, cursor, **kwargs)  # a closed client raises here
            async with self.polled:
                self.clients[query.resource_type].append(client)
                self.polled.notify_all()
            return result

        monkeypatch.setattr(trig, "apoll_changes", polling)

    async def wait(self, resource_type: str, polls: int) -> None:
        async with self.polled:
            await asyncio.wait_for(self.polled.wait_for(lambda: len(self.clients[resource_type]) >= polls), 30)


def test_triggers_of_one_connection_share_one_client_until_the_last_goes(
        sb: SandboxServer, modmed_connections: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        log = PollLog(monkeypatch)
        # two trigger classes on modmed_default (own poll loops), one trigger on another connection
        watcher = ModMedChangesEventTrigger(resource_type="Patient", poll_interval=0.1, share_stream=False)
        fresh = Cursor.fresh(now_ms(), 1000).to_json()
        sensor = ModMedChangesTrigger(resource_type="Appointment", cursor=fresh, poll_interval=0.1)
        other = ModMedChangesEventTrigger(resource_type="Practitioner", modmed_conn_id="modmed_proprietary_cc",
                                          poll_interval=0.1, share_stream=False)
        runs = {t: t.run() for t in (watcher, sensor, other)}
        pending = {t: asyncio.ensure_future(anext(events)) for t, events in runs.items()}
        for resource_type in ("Patient", "Appointment", "Practitioner"):
            await log.wait(resource_type, 2)
        shared = log.clients["Patient"][0]
        assert {id(c) for c in log.clients["Patient"] + log.clients["Appointment"]} == {id(shared)}
        assert log.clients["Practitioner"][0] is not shared  # another connection, another client and pool
        assert hook_module._shared_clients[asyncio.get_running_loop()]["modmed_default"][0].users == 2

        await stop(pending.pop(watcher), runs[watcher])  # one trigger of the connection goes ...
        assert not shared.http.is_closed
        after = len(log.clients["Appointment"])
        await log.wait("Appointment", after + 3)  # ... the other keeps polling with the same open client
        assert all(c is shared for c in log.clients["Appointment"]) and not pending[sensor].done()

        await stop(pending.pop(sensor), runs[sensor])  # the last user of modmed_default: closed
        assert shared.http.is_closed
        assert "modmed_default" not in hook_module._shared_clients[asyncio.get_running_loop()]
        await stop(pending.pop(other), runs[other])
        assert log.clients["Practitioner"][0].http.is_closed
        assert not hook_module._shared_clients[asyncio.get_running_loop()]

    asyncio.run(scenario())


def test_a_connection_used_again_after_its_last_user_gets_a_new_client(
        sb: SandboxServer, modmed_connections: Any) -> None:
    from airflow_provider_modmed.hooks.modmed import ModMedHook

    patient_id = sb.app_state.store.create({"resourceType": "Patient", "name": [{"family": "Shared"}]}).id

    async def scenario() -> None:
        async with ModMedHook("modmed_default").shared_async_client() as first:
            async with ModMedHook("modmed_default").shared_async_client() as nested:
                assert nested is first
            assert not first.http.is_closed  # the outer user still holds it
            assert (await first.read("Patient", patient_id))["id"] == patient_id
        assert first.http.is_closed
        async with ModMedHook("modmed_default").shared_async_client() as again:
            assert again is not first and not again.http.is_closed

    asyncio.run(scenario())


def test_many_watchers_of_one_stream_cost_one_poll_per_cadence(sb: SandboxServer, modmed_connections: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """N asset watchers (N DAGs, each its own kwargs) of one connection, type and cadence: the sandbox
    serves the requests of one poll loop, not N, and every watcher gets the change."""
    from airflow.triggers.shared_stream import SharedStreamManager

    watchers_n = 20
    opened: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []
    polled_a_few: list[asyncio.Event] = []  # made inside the test's event loop
    original = ModMedChangesEventTrigger.open_shared_stream.__func__  # type: ignore[attr-defined]

    async def counting(cls: Any, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        opened.append(kwargs)
        async for snapshot in original(cls, kwargs):
            snapshots.append(snapshot)
            if len(snapshots) >= 5:  # the baseline and a few idle polls
                polled_a_few[0].set()
            yield snapshot

    monkeypatch.setattr(ModMedChangesEventTrigger, "open_shared_stream", classmethod(counting))
    watchers = [ModMedChangesEventTrigger(resource_type="Patient", poll_interval=0.2, lookback=1,
                                          max_changes_in_event=10 + i) for i in range(watchers_n)]
    assert len({w.serialize()[1]["max_changes_in_event"] for w in watchers}) == watchers_n  # N identities
    assert len({w.shared_stream_key() for w in watchers}) == 1

    async def scenario() -> tuple[list[TriggerEvent], int, str]:
        manager = SharedStreamManager()
        polled_a_few.append(asyncio.Event())
        key = watchers[0].shared_stream_key()
        before = search_calls(sb)
        streams = [w.filter_shared_stream(manager.subscribe(trigger_id=i, trigger=w, key=key))
                   for i, w in enumerate(watchers, start=1)]
        pending = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.wait_for(polled_a_few[0].wait(), 30)
        new_id = sb.app_state.store.create({"resourceType": "Patient", "name": [{"family": "ManyDags"}]}).id
        events = [await asyncio.wait_for(p, 30) for p in pending]
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        await manager.stop_all()
        return events, search_calls(sb) - before, new_id

    events, served, new_id = asyncio.run(scenario())
    assert len(opened) == 1  # one poll loop for the N watchers
    assert all([c["id"] for c in e.payload["changes"]] == [new_id] for e in events)
    polled = sum(s["calls"] for s in snapshots)  # the requests of the loop's polls, as the flow counted them
    per_poll = max(s["calls"] for s in snapshots)
    # what the sandbox served is the one loop's polls (one more may have been cut short by the stop):
    # N watchers polling on their own would have sent at least N x len(snapshots) requests
    assert polled <= served <= polled + per_poll, (served, polled)
    assert served < watchers_n * len(snapshots)
