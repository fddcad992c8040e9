"""The sandbox's synthetic practice: deterministic, R4B-valid, referentially whole."""

from __future__ import annotations

import base64
import collections
import datetime
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from airflow_provider_modmed.sandbox.seed import (
    COMPOSITE_ID_TYPES,
    DOTTED_ID_PREFIX,
    MRN_SYSTEM,
    PAYER_IDS,
    generate,
)

# ModMed's systems, stated literally (the seed reads them from profile.py: a wrong fact there fails here)
APPOINTMENT_TYPE_SYSTEM = "https://www.modmed.com/fhir/appointment-type"
DOCUMENT_CATEGORY_SYSTEM = "https://www.modmed.com/fhir/document-category"
TRANSACTION_ID_SYSTEM = "https://www.modmed.com/fhir/transaction-id"

UTC = datetime.timezone.utc
NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
YEARS = 2.0
INSTANT_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
NUMERIC_ID_TYPES = (
    "Patient", "Appointment", "Encounter", "DocumentReference", "DiagnosticReport", "MedicationStatement",
    "AllergyIntolerance", "Condition", "Coverage", "ServiceRequest", "Practitioner", "Location",
    "InsurancePlan",
)


@pytest.fixture(scope="module")
def practice() -> list[dict[str, Any]]:
    return list(generate(30, seed=7, now=NOW, years=YEARS))


def by_type(resources: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in resources:
        out[r["resourceType"]].append(r)
    return out


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def parse_instant(s: str) -> datetime.datetime:
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# -- determinism -----------------------------------------------------------------------------------


def test_same_arguments_same_output() -> None:
    assert list(generate(25, seed=3, now=NOW)) == list(generate(25, seed=3, now=NOW))


def test_different_seed_differs() -> None:
    assert list(generate(25, seed=3, now=NOW)) != list(generate(25, seed=4, now=NOW))


def test_smaller_practice_is_a_prefix() -> None:
    small = [r for r in generate(5, seed=1, now=NOW) if r["resourceType"] != "Group"]
    large = list(generate(12, seed=1, now=NOW))
    assert large[: len(small)] == small


def test_now_in_another_zone_is_the_same_instant() -> None:
    cet = NOW.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
    assert list(generate(5, seed=1, now=cet)) == list(generate(5, seed=1, now=NOW))


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next(iter(generate(1, now=datetime.datetime(2025, 1, 1))))


def test_default_now_is_the_current_minute() -> None:
    before = datetime.datetime.now(UTC).replace(second=0, microsecond=0)
    resources = list(generate(3, seed=0))
    after = datetime.datetime.now(UTC)
    newest = max(parse_instant(r["meta"]["lastUpdated"]) for r in resources)
    assert newest <= after
    assert newest >= before - datetime.timedelta(days=365.25 * YEARS)


def test_output_is_json_ready(practice: list[dict[str, Any]]) -> None:
    assert json.loads(json.dumps(practice)) == practice


def _containers(node: Any) -> Iterator[Any]:
    if isinstance(node, (dict, list)):
        yield node
        for child in node.values() if isinstance(node, dict) else node:
            yield from _containers(child)


def test_resources_share_no_mutable_parts(practice: list[dict[str, Any]]) -> None:
    ids = [id(c) for r in practice for c in _containers(r)]
    assert len(ids) == len(set(ids))


def test_editing_a_resource_does_not_leak_into_the_next_run() -> None:
    first = list(generate(5, seed=1, now=NOW))
    for r in first:
        for c in _containers(r):
            if isinstance(c, dict) and "code" in c and isinstance(c["code"], str):
                c["code"] = "EDITED"
    assert list(generate(5, seed=1, now=NOW)) != first
    assert "EDITED" not in json.dumps(list(generate(5, seed=1, now=NOW)))


# -- R4B validity ----------------------------------------------------------------------------------


def _r4b_failures(resources: list[dict[str, Any]]) -> list[str]:
    """Validation errors, except the one ModMed quirk: a pipe in a composite id (``pay|7225``, ``CHG|1``)."""
    failures = []
    for r in resources:
        model = get_fhir_model_class(r["resourceType"])
        try:
            model.model_validate(r)
        except ValidationError as exc:
            errors = [
                e for e in exc.errors()
                if not (e["loc"] == ("id",) and e["type"] == "string_pattern_mismatch"
                        and r["resourceType"] in COMPOSITE_ID_TYPES and "|" in r["id"])
            ]
            failures += [f"{r['resourceType']}/{r['id']}: {e['loc']} {e['msg']}" for e in errors]
    return failures


@pytest.mark.parametrize("seed", [7, 11, 12])
def test_every_resource_validates_with_r4b(seed: int) -> None:
    failures = _r4b_failures(list(generate(30, seed=seed, now=NOW)))
    assert failures == [], "\n".join(failures)


def test_composite_ids_fail_only_fhirs_id_pattern(practice: list[dict[str, Any]]) -> None:
    """FHIR ids are ``[A-Za-z0-9\\-.]{1,64}``: ModMed's pipes break that rule and nothing else does."""
    composite = [r for r in practice if "|" in r["id"]]
    assert composite
    for r in composite:
        with pytest.raises(ValidationError) as info:
            get_fhir_model_class(r["resourceType"]).model_validate(r)
        assert [e["loc"] for e in info.value.errors()] == [("id",)]
        get_fhir_model_class(r["resourceType"]).model_validate({**r, "id": r["id"].replace("|", "-")})


# -- ids -------------------------------------------------------------------------------------------


def test_ids_unique_per_type(practice: list[dict[str, Any]]) -> None:
    for rt, resources in by_type(practice).items():
        ids = [r["id"] for r in resources]
        assert len(ids) == len(set(ids)), rt


def test_numeric_ids_count_from_one(practice: list[dict[str, Any]]) -> None:
    types = by_type(practice)
    for rt in NUMERIC_ID_TYPES:
        ids = [r["id"] for r in types[rt]]
        assert ids, rt
        assert sorted(ids, key=int) == [str(n) for n in range(1, len(ids) + 1)], rt
    assert len(types["Patient"]) == 30


def test_composite_and_dotted_ids(practice: list[dict[str, Any]]) -> None:
    types = by_type(practice)
    orgs = {r["id"] for r in types["Organization"]}
    assert orgs == {"1", *PAYER_IDS}
    assert all(re.fullmatch(r"CHG\|\d+", r["id"]) for r in types["ChargeItem"])
    dotted = re.compile(re.escape(DOTTED_ID_PREFIX) + r"\d+")
    assert types["Immunization"]
    assert all(dotted.fullmatch(r["id"]) for r in types["Immunization"])
    vitals = [r for r in types["Observation"] if r["category"][0]["coding"][0]["code"] == "vital-signs"]
    labs = [r for r in types["Observation"] if r["category"][0]["coding"][0]["code"] == "laboratory"]
    assert vitals
    assert labs
    assert len(vitals) + len(labs) == len(types["Observation"])
    assert all(dotted.fullmatch(r["id"]) for r in vitals)
    assert all(r["id"].isdigit() for r in labs)
    assert {r["id"] for r in types["ValueSet"]} == {"document-category", "appointment-type"}
    assert {r["id"] for r in types["Group"]} == {"all-patients", "cohort-a"}


def test_patient_mrns_unique_and_shaped(practice: list[dict[str, Any]]) -> None:
    mrns = [r["identifier"][0] for r in by_type(practice)["Patient"]]
    assert all(m["system"] == MRN_SYSTEM and re.fullmatch(r"MRN\d{6}", m["value"]) for m in mrns)
    assert len({m["value"] for m in mrns}) == len(mrns)


def test_transaction_ids_unique(practice: list[dict[str, Any]]) -> None:
    tx = [r["identifier"][0] for r in by_type(practice)["ChargeItem"]]
    assert all(t["system"] == TRANSACTION_ID_SYSTEM and t["value"].startswith("TX-") for t in tx)
    assert len({t["value"] for t in tx}) == len(tx)


# -- meta.lastUpdated ------------------------------------------------------------------------------


def test_last_updated_in_window_and_millisecond_formatted(practice: list[dict[str, Any]]) -> None:
    start = NOW - datetime.timedelta(days=365.25 * YEARS)
    for r in practice:
        assert r["meta"]["versionId"] == "1"
        lu = r["meta"]["lastUpdated"]
        assert INSTANT_MS.fullmatch(lu), lu
        assert start <= parse_instant(lu) <= NOW, (r["resourceType"], r["id"], lu)


def test_last_updated_spread_over_the_window() -> None:
    resources = list(generate(200, seed=5, now=NOW, years=1.0))
    days = {parse_instant(r["meta"]["lastUpdated"]).date() for r in resources}
    assert len(days) > 250


def test_patient_resources_not_older_than_their_patient(practice: list[dict[str, Any]]) -> None:
    patient_lu = {f"Patient/{r['id']}": r["meta"]["lastUpdated"] for r in by_type(practice)["Patient"]}
    checked = 0
    for r in practice:
        if r["resourceType"] in ("Patient", "Group"):
            continue
        for ref in references(r):
            if ref in patient_lu:
                assert r["meta"]["lastUpdated"] >= patient_lu[ref], (r["resourceType"], r["id"])
                checked += 1
    assert checked > 100


# -- groups and references -------------------------------------------------------------------------


def test_group_all_patients_has_each_patient_once(practice: list[dict[str, Any]]) -> None:
    groups = {g["id"]: g for g in by_type(practice)["Group"]}
    members = [m["entity"]["reference"] for m in groups["all-patients"]["member"]]
    assert sorted(members) == sorted(f"Patient/{r['id']}" for r in by_type(practice)["Patient"])
    assert groups["all-patients"]["quantity"] == 30
    cohort = [m["entity"]["reference"] for m in groups["cohort-a"]["member"]]
    assert cohort == [f"Patient/{n}" for n in range(1, 31, 3)]


def test_references_resolve(practice: list[dict[str, Any]]) -> None:
    known = {f"{r['resourceType']}/{r['id']}" for r in practice}
    refs = [ref for r in practice for ref in references(r)]
    dangling = sorted({ref for ref in refs if ref not in known})
    assert dangling == []
    kinds = {ref.split("/")[0] for ref in refs}
    assert {"Patient", "Practitioner", "Organization", "Location", "Encounter", "Observation"} <= kinds
    assert "Organization/pay|7225" in refs


def test_empty_practice() -> None:
    resources = list(generate(0, seed=0, now=NOW))
    types = by_type(resources)
    assert "Patient" not in types
    assert [g["quantity"] for g in types["Group"]] == [0, 0]
    assert _r4b_failures(resources) == []


# -- content ---------------------------------------------------------------------------------------


def test_value_sets_carry_the_firm_codes(practice: list[dict[str, Any]]) -> None:
    vs = {v["id"]: v for v in by_type(practice)["ValueSet"]}
    doc = vs["document-category"]["compose"]["include"][0]
    assert doc["system"] == DOCUMENT_CATEGORY_SYSTEM
    assert {"code": "CLINICAL", "display": "Clinical Note"} in doc["concept"]
    appt = vs["appointment-type"]["compose"]["include"][0]
    assert appt["system"] == APPOINTMENT_TYPE_SYSTEM
    assert {"NEW", "FOLLOWUP", "PROC"} <= {c["code"] for c in appt["concept"]}


def test_codes_come_from_the_value_sets(practice: list[dict[str, Any]]) -> None:
    types = by_type(practice)
    vs = {v["id"]: {c["code"] for c in v["compose"]["include"][0]["concept"]} for v in types["ValueSet"]}
    for d in types["DocumentReference"]:
        coding = d["category"][0]["coding"][0]
        assert coding["system"] == DOCUMENT_CATEGORY_SYSTEM
        assert coding["code"] in vs["document-category"]
        attachment = d["content"][0]["attachment"]
        assert attachment["contentType"] == "text/plain"
        assert base64.b64decode(attachment["data"]).startswith(b"SYNTHETIC")
    for a in types["Appointment"]:
        assert a["appointmentType"]["coding"][0]["code"] in vs["appointment-type"]


def test_the_practice_covers_every_branch() -> None:
    resources = list(generate(60, seed=2, now=NOW))
    types = by_type(resources)
    assert {a["status"] for a in types["Appointment"]} == {"booked", "fulfilled", "cancelled"}
    vital_codes = {o["code"]["coding"][0]["code"] for o in types["Observation"]
                   if o["category"][0]["coding"][0]["code"] == "vital-signs"}
    assert vital_codes == {"85354-9", "8867-4", "29463-7", "8302-2"}
    bp = next(o for o in types["Observation"] if o["code"]["coding"][0]["code"] == "85354-9")
    assert [c["code"]["coding"][0]["code"] for c in bp["component"]] == ["8480-6", "8462-4"]
    assert all(c["payor"][0]["reference"].startswith("Organization/pay|") for c in types["Coverage"])
    assert {c["clinicalStatus"]["coding"][0]["code"] for c in types["Condition"]} <= {"active", "resolved"}
    for rt in ("Encounter", "DocumentReference", "DiagnosticReport", "MedicationStatement",
               "AllergyIntolerance", "Condition", "Immunization", "ChargeItem", "Coverage", "ServiceRequest"):
        assert types[rt], rt
    booked = [a for a in types["Appointment"] if a["status"] == "booked"]
    assert all(a["start"] > NOW.strftime("%Y-%m-%dT%H:%M:%SZ") for a in booked)


def test_about_a_dozen_resources_per_patient() -> None:
    n = 1000
    per_patient = (sum(1 for _ in generate(n, seed=0, now=NOW)) - 16) / n
    assert 10 <= per_patient <= 14


def test_generation_is_fast() -> None:
    started = time.perf_counter()
    count = sum(1 for _ in generate(5000, seed=0, now=NOW))
    assert count > 50_000
    assert time.perf_counter() - started < 10
