"""The scale scenario (scripts/scale.py) at a reduced size, on the production-shaped stack: CeleryExecutor
with two workers, Postgres, Redis, moto S3, the sandbox serving 4 practices.

The watchers of 4 practices x 3 types run in the triggerer and every change lands in S3; the
many-practices DAG and the write-back DAG (once per practice) run on the Celery workers while one worker
is killed with SIGKILL; then, against the sandbox's ground truth: each practice's Appointments in S3
exactly once, each write-back row on ModMed exactly once, and per API key never more calls in a 60 s
window than the budget and no 429. The full size (20 practices at ModMed's budget) is
``bench/bench_stack.py`` (``make bench``), which prints the same findings as figures."""

from __future__ import annotations

import json
from typing import Any

import pytest

from scripts.scale import ScaleSize, run_scale
from scripts.stack import StackConfig

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(900)]

#: small enough for CI, tight enough that the shared budget matters: 4 practices, 90 calls a minute per key
SIZE = StackConfig(practices=4, rate_limit_per_minute=90, watch_poll_interval=10, heartbeat_timeout=20)


@pytest.fixture(scope="module")
def findings(stack_parts: None) -> dict[str, Any]:
    return run_scale(SIZE, ScaleSize(timeout=600), report=print)


def test_every_watcher_change_reaches_s3(findings: dict[str, Any]) -> None:
    watchers = findings["watchers"]
    assert watchers["triggers"] == watchers["streams"] == SIZE.practices * 3
    assert watchers["changed"] == SIZE.practices * 3
    assert watchers["missing"] == {}
    assert watchers["recorded"] >= watchers["changed"]


def test_the_kill_hit_running_tasks_and_they_were_retried(findings: dict[str, Any]) -> None:
    kill = findings["kill"]
    assert kill["killed"] == "worker1"
    assert kill["running_at_kill"] > 4  # more than one worker holds: worker1 was running some of them
    assert kill["retried_task_instances"] >= 1, json.dumps(findings, indent=1)


def test_every_practice_appointments_in_s3_exactly_once(findings: dict[str, Any]) -> None:
    many = findings["many_practices"]
    assert many["state"] == "success", json.dumps(many, indent=1)
    per = many["per_practice"]
    assert len(per) == SIZE.practices
    assert all(p["expected"] > 0 for p in per.values()), per  # each practice has appointments in the window
    assert sorted(many["exact"]) == sorted(per), per  # one file, every id, no duplicate, nothing else


def test_write_back_rows_exactly_once_after_the_kill(findings: dict[str, Any]) -> None:
    write_back = findings["write_back"]
    assert write_back["states"] == {"success": SIZE.practices}, json.dumps(write_back, indent=1)
    assert write_back["duplicated"] == 0
    assert write_back["incomplete"] == []
    assert write_back["created"] == SIZE.practices * write_back["rows_per_practice"]


def test_budget_held_per_key_across_workers_and_triggerer(findings: dict[str, Any]) -> None:
    budget = findings["budget"]
    assert len(budget["per_firm"]) == SIZE.practices
    assert budget["throttled"] == 0, budget
    assert 0 < budget["max_peak_window"] <= SIZE.rate_limit_per_minute, budget
    assert all(f["calls"] > 0 and f["throttled"] == 0 for f in budget["per_firm"].values()), budget
