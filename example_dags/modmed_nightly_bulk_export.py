"""
### ModMed: nightly Bulk Data export (certified API `$export` -> NDJSON in object storage)

Every night at 02:00 UTC this DAG exports what changed since the last export it loaded, with FHIR Bulk Data
`$export` on ModMed's certified (ONC) API, into a run folder in object storage; then it loads the files
(here: a stand-in that counts lines, never logging patient data) and only then moves its watermark.

* **`_since` is the previous manifest's `transactionTime`, kept in a state file**:
  `{output_base}/modmed_nightly_bulk_export/_watermark.json`. Not the data interval: the Bulk Data IG says
  the next `_since` is the prior `transactionTime`, exactly as the server wrote it (the server's clock
  defines what an export contained), never a local or finish time. The first run (no watermark) exports
  everything. To derive `_since` from the schedule instead, drop the watermark tasks and pass
  `incremental=True` to the operator (`_since` = data interval start; simpler, but trusts both clocks).
* **The watermark moves only after the load succeeded**, so a failed load is exported again next time
  (overlap, never a gap). `max_active_runs=1` keeps the runs in order. Load idempotently (upsert by type
  and id: exports overlap) and apply the `deleted` files.
* **Deferrable**: the operator kicks off on a worker, waits in the triggerer, then streams every file
  (verified line by line, sha256, temp file + rename). A retry resumes the same export and skips the files
  already stored. Error files are kept beside the output; `error_policy="warn"` accepts a partial export.
* **Output**: `{output_base}/modmed_nightly_bulk_export/{run_id}/export/` (`output/`, `deleted/`, `error/`,
  `manifest.json`, `SHA256SUMS`), where `output_base` is the run's `output_base` param, else the
  `[modmed] output_base` setting (`AIRFLOW__MODMED__OUTPUT_BASE`, e.g. `s3://aws_default@my-bucket/modmed`),
  else `file:///tmp/modmed`.

**Connection**: `modmed_certified` (param `conn_id`): a certified-track connection (SMART backend
services). Bulk export is certified-only: a proprietary connection fails before any network call.

**Against the sandbox**: start `modmed-sandbox serve --port 8899`, export the connections printed by
`modmed-sandbox credentials --json --port 8899` (`airflow_connections`) as `AIRFLOW_CONN_MODMED_CERTIFIED=...`,
then `airflow dags test modmed_nightly_bulk_export`; run it again after changing data to see the increment.
Against ModMed: the same with your connection.

**Params**: `conn_id` (default `modmed_certified`), `output_base` (default: see above), `types` (`_type`,
comma-separated; default: US Core types).
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import ObjectStoragePath, Param, dag, task

from airflow_provider_modmed.operators.bulk_export import ModMedBulkExportOperator

log = logging.getLogger(__name__)

DAG_ID = "modmed_nightly_bulk_export"
DEFAULT_TYPES = ("Patient,AllergyIntolerance,Condition,Encounter,Immunization,Observation,DiagnosticReport,"
                 "DocumentReference")


def modmed_output_base(override: str | None = None) -> str:
    """The run's ``output_base`` param, else ``[modmed] output_base``, else ``file:///tmp/modmed``."""
    from airflow_provider_modmed.operators._common import output_base

    return output_base(override)


def watermark_path(params: dict[str, Any]) -> ObjectStoragePath:
    return ObjectStoragePath(modmed_output_base(params.get("output_base"))) / DAG_ID / "_watermark.json"


@dag(
    dag_id=DAG_ID,
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["modmed", "example", "bulk-export"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    user_defined_macros={"modmed_output_base": modmed_output_base},
    params={
        "conn_id": Param("modmed_certified", type="string", minLength=1,
                         description="A certified-track ModMed connection."),
        "output_base": Param(None, type=["null", "string"],
                             description="Object storage base URL; default: [modmed] output_base."),
        "types": Param(DEFAULT_TYPES, type="string", minLength=1,
                       description="_type: comma-separated resource types."),
    },
)
def modmed_nightly_bulk_export() -> None:
    @task
    def read_watermark(**context: Any) -> str:
        """The transactionTime of the last export that was loaded ("" on the first run: full export)."""
        path = watermark_path(context["params"])
        if not path.exists():
            log.info("no watermark yet: exporting everything")
            return ""
        since = str(json.loads(path.read_text())["transaction_time"])
        log.info("exporting changes since %s", since)
        return since

    export = ModMedBulkExportOperator(
        task_id="export",
        modmed_conn_id="{{ params.conn_id }}",
        output_folder=f"{{{{ modmed_output_base(params.output_base) }}}}/{DAG_ID}",
        export_level="system",
        types="{{ params.types }}",
        since="{{ ti.xcom_pull(task_ids='read_watermark') }}",
        error_policy="warn",
    )

    @task
    def load(result: dict[str, Any]) -> dict[str, Any]:
        """Stand-in for the warehouse load: read every file once (upsert by type and id, then apply the
        deleted entries). Logs counts only."""
        folder = ObjectStoragePath(result["run_folder"])
        loaded: dict[str, int] = {}
        for resource_type, entry in result["output"].items():
            lines = 0
            for name in entry["files"]:
                with (folder / name).open("rb") as fh:
                    lines += sum(1 for line in fh if line.strip())
            loaded[resource_type] = lines
        log.info("loaded %s; %d deleted entries", loaded, result["deleted"]["count"])
        return {"transaction_time": result["transaction_time"], "loaded": loaded}

    @task
    def advance_watermark(loaded: dict[str, Any], **context: Any) -> str:
        """Only now, with everything loaded, move the watermark to this export's transactionTime."""
        path = watermark_path(context["params"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"transaction_time": loaded["transaction_time"]}))
        return str(loaded["transaction_time"])

    read_watermark() >> export
    advance_watermark(load(export.output))  # type: ignore[arg-type]


modmed_nightly_bulk_export()
