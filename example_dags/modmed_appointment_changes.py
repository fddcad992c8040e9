"""
### ModMed: appointment changes -> warehouse (change-detection sensor, deferrable)

Every 15 minutes a run syncs the Appointments that changed during its **data interval** (the last full
quarter hour) into a warehouse table:

1. `wait_for_changed_appointments`: `ModMedChangesSensor` waits (deferred: the triggerer polls, no worker
   slot is held) until the interval has **settled** (its end plus `lookback`, which covers server clock
   skew and commit latency), polls `Appointment` changes once and writes the changed appointments as NDJSON
   to object storage. XCom only carries the reference: ids, versions, count, the file's path, the window
   and what the poll cost in calls. An interval without changes skips the rest of the run.
2. `fetch_changed_appointments` reads that file and stages the columns the warehouse needs.
3. `write_to_warehouse` upserts them by `id`, keeping the newest `meta.versionId` (a SQLite table here).

**Idempotent and backfillable**: the interval decides, not "now": a re-run or a backfill of an interval
finds the same change set and leaves the table unchanged. On the proprietary track `_lastUpdated` is
day-granular: the sensor asks for whole days and keeps exactly the resources updated inside the interval
(see docs/change-detection.md for the strategy and its cost in calls). The schedule is a
`CronDataIntervalTimetable`: in Airflow 3 a plain cron string gives runs no interval.

**Connection**: `modmed_default` (a proprietary-track connection: Appointment is proprietary only).

**Against the sandbox**: `make demo` runs it; or start `modmed-sandbox serve --port 8899`, export the
connections printed by `modmed-sandbox credentials --json --port 8899` (`airflow_connections`) as
`AIRFLOW_CONN_MODMED_DEFAULT=...`, then `airflow dags test modmed_appointment_changes` (a logical date picks
the last full interval before it). Needs a triggerer when scheduled (`airflow triggerer`); `dags test`
runs the trigger inline.

**Params**: `output_base` (change sets and staging files; default the `[modmed] output_base` setting, else
`file:///tmp/modmed`; use `s3://...` with several workers) and `warehouse` (the SQLite file).
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

from airflow_provider_modmed.sensors.changes import ModMedChangesSensor

DAG_ID = "modmed_appointment_changes"


def modmed_output_base(override: str | None = None) -> str:
    """The run's ``output_base`` param, else ``[modmed] output_base``, else ``file:///tmp/modmed``."""
    from airflow_provider_modmed.operators._common import output_base

    return output_base(override)


@dag(
    dag_id=DAG_ID,
    schedule=CronDataIntervalTimetable("*/15 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["modmed", "example", "change-detection"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    user_defined_macros={"modmed_output_base": modmed_output_base},
    params={
        "output_base": Param(None, type=["null", "string"],
                             description="Where change sets and staging files go (file:///..., "
                                         "s3://conn_id@bucket/prefix). Empty: [modmed] output_base."),
        "warehouse": Param(f"{tempfile.gettempdir()}/modmed/{DAG_ID}/warehouse.sqlite3", type="string",
                           description="The SQLite file standing in for the warehouse."),
    },
)
def modmed_appointment_changes() -> None:
    changed = ModMedChangesSensor(
        task_id="wait_for_changed_appointments",
        resource_type="Appointment",
        modmed_conn_id="modmed_default",
        # one file per interval: a re-run overwrites it
        output_path="{{ modmed_output_base(params.output_base) }}/" + DAG_ID + "/change-sets/",
        deferrable=True,        # no worker slot is held while waiting
        lookback=120,           # seconds: server clock skew and commit latency the window waits out
        poke_interval=60,       # the triggerer's poll cadence
        timeout=3600,
    )

    @task
    def fetch_changed_appointments(change_set: dict[str, Any], params: Any = None) -> dict[str, Any]:
        """Read the change set from storage; stage the warehouse columns (no patient data in XCom)."""
        from airflow.sdk import ObjectStoragePath

        rows = []
        for line in ObjectStoragePath(change_set["path"]).read_text().splitlines():
            appointment = json.loads(line)
            patient = next((p["actor"]["reference"] for p in appointment.get("participant", [])
                            if str(p.get("actor", {}).get("reference", "")).startswith("Patient/")), None)
            rows.append({"id": appointment["id"], "version": int(appointment["meta"]["versionId"]),
                         "last_updated": appointment["meta"]["lastUpdated"], "status": appointment.get("status"),
                         "start": appointment.get("start"), "end": appointment.get("end"), "patient": patient})
        # named after the change set (one per interval): a re-run overwrites it
        name = change_set["path"].rsplit("/", 1)[-1]
        staged = ObjectStoragePath(f"{modmed_output_base(params['output_base'])}/{DAG_ID}/staging/{name}")
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"path": str(staged), "count": len(rows), "window": change_set["window"]}

    @task
    def write_to_warehouse(staged: dict[str, Any], params: Any = None) -> dict[str, int]:
        """Upsert by id, newest version wins: re-running an interval changes nothing."""
        import sqlite3
        from pathlib import Path

        from airflow.sdk import ObjectStoragePath

        Path(params["warehouse"]).parent.mkdir(parents=True, exist_ok=True)
        counts = {"inserted": 0, "updated": 0, "unchanged": 0}
        with sqlite3.connect(params["warehouse"]) as db:
            db.execute("CREATE TABLE IF NOT EXISTS appointments (id TEXT PRIMARY KEY, version INTEGER, "
                       "last_updated TEXT, status TEXT, start TEXT, end TEXT, patient TEXT)")
            for line in ObjectStoragePath(staged["path"]).read_text().splitlines():
                row = json.loads(line)
                current = db.execute("SELECT version FROM appointments WHERE id = ?", (row["id"],)).fetchone()
                if current is not None and current[0] >= row["version"]:
                    counts["unchanged"] += 1
                    continue
                db.execute("INSERT OR REPLACE INTO appointments VALUES (:id, :version, :last_updated, :status, "
                           ":start, :end, :patient)", row)
                counts["inserted" if current is None else "updated"] += 1
        return counts

    write_to_warehouse(fetch_changed_appointments(changed.output))


modmed_appointment_changes()
