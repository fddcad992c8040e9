"""The certified track's ids (``sandbox/certified_ids.py``): the mapping, the translation of resources and
Bundles, and the bulk files' fast path agreeing with it. Over HTTP: tests/integration/test_sandbox_certified_ids.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_modmed.sandbox.certified_ids import (
    SHARED_ID_PREFIX,
    certified_id,
    certified_reference,
    certify,
    certify_json,
    proprietary_id,
    proprietary_reference,
    served_id,
)
from airflow_provider_modmed.sandbox.seed import DOTTED_ID_PREFIX, generate

BASE = "http://127.0.0.1:1/certified/apiportal/fhir/r4"


@pytest.mark.parametrize(("stored", "certified"), [
    ("5", "1.120182.2.5"),
    ("120", "1.120182.2.120"),
    ("pay|7225", "1.120182.2.pay.7225"),
    ("CHG|12", "1.120182.2.CHG.12"),
    (f"{DOTTED_ID_PREFIX}17", f"{DOTTED_ID_PREFIX}17"),  # certified-only records keep their dotted ids
    ("all-patients", "all-patients"),
    ("cohort-a", "cohort-a"),
])
def test_the_mapping_and_its_inverse(stored: str, certified: str) -> None:
    assert certified_id(stored) == certified
    assert proprietary_id(certified) == stored
    assert served_id("certified", stored) == certified and served_id("proprietary", stored) == stored


@pytest.mark.parametrize("not_certified", ["5", "pay|7225", "1.120182.2.", "1.120182.2.x", "1.120182.2.a.b.c",
                                           "1.120182.2.5|6"])
def test_a_proprietary_or_malformed_id_names_nothing_on_the_certified_track(not_certified: str) -> None:
    assert proprietary_id(not_certified) is None


def test_references_relative_absolute_and_versioned() -> None:
    assert certified_reference("Patient/5") == "Patient/1.120182.2.5"
    assert certified_reference(f"{BASE}/Patient/5") == f"{BASE}/Patient/1.120182.2.5"
    assert certified_reference("Patient/5/_history/2") == "Patient/1.120182.2.5/_history/2"
    assert certified_reference("Organization/pay|7225") == "Organization/1.120182.2.pay.7225"
    for untouched in ("#med1", "urn:uuid:0d1c3a5e-1111-4aaa-8bbb-123456789abc", "Group/all-patients",
                      f"Immunization/{DOTTED_ID_PREFIX}3"):
        assert certified_reference(untouched) == untouched
    assert proprietary_reference("Patient/1.120182.2.5") == "Patient/5"
    assert proprietary_reference("Patient/5") is None


def test_a_bundle_match_and_include_entries_references_and_links() -> None:
    """Every entry of a searchset, ``search.mode`` match or include (``_include``), goes out in certified ids;
    contained resources keep their local ids; the id parameters of the links are certified too."""
    bundle: dict[str, Any] = {
        "resourceType": "Bundle", "type": "searchset", "total": 1,
        "link": [{"relation": "next", "url": f"{BASE}/Encounter?patient=5&status=finished&_getpagesoffset=1"},
                 {"relation": "self", "url": f"{BASE}/Encounter?_id=7,8&subject=Patient/5"}],
        "entry": [
            {"fullUrl": f"{BASE}/Encounter/7", "search": {"mode": "match"},
             "resource": {"resourceType": "Encounter", "id": "7", "subject": {"reference": "Patient/5"},
                          "participant": [{"individual": {"reference": "Practitioner/2"}}],
                          "contained": [{"resourceType": "Location", "id": "1"}],
                          "location": [{"location": {"reference": "#1"}}],
                          "identifier": [{"system": "urn:x", "value": "5"}]}},
            {"fullUrl": f"{BASE}/Patient/5", "search": {"mode": "include"},
             "resource": {"resourceType": "Patient", "id": "5",
                          "managingOrganization": {"reference": "Organization/1"}}},
        ]}
    out = certify(bundle)
    encounter, patient = (e["resource"] for e in out["entry"])
    assert [e["fullUrl"] for e in out["entry"]] == [f"{BASE}/Encounter/1.120182.2.7", f"{BASE}/Patient/1.120182.2.5"]
    assert encounter["id"] == "1.120182.2.7" and encounter["subject"]["reference"] == "Patient/1.120182.2.5"
    assert encounter["participant"][0]["individual"]["reference"] == "Practitioner/1.120182.2.2"
    assert encounter["contained"][0]["id"] == "1" and encounter["location"][0]["location"]["reference"] == "#1"
    assert encounter["identifier"] == [{"system": "urn:x", "value": "5"}]  # identifiers are not ids
    assert patient["id"] == "1.120182.2.5"
    assert patient["managingOrganization"]["reference"] == "Organization/1.120182.2.1"
    assert [link["url"] for link in out["link"]] == [
        f"{BASE}/Encounter?patient=1.120182.2.5&status=finished&_getpagesoffset=1",
        f"{BASE}/Encounter?_id=1.120182.2.7%2C1.120182.2.8&subject=Patient%2F1.120182.2.5"]
    assert bundle["entry"][0]["resource"]["id"] == "7"  # a copy: the input is left alone


def _slow(resource_id: str, text: str) -> str:
    del resource_id
    return json.dumps(certify(json.loads(text)), separators=(",", ":"))


def test_the_bulk_fast_path_agrees_with_certify_on_the_whole_seed() -> None:
    seen = 0
    for resource in generate(60, seed=2):
        text = json.dumps(resource, separators=(",", ":"))
        assert certify_json(resource["id"], text) == _slow(resource["id"], text), resource["id"]
        seen += 1
    assert seen > 500


@pytest.mark.parametrize("resource", [
    {"resourceType": "Patient", "name": [{"family": "Last"}], "id": "5"},  # the id written last
    {"resourceType": "Patient", "id": "5", "extension": [{"id": "5", "url": "urn:x", "valueString": "y"}]},
    {"resourceType": "Patient", "id": "5", "name": [{"family": "Ünïcode"}], "link": [
        {"other": {"reference": "Patient/6"}, "type": "seealso"}]},
    {"resourceType": "Observation", "id": "9", "contained": [{"resourceType": "Patient", "id": "9"}],
     "subject": {"reference": "#9"}},
    {"resourceType": "Group", "id": "all-patients", "member": [{"entity": {"reference": "Patient/1"}}]},
    {"resourceType": "Immunization", "id": f"{DOTTED_ID_PREFIX}4", "patient": {"reference": "Patient/3"}},
    {"resourceType": "Encounter", "id": "3", "subject": {"reference": f"{BASE}/Patient/5"}, "partOf": {
        "reference": "Encounter/2/_history/4"}, "basedOn": [{"reference": r} for r in (
            "Patient/5#x", "Patient/a#b|c", "Organization/pay|7225", "X/5", "urn:uuid:1/2/3", "#c", "patient/5",
            "Patient/1.120182.2.5", "Group/all-patients", "ServiceRequest/5|6")]},
])
def test_the_bulk_fast_path_agrees_with_certify_on_odd_resources(resource: dict[str, Any]) -> None:
    text = json.dumps(resource, separators=(",", ":"))
    assert certify_json(resource["id"], text) == _slow(resource["id"], text)
    assert json.loads(certify_json(resource["id"], text))["id"] == certified_id(resource["id"])


def test_the_prefix_is_not_the_dotted_one_of_certified_only_records() -> None:
    assert SHARED_ID_PREFIX != DOTTED_ID_PREFIX
    assert not any(r["id"].startswith(SHARED_ID_PREFIX) for r in generate(20, seed=0))  # one-to-one
