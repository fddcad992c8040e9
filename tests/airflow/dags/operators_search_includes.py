"""DAG for the search operator against a fake FHIR server answering ``_include`` entries and wrong-type matches
(tests/integration/search_server.py): the same search with included resources separated (the default) and
dropped. Driven by ``run_conf`` (rendered natively)."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_modmed.operators.search import ModMedSearchResourcesOperator

with DAG("modmed_op_search_includes", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False, tags=["test"], render_template_as_native_obj=True,
         params={"conn_id": "modmed_fake_search", "search_params": None, "out": "/tmp/modmed-includes"}):
    ModMedSearchResourcesOperator(task_id="separate", modmed_conn_id="{{ params.conn_id }}", resource_type="Patient",
                                  search_params="{{ params.search_params }}",
                                  output_path="{{ params.out }}/separate/Patient.ndjson")
    ModMedSearchResourcesOperator(task_id="drop", modmed_conn_id="{{ params.conn_id }}", resource_type="Patient",
                                  search_params="{{ params.search_params }}", includes="drop",
                                  output_path="{{ params.out }}/drop/Patient.ndjson")
