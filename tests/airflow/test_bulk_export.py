"""ModMedBulkExportOperator and ModMedBulkExportTrigger for real: dag.test() runs the deferrable path through
Airflow's trigger machinery; a trigger rebuilt from serialize() resumes the same export; kill, timeout and
retry behave; the nightly example DAG chains transactionTime."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client.bulk import (
    BulkExportClient,
    ExportErrorsReported,
    ExportRequest,
    NdjsonSink,
    PollPolicy,
)
from airflow_provider_modmed.client.fhir import FhirClient
from airflow_provider_modmed.errors import CapabilityError
from airflow_provider_modmed.hooks.modmed import ModMedHook
from airflow_provider_modmed.operators._common import safe_segment
from airflow_provider_modmed.operators.bulk_export import ModMedBulkExportOperator
from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.server import SandboxServer
from airflow_provider_modmed.triggers.bulk_export import ModMedBulkExportTrigger

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

DAGS = Path(__file__).parent / "dags"
EXAMPLE = Path(__file__).resolve().parents[2] / "example_dags" / "modmed_nightly_bulk_export.py"
FAST = {"min_poll_seconds": 0.05, "max_poll_seconds": 0.2}


@pytest.fixture(scope="module")
def bulk_sandbox() -> Iterator[SandboxServer]:
    """A sandbox of this module's own (these tests change resources), with fast export jobs."""
    with SandboxServer(patients=30, seed=23, export_seconds=0.2, rate_limit_per_minute=100_000) as server:
        yield server


@pytest.fixture
def bsb(bulk_sandbox: SandboxServer, modmed_connections: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> Iterator[SandboxServer]:
    """Point the certified and proprietary connections at this module's sandbox."""
    conns = bulk_sandbox.credentials["airflow_connections"]
    monkeypatch.setenv("AIRFLOW_CONN_MODMED_CERTIFIED", json.dumps(conns["modmed_certified"]))
    monkeypatch.setenv("AIRFLOW_CONN_MODMED_DEFAULT", json.dumps(conns["modmed_default"]))
    monkeypatch.setattr(auth_mod, "_caches", {})
    bulk_sandbox.reset_faults()
    yield bulk_sandbox
    bulk_sandbox.reset_faults()
    assert bulk_sandbox.stats().get("auth_headers_seen_by_storage", 0) == 0


def live_ids(sb: SandboxServer, rt: str) -> set[str]:
    """The certified ids of the live resources of ``rt`` (what an export holds; the store has proprietary ids)."""
    return {certified_id(r["id"]) for r in sb.app_state.store.ground_truth(rt) if not r["deleted"]}


def stored_ids(result: dict[str, Any], rt: str) -> list[str]:
    from airflow.sdk import ObjectStoragePath

    folder = ObjectStoragePath(result["run_folder"])
    return [json.loads(line)["id"] for name in result["output"].get(rt, {}).get("files", [])
            for line in (folder / name).read_text().splitlines()]


def context(run_id: str = "manual__2026-01-01T00:00:00+00:00", task_id: str = "export",
            **extra: Any) -> Any:
    return {"ti": SimpleNamespace(task_id=task_id, map_index=-1), "run_id": run_id, **extra}


def operator(tmp_path: Path, **kwargs: Any) -> ModMedBulkExportOperator:
    values: dict[str, Any] = {"task_id": "export", "modmed_conn_id": "modmed_certified",
                              "output_folder": f"file://{tmp_path}", **FAST, **kwargs}
    return ModMedBulkExportOperator(**values)


def deferred_trigger(op: ModMedBulkExportOperator, ctx: dict[str, Any]) -> ModMedBulkExportTrigger:
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx)
    trigger = deferred.value.trigger
    assert isinstance(trigger, ModMedBulkExportTrigger) and deferred.value.method_name == "execute_complete"
    return trigger


def status_of(sb: SandboxServer, status_url: str) -> int:
    with FhirClient(ModMedHook("modmed_certified").config) as fhir:
        import httpx

        return fhir.send(httpx.Request("GET", status_url)).status_code


# -- the deferrable path through Airflow's machinery ---------------------------------------------

def test_dag_runs_the_deferrable_export_through_the_trigger(bsb: SandboxServer, run_dag: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODMED_BULK_TEST_OUTPUT", f"file://{tmp_path}")
    runs: list[dict[str, Any]] = []
    original = ModMedBulkExportTrigger.run

    def counting_run(self: ModMedBulkExportTrigger) -> Any:
        runs.append(self.serialize()[1])
        return original(self)

    monkeypatch.setattr(ModMedBulkExportTrigger, "run", counting_run)
    started = bsb.stats().get("exports_started", 0)
    run = run_dag(DAGS / "bulk_export_dag.py", "modmed_bulk_export_test")
    assert run.state == "success"
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = {ti.task_id: ti for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id)}
        results = {t: ti.xcom_pull(task_ids=t, session=session) for t, ti in tis.items()}
    assert {t: ti.state for t, ti in tis.items()} == {"deferred_group_export": "success",
                                                      "worker_patient_export": "success"}
    # the trigger ran (inline, rebuilt from its serialized kwargs) for the deferrable task only
    assert len(runs) == 1 and set(runs[0]) == {"status_url", "modmed_conn_id", "min_poll_seconds",
                                               "max_poll_seconds", "max_poll_errors", "cancel_on_kill"}
    assert bsb.stats()["exports_started"] - started == 2
    group = results["deferred_group_export"]
    cohort = bsb.app_state.store.get("Group", "cohort-a")
    assert cohort is not None
    members = {certified_id(m["entity"]["reference"].split("/")[1]) for m in cohort.body["member"]}
    assert set(stored_ids(group, "Patient")) == members and group["output"]["Patient"]["count"] == len(members)
    assert group["run_folder"].endswith(f"/{safe_segment(run.run_id)}/deferred_group_export")
    worker = results["worker_patient_export"]
    assert sorted(stored_ids(worker, "Patient")) == sorted(live_ids(bsb, "Patient"))
    assert len(json.dumps(group)) < 2000 and "resourceType" not in json.dumps(group)  # a small XCom


def test_a_rebuilt_trigger_resumes_the_same_export(bsb: SandboxServer, tmp_path: Path) -> None:
    """A triggerer restart: the first trigger is stopped mid-poll (cleanup, not on_kill), a new one is
    rebuilt from serialize() and continues polling the same status URL."""
    from airflow.sdk._shared.module_loading import import_string

    bsb.app_state.config.export_seconds = 1.0
    try:
        op = operator(tmp_path, export_level="Patient", types="Patient")
        first = deferred_trigger(op, context())
        started = bsb.stats()["exports_started"]

        async def interrupted() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(first.run()), timeout=0.3)
            await first.cleanup()

        asyncio.run(interrupted())
        assert status_of(bsb, first.status_url) == 202  # not cancelled by the restart
        classpath, kwargs = first.serialize()
        rebuilt = import_string(classpath)(**kwargs)
        event = asyncio.run(anext(rebuilt.run()))
    finally:
        bsb.app_state.config.export_seconds = 0.2
    assert event.payload["status"] == "complete" and event.payload["status_url"] == first.status_url
    assert event.payload["files"] >= 1 and bsb.stats()["exports_started"] == started  # no new kick-off
    result = op.execute_complete(context(), event=event.payload)
    assert sorted(stored_ids(result, "Patient")) == sorted(live_ids(bsb, "Patient"))


def test_trigger_event_for_a_gone_job_and_on_kill_cancels(bsb: SandboxServer, tmp_path: Path) -> None:
    op = operator(tmp_path, types="Patient")
    trigger = deferred_trigger(op, context())
    asyncio.run(trigger.on_kill())  # the user killed the deferred task
    assert status_of(bsb, trigger.status_url) == 404
    event = asyncio.run(anext(trigger.run()))
    assert event.payload["status"] == "gone"
    # resuming on "gone" kicks off again (bounded by max_restarts) and defers anew
    from airflow.sdk.exceptions import TaskDeferred

    started = bsb.stats()["exports_started"]
    with pytest.raises(TaskDeferred) as again:
        op.execute_complete(context(), event=event.payload)
    assert again.value.trigger.status_url != trigger.status_url
    assert bsb.stats()["exports_started"] == started + 1


# -- pre-flight, kill, timeout, retry ------------------------------------------------------------

def test_proprietary_connection_fails_before_any_network_call(bsb: SandboxServer, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    before = bsb.stats().get("requests", 0)
    with pytest.raises(AirflowFailException, match="certified") as failed:  # no retry is spent on it
        operator(tmp_path, modmed_conn_id="modmed_default").execute(context())
    assert isinstance(failed.value.__cause__, CapabilityError)
    assert bsb.stats().get("requests", 0) == before
    assert not list(tmp_path.iterdir())  # nothing written either


def test_a_type_not_readable_on_the_certified_track_fails_pre_flight(bsb: SandboxServer, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    before = bsb.stats().get("requests", 0)
    with pytest.raises(AirflowFailException, match="ChargeItem is not readable on the certified track") as failed:
        operator(tmp_path, types="Patient,ChargeItem", lenient=True).execute(context())
    assert isinstance(failed.value.__cause__, CapabilityError)
    assert bsb.stats().get("requests", 0) == before and not list(tmp_path.iterdir())


def test_a_bad_output_folder_fails_without_retries(bsb: SandboxServer) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="must be absolute"):
        ModMedBulkExportOperator(task_id="export", modmed_conn_id="modmed_certified",
                                 output_folder="relative/folder").execute(context())


def test_on_kill_cancels_and_a_retry_kicks_off_anew(bsb: SandboxServer, tmp_path: Path) -> None:
    op = operator(tmp_path, types="Patient")
    trigger = deferred_trigger(op, context())
    op.on_kill()
    assert status_of(bsb, trigger.status_url) == 404
    retry = operator(tmp_path, types="Patient")
    second = deferred_trigger(retry, context())
    assert second.status_url != trigger.status_url


def test_deferral_timeout_cancels_the_export(bsb: SandboxServer, tmp_path: Path) -> None:
    from airflow.sdk.bases.operator import TriggerFailureReason
    from airflow.sdk.exceptions import TaskDeferralTimeout

    op = operator(tmp_path, types="Patient")
    trigger = deferred_trigger(op, context())
    resumed = operator(tmp_path, types="Patient")  # a resumed task is a new process
    with pytest.raises(TaskDeferralTimeout):
        resumed.resume_execution("__fail__", {"error": TriggerFailureReason.TRIGGER_TIMEOUT}, context())
    assert status_of(bsb, trigger.status_url) == 404


def test_killed_mid_download_then_retried(bsb: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Try 1 dies after storing two files; try 2 resumes the saved job (no kick-off, no poll wait), fetches
    only the rest, and the stored ids equal the ground truth with no duplicate."""
    types = "Patient,Condition,Encounter,Immunization,Observation"
    op = operator(tmp_path, types=types, max_concurrent_downloads=1)
    trigger = deferred_trigger(op, context())
    event = asyncio.run(anext(trigger.run())).payload
    started = bsb.stats()["exports_started"]
    commits = {"n": 0}
    original = NdjsonSink.commit

    def dying_commit(self: NdjsonSink) -> Any:
        commits["n"] += 1
        if commits["n"] == 3:
            raise KeyboardInterrupt("worker killed")  # not an Exception: nothing catches it
        return original(self)

    monkeypatch.setattr(NdjsonSink, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        op.execute_complete(context(), event=event)
    monkeypatch.setattr(NdjsonSink, "commit", original)
    stored = len(list(tmp_path.rglob("_state/files/*.json")))
    assert 2 <= stored < 5
    downloads = bsb.stats()["bulk_downloads"]
    result = operator(tmp_path, types=types).execute(context())  # try 2: straight to the downloads
    assert bsb.stats()["exports_started"] == started
    assert bsb.stats()["bulk_downloads"] - downloads == result["files"] - stored  # stored files skipped
    for rt in types.split(","):
        ids = stored_ids(result, rt)
        assert len(ids) == len(set(ids)) and set(ids) == live_ids(bsb, rt), rt
    assert not list(tmp_path.rglob("*.part"))


def test_error_policy_fail_keeps_the_files(bsb: SandboxServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a token whose scopes cover Patient only: the server skips Immunization and says so in an error file
    narrow = json.loads(json.dumps(bsb.credentials["airflow_connections"]["modmed_certified"]))
    narrow["extra"]["scope"] = "system/Patient.read"
    monkeypatch.setenv("AIRFLOW_CONN_MODMED_CERTIFIED_NARROW", json.dumps(narrow))
    types = "Patient,Immunization"
    op = operator(tmp_path, modmed_conn_id="modmed_certified_narrow", types=types, deferrable=False)
    with pytest.raises(ExportErrorsReported, match="forbidden"):
        op.execute(context())
    errors = list(tmp_path.rglob("error/OperationOutcome.0001.ndjson"))
    assert len(errors) == 1 and list(tmp_path.rglob("output/Patient.0001.ndjson"))
    assert not list(tmp_path.rglob("output/Immunization.*"))
    # the retry does not export again; the policy still applies; "warn" accepts the partial export
    assert operator(tmp_path, modmed_conn_id="modmed_certified_narrow", types=types,
                    error_policy="warn").execute(context())["errors"]["fatal"] == 1


def test_incremental_since_defaults_to_the_data_interval_start(bsb: SandboxServer, tmp_path: Path) -> None:
    import pendulum

    start = pendulum.datetime(2026, 1, 2, tz="UTC")
    op = operator(tmp_path, incremental=True)
    assert op._export_request(context(data_interval_start=start)).since == "2026-01-02T00:00:00Z"
    explicit = operator(tmp_path, incremental=True, since="2025-12-31T00:00:00+01:00")
    assert explicit._export_request(context(data_interval_start=start)).since == "2025-12-31T00:00:00+01:00"
    assert operator(tmp_path)._export_request(context(data_interval_start=start)).since is None
    with pytest.raises(ValueError, match="error_policy"):
        operator(tmp_path, error_policy="explode")


def test_lineage_names_types_and_folders(bsb: SandboxServer, tmp_path: Path) -> None:
    op = operator(tmp_path, types="Patient", deferrable=False)
    result = op.execute(context())
    inputs, outputs = op.lineage_datasets()
    port = httpx.URL(bsb.credentials["api_url"]).port
    # the namespace every ModMed operator uses: one per practice
    assert inputs == [(f"modmed://127.0.0.1:{port}/apiportal", "Patient")]
    assert outputs == [("file", f"{tmp_path}/manual__2026-01-01T00_00_00_00_00/export/output/Patient")]
    assert result["run_folder"] == f"file://{tmp_path}/manual__2026-01-01T00_00_00_00_00/export"


# -- the example DAG: a nightly incremental chain --------------------------------------------------

def test_nightly_example_chains_transaction_time(bsb: SandboxServer, run_dag: Any, tmp_path: Path) -> None:
    import pendulum

    conf = {"output_base": f"file://{tmp_path}", "types": "Patient,Immunization"}
    first = run_dag(EXAMPLE, "modmed_nightly_bulk_export", logical_date=pendulum.datetime(2026, 2, 1, tz="UTC"),
                    run_conf=conf)
    assert first.state == "success"
    watermark = json.loads((tmp_path / "modmed_nightly_bulk_export" / "_watermark.json").read_text())
    store = bsb.app_state.store
    row = store.get("Immunization", min(r["id"] for r in store.ground_truth("Immunization") if not r["deleted"]))
    assert row is not None
    store.update({**row.body, "status": "entered-in-error"})
    second = run_dag(EXAMPLE, "modmed_nightly_bulk_export", logical_date=pendulum.datetime(2026, 2, 2, tz="UTC"),
                     run_conf=conf)
    assert second.state == "success"
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = session.query(TaskInstance).filter(TaskInstance.run_id == second.run_id,
                                                TaskInstance.task_id == "export").one()
        result = ti.xcom_pull(task_ids="export", session=session)
    assert stored_ids(result, "Immunization") == [certified_id(row.id)] and stored_ids(result, "Patient") == []
    newer = json.loads((tmp_path / "modmed_nightly_bulk_export" / "_watermark.json").read_text())
    assert newer["transaction_time"] == result["transaction_time"] > watermark["transaction_time"]


def test_client_export_matches_operator_layout(bsb: SandboxServer, tmp_path: Path) -> None:
    """The Airflow-free client writes the same run folder the operator does (one implementation)."""
    with FhirClient(ModMedHook("modmed_certified").config) as fhir:
        result = BulkExportClient(fhir, poll=PollPolicy(min_wait=0.05, max_wait=0.2)).export(
            ExportRequest(types=("Patient",)), tmp_path)
    assert (tmp_path / "output" / "Patient.0001.ndjson").exists() and (tmp_path / "SHA256SUMS").exists()
    assert result["output"]["Patient"]["count"] == len(live_ids(bsb, "Patient"))
