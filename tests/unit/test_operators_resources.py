"""The resource operators without a network: argument handling and validation before any call (the
capability pre-flight included), what they hand the client, what they push (ids, not data), lineage
and PHI-safe rendering. The write rules themselves (transactionId, If-Match read-back, merge patch,
idempotent delete) are the client's flows: tests/unit/test_client_writes.py and
tests/integration/test_client_writes.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest.mock import create_autospec

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client import writes
from airflow_provider_modmed.client.fhir import FhirClient
from airflow_provider_modmed.errors import ConflictError, NotFoundError
from airflow_provider_modmed.operators._common import MASK
from airflow_provider_modmed.operators.resources import (
    ModMedCreateResourceOperator,
    ModMedDeleteResourceOperator,
    ModMedReadResourceOperator,
    ModMedUpdateResourceOperator,
    json_merge_patch,
)
from airflow_provider_modmed.profile import TRANSACTION_ID_SYSTEM
from tests.unit.operator_fakes import FakeHook

PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "MRN-1"}],
           "name": [{"family": "Qwertyphi", "given": ["Alpha"]}], "birthDate": "1971-02-03"}
CHARGE = {"resourceType": "ChargeItem", "status": "billable", "code": {"text": "99213"},
          "subject": {"reference": "Patient/1"}}


def wire(op: Any, track: Track = Track.PROPRIETARY, **answers: Any) -> Any:
    """Give ``op`` a hook whose client is a ``FhirClient`` mock; ``answers`` set each method's
    ``side_effect`` (a value is returned, an exception raised, a callable called, a list taken in turn)."""
    client = create_autospec(FhirClient, instance=True)
    for name, answer in answers.items():
        method = getattr(client, name)
        if callable(answer) or isinstance(answer, (Exception, list)):
            method.side_effect = answer
        else:
            method.return_value = answer
    op.__dict__["hook"] = FakeHook(track, client)
    return client


def stored(resource: dict[str, Any], rid: str = "9", version: str = "1") -> dict[str, Any]:
    return {**resource, "id": rid, "meta": {"versionId": version, "lastUpdated": "2026-01-02T03:04:05.000Z"}}


class TI:
    def __init__(self, try_number: int) -> None:
        self.try_number = try_number


# -- create ------------------------------------------------------------------------------------------

def test_create_returns_ids_not_data_and_closes_the_client() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource=PATIENT, if_none_exist={"identifier": "urn:mrn|MRN-1"})
    client = wire(op, create=lambda r, c, **kw: stored(r))
    out = op.execute({})
    assert out == {"resource_type": "Patient", "id": "9", "version_id": "1",
                   "last_updated": "2026-01-02T03:04:05.000Z"}
    client.create.assert_called_once_with(PATIENT, {"identifier": "urn:mrn|MRN-1"}, transaction_id=None)
    assert op.hook.closed == 1
    assert "Qwertyphi" not in json.dumps(out)


def test_create_returns_the_resource_only_when_asked() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource=json.dumps(PATIENT), return_resource=True)
    wire(op, create=lambda r, c, **kw: stored(r))
    assert op.execute({})["resource"]["name"] == PATIENT["name"]


def test_if_none_exist_true_uses_the_first_identifier() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource=PATIENT, if_none_exist=True)
    client = wire(op, create=lambda r, c, **kw: stored(r))
    op.execute({})
    assert client.create.call_args.args[1] == {"identifier": "urn:mrn|MRN-1"}


def test_transaction_id_goes_to_the_client_with_its_identifier() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource=CHARGE, transaction_id="TX-42")
    client = wire(op, create=lambda r, c, **kw: stored(r, "CHG|5"))
    assert op.execute({})["id"] == "CHG|5"
    (sent, condition), kwargs = client.create.call_args
    assert {"system": TRANSACTION_ID_SYSTEM, "value": "TX-42"} in sent["identifier"]
    assert condition is None and kwargs == {"transaction_id": "TX-42"}  # the flow makes the condition
    op = ModMedCreateResourceOperator(task_id="c", resource=CHARGE, transaction_id="TX-42", if_none_exist=True)
    client = wire(op, create=lambda r, c, **kw: stored(r, "CHG|5"))
    op.execute({})
    assert client.create.call_args.args[1] == {"identifier": f"{TRANSACTION_ID_SYSTEM}|TX-42"}


def test_a_create_conflict_is_not_failed_fast() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource=CHARGE, transaction_id="TX-42")
    wire(op, create=ConflictError("create ChargeItem failed", status_code=409))
    with pytest.raises(ConflictError, match="create ChargeItem failed"):
        op.execute({})


def test_coverage_create_returns_the_reconciliation_id() -> None:
    coverage = {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "Patient/1"},
                "payor": [{"reference": "Organization/pay|7225"}]}
    op = ModMedCreateResourceOperator(task_id="c", resource=coverage)
    ext = {"url": "https://www.modmed.com/fhir/StructureDefinition/reconciliation-id", "valueString": "REC-7"}
    wire(op, create=lambda r, c, **kw: {**stored(r, "31"), "extension": [ext]})
    assert op.execute({})["reconciliation_id"] == "REC-7"


@pytest.mark.parametrize(("kwargs", "track", "needle"), [
    ({"resource": {"resourceType": "Nope"}}, Track.PROPRIETARY, "'Nope' is not served by ModMed"),
    ({"resource": PATIENT}, Track.CERTIFIED, "create on Patient on the certified track: use a connection with "
                                             "track='proprietary'"),
    ({"resource": {"resourceType": "Immunization", "status": "completed"}}, Track.PROPRIETARY,
     "no ModMed track supports it"),
    ({"resource": {**PATIENT, "birthDate": "1971-13-45", "gender": 3}}, Track.PROPRIETARY,
     r"2 problems.*Patient.birthDate: .*Patient.gender: "),
    ({"resource": PATIENT, "transaction_id": "TX"}, Track.PROPRIETARY, "transaction_id applies to ChargeItem only"),
    ({"resource": {**CHARGE, "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "TX-1"}]},
      "transaction_id": "TX-2"}, Track.PROPRIETARY, "differs from the resource's transaction-id identifier"),
    ({"resource": {"resourceType": "Patient"}, "if_none_exist": True}, Track.PROPRIETARY, "needs an identifier"),
    ({"resource": PATIENT, "if_none_exist": 7}, Track.PROPRIETARY, "must be a search dict"),
    ({"resource": "{not json"}, Track.PROPRIETARY, "resource is not valid JSON .line 1 column 2."),
    ({"resource": None}, Track.PROPRIETARY, "resource must be a FHIR resource dict"),
    ({"resource": {"name": "x"}}, Track.PROPRIETARY, "needs a resourceType"),
])
def test_create_refuses_bad_input_before_any_call(kwargs: dict[str, Any], track: Track, needle: str) -> None:
    op = ModMedCreateResourceOperator(task_id="c", **kwargs)
    client = wire(op, track)
    with pytest.raises(AirflowFailException, match=needle) as info:
        op.execute({})
    assert client.mock_calls == []
    assert "Qwertyphi" not in str(info.value) and "1971-13-45" not in str(info.value)


def test_validate_false_skips_the_r4b_check() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource={**PATIENT, "gender": 3}, validate=False)
    client = wire(op, create=lambda r, c, **kw: stored(r))
    op.execute({})
    assert client.create.call_count == 1


# -- read --------------------------------------------------------------------------------------------

def test_read_returns_the_summary_and_writes_the_file(tmp_path: Path) -> None:
    out_file = tmp_path / "deep" / "p.json"
    op = ModMedReadResourceOperator(task_id="r", resource_type="Patient", resource_id=12, output_path=str(out_file))
    client = wire(op, read=lambda rt, rid: stored(PATIENT, rid))
    out = op.execute({})
    client.read.assert_called_once_with("Patient", "12")
    assert out["id"] == "12" and out["path"] == f"file://{out_file}" and "resource" not in out
    assert json.loads(out_file.read_text())["birthDate"] == "1971-02-03"


@pytest.mark.parametrize(("kwargs", "track", "needle"), [
    ({"resource_type": "Patient", "resource_id": None}, Track.PROPRIETARY, "resource_id must be a non-empty"),
    ({"resource_type": "Patient", "resource_id": "1/../2"}, Track.PROPRIETARY, "not a valid FHIR id"),
    ({"resource_type": "Immunization", "resource_id": "1"}, Track.PROPRIETARY, "track='certified'"),
    ({"resource_type": "", "resource_id": "1"}, Track.PROPRIETARY, "resource_type is required"),
    ({"resource_type": "Patient", "resource_id": "1", "output_path": "relative/p.json"}, Track.PROPRIETARY,
     "must be absolute"),
])
def test_read_refuses_bad_input(kwargs: dict[str, Any], track: Track, needle: str) -> None:
    op = ModMedReadResourceOperator(task_id="r", **kwargs)
    client = wire(op, track)
    with pytest.raises(AirflowFailException, match=needle):
        op.execute({})
    assert client.mock_calls == []


# -- update ------------------------------------------------------------------------------------------

def test_update_with_the_version_it_read() -> None:
    current = stored(PATIENT, "9", "3")
    op = ModMedUpdateResourceOperator(task_id="u", resource={**current, "gender": "female"})
    client = wire(op, update=lambda r, **kw: stored(r, "9", "4"))
    out = op.execute({})
    assert client.update.call_args.kwargs == {"if_match": "3", "may_have_landed": False}
    assert client.update.call_args.args[0]["gender"] == "female"
    assert (out["version_id"], out["previous_version_id"], out["changed"]) == ("4", "3", True)
    assert "resource" not in out


def test_an_explicit_if_match_wins_over_meta() -> None:
    op = ModMedUpdateResourceOperator(task_id="u", resource=stored(PATIENT, "9", "3"), if_match='W/"2"')
    client = wire(op, update=lambda r, **kw: stored(r, "9", "4"))
    op.execute({})
    assert client.update.call_args.kwargs["if_match"] == "2"


def test_a_retried_task_lets_the_flow_read_a_412_back() -> None:
    op = ModMedUpdateResourceOperator(task_id="u", resource=stored(PATIENT, "9", "3"), return_resource=True)
    client = wire(op, update=lambda r, **kw: stored(r, "9", "4"))
    assert op.execute({"ti": TI(2)})["resource"]["meta"]["versionId"] == "4"  # type: ignore[typeddict-item]
    assert client.update.call_args.kwargs["may_have_landed"] is True


def test_a_stale_version_fails_at_once() -> None:
    op = ModMedUpdateResourceOperator(task_id="u", resource={**stored(PATIENT, "9", "1"), "gender": "male"})
    wire(op, update=ConflictError("update of Patient refused: it changed since version 1 (now version 2); "
                                  "nothing was written", status_code=412))
    with pytest.raises(AirflowFailException, match=r"ConflictError: .*changed since version 1 \(now version 2\)"):
        op.execute({})


def test_patch_goes_to_the_client_and_returns_versions_not_data() -> None:
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id=9,
                                      patch='{"gender": "male", "telecom": null}')
    client = wire(op, patch=writes.PatchResult(stored(PATIENT, "9", "6"), True, "5"))
    out = op.execute({})
    client.patch.assert_called_once_with("Patient", "9", {"gender": "male", "telecom": None}, if_match=None,
                                         validate=True)
    assert out == {"resource_type": "Patient", "id": "9", "version_id": "6", "previous_version_id": "5",
                   "changed": True, "last_updated": "2026-01-02T03:04:05.000Z"}


def test_a_callable_patch_and_a_patch_that_changes_nothing() -> None:
    def fix(r: dict[str, Any]) -> dict[str, Any]:
        return {**r, "gender": "male"}

    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9", patch=fix,
                                      validate=False, if_match="5")
    client = wire(op, patch=writes.PatchResult(stored(PATIENT, "9", "5"), False, "5"))
    out = op.execute({})
    client.patch.assert_called_once_with("Patient", "9", fix, if_match="5", validate=False)
    assert out["changed"] is False and out["version_id"] == "5"


def test_a_patch_conflict_is_retryable_but_an_expected_version_is_not() -> None:
    conflict = ConflictError("update of Patient refused: it changed since version 5 (now version 6); nothing was "
                             "written", status_code=412)
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9", patch={"gender": "male"})
    wire(op, patch=conflict)
    with pytest.raises(ConflictError, match="nothing was written"):
        op.execute({})
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9", patch={"gender": "male"},
                                      if_match=4)
    wire(op, patch=ConflictError("update of Patient refused: it is at version 5, not the expected 4; nothing was "
                                 "written", status_code=412))
    with pytest.raises(AirflowFailException, match="at version 5, not the expected 4; nothing was written"):
        op.execute({})


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({}, "either resource= .* or patch="),
    ({"resource": PATIENT, "patch": {"a": 1}}, "either resource="),
    ({"resource": stored(PATIENT, "9", "1") | {"meta": {}}}, "needs the version"),
    ({"resource": PATIENT, "if_match": 1}, "needs its id"),
    ({"patch": {"gender": "male"}, "resource_id": "9"}, "patch= needs resource_type"),
    ({"patch": {"gender": "male"}, "resource_type": "Patient"}, "patch= needs resource_id"),
    ({"patch": "[1, 2]", "resource_type": "Patient", "resource_id": "9"}, "patch must be a JSON merge patch"),
    ({"resource": {**stored(PATIENT), "resourceType": "Coverage"}}, "ModMed allows only create on Coverage"),
    ({"resource": {**stored(PATIENT), "gender": 5}}, "Patient.gender"),
    ({"resource": stored(PATIENT), "if_match": "W/\"1 OR 1\""}, "if_match must be a version id"),
])
def test_update_refuses_bad_input_before_any_call(kwargs: dict[str, Any], needle: str) -> None:
    op = ModMedUpdateResourceOperator(task_id="u", **kwargs)
    client = wire(op)
    with pytest.raises(AirflowFailException, match=needle):
        op.execute({})
    assert client.mock_calls == []


def test_json_merge_patch_is_still_importable_here() -> None:
    assert json_merge_patch is writes.json_merge_patch


# -- delete ------------------------------------------------------------------------------------------

def test_delete_only_where_the_matrix_allows_it() -> None:
    op = ModMedDeleteResourceOperator(task_id="d", resource_type="Appointment", resource_id="1")
    client = wire(op)
    with pytest.raises(AirflowFailException, match="delete on Appointment"):
        op.execute({})
    op = ModMedDeleteResourceOperator(task_id="d", resource_type="Patient", resource_id="1")
    client = wire(op, Track.CERTIFIED)
    with pytest.raises(AirflowFailException, match="track='proprietary'"):
        op.execute({})
    assert client.mock_calls == []


@pytest.mark.parametrize(("missing_ok", "answer", "present"), [(False, True, True), (False, False, False),
                                                               (True, False, False)])
def test_delete_passes_missing_ok_and_reports_whether_it_was_there(missing_ok: bool, answer: bool,
                                                                   present: bool) -> None:
    op = ModMedDeleteResourceOperator(task_id="d", resource_type="Patient", resource_id=1, missing_ok=missing_ok)
    client = wire(op, delete=answer)
    assert op.execute({}) == {"resource_type": "Patient", "id": "1", "deleted": True, "was_present": present}
    client.delete.assert_called_once_with("Patient", "1", missing_ok=missing_ok)


def test_a_missing_resource_fails_the_delete() -> None:
    op = ModMedDeleteResourceOperator(task_id="d", resource_type="Patient", resource_id="1")
    wire(op, delete=NotFoundError("delete Patient failed", status_code=404))
    with pytest.raises(NotFoundError):
        op.execute({})
    assert op.hook.closed == 1


# -- rendering, lineage, kill ------------------------------------------------------------------------

def test_rendered_templates_keep_patient_data_out() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource={**PATIENT, "gender": "{{ params.g }}"},
                                      if_none_exist="identifier=urn:mrn|{{ params.mrn }}")
    op.render_template_fields({"params": {"g": "female", "mrn": "MRN-1"}})
    assert op.resource == {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": MASK}],
                           "name": [{"family": MASK, "given": [MASK]}], "birthDate": MASK, "gender": MASK}
    assert op.if_none_exist == f"identifier={MASK}"
    client = wire(op, create=lambda r, c, **kw: stored(r))
    op.execute({})
    sent, condition = client.create.call_args.args
    assert sent["gender"] == "female" and sent["name"][0]["family"] == "Qwertyphi"
    assert condition == "identifier=urn:mrn|MRN-1"


def test_a_callable_patch_is_not_called_by_the_renderer() -> None:
    calls: list[Any] = []
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9",
                                      patch=lambda r: calls.append(r) or r)
    op.render_template_fields({})
    assert calls == []


def test_on_kill_closes_the_client() -> None:
    op = ModMedReadResourceOperator(task_id="r", resource_type="Patient", resource_id="1")
    op.on_kill()  # nothing opened yet: no error
    wire(op)
    op.on_kill()
    assert op.hook.closed == 1


class _Dataset:
    def __init__(self, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name


class _OperatorLineage:
    def __init__(self, inputs: list[Any], outputs: list[Any]) -> None:
        self.inputs, self.outputs = inputs, outputs


@pytest.fixture
def fake_openlineage(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    extractors = types.ModuleType("airflow.providers.openlineage.extractors")
    extractors.OperatorLineage = _OperatorLineage  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage", types.ModuleType("airflow.providers.openlineage"))
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage.extractors", extractors)
    import airflow.providers.common.compat.openlineage.facet as facet

    monkeypatch.setattr(facet, "Dataset", _Dataset, raising=False)


def pairs(datasets: list[Any]) -> list[tuple[str, str]]:
    return [(d.namespace, d.name) for d in datasets]


def test_openlineage_datasets(fake_openlineage: None, tmp_path: Path) -> None:
    ns = "modmed://stage.ema-api.com/apiportal"  # the search operator's lineage: test_operators_search.py
    create = ModMedCreateResourceOperator(task_id="c", resource=PATIENT)
    wire(create)
    lineage = create.get_openlineage_facets_on_complete(None)
    assert pairs(lineage.inputs) == [] and pairs(lineage.outputs) == [(ns, "Patient")]
    read = ModMedReadResourceOperator(task_id="r", resource_type="Coverage", resource_id="1",
                                      output_path="s3://aws_default@bucket/x/c.json")
    wire(read)
    lineage = read.get_openlineage_facets_on_complete(None)
    assert pairs(lineage.inputs) == [(ns, "Coverage")] and pairs(lineage.outputs) == [("s3://bucket", "x/c.json")]


def test_openlineage_is_optional() -> None:
    op = ModMedReadResourceOperator(task_id="r", resource_type="Patient", resource_id="1")
    wire(op)
    assert op.get_openlineage_facets_on_complete(None) is None  # the provider is not installed here
