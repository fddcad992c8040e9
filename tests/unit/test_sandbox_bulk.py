"""The sandbox's Bulk Data v2 export server (``sandbox/bulk.py``), driven directly and via a tiny app."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from airflow_provider_modmed.sandbox.bulk import JOB_TTL_SECONDS, NDJSON, BulkExports, TruncatedDownload
from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.http import FhirError
from airflow_provider_modmed.sandbox.state import SandboxConfig, SandboxState
from airflow_provider_modmed.sandbox.store import Store

FHIR_BASE = "http://api.test/certified/apiportal/fhir/r4"
OLD = "2024-01-01T00:00:00.000Z"
SINCE = "2025-01-01T00:00:00Z"
ALL_READ = ("system/*.read",)


def res(resource_type: str, rid: str, **fields: Any) -> dict[str, Any]:
    """A hand-made resource last updated in 2024."""
    meta = {"versionId": "1", "lastUpdated": OLD}
    return {"resourceType": resource_type, "id": rid, "meta": meta, **fields}


def obs(rid: str, patient: str) -> dict[str, Any]:
    return res("Observation", rid, status="final", subject={"reference": f"Patient/{patient}"})


def make_state(resources: list[dict[str, Any]], export_seconds: float = 0.0) -> SandboxState:
    store = Store()
    store.load(resources)
    state = SandboxState(SandboxConfig(export_seconds=export_seconds, export_retry_after=3), store, None)
    state.storage_url = "http://testserver"
    state.exports = BulkExports(state)
    return state


@pytest.fixture
def state() -> Iterator[SandboxState]:
    """Three patients, three observations, a group of two, an organization and an appointment;
    then (after ``SINCE``) one observation updated and one deleted."""
    st = make_state([
        res("Patient", "p1"), res("Patient", "p2"), res("Patient", "p3"),
        obs("o1", "p1"), obs("o2", "p2"), obs("o3", "p3"),
        res("Group", "g1", type="person", actual=True,
            member=[{"entity": {"reference": "Patient/p1"}}, {"entity": {"reference": "Patient/p2"}}]),
        res("Organization", "org1", name="Clinic"),
        # proprietary-only type with a patient link: never exported
        res("Appointment", "a1", status="booked", participant=[{"actor": {"reference": "Patient/p1"}}]),
    ])
    row = st.store.get("Observation", "o1")
    assert row is not None
    st.store.update({**row.body, "status": "amended"})
    st.store.delete("Observation", "o3")
    yield st
    st.store.close()


def kick(state: SandboxState, level: str = "system", group_id: str | None = None,
         params: dict[str, str] | None = None, prefer: str = "respond-async",
         accept: str = "application/fhir+json", scopes: tuple[str, ...] = ALL_READ) -> str:
    """Kick off; return the job id (after checking the status URL's shape)."""
    exports: BulkExports = state.exports
    url = exports.kick_off(level=level, group_id=group_id, params=params or {}, prefer=prefer, accept=accept,
                           request_url=f"{FHIR_BASE}/$export", fhir_base=FHIR_BASE, scopes=scopes)
    prefix = f"{FHIR_BASE}/fhir-services/$export-status/"
    assert url.startswith(prefix)
    return url[len(prefix):]


def manifest(state: SandboxState, job_id: str) -> dict[str, Any]:
    response = state.exports.status(job_id)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert "Expires" in response.headers
    return json.loads(bytes(response.body))


def counts(items: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item["type"]] = out.get(item["type"], 0) + item["count"]
    return out


@pytest.fixture
def client(state: SandboxState) -> TestClient:
    return storage_client(state)


def storage_client(state: SandboxState) -> TestClient:
    """The storage listener's bulk route, minus the presign check (tested separately)."""
    async def bulk_file(request: Request) -> Response:
        return await state.exports.download(request, request.path_params["job"], request.path_params["name"])
    return TestClient(Starlette(routes=[Route("/bulk/{job}/{name}", bulk_file, methods=["GET"])]))


def lines_of(client: TestClient, item: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.get(item["url"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(NDJSON)
    assert int(response.headers["content-length"]) == len(response.content)
    text = response.text
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.split("\n")[:-1]]
    assert len(lines) == item["count"]
    assert all(line["resourceType"] == item["type"] for line in lines)
    return lines


# -- levels -------------------------------------------------------------------------------------
def test_system_level_exports_every_certified_type(state: SandboxState, client: TestClient) -> None:
    job = kick(state)
    m = manifest(state, job)
    assert m["requiresAccessToken"] is False
    assert m["request"] == f"{FHIR_BASE}/$export"
    assert m["transactionTime"].endswith("Z")
    assert m["error"] == []
    assert "deleted" not in m
    assert counts(m["output"]) == {"Patient": 3, "Observation": 2, "Group": 1, "Organization": 1}
    ids = {item["type"]: [r["id"] for r in lines_of(client, item)] for item in m["output"]}
    assert ids["Observation"] == ["o1", "o2"]
    assert ids["Patient"] == ["p1", "p2", "p3"]
    assert all(urlsplit(item["url"]).path == f"/bulk/{job}/{item['type']}.1.ndjson" for item in m["output"])


def test_patient_level_exports_the_patient_compartment(state: SandboxState, client: TestClient) -> None:
    m = manifest(state, kick(state, "Patient"))
    assert counts(m["output"]) == {"Patient": 3, "Observation": 2}
    assert m["output"][0]["type"] == "Patient"


def test_group_level_exports_members_only(state: SandboxState, client: TestClient) -> None:
    m = manifest(state, kick(state, "Group", "g1"))
    assert counts(m["output"]) == {"Patient": 2, "Observation": 2}
    by_type = {item["type"]: item for item in m["output"]}
    assert [r["id"] for r in lines_of(client, by_type["Patient"])] == ["p1", "p2"]
    assert {r["subject"]["reference"] for r in lines_of(client, by_type["Observation"])} == \
        {"Patient/p1", "Patient/p2"}


def test_unknown_group_is_404(state: SandboxState) -> None:
    with pytest.raises(FhirError) as err:
        kick(state, "Group", "nope")
    assert err.value.status == 404


# -- _since and deleted ---------------------------------------------------------------------------
def test_since_filters_and_reports_deleted(state: SandboxState, client: TestClient) -> None:
    m = manifest(state, kick(state, params={"_since": SINCE}))
    assert counts(m["output"]) == {"Observation": 1}
    assert [r["id"] for r in lines_of(client, m["output"][0])] == ["o1"]
    assert len(m["deleted"]) == 1
    assert m["deleted"][0]["type"] == "Bundle"
    assert urlsplit(m["deleted"][0]["url"]).path.endswith("/deleted.1.ndjson")
    (bundle,) = lines_of(client, m["deleted"][0])
    assert bundle["type"] == "transaction"
    assert bundle["entry"] == [{"request": {"method": "DELETE", "url": "Observation/o3"}}]


def test_since_with_offset_and_fraction(state: SandboxState) -> None:
    m = manifest(state, kick(state, params={"_since": "2025-01-01T02:00:00.5+02:00"}))
    assert counts(m["output"]) == {"Observation": 1}


def test_group_deleted_only_for_members(state: SandboxState) -> None:
    m = manifest(state, kick(state, "Group", "g1", params={"_since": SINCE}))
    assert counts(m["output"]) == {"Observation": 1}
    assert m["deleted"] == []  # o3 belonged to p3, not a member


@pytest.mark.parametrize("since", ["2025-01-01", "2025-01-01T00:00:00", "2025-01-01T00:00:00 00:00",
                                   "yesterday", "2025-13-01T00:00:00Z"])
def test_bad_since_is_400(state: SandboxState, since: str) -> None:
    with pytest.raises(FhirError) as err:
        kick(state, params={"_since": since})
    assert err.value.status == 400


# -- _type, _typeFilter, unknown params, lenient ---------------------------------------------------
def test_type_restricts_output(state: SandboxState) -> None:
    m = manifest(state, kick(state, params={"_type": "Observation, Patient"}))
    assert [item["type"] for item in m["output"]] == ["Observation", "Patient"]
    assert counts(m["output"]) == {"Observation": 2, "Patient": 3}


def test_unsupported_type_strict_is_400(state: SandboxState) -> None:
    with pytest.raises(FhirError) as err:
        kick(state, params={"_type": "Patient,Appointment"})
    assert err.value.status == 400
    assert "Appointment" in err.value.diagnostics


def test_unsupported_type_lenient_goes_to_error_file(state: SandboxState, client: TestClient) -> None:
    job = kick(state, params={"_type": "Patient,Appointment,Nope"}, prefer="respond-async, handling=lenient")
    m = manifest(state, job)
    assert counts(m["output"]) == {"Patient": 3}
    assert len(m["error"]) == 1
    assert m["error"][0]["type"] == "OperationOutcome"
    assert m["error"][0]["count"] == 2
    issues = [line["issue"][0] for line in lines_of(client, m["error"][0])]
    assert ["Appointment" in i["diagnostics"] for i in issues] == [True, False]
    assert "Nope" in issues[1]["diagnostics"]
    assert {i["severity"] for i in issues} == {"error"}


def test_type_filter_and_unknown_params(state: SandboxState) -> None:
    for params in ({"_typeFilter": "Observation?status=final"}, {"_elements": "id"}):
        with pytest.raises(FhirError) as err:
            kick(state, params=params)
        assert err.value.status == 400
    params = {"_typeFilter": "Observation?status=final", "_elements": "id", "_type": "Patient"}
    job = kick(state, params=params, prefer='respond-async; wait=10, handling="lenient"')
    m = manifest(state, job)
    assert counts(m["output"]) == {"Patient": 3}
    assert m["error"][0]["count"] == 2


def test_header_and_format_validation(state: SandboxState) -> None:
    bad: list[dict[str, Any]] = [
        {"prefer": ""}, {"prefer": "return=minimal"}, {"accept": "*/*"}, {"accept": ""},
        {"params": {"_outputFormat": "text/csv"}}, {"params": {"_outputFormat": "application/fhir ndjson"}},
        {"params": {"_type": " , "}},
    ]
    for kwargs in bad:
        with pytest.raises(FhirError) as err:
            kick(state, **kwargs)
        assert err.value.status == 400, kwargs
    for fmt in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        kick(state, params={"_outputFormat": fmt}, accept="application/fhir+json; charset=utf-8")


def test_scopes_skip_forbidden_types(state: SandboxState, client: TestClient) -> None:
    m = manifest(state, kick(state, scopes=("system/Patient.read",)))
    assert counts(m["output"]) == {"Patient": 3}
    issues = [line["issue"][0] for line in lines_of(client, m["error"][0])]
    assert {i["code"] for i in issues} == {"forbidden"}
    assert sorted(i["diagnostics"].split(" allow ")[1].split(";")[0] for i in issues) == \
        ["Group", "Observation", "Organization"]
    m = manifest(state, kick(state, params={"_type": "Observation,Patient"}, scopes=("system/Patient.rs",)))
    assert counts(m["output"]) == {"Patient": 3}
    (issue,) = [line["issue"][0] for line in lines_of(client, m["error"][0])]
    assert issue["severity"] == "error"
    assert "Observation" in issue["diagnostics"]


# -- file splitting, streaming, freezing --------------------------------------------------------
def test_files_split_at_1000_and_stream_in_order() -> None:
    state = make_state([res("Patient", "p1"), *(obs(str(i), "p1") for i in range(2500))])
    client = storage_client(state)
    m = manifest(state, kick(state, params={"_type": "Observation"}))
    assert [(urlsplit(i["url"]).path.rsplit("/", 1)[1], i["count"]) for i in m["output"]] == \
        [("Observation.1.ndjson", 1000), ("Observation.2.ndjson", 1000), ("Observation.3.ndjson", 500)]
    ids = [r["id"] for item in m["output"] for r in lines_of(client, item)]
    assert ids == [certified_id(str(i)) for i in range(2500)]  # the certified track's ids
    assert state.stats["bulk_downloads"] == 3


def test_content_is_frozen_at_completion(state: SandboxState, client: TestClient) -> None:
    m = manifest(state, kick(state, params={"_type": "Observation"}))
    state.store.create({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}})
    assert [r["id"] for r in lines_of(client, m["output"][0])] == ["o1", "o2"]
    again = manifest(state, kick(state, params={"_type": "Observation"}))
    assert again["output"][0]["count"] == 3


def test_presigned_urls_are_valid_for_an_hour(state: SandboxState) -> None:
    m = manifest(state, kick(state))
    for item in m["output"]:
        parts = urlsplit(item["url"])
        assert f"{parts.scheme}://{parts.netloc}" == state.storage_url
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert state.check_presigned(parts.path, q["X-Amz-Date"], q["X-Amz-Expires"], q["X-Amz-Signature"]) is None
        assert int(q["X-Amz-Expires"]) > time.time() + JOB_TTL_SECONDS - 60


def test_unknown_file_is_404(state: SandboxState, client: TestClient) -> None:
    job = kick(state)
    manifest(state, job)
    assert client.get(f"/bulk/{job}/Nope.1.ndjson").status_code == 404
    assert client.get("/bulk/nojob/Patient.1.ndjson").status_code == 404


# -- job lifecycle ------------------------------------------------------------------------------
def test_in_progress_then_complete(state: SandboxState) -> None:
    state.config.export_seconds = 30
    exports: BulkExports = state.exports
    now = [1000.0]
    exports.clock = lambda: now[0]
    job = kick(state)
    now[0] += 15
    response = exports.status(job)
    assert response.status_code == 202
    assert response.headers["Retry-After"] == "3"
    assert response.headers["X-Progress"] == "50% (2 of 4 types)"
    assert bytes(response.body) == b""
    now[0] += 15
    assert exports.status(job).status_code == 200
    now[0] += JOB_TTL_SECONDS
    assert exports.status(job).status_code == 404  # expired


def test_cancel_then_404(state: SandboxState, client: TestClient) -> None:
    job = kick(state)
    url = manifest(state, job)["output"][0]["url"]
    response = state.exports.cancel(job)
    assert response.status_code == 202
    assert json.loads(bytes(response.body))["issue"][0]["severity"] == "information"
    assert state.exports.status(job).status_code == 404
    assert state.exports.cancel(job).status_code == 404
    assert client.get(url).status_code == 404


def test_cancel_while_running(state: SandboxState) -> None:
    state.config.export_seconds = 60
    job = kick(state)
    assert state.exports.status(job).status_code == 202
    assert state.exports.cancel(job).status_code == 202
    assert state.exports.status(job).status_code == 404


# -- faults -------------------------------------------------------------------------------------
async def test_truncate_fault_cuts_the_body(state: SandboxState) -> None:
    m = manifest(state, kick(state, params={"_type": "Patient"}))
    job, name = urlsplit(m["output"][0]["url"]).path.rsplit("/", 2)[1:]
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    state.faults.truncate_downloads = 1
    response = await state.exports.download(Request(scope), job, name)
    assert isinstance(response, StreamingResponse)
    declared = int(response.headers["content-length"])
    received = bytearray()

    async def consume() -> None:
        async for chunk in response.body_iterator:
            received.extend(chunk if isinstance(chunk, bytes) else str(chunk).encode())

    with pytest.raises(TruncatedDownload):
        await consume()
    assert 0 < len(received) < declared
    assert state.faults.truncate_downloads == 0
    # the next download is whole again
    response = await state.exports.download(Request(scope), job, name)
    assert isinstance(response, StreamingResponse)
    body = b"".join([c if isinstance(c, bytes) else str(c).encode() async for c in response.body_iterator])
    assert len(body) == int(response.headers["content-length"])


def test_truncate_fault_over_http_fails_the_client(state: SandboxState, client: TestClient) -> None:
    m = manifest(state, kick(state, params={"_type": "Patient"}))
    state.faults.truncate_downloads = 1
    with pytest.raises(TruncatedDownload):
        client.get(m["output"][0]["url"])


def test_slow_download_still_completes(state: SandboxState, client: TestClient) -> None:
    m = manifest(state, kick(state, params={"_type": "Patient"}))
    state.faults.slow_download_ms = 20
    started = time.monotonic()
    assert len(lines_of(client, m["output"][0])) == 3
    assert time.monotonic() - started >= 0.02
