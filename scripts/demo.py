"""`make demo`: the ModMed sandbox, a short scripted tour of both API tracks, then every example DAG run
for real with `airflow dags test` on SQLite, and a report.

The change DAGs get changes to find: Appointments created and updated through the client inside the
appointment DAG's window, and Patients changed while the event-driven DAG's asset watcher runs in a real
triggerer (scripts/demo_changes.py); the report says what each found.

Stops what it started; exits non-zero if any DAG failed or a change DAG missed a change the demo made.
Prints no secret and no patient data: ids, counts, statuses and timings only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import demo_changes as changes  # scripts/demo_changes.py (this script's folder is on sys.path)
import httpx

from airflow_provider_modmed.sandbox.server import SandboxServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "example_dags"
AIRFLOW = str(Path(sys.executable).parent / "airflow")


def tour(sb: SandboxServer) -> None:
    """Token, search, create, read, a refusal, the certified track and a bulk export, by hand."""
    from airflow_provider_modmed.client import ClientConfig, FhirClient
    from airflow_provider_modmed.errors import CapabilityError

    prop, cert = sb.credentials["proprietary"], sb.credentials["certified"]
    config = ClientConfig(track="proprietary", fhir_base=prop["fhir_base"], firm="apiportal",
                          api_key=prop["api_key"], username=prop["username"], password=prop["password"])
    with FhirClient(config) as client:
        first = next(iter(client.search("Patient", count=50)))
        print(f"  proprietary: password grant + x-api-key, searched Patient (first id {first['id']})")
        created = client.create({"resourceType": "Patient", "name": [{"family": "Demo", "given": ["Tour"]}],
                                 "identifier": [{"system": "urn:demo", "value": "tour-1"}]},
                                if_none_exist={"identifier": "urn:demo|tour-1"})
        again = client.read("Patient", created["id"])
        print(f"  conditional create -> Patient/{created['id']}; read back version {again['meta']['versionId']}")
        try:
            client.read("Immunization", "1")
        except CapabilityError as exc:
            print(f"  refused before any call: {str(exc).split(':')[0]}")
    token = httpx.post(cert["token_url"], data={"grant_type": "client_credentials", "scope": "system/*.read",
                                                **cert["client_secret_post"]}).json()
    bundle = httpx.get(cert["fhir_base"] + "/Immunization", params={"_count": 10},
                       headers={"Authorization": f"Bearer {token['access_token']}"}).json()
    print(f"  certified: SMART token (expires_in {token['expires_in']}), {bundle['total']} Immunizations")


@dataclass
class Outcome:
    dag_id: str
    ok: bool
    seconds: float
    calls: int
    read: int
    written: int
    files: int
    note: str = ""


def discover() -> list[str]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLES), safe_mode=False)
    if bag.import_errors:
        raise SystemExit(f"example DAGs failed to import: {bag.import_errors}")
    return sorted(bag.dags)


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def run_dag(dag_id: str, env: dict[str, str], sb: SandboxServer, out: Path, logs: Path,
            logical_date: str | None = None) -> Outcome:
    """``airflow dags test dag_id [logical_date]``, measured."""
    log_path = logs / f"{dag_id}.log"

    def body() -> bool:
        with log_path.open("w") as log:
            proc = subprocess.run([AIRFLOW, "dags", "test", dag_id, *([logical_date] if logical_date else [])],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600, check=False)
        return proc.returncode == 0 and "state=success" in log_path.read_text(errors="replace")

    return measured(dag_id, body, sb, out, f"see {log_path}")


def measured(dag_id: str, body: Callable[[], bool], sb: SandboxServer, out: Path, note: str) -> Outcome:
    """Run ``body`` (True: the DAG succeeded) and count what it cost the sandbox and wrote to ``out``."""
    before, files_before = sb.stats(), count_files(out)
    started = time.monotonic()
    ok = body()
    seconds = time.monotonic() - started
    after = sb.stats()

    def diff(prefix: str) -> int:
        return sum(v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix))

    calls = after.get("requests", 0) - before.get("requests", 0)
    written = diff("created:") + diff("updated:") + diff("deleted:")
    return Outcome(dag_id, ok, seconds, calls, diff("served"), written, count_files(out) - files_before,
                   "" if ok else note)


def run_change_dag(dag_id: str, env: dict[str, str], sb: SandboxServer, out: Path, logs: Path,
                   found: list[changes.Found]) -> Outcome:
    """The change DAGs, each given changes to find (made through the client) and asked what it found."""
    db = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    if dag_id == changes.APPOINTMENT_DAG:
        logical, start, end = changes.appointment_run()
        made = changes.change_appointments(sb, start + (end - start) / 2)
        print(f"   made {len(made)} Appointment changes through the client, stamped inside the run's window "
              f"[{start:%H:%M}, {end:%H:%M}) UTC (sandbox clock_offset_ms)", flush=True)
        outcome = run_dag(dag_id, env, sb, out, logs, logical.isoformat())
        found.append(changes.appointment_found(db, made))
        return outcome

    def event_driven() -> bool:
        try:
            found.append(changes.run_event_driven(AIRFLOW, env, sb, logs))
        except (RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
            print(f"   {dag_id}: {exc}", flush=True)
            found.append(changes.Found(dag_id, "Patient", {}, detail=str(exc)))
            return False
        return True

    print("   starting a triggerer, a scheduler and an api-server for the asset watcher; changing Patients "
          "through the client once it polls", flush=True)
    return measured(dag_id, event_driven, sb, out, f"see {logs}/airflow-*.log")


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="modmed-demo-") as tmp, \
            SandboxServer(patients=100, seed=1, export_seconds=2) as sb:
        work = Path(tmp)
        print(f"1. sandbox up: API {sb.api_url}, object storage {sb.storage_url} "
              f"({time.monotonic() - started:.1f}s)")
        print("2. a tour of both tracks with the client:")
        tour(sb)
        out, logs = work / "output", ROOT / "out" / "demo"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AIRFLOW_HOME": str(work / "airflow-home"),
               "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLES), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "AIRFLOW__MODMED__OUTPUT_BASE": f"file://{out}",
               "MODMED_EXAMPLE_OUTPUT": str(out)}
        for conn_id, conn in sb.credentials["airflow_connections"].items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AIRFLOW")})
        subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True)
        dag_ids = discover()
        print(f"3. Airflow on SQLite, connections {', '.join(sb.credentials['airflow_connections'])}; "
              f"running {len(dag_ids)} example DAGs with `airflow dags test` ({changes.EVENT_DAG} through Airflow's "
              "triggerer and scheduler):")
        results, found = [], []
        for dag_id in dag_ids:
            if dag_id in (changes.APPOINTMENT_DAG, changes.EVENT_DAG):
                result = run_change_dag(dag_id, env, sb, out, logs, found)
            else:
                result = run_dag(dag_id, env, sb, out, logs)
            results.append(result)
            print(f"   {'ok  ' if result.ok else 'FAIL'} {dag_id} ({result.seconds:.0f}s)", flush=True)
        print("\nDAG                                   status   calls   read  written  files   time")
        for r in results:
            print(f"{r.dag_id:<37} {'success' if r.ok else 'FAILED':<8} {r.calls:>5} {r.read:>6} {r.written:>8} "
                  f"{r.files:>6} {r.seconds:>5.0f}s {r.note}")
        print("\nChange detection (what each change DAG found; ids and versions only):")
        for f in found:
            print(f"  {'ok  ' if f.ok else 'FAIL'} {f.line()}")
        failed = {r.dag_id for r in results if not r.ok} | {f.dag_id for f in found if not f.ok}
        print(f"\n{len(results) - len(failed)} of {len(results)} DAGs succeeded in "
              f"{time.monotonic() - started:.0f}s; task logs in {logs}")
        if failed:
            print(f"failed: {', '.join(sorted(failed))}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
