"""The change-detection core without a network: query building, the cursor over the window module's
tracker, and the poll flow fed by hand by a tiny in-memory server that can reorder or shrink its result
set between pages. (Instants: test_instants.py; windows, strategy and the tracker: test_window.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client import _flows as flows
from airflow_provider_modmed.client._flows import Emit, FhirContext
from airflow_provider_modmed.client.changes import (
    Change,
    ChangeQuery,
    Cursor,
    InconsistentPagingError,
    PollResult,
    Strategy,
    advance,
    changes_json,
    paging_consistent,
    poll,
)
from airflow_provider_modmed.client.instants import format_instant, instant_ms, parse_bound_ms
from airflow_provider_modmed.errors import CapabilityError, ConfigurationError, ModMedError

PROP_BASE = "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"
CERT_BASE = "https://apiportal.mmi.prod.fhir.ema-api.com/fhir/r4"
PROP = FhirContext(Track.PROPRIETARY, PROP_BASE)
CERT = FhirContext(Track.CERTIFIED, CERT_BASE)
T0 = instant_ms("2026-03-10T23:59:59.990Z")


# -- query building per strategy (the window's query itself: test_window.py) -------------------------

def test_a_cursor_asks_for_its_window() -> None:
    assert Cursor(T0).window.query(Strategy.INSTANT) == [("_lastUpdated", "ge2026-03-10T23:59:59.990Z")]
    assert Cursor(T0, T0 + 20).window.query(Strategy.DAY) == [
        ("_lastUpdated", "gt2026-03-09"), ("_lastUpdated", "le2026-03-11")]


def test_strategy_comes_from_track_and_capability_matrix() -> None:
    assert ChangeQuery("Patient").strategy_on(PROP) is Strategy.DAY
    assert ChangeQuery("Condition").strategy_on(PROP) is Strategy.SCAN
    assert ChangeQuery("DocumentReference").strategy_on(PROP) is Strategy.SCAN
    assert ChangeQuery("Condition").strategy_on(CERT) is Strategy.INSTANT
    assert ChangeQuery("Patient", strategy=Strategy.SCAN).strategy_on(PROP) is Strategy.SCAN


def test_query_validation() -> None:
    with pytest.raises(ConfigurationError, match="_lastUpdated"):
        ChangeQuery.build("Patient", {"_lastUpdated": "gt2026-01-01"})
    with pytest.raises(ConfigurationError, match="_count"):
        ChangeQuery.build("Patient", [("_count", "5")])
    with pytest.raises(ConfigurationError):
        ChangeQuery.build("Patient", page_size=0)
    with pytest.raises(ConfigurationError):
        ChangeQuery.build("", lookback=1)
    q = ChangeQuery.build("Appointment", {"status": ["booked", "arrived"], "patient": None}, lookback=timedelta(
        seconds=5))
    assert q.params == (("status", "arrived"), ("status", "booked")) and q.lookback_ms == 5000
    assert q.key() == ChangeQuery.build("Appointment", [("status", "booked"), ("status", "arrived")]).key()
    assert q.key() != ChangeQuery.build("Appointment").key()


def test_poll_preflight_refuses_before_any_request() -> None:
    with pytest.raises(CapabilityError):
        poll(PROP, ChangeQuery("Immunization"), Cursor(T0))  # certified-only
    with pytest.raises(ConfigurationError, match="patient"):
        poll(PROP, ChangeQuery("Account"), Cursor(T0))
    with pytest.raises(ConfigurationError, match="scan"):
        poll(PROP, ChangeQuery("Condition", strategy=Strategy.DAY), Cursor(T0))


# -- cursor and tracker ----------------------------------------------------------------------------

def test_cursor_json_round_trip_and_validation() -> None:
    cursor = Cursor(T0, None, {"7": ("3", T0 + 5), "pay|1": ("1", T0)}, baseline=True)
    data = cursor.to_json()
    assert data["low"] == "2026-03-10T23:59:59.990Z" and data["seen"]["7"] == ["3", T0 + 5]
    assert Cursor.from_json(data) == cursor
    window = Cursor.since("2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z")
    assert Cursor.from_json(window.to_json()) == window and window.is_window
    assert window.settles_at_ms(1000) == window.high_ms + 1000  # type: ignore[operator]
    with pytest.raises(ConfigurationError, match="empty window"):
        Cursor(T0, T0)
    with pytest.raises(ConfigurationError):
        Cursor.from_json({"seen": {}})
    assert Cursor(T0).watermark_ms == T0 and cursor.watermark_ms == T0 + 5
    fresh = Cursor.fresh(T0, 1000)
    assert fresh.baseline and fresh.low_ms < T0 - 1000


def test_a_cursor_tracker_knows_what_the_cursor_has_seen() -> None:
    cursor = Cursor(T0, None, {"1": ("2", T0 + 1)})
    tracker = cursor.tracker()
    assert not tracker.offer(Change("0", "1", T0 - 1))           # before the window
    assert tracker.offer(Change("0", "1", T0))                   # the boundary itself is in
    assert not tracker.offer(Change("1", "2", T0 + 1))           # already reported
    assert tracker.offer(Change("1", "3", T0 + 1))               # same ms, new version
    nxt = cursor.after(tracker, 10)
    assert nxt.low_ms == T0
    assert set(nxt.seen) == {"0", "1"}


def test_open_cursor_advances_to_lookback_before_the_latest_change_and_prunes_seen() -> None:
    cursor = Cursor(T0, None, {"old": ("1", T0)})
    tracker = cursor.tracker()
    tracker.offer(Change("a", "1", T0 + 1000))
    nxt = cursor.after(tracker, 100)
    assert nxt.low_ms == T0 + 900 and set(nxt.seen) == {"a"}
    # an inconsistent poll keeps the lower bound (the range is read again) and prunes nothing
    again = cursor.tracker()
    again.offer(Change("a", "1", T0 + 1000))
    assert cursor.after(again, 100, consistent=False).low_ms == T0
    # the client's clock caps the advance: a record stamped in the future cannot push the watermark
    capped = Cursor(T0).tracker()
    capped.offer(Change("f", "1", T0 + 86_400_000))
    assert Cursor(T0).after(capped, 100, now_ms=T0 + 500).low_ms == T0 + 400
    # a caller that knows more (a shared snapshot's next low) may lift it further
    assert Cursor(T0).after(Cursor(T0).tracker(), 100, at_least_ms=T0 + 50).low_ms == T0 + 50
    assert advance(Cursor(T0, None, {"x": ("1", T0 + 1)}), T0 + 2).seen == {}


def test_baseline_records_without_reporting() -> None:
    cursor = Cursor(T0, baseline=True)
    tracker = cursor.tracker()
    assert not tracker.offer(Change("a", "1", T0 + 5))
    nxt = cursor.after(tracker, 0)
    assert not nxt.baseline and nxt.seen == {"a": ("1", T0 + 5)}
    follow = nxt.tracker()
    assert not follow.offer(Change("a", "1", T0 + 5)) and follow.offer(Change("a", "2", T0 + 6))


def test_window_cursor_never_advances() -> None:
    cursor = Cursor(T0, T0 + 100)
    tracker = cursor.tracker()
    assert tracker.offer(Change("a", "1", T0 + 99))
    assert not tracker.offer(Change("b", "1", T0 + 100))        # the end is exclusive
    assert cursor.after(tracker, 10).low_ms == T0
    with pytest.raises(ConfigurationError):
        advance(Cursor(T0, T0 + 100), T0 + 100)


def test_paging_consistency_rule() -> None:
    assert paging_consistent([], 0)
    assert paging_consistent([5, 5, 5], 5)
    assert paging_consistent([5, 6], 6)          # grew while paging (a create at the end)
    assert not paging_consistent([5, 4], 4)      # something left: later pages shifted
    assert not paging_consistent([4, 4], 3)      # something moved past the read position


def test_changes_json_is_capped() -> None:
    listed, cut = changes_json([Change(str(i), "1", T0) for i in range(3)], limit=2)
    assert len(listed) == 2 and cut and listed[0] == {"id": "0", "versionId": "1", "lastUpdated": format_instant(T0)}


# -- the poll flow against a tiny in-memory server ---------------------------------------------------

@dataclass
class FakeServer:
    """Serves search pages over ``records`` the way either track does; ``between`` mutates between pages."""

    ctx: FhirContext
    records: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (version, lu_ms)
    order: str = "insertion"  # or "lastUpdated": an update moves a record to the end
    exact: bool = True        # proprietary: honour the Pagination_optimization_disabled flag
    between: Callable[[FakeServer, int], None] | None = None
    requests: list[httpx.Request] = field(default_factory=list)

    def put(self, rid: str, lu: int) -> None:
        version = self.records.get(rid, (0, 0))[0] + 1
        if self.order == "lastUpdated":
            self.records.pop(rid, None)
        self.records[rid] = (version, lu)

    def answer(self, request: httpx.Request) -> httpx.Response:
        if self.between is not None and self.requests:
            self.between(self, len(self.requests))
        self.requests.append(request)
        params = request.url.params
        low, high = 0, 2**62
        for value in params.get_list("_lastUpdated"):
            prefix, text = value[:2], value[2:]
            start = parse_bound_ms(text)
            end = start + (86_400_000 if len(text) == 10 else 1)
            if prefix in ("gt",):
                low = max(low, end)
            elif prefix == "ge":
                low = max(low, start)
            elif prefix == "le":
                high = min(high, end)
            elif prefix == "lt":
                high = min(high, start)
            elif prefix == "eq":
                low, high = max(low, start), min(high, end)
        rows = [(rid, v, lu) for rid, (v, lu) in self.records.items() if low <= lu < high]
        count = int(params["_count"])
        rtype = request.url.path.rsplit("/", 1)[-1]
        flagged = "pagination_optimization_disabled" in request.headers.get("content-flag", "").lower()
        if self.ctx.track is Track.PROPRIETARY:
            page = int(params.get("page", "1"))
            chunk = rows[(page - 1) * count: page * count]
            more = (page * count < len(rows)) if (flagged and self.exact) else bool(chunk)
            total = len(rows) if (flagged and self.exact) else len(chunk)
            nxt = request.url.copy_merge_params({"page": str(page + 1)}) if more else None
        else:
            offset = int(params.get("_getpagesoffset", "0"))
            chunk = rows[offset: offset + count]
            total = len(rows)
            nxt = request.url.copy_merge_params({"_getpagesoffset": str(offset + count)}) \
                if offset + count < len(rows) else None
        body: dict[str, Any] = {
            "resourceType": "Bundle", "type": "searchset", "total": total,
            "entry": [{"resource": {"resourceType": rtype, "id": rid,
                                    "meta": {"versionId": str(v), "lastUpdated": format_instant(lu)}},
                       "search": {"mode": "match"}} for rid, v, lu in chunk],
            "link": [{"relation": "next", "url": str(nxt)}] if nxt else [],
        }
        return httpx.Response(200, json=body, request=request)


def run(server: FakeServer, flow: flows.Flow[PollResult]) -> tuple[PollResult, list[dict[str, Any]]]:
    emitted: list[dict[str, Any]] = []
    out: Any = None
    while True:
        try:
            step = flow.send(out)
        except StopIteration as done:
            return done.value, emitted
        out = None
        if isinstance(step, Emit):
            emitted.append(step.value)
        else:
            assert isinstance(step, httpx.Request)
            out = server.answer(step)


def test_proprietary_poll_overlaps_the_day_and_filters_exactly() -> None:
    server = FakeServer(PROP)
    for i in range(5):
        server.put(f"old{i}", T0 - 60_000 + i)        # same day, before the cursor: read, not reported
    server.put("a", T0)
    server.put("b", T0 + 10)                          # after midnight
    server.put("yesterday", T0 - 86_400_000)          # filtered by the server
    query = ChangeQuery("Patient", lookback_ms=5, page_size=3)
    result, emitted = run(server, poll(PROP, query, Cursor(T0)))
    assert [r["id"] for r in emitted] == ["a", "b"] and [c.id for c in result.changes] == ["a", "b"]
    request = server.requests[0]
    assert request.url.params.get_list("_lastUpdated") == ["gt2026-03-09"]
    assert request.url.params["_count"] == "3"
    assert request.headers["Content-flag"] == "Pagination_optimization_disabled"
    assert result.calls == result.pages == 3 and result.scanned == 7   # exact totals: no trailing empty page
    assert result.consistent and result.strategy is Strategy.DAY
    assert result.cursor.low_ms == T0 + 10 - 5
    assert set(result.cursor.seen) == {"b"}
    again, emitted = run(server, poll(PROP, query, result.cursor))
    assert again.changes == () and emitted == []


def test_without_the_paging_flag_modmed_costs_a_trailing_empty_page() -> None:
    server = FakeServer(PROP)
    server.put("a", T0)
    result, _ = run(server, poll(PROP, ChangeQuery("Patient", exact_paging=False), Cursor(T0)))
    assert result.calls == 2 and [c.id for c in result.changes] == ["a"]
    assert "content-flag" not in server.requests[0].headers
    flagged, _ = run(FakeServer(PROP, dict(server.records)), poll(PROP, ChangeQuery("Patient"), Cursor(T0)))
    assert flagged.calls == 1


def test_certified_poll_uses_instants_and_a_closed_window() -> None:
    server = FakeServer(CERT)
    server.put("a", T0)
    server.put("b", T0 + 19)
    server.put("c", T0 + 20)
    result, _ = run(server, poll(CERT, ChangeQuery("Patient"), Cursor(T0, T0 + 20)))
    assert [c.id for c in result.changes] == ["a", "b"]
    assert server.requests[0].url.params.get_list("_lastUpdated") == [
        "ge2026-03-10T23:59:59.990Z", "lt2026-03-11T00:00:00.010Z"]
    assert result.cursor.low_ms == T0  # windows do not advance


def test_scan_strategy_reads_everything_and_filters_client_side() -> None:
    server = FakeServer(PROP)
    for i in range(7):
        server.put(f"c{i}", T0 - 10 * 86_400_000 + i)
    server.put("new", T0 + 1)
    result, _ = run(server, poll(PROP, ChangeQuery("Condition", page_size=3), Cursor(T0)))
    assert [c.id for c in result.changes] == ["new"] and result.strategy is Strategy.SCAN
    assert "_lastUpdated" not in server.requests[0].url.params
    assert result.scanned == 8 and result.calls == 3


def test_changes_while_paging_in_insertion_order_are_caught_once() -> None:
    def mutate(server: FakeServer, n: int) -> None:
        if n == 1:
            server.put("p0", T0 + 100)   # already read on page 1: its new version comes next poll
            server.put("p3", T0 + 100)   # not read yet: read in its new version now
            server.put("new", T0 + 100)  # created while paging: read at the end

    server = FakeServer(CERT, between=mutate)
    for i in range(4):
        server.put(f"p{i}", T0 + i)
    query = ChangeQuery("Patient", page_size=2, lookback_ms=50)
    first, _ = run(server, poll(CERT, query, Cursor(T0)))
    assert [(c.id, c.version_id) for c in first.changes] == [
        ("p0", "1"), ("p1", "1"), ("p2", "1"), ("new", "1"), ("p3", "2")]
    assert first.consistent
    server.between = None
    second, _ = run(server, poll(CERT, query, first.cursor))
    assert [(c.id, c.version_id) for c in second.changes] == [("p0", "2")]
    third, _ = run(server, poll(CERT, query, second.cursor))
    assert third.changes == ()


def test_a_result_set_reordered_while_paging_is_detected_and_read_again() -> None:
    # a server sorting by lastUpdated: updating p0 (read on page 1) moves it to the end and shifts p2 onto
    # page 1: p2 would be skipped. The totals give it away; the open cursor keeps its lower bound.
    def mutate(server: FakeServer, n: int) -> None:
        if n == 1:
            server.put("p0", T0 + 100)

    server = FakeServer(CERT, order="lastUpdated", between=mutate)
    for i in range(4):
        server.put(f"p{i}", T0 + i)
    query = ChangeQuery("Patient", page_size=2, lookback_ms=0)
    first, _ = run(server, poll(CERT, query, Cursor(T0)))
    assert "p2" not in {c.id for c in first.changes}
    assert not first.consistent and first.cursor.low_ms == T0
    server.between = None
    second, _ = run(server, poll(CERT, query, first.cursor))
    assert {c.id for c in second.changes} == {"p2"} and second.consistent
    reported = [(c.id, c.version_id) for c in (*first.changes, *second.changes)]
    assert len(reported) == len(set(reported))
    assert {"p0", "p1", "p2", "p3"} <= {i for i, _ in reported}


def test_a_shrinking_window_is_read_again_at_once_and_fails_if_it_keeps_moving() -> None:
    def delete_once(server: FakeServer, n: int) -> None:
        if n == 1:
            server.records.pop("p0")

    server = FakeServer(PROP, between=delete_once)
    for i in range(4):
        server.put(f"p{i}", T0 - 1000 + i)
    window = Cursor(T0 - 1000, T0)
    result, emitted = run(server, poll(PROP, ChangeQuery("Patient", page_size=2), window))
    assert result.restarts == 1 and result.consistent
    assert {c.id for c in result.changes} == {"p0", "p1", "p2", "p3"} and len(emitted) == 4

    def churn(server: FakeServer, n: int) -> None:  # deletes outpace creates on every page, on every attempt
        for _ in range(2):
            server.records.pop(next(iter(server.records)), None)
        server.put(f"x{n}", T0 - 500 + n)

    server = FakeServer(PROP, between=churn)
    for i in range(12):
        server.put(f"p{i}", T0 - 1000 + i)
    with pytest.raises(InconsistentPagingError):
        run(server, poll(PROP, ChangeQuery("Patient", page_size=2), window))


def test_errors_and_foreign_next_links() -> None:
    flow = poll(PROP, ChangeQuery("Patient"), Cursor(T0))
    request = next(flow)
    assert isinstance(request, httpx.Request)
    with pytest.raises(ModMedError) as caught:
        flow.send(httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": "bad _lastUpdated"}]}, request=request))
    assert caught.value.status_code == 400 and "invalid" in str(caught.value)

    flow = poll(PROP, ChangeQuery("Patient"), Cursor(T0))
    request = next(flow)
    foreign = {"resourceType": "Bundle", "total": 1, "link": [{"relation": "next", "url": "https://evil.example/x"}],
               "entry": [{"resource": {"resourceType": "Patient", "id": "1",
                                       "meta": {"versionId": "1", "lastUpdated": format_instant(T0)}}}]}
    step = flow.send(httpx.Response(200, json=foreign, request=request))
    assert isinstance(step, Emit)
    with pytest.raises(ModMedError, match="outside"):
        flow.send(None)


def test_both_faces_drive_the_same_flow() -> None:
    """The sync face (poll_changes) and the async face (apoll_changes) over httpx mock transports."""
    from airflow_provider_modmed.client import FhirClient
    from airflow_provider_modmed.client.changes import apoll_changes, poll_changes
    from airflow_provider_modmed.client.config import ClientConfig
    from airflow_provider_modmed.client.fhir import AsyncFhirClient

    server = FakeServer(CERT)
    for i in range(5):
        server.put(f"p{i}", T0 + i)
    config = ClientConfig(track="certified", fhir_base=CERT_BASE, firm="apiportal", auth_method="client_secret",
                          client_id="c", client_secret="s", scope="system/*.read",
                          token_url="https://apiportal.mmi.prod.fhir.ema-api.com/t")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/t"):
            return httpx.Response(200, json={"access_token": "tok", "token_type": "bearer", "expires_in": 1800})
        return server.answer(request)

    async def ahandler(request: httpx.Request) -> httpx.Response:
        return handler(request)

    query = ChangeQuery("Patient", page_size=2)
    got: list[str] = []
    with FhirClient(config, transport=httpx.MockTransport(handler)) as client:
        sync = poll_changes(client, query, Cursor(T0), on_change=lambda r: got.append(r["id"]))

    async def go() -> PollResult:
        async with AsyncFhirClient(config, transport=httpx.MockTransport(ahandler)) as client:
            return await apoll_changes(client, query, Cursor(T0))

    asynchronous = asyncio.run(go())
    assert got == [f"p{i}" for i in range(5)]
    assert sync.changes == asynchronous.changes and sync.calls == asynchronous.calls == 3
