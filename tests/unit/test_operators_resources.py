"""The resource operators without a network: argument checks and the capability pre-flight fail before any
call, conveniences (conditional create, transactionId, reconciliation id, If-Match), PHI-safe rendering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_modmed.capabilities import DEFAULT, Capabilities, Track
from airflow_provider_modmed.client._flows import TRANSACTION_ID_SYSTEM, FhirContext
from airflow_provider_modmed.errors import ConflictError, NotFoundError
from airflow_provider_modmed.operators._common import MASK
from airflow_provider_modmed.operators.resources import (
    ModMedCreateResourceOperator,
    ModMedDeleteResourceOperator,
    ModMedReadResourceOperator,
    ModMedSearchResourcesOperator,
    ModMedUpdateResourceOperator,
    json_merge_patch,
)

PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "MRN-1"}],
           "name": [{"family": "Qwertyphi", "given": ["Alpha"]}], "birthDate": "1971-02-03"}


@dataclass
class FakeConfig:
    track: Track
    fhir_base: str = "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"
    firm: str = "apiportal"
    capabilities: Capabilities = DEFAULT

    @property
    def resolved_track(self) -> Track:
        return self.track


@dataclass
class FakeClient:
    track: Track
    answers: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    closed: int = 0

    @property
    def context(self) -> FhirContext:
        return FhirContext(self.track, "https://x.example/fhir")

    def _answer(self, name: str, *args: Any) -> Any:
        self.calls.append((name, args))
        answer = self.answers.get(name)
        if isinstance(answer, list):
            answer = answer.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer(*args) if callable(answer) else answer

    def create(self, resource: dict[str, Any], if_none_exist: Any = None) -> Any:
        return self._answer("create", resource, if_none_exist)

    def read(self, rt: str, rid: str) -> Any:
        return self._answer("read", rt, rid)

    def update(self, resource: dict[str, Any], if_match: Any = None) -> Any:
        return self._answer("update", resource, if_match)

    def delete(self, rt: str, rid: str) -> Any:
        return self._answer("delete", rt, rid)

    def search(self, rt: str, params: Any = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
        return iter(self._answer("search", rt, params, kwargs) or [])


class FakeHook:
    def __init__(self, track: Track, client: FakeClient) -> None:
        self.track = track
        self.config = FakeConfig(track)
        self.client = client

    def get_conn(self) -> FakeClient:
        return self.client

    def close(self) -> None:
        self.client.closed += 1


def wire(op: Any, track: Track = Track.PROPRIETARY, **answers: Any) -> FakeClient:
    client = FakeClient(track, answers)
    op.__dict__["hook"] = FakeHook(track, client)
    return client


def stored(resource: dict[str, Any], rid: str = "9", version: str = "1") -> dict[str, Any]:
    return {**resource, "id": rid, "meta": {"versionId": version, "lastUpdated": "2026-01-02T03:04:05.000Z"}}


# -- create ------------------------------------------------------------------------------------------

def test_create_returns_ids_not_data_and_closes_the_client() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource=PATIENT, if_none_exist={"identifier": "urn:mrn|MRN-1"})
    client = wire(op, create=lambda r, c: stored(r))
    out = op.execute({})
    assert out == {"resource_type": "Patient", "id": "9", "version_id": "1",
                   "last_updated": "2026-01-02T03:04:05.000Z"}
    assert client.calls == [("create", (PATIENT, {"identifier": "urn:mrn|MRN-1"}))]
    assert client.closed == 1
    assert "Qwertyphi" not in json.dumps(out)


def test_create_returns_the_resource_only_when_asked() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource=json.dumps(PATIENT), return_resource=True)
    wire(op, create=lambda r, c: stored(r))
    assert op.execute({})["resource"]["name"] == PATIENT["name"]


def test_if_none_exist_true_uses_the_first_identifier() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource=PATIENT, if_none_exist=True)
    client = wire(op, create=lambda r, c: stored(r))
    op.execute({})
    assert client.calls[0][1][1] == {"identifier": "urn:mrn|MRN-1"}


def test_transaction_id_makes_a_charge_item_conditional() -> None:
    charge = {"resourceType": "ChargeItem", "status": "billable", "code": {"text": "99213"},
              "subject": {"reference": "Patient/1"}}
    op = ModMedCreateResourceOperator(task_id="c", resource=charge, transaction_id="TX-42")
    client = wire(op, create=lambda r, c: stored(r, "CHG|5"))
    assert op.execute({})["id"] == "CHG|5"
    sent, condition = client.calls[0][1]
    assert {"system": TRANSACTION_ID_SYSTEM, "value": "TX-42"} in sent["identifier"]
    assert condition == {"identifier": f"{TRANSACTION_ID_SYSTEM}|TX-42"}


def test_a_duplicate_transaction_id_returns_the_existing_charge() -> None:
    charge = {"resourceType": "ChargeItem", "status": "billable", "code": {"text": "99213"},
              "subject": {"reference": "Patient/1"}}
    op = ModMedCreateResourceOperator(task_id="c", resource=charge, transaction_id="TX-42")
    existing = stored({**charge, "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "TX-42"}]}, "CHG|3")
    client = wire(op, create=ConflictError("create ChargeItem failed", status_code=409), search=[[existing]])
    assert op.execute({})["id"] == "CHG|3"
    assert client.calls[1][0] == "search"
    assert client.calls[1][1][1] == {"identifier": f"{TRANSACTION_ID_SYSTEM}|TX-42"}


def test_a_search_answering_another_charge_is_not_taken_for_the_first_one() -> None:
    charge = {"resourceType": "ChargeItem", "status": "billable", "code": {"text": "99213"},
              "subject": {"reference": "Patient/1"}}
    op = ModMedCreateResourceOperator(task_id="c", resource=charge, transaction_id="TX-42")
    unrelated = stored({**charge, "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "TX-other"}]}, "CHG|9")
    wire(op, create=ConflictError("create ChargeItem failed", status_code=409), search=[[unrelated]])
    with pytest.raises(Exception, match="create ChargeItem failed"):
        op.execute({})


def test_coverage_create_returns_the_reconciliation_id() -> None:
    coverage = {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "Patient/1"},
                "payor": [{"reference": "Organization/pay|7225"}]}
    op = ModMedCreateResourceOperator(task_id="c", resource=coverage)
    ext = {"url": "https://www.modmed.com/fhir/StructureDefinition/reconciliation-id", "valueString": "REC-7"}
    wire(op, create=lambda r, c: {**stored(r, "31"), "extension": [ext]})
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
    ({"resource": {"resourceType": "Patient"}, "if_none_exist": True}, Track.PROPRIETARY, "needs an identifier"),
    ({"resource": "{not json"}, Track.PROPRIETARY, "resource is not valid JSON .line 1 column 2."),
    ({"resource": None}, Track.PROPRIETARY, "resource must be a FHIR resource dict"),
    ({"resource": {"name": "x"}}, Track.PROPRIETARY, "needs a resourceType"),
])
def test_create_refuses_bad_input_before_any_call(kwargs: dict[str, Any], track: Track, needle: str) -> None:
    op = ModMedCreateResourceOperator(task_id="c", **kwargs)
    client = wire(op, track)
    with pytest.raises(AirflowFailException, match=needle) as info:
        op.execute({})
    assert client.calls == []
    assert "Qwertyphi" not in str(info.value) and "1971-13-45" not in str(info.value)


def test_validate_false_skips_the_r4b_check() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource={**PATIENT, "gender": 3}, validate=False)
    client = wire(op, create=lambda r, c: stored(r))
    op.execute({})
    assert len(client.calls) == 1


# -- read --------------------------------------------------------------------------------------------

def test_read_returns_the_summary_and_writes_the_file(tmp_path: Path) -> None:
    out_file = tmp_path / "deep" / "p.json"
    op = ModMedReadResourceOperator(task_id="r", resource_type="Patient", resource_id=12, output_path=str(out_file))
    client = wire(op, read=lambda rt, rid: stored(PATIENT, rid))
    out = op.execute({})
    assert client.calls == [("read", ("Patient", "12"))]
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
    assert client.calls == []


# -- update ------------------------------------------------------------------------------------------

def test_update_with_the_version_it_read() -> None:
    current = stored(PATIENT, "9", "3")
    op = ModMedUpdateResourceOperator(task_id="u", resource={**current, "gender": "female"})
    client = wire(op, update=lambda r, v: stored(r, "9", "4"))
    out = op.execute({})
    assert client.calls[0][1][1] == "3"
    assert (out["version_id"], out["previous_version_id"], out["changed"]) == ("4", "3", True)


def test_an_explicit_if_match_wins_over_meta() -> None:
    op = ModMedUpdateResourceOperator(task_id="u", resource=stored(PATIENT, "9", "3"), if_match='W/"2"')
    client = wire(op, update=lambda r, v: stored(r, "9", "4"))
    op.execute({})
    assert client.calls[0][1][1] == "2"


def test_a_stale_version_fails_at_once_and_says_nothing_was_written() -> None:
    op = ModMedUpdateResourceOperator(task_id="u", resource={**stored(PATIENT, "9", "1"), "gender": "male"})
    client = wire(op, update=ConflictError("update Patient failed", status_code=412),
                  read=lambda rt, rid: {**stored(PATIENT, "9", "2"), "gender": "female"})
    with pytest.raises(AirflowFailException, match=r"changed since version 1 \(now version 2\); nothing was written"):
        op.execute({})
    assert [c[0] for c in client.calls] == ["update", "read"]


def test_a_412_on_a_resent_put_that_already_landed_is_success() -> None:
    new = {**stored(PATIENT, "9", "1"), "gender": "male"}
    op = ModMedUpdateResourceOperator(task_id="u", resource=new)
    wire(op, update=ConflictError("update Patient failed", status_code=412),
         read=lambda rt, rid: {**new, "meta": {"versionId": "2"}})
    assert op.execute({})["version_id"] == "2"


def test_patch_reads_merges_and_writes_with_if_match() -> None:
    current = {**stored(PATIENT, "9", "5"), "gender": "female", "telecom": [{"system": "phone", "value": "1"}]}
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9",
                                      patch={"gender": "male", "telecom": None})
    client = wire(op, read=lambda rt, rid: current, update=lambda r, v: stored(r, "9", "6"))
    out = op.execute({})
    sent, version = client.calls[1][1]
    assert version == "5" and sent["gender"] == "male" and "telecom" not in sent and sent["name"] == PATIENT["name"]
    assert out["changed"] and out["version_id"] == "6"


def test_a_patch_that_changes_nothing_writes_nothing() -> None:
    current = {**stored(PATIENT, "9", "5"), "gender": "male"}
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9",
                                      patch=lambda r: {**r, "gender": "male"})
    client = wire(op, read=lambda rt, rid: current)
    out = op.execute({})
    assert [c[0] for c in client.calls] == ["read"]
    assert out["changed"] is False and out["version_id"] == "5"


def test_a_patch_conflict_is_retryable_but_an_expected_version_is_not() -> None:
    current = stored(PATIENT, "9", "5")
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9", patch={"gender": "male"})
    wire(op, read=[current, stored(PATIENT, "9", "6")], update=ConflictError("update Patient failed", status_code=412))
    with pytest.raises(ConflictError, match="nothing was written"):
        op.execute({})
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9", patch={"gender": "male"},
                                      if_match=4)
    client = wire(op, read=lambda rt, rid: current)
    with pytest.raises(AirflowFailException, match="at version 5, not the expected 4; nothing was written"):
        op.execute({})
    assert [c[0] for c in client.calls] == ["read"]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({}, "either resource= .* or patch="),
    ({"resource": PATIENT, "patch": {"a": 1}}, "either resource="),
    ({"resource": stored(PATIENT, "9", "1") | {"meta": {}}}, "needs the version"),
    ({"resource": PATIENT, "if_match": 1}, "needs its id"),
    ({"patch": {"gender": "male"}, "resource_id": "9"}, "patch= needs resource_type"),
    ({"patch": {"gender": "male"}, "resource_type": "Patient"}, "patch= needs resource_id"),
    ({"resource": {**stored(PATIENT), "resourceType": "Coverage"}}, "ModMed allows only create on Coverage"),
    ({"resource": {**stored(PATIENT), "gender": 5}}, "Patient.gender"),
    ({"resource": stored(PATIENT), "if_match": "W/\"1 OR 1\""}, "if_match must be a version id"),
])
def test_update_refuses_bad_input_before_any_call(kwargs: dict[str, Any], needle: str) -> None:
    op = ModMedUpdateResourceOperator(task_id="u", **kwargs)
    client = wire(op)
    with pytest.raises(AirflowFailException, match=needle):
        op.execute({})
    assert client.calls == []


def test_json_merge_patch() -> None:
    assert json_merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}, "f": [1]}) == \
        {"a": 1, "b": {"d": 3, "e": 4}, "f": [1]}
    assert json_merge_patch({"a": 1}, {"a": [{"x": None}]}) == {"a": [{"x": None}]}


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
    assert client.calls == []


def test_delete_is_idempotent() -> None:
    op = ModMedDeleteResourceOperator(task_id="d", resource_type="Patient", resource_id="1")
    wire(op, delete=NotFoundError("delete Patient failed", status_code=410))
    assert op.execute({})["was_present"] is False
    wire(op, delete=NotFoundError("delete Patient failed", status_code=404))
    with pytest.raises(NotFoundError):
        op.execute({})
    op.missing_ok = True
    wire(op, delete=NotFoundError("delete Patient failed", status_code=404))
    assert op.execute({})["deleted"] is True


# -- search ------------------------------------------------------------------------------------------

def patients(n: int) -> list[dict[str, Any]]:
    return [stored({"resourceType": "Patient", "name": [{"family": f"F{i}"}]}, str(i)) for i in range(1, n + 1)]


def test_search_writes_ndjson_and_returns_path_count_and_capped_ids(tmp_path: Path) -> None:
    rows = patients(5)
    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", search_params={"family": "F"},
                                       output_path=str(tmp_path / "p.ndjson"), max_ids=3)
    client = wire(op, search=[rows + rows[:2]])  # a page repeated (data moved while paging)
    out = op.execute({})
    assert out["count"] == 5 and out["ids"] == ["1", "2", "3"] and out["ids_truncated"] is True
    assert "resources" not in out
    lines = (tmp_path / "p.ndjson").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["1", "2", "3", "4", "5"]
    assert client.calls[0][1][1] == [("family", "F")]


def test_search_returns_resources_only_when_asked_and_capped(tmp_path: Path) -> None:
    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", output_path=str(tmp_path / "p.ndjson"),
                                       return_resources=True, max_xcom_resources=2)
    wire(op, search=[patients(4)])
    out = op.execute({})
    assert [r["id"] for r in out["resources"]] == ["1", "2"] and out["resources_truncated"] is True


def test_search_default_path(tmp_path: Path) -> None:
    from airflow.sdk import DAG

    with DAG("my_dag", schedule=None):
        op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", output_base=f"file://{tmp_path}")
    wire(op, search=[patients(1)])
    out = op.execute({"run_id": "manual__2026-01-01T00:00:00+00:00"})
    assert out["path"] == f"file://{tmp_path}/my_dag/manual__2026-01-01T00_00_00_00_00/s/Patient.ndjson"
    assert (tmp_path / "my_dag" / "manual__2026-01-01T00_00_00_00_00" / "s" / "Patient.ndjson").exists()


@pytest.mark.parametrize(("track", "rt", "start", "end", "expected", "mode"), [
    (Track.PROPRIETARY, "Patient", "2026-03-10T06:00:00Z", "2026-03-11T06:00:00Z",
     [("_lastUpdated", "gt2026-03-09"), ("_lastUpdated", "le2026-03-11")], "widened"),
    (Track.PROPRIETARY, "Patient", "2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z",
     [("_lastUpdated", "gt2026-03-09"), ("_lastUpdated", "le2026-03-10")], "widened"),
    (Track.PROPRIETARY, "Condition", "2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z", [], "scan"),
    (Track.CERTIFIED, "Condition", "2026-03-10T06:00:00.250Z", "2026-03-11T06:00:00Z",
     [("_lastUpdated", "ge2026-03-10T06:00:00.250Z"), ("_lastUpdated", "lt2026-03-11T06:00:00.000Z")], "exact"),
])
def test_search_window_per_track(tmp_path: Path, track: Track, rt: str, start: str, end: str,
                                 expected: list[tuple[str, str]], mode: str) -> None:
    inside = {"resourceType": rt, "id": "in", "meta": {"lastUpdated": "2026-03-10T12:00:00.000Z"}}
    before = {"resourceType": rt, "id": "before", "meta": {"lastUpdated": "2026-03-09T23:59:59.999Z"}}
    at_end = {"resourceType": rt, "id": "end", "meta": {"lastUpdated": end}}
    undated = {"resourceType": rt, "id": "undated"}
    op = ModMedSearchResourcesOperator(task_id="s", resource_type=rt, output_path=str(tmp_path / "o.ndjson"),
                                       last_updated_start=start, last_updated_end=end)
    client = wire(op, track, search=[[before, inside, at_end, undated]])
    out = op.execute({})
    assert client.calls[0][1][1] == expected
    assert out["ids"] == ["in", "undated"] and out["window"]["mode"] == mode


def test_incremental_takes_the_data_interval(tmp_path: Path) -> None:
    import pendulum

    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", output_path=str(tmp_path / "o.ndjson"),
                                       incremental=True)
    client = wire(op, search=[[]])
    out = op.execute({"data_interval_start": pendulum.datetime(2026, 3, 10, tz="UTC"),
                      "data_interval_end": pendulum.datetime(2026, 3, 11, tz="UTC")})
    assert client.calls[0][1][1] == [("_lastUpdated", "gt2026-03-09"), ("_lastUpdated", "le2026-03-10")]
    assert out["count"] == 0 and (tmp_path / "o.ndjson").read_text() == ""


@pytest.mark.parametrize(("kwargs", "context", "needle"), [
    ({"incremental": True}, {}, "needs a data interval"),
    ({"incremental": True}, {"data_interval_start": "2026-01-01T00:00:00Z",
                             "data_interval_end": "2026-01-01T00:00:00Z"}, "empty data interval"),
    ({"incremental": True, "last_updated_start": "2026-01-01"}, {}, "do not also pass"),
    ({"last_updated_start": "2026-02-01", "last_updated_end": "2026-01-01"}, {}, "ends .* before it starts"),
    ({"last_updated_start": "yesterday"}, {}, "not an ISO 8601"),
    ({"last_updated_start": "2026-01-01", "search_params": {"_lastUpdated": "gt2025-01-01"}}, {}, "not both"),
    ({"resource_type": "Immunization"}, {}, "track='certified'"),
    ({"resource_type": "Account"}, {}, "requires search parameter.s. patient"),
    ({"max_ids": -1}, {}, "must be >= 0"),
])
def test_search_refuses_bad_input_before_any_call(tmp_path: Path, kwargs: dict[str, Any], context: dict[str, Any],
                                                  needle: str) -> None:
    op = ModMedSearchResourcesOperator(**{"task_id": "s", "resource_type": "Patient",
                                          "output_path": str(tmp_path / "o.ndjson"), **kwargs})
    client = FakeClient(Track.PROPRIETARY)
    op.__dict__["hook"] = FakeHook(Track.PROPRIETARY, client)
    # the real client runs the search flow's pre-flight: emulate it by letting it raise here
    from airflow_provider_modmed.client import _flows

    client.answers["search"] = lambda rt, params, kw: list(_flows.search(client.context, rt, params))
    with pytest.raises(AirflowFailException, match=needle):
        op.execute(context)
    assert not (tmp_path / "o.ndjson").exists()


# -- rendering, lineage, kill ------------------------------------------------------------------------

def test_rendered_templates_keep_patient_data_out() -> None:
    op = ModMedCreateResourceOperator(task_id="c", resource={**PATIENT, "gender": "{{ params.g }}"},
                                      if_none_exist="identifier=urn:mrn|{{ params.mrn }}")
    op.render_template_fields({"params": {"g": "female", "mrn": "MRN-1"}})
    assert op.resource == {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": MASK}],
                           "name": [{"family": MASK, "given": [MASK]}], "birthDate": MASK, "gender": MASK}
    assert op.if_none_exist == f"identifier={MASK}"
    client = wire(op, create=lambda r, c: stored(r))
    op.execute({})
    sent, condition = client.calls[0][1]
    assert sent["gender"] == "female" and sent["name"][0]["family"] == "Qwertyphi"
    assert condition == "identifier=urn:mrn|MRN-1"


def test_search_params_keep_control_parameters_visible() -> None:
    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient",
                                       search_params={"family": "{{ params.f }}", "_count": "10",
                                                      "_lastUpdated": "gt{{ ds }}"})
    op.render_template_fields({"params": {"f": "Qwertyphi"}, "ds": "2026-01-01"})
    assert op.search_params == {"family": MASK, "_count": "10", "_lastUpdated": "gt2026-01-01"}
    assert op.phi_value("search_params")["family"] == "Qwertyphi"


def test_a_callable_patch_is_not_called_by_the_renderer() -> None:
    calls: list[Any] = []
    op = ModMedUpdateResourceOperator(task_id="u", resource_type="Patient", resource_id="9",
                                      patch=lambda r: calls.append(r) or r)
    op.render_template_fields({})
    assert calls == []


def test_on_kill_closes_the_client() -> None:
    op = ModMedReadResourceOperator(task_id="r", resource_type="Patient", resource_id="1")
    op.on_kill()  # nothing opened yet: no error
    client = wire(op)
    op.on_kill()
    assert client.closed == 1


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
    ns = "modmed://stage.ema-api.com/apiportal"
    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", output_path=str(tmp_path / "p.ndjson"))
    wire(op, search=[[]])
    op.execute({})
    lineage = op.get_openlineage_facets_on_complete(None)
    assert pairs(lineage.inputs) == [(ns, "Patient")]
    assert pairs(lineage.outputs) == [("file", str(tmp_path / "p.ndjson"))]
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
