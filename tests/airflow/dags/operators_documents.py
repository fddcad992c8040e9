"""A DAG for the document upload operator's end-to-end tests, driven by ``run_conf``."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_modmed.operators.documents import ModMedDocumentUploadOperator

with DAG("modmed_op_upload", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         tags=["test"], render_template_as_native_obj=True,
         params={"conn_id": "modmed_default", "file_path": None, "category": "LAB", "patient_id": None,
                 "description": None}):
    uploaded = ModMedDocumentUploadOperator(
        task_id="upload", modmed_conn_id="{{ params.conn_id }}", file_path="{{ params.file_path }}",
        category="{{ params.category }}", patient_id="{{ params.patient_id }}",
        description="{{ params.description }}", retries=1, retry_delay=timedelta(seconds=0))

    @task
    def pulled(ti=None) -> str:  # the pushed id, as a downstream task sees it
        return str(ti.xcom_pull(task_ids="upload", key="document_reference_id"))

    uploaded >> pulled()
