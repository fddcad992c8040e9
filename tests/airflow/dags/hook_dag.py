"""A DAG whose task uses ModMedHook directly (TaskFlow), for the hook's end-to-end test."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["test"])
def modmed_hook_smoke() -> None:
    @task
    def count(conn_id: str, resource_type: str) -> int:
        from airflow_provider_modmed.hooks.modmed import ModMedHook

        return sum(1 for _ in ModMedHook(conn_id).search(resource_type))

    count.override(task_id="proprietary_patients")("modmed_default", "Patient")
    count.override(task_id="certified_immunizations")("modmed_certified", "Immunization")


modmed_hook_smoke()
