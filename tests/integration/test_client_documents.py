"""The upload flow against the sandbox over real HTTP, on both faces: three steps, no credentials at the
storage host, a new presigned URL after `expire_presigned`, and no second document on a retry."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.documents import UPLOAD_KEY_SYSTEM, aupload_document, upload_document
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.errors import CapabilityError, ConfigurationError
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.conftest import sandbox_fixtures

pytestmark = pytest.mark.integration


#: this module writes documents: its own small sandbox keeps the session sandbox as seeded
own_sandbox, sb = sandbox_fixtures(patients=5, seed=21)


def config(sb: SandboxServer) -> ClientConfig:
    p = sb.credentials["proprietary"]
    return ClientConfig(track="proprietary", fhir_base=p["fhir_base"], firm="apiportal", api_key=p["api_key"],
                        username=p["username"], password=p["password"], max_retries=2)


def live_docs(sb: SandboxServer) -> list[dict[str, Any]]:
    return [r for r in sb.app_state.store.ground_truth("DocumentReference") if not r["deleted"]]


def stored(sb: SandboxServer, doc_id: str) -> dict[str, Any]:
    row = sb.app_state.store.get("DocumentReference", doc_id)
    assert row is not None
    return row.body


def test_upload_through_the_three_steps(sb: SandboxServer) -> None:
    before, stats = len(live_docs(sb)), sb.stats()
    with FhirClient(config(sb)) as client:
        result = upload_document(client, b"%PDF-1.4 one", filename="one.pdf", category="Insurance Card",
                                 patient_id="2", description="front and back")
    after = sb.stats()
    assert result.created and result.url_attempts == 1 and result.content_type == "application/pdf"
    assert len(live_docs(sb)) == before + 1
    body = stored(sb, result.id)
    assert body["subject"] == {"reference": "Patient/2"}
    assert body["category"][0]["coding"][0]["code"] == "INSURANCE"
    assert {"system": "filename", "value": "one.pdf"} in body["identifier"]
    url = body["content"][0]["attachment"]["url"]
    assert url.startswith(sb.storage_url)
    assert sb.app_state.uploads[url[len(sb.storage_url):].split("?", 1)[0]] == b"%PDF-1.4 one"
    assert after.get("uploads", 0) == stats.get("uploads", 0) + 1
    assert after.get("auth_headers_seen_by_storage", 0) == 0


def test_an_expired_presigned_url_is_requested_again(sb: SandboxServer) -> None:
    fired: list[str] = []

    def expire_after_first_binary(response: httpx.Response) -> None:
        if response.request.method == "POST" and response.request.url.path.endswith("/Binary") and not fired:
            fired.append("x")
            sb.faults(expire_presigned=True)  # the URL just issued is now expired

    issued = sb.stats().get("presigned_issued", 0)
    with FhirClient(config(sb)) as client:
        client.http.event_hooks["response"] = [expire_after_first_binary]
        result = upload_document(client, b"%PDF-1.4 two", filename="two.pdf", category="LAB")
    assert fired and result.created and result.url_attempts == 2
    assert sb.stats()["presigned_issued"] == issued + 2
    assert sb.stats().get("storage_refused", 0) >= 1
    assert sb.stats().get("auth_headers_seen_by_storage", 0) == 0
    assert "subject" not in stored(sb, result.id)  # no patient: the unassociated queue


def test_a_retried_upload_returns_the_first_document(sb: SandboxServer) -> None:
    with FhirClient(config(sb)) as client:
        first = upload_document(client, b"%PDF-1.4 three", filename="three.pdf", category="LAB", patient_id="3")
        count, uploads = len(live_docs(sb)), sb.stats()["uploads"]
        again = upload_document(client, b"%PDF-1.4 three", filename="three.pdf", category="LAB", patient_id="3")
        other = upload_document(client, b"%PDF-1.4 three", filename="three.pdf", category="LAB", patient_id="4")
    assert (again.id, again.created) == (first.id, False)
    assert other.id != first.id
    assert len(live_docs(sb)) == count + 1  # only the other patient's document is new
    assert sb.stats()["uploads"] == uploads + 1
    keys = [i["value"] for i in stored(sb, first.id)["identifier"] if i["system"] == UPLOAD_KEY_SYSTEM]
    assert keys == [first.idempotency_key]


def test_a_lost_document_reference_answer_is_not_a_second_document(sb: SandboxServer) -> None:
    """The DocumentReference POST is written, its answer dropped: the conditional resend matches it."""
    before = len(live_docs(sb))
    dropped = sb.stats().get("dropped", 0)

    fired: list[str] = []

    def drop_the_document_answer(request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path.endswith("/DocumentReference") and not fired:
            fired.append("x")
            sb.faults(drop_next=1)

    with FhirClient(config(sb)) as client:
        client.http.event_hooks["request"] = [*client.http.event_hooks["request"], drop_the_document_answer]
        result = upload_document(client, b"%PDF-1.4 four", filename="four.pdf", category="LAB", patient_id="1")
    assert sb.stats()["dropped"] >= dropped + 1
    assert len(live_docs(sb)) == before + 1
    assert stored(sb, result.id)["content"][0]["attachment"]["title"] == "four.pdf"


def test_the_async_face_runs_the_same_flow(sb: SandboxServer) -> None:
    async def go() -> Any:
        async with AsyncFhirClient(config(sb)) as client:
            return await aupload_document(client, b"PNG bytes", filename="photo.png",
                                          category={"code": "CLINICAL"}, patient_id="5")

    result = asyncio.run(go())
    assert result.created and result.content_type == "image/png"
    assert stored(sb, result.id)["category"][0]["coding"][0]["code"] == "CLINICAL"
    assert sb.stats().get("auth_headers_seen_by_storage", 0) == 0


def test_refusals_before_any_request(sb: SandboxServer) -> None:
    c = sb.credentials["certified"]["client_secret_post"]
    cert = ClientConfig(track="certified", fhir_base=sb.credentials["certified"]["fhir_base"], firm="apiportal",
                        auth_method="client_secret", client_id=c["client_id"], client_secret=c["client_secret"])
    before = sb.stats()["requests"]
    with FhirClient(cert) as client, pytest.raises(CapabilityError, match="track='proprietary'"):
        upload_document(client, b"x", filename="x.pdf", category="LAB")
    with FhirClient(config(sb)) as client, pytest.raises(ConfigurationError, match="patient_id"):
        upload_document(client, b"x", filename="x.pdf", category="LAB", patient_id="../1")
    assert sb.stats()["requests"] == before


def test_a_server_ignoring_the_identifier_search_fails_clearly(sb: SandboxServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_modmed.errors import ModMedError
    from airflow_provider_modmed.sandbox import fhir_api

    monkeypatch.delitem(fhir_api.SEARCH_PARAMS, "identifier")  # the server now ignores identifier=
    before = len(live_docs(sb))
    with FhirClient(config(sb)) as client, pytest.raises(ModMedError, match="ignores the identifier"):
        upload_document(client, b"%PDF-1.4 new", filename="new.pdf", category="CLINICAL", patient_id="3")
    assert len(live_docs(sb)) == before  # nothing created, and no other patient's document returned
