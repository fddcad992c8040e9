"""One rate budget shared through Redis by several worker processes: the server never says 429."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from limits import RateLimitItemPerSecond

from airflow_provider_modmed.client import ClientConfig, FhirClient, RateBudget
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration

WINDOW, LIMIT = 4, 20  # the sandbox allows 20 calls per 4 s per API key


def worker(config: ClientConfig, redis_url: str, calls: int, out: Any) -> None:
    # the client's window is one second longer than the server's, as RateBudget.from_config does
    budget = RateBudget(RateLimitItemPerSecond(LIMIT, WINDOW + 1), redis_url, config.budget_key)
    statuses: list[int] = []
    with FhirClient(config, budget=budget) as client:
        for _ in range(calls):
            statuses.append(client.send(client.http.build_request("GET", f"{config.fhir_base}/Patient/1")).status_code)
    out.put(statuses)


def test_four_processes_share_one_redis_budget_without_429(redis_url: str) -> None:
    with SandboxServer(patients=2, rate_limit_per_minute=LIMIT, rate_limit_window_seconds=WINDOW) as sb:
        conn = sb.credentials["proprietary"]
        config = ClientConfig(track="proprietary", fhir_base=conn["fhir_base"], firm="apiportal",
                              api_key=conn["api_key"], username=conn["username"], password=conn["password"],
                              max_retries=0)  # a 429 would surface, not be retried away
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(config, redis_url, 12, out)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        statuses = [s for r in results for s in r]
        assert len(statuses) == 48
        assert set(statuses) == {200}
        stats = sb.stats()
        assert stats.get("throttled", 0) == 0
        # 4 token calls + 48 reads went through one budget of 20 per 4 s: it took at least two windows
        assert stats["requests"] == 52
