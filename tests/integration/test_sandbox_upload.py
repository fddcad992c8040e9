"""The three-step document upload on the sandbox: Binary -> presigned PUT -> DocumentReference."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration

#: the extension of a Binary answer carrying the presigned URL, stated literally (not imported from profile.py)
PRESIGNED_EXT = "https://www.modmed.com/fhir/StructureDefinition/presigned-url"


@pytest.fixture
def api(sb: SandboxServer) -> httpx.Client:
    p = sb.credentials["proprietary"]
    token = httpx.post(p["token_url"], headers={"x-api-key": p["api_key"]}, data={
        "grant_type": "password", "username": p["username"], "password": p["password"]}).json()["access_token"]
    return httpx.Client(base_url=p["fhir_base"] + "/",
                        headers={"x-api-key": p["api_key"], "Authorization": f"Bearer {token}"})


def presigned(api: httpx.Client) -> str:
    resp = api.post("Binary", json={"resourceType": "Binary", "contentType": "application/pdf"})
    assert resp.status_code == 201
    return next(e["valueUrl"] for e in resp.json()["extension"] if e["url"] == PRESIGNED_EXT)


def document(url: str) -> dict[str, Any]:
    return {"resourceType": "DocumentReference", "status": "current",
            "identifier": [{"system": "filename", "value": "scan.pdf"}],
            "type": {"text": "application/pdf"},
            "category": [{"coding": [{"system": "https://www.modmed.com/fhir/document-category",
                                      "code": "Insurance Card"}]}],
            "subject": {"reference": "Patient/1"},
            "content": [{"attachment": {"url": url, "contentType": "application/pdf"}}]}


def test_upload_round_trip_on_another_host(sb: SandboxServer, api: httpx.Client) -> None:
    url = presigned(api)
    assert url.startswith(sb.storage_url) and not url.startswith(sb.api_url)
    assert httpx.put(url, content=b"%PDF-1.4 test").status_code == 200
    assert httpx.get(url).content == b"%PDF-1.4 test"
    created = api.post("DocumentReference", json=document(url))
    assert created.status_code == 201, created.text
    assert api.get(f"DocumentReference/{created.json()['id']}").json()["content"][0]["attachment"]["url"] == url


def test_storage_refuses_credentials(sb: SandboxServer, api: httpx.Client) -> None:
    url = presigned(api)
    before = sb.stats().get("auth_headers_seen_by_storage", 0)
    assert httpx.put(url, content=b"x", headers={"Authorization": "Bearer abc"}).status_code == 400
    assert httpx.put(url, content=b"x", headers={"x-api-key": "k"}).status_code == 400
    assert sb.stats()["auth_headers_seen_by_storage"] == before + 2


def test_tampered_and_expired_urls_are_refused(sb: SandboxServer, api: httpx.Client) -> None:
    url = presigned(api)
    assert httpx.put(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), content=b"x").status_code == 403
    sb.faults(expire_presigned=True)
    resp = httpx.put(url, content=b"x")
    assert resp.status_code == 403 and b"expired" in resp.content
    sb.reset_faults()
    fresh = presigned(api)
    assert httpx.put(fresh, content=b"x").status_code == 200


def test_presigned_urls_expire_after_their_ttl() -> None:
    with SandboxServer(patients=1, presign_ttl=1) as short:
        p = short.credentials["proprietary"]
        token = httpx.post(p["token_url"], headers={"x-api-key": p["api_key"]}, data={
            "grant_type": "password", "username": p["username"], "password": p["password"]}).json()["access_token"]
        client = httpx.Client(base_url=p["fhir_base"] + "/",
                              headers={"x-api-key": p["api_key"], "Authorization": f"Bearer {token}"})
        url = presigned(client)
        import time

        time.sleep(2.1)
        assert httpx.put(url, content=b"x").status_code == 403


def test_document_reference_needs_the_bytes_uploaded(api: httpx.Client) -> None:
    url = presigned(api)
    resp = api.post("DocumentReference", json=document(url))
    assert resp.status_code == 422
    assert "attachment.url" in resp.json()["issue"][0]["diagnostics"]
