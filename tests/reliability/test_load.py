"""Load: many task processes at once against one practice and one API key share one Redis budget, and the
sandbox never answers 429; many practices at once each get a budget of their own.

Each worker is a separate process running ``ModMedSearchResourcesOperator.execute`` (as an Airflow worker
does), configured only by its connection: ``rate_limit_per_minute`` and ``rate_limit_storage_uri`` in the
extra. The sandbox's window is shortened to WINDOW seconds and the client's to WINDOW + 1 (as 61 s against
ModMed's 60 s in production), so ``rate_limit_per_minute`` counts per window here."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.reliability._figures import Figures
from tests.reliability.conftest import ndjson_ids
from tests.reliability.test_worker_killed import finish, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

LIMIT, WINDOW = 20, 3  # the sandbox allows 20 calls per 3 s per API key
PATIENTS, PAGE = 16, 2  # 8 pages, the empty page after them, and the token call: 10 calls per worker
CALLS_PER_WORKER = PATIENTS // PAGE + 2


def practice(seed: int) -> Iterator[SandboxServer]:
    with SandboxServer(patients=PATIENTS, seed=seed, rate_limit_per_minute=LIMIT,
                       rate_limit_window_seconds=WINDOW) as server:
        yield server


@pytest.fixture
def practice_a() -> Iterator[SandboxServer]:
    yield from practice(101)


@pytest.fixture
def practice_b() -> Iterator[SandboxServer]:
    yield from practice(202)


def connection_env(sb: SandboxServer, conn_id: str, redis_url: str) -> dict[str, str]:
    conn = json.loads(json.dumps(sb.credentials["airflow_connections"]["modmed_default"]))
    conn["extra"].update(rate_limit_per_minute=LIMIT, rate_limit_storage_uri=redis_url)
    return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn)}


def run_workers(jobs: list[tuple[str, Path]], env: dict[str, str]) -> tuple[list[dict[str, Any]], float]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        started = time.monotonic()
        procs = [start_worker({"operator": "search", "window_seconds": WINDOW + 1,
                               "kwargs": {"modmed_conn_id": conn_id, "resource_type": "Patient",
                                          "output_path": str(out), "count": PAGE}}) for conn_id, out in jobs]
        results = [finish(p, timeout=240) for p in procs]
        return results, time.monotonic() - started
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def truth(sb: SandboxServer) -> list[str]:
    return sorted(r["id"] for r in sb.app_state.store.ground_truth("Patient") if not r["deleted"])


def test_many_workers_one_api_key_share_one_budget_without_429(practice_a: SandboxServer, redis_url: str,
                                                               tmp_path: Path, figures: Figures) -> None:
    workers = 6
    jobs = [("modmed_load_a", tmp_path / f"w{i}.ndjson") for i in range(workers)]
    with figures.measure(practice_a) as m:
        results, elapsed = run_workers(jobs, connection_env(practice_a, "modmed_load_a", redis_url))
    for (_, out), result in zip(jobs, results, strict=True):
        assert sorted(ndjson_ids(out)) == truth(practice_a) and result["result"]["count"] == PATIENTS
    stats = practice_a.stats()
    calls = workers * CALLS_PER_WORKER
    assert stats.get("throttled", 0) == 0 and m.get("throttled", 0) == 0
    assert m["requests"] == calls
    # the budget made the workers wait: 60 calls at 20 per 4 s cannot finish in fewer than 2 refills
    waited = sum(r["log"].count("rate budget") for r in results)
    assert waited >= 1
    figures.record(workers=workers, calls=calls, throttled=0, budget=f"{LIMIT}/{WINDOW + 1}s (client)",
                   budget_waits_logged=waited, wall_seconds=round(elapsed, 1))


def test_many_practices_at_once_each_get_their_own_budget(practice_a: SandboxServer, practice_b: SandboxServer,
                                                          redis_url: str, tmp_path: Path, figures: Figures) -> None:
    import redis

    per_practice = 3
    jobs = [("modmed_load_a", tmp_path / f"a{i}.ndjson") for i in range(per_practice)] + \
           [("modmed_load_b", tmp_path / f"b{i}.ndjson") for i in range(per_practice)]
    env = {**connection_env(practice_a, "modmed_load_a", redis_url),
           **connection_env(practice_b, "modmed_load_b", redis_url)}
    assert practice_a.credentials["proprietary"]["api_key"] != practice_b.credentials["proprietary"]["api_key"]
    # the budget keys expire WINDOW + 1 s after their last hit: record every key seen while the workers run
    # (on a loaded machine one practice's workers can finish long before the other's)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            keys.update(client.keys("*modmed*"))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with figures.measure(practice_a, prefix="a_"), figures.measure(practice_b, prefix="b_"):
            results, elapsed = run_workers(jobs, env)
    finally:
        done.set()
        watcher.join()
    keys.update(client.keys("*modmed*"))
    for (conn_id, out), result in zip(jobs, results, strict=True):
        sb = practice_a if conn_id.endswith("_a") else practice_b
        assert sorted(ndjson_ids(out)) == truth(sb) and result["result"]["count"] == PATIENTS
    for sb in (practice_a, practice_b):
        assert sb.stats().get("throttled", 0) == 0
        assert sb.stats()["requests"] == per_practice * CALLS_PER_WORKER
    # two budgets in Redis, keyed by firm and a digest of each API key (never the key itself)
    for sb in (practice_a, practice_b):
        api_key = sb.credentials["proprietary"]["api_key"]
        assert not any(api_key in k for k in keys)
    from airflow_provider_modmed.client import ClientConfig

    budget_keys = {ClientConfig(track="proprietary", fhir_base=sb.credentials["proprietary"]["fhir_base"],
                                firm="apiportal", api_key=sb.credentials["proprietary"]["api_key"], username="u",
                                password="p").budget_key for sb in (practice_a, practice_b)}
    assert len(budget_keys) == 2 and all(any(b in k for k in keys) for b in budget_keys)
    figures.record(practices=2, workers=2 * per_practice, calls_per_practice=per_practice * CALLS_PER_WORKER,
                   throttled=0, wall_seconds=round(elapsed, 1), redis_budget_keys=len(budget_keys))
