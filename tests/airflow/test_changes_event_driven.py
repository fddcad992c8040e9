"""The event-driven example DAG runs when a patient is created: Airflow's real triggerer runs the asset
watcher (ModMedChangesEventTrigger), the scheduler turns its event into a DAG run, the LocalExecutor runs
the task through the api-server. Everything on a SQLite metadata DB of its own, against the session
sandbox over HTTP. About a minute; every wait is bounded and fails with the components' log tails."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer
from scripts.processes import ProcessError, ProcessGroups, free_port, run_checked
from tests.airflow.conftest import AIRFLOW_BIN

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(420)]

EXAMPLE = Path(__file__).resolve().parents[2] / "example_dags" / "modmed_event_driven.py"
DAG_ID = "modmed_event_driven"


class Stack:
    """Airflow components as subprocesses, each in its own process group (scripts/processes.py); a death or
    a timeout fails the test with the components' log tails."""

    def __init__(self, home: Path, env: dict[str, str], api_port: int) -> None:
        self.home = home
        self.env = env
        self.api_port = api_port
        self.procs = ProcessGroups(home)

    def run(self, *args: str, timeout: float = 180) -> None:
        run_checked([AIRFLOW_BIN, *args], self.env, timeout, f"airflow {' '.join(args)}")

    def start(self, name: str, *args: str) -> None:
        self.procs.start(name, [AIRFLOW_BIN, *args], env=self.env)

    def logs(self) -> str:
        return self.procs.tails()

    def stop(self) -> None:
        self.procs.stop(grace=20)


def wait_for(what: str, condition: Callable[[], Any], timeout: float, stack: Stack) -> Any:
    try:
        return stack.procs.wait_for(what, condition, timeout)
    except ProcessError as exc:
        pytest.fail(str(exc))


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # locked or not created yet: ask again later
        return []


@pytest.fixture
def stack(tmp_path: Path, sb: SandboxServer) -> Iterator[Stack]:
    home = tmp_path / "airflow"
    dags = tmp_path / "dags"
    dags.mkdir(parents=True)
    home.mkdir()
    shutil.copy(EXAMPLE, dags / EXAMPLE.name)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",  # watchers only run for unpaused DAGs
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW_CONN_MODMED_DEFAULT": json.dumps(sb.credentials["airflow_connections"]["modmed_default"]),
        "MODMED_WATCH_POLL_INTERVAL": "1",
        "AIRFLOW__MODMED__OUTPUT_BASE": f"file://{tmp_path}/out",
    })
    s = Stack(home, env, port)
    s.run("db", "migrate")
    s.run("dags", "reserialize")  # parses the DAG: its asset and the watcher's trigger land in the DB
    try:
        yield s
    finally:
        s.stop()


def test_example_dag_runs_when_a_patient_is_created(sb: SandboxServer, stack: Stack, tmp_path: Path) -> None:
    db = stack.home / "airflow.db"
    assert query(db, "SELECT is_paused FROM dag WHERE dag_id = ?", DAG_ID) == [(0,)]
    assert query(db, "SELECT classpath FROM trigger") == [
        ("airflow_provider_modmed.triggers.changes.ModMedChangesEventTrigger",)]

    searches = sb.stats().get("requests:proprietary", 0)
    stack.start("triggerer", "triggerer", "--skip-serve-logs")
    stack.start("scheduler", "scheduler", "--skip-serve-logs")
    stack.start("api-server", "api-server", "--port", str(stack.api_port))
    # the watcher's baseline poll and one more: it is running and has seen what existed before
    wait_for("the triggerer's watcher to poll the sandbox",
             lambda: sb.stats().get("requests:proprietary", 0) >= searches + 2, 150, stack)
    assert query(db, "SELECT COUNT(*) FROM dag_run WHERE dag_id = ?", DAG_ID) == [(0,)]  # nothing yet

    patient = sb.app_state.store.create({"resourceType": "Patient", "name": [{"family": "EventDriven"}]}).id

    state = wait_for("the asset-triggered DAG run to finish",
                     lambda: next((s for (s,) in query(db, "SELECT state FROM dag_run WHERE dag_id = ?", DAG_ID)
                                   if s in ("success", "failed")), None), 150, stack)
    assert state == "success", stack.logs()

    runs = query(db, "SELECT run_type, run_id FROM dag_run WHERE dag_id = ?", DAG_ID)
    assert len(runs) == 1 and runs[0][0] == "asset_triggered"
    (extra,), = query(db, "SELECT extra FROM asset_event")
    payload = json.loads(extra)["payload"]
    assert json.loads(extra)["from_trigger"] is True
    assert payload["count"] == 1
    assert (payload["changes"][0]["id"], payload["changes"][0]["versionId"]) == (patient, "1")
    (value,), = query(db, "SELECT value FROM xcom WHERE dag_id = ? AND task_id = 'sync_changed_patients' "
                          "AND key = 'return_value'", DAG_ID)
    result = json.loads(value)
    assert result["ids"] == [patient] and result["count"] == 1
    written = [json.loads(line) for line in Path(result["path"].removeprefix("file://")).read_text().splitlines()]
    assert [(r["resourceType"], r["id"]) for r in written] == [("Patient", patient)]
