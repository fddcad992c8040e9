"""DAGs running ModMedChangesSensor in each mode, for tests/airflow/test_changes_sensor.py.

Every DAG takes its window, state folder and output folder from params (the tests pass them as run conf)
and renders templates as native objects, so an unset param stays None.
"""

from __future__ import annotations

import json
from typing import Any

import pendulum
from airflow.sdk import dag, task

from airflow_provider_modmed.sensors.changes import ModMedChangesSensor

PARAMS: dict[str, Any] = {"since": None, "until": None, "state_path": None, "output_path": None,
                          "search_params": None}


@task
def read_change_set(reference: dict[str, Any]) -> dict[str, Any]:
    """What a downstream task does with the reference: open the NDJSON the sensor wrote."""
    from airflow.sdk import ObjectStoragePath

    lines = ObjectStoragePath(reference["path"]).read_text().splitlines()
    resources = [json.loads(line) for line in lines]
    return {"ids": [r["id"] for r in resources], "versions": [r["meta"]["versionId"] for r in resources]}


def _changes_dag(dag_id: str, **sensor_kwargs: Any) -> Any:
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         params=PARAMS, render_template_as_native_obj=True, max_active_runs=1, tags=["test"])
    def changes_dag() -> None:
        sensor = ModMedChangesSensor(
            task_id="changes", resource_type="Patient", modmed_conn_id="modmed_default",
            search_params="{{ params.search_params }}",  # rendered natively: a dict or None
            since="{{ params.since }}", output_path="{{ params.output_path }}", lookback=1,
            timeout=120, **sensor_kwargs)
        read_change_set(sensor.output)

    return changes_dag()


# closed windows (since/until; a scheduled DAG takes them from its data interval)
modmed_changes_window_poke = _changes_dag(
    "modmed_changes_window_poke", until="{{ params.until }}", mode="poke", poke_interval=0.3, deferrable=False)
modmed_changes_window_reschedule = _changes_dag(
    "modmed_changes_window_reschedule", until="{{ params.until }}", mode="reschedule", poke_interval=0.5,
    deferrable=False)
modmed_changes_window_deferrable = _changes_dag(
    "modmed_changes_window_deferrable", until="{{ params.until }}", poke_interval=0.3, deferrable=True)
# continuous polling: the cursor in a state file
modmed_changes_state_deferrable = _changes_dag(
    "modmed_changes_state_deferrable", state_path="{{ params.state_path }}", poke_interval=0.3, deferrable=True)
modmed_changes_state_poke = _changes_dag(
    "modmed_changes_state_poke", state_path="{{ params.state_path }}", mode="poke", poke_interval=0.3,
    deferrable=False)
