"""The scale scenario on the production-shaped stack (``scripts/stack.py``): what a vendor with many
practices runs, with a Celery worker killed in the middle.

On a fresh :class:`ProductionStack` (Postgres, Redis, CeleryExecutor with two workers, moto S3, the sandbox
serving ``practices`` practices with a per-key budget of ``rate_limit_per_minute``):

1. the watchers: one DAG per practice (``example_dags/modmed_practice_watchers.py``), 3 resource types
   each, so ``practices x 3`` asset watchers in the triggerer; once they poll, one Patient, Appointment and
   AllergyIntolerance per practice change in the sandbox, and each practice's DAG must record them in S3;
2. at once: the many-practices DAG over every practice (NDJSON per practice to S3) and the write-back DAG
   once per practice; when both workers run tasks, ``worker1`` is killed with SIGKILL (its whole process
   group: worker, pool and task processes). The scheduler finds its tasks without heartbeat and retries
   them on ``worker2``;
3. the findings against the sandbox's ground truth: every practice's Appointments in S3 exactly once;
   every write-back row on ModMed exactly once (never duplicated by the retry); every watcher change
   recorded; per API key, the calls, the 429s and the most calls in any 60 s window, across the workers
   and the triggerer (all draw from one Redis budget per key).

:func:`run_scale` returns the findings (a dict): ``tests/stack/test_scale.py`` asserts them at a reduced
size, ``bench/bench_stack.py`` prints them at the full size. No timing is asserted anywhere.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from airflow_provider_modmed.client.instants import parse_bound_ms
from airflow_provider_modmed.sandbox.store import Store
from scripts.processes import ProcessError
from scripts.stack import BUCKET, ROOT, WATCH_TYPES, ProductionStack, StackConfig

WRITE_BACK_FILE = ROOT / "example_dags" / "data" / "write_back.csv"
WRITE_BACK_SYSTEM = "urn:airflow-provider-modmed:write-back"
FINISHED = ("success", "failed")
T = TypeVar("T")


@dataclass
class ScaleSize:
    """The scenario's own settings; how big the stack is (practices, budget, cadence) is its
    :class:`~scripts.stack.StackConfig`."""

    kill_worker: bool = True
    #: added to every sandbox answer while the DAGs run, so the kill lands inside tasks' ModMed calls
    latency_ms: float = 150.0
    timeout: float = 900.0


def bodies(store: Store, resource_type: str) -> list[dict[str, Any]]:
    """The sandbox's current resources of a type (its ground truth, deleted ones left out)."""
    return [json.loads(body) for body in store.iter_bodies(resource_type)]


class Scenario:
    """One run of the scenario on a started stack."""

    def __init__(self, stack: ProductionStack, size: ScaleSize, report: Callable[[str], None]) -> None:
        self.stack = stack
        self.size = size
        self.report = report
        assert stack.sandbox is not None
        self.sandbox = stack.sandbox
        self.firms = stack.practices  # proprietary connection id -> firm
        self.practices = list(self.firms)
        self.budget_per_minute = stack.config.rate_limit_per_minute
        self.deadline = time.monotonic() + size.timeout
        self._token: str | None = None

    # -- Airflow's REST API ----------------------------------------------------------------------
    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        if self._token is None:
            self._token = httpx.get(f"{self.stack.api_url}/auth/token", timeout=30).json()["access_token"]
        response = httpx.request(method, f"{self.stack.api_url}/api/v2{path}", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {self._token}"})
        if response.status_code >= 400:
            raise ProcessError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, run_id: str, when: datetime, conf: dict[str, Any]) -> str:
        self.api("POST", f"/dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": when.isoformat(),
                                                     "conf": conf})
        return run_id

    def wait(self, what: str, condition: Callable[[], T | None], poll: float = 1.0) -> T:
        """``condition()``'s first truthy value, within what is left of the scenario's timeout."""
        return self.stack.procs.wait_for(what, condition, max(0.0, self.deadline - time.monotonic()), poll)

    def finished(self, dag_id: str, run_ids: list[str]) -> dict[str, str] | None:
        """The runs' states once every one of them has finished, else None."""
        rows = self.stack.sql("SELECT run_id, state FROM dag_run WHERE dag_id = %s AND run_id = ANY(%s)",
                              dag_id, run_ids)
        states = {run_id: state for run_id, state in rows}
        return states if len(states) == len(run_ids) and all(s in FINISHED for s in states.values()) else None

    # -- the scenario ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        watcher_dags = [f"modmed_watch_{conn_id}" for conn_id in self.practices]
        wanted = {*watcher_dags, "modmed_many_practices", "modmed_write_back"}
        self.wait("the dag-processor to parse the DAGs", lambda: wanted <= {
            d for (d,) in self.stack.sql("SELECT dag_id FROM dag WHERE NOT is_stale")})
        for dag_id in watcher_dags:
            self.unpause(dag_id)
        watchers = self.wait_for_watchers()
        changed = self.change_one_of_each()

        self.unpause("modmed_many_practices")
        self.unpause("modmed_write_back")
        now = datetime.now(UTC)
        day = now.date().isoformat()
        many_run = self.trigger("modmed_many_practices", f"scale_{int(time.time())}", now, {
            "practices": self.practices, "days_ahead": 14,
            "output_base": f"s3://aws_default@{BUCKET}/scale"})
        write_runs = {conn_id: self.trigger("modmed_write_back", f"scale_wb_{conn_id}",  # one logical date each
                                            now + timedelta(milliseconds=i), {"conn_id": conn_id})
                      for i, conn_id in enumerate(self.practices)}
        batch_started = time.monotonic()
        before = self.sandbox.app_state.budget_figures()
        self.sandbox.faults(latency_ms=self.size.latency_ms)  # every ModMed call is slower: the kill lands mid-task
        kill: dict[str, Any] = self.kill_worker_mid_run() if self.size.kill_worker else {"killed": None}
        many_state = self.wait("the many-practices run to finish",
                               lambda: self.finished("modmed_many_practices", [many_run]), poll=2)[many_run]
        many_wall = time.monotonic() - batch_started
        write_states = self.wait("the write-back runs to finish",
                                 lambda: self.finished("modmed_write_back", list(write_runs.values())), poll=2)
        batch_wall = time.monotonic() - batch_started
        after = self.sandbox.app_state.budget_figures()
        batch_calls = max(after[f]["calls"] - before[f]["calls"] for f in after)
        recorded = self.wait_for_recorded_changes(changed)
        retried = self.stack.sql("SELECT dag_id, task_id, map_index, try_number FROM task_instance "
                                 "WHERE try_number > 1 AND dag_id IN ('modmed_many_practices', 'modmed_write_back')")
        kill["retried_task_instances"] = len(retried)
        return {
            "size": {**asdict(self.size), "stack": asdict(self.stack.config)},
            "watchers": {**watchers, "changed": sum(len(v) for v in changed.values()),
                         "recorded": sum(len(v) for v in recorded.values()),
                         "missing": {c: sorted(set(changed[c]) - set(recorded.get(c, {})))
                                     for c in changed if set(changed[c]) - set(recorded.get(c, {}))}},
            "many_practices": {"state": many_state, "wall_s": round(many_wall, 1),
                               **self.check_many_practices(many_run, day)},
            "write_back": {"states": dict(Counter(write_states.values())), **self.check_write_back()},
            "batch": {"wall_s": round(batch_wall, 1), "most_calls_per_key": batch_calls,
                      # the least time the budget allows for those calls (the first window's worth is free)
                      "budget_floor_s": round(max(0, batch_calls - self.budget_per_minute)
                                              / self.budget_per_minute * 60, 1)},
            "kill": kill,
            "budget": self.budget(),
            "wall_s": round(time.monotonic() - started, 1),
        }

    def wait_for_watchers(self) -> dict[str, Any]:
        """Every watcher has polled twice (its baseline and one more): counted at the sandbox per key."""
        expected = len(self.practices) * len(WATCH_TYPES)
        triggers = self.wait(f"{expected} watcher triggers", lambda: (
            (n := self.stack.sql("SELECT COUNT(*) FROM trigger")[0][0]) >= expected and n))
        start = self.sandbox.app_state.budget_figures()
        self.wait("every practice's watchers to poll twice", lambda: all(
            self.sandbox.app_state.budget_figures()[firm]["calls"] - start[firm]["calls"] >= 2 * len(WATCH_TYPES)
            for firm in self.firms.values()), poll=2)
        return {"triggers": triggers, "streams": expected}

    def change_one_of_each(self) -> dict[str, dict[str, str]]:
        """Create a Patient, an Appointment and an AllergyIntolerance in every practice: (type/id -> version)."""
        changed: dict[str, dict[str, str]] = {}
        for conn_id, firm in self.firms.items():
            practice = self.sandbox.app_state.practice(firm)
            assert practice is not None, firm
            store = practice.store
            patient = store.create({"resourceType": "Patient", "name": [{"family": "Scale", "given": [firm]}]})
            start = (datetime.now(UTC).date() + timedelta(days=3)).isoformat()
            appointment = store.create({"resourceType": "Appointment", "status": "booked",
                                        "start": f"{start}T15:00:00Z", "end": f"{start}T15:30:00Z",
                                        "participant": [{"actor": {"reference": f"Patient/{patient.id}"},
                                                         "status": "accepted"}]})
            allergy = store.create({"resourceType": "AllergyIntolerance", "code": {"text": "Scale test"},
                                    "patient": {"reference": f"Patient/{patient.id}"}})
            changed[conn_id] = {f"Patient/{patient.id}": "1", f"Appointment/{appointment.id}": "1",
                                f"AllergyIntolerance/{allergy.id}": "1"}
        return changed

    def wait_for_recorded_changes(self, changed: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        """What the watcher DAGs wrote to S3, per practice (type/id -> version), once all is there or at timeout."""
        def recorded() -> dict[str, dict[str, str]]:
            out: dict[str, dict[str, str]] = {}
            for key in self.stack.s3_keys("out/modmed_practice_watchers/"):
                conn_id = key.split("/")[2]
                for resource_type, ids in json.loads(self.stack.s3_text(key)).items():
                    for rid, version in ids.items():
                        out.setdefault(conn_id, {})[f"{resource_type}/{rid}"] = version
            return out

        def all_recorded() -> bool:
            found = recorded()
            return all(set(changed[c]) <= set(found.get(c, {})) for c in changed)

        with contextlib.suppress(ProcessError):  # what is missing at the timeout is reported
            self.wait("every change recorded by the watcher DAGs", all_recorded, poll=3)
        return recorded()

    def kill_worker_mid_run(self) -> dict[str, Any]:
        """SIGKILL worker1 once more task instances run than one worker holds (so both workers run some)."""
        per_worker = self.stack.config.worker_concurrency

        def running() -> int:
            return int(self.stack.sql("SELECT COUNT(*) FROM task_instance WHERE state = 'running' AND dag_id IN "
                                      "('modmed_many_practices', 'modmed_write_back')")[0][0])

        at_kill = self.wait(f"more than {per_worker} running task instances", lambda: (
            (n := running()) > per_worker and n), poll=0.3)
        self.stack.procs.kill("worker1")
        self.report(f"killed worker1 (SIGKILL) with {at_kill} task instances running")
        return {"killed": "worker1", "running_at_kill": at_kill}

    # -- findings against the sandbox's ground truth ------------------------------------------------
    def check_many_practices(self, run_id: str, day: str) -> dict[str, Any]:
        """Per practice: the Appointment ids in S3 against the sandbox's Appointments in [day, day + 14)."""
        low = parse_bound_ms(day)
        high = parse_bound_ms((date.fromisoformat(day) + timedelta(days=14)).isoformat())
        written = self.stack.s3_keys("scale/modmed_many_practices/")
        per: dict[str, dict[str, int]] = {}
        for conn_id, firm in self.firms.items():
            practice = self.sandbox.app_state.practice(firm)
            assert practice is not None
            truth = {r["id"] for r in bodies(practice.store, "Appointment")
                     if low <= parse_bound_ms(str(r.get("start", ""))) < high}
            keys = [k for k in written if f"/{conn_id}/" in k]
            ids = [json.loads(line)["id"] for k in keys for line in self.stack.s3_text(k).splitlines() if line]
            per[conn_id] = {"expected": len(truth), "written": len(ids), "files": len(keys),
                            "duplicates": len(ids) - len(set(ids)), "missing": len(truth - set(ids)),
                            "unexpected": len(set(ids) - truth)}
        return {"practices": len(per), "appointments": sum(p["expected"] for p in per.values()),
                "exact": sorted(c for c, p in per.items() if p["expected"] == p["written"] and not p["missing"]
                                and not p["unexpected"] and p["files"] == 1),
                "per_practice": per}

    def check_write_back(self) -> dict[str, Any]:
        """Per practice: each row key of the write-back file on the sandbox exactly once."""
        with open(WRITE_BACK_FILE, newline="") as f:
            rows = sum(1 for _ in csv.DictReader(f))
        per: dict[str, dict[str, int]] = {}
        for conn_id, firm in self.firms.items():
            practice = self.sandbox.app_state.practice(firm)
            assert practice is not None
            keys = Counter(
                ident["value"] for resource_type in ("AllergyIntolerance", "Condition")
                for r in bodies(practice.store, resource_type)
                for ident in r.get("identifier", []) if ident.get("system") == WRITE_BACK_SYSTEM)
            per[conn_id] = {"rows": rows, "keys": len(keys), "duplicated": sum(n - 1 for n in keys.values())}
        return {"rows_per_practice": rows, "created": sum(p["keys"] for p in per.values()),
                "duplicated": sum(p["duplicated"] for p in per.values()),
                "incomplete": sorted(c for c, p in per.items() if p["keys"] != rows), "per_practice": per}

    def budget(self) -> dict[str, Any]:
        figures = self.sandbox.app_state.budget_figures()
        return {"limit_per_minute": self.budget_per_minute,
                "max_peak_window": max(f["peak_window"] for f in figures.values()),
                "throttled": sum(f["throttled"] for f in figures.values()),
                "calls": sum(f["calls"] for f in figures.values()), "per_firm": figures}


def run_scale(config: StackConfig, size: ScaleSize | None = None, report: Callable[[str], None] = lambda line: None,
              home: Path | None = None) -> dict[str, Any]:
    """Start a stack of ``config`` (two workers, the scenario's three watched types), run the scenario,
    stop the stack; the findings (see the module doc)."""
    config = replace(config, workers=2, watch_types=",".join(WATCH_TYPES))
    started = time.monotonic()
    with ProductionStack(config, home=home) as stack:
        report(f"stack up in {time.monotonic() - started:.0f}s: {config.practices} practices, "
               f"{stack.api_url}")
        findings = Scenario(stack, size or ScaleSize(), report).run()
    findings["stack_s"] = round(time.monotonic() - started, 1)
    return findings
