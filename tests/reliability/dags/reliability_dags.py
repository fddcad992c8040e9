"""DAGs of the fault suite: a search to NDJSON driven by ``run_conf`` (rendered natively)."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_modmed.operators.resources import ModMedSearchResourcesOperator

with DAG("modmed_reliability_search", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False, tags=["test"], render_template_as_native_obj=True,
         params={"conn_id": "modmed_default", "resource_type": "Patient", "output_path": None, "count": None}):
    ModMedSearchResourcesOperator(task_id="search", modmed_conn_id="{{ params.conn_id }}",
                                  resource_type="{{ params.resource_type }}", output_path="{{ params.output_path }}",
                                  count=2)
