"""The certified track serves ids of its own, over real HTTP (issue 14, item 1): reads, searches, references
inside resources, Bundle links and bulk export files carry certified ids; a proprietary id names nothing there
(404, or no match), and the other way round; a DAG joins the two tracks by the Patient's MRN, not by id.
The mapping itself: tests/unit/test_sandbox_certified_ids.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client.fhir import FhirClient
from airflow_provider_modmed.errors import NotFoundError
from airflow_provider_modmed.hooks.connection import config_from_connection
from airflow_provider_modmed.sandbox.certified_ids import certified_id, certify, proprietary_id
from airflow_provider_modmed.sandbox.seed import MRN_SYSTEM
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.unit.test_seed import references  # every reference string in a FHIR JSON tree

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sb() -> Iterator[SandboxServer]:
    """A sandbox of this module's own: a test adds a Provenance and a Group."""
    with SandboxServer(patients=12, seed=5, export_seconds=0.1, rate_limit_per_minute=100_000) as server:
        yield server


def client(sb: SandboxServer, conn_id: str) -> FhirClient:
    """The provider's client for one of the sandbox's ready-made connections, as the hook maps it."""
    conn = sb.credentials["airflow_connections"][conn_id]
    return FhirClient(config_from_connection(host=conn.get("host"), port=conn.get("port"), login=conn.get("login"),
                                             password=conn.get("password"), extra=conn["extra"]))


@pytest.fixture(scope="module")
def prop(sb: SandboxServer) -> Iterator[FhirClient]:
    with client(sb, "modmed_default") as c:
        yield c


@pytest.fixture(scope="module")
def cert(sb: SandboxServer) -> Iterator[FhirClient]:
    with client(sb, "modmed_certified") as c:
        yield c


@pytest.fixture(scope="module")
def raw(sb: SandboxServer) -> Iterator[httpx.Client]:
    """Plain HTTP to the certified FHIR base with a bearer token (status codes, links, POST _search)."""
    c = sb.credentials["certified"]
    token = httpx.post(c["token_url"], data={"grant_type": "client_credentials", "scope": "system/*.read",
                                             **c["client_secret_post"]}).json()["access_token"]
    with httpx.Client(base_url=c["fhir_base"] + "/", headers={"Authorization": f"Bearer {token}"}) as http:
        yield http


def assert_certified_reference(reference: str) -> None:
    """``Type/id`` whose id is a certified id: one the certified track can read, never a proprietary one."""
    _, _, rid = reference.rpartition("/")
    assert proprietary_id(rid) is not None, reference


def stored_patient_of(sb: SandboxServer, resource_type: str, stored_id: str) -> str:
    row = sb.app_state.store.get(resource_type, stored_id)
    assert row is not None
    return str(row.body.get("subject", row.body.get("patient", {}))["reference"]).split("/", 1)[1]


# -- read --------------------------------------------------------------------------------------------

def test_a_read_serves_the_certified_id_and_a_proprietary_id_is_404(sb: SandboxServer, prop: FhirClient,
                                                                    cert: FhirClient, raw: httpx.Client) -> None:
    patient = cert.read("Patient", certified_id("3"))
    assert patient["id"] == "1.120182.2.3"
    assert patient == certify(prop.read("Patient", "3"))  # the same record, in the certified track's ids
    with pytest.raises(NotFoundError):
        cert.read("Patient", "3")  # a proprietary id names nothing on the certified track
    with pytest.raises(NotFoundError):
        prop.read("Patient", "1.120182.2.3")  # and the other way round
    refused = raw.get("Patient/3")
    assert refused.status_code == 404 and refused.json()["issue"][0]["diagnostics"] == "Resource Patient/3 is not known"
    unknown = raw.get("Patient/1.120182.2.999")  # a certified id of no record: named as asked
    assert unknown.status_code == 404 and "Patient/1.120182.2.999" in unknown.json()["issue"][0]["diagnostics"]
    payer = cert.read("Organization", "1.120182.2.pay.7225")  # composite ids: pay|7225
    assert payer["id"] == "1.120182.2.pay.7225" and payer["name"] == prop.read("Organization", "pay|7225")["name"]
    assert raw.get("Organization/pay%7C7225").status_code == 404
    immunization = sb.app_state.store.ground_truth("Immunization")[0]["id"]  # certified-only: dotted on both sides
    assert cert.read("Immunization", immunization)["id"] == immunization
    # writes stay refused on the certified track whatever the id
    assert raw.put("Patient/3", json={"resourceType": "Patient", "id": "3"}).status_code == 405


# -- search ------------------------------------------------------------------------------------------

def test_search_parameters_take_certified_ids(sb: SandboxServer, prop: FhirClient, cert: FhirClient,
                                              raw: httpx.Client) -> None:
    stored = next(p["id"] for p in prop.search("Patient") if list(prop.search("Encounter",
                                                                               params={"patient": p["id"]})))
    cid = certified_id(stored)
    expected = sorted(certified_id(e["id"]) for e in prop.search("Encounter", params={"patient": stored}))
    by_patient = list(cert.search("Encounter", params={"patient": cid}))
    assert sorted(e["id"] for e in by_patient) == expected
    assert {e["subject"]["reference"] for e in by_patient} == {f"Patient/{cid}"}
    for params in ({"subject": f"Patient/{cid}"}, {"subject": cid}, {"patient": f"Patient/{cid}"}):
        assert sorted(e["id"] for e in cert.search("Encounter", params=params)) == expected, params
    assert sorted(e["id"] for e in cert.search("Encounter", params={"_id": ",".join(expected)})) == expected
    # the proprietary ids match nothing on the certified track
    for params in ({"patient": stored}, {"subject": f"Patient/{stored}"}):
        assert list(cert.search("Encounter", params=params)) == [], params
    assert list(cert.search("Patient", params={"_id": stored})) == []
    posted = raw.post("Encounter/_search", data={"patient": cid})
    assert sorted(e["resource"]["id"] for e in posted.json()["entry"]) == expected


def test_bundle_full_urls_and_links_carry_certified_ids(sb: SandboxServer, raw: httpx.Client) -> None:
    base = sb.credentials["certified"]["fhir_base"]
    owners = [stored_patient_of(sb, "Observation", r.id) for r in sb.app_state.store.search("Observation",
                                                                                            count=1000)[0]]
    stored = max(set(owners), key=owners.count)
    patient = certified_id(stored)
    seen: list[str] = []
    page: dict[str, Any] | None = raw.get("Observation", params={"patient": patient, "_count": 1}).json()
    while page is not None:
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert f"patient={patient}" in links["self"]
        for entry in page["entry"]:
            assert entry["fullUrl"] == f"{base}/Observation/{entry['resource']['id']}"
            seen.append(entry["resource"]["id"])
        page = raw.get(links["next"]).json() if "next" in links else None
    truth = [r.id for r in sb.app_state.store.search("Observation", count=1000)[0]
             if stored_patient_of(sb, "Observation", r.id) == stored]
    assert len(truth) > 1 and sorted(seen) == sorted(certified_id(i) for i in truth)


# -- references inside resources ---------------------------------------------------------------------

@pytest.mark.parametrize("resource_type", ["Encounter", "DiagnosticReport", "Observation", "Immunization",
                                           "Coverage", "DocumentReference", "Location", "Condition"])
def test_every_reference_in_a_certified_resource_is_a_certified_id(cert: FhirClient, resource_type: str) -> None:
    resources = list(cert.search(resource_type))
    refs = [ref for resource in resources for ref in references(resource)]
    assert refs, resource_type
    for ref in refs:
        assert_certified_reference(ref)
    first = refs[0].split("/")
    if first[0] in ("Patient", "Practitioner", "Organization", "Observation", "Location", "Encounter"):
        assert cert.read(first[0], first[1])["id"] == first[1]  # it resolves on the certified track


def test_provenance_targets_and_group_members_point_at_certified_ids(sb: SandboxServer, cert: FhirClient) -> None:
    created = httpx.post(f"{sb.api_url}/_sandbox/resources/Provenance", json={
        "target": [{"reference": "Patient/4"}, {"reference": "Encounter/1"}], "recorded": "2026-01-01T00:00:00Z",
        "agent": [{"who": {"reference": "Practitioner/1"}}]}).json()
    provenance = cert.read("Provenance", certified_id(created["id"]))
    assert [t["reference"] for t in provenance["target"]] == [f"Patient/{certified_id('4')}",
                                                              f"Encounter/{certified_id('1')}"]
    assert provenance["agent"][0]["who"]["reference"] == f"Practitioner/{certified_id('1')}"
    members = [m["entity"]["reference"] for m in cert.read("Group", "cohort-a")["member"]]
    assert members and members[0] == f"Patient/{certified_id('1')}"


# -- bulk export -------------------------------------------------------------------------------------

KICK_OFF = {"Accept": "application/fhir+json", "Prefer": "respond-async"}


def export(raw: httpx.Client, path: str, types: str) -> dict[str, list[dict[str, Any]]]:
    kick = raw.get(path, params={"_type": types}, headers=KICK_OFF)
    assert kick.status_code == 202, kick.text
    while (status := raw.get(kick.headers["content-location"])).status_code == 202:
        time.sleep(0.05)
    out: dict[str, list[dict[str, Any]]] = {}
    for item in status.json()["output"]:
        body = httpx.get(item["url"])
        assert int(body.headers["content-length"]) == len(body.content)  # the translated lines, counted right
        out.setdefault(item["type"], []).extend(json.loads(line) for line in body.text.splitlines())
    return out


def test_bulk_files_carry_certified_ids(sb: SandboxServer, cert: FhirClient, raw: httpx.Client) -> None:
    members = {m["entity"]["reference"].split("/")[1] for m in cert.read("Group", "cohort-a")["member"]}
    files = export(raw, "Group/cohort-a/$export", "Patient,Encounter,Immunization,Observation")
    assert {p["id"] for p in files["Patient"]} == members
    assert {e["subject"]["reference"].split("/")[1] for e in files["Encounter"]} <= members
    every = [r for rs in files.values() for r in rs]
    for resource in every:
        assert proprietary_id(resource["id"]) is not None, resource["id"]
        for ref in references(resource):
            assert_certified_reference(ref)
    # the same records as searches of the certified track return
    assert sorted(e["id"] for e in files["Encounter"]) == sorted(
        e["id"] for member in members for e in cert.search("Encounter", params={"patient": member}))


def test_a_group_export_path_takes_the_certified_group_id(sb: SandboxServer, raw: httpx.Client) -> None:
    group = httpx.post(f"{sb.api_url}/_sandbox/resources/Group", json={
        "type": "person", "actual": True, "member": [{"entity": {"reference": "Patient/5"}},
                                                      {"entity": {"reference": "Patient/6"}}]}).json()
    assert group["id"].isdigit()  # stored under a numeric (proprietary-shaped) id
    files = export(raw, f"Group/{certified_id(group['id'])}/$export", "Patient")
    assert sorted(p["id"] for p in files["Patient"]) == [certified_id("5"), certified_id("6")]
    refused = raw.get(f"Group/{group['id']}/$export", headers=KICK_OFF)
    assert refused.status_code == 404
    assert refused.json()["issue"][0]["diagnostics"] == f"Group/{group['id']} is not known"


# -- joining the tracks ------------------------------------------------------------------------------

def mrn(patient: dict[str, Any]) -> str:
    return next(i["value"] for i in patient["identifier"] if i["system"] == MRN_SYSTEM)


def test_a_dag_joins_the_tracks_by_mrn(prop: FhirClient, cert: FhirClient) -> None:
    """docs/sandbox.md, "Ids on the two tracks": match by identifier, never by id."""
    proprietary = {mrn(p): p for p in prop.search("Patient")}
    certified = {mrn(p): p for p in cert.search("Patient")}
    assert proprietary.keys() == certified.keys() and len(proprietary) >= 12
    for key, p in proprietary.items():
        c = certified[key]
        assert c["id"] != p["id"] and c["id"] == certified_id(p["id"])
        assert (c["name"], c["birthDate"]) == (p["name"], p["birthDate"])
    # one patient at a time: a search by identifier on the other track
    key, p = next(iter(proprietary.items()))
    (match,) = cert.search("Patient", params={"identifier": f"{MRN_SYSTEM}|{key}"})
    assert match["id"] == certified[key]["id"]
    # and what hangs off the patient joins through it: the same encounters under each track's ids
    mine = sorted(e["period"]["start"] for e in prop.search("Encounter", params={"patient": p["id"]}))
    theirs = sorted(e["period"]["start"] for e in cert.search("Encounter", params={"patient": match["id"]}))
    assert mine == theirs
