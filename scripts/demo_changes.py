"""`make demo`'s change detection: changes made through the client (creates and updates) where the change
DAGs look, and what each of those DAGs found. Ids, versions and counts only: never patient data.

* ``modmed_appointment_changes`` syncs the Appointments changed in its data interval, a past quarter hour
  that must have settled (its end plus the sensor's ``lookback``). The demo picks the run's logical date so
  that interval has settled, and makes its Appointment changes with the sandbox's clock set inside it
  (the ``clock_offset_ms`` switch; ``meta.lastUpdated`` follows that clock), as if they had been made then.
* ``modmed_event_driven`` runs when its asset watcher (``ModMedChangesEventTrigger``, in Airflow's triggerer)
  sees Patient changes. ``airflow dags test`` cannot deliver asset events, so the demo starts a triggerer, a
  scheduler and an api-server on the demo's SQLite database, waits for the watcher's first polls, changes
  Patients through the client, and waits for the asset-triggered run.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from airflow_provider_modmed.client import ClientConfig, FhirClient
from airflow_provider_modmed.client.instants import format_instant
from airflow_provider_modmed.sandbox.server import SandboxServer
from scripts.processes import ProcessGroups, free_port

APPOINTMENT_DAG = "modmed_appointment_changes"
EVENT_DAG = "modmed_event_driven"
QUARTER_S = 15 * 60
#: the appointment DAG's sensor ``lookback`` (seconds), plus a margin: its window settles this long after its end
SETTLE_S = 120 + 60


@dataclass
class Found:
    """What a change DAG was given to find (``made``: id -> versionId) and what it found."""

    dag_id: str
    resource_type: str
    made: dict[str, str]
    found: dict[str, str] = field(default_factory=dict)
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Every change the demo made was found, at its version."""
        return bool(self.made) and all(self.found.get(rid) == version for rid, version in self.made.items())

    def line(self) -> str:
        ids = ", ".join(f"{rid} v{version}" for rid, version in sorted(self.found.items(), key=lambda kv: kv[0]))
        verdict = "found every change the demo made" if self.ok else "MISSED changes the demo made"
        return (f"{self.dag_id}: {len(self.found)} {self.resource_type} change(s) [{ids or 'none'}] "
                f"{self.detail}; {verdict} ({len(self.made)})")


def proprietary_client(sb: SandboxServer) -> FhirClient:
    """A client of the sandbox's proprietary track (password grant + API key)."""
    prop = sb.credentials["proprietary"]
    return FhirClient(ClientConfig(track="proprietary", fhir_base=prop["fhir_base"], firm="apiportal",
                                   api_key=prop["api_key"], username=prop["username"], password=prop["password"]))


# -- the appointment DAG: a settled past quarter hour ------------------------------------------------------

def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def appointment_run(now: float | None = None) -> tuple[datetime, datetime, datetime]:
    """(logical date, window start, window end) of an appointment-changes run whose window has settled.

    ``airflow dags test`` with a logical date runs the last full quarter hour before it; a logical date
    ``SETTLE_S`` ago gives a window that ended at least that long ago, so the sensor does not wait.
    """
    logical = (time.time() if now is None else now) - SETTLE_S
    end = logical // QUARTER_S * QUARTER_S
    return _utc(logical), _utc(end - QUARTER_S), _utc(end)


def change_appointments(sb: SandboxServer, at: datetime) -> dict[str, str]:
    """Book one Appointment and reschedule an existing one, with the sandbox clock at ``at``; id -> versionId."""
    made: dict[str, str] = {}
    sb.faults(clock_offset_ms=int((at.timestamp() - time.time()) * 1000))
    try:
        with proprietary_client(sb) as client:
            booked = next(a for a in client.search("Appointment", count=50) if a.get("status") == "booked")
            created = client.create({"resourceType": "Appointment", "status": "booked",
                                     "appointmentType": booked["appointmentType"],
                                     "start": booked["start"], "end": booked["end"],
                                     "minutesDuration": booked.get("minutesDuration"),
                                     "participant": booked["participant"]})
            made[created["id"]] = created["meta"]["versionId"]
            moved = client.update({**booked, "comment": "rescheduled by the demo"},
                                  if_match=booked["meta"]["versionId"])
            made[moved["id"]] = moved["meta"]["versionId"]
    finally:
        sb.faults(clock_offset_ms=0)
    return made


def xcom_results(db: Path, dag_id: str) -> dict[str, Any]:
    """task id -> return value of the latest run of ``dag_id`` in the SQLite metadata database ``db``."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        run = conn.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)).fetchone()
        if run is None:
            return {}
        rows = conn.execute("SELECT task_id, value FROM xcom WHERE dag_id = ? AND run_id = ? AND key = "
                            "'return_value'", (dag_id, run[0])).fetchall()
    return {task_id: json.loads(value) for task_id, value in rows}


def appointment_found(db: Path, made: dict[str, str]) -> Found:
    """What the appointment DAG's sensor found (its change set reference) and what the warehouse did."""
    results = xcom_results(db, APPOINTMENT_DAG)
    change_set = results.get("wait_for_changed_appointments") or {}
    found = {str(c["id"]): str(c["versionId"]) for c in change_set.get("changes", [])}
    window = change_set.get("window", {})
    detail = (f"in [{window.get('start')}, {window.get('end')}); warehouse "
              f"{json.dumps(results.get('write_to_warehouse', {}))}") if change_set else "(the sensor skipped)"
    return Found(APPOINTMENT_DAG, "Appointment", made, found, detail)


# -- the event-driven DAG: Airflow's triggerer, scheduler and api-server -----------------------------------

def change_patients(sb: SandboxServer) -> dict[str, str]:
    """Register one Patient and update an existing one through the client; id -> versionId."""
    with proprietary_client(sb) as client:
        created = client.create({"resourceType": "Patient", "name": [{"family": "Demo", "given": ["Watch"]}],
                                 "identifier": [{"system": "urn:demo", "value": f"watch-{time.time_ns()}"}]})
        existing = client.read("Patient", "2")
        updated = client.update({**existing, "identifier": [*existing.get("identifier", []),
                                                            {"system": "urn:demo", "value": "seen-by-the-demo"}]},
                                if_match=existing["meta"]["versionId"])
    return {created["id"]: created["meta"]["versionId"], updated["id"]: updated["meta"]["versionId"]}


def _rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # locked: ask again
        return []


@contextmanager
def airflow_components(airflow: str, env: dict[str, str], logs: Path) -> Iterator[ProcessGroups]:
    """A triggerer, a scheduler and an api-server (LocalExecutor), each in its own process group, stopped
    on exit; yields them (``wait_for`` raises ProcessError, naming the log, if one of them died)."""
    port = free_port()
    env = {**env, "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1"}
    procs = ProcessGroups(logs, log_prefix="airflow-", tails_in_errors=False)
    try:
        for name, args in (("triggerer", ["triggerer", "--skip-serve-logs"]),
                           ("scheduler", ["scheduler", "--skip-serve-logs"]),
                           ("api-server", ["api-server", "--port", str(port)])):
            procs.start(name, [airflow, *args], env=env)
        yield procs
    finally:
        procs.stop(grace=30)


def run_event_driven(airflow: str, env: dict[str, str], sb: SandboxServer, logs: Path,
                     timeout: float = 240) -> Found:
    """Unpause the event-driven DAG, start Airflow's components, change Patients once the watcher polls,
    and report what the asset-triggered run synced (raises when a component dies or a wait times out)."""
    db = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    env = {**env, "MODMED_WATCH_POLL_INTERVAL": "2"}
    # Airflow registers an asset's watcher only for an unpaused DAG, when it serializes it: parse (the DAG
    # exists, paused), unpause, parse again (the watcher's trigger lands in the DB)
    for args in (["dags", "reserialize"], ["dags", "unpause", EVENT_DAG], ["dags", "reserialize"]):
        subprocess.run([airflow, *args], env=env, check=True, capture_output=True, timeout=300)
    if not _rows(db, "SELECT id FROM trigger"):
        raise RuntimeError(f"{EVENT_DAG}: Airflow registered no asset watcher (is the DAG paused?)")
    def polls() -> int:
        return sb.stats().get("requests:proprietary", 0)

    before = polls()
    with airflow_components(airflow, env, logs) as procs:
        procs.wait_for("the triggerer's watcher to poll the sandbox", lambda: polls() >= before + 2, timeout)
        made = change_patients(sb)
        changed_at = format_instant(int(time.time() * 1000))
        state = procs.wait_for(
            "the asset-triggered run to finish",
            lambda: next((s for (s,) in _rows(db, "SELECT state FROM dag_run WHERE dag_id = ?", EVENT_DAG)
                          if s in ("success", "failed")), None), timeout)
    events = [json.loads(extra).get("payload", {}) for (extra,) in _rows(db, "SELECT extra FROM asset_event")]
    synced = xcom_results(db, EVENT_DAG).get("sync_changed_patients") or {}
    synced_ids = set(synced.get("ids", [])) if state == "success" else set()
    # found: the changes the watcher's events carried that the run then synced
    found = {str(c["id"]): str(c["versionId"]) for e in events for c in e.get("changes", [])
             if str(c["id"]) in synced_ids}
    detail = (f"changed at {changed_at}; {len(events)} asset event(s) from the watcher, run {state}, "
              f"synced {len(synced_ids)} patient(s)")
    return Found(EVENT_DAG, "Patient", made, found, detail)
