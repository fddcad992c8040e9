"""`make demo`: the ModMed sandbox, a short scripted tour of both API tracks, then every example DAG run
for real with `airflow dags test` on SQLite, and a report.

Stops what it started; exits non-zero if any DAG failed. Prints no secret and no patient data: ids,
counts, statuses and timings only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


def run_dag(dag_id: str, env: dict[str, str], sb: SandboxServer, out: Path, logs: Path) -> Outcome:
    before, files_before = sb.stats(), count_files(out)
    started = time.monotonic()
    with (logs / f"{dag_id}.log").open("w") as log:
        proc = subprocess.run([AIRFLOW, "dags", "test", dag_id], env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=600, check=False)
    seconds = time.monotonic() - started
    text = (logs / f"{dag_id}.log").read_text(errors="replace")
    ok = proc.returncode == 0 and "state=success" in text
    after = sb.stats()

    def diff(prefix: str) -> int:
        return sum(v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix))

    note = "" if ok else f"see {logs / (dag_id + '.log')}"
    calls = after.get("requests", 0) - before.get("requests", 0)
    written = diff("created:") + diff("updated:") + diff("deleted:")
    return Outcome(dag_id, ok, seconds, calls, diff("served"), written, count_files(out) - files_before, note)


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
              f"running {len(dag_ids)} example DAGs with `airflow dags test`:")
        results = []
        for dag_id in dag_ids:
            result = run_dag(dag_id, env, sb, out, logs)
            results.append(result)
            print(f"   {'ok  ' if result.ok else 'FAIL'} {dag_id} ({result.seconds:.0f}s)", flush=True)
        print("\nDAG                                   status   calls   read  written  files   time")
        for r in results:
            print(f"{r.dag_id:<37} {'success' if r.ok else 'FAILED':<8} {r.calls:>5} {r.read:>6} {r.written:>8} "
                  f"{r.files:>6} {r.seconds:>5.0f}s {r.note}")
        failed = [r.dag_id for r in results if not r.ok]
        print(f"\n{len(results) - len(failed)} of {len(results)} DAGs succeeded in "
              f"{time.monotonic() - started:.0f}s; task logs in {logs}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
