"""A DAG whose tasks share their rate budget through a Redis that needs a password, and print the
configuration they got (as a user debugging a connection would): the password must not reach the log."""

from __future__ import annotations

import logging

import pendulum
from airflow.sdk import dag, task

log = logging.getLogger("airflow.task")


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["test"])
def modmed_storage_password() -> None:
    @task
    def read(conn_id: str) -> str:
        from airflow_provider_modmed.hooks.modmed import ModMedHook

        hook = ModMedHook(conn_id)
        config = hook.config
        log.info("modmed config %r", config)
        log.info("rate-limit storage: %s", config.rate_limit_storage_uri)
        return str(hook.read("Patient", "1")["id"])

    read.override(task_id="password_in_uri")("modmed_redis_in_uri")
    read.override(task_id="password_field")("modmed_redis_field")
    read.override(task_id="wrong_password")("modmed_redis_wrong")


modmed_storage_password()
