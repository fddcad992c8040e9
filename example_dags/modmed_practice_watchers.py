"""
### ModMed: change watchers for many practices (one DAG per practice, asset watchers in the triggerer)

A vendor serving many practices watches each practice's changes without webhooks: this file makes **one
DAG per practice**, scheduled on that practice's assets, one per resource type; each asset's
`AssetWatcher` runs `ModMedChangesEventTrigger` in Airflow's triggerer (polls `_lastUpdated`, de-duplicates
by id + version, resumes from the asset's state store after a triggerer restart). When any of the
practice's types changes, its DAG runs and writes the batch's change list (ids, versions, `lastUpdated`:
never resources) to `{output_base}/modmed_practice_watchers/{conn_id}/{run_id}.json`; a real DAG reads
the changed resources there (see `modmed_event_driven`).

**The practices and types** are read when the file is parsed, from configuration (no database or network
call at parse time): `[modmed] watch_practices` (`AIRFLOW__MODMED__WATCH_PRACTICES`, comma-separated
connection ids; default `modmed_default`) and `[modmed] watch_types` (default
`Patient,Appointment,AllergyIntolerance`). 20 practices x 3 types = 60 watchers; one triggerer watches
thousands of streams (docs/deployment.md has the figures), and each poll spends the practice's own rate
budget (set `rate_limit_storage_uri` to a shared Redis so workers and triggerer draw from one budget).

**Settings**: `MODMED_WATCH_POLL_INTERVAL` (seconds between polls, default 60) and `[modmed] output_base`.
`make stack` runs this file for its 20 sandbox practices on a Celery/Postgres/S3 Airflow.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pendulum
from airflow.sdk import Asset, AssetAny, AssetWatcher, conf, dag, task

from airflow_provider_modmed.triggers.changes import ModMedChangesEventTrigger

DAG_PREFIX = "modmed_watch_"
POLL_INTERVAL = float(os.environ.get("MODMED_WATCH_POLL_INTERVAL", "60"))
DEFAULT_OUTPUT_BASE = "file:///tmp/modmed"
CONN_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def configured(option: str, default: str) -> list[str]:
    """A comma-separated ``[modmed]`` option as a list (blank items dropped)."""
    return [item.strip() for item in str(conf.get("modmed", option, fallback=default)).split(",") if item.strip()]


PRACTICES = [c for c in configured("watch_practices", "modmed_default") if CONN_ID.match(c)]
TYPES = configured("watch_types", "Patient,Appointment,AllergyIntolerance")


def practice_assets(conn_id: str) -> list[Asset]:
    """One asset per resource type of one practice, each watched by a change trigger.

    An asset's URI names it once in a deployment: ``modmed_event_driven`` owns ``modmed://<conn>/Patient``,
    so these are ``modmed://<conn>/<type>/practice-watch`` (two assets with one URI and two names conflict).
    """
    return [
        Asset(name=f"modmed_{conn_id}_{resource_type}_changed", uri=f"modmed://{conn_id}/{resource_type}/practice-watch",
              watchers=[AssetWatcher(
                  name=f"modmed_{conn_id}_{resource_type}_watcher",
                  trigger=ModMedChangesEventTrigger(resource_type=resource_type, modmed_conn_id=conn_id,
                                                    poll_interval=POLL_INTERVAL, max_changes_in_event=500))])
        for resource_type in TYPES
    ]


def practice_dag(conn_id: str) -> None:
    """The DAG of one practice: runs when any of its watched types changes."""
    assets = practice_assets(conn_id)

    @dag(dag_id=f"{DAG_PREFIX}{conn_id}", schedule=AssetAny(*assets),
         start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, max_active_runs=1,
         tags=["modmed", "example", "change-detection"], doc_md=__doc__)
    def watch() -> None:
        @task
        def record_changes(triggering_asset_events: Any = None, run_id: str | None = None) -> dict[str, Any]:
            """Write the batch's change list (ids and versions) for this practice; return counts per type."""
            from airflow.sdk import ObjectStoragePath

            changes: dict[str, dict[str, str]] = {}
            for asset in assets:
                for event in (triggering_asset_events or {}).get(asset, []):
                    payload = event.extra.get("payload", {})
                    for change in payload.get("changes", []):
                        changes.setdefault(payload.get("resource_type", asset.uri.rsplit("/", 1)[-1]), {})[
                            change["id"]] = change["versionId"]
            counts = {resource_type: len(ids) for resource_type, ids in sorted(changes.items())}
            if not changes:
                return {"counts": counts, "path": None}
            base = str(conf.get("modmed", "output_base", fallback=DEFAULT_OUTPUT_BASE)).rstrip("/")
            out = ObjectStoragePath(f"{base}/modmed_practice_watchers/{conn_id}/"
                                    f"{(run_id or 'run').replace(':', '_').replace('+', '_')}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(changes, sort_keys=True))
            return {"counts": counts, "path": str(out)}

        record_changes()

    watch()


for _conn_id in PRACTICES:
    practice_dag(_conn_id)
