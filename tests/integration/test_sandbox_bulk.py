"""Bulk Data export on the sandbox's certified track, over real HTTP, against the store's ground truth."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration

KICK_OFF = {"Accept": "application/fhir+json", "Prefer": "respond-async"}


@pytest.fixture
def cert(sb: SandboxServer) -> httpx.Client:
    c = sb.credentials["certified"]
    token = httpx.post(c["token_url"], data={"grant_type": "client_credentials", "scope": "system/*.read",
                                             **c["client_secret_post"]}).json()["access_token"]
    return httpx.Client(base_url=c["fhir_base"] + "/", headers={"Authorization": f"Bearer {token}"})


def run_export(cert: httpx.Client, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    kick = cert.get(path, params=params or {}, headers=KICK_OFF)
    assert kick.status_code == 202, kick.text
    status_url = kick.headers["content-location"]
    assert "/fhir-services/$export-status/" in status_url
    polls = 0
    while True:
        resp = cert.get(status_url, headers={"Accept": "application/json"})
        if resp.status_code == 200:
            manifest: dict[str, Any] = resp.json()
            manifest["_polls"] = polls
            manifest["_status_url"] = status_url
            return manifest
        assert resp.status_code == 202 and "retry-after" in resp.headers and "x-progress" in resp.headers
        polls += 1
        time.sleep(0.1)


def download(manifest: dict[str, Any], key: str = "output") -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in manifest.get(key, []):
        # no token: the manifest says requiresAccessToken false
        resp = httpx.get(item["url"], headers={"Accept": "application/fhir+ndjson"})
        assert resp.status_code == 200
        lines = [json.loads(line) for line in resp.text.splitlines() if line]
        assert len(lines) == item["count"] <= 1000
        assert all(r["resourceType"] == item["type"] for r in lines)
        out.setdefault(item["type"], []).extend(lines)
    return out


def test_system_export_round_trip_matches_the_store(sb: SandboxServer, cert: httpx.Client) -> None:
    manifest = run_export(cert, "$export", {"_type": "Patient,Immunization,Observation"})
    assert manifest["requiresAccessToken"] is False and manifest["_polls"] >= 1
    files = download(manifest)
    for rt in ("Patient", "Immunization", "Observation"):
        truth = {certified_id(r["id"]) for r in sb.app_state.store.ground_truth(rt) if not r["deleted"]}
        got = [r["id"] for r in files[rt]]
        assert len(got) == len(set(got)) and set(got) == truth
    assert all(item["url"].startswith(sb.storage_url) for item in manifest["output"])


def test_group_export_covers_only_members(sb: SandboxServer, cert: httpx.Client) -> None:
    group = cert.get("Group/cohort-a").json()
    members = {m["entity"]["reference"].split("/")[1] for m in group["member"]}
    files = download(run_export(cert, "Group/cohort-a/$export", {"_type": "Patient,Immunization"}))
    assert {p["id"] for p in files["Patient"]} == members
    assert {i["patient"]["reference"].split("/")[1] for i in files["Immunization"]} <= members


def test_since_exports_changes_and_deleted_entries(sb: SandboxServer, cert: httpx.Client) -> None:
    store = sb.app_state.store
    time.sleep(0.01)
    since = httpx.get(sb.credentials["certified"]["fhir_base"] + "/metadata").json()["date"]
    time.sleep(0.01)
    patient = store.get("Patient", "5")
    assert patient is not None
    store.update({**patient.body, "gender": "other"})
    store.delete("Patient", "6")
    manifest = run_export(cert, "Patient/$export", {"_since": since, "_type": "Patient"})
    files = download(manifest)
    assert [p["id"] for p in files["Patient"]] == [certified_id("5")]
    deleted = download(manifest, "deleted")["Bundle"]
    urls = [e["request"]["url"] for b in deleted for e in b["entry"]]
    assert urls == [f"Patient/{certified_id('6')}"]
    assert all(e["request"]["method"] == "DELETE" for b in deleted for e in b["entry"])


def test_cancel_then_status_is_404(cert: httpx.Client) -> None:
    kick = cert.get("$export", headers=KICK_OFF)
    status_url = kick.headers["content-location"]
    assert cert.delete(status_url).status_code == 202
    assert cert.get(status_url).status_code == 404


def test_kick_off_refusals(sb: SandboxServer, cert: httpx.Client) -> None:
    assert cert.get("$export", headers={"Accept": "application/fhir+json"}).status_code == 400  # no Prefer
    assert cert.get("$export", params={"_outputFormat": "text/csv"}, headers=KICK_OFF).status_code == 400
    assert cert.get("$export", params={"_type": "ChargeItem"}, headers=KICK_OFF).status_code == 400
    lenient = cert.get("$export", params={"_type": "ChargeItem,Patient"},
                       headers={**KICK_OFF, "Prefer": "respond-async, handling=lenient"})
    assert lenient.status_code == 202
    status_url = lenient.headers["content-location"]
    while (resp := cert.get(status_url)).status_code == 202:
        time.sleep(0.1)
    manifest = resp.json()
    assert [o["type"] for o in manifest["output"]] == ["Patient"]
    errors = download(manifest, "error")["OperationOutcome"]
    assert any("ChargeItem" in issue.get("diagnostics", "") for oo in errors for issue in oo["issue"])


def test_transient_5xx_while_polling_then_truncated_download(sb: SandboxServer, cert: httpx.Client) -> None:
    kick = cert.get("$export", params={"_type": "Patient"}, headers=KICK_OFF)
    status_url = kick.headers["content-location"]
    sb.faults(fail_next={"status": 503, "count": 2, "path": "$export-status"})
    assert [cert.get(status_url).status_code for _ in range(2)] == [503, 503]
    time.sleep(0.4)
    manifest = cert.get(status_url).json()
    sb.faults(truncate_downloads=1)
    url = manifest["output"][0]["url"]
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    assert len(httpx.get(url).text.splitlines()) == manifest["output"][0]["count"]


def test_bulk_chunk_lines_streams_one_http_chunk_per_line(sb: SandboxServer, cert: httpx.Client) -> None:
    manifest = run_export(cert, "$export", {"_type": "Patient"})
    url, count = manifest["output"][0]["url"], manifest["output"][0]["count"]
    large = httpx.get(url)
    assert large.headers["content-length"] == str(len(large.content))
    sb.faults(bulk_chunk_lines=1)
    try:
        with httpx.stream("GET", url) as resp:
            assert resp.headers["transfer-encoding"] == "chunked" and "content-length" not in resp.headers
            pieces = list(resp.iter_raw())
    finally:
        sb.faults(bulk_chunk_lines=0)
    assert b"".join(pieces) == large.content  # the same bytes, cut differently
    assert len(pieces) >= count > 1 and all(p.count(b"\n") <= 1 for p in pieces)  # a chunk never holds 2 lines
    sb.faults(bulk_gzip=True, bulk_chunk_lines=1)
    try:
        plain = httpx.get(url, headers={"Accept-Encoding": "identity"})
        with httpx.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as resp:
            assert resp.headers["content-encoding"] == "gzip" and "content-length" not in resp.headers
            decoded = list(resp.iter_bytes())
    finally:
        sb.faults(bulk_gzip=False, bulk_chunk_lines=0)
    assert "content-encoding" not in plain.headers and plain.content == large.content
    assert b"".join(decoded) == large.content and len(decoded) >= count


def test_bulk_error_count_fault_states_another_count_on_error_entries(sb: SandboxServer, cert: httpx.Client) -> None:
    sb.faults(bulk_error_count=37)
    try:
        kick = cert.get("$export", params={"_type": "ChargeItem,Patient"},
                        headers={**KICK_OFF, "Prefer": "respond-async, handling=lenient"})
        status_url = kick.headers["content-location"]
        while (resp := cert.get(status_url)).status_code == 202:
            time.sleep(0.1)
    finally:
        sb.faults(bulk_error_count=-1)
    manifest = resp.json()
    (error,) = manifest["error"]
    assert error["count"] == 37 and len(httpx.get(error["url"]).text.splitlines()) == 1
    assert manifest["output"][0]["count"] == len(httpx.get(manifest["output"][0]["url"]).text.splitlines())
