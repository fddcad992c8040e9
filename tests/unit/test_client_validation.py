"""R4B validation of outgoing resources: every failing path listed, no values, ModMed ids accepted."""

from __future__ import annotations

import pytest

from airflow_provider_modmed.client.validation import MAX_LISTED, resource_problems, validate_resource
from airflow_provider_modmed.errors import ConfigurationError, ValidationError


def test_a_valid_resource_passes() -> None:
    patient = {"resourceType": "Patient", "id": "12", "name": [{"family": "Testperson", "given": ["Alpha"]}],
               "birthDate": "1980-02-03", "meta": {"versionId": "2", "lastUpdated": "2025-01-02T03:04:05.678Z"}}
    assert resource_problems(patient) == []
    validate_resource(patient, "Patient")


def test_each_failing_path_is_listed_without_values() -> None:
    bad = {"resourceType": "Patient", "birthDate": "1980-13-45", "name": [{"family": 5, "given": "Qwertyphi"}],
           "bogus": "Zzyzxphi"}
    problems = resource_problems(bad)
    paths = [p.split(":", 1)[0] for p in problems]
    assert paths == ["Patient.birthDate", "Patient.name[0].family", "Patient.name[0].given", "Patient.bogus"]
    with pytest.raises(ValidationError) as info:
        validate_resource(bad)
    text = str(info.value)
    assert "4 problems" in text and "Patient.name[0].given" in text and "validate=False" in text
    for value in ("1980-13-45", "Qwertyphi", "Zzyzxphi"):
        assert value not in text


def test_required_elements_are_reported() -> None:
    assert resource_problems({"resourceType": "Encounter", "class": {"code": "AMB"}}) == [
        "Encounter.status: Value for the field 'status' is required."]


@pytest.mark.parametrize("rid", ["pay|7225", "CHG|12", "1.120182.1.17082675"])
def test_modmed_ids_are_not_problems(rid: str) -> None:
    assert resource_problems({"resourceType": "Organization", "id": rid, "name": "Payer"}) == []


def test_ids_that_are_neither_fhir_nor_modmed_are() -> None:
    (problem,) = resource_problems({"resourceType": "Organization", "id": "a/b", "name": "x"})
    assert problem.startswith("Organization.id:")


@pytest.mark.parametrize(("resource", "expected", "needle"), [
    ({"name": "x"}, None, "resourceType: missing"),
    ({"resourceType": "Nope"}, None, "not a FHIR R4 resource type"),
    ({"resourceType": "Patient"}, "Coverage", "expected 'Coverage'"),
    (["not", "a", "dict"], None, "must be a FHIR resource"),
])
def test_shape_problems(resource: object, expected: str | None, needle: str) -> None:
    (problem,) = resource_problems(resource, expected)
    assert needle in problem


def test_long_lists_are_capped() -> None:
    bad = {"resourceType": "Patient", **{f"x{i}": i for i in range(MAX_LISTED + 5)}}
    with pytest.raises(ValidationError, match="and 5 more"):
        validate_resource(bad)


def test_not_a_dict_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="resource must be a FHIR resource dict"):
        validate_resource("{}")
