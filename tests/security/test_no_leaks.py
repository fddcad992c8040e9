"""No secret and no patient data in anything Airflow stores: run the resource operators, the hook, the document
upload and the example DAGs (plus runs that fail on wrong credentials) against a sandbox seeded with
recognizable secrets, then scan everything: the task output (Airflow's task logs; ``dag.test()`` writes them to
stdout), every file under AIRFLOW_HOME (log files and the SQLite metadata DB, raw), the XCom table, the rendered
template fields, and the exception messages. Bearer and refresh tokens are read from the sandbox's own state
after the runs and scanned for too, as is every line of both private keys."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client import ClientConfig, FhirClient
from airflow_provider_modmed.errors import ModMedError
from airflow_provider_modmed.hooks.modmed import ModMedHook
from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.seed import MRN_SYSTEM
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import load_dag
from tests.reliability._figures import Figures
from tests.security.conftest import MARKER, SEEDED

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
TEST_DAGS = ROOT / "tests" / "airflow" / "dags"
EXAMPLES = ROOT / "example_dags"
STARTED = time.time()

#: the patient this suite writes: recognizable PHI
PHI_PATIENT = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": "MRN-SEC-4242"}],
               "name": [{"use": "official", "family": "Phileakfamily", "given": ["Phileakgiven"]}],
               "birthDate": "1959-07-23", "gender": "female",
               "telecom": [{"system": "phone", "value": "555-0142-99"}]}

_ARTIFACTS: dict[str, Any] = {}


def _stored(runs: list[Any]) -> dict[str, str]:
    """The XCom values, rendered template fields and task-instance rows of ``runs``, as JSON text."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    xcom: list[Any] = []
    rendered: list[Any] = []
    tis: list[Any] = []
    with create_session() as session:
        for run in runs:
            for x in session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id):
                xcom.append({"task": x.task_id, "key": x.key, "value": XComModel.deserialize_value(x)})
            for r in session.query(RTIF).filter(RTIF.dag_id == run.dag_id, RTIF.run_id == run.run_id):
                rendered.append({"task": r.task_id, "fields": r.rendered_fields})
            for t in session.query(TaskInstance).filter(TaskInstance.dag_id == run.dag_id,
                                                        TaskInstance.run_id == run.run_id):
                tis.append({"task": t.task_id, "state": str(t.state), "note": t.note,
                            "executor_config": str(t.executor_config)})
    return {"xcom": json.dumps(xcom, default=str), "rendered": json.dumps(rendered, default=str),
            "task_instances": json.dumps(tis, default=str)}


def _created_id(run: Any) -> str:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id,
                                              XComModel.key == "return_value").one()
        return str(XComModel.deserialize_value(row)["id"])


def _files(*roots: Path, since: float = 0.0) -> dict[str, bytes]:
    """Every regular file under ``roots`` changed since ``since`` (at most 64 MiB each)."""
    found: dict[str, bytes] = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                    if not os.path.isfile(path) or os.path.islink(path) or st.st_mtime < since \
                            or st.st_size > 64 << 20:
                        continue
                    with open(path, "rb") as fh:
                        found[path] = fh.read()
                except OSError:
                    continue
    return found


def _run_everything(sb: SandboxServer, capfd: Any, caplog: Any, tmp: Path) -> dict[str, Any]:
    runs: list[Any] = []
    states: dict[str, str] = {}

    def run(path: Path, dag_id: str, label: str, **kwargs: Any) -> Any:
        dag_run = load_dag(path, dag_id).test(**kwargs)
        runs.append(dag_run)
        states[label] = str(dag_run.state)
        return dag_run

    import logging

    caplog.set_level(logging.DEBUG)  # debug lines too: a secret must not reach any level
    capfd.readouterr()
    # the resource operators, on every auth method of both tracks
    ops = TEST_DAGS / "operators_resources.py"
    created = run(ops, "modmed_op_create", "create", run_conf={"resource": PHI_PATIENT, "if_none_exist": True})
    rid = _created_id(created)
    run(ops, "modmed_op_read", "read", run_conf={"resource_id": rid})
    new_phone = {"telecom": [{"system": "phone", "value": "555-0143-77"}]}
    run(ops, "modmed_op_update", "update",
        run_conf={"resource_type": "Patient", "resource_id": rid, "patch": new_phone})
    run(ops, "modmed_op_search", "search (password)",
        run_conf={"output_path": str(tmp / "p.ndjson"), "search_params": {"family": "Phileakfamily"}})
    run(ops, "modmed_op_search", "search (private_key_jwt RS384)",
        run_conf={"conn_id": "modmed_certified", "output_path": str(tmp / "c.ndjson")})
    run(ops, "modmed_op_read", "read (private_key_jwt ES384)",
        run_conf={"conn_id": "modmed_certified_es384", "resource_type": "Patient", "resource_id": certified_id("1")})
    run(ops, "modmed_op_read", "read (certified client secret)",
        run_conf={"conn_id": "modmed_certified_secret", "resource_type": "Patient", "resource_id": certified_id("2")})
    run(ops, "modmed_op_read", "read (keycloak client secret)",
        run_conf={"conn_id": "modmed_proprietary_cc", "resource_id": "3"})
    run(ops, "modmed_op_delete", "delete", run_conf={"resource_id": rid})
    # the hook (TaskFlow) and the document upload
    run(TEST_DAGS / "hook_dag.py", "modmed_hook_smoke", "hook")
    pdf = tmp / "scan.pdf"
    pdf.write_bytes(b"%PDF-1.4 security suite")
    run(TEST_DAGS / "operators_documents.py", "modmed_op_upload", "upload",
        run_conf={"file_path": str(pdf), "patient_id": "1", "description": "Phileakfamily's referral"})
    # the example DAGs
    inbox = tmp / "inbox"
    shutil.copytree(EXAMPLES / "data" / "inbox", inbox)
    run(EXAMPLES / "modmed_incremental_patient_sync.py", "modmed_incremental_patient_sync", "example: sync",
        logical_date=datetime(2026, 3, 2, 2, tzinfo=timezone.utc), run_conf={"output_base": f"file://{tmp}/sync"})
    run(EXAMPLES / "modmed_document_upload.py", "modmed_document_upload", "example: upload",
        run_conf={"folder": str(inbox)})
    run(EXAMPLES / "modmed_many_practices.py", "modmed_many_practices", "example: many practices",
        logical_date=datetime(2026, 3, 2, 5, tzinfo=timezone.utc),
        run_conf={"practices": ["modmed_default", "modmed_proprietary_cc"], "days_ahead": 90,
                  "output_base": f"file://{tmp}/practices"})
    run(EXAMPLES / "modmed_write_back.py", "modmed_write_back", "example: write back")
    # the deferrable ones: dag.test() runs their triggers inline, so the trigger logs are in the output too
    run(EXAMPLES / "modmed_nightly_bulk_export.py", "modmed_nightly_bulk_export", "example: nightly bulk export",
        logical_date=datetime(2026, 2, 1, tzinfo=timezone.utc),
        run_conf={"output_base": f"file://{tmp}/bulk", "types": "Patient,Immunization"})
    run_appointment_changes(sb, tmp, run)
    run_triggers(sb, tmp)
    # runs that fail on wrong credentials: their exception messages go to the task log
    for conn_id in ("modmed_wrong_password", "modmed_wrong_key", "modmed_wrong_secret"):
        run(ops, "modmed_op_read", f"read ({conn_id})", run_conf={"conn_id": conn_id, "resource_id": "1"})
    captured = capfd.readouterr()
    output = captured.out + captured.err + caplog.text
    # the same output at INFO, the level to run in production (Airflow's own supervisor logs secret values
    # at DEBUG: docs/reliability.md); scanned too, and its size reported apart
    info_output = captured.out + captured.err + "\n".join(
        caplog.handler.format(r) for r in caplog.records if r.levelno >= logging.INFO)

    # exception messages and reprs, raised directly
    messages: list[str] = []
    for conn_id in ("modmed_wrong_password", "modmed_wrong_key", "modmed_wrong_secret", "modmed_default"):
        hook = ModMedHook(conn_id)
        messages.append(repr(hook.config))
        messages.append(hook.test_connection()[1])
        try:
            with FhirClient(hook.config) as c:
                c.read("Patient", "1")
                c.read("Patient", "999999")
        except ModMedError as exc:
            messages += [str(exc), repr(exc), repr(exc.args)]
    try:
        ClientConfig(track="proprietary", fhir_base="http://example.com/x/ema/fhir/v2", api_key=SEEDED["api_key"],
                     username="u", password=SEEDED["password"])
    except ModMedError as exc:
        messages += [str(exc), repr(exc)]
    messages += [f"{k}={v!r}" for k, v in sorted(os.environ.items()) if k.startswith("AIRFLOW__")]
    return {"runs": runs, "states": states, "output": output, "info_output": info_output, "stored": _stored(runs),
            "messages": messages}


def run_appointment_changes(sb: SandboxServer, tmp: Path, run: Any) -> None:
    """The change-detection example over a settled 15-minute interval holding two new appointments."""
    from datetime import timedelta

    now = datetime.now(timezone.utc) - timedelta(minutes=5)
    end = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    target = int((end - timedelta(minutes=7)).timestamp() * 1000)
    sb.faults(clock_offset_ms=target - int(time.time() * 1000))
    for _ in range(2):
        sb.app_state.store.create({"resourceType": "Appointment", "status": "booked", "start": "2026-06-01T09:00:00Z",
                                   "participant": [{"actor": {"reference": "Patient/1"}, "status": "accepted"}]})
    sb.reset_faults()
    run(EXAMPLES / "modmed_appointment_changes.py", "modmed_appointment_changes", "example: appointment changes",
        logical_date=end, run_conf={"output_base": f"file://{tmp}/changes",
                                    "warehouse": str(tmp / "warehouse.sqlite3")})


def run_triggers(sb: SandboxServer, tmp: Path) -> None:
    """The sensor's and the bulk export's triggers run directly (as in a triggerer), each to its event."""
    import asyncio
    from types import SimpleNamespace

    from airflow.sdk.exceptions import TaskDeferred

    from airflow_provider_modmed.client.instants import format_instant
    from airflow_provider_modmed.operators.bulk_export import ModMedBulkExportOperator
    from airflow_provider_modmed.sensors.changes import ModMedChangesSensor

    sensor = ModMedChangesSensor(task_id="changes", resource_type="Patient", state_path=f"file://{tmp}/state",
                                 output_path=f"file://{tmp}/changes-direct",
                                 since=format_instant(int(time.time() * 1000)), deferrable=True, poke_interval=0.2)
    export = ModMedBulkExportOperator(task_id="export", modmed_conn_id="modmed_certified",
                                      output_folder=f"file://{tmp}/bulk-direct", types="Patient",
                                      min_poll_seconds=0.05, max_poll_seconds=0.3)
    triggers = []
    for op in (sensor, export):
        ctx = {"ti": SimpleNamespace(task_id=op.task_id, dag_id="security", run_id="manual__s", map_index=-1),
               "run_id": "manual__s"}
        try:
            op.execute(ctx)
        except TaskDeferred as deferred:
            triggers.append(deferred.trigger)
    assert len(triggers) == 2
    sb.app_state.store.create({"resourceType": "Patient", "name": [{"family": "Triggerphi"}], "gender": "male"})

    async def events() -> list[Any]:
        return list(await asyncio.wait_for(asyncio.gather(*(anext(t.run()) for t in triggers)), 60))

    for event in asyncio.run(events()):
        assert event.payload["status"] in ("changed", "complete"), event.payload


@pytest.fixture
def artifacts(sb: SandboxServer, modmed_connections: Any, airflow_db: str, capfd: Any, caplog: Any,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Everything the runs left behind (computed once per module, by the first test that asks)."""
    if not _ARTIFACTS:
        _ARTIFACTS.update(_run_everything(sb, capfd, caplog, tmp_path_factory.mktemp("security-runs")))
    return _ARTIFACTS


def secrets_of(sb: SandboxServer, conns: dict[str, Any]) -> dict[str, str]:
    """label -> secret value: the seeded secrets, the wrong ones, every PEM line, every token issued."""
    found = {f"seeded {k}": v for k, v in SEEDED.items()}
    for conn_id in ("modmed_wrong_password", "modmed_wrong_key", "modmed_wrong_secret"):
        conn = conns[conn_id]
        found[f"{conn_id}"] = conn["password"] if conn_id.endswith("password") else \
            conn["extra"].get("api_key") if conn_id.endswith("key") else conn["extra"]["client_secret"]
    cert = sb.credentials["certified"]
    for kind in ("private_key_jwt", "private_key_jwt_es384"):
        for n, line in enumerate(cert[kind]["private_key"].splitlines()):
            if len(line) > 8 and "PRIVATE KEY" not in line:
                found[f"{kind} PEM line {n}"] = line
    state = sb.app_state
    for n, token in enumerate(list(state.tokens)):
        found[f"bearer token {n}"] = token
    for n, token in enumerate(list(state.refresh_tokens)):
        found[f"refresh token {n}"] = token
    return found


def leaks(secrets: dict[str, str], haystacks: dict[str, str | bytes], marker: bool = True) -> dict[str, list[str]]:
    """Where each secret occurs. ``marker``: also flag the bare SEEDSECRET prefix (a partial leak); off for
    files anywhere under the temp dir, where a copy of this repository (its docs and tests name the marker)
    may lie: the seeded values themselves carry a random part, so they are only ever this run's."""
    out: dict[str, list[str]] = {}
    for where, text in haystacks.items():
        blob = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        for label, secret in secrets.items():
            if secret.encode() in blob:
                out.setdefault(where, []).append(label)
        if marker and MARKER.encode() in blob:
            out.setdefault(where, []).append(f"the marker {MARKER}")
    return out


def test_the_runs_ran(artifacts: dict[str, Any], figures: Figures) -> None:
    states = artifacts["states"]
    failing = {k for k in states if "modmed_wrong" in k}
    assert {k for k, v in states.items() if v != "success"} == failing, states
    assert all(states[k] == "failed" for k in failing)
    assert "Created Patient" in artifacts["output"]  # the capture saw the task logs
    figures.record(dag_runs=len(states), failed_on_purpose=len(failing))


def test_no_secret_in_logs_xcom_rendered_fields_or_exceptions(sb: SandboxServer, modmed_connections: Any,
                                                              artifacts: dict[str, Any], figures: Figures) -> None:
    secrets = secrets_of(sb, modmed_connections)
    tokens = sum(1 for k in secrets if "token" in k)
    # a bearer token per auth method (tokens are cached per credential set across runs) and the refresh token
    assert sum(1 for k in secrets if k.startswith("bearer")) >= 5 and any(k.startswith("refresh") for k in secrets)
    assert sum(1 for k in secrets if "PEM" in k) >= 30
    # the scanner finds what it looks for (a planted secret, and the bare marker)
    assert leaks(secrets, {"planted": f"x {secrets['bearer token 0']} y"}) == {"planted": ["bearer token 0"]}
    haystacks: dict[str, str | bytes] = {"task output": artifacts["output"], **artifacts["stored"],
                                         "exception messages": "\n".join(artifacts["messages"])}
    assert leaks(secrets, haystacks) == {}
    assert leaks(secrets, {"task output at INFO": artifacts["info_output"]}) == {}
    assert "Created Patient" in artifacts["info_output"]  # the INFO lines are there
    # the failures said what was wrong, without the secret
    messages = "\n".join(artifacts["messages"])
    assert "invalid_grant" in messages and "Forbidden (403)" in messages and "invalid_client" in messages
    figures.record(secrets_scanned=len(secrets), bearer_and_refresh_tokens=tokens,
                   pem_lines=sum(1 for k in secrets if "PEM" in k),
                   bytes_scanned=sum(len(v) for v in haystacks.values()),
                   task_output_bytes_debug=len(artifacts["output"]),
                   task_output_bytes_info=len(artifacts["info_output"]),
                   leaks=0)


def test_no_secret_in_any_file_airflow_wrote(sb: SandboxServer, modmed_connections: Any, artifacts: dict[str, Any],
                                             figures: Figures) -> None:
    home = Path(os.environ["AIRFLOW_HOME"])
    files = _files(home)
    assert any(p.endswith("airflow.db") for p in files)
    secrets = secrets_of(sb, modmed_connections)
    assert leaks(secrets, dict(files)) == {}
    figures.record(files=len(files), bytes_scanned=sum(len(v) for v in files.values()), leaks=0)


def test_no_private_key_written_to_disk(sb: SandboxServer, artifacts: dict[str, Any], figures: Figures) -> None:
    cert = sb.credentials["certified"]
    assert cert["private_key_jwt"]["private_key_path"] is None  # the sandbox's own keys live in memory
    lines = {f"{kind} line {n}": line for kind in ("private_key_jwt", "private_key_jwt_es384")
             for n, line in enumerate(cert[kind]["private_key"].splitlines())
             if len(line) > 8 and "PRIVATE KEY" not in line}
    roots = [Path(os.environ["AIRFLOW_HOME"]), Path(tempfile.gettempdir())]
    files = _files(*roots, since=STARTED - 1)
    hits = leaks(lines, dict(files), marker=False)
    assert hits == {}
    figures.record(files_scanned=len(files), pem_lines=len(lines), hits=0)


def test_no_secret_or_token_in_files_written_during_the_runs(sb: SandboxServer, modmed_connections: Any,
                                                             artifacts: dict[str, Any], figures: Figures) -> None:
    """Output folders, bulk state files and manifests, change-detection state: no secret and no token."""
    files = _files(Path(os.environ["AIRFLOW_HOME"]), Path(tempfile.gettempdir()), since=STARTED - 1)
    assert any("_state" in p for p in files)  # the bulk export's state file is among them
    assert leaks(secrets_of(sb, modmed_connections), dict(files), marker=False) == {}
    figures.record(files_scanned=len(files), bytes_scanned=sum(len(v) for v in files.values()), leaks=0)


def _phi(sb: SandboxServer) -> set[str]:
    values: set[str] = set()
    for row in sb.app_state.store.search("Patient", [], count=10_000)[0]:
        p = row.body
        for name in p.get("name") or ():
            values.add(" ".join([*name.get("given", []), name.get("family", "")]))
            if len(name.get("family", "")) >= 6:
                values.add(name["family"])
        values.update(i["value"] for i in p.get("identifier") or () if len(str(i.get("value", ""))) >= 5)
        values.update(t["value"] for t in p.get("telecom") or ())
        if p.get("birthDate") and p["birthDate"] != "1970-01-01":
            values.add(p["birthDate"])
    return values


def test_no_patient_data_in_logs_or_xcom(sb: SandboxServer, artifacts: dict[str, Any], figures: Figures) -> None:
    phi = _phi(sb) | {"Phileakfamily", "Phileakgiven", "MRN-SEC-4242", "1959-07-23", "555-0142-99", "555-0143-77"}
    haystacks = {"task output": artifacts["output"], **artifacts["stored"]}
    found = {where: sorted(v for v in phi if v in text) for where, text in haystacks.items()}
    assert {k: v for k, v in found.items() if v} == {}
    figures.record(phi_values_scanned=len(phi), leaks=0)
