"""
### ModMed: incremental patient sync (`_lastUpdated` window -> NDJSON)

Every night at 02:00 UTC this DAG extracts the Patients that changed during its **data interval**
(`[data_interval_start, data_interval_end)`: the 24 hours before 02:00) into one NDJSON file in object
storage, then a second task reads the file back and logs counts (never patient data).

* **The interval decides, not "now".** `ModMedSearchResourcesOperator(incremental=True)` takes the window from
  the run, so a re-run or a backfill of a past night writes exactly the same file. The schedule is a
  `CronDataIntervalTimetable`: in Airflow 3 a plain `"0 2 * * *"` or `"@daily"` gives runs no interval.
* **No record lost at the edges.** On the proprietary track ModMed filters `_lastUpdated` by whole days only;
  the operator asks for whole days and keeps exactly the resources updated inside the window. On the
  certified track the window is sent as is (`ge`/`lt`, millisecond precision). A patient changed in two
  intervals appears in both files (its latest version each time): load by `id` + `meta.versionId`. The
  ids are the track's own (the certified track has ids of its own): to merge files of both tracks, match
  patients by their MRN `identifier`, not by `id`.
* **Output**: `{output_base}/modmed_incremental_patient_sync/{{ data_interval_start | ds }}/Patient.ndjson`:
  one file per interval, named after its first day whether the run was scheduled, manual or a re-run (the
  logical date `{{ ds }}` is the interval's start only for scheduled runs). `output_base` is the run's
  `output_base` param, else the `[modmed] output_base` setting (`AIRFLOW__MODMED__OUTPUT_BASE`, e.g.
  `s3://aws_default@my-bucket/modmed`), else `file:///tmp/modmed`. On several workers use object storage
  so that the second task can read the file.

**Connection**: `modmed_default` (param `conn_id`): the proprietary track (password grant or client
credentials), or a certified-track connection (`modmed_certified`): Patient search is allowed on both.

**Against the sandbox**: `make demo` runs it; or start `modmed-sandbox serve --port 8899`, export the
connections printed by `modmed-sandbox credentials --json --port 8899` (`airflow_connections`) as
`AIRFLOW_CONN_MODMED_DEFAULT=...`, then `airflow dags test modmed_incremental_patient_sync 2026-03-02T02:00:00+00:00`
(a logical date picks the last full interval before it). Against ModMed: the same with your connection.

**Params**: `conn_id` (default `modmed_default`), `output_base` (default: see above).
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import CronDataIntervalTimetable, ObjectStoragePath, Param, dag, task

from airflow_provider_modmed.operators.resources import ModMedSearchResourcesOperator

DAG_ID = "modmed_incremental_patient_sync"
log = logging.getLogger(f"example_dags.{DAG_ID}")


def modmed_output_base(override: str | None = None) -> str:
    """The run's ``output_base`` param, else ``[modmed] output_base``, else ``file:///tmp/modmed``."""
    from airflow_provider_modmed.operators._common import output_base

    return output_base(override)


@dag(
    dag_id=DAG_ID,
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["modmed", "example"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    user_defined_macros={"modmed_output_base": modmed_output_base},
    params={
        "conn_id": Param("modmed_default", type="string", minLength=1,
                         description="The ModMed connection (one per practice and track)."),
        "output_base": Param(None, type=["null", "string"],
                             description="Where the NDJSON goes (file:///..., s3://conn_id@bucket/prefix). "
                                         "Empty: the [modmed] output_base setting, else file:///tmp/modmed."),
    },
)
def modmed_incremental_patient_sync() -> None:
    # the window comes from the data interval; a re-run overwrites the same file (safe to retry)
    patients = ModMedSearchResourcesOperator(
        task_id="extract_patients",
        modmed_conn_id="{{ params.conn_id }}",
        resource_type="Patient",
        incremental=True,
        # named after the interval's start: a manual run's logical date ({{ ds }}) is not its start
        output_path="{{ modmed_output_base(params.output_base) }}/" + DAG_ID
                    + "/{{ data_interval_start | ds }}/Patient.ndjson",
    )

    @task
    def summarize(result: dict[str, Any]) -> dict[str, Any]:
        """Read the NDJSON back and log counts only: new (version 1) and updated patients."""
        total = new = updated = 0
        ids: set[str] = set()
        with ObjectStoragePath(result["path"]).open("r", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                resource = json.loads(line)
                total += 1
                ids.add(str(resource.get("id")))
                if str((resource.get("meta") or {}).get("versionId", "")) == "1":
                    new += 1
                else:
                    updated += 1
        if total != result["count"] or len(ids) != total:
            raise ValueError(f"the file has {total} lines and {len(ids)} distinct ids; the search wrote "
                             f"{result['count']}")
        window = result.get("window") or {}
        log.info("Patients changed in [%s, %s): %d (%d new, %d updated; window mode %s)",
                 window.get("start"), window.get("end"), total, new, updated, window.get("mode"))
        return {"count": total, "new": new, "updated": updated, "path": result["path"], "window": window}

    summarize(patients.output)  # type: ignore[arg-type]


modmed_incremental_patient_sync()
