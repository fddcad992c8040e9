"""The document upload operator inside real DAG runs against a sandbox of this module's own: the three
steps with no credentials at the storage host, a new presigned URL after expiry, one document per retried
task, and refusals before any network call."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client import documents as documents_mod
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import sandbox_connections

pytestmark = [pytest.mark.airflow, pytest.mark.integration]
Cap = pytest.CaptureFixture[str]
Log = pytest.LogCaptureFixture

DAGS = Path(__file__).parent / "dags" / "operators_documents.py"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(patients=4, seed=41, rate_limit_per_minute=100_000) as server:
        yield server


@pytest.fixture(scope="module")
def modmed_connections(sandbox: SandboxServer) -> Iterator[dict[str, dict[str, Any]]]:
    with sandbox_connections(sandbox) as conns:
        yield conns


def documents(sb: SandboxServer) -> set[str]:
    return {r["id"] for r in sb.app_state.store.ground_truth("DocumentReference") if not r["deleted"]}


def xcoms(run: Any) -> dict[tuple[str, str], Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id).all()
        return {(x.task_id, x.key): XComModel.deserialize_value(x) for x in rows}


def output(capfd: Cap, caplog: Log) -> str:
    """What the task logs printed (Airflow's structlog writes to stdout or stderr) and logged."""
    captured = capfd.readouterr()
    return captured.out + captured.err + caplog.text


def tries(run: Any) -> dict[str, int]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        return {ti.task_id: ti.try_number for ti in session.query(TaskInstance).filter(
            TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id)}


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    path = tmp_path / "insurance-card.pdf"
    path.write_bytes(b"%PDF-1.4 an insurance card " + os.urandom(8).hex().encode())
    return path


def test_upload_through_the_three_steps_and_push_the_id(sb: SandboxServer, run_dag: Any, scan: Path,
                                                         capfd: Cap, caplog: Log) -> None:
    before, stats = documents(sb), sb.stats()
    run = run_dag(DAGS, "modmed_op_upload", run_conf={"file_path": str(scan), "category": "Insurance Card",
                                                      "patient_id": 2, "description": "Card of Wanda Phi"})
    assert run.state == "success"
    out = xcoms(run)
    # (reading XCom rows straight from the DB turns a numeric string into a number: compare as text)
    doc_id = str(out[("upload", "document_reference_id")])
    assert documents(sb) - before == {doc_id}
    assert str(out[("pulled", "return_value")]) == doc_id
    result = out[("upload", "return_value")]
    assert result["id"] == doc_id and result["created"] and result["url_attempts"] == 1
    assert result["content_type"] == "application/pdf" and result["category"] == "INSURANCE"
    row = sb.app_state.store.get("DocumentReference", doc_id)
    assert row is not None
    stored = row.body
    assert stored["subject"] == {"reference": "Patient/2"} and stored["type"] == {"text": "application/pdf"}
    assert {"system": "filename", "value": "insurance-card.pdf"} in stored["identifier"]
    url = stored["content"][0]["attachment"]["url"]
    assert sb.app_state.uploads[url[len(sb.storage_url):].split("?", 1)[0]] == scan.read_bytes()
    now = sb.stats()
    assert now["uploads"] == stats.get("uploads", 0) + 1
    assert now.get("auth_headers_seen_by_storage", 0) == 0
    logs = output(capfd, caplog)
    assert "Uploaded the document (application/pdf" in logs and "Wanda Phi" not in logs


def test_an_expired_presigned_url_is_requested_again(sb: SandboxServer, run_dag: Any, scan: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    original = documents_mod.presigned_url
    fired: list[str] = []

    def expire_the_first(binary: dict[str, Any]) -> str:
        url = original(binary)
        if not fired:  # the URL expires between step 1 and step 2
            fired.append(url)
            sb.faults(expire_presigned=True)
        return url

    monkeypatch.setattr(documents_mod, "presigned_url", expire_the_first)  # dag.test runs tasks in-process
    issued, refused = sb.stats().get("presigned_issued", 0), sb.stats().get("storage_refused", 0)
    run = run_dag(DAGS, "modmed_op_upload", run_conf={"file_path": str(scan), "category": "LAB"})
    assert run.state == "success" and fired
    result = xcoms(run)[("upload", "return_value")]
    assert result["url_attempts"] == 2
    assert sb.stats()["presigned_issued"] == issued + 2 and sb.stats()["storage_refused"] == refused + 1
    assert sb.stats().get("auth_headers_seen_by_storage", 0) == 0
    row = sb.app_state.store.get("DocumentReference", result["id"])
    assert row is not None and row.body["content"][0]["attachment"]["url"] != fired[0]


def test_a_retried_upload_task_does_not_create_a_second_document(sb: SandboxServer, run_dag: Any,
                                                                  scan: Path) -> None:
    conf = {"file_path": str(scan), "category": "CONSENT", "patient_id": "3"}
    first = run_dag(DAGS, "modmed_op_upload", run_conf=conf)
    count, uploads = len(documents(sb)), sb.stats()["uploads"]
    again = run_dag(DAGS, "modmed_op_upload", run_conf=conf)
    assert xcoms(again)[("upload", "return_value")]["id"] == xcoms(first)[("upload", "return_value")]["id"]
    assert xcoms(again)[("upload", "return_value")]["created"] is False
    assert len(documents(sb)) == count and sb.stats()["uploads"] == uploads


@pytest.mark.parametrize(("conf", "needle"), [
    ({"file_path": "/nonexistent/scan.pdf"}, "file_path '/nonexistent/scan.pdf' does not exist"),
    ({"conn_id": "modmed_certified"}, "ModMed refuses create on Binary on the certified track: use a connection "
                                      "with track='proprietary'"),
    ({"patient_id": "1/2"}, "patient_id '1/2' is not a valid FHIR id"),
    ({"category": None}, "category is required"),
])
def test_bad_input_fails_before_any_network_call(sb: SandboxServer, run_dag: Any, scan: Path,
                                                 capfd: Cap, caplog: Log, conf: dict[str, Any],
                                                 needle: str) -> None:
    capfd.readouterr()
    before = sb.stats()["requests"]
    run = run_dag(DAGS, "modmed_op_upload", run_conf={"file_path": str(scan), **conf})
    assert run.state == "failed" and tries(run)["upload"] == 1
    assert sb.stats()["requests"] == before
    assert needle in output(capfd, caplog)


def test_an_unknown_category_fails_before_anything_is_uploaded(sb: SandboxServer, run_dag: Any, scan: Path,
                                                               capfd: Cap, caplog: Log) -> None:
    capfd.readouterr()
    issued = sb.stats().get("presigned_issued", 0)
    run = run_dag(DAGS, "modmed_op_upload", run_conf={"file_path": str(scan), "category": "Radiology"})
    assert run.state == "failed" and tries(run)["upload"] == 1
    assert sb.stats().get("presigned_issued", 0) == issued
    assert "'Radiology' is not in the firm's ValueSet/document-category" in output(capfd, caplog)
