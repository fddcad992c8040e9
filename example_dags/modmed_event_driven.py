"""
### ModMed: event-driven DAG on patient changes (asset watcher)

ModMed has no webhooks. This DAG is scheduled on an **asset** whose `AssetWatcher` runs
`ModMedChangesEventTrigger` in Airflow's triggerer: it polls `Patient` changes (`_lastUpdated`, an exact
filter on `meta.lastUpdated`, de-duplication by id + version; see docs/change-detection.md) and emits one
asset event per batch of changes. The scheduler then runs the DAG with the batch in
`triggering_asset_events`; the task reads those patients and writes them as NDJSON.

* **Small events**: an event carries ids, versions and `lastUpdated` (at most `max_changes_in_event`,
  then `truncated`), never resources.
* **One poll loop per connection and type**: watchers of the same connection, resource type, parameters
  and cadence share one poll (Airflow 3.3 shared streams), so a second DAG watching the same patients does
  not spend the rate budget twice.
* **Restarts**: the watcher's cursor lives in the asset's `asset_state_store`; after a triggerer restart it
  resumes where it stopped (an event may repeat, none is lost).

**Connection**: `modmed_default` (the proprietary track; a `modmed_certified` connection works the same: the
watcher and the task share the connection, so the events carry the ids that track reads; the certified track
names a patient with ids of its own, `1.120182.2.<n>` in the sandbox, so join tracks by identifier).

**Against the sandbox**: start `modmed-sandbox serve --port 8899`, export the connections printed by
`modmed-sandbox credentials --json --port 8899` (`airflow_connections`) as `AIRFLOW_CONN_MODMED_DEFAULT=...`,
run `airflow triggerer`, `airflow scheduler`, `airflow api-server` (or `airflow standalone`) with
`AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False` (watchers run only for unpaused DAGs), then create a
patient (`curl -X POST localhost:8899/_sandbox/resources/Patient -d '{"name":[{"family":"Doe"}]}'`): a run
starts within a poll interval. `airflow dags test modmed_event_driven` runs it once without events.

**Settings**: `MODMED_WATCH_POLL_INTERVAL` (seconds between polls, default 60; read when the DAG is parsed)
and `[modmed] output_base` (`AIRFLOW__MODMED__OUTPUT_BASE`, default `file:///tmp/modmed`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pendulum
from airflow.sdk import Asset, AssetWatcher, dag, task

from airflow_provider_modmed.triggers.changes import ModMedChangesEventTrigger

DAG_ID = "modmed_event_driven"
CONN_ID = "modmed_default"
POLL_INTERVAL = float(os.environ.get("MODMED_WATCH_POLL_INTERVAL", "60"))
DEFAULT_OUTPUT_BASE = "file:///tmp/modmed"

patients_changed = Asset(
    name="modmed_patients_changed",
    uri="modmed://modmed_default/Patient",
    watchers=[
        AssetWatcher(
            name="modmed_patient_watcher",
            trigger=ModMedChangesEventTrigger(resource_type="Patient", modmed_conn_id=CONN_ID,
                                              poll_interval=POLL_INTERVAL, max_changes_in_event=500),
        )
    ],
)


@dag(dag_id=DAG_ID, schedule=[patients_changed], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     tags=["modmed", "example", "change-detection"], doc_md=__doc__)
def modmed_event_driven() -> None:
    @task
    def sync_changed_patients(triggering_asset_events: Any = None, run_id: str | None = None) -> dict[str, Any]:
        """Read the patients named by the events and write them as NDJSON; return ids and the path.

        The events carry ids and versions only (never resources). A payload cut at
        ``max_changes_in_event`` says ``truncated``; a production DAG would then poll the event's
        ``from``/``to`` window with ``client.changes.poll_changes`` instead of reading by id.
        """
        from airflow.sdk import ObjectStoragePath, conf

        from airflow_provider_modmed.hooks.modmed import ModMedHook

        latest: dict[str, str] = {}
        events = triggering_asset_events[patients_changed] if triggering_asset_events else []  # none: manual run
        for event in events:
            payload = event.extra.get("payload", {})
            for change in payload.get("changes", []):
                latest[change["id"]] = change["versionId"]
        if not latest:
            return {"count": 0, "ids": [], "path": None}
        hook = ModMedHook(CONN_ID)
        base = str(conf.get("modmed", "output_base", fallback=DEFAULT_OUTPUT_BASE)).rstrip("/")
        out = ObjectStoragePath(f"{base}/{DAG_ID}/patients-{(run_id or 'run').replace(':', '_')}.ndjson")
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for patient_id in sorted(latest):
                f.write(json.dumps(hook.read("Patient", patient_id), separators=(",", ":")) + "\n")
        hook.close()
        return {"count": len(latest), "ids": sorted(latest), "path": str(out)}

    sync_changed_patients()


modmed_event_driven()
