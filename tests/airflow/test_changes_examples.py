"""The appointment-changes example DAG for real (dag.test()): a past quarter hour's changed appointments land
in the warehouse table exactly once; a re-run of the interval changes nothing."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client.instants import instant_ms
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

EXAMPLE = Path(__file__).resolve().parents[2] / "example_dags" / "modmed_appointment_changes.py"
DAG_ID = "modmed_appointment_changes"


def returns(run: Any) -> dict[str, Any]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id, TaskInstance.dag_id == DAG_ID)
        return {ti.task_id: (ti.state, ti.xcom_pull(task_ids=ti.task_id, session=session)) for ti in tis}


def test_appointment_example_syncs_its_interval_once(sb: SandboxServer, run_dag: Any, tmp_path: Path) -> None:
    now = datetime.now(timezone.utc) - timedelta(minutes=5)  # an interval that settled (lookback 120 s)
    end = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    start = end - timedelta(minutes=15)
    # changes stamped inside the interval: the sandbox's server clock set back for a moment
    target = int((start + timedelta(minutes=7)).timestamp() * 1000)
    sb.faults(clock_offset_ms=target - int(time.time() * 1000))
    store = sb.app_state.store
    ids = [store.create({"resourceType": "Appointment", "status": "booked", "start": "2026-06-01T09:00:00Z",
                         "participant": [{"actor": {"reference": "Patient/1"}, "status": "accepted"}]}).id
           for _ in range(3)]
    row = store.get("Appointment", ids[0])
    assert row is not None
    store.update({**row.body, "status": "arrived"})
    sb.reset_faults()
    truth = {r["id"]: int(r["versionId"]) for r in store.ground_truth("Appointment")
             if int(start.timestamp() * 1000) <= instant_ms(r["lastUpdated"]) < int(end.timestamp() * 1000)}
    assert set(ids) <= set(truth) and truth[ids[0]] == 2
    conf = {"output_base": f"file://{tmp_path}/out", "warehouse": str(tmp_path / "warehouse.sqlite3")}

    run = run_dag(EXAMPLE, DAG_ID, logical_date=end, run_conf=conf)

    assert (run.data_interval_start, run.data_interval_end) == (start, end)
    out = returns(run)
    assert {t: s for t, (s, _) in out.items()} == {"wait_for_changed_appointments": "success",
                                                    "fetch_changed_appointments": "success",
                                                    "write_to_warehouse": "success"}
    reference = out["wait_for_changed_appointments"][1]
    assert reference["count"] == len(truth) and reference["window"]["end"].startswith(end.strftime("%Y-%m-%dT%H:%M"))
    assert out["write_to_warehouse"][1] == {"inserted": len(truth), "updated": 0, "unchanged": 0}
    with sqlite3.connect(conf["warehouse"]) as db:
        rows = dict(db.execute("SELECT id, version FROM appointments").fetchall())
        statuses = dict(db.execute("SELECT id, status FROM appointments").fetchall())
    assert rows == truth and statuses[ids[0]] == "arrived"

    again = run_dag(EXAMPLE, DAG_ID, logical_date=end, run_conf=conf)  # a re-run of the same interval
    assert returns(again)["write_to_warehouse"][1] == {"inserted": 0, "updated": 0, "unchanged": len(truth)}
