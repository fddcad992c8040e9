#!/usr/bin/env python
"""Change-detection benchmark: what one poll costs, in calls, per track and strategy.

    python bench/bench_changes.py [--patients 200]

An in-process sandbox (both tracks, one store). For each scenario it runs polls with the same flow the
sensor, the triggers and the asset watchers use (``client.changes.poll_changes``) and prints, per poll:
the calls the flow counted (``PollResult.calls``), the FHIR calls the sandbox counted
(``/_sandbox/stats``; token requests are reported apart) and the resources read. Token requests are made
once per client and do not recur per poll.

Scenarios:

* an idle poll (nothing new) with ``k`` resources already changed today: the proprietary track filters by
  whole days, so it re-reads today's changes each poll (``ceil(k / 50)`` calls; the look-back overlap on
  the certified track is only the last ``lookback`` seconds);
* the same without ModMed's ``Content-flag: Pagination_optimization_disabled`` (one trailing empty page);
* a poll with ``n`` new changes;
* a scan (a type without ``_lastUpdated`` on the proprietary track: Condition): the whole result set;
* a closed window (the sensor's data-interval mode): one poll;
* ``w`` asset watchers on one connection and type: one shared poll loop, so the same calls as one.

No assertions: it prints the figures (and a last ``RESULT {json}`` line for tooling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_provider_modmed.client.changes import ChangeQuery, Cursor, PollResult, poll_changes  # noqa: E402
from airflow_provider_modmed.client.config import ClientConfig  # noqa: E402
from airflow_provider_modmed.client.fhir import FhirClient  # noqa: E402
from airflow_provider_modmed.sandbox.server import SandboxServer  # noqa: E402


def now_ms() -> int:
    return int(time.time() * 1000)


class Bench:
    def __init__(self, sb: SandboxServer) -> None:
        self.sb = sb
        p = sb.credentials["proprietary"]
        c = sb.credentials["certified"]["client_secret_post"]
        self.clients = {
            "proprietary": FhirClient(ClientConfig(
                track="proprietary", fhir_base=p["fhir_base"], firm="apiportal", api_key=p["api_key"],
                auth_method="password", username=p["username"], password=p["password"])),
            "certified": FhirClient(ClientConfig(
                track="certified", fhir_base=sb.credentials["certified"]["fhir_base"], firm="apiportal",
                auth_method="client_secret", client_id=c["client_id"], client_secret=c["client_secret"])),
        }
        self.rows: list[dict[str, Any]] = []

    def fhir_calls(self, track: str) -> int:
        return int(self.sb.stats().get(f"requests:{track}", 0))

    def poll(self, scenario: str, track: str, query: ChangeQuery, cursor: Cursor) -> PollResult:
        before = self.fhir_calls(track)
        result = poll_changes(self.clients[track], query, cursor, now_ms=now_ms())
        served = self.fhir_calls(track) - before
        self.rows.append({"scenario": scenario, "track": track, "strategy": result.strategy.value,
                          "calls": result.calls, "sandbox_calls": served, "read": result.scanned,
                          "new": len(result.changes)})
        return result

    def create(self, resource_type: str, n: int, **body: Any) -> None:
        for _ in range(n):
            self.sb.app_state.store.create({"resourceType": resource_type, **body})

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def earlier_today_ms() -> int:
    """An offset that stamps writes earlier today (UTC), outside the look-back: at most 30 minutes ago."""
    since_midnight = now_ms() % 86_400_000
    return -min(30 * 60_000, max(since_midnight - 1000, 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=200, help="seeded patients (the scan's size)")
    args = parser.parse_args()
    with SandboxServer(patients=args.patients, seed=5, rate_limit_per_minute=1_000_000) as sb:
        bench = Bench(sb)
        patient = ChangeQuery.build("Patient", lookback=120)
        for track in ("proprietary", "certified"):
            bench.poll("warm-up (token)", track, patient, Cursor(now_ms()))

        # 1. an idle poll, k resources changed earlier today (before the look-back)
        today = 0
        for k in (0, 50, 200, 1000):
            sb.faults(clock_offset_ms=earlier_today_ms())
            bench.create("Patient", k - today, name=[{"family": "Bench"}])
            sb.reset_faults()
            today = k
            for track in ("proprietary", "certified"):
                cursor = poll_changes(bench.clients[track], patient, Cursor(now_ms()), now_ms=now_ms()).cursor
                bench.poll(f"idle; {k} changed earlier today", track, patient, cursor)
            no_flag = ChangeQuery.build("Patient", lookback=120, exact_paging=False)
            cursor = poll_changes(bench.clients["proprietary"], no_flag, Cursor(now_ms()), now_ms=now_ms()).cursor
            bench.poll(f"idle; {k} changed earlier today; no paging flag", "proprietary", no_flag, cursor)

        # 2. a poll that finds n new changes (Encounter: nothing else changed today)
        encounter = ChangeQuery.build("Encounter", lookback=120)
        for n in (1, 49, 120):
            for track in ("proprietary", "certified"):
                cursor = poll_changes(bench.clients[track], encounter, Cursor(now_ms()), now_ms=now_ms()).cursor
                before_new = len(sb.app_state.store.ground_truth("Encounter"))
                bench.create("Encounter", n, status="finished")
                result = bench.poll(f"{n} new (Encounter, {before_new} in store)", track, encounter, cursor)
                bench.poll(f"idle right after {n} new (look-back overlap)", track, encounter, result.cursor)

        # 3. a scan: Condition has no _lastUpdated on the proprietary track
        conditions = sb.app_state.store.count("Condition")
        scan = ChangeQuery.build("Condition", lookback=120)
        bench.poll(f"scan: any poll ({conditions} Conditions)", "proprietary", scan, Cursor(now_ms()))
        bench.poll("scan narrowed to one patient", "proprietary",
                   ChangeQuery.build("Condition", {"patient": "1"}, lookback=120), Cursor(now_ms()))

        # 4. a closed window (a data interval): one poll
        start = now_ms() - 3_600_000
        for track in ("proprietary", "certified"):
            bench.poll(f"closed window, last hour ({today} Patients today)", track, patient, Cursor(start, now_ms()))
        bench.close()
        stats = sb.stats()

    print(f"{'scenario':<52} {'track':<12} {'strategy':<8} {'calls':>5} {'sandbox':>7} {'read':>5} {'new':>4}")
    for r in bench.rows:
        print(f"{r['scenario']:<52} {r['track']:<12} {r['strategy']:<8} {r['calls']:>5} {r['sandbox_calls']:>7} "
              f"{r['read']:>5} {r['new']:>4}")
    print(f"\ntoken requests over the whole run: {stats.get('token_requests', 0)} (one per client, not per poll)")
    print("shared streams: w watchers of one connection + type + cadence make one poll loop: the calls of one "
          "(tests/airflow/test_changes_triggers.py::test_sibling_watchers_share_one_poll_loop counts them)")
    print("RESULT " + json.dumps({"rows": bench.rows, "token_requests": stats.get("token_requests", 0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
