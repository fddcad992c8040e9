"""What a poll costs, counted twice: by the flow (PollResult.calls) and by the sandbox (/_sandbox/stats).
These are the figures docs/change-detection.md states."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from airflow_provider_modmed.client.changes import ChangeQuery, Cursor, PollResult, poll_changes
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import FhirClient
from airflow_provider_modmed.client.instants import now_ms, utc_day
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sb() -> Iterator[SandboxServer]:
    with SandboxServer(patients=30, seed=11, rate_limit_per_minute=1_000_000) as server:
        yield server


@pytest.fixture(scope="module")
def clients(sb: SandboxServer) -> Iterator[dict[str, FhirClient]]:
    p, c = sb.credentials["proprietary"], sb.credentials["certified"]["client_secret_post"]
    out = {
        "proprietary": FhirClient(ClientConfig(track="proprietary", fhir_base=p["fhir_base"], firm="apiportal",
                                               api_key=p["api_key"], auth_method="password",
                                               username=p["username"], password=p["password"])),
        "certified": FhirClient(ClientConfig(track="certified", fhir_base=sb.credentials["certified"]["fhir_base"],
                                             firm="apiportal", auth_method="client_secret",
                                             client_id=c["client_id"], client_secret=c["client_secret"])),
    }
    yield out
    for client in out.values():
        client.close()


def counted(sb: SandboxServer, client: FhirClient, track: str, query: ChangeQuery, cursor: Cursor) -> PollResult:
    before = sb.stats().get(f"requests:{track}", 0)
    result = poll_changes(client, query, cursor, now_ms=now_ms())
    assert sb.stats().get(f"requests:{track}", 0) - before == result.calls  # our counter is the server's
    return result


def test_calls_per_poll_match_the_documented_cost(sb: SandboxServer, clients: dict[str, FhirClient]) -> None:
    for client in clients.values():  # tokens first: they come once per client, not per poll
        next(iter(client.search("Patient", count=1)), None)
    query = ChangeQuery.build("Encounter", lookback=120)
    no_flag = ChangeQuery.build("Encounter", lookback=120, exact_paging=False)
    since_midnight = now_ms() % 86_400_000
    # 120 Encounters changed earlier today (outside the look-back; inside today when possible)
    sb.faults(clock_offset_ms=-min(30 * 60_000, max(since_midnight - 1000, 0)))
    for _ in range(120):
        sb.app_state.store.create({"resourceType": "Encounter", "status": "finished"})
    sb.reset_faults()
    cursors = {t: counted(sb, c, t, query, Cursor(now_ms())).cursor for t, c in clients.items()}
    # the proprietary poll reads every Encounter changed since 00:00 UTC of its lower bound's day
    first_day = utc_day(cursors["proprietary"].low_ms).isoformat()
    today = sum(1 for r in sb.app_state.store.ground_truth("Encounter") if r["lastUpdated"][:10] >= first_day)
    idle = {t: counted(sb, c, t, query, cursors[t]) for t, c in clients.items()}
    assert idle["proprietary"].calls == max(1, math.ceil(today / 50)) and idle["proprietary"].changes == ()
    assert idle["certified"].calls == 1 and idle["certified"].scanned == 0  # the overlap is the last 120 s
    flagless = counted(sb, clients["proprietary"], "proprietary", no_flag, cursors["proprietary"])
    assert flagless.calls == idle["proprietary"].calls + 1  # ModMed's trailing empty page

    for _ in range(60):
        sb.app_state.store.create({"resourceType": "Encounter", "status": "finished"})
    found = {t: counted(sb, c, t, query, cursors[t]) for t, c in clients.items()}
    assert all(len(r.changes) == 60 for r in found.values())
    assert found["proprietary"].calls == math.ceil((today + 60) / 50)
    assert found["certified"].calls == 1

    conditions = sb.app_state.store.count("Condition")
    scan = counted(sb, clients["proprietary"], "proprietary", ChangeQuery.build("Condition"), Cursor(now_ms()))
    assert scan.calls == max(1, math.ceil(conditions / 50)) and scan.scanned == conditions
