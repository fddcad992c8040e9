"""The event-driven example DAG runs when a patient is created: Airflow's real triggerer runs the asset
watcher (ModMedChangesEventTrigger), the scheduler turns its event into a DAG run, the LocalExecutor runs
the task through the api-server. Everything on a SQLite metadata DB of its own, against the session
sandbox over HTTP. About a minute; every wait is bounded and fails with the components' log tails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import AIRFLOW_BIN

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(420)]

EXAMPLE = Path(__file__).resolve().parents[2] / "example_dags" / "modmed_event_driven.py"
DAG_ID = "modmed_event_driven"


class Stack:
    """Airflow components as subprocesses, each in its own process group (stopped by group id)."""

    def __init__(self, home: Path, env: dict[str, str], api_port: int) -> None:
        self.home = home
        self.env = env
        self.api_port = api_port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def run(self, *args: str, timeout: float = 180) -> None:
        result = subprocess.run([AIRFLOW_BIN, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        assert result.returncode == 0, (f"airflow {' '.join(args)} failed:\n{result.stdout[-3000:]}\n"
                                        f"{result.stderr[-3000:]}")

    def start(self, name: str, *args: str) -> None:
        log = open(self.home / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([AIRFLOW_BIN, *args], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def logs(self) -> str:
        parts = []
        for name in self.procs:
            text = (self.home / f"{name}.log").read_text(errors="replace")
            parts.append(f"--- {name} (last lines) ---\n" + "\n".join(text.splitlines()[-25:]))
        return "\n".join(parts)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"airflow {name} exited with {proc.returncode}\n{self.logs()}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, condition: Callable[[], Any], timeout: float, stack: Stack) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{stack.logs()}")


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
