"""Test DAG for ModMedBulkExportOperator: one deferrable task (trigger runs inline under dag.test()) and one
that polls on the worker. The output folder comes from MODMED_BULK_TEST_OUTPUT (set by the test)."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag

from airflow_provider_modmed.operators.bulk_export import ModMedBulkExportOperator

OUTPUT = os.environ.get("MODMED_BULK_TEST_OUTPUT", "file:///tmp/modmed-bulk-test")
FAST = {"min_poll_seconds": 0.05, "max_poll_seconds": 0.2}


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["test"])
def modmed_bulk_export_test() -> None:
    ModMedBulkExportOperator(task_id="deferred_group_export", modmed_conn_id="modmed_certified",
                             output_folder=OUTPUT, export_level="Group/cohort-a",
                             types=["Patient", "Immunization"], **FAST)
    ModMedBulkExportOperator(task_id="worker_patient_export", modmed_conn_id="modmed_certified",
                             output_folder=OUTPUT, export_level="Patient", types="Patient",
                             deferrable=False, **FAST)


modmed_bulk_export_test()
