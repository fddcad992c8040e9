"""Property: across any sequence of creates, updates, clock skew and polls, no change is missed and none
is reported twice, on both tracks (and on a type without ``_lastUpdated``, by scanning).

A dedicated small sandbox with a controlled clock: the store stamps ``meta.lastUpdated`` with a fake
"true time" plus the sandbox's ``clock_offset_ms`` fault, so hypothesis can make writes share a
millisecond, cross midnight UTC (the proprietary track's day granularity), land exactly on a watermark,
happen between the pages of a poll, and carry a skewed server clock. Polls alternate between the sync
face and the async face of the same flow, over real HTTP.

What "no change missed, none twice" means: search returns current versions only, so a resource updated
twice between polls is reported once, in its latest version. So for every resource written, the last
version reported is its final version; no ``(id, versionId)`` is reported twice; the versions reported
for one id only go up; nothing is reported that was not written.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_modmed.client.changes import (
    ChangeQuery,
    Cursor,
    PollResult,
    Strategy,
    apoll_changes,
    poll_changes,
)
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.client.instants import instant_ms
from airflow_provider_modmed.sandbox.certified_ids import served_id
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration

LOOKBACK_MS = 400
PAGE_SIZE = 2
DAY_MS = 86_400_000
#: every example gets days of its own, far from the seed data and from each other
FIRST_DAY = instant_ms("2031-01-01T00:00:00Z")

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@dataclass
class Case:
    track: str
    resource_type: str
    strategy: Strategy


CASES = {
    "proprietary-day": Case("proprietary", "Patient", Strategy.DAY),
    "certified-instant": Case("certified", "Patient", Strategy.INSTANT),
    "proprietary-scan": Case("proprietary", "Condition", Strategy.SCAN),
}


@dataclass
class World:
    """The sandbox, its fake clock, the two faces' clients, and what the current example wrote."""

    sb: SandboxServer
    configs: dict[str, ClientConfig]
    clients: dict[str, FhirClient]
    now: int = 0  # "true time" (ms); the server stamps now + clock_offset_ms
    case: Case | None = None
    subject: str = ""
    written: list[str] = field(default_factory=list)
    #: while a window is paged, updates hit the resources in that window (the case that shifts pages)
    focus: list[str] = field(default_factory=list)
    during_paging: list[tuple[str, int]] = field(default_factory=list)
    pages_in_poll: int = 0
    examples: Iterator[int] = field(default_factory=itertools.count)

    # -- writes --------------------------------------------------------------------------------------
    def create(self) -> None:
        assert self.case is not None
        body: dict[str, Any] = {"resourceType": self.case.resource_type}
        if self.case.resource_type == "Condition":
            body.update(subject={"reference": f"Patient/{self.subject}"}, code={"text": "property"})
        else:
            body["name"] = [{"family": "Property", "given": [self.subject]}]
        self.written.append(self.sb.app_state.store.create(body).id)

    def update(self, pick: int) -> None:
        assert self.case is not None
        if not self.written:
            return self.create()
        store = self.sb.app_state.store
        pool = self.focus or self.written
        row = store.get(self.case.resource_type, pool[-1 - pick % len(pool)])  # mostly recent ones
        assert row is not None
        store.update({**row.body, "id": row.id, "resourceType": row.type})
        return None

    def write(self, op: tuple[str, int]) -> None:
        kind, pick = op
        self.create() if kind == "create" else self.update(pick)

    def skew(self, offset_ms: int) -> None:
        self.sb.faults(clock_offset_ms=offset_ms)

    # -- writes between the pages of a poll: an httpx request hook on both faces' clients -------------
    def before_request(self, request: httpx.Request) -> None:
        if not request.url.path.endswith("/" + (self.case.resource_type if self.case else "")):
            return
        self.pages_in_poll += 1
        if self.pages_in_poll > 1 and self.during_paging:
            self.write(self.during_paging.pop(0))

    def query(self, lookback_ms: int = LOOKBACK_MS) -> ChangeQuery:
        assert self.case is not None
        params = {"patient": self.subject} if self.case.resource_type == "Condition" else None
        return ChangeQuery.build(self.case.resource_type, params, lookback=lookback_ms / 1000,
                                 page_size=PAGE_SIZE, strategy=self.case.strategy)

    def poll(self, cursor: Cursor, use_async: bool, writes: list[tuple[str, int]]) -> PollResult:
        assert self.case is not None
        self.during_paging = list(writes)
        self.pages_in_poll = 0
        emitted: list[dict[str, Any]] = []
        if use_async:
            result = asyncio.run(self._apoll(cursor, emitted))
        else:
            result = poll_changes(self.clients[self.case.track], self.query(), cursor, on_change=emitted.append,
                                  now_ms=self.now)
        for leftover in self.during_paging:  # a one-page poll had no "between pages"
            self.write(leftover)
        self.during_paging = []
        # the resources handed to on_change are exactly the changes reported
        assert sorted((r["id"], r["meta"]["versionId"]) for r in emitted) == sorted(
            (c.id, c.version_id) for c in result.changes)
        return result

    async def _apoll(self, cursor: Cursor, emitted: list[dict[str, Any]]) -> PollResult:
        assert self.case is not None

        async def hook(request: httpx.Request) -> None:
            self.before_request(request)

        async with AsyncFhirClient(self.configs[self.case.track]) as client:
            client.http.event_hooks["request"].insert(0, hook)
            return await apoll_changes(client, self.query(), cursor, on_change=emitted.append, now_ms=self.now)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with SandboxServer(patients=2, seed=3, rate_limit_per_minute=1_000_000) as sb:
        state = sb.app_state
        w = World(sb, {}, {})
        state.store._clock = lambda: w.now + state.faults.clock_offset_ms  # the fake clock, skew included
        p, c = sb.credentials["proprietary"], sb.credentials["certified"]["client_secret_post"]
        w.configs = {
            "proprietary": ClientConfig(track="proprietary", fhir_base=p["fhir_base"], firm="apiportal",
                                        api_key=p["api_key"], auth_method="password", username=p["username"],
                                        password=p["password"]),
            "certified": ClientConfig(track="certified", fhir_base=sb.credentials["certified"]["fhir_base"],
                                      firm="apiportal", auth_method="client_secret", client_id=c["client_id"],
                                      client_secret=c["client_secret"]),
        }
        w.clients = {track: FhirClient(config) for track, config in w.configs.items()}
        for client in w.clients.values():
            client.http.event_hooks["request"].insert(0, w.before_request)
        yield w
        for client in w.clients.values():
            client.close()


def start_example(world: World, case: Case, before_midnight_ms: int) -> None:
    example = next(world.examples)
    world.case = case
    world.subject = f"hyp{example}"
    world.written = []
    world.skew(0)
    # just before midnight UTC, so that the example's writes straddle two days
    world.now = FIRST_DAY + 3 * DAY_MS * example + DAY_MS - before_midnight_ms


def check(world: World, reported: list[tuple[str, str]]) -> None:
    """No (id, version) twice; per id, versions only go up and the last one is the final one."""
    assert world.case is not None
    assert len(reported) == len(set(reported)), f"reported twice: {reported}"
    per_id: dict[str, list[int]] = defaultdict(list)
    for rid, version in reported:
        per_id[rid].append(int(version))
    written = {served_id(world.case.track, stored): stored for stored in world.written}
    assert set(per_id) <= set(written), f"reported but not written: {set(per_id) - set(written)}"
    for rid, stored in written.items():
        row = world.sb.app_state.store.get(world.case.resource_type, stored)
        assert row is not None
        assert per_id[rid], f"{rid} (version {row.version}) was never reported"
        assert per_id[rid] == sorted(set(per_id[rid])), f"{rid}: versions reported out of order {per_id[rid]}"
        assert per_id[rid][-1] == row.version, f"{rid}: final version {row.version} missed; got {per_id[rid]}"


write_op = st.tuples(st.sampled_from(["create", "update"]), st.integers(0, 5))
write_step = st.tuples(st.just("write"), write_op, st.sampled_from([0, 0, 1, 2, 7]))  # 0 ms: same millisecond
tick_step = st.tuples(st.just("tick"), st.sampled_from([1, LOOKBACK_MS - 1, LOOKBACK_MS, LOOKBACK_MS + 1,
                                                        3 * LOOKBACK_MS]))
skew_step = st.tuples(st.just("skew"), st.sampled_from([-LOOKBACK_MS, LOOKBACK_MS, 0]) | st.integers(
    -LOOKBACK_MS, LOOKBACK_MS))
poll_step = st.tuples(st.just("poll"), st.booleans(), st.lists(write_op, max_size=3))
# writes, polls and clock jumps weighted so that short programs already interleave them
step = st.one_of(write_step, write_step, write_step, poll_step, poll_step, skew_step, skew_step, tick_step)
program = st.lists(step, min_size=1, max_size=24)
# for intervals, every poll step writes while it pages (to the resources of the interval being paged)
busy_poll_step = st.tuples(st.just("poll"), st.booleans(), st.lists(write_op, min_size=1, max_size=4))
window_program = st.lists(st.one_of(write_step, write_step, write_step, write_step, busy_poll_step, skew_step,
                                    tick_step, tick_step), min_size=1, max_size=30)


# -- continuous polling (an open cursor: sensors with a state file, triggers, asset watchers) ----------

@pytest.mark.parametrize("case_id", sorted(CASES))
@SETTINGS
@given(steps=program, before_midnight=st.integers(0, 2 * LOOKBACK_MS))
def test_open_cursor_never_misses_or_repeats(world: World, case_id: str, steps: list[Any],
                                             before_midnight: int) -> None:
    start_example(world, CASES[case_id], before_midnight)
    # the server clock's offset moves within [-LOOKBACK/2, +LOOKBACK/2]: a later write can carry a
    # lastUpdated up to the look-back earlier than one already seen
    cursor = Cursor(world.now - LOOKBACK_MS // 2)
    reported: list[tuple[str, str]] = []
    for op in steps:
        if op[0] == "write":
            world.now += op[2]
            world.write(op[1])
        elif op[0] == "tick":
            world.now += op[1]
        elif op[0] == "skew":
            world.skew(op[1] // 2)
        else:
            result = world.poll(cursor, op[1], op[2])
            reported += [(c.id, c.version_id) for c in result.changes]
            cursor = result.cursor
            assert all(lu >= cursor.low_ms for _, lu in cursor.seen.values())
    final = world.poll(cursor, False, [])
    reported += [(c.id, c.version_id) for c in final.changes]
    check(world, reported)
    # and once everything was reported, a poll finds nothing new
    assert world.poll(final.cursor, True, []).changes == ()


# -- closed windows (the sensor's data-interval mode) -----------------------------------------------

@pytest.mark.parametrize("case_id", sorted(CASES))
@SETTINGS
@given(steps=window_program, before_midnight=st.integers(0, 2 * LOOKBACK_MS),
       last_writes=st.lists(write_op, min_size=1, max_size=4))
def test_data_interval_windows_partition_changes(world: World, case_id: str, steps: list[Any],
                                                 before_midnight: int, last_writes: list[Any]) -> None:
    """Consecutive windows (data intervals), each polled once when it settled: together they report every
    change once. A "poll" step ends the current interval now (a scheduled run's boundary) and polls the
    intervals that settled (the worker waits the look-back first), with writes to the polled interval's
    resources between its pages."""
    start_example(world, CASES[case_id], before_midnight)
    # the first interval starts before the first write can be stamped (the skew may put it LOOKBACK early)
    bounds = [world.now - LOOKBACK_MS]
    polled = 0
    reported: list[tuple[str, str]] = []

    def poll_settled(writes: list[tuple[str, int]], use_async: bool) -> None:
        nonlocal polled
        # an interval is polled once, when the worker's clock passed its end plus the look-back
        while polled + 1 < len(bounds) and world.now >= bounds[polled + 1] + LOOKBACK_MS:
            window = Cursor(bounds[polled], bounds[polled + 1])
            assert world.case is not None and window.high_ms is not None
            world.focus = [r["id"] for r in world.sb.app_state.store.ground_truth(world.case.resource_type)
                           if r["id"] in world.written
                           and window.low_ms <= instant_ms(r["lastUpdated"]) < window.high_ms]
            result = world.poll(window, use_async, writes)
            world.focus = []
            assert result.cursor.low_ms == window.low_ms  # a window never advances
            reported.extend((c.id, c.version_id) for c in result.changes)
            polled += 1

    for op in steps:
        if op[0] == "write":
            world.now += op[2]
            world.write(op[1])
        elif op[0] == "tick":
            world.now += op[1]
        elif op[0] == "skew":
            world.skew(op[1])  # the server clock within [-LOOKBACK, LOOKBACK] of the worker's
        else:  # the interval ends now; its run polls it once it settled (time passes meanwhile)
            if world.now > bounds[-1]:
                bounds.append(world.now)
                world.now += LOOKBACK_MS
            poll_settled(op[2], op[1])
    bounds.append(world.now + LOOKBACK_MS + 1)  # the last interval reaches past every stamp written so far
    world.now = bounds[-1] + LOOKBACK_MS
    poll_settled(last_writes, False)
    bounds.append(world.now + LOOKBACK_MS + 1)  # and one more for the writes made while it was paged
    world.now = bounds[-1] + LOOKBACK_MS
    poll_settled([], True)
    assert polled == len(bounds) - 1
    check(world, reported)
