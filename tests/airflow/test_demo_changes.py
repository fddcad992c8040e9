"""Issue 15, item 12: `make demo` gives its change DAGs changes to find (scripts/demo_changes.py), and they
find them: the appointment DAG's sensor in its settled window, the event-driven DAG through its asset
watcher in Airflow's real triggerer. Each on a SQLite metadata DB of its own, against the session sandbox."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from airflow_provider_modmed.client.instants import instant_ms
from airflow_provider_modmed.sandbox.server import SandboxServer
from scripts import demo_changes as changes
from tests.airflow.conftest import AIRFLOW_BIN

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(600)]

EXAMPLES = Path(__file__).resolve().parents[2] / "example_dags"


@pytest.fixture
def demo_env(tmp_path: Path, sb: SandboxServer) -> dict[str, str]:
    """The demo's Airflow environment: its own home and SQLite DB, the example DAGs, the sandbox's connections."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
    env.update({"AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLES),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__MODMED__OUTPUT_BASE": f"file://{tmp_path}/out"})
    for conn_id, conn in sb.credentials["airflow_connections"].items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    subprocess.run([AIRFLOW_BIN, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return env


def test_the_appointment_dag_finds_the_changes_the_demo_makes(sb: SandboxServer, demo_env: dict[str, str],
                                                              tmp_path: Path) -> None:
    logical, start, end = changes.appointment_run()
    assert end <= logical and end - start == timedelta(minutes=15)  # a past quarter hour, settled when run
    made = changes.change_appointments(sb, start + (end - start) / 2)
    assert len(made) == 2 and sorted(int(v) > 1 for v in made.values()) == [False, True]  # a create, an update
    stamped = [instant_ms(r["lastUpdated"]) for r in sb.app_state.store.ground_truth("Appointment") if r["id"] in made]
    assert len(stamped) == 2
    assert all(start.timestamp() * 1000 <= at < end.timestamp() * 1000 for at in stamped)  # inside the window

    run = subprocess.run([AIRFLOW_BIN, "dags", "test", changes.APPOINTMENT_DAG, logical.isoformat()], env=demo_env,
                         capture_output=True, text=True, timeout=420, check=False)
    assert run.returncode == 0 and "state=success" in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]

    found = changes.appointment_found(Path(demo_env["AIRFLOW_HOME"]) / "airflow.db", made)
    assert found.ok, found.line()
    assert {rid: found.found[rid] for rid in made} == made
    assert f"in [{start.strftime('%Y-%m-%dT%H:%M')}" in found.detail and "inserted" in found.detail
    assert "Demo" not in found.line() and "rescheduled" not in found.line()  # ids and versions, no data


def test_the_event_driven_dag_finds_the_patients_the_demo_changes(sb: SandboxServer, demo_env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    found = changes.run_event_driven(AIRFLOW_BIN, demo_env, sb, tmp_path, timeout=240)

    assert found.ok, f"{found.line()}\n" + "\n".join(
        p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("airflow-*.log"))
    assert len(found.made) == 2 and sorted(int(v) > 1 for v in found.made.values()) == [False, True]  # new, updated
    assert {rid: found.found[rid] for rid in found.made} == found.made
    assert "run success" in found.detail and "synced 2 patient(s)" in found.detail
