"""DAGs for the resource operators' end-to-end tests: each is driven by ``run_conf`` (rendered natively)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, DeltaDataIntervalTimetable, task

from airflow_provider_modmed.operators.resources import (
    ModMedCreateResourceOperator,
    ModMedDeleteResourceOperator,
    ModMedReadResourceOperator,
    ModMedSearchResourcesOperator,
    ModMedUpdateResourceOperator,
)

START = pendulum.datetime(2026, 1, 1, tz="UTC")
COMMON = {"schedule": None, "start_date": START, "catchup": False, "tags": ["test"],
          "render_template_as_native_obj": True}
RETRY = {"retries": 1, "retry_delay": timedelta(seconds=0)}

with DAG("modmed_op_create", params={"conn_id": "modmed_default", "resource": None, "if_none_exist": None,
                                     "transaction_id": None}, **COMMON):
    ModMedCreateResourceOperator(task_id="create", modmed_conn_id="{{ params.conn_id }}",
                                 resource="{{ params.resource }}", if_none_exist="{{ params.if_none_exist }}",
                                 transaction_id="{{ params.transaction_id }}", **RETRY)

with DAG("modmed_op_read", params={"conn_id": "modmed_default", "resource_type": "Patient", "resource_id": "1"},
         **COMMON):
    ModMedReadResourceOperator(task_id="read", modmed_conn_id="{{ params.conn_id }}",
                               resource_type="{{ params.resource_type }}", resource_id="{{ params.resource_id }}")

with DAG("modmed_op_update", params={"conn_id": "modmed_default", "resource": None, "patch": None,
                                     "resource_type": None, "resource_id": None, "if_match": None}, **COMMON):
    ModMedUpdateResourceOperator(task_id="update", modmed_conn_id="{{ params.conn_id }}",
                                 resource="{{ params.resource }}", patch="{{ params.patch }}",
                                 resource_type="{{ params.resource_type }}", resource_id="{{ params.resource_id }}",
                                 if_match="{{ params.if_match }}", **RETRY)

with DAG("modmed_op_delete", params={"conn_id": "modmed_default", "resource_type": "Patient", "resource_id": None},
         **COMMON):
    ModMedDeleteResourceOperator(task_id="delete", modmed_conn_id="{{ params.conn_id }}",
                                 resource_type="{{ params.resource_type }}", resource_id="{{ params.resource_id }}")

with DAG("modmed_op_search", params={"conn_id": "modmed_default", "resource_type": "Patient", "search_params": None,
                                     "output_path": None, "start": None, "end": None}, **COMMON):
    found = ModMedSearchResourcesOperator(
        task_id="search", modmed_conn_id="{{ params.conn_id }}", resource_type="{{ params.resource_type }}",
        search_params="{{ params.search_params }}", output_path="{{ params.output_path }}",
        last_updated_start="{{ params.start }}", last_updated_end="{{ params.end }}")

    @task
    def count_lines(result: dict) -> int:  # a TaskFlow consumer of the operator's XCom
        from airflow.sdk import ObjectStoragePath

        with ObjectStoragePath(result["path"]).open("r") as f:
            return sum(1 for _ in f)

    count_lines(found.output)

# a data-interval timetable gives each run a real interval (Airflow 3's '@daily' and timedelta(days=1) do not)
with DAG("modmed_op_search_incremental", schedule=DeltaDataIntervalTimetable(timedelta(days=1)),
         start_date=pendulum.datetime(2020, 1, 1, tz="UTC"), catchup=False, tags=["test"],
         params={"conn_id": "modmed_default", "resource_type": "Patient"}):
    ModMedSearchResourcesOperator(task_id="search", modmed_conn_id="{{ params.conn_id }}",
                                  resource_type="{{ params.resource_type }}", incremental=True)
