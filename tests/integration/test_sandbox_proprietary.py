"""The sandbox's proprietary track over real HTTP: auth, paging quirks, _lastUpdated, writes, refusals."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration


def grant(sb: SandboxServer, **form: str) -> httpx.Response:
    p = sb.credentials["proprietary"]
    data = {"grant_type": "password", "username": p["username"], "password": p["password"], **form}
    return httpx.post(p["token_url"], data=data, headers={"x-api-key": p["api_key"]})


@pytest.fixture
def api(sb: SandboxServer) -> httpx.Client:
    p = sb.credentials["proprietary"]
    token = grant(sb).json()["access_token"]
    return httpx.Client(base_url=p["fhir_base"] + "/",
                        headers={"x-api-key": p["api_key"], "Authorization": f"Bearer {token}"})


def all_pages(api: httpx.Client, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    resp = api.get(path, params=params)
    while True:
        assert resp.status_code == 200, resp.text
        body = resp.json()
        entries = body.get("entry") or []
        if not entries:
            return out
        out.extend(e["resource"] for e in entries)
        nxt = next(link["url"] for link in body["link"] if link["relation"] == "next")
        resp = api.get(nxt)


# -- auth -------------------------------------------------------------------------------------

def test_password_grant_answers_modmed_shape(sb: SandboxServer) -> None:
    body = grant(sb).json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "scope"}  # no expires_in
    assert body["scope"] == "apiportal"


def test_grant_refuses_bad_password_and_missing_or_unknown_api_key(sb: SandboxServer) -> None:
    assert grant(sb, password="wrong").status_code == 401
    p = sb.credentials["proprietary"]
    form = {"grant_type": "password", "username": p["username"], "password": p["password"]}
    assert httpx.post(p["token_url"], data=form).status_code == 403
    assert httpx.post(p["token_url"], data=form, headers={"x-api-key": "nope"}).status_code == 403


def test_refresh_keeps_the_refresh_token_and_issues_a_working_access_token(sb: SandboxServer) -> None:
    first = grant(sb).json()
    p = sb.credentials["proprietary"]
    refreshed = httpx.post(p["token_url"], headers={"x-api-key": p["api_key"]},
                           data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}).json()
    assert refreshed["refresh_token"] == first["refresh_token"]
    assert refreshed["access_token"] != first["access_token"]
    resp = httpx.get(p["fhir_base"] + "/Patient/1", headers={
        "x-api-key": p["api_key"], "Authorization": f"Bearer {refreshed['access_token']}"})
    assert resp.status_code == 200
    bad = httpx.post(p["token_url"], headers={"x-api-key": p["api_key"]},
                     data={"grant_type": "refresh_token", "refresh_token": "not-a-token"})
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_grant"


def test_expired_or_unknown_token_gets_401_and_missing_key_403(sb: SandboxServer, api: httpx.Client) -> None:
    assert api.get("Patient/1").status_code == 200
    sb.faults(expire_tokens=True)
    resp = api.get("Patient/1")
    assert resp.status_code == 401
    assert resp.json()["resourceType"] == "OperationOutcome"
    p = sb.credentials["proprietary"]
    assert httpx.get(p["fhir_base"] + "/Patient/1", headers={"x-api-key": p["api_key"],
                                                             "Authorization": "Bearer forged"}).status_code == 401
    assert httpx.get(p["fhir_base"] + "/Patient/1", headers={"Authorization": "Bearer x"}).status_code == 403


def test_client_credentials_token_url(sb: SandboxServer) -> None:
    p = sb.credentials["proprietary"]
    ok = httpx.post(p["keycloak_token_url"], data={"grant_type": "client_credentials",
                                                   "client_id": p["client_id"], "client_secret": p["client_secret"]})
    assert ok.status_code == 200 and ok.json()["expires_in"] == 900 and "refresh_token" not in ok.json()
    headers = {"x-api-key": p["api_key"], "Authorization": f"Bearer {ok.json()['access_token']}"}
    assert httpx.get(p["fhir_base"] + "/Patient/1", headers=headers).status_code == 200
    bad = httpx.post(p["keycloak_token_url"], data={"grant_type": "client_credentials",
                                                    "client_id": p["client_id"], "client_secret": "wrong"})
    assert bad.status_code == 401


# -- paging quirks ----------------------------------------------------------------------------

def test_total_is_per_page_and_last_page_still_links_next(sb: SandboxServer, api: httpx.Client) -> None:
    n_patients = sum(1 for r in sb.app_state.store.ground_truth("Patient") if not r["deleted"])
    pages = -(-n_patients // 7)
    last = api.get("Patient", params={"_count": 7, "page": pages}).json()
    assert last["total"] == len(last["entry"]) == n_patients - 7 * (pages - 1)
    assert any(link["relation"] == "next" for link in last["link"])  # the quirk
    after = api.get("Patient", params={"_count": 7, "page": pages + 1}).json()
    assert after["total"] == 0 and not after.get("entry")
    assert not any(link["relation"] == "next" for link in after["link"])
    ids = [r["id"] for r in all_pages(api, "Patient", {"_count": 7})]
    assert len(ids) == len(set(ids)) == n_patients


def test_pagination_optimization_disabled_gives_true_total_and_last(sb: SandboxServer, api: httpx.Client) -> None:
    n_patients = sum(1 for r in sb.app_state.store.ground_truth("Patient") if not r["deleted"])
    pages = -(-n_patients // 7)
    flag = {"Content-flag": "Pagination_optimization_disabled"}
    last = api.get("Patient", params={"_count": 7, "page": pages}, headers=flag).json()
    rels = {link["relation"] for link in last["link"]}
    assert last["total"] == n_patients and "last" in rels and "next" not in rels


@pytest.mark.parametrize(("resource", "maximum"), [("Patient", 50), ("DocumentReference", 10), ("Coverage", 100)])
def test_count_is_clamped_to_the_resource_maximum(api: httpx.Client, resource: str, maximum: int) -> None:
    body = api.get(resource, params={"_count": 1000}).json()
    assert len(body.get("entry") or []) <= maximum
    nxt = next(link["url"] for link in body["link"] if link["relation"] == "next")
    assert f"_count={maximum}" in nxt


def test_required_search_parameters(api: httpx.Client) -> None:
    resp = api.get("Account")
    assert resp.status_code == 400 and "patient" in resp.json()["issue"][0]["diagnostics"]
    assert api.get("Account", params={"patient": "1"}).status_code == 200
    assert api.get("Slot").status_code == 400


# -- _lastUpdated -----------------------------------------------------------------------------

def _day(instant: str) -> date:
    return datetime.fromisoformat(instant.replace("Z", "+00:00")).astimezone(timezone.utc).date()


@pytest.mark.parametrize("prefix", ["gt", "eq", "le"])
def test_last_updated_is_day_granular(sb: SandboxServer, api: httpx.Client, prefix: str) -> None:
    truth = [r for r in sb.app_state.store.ground_truth("Appointment") if not r["deleted"]]
    days = sorted(_day(r["lastUpdated"]) for r in truth)
    pivot = days[len(days) // 2]
    expected = {r["id"] for r in truth if {"gt": _day(r["lastUpdated"]) > pivot,
                                          "eq": _day(r["lastUpdated"]) == pivot,
                                          "le": _day(r["lastUpdated"]) <= pivot}[prefix]}
    got = {r["id"] for r in all_pages(api, "Appointment", {"_lastUpdated": f"{prefix}{pivot.isoformat()}"})}
    assert got == expected


def test_last_updated_range_combines(sb: SandboxServer, api: httpx.Client) -> None:
    low = date.today() - timedelta(days=200)
    high = date.today() - timedelta(days=100)
    truth = {r["id"] for r in sb.app_state.store.ground_truth("Patient")
             if not r["deleted"] and low < _day(r["lastUpdated"]) <= high}
    got = {r["id"] for r in all_pages(api, "Patient", {"_lastUpdated": [f"gt{low}", f"le{high}"]})}
    assert got == truth


@pytest.mark.parametrize("value", ["ge2025-01-01", "lt2025-01-01", "gt2025-01-01T10:00:00Z", "gt2025-01"])
def test_last_updated_refuses_other_prefixes_and_precisions(api: httpx.Client, value: str) -> None:
    resp = api.get("Patient", params={"_lastUpdated": value})
    assert resp.status_code == 400
    assert resp.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("resource", ["Condition", "AllergyIntolerance", "MedicationStatement",
                                      "DocumentReference", "ChargeItem"])
def test_last_updated_missing_on_documented_resources(api: httpx.Client, resource: str) -> None:
    assert api.get(resource, params={"_lastUpdated": "gt2025-01-01"}).status_code == 400
    assert api.get(resource).status_code == 200


# -- ids, writes, refusals --------------------------------------------------------------------

def test_composite_ids_read_url_encoded(api: httpx.Client) -> None:
    assert api.get("Organization/" + quote("pay|7225", safe="")).json()["id"] == "pay|7225"
    charge = api.get("ChargeItem", params={"_count": 1}).json()["entry"][0]["resource"]
    assert charge["id"].startswith("CHG|")
    assert api.get("ChargeItem/" + quote(charge["id"], safe="")).status_code == 200


def test_special_document_reads(sb: SandboxServer, api: httpx.Client) -> None:
    store = sb.app_state.store
    note = next(r for r in store.search("DocumentReference", count=500)[0] if r.body.get("context"))
    visit = note.body["context"]["encounter"][0]["reference"].split("/")[1]
    assert api.get("DocumentReference/" + quote(f"note|{visit}", safe="")).json()["id"] == note.id
    ccda = api.get("DocumentReference/" + quote("ccda|1", safe="")).json()
    assert ccda["subject"]["reference"] == "Patient/1"
    assert ccda["content"][0]["attachment"]["contentType"] == "application/xml"
    assert api.get("DocumentReference/" + quote("note|999999", safe="")).status_code == 404


def test_create_answers_location_and_empty_body_switch(sb: SandboxServer, api: httpx.Client) -> None:
    allergy = {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/1"},
               "code": {"text": "Peanut"},
               "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                              "code": "active"}]}}
    created = api.post("AllergyIntolerance", json=allergy)
    assert created.status_code == 201 and created.json()["meta"]["versionId"] == "1"
    assert created.headers["location"].endswith(f"/AllergyIntolerance/{created.json()['id']}/_history/1")
    sb.faults(empty_create_body=True)
    empty = api.post("AllergyIntolerance", json=allergy)
    assert empty.status_code == 201 and empty.content == b"" and "/AllergyIntolerance/" in empty.headers["location"]


@pytest.mark.parametrize("status", ["active", "Active", "resolved", "bogus"])
def test_condition_create_refuses_a_clinical_status_not_upper_case(sb: SandboxServer, api: httpx.Client,
                                                                  status: str) -> None:
    before = sb.app_state.store.count("Condition")
    condition = {"resourceType": "Condition", "subject": {"reference": "Patient/1"}, "code": {"text": "Asthma"},
                 "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                "code": status}]}}
    refused = api.post("Condition", json=condition)
    assert refused.status_code == 400
    issue = refused.json()["issue"][0]
    assert refused.json()["resourceType"] == "OperationOutcome" and issue["code"] == "code-invalid"
    assert "ACTIVE" in issue["diagnostics"]
    assert sb.app_state.store.count("Condition") == before
    condition["clinicalStatus"]["coding"][0]["code"] = "ACTIVE"
    created = api.post("Condition", json=condition)
    assert created.status_code == 201 and created.json()["clinicalStatus"]["coding"][0]["code"] == "ACTIVE"


def test_conditional_create_and_if_match(api: httpx.Client) -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "Testcase", "given": ["Ida"]}],
               "identifier": [{"system": "urn:test", "value": "cond-create-1"}]}
    first = api.post("Patient", json=patient, headers={"If-None-Exist": "identifier=urn:test|cond-create-1"})
    again = api.post("Patient", json=patient, headers={"If-None-Exist": "identifier=urn:test|cond-create-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    current = first.json()
    updated = api.put(f"Patient/{current['id']}", json={**current, "gender": "female"},
                      headers={"If-Match": 'W/"1"'})
    assert updated.status_code == 200 and updated.json()["meta"]["versionId"] == "2"
    stale = api.put(f"Patient/{current['id']}", json={**current, "gender": "male"}, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert api.get(f"Patient/{current['id']}").json()["gender"] == "female"
    assert api.delete(f"Patient/{current['id']}").status_code == 204
    assert api.get(f"Patient/{current['id']}").status_code == 410


def test_invalid_resource_is_422_with_the_path(api: httpx.Client) -> None:
    resp = api.post("Patient", json={"resourceType": "Patient", "gender": 12, "birthDate": "not-a-date"})
    assert resp.status_code == 422
    assert "birthDate" in resp.json()["issue"][0]["diagnostics"]
    assert api.post("Patient", json={"resourceType": "Condition"}).status_code == 400


@pytest.mark.parametrize(("method", "path", "status"), [
    ("PUT", "ChargeItem/CHG%7C1", 405),
    ("PUT", "Coverage/1", 405),
    ("GET", "Immunization", 403),
    ("GET", "Observation", 403),
    ("GET", "$export", 403),
    ("GET", "Patient/$export", 403),
    ("DELETE", "Appointment/1", 405),
    ("GET", "Nonsense", 404),
])
def test_refused_interactions_answer_operation_outcomes(api: httpx.Client, method: str, path: str,
                                                        status: int) -> None:
    resp = api.request(method, path, json={"resourceType": path.split("/")[0], "id": "1"} if method == "PUT" else None)
    assert resp.status_code == status, resp.text
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_charge_item_transaction_id_detects_duplicates(api: httpx.Client) -> None:
    charge = {"resourceType": "ChargeItem", "status": "billable", "subject": {"reference": "Patient/2"},
              "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]},
              "identifier": [{"system": "https://www.modmed.com/fhir/transaction-id", "value": "TX-test-dup"}]}
    first = api.post("ChargeItem", json=charge)
    assert first.status_code == 201 and first.json()["id"].startswith("CHG|")
    dup = api.post("ChargeItem", json=charge)
    assert dup.status_code == 409 and dup.json()["issue"][0]["code"] == "duplicate"


def test_coverage_create_returns_a_reconciliation_id(api: httpx.Client) -> None:
    cov = {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "Patient/3"},
           "payor": [{"reference": "Organization/pay|7225"}]}
    created = api.post("Coverage", json=cov).json()
    rec = next(e["valueString"] for e in created["extension"] if e["url"].endswith("reconciliation-id"))
    found = api.get("Coverage", params={"reconciliationId": rec}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [created["id"]]


def test_rate_limit_per_api_key_answers_429_without_retry_after() -> None:
    with SandboxServer(patients=2, rate_limit_per_minute=5) as small:
        p = small.credentials["proprietary"]
        token = grant(small).json()["access_token"]  # the grant spends one call of the budget
        headers = {"x-api-key": p["api_key"], "Authorization": f"Bearer {token}"}
        codes = [httpx.get(p["fhir_base"] + "/Patient/1", headers=headers).status_code for _ in range(6)]
        assert codes == [200, 200, 200, 200, 429, 429]
        resp = httpx.get(p["fhir_base"] + "/Patient/1", headers=headers)
        assert resp.status_code == 429 and "retry-after" not in resp.headers
        assert resp.json()["issue"][0]["code"] == "throttled"


def test_faults_inject_5xx_storms_and_dropped_connections(sb: SandboxServer, api: httpx.Client) -> None:
    sb.faults(fail_next={"status": 503, "count": 2})
    assert [api.get("Patient/1").status_code for _ in range(3)] == [503, 503, 200]
    sb.faults(rate_storm=2)
    assert [api.get("Patient/1").status_code for _ in range(3)] == [429, 429, 200]
    sb.faults(drop_next=1)
    with pytest.raises(httpx.RemoteProtocolError):
        api.get("Patient/1")
    assert api.get("Patient/1").status_code == 200


def test_answer_mangling_faults(sb: SandboxServer, api: httpx.Client) -> None:
    sb.faults(malformed_next=1)
    with pytest.raises(json.JSONDecodeError):
        api.get("Patient/1").json()
    sb.faults(wrong_type_next=1)
    assert api.get("Patient/1").json()["resourceType"] == "Basic"
    assert api.get("Patient/1").json()["resourceType"] == "Patient"
    assert sb.app_state.recent_requests[-1].endswith("/fhir/v2/Patient/1")
