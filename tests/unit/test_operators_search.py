"""ModMedSearchResourcesOperator without a network: arguments, the window it hands the client, the file,
XCom and lineage. A search-only fake client answers canned rows; the search flow's own pre-flight runs
for the refusals. (The window and de-duplication themselves: test_window.py and test_ndjson.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.operators._common import MASK
from airflow_provider_modmed.operators.search import ModMedSearchResourcesOperator
from tests.unit.operator_fakes import FakeHook


@dataclass
class FakeClient:
    """A search-only client: records calls, answers from ``answers["search"]`` (rows, a list of row lists
    taken in turn, or a callable)."""

    track: Track
    answers: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def context(self) -> FhirContext:
        return FhirContext(self.track, "https://x.example/fhir")

    def search(self, rt: str, params: Any = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.calls.append(("search", (rt, params, kwargs)))
        answer = self.answers.get("search")
        if isinstance(answer, list):
            answer = answer.pop(0)
        return iter((answer(rt, params, kwargs) if callable(answer) else answer) or [])


def wire(op: Any, track: Track = Track.PROPRIETARY, **answers: Any) -> FakeClient:
    client = FakeClient(track, answers)
    op.__dict__["hook"] = FakeHook(track, client)
    return client


def stored(resource: dict[str, Any], rid: str = "9", version: str = "1") -> dict[str, Any]:
    return {**resource, "id": rid, "meta": {"versionId": version, "lastUpdated": "2026-01-02T03:04:05.000Z"}}


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
    ({"includes": "merge"}, {}, "includes must be one of 'separate', 'drop'"),
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


def test_search_params_keep_control_parameters_visible() -> None:
    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient",
                                       search_params={"family": "{{ params.f }}", "_count": "10",
                                                      "_lastUpdated": "gt{{ ds }}"})
    op.render_template_fields({"params": {"f": "Qwertyphi"}, "ds": "2026-01-01"})
    assert op.search_params == {"family": MASK, "_count": "10", "_lastUpdated": "gt2026-01-01"}
    assert op.phi_value("search_params")["family"] == "Qwertyphi"


def test_the_search_closes_its_client(tmp_path: Path) -> None:
    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", output_path=str(tmp_path / "p.ndjson"))
    wire(op, search=[[]])
    op.execute({})
    assert op.hook.closed == 1


def test_openlineage_datasets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys
    import types

    class Dataset:
        def __init__(self, namespace: str, name: str) -> None:
            self.namespace, self.name = namespace, name

    class OperatorLineage:
        def __init__(self, inputs: list[Any], outputs: list[Any]) -> None:
            self.inputs, self.outputs = inputs, outputs

    extractors = types.ModuleType("airflow.providers.openlineage.extractors")
    extractors.OperatorLineage = OperatorLineage  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage", types.ModuleType("airflow.providers.openlineage"))
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage.extractors", extractors)
    import airflow.providers.common.compat.openlineage.facet as facet

    monkeypatch.setattr(facet, "Dataset", Dataset, raising=False)
    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", output_path=str(tmp_path / "p.ndjson"))
    wire(op, search=[[]])
    op.execute({})
    lineage = op.get_openlineage_facets_on_complete(None)
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("modmed://stage.ema-api.com/apiportal", "Patient")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("file", str(tmp_path / "p.ndjson"))]


def test_included_resources_are_pushed_as_paths_and_counts(tmp_path: Path) -> None:
    from airflow_provider_modmed.client._flows import Included

    org = Included({"resourceType": "Organization", "id": "o1", "name": "Clinic"})
    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", output_path=str(tmp_path / "p.ndjson"),
                                       search_params={"_include": "Patient:organization"})
    client = wire(op, search=[[*patients(2), org, org]])
    out = op.execute({})
    assert client.calls[0][1][2]["includes"] is True  # the operator asks the client for the included ones
    org_file = tmp_path / "p.include.Organization.ndjson"
    assert out["included"] == {"Organization": {"path": f"file://{org_file}", "count": 1}}
    assert out["included_dropped"] == 0 and out["count"] == 2 and out["ids"] == ["1", "2"]
    assert [json.loads(x)["id"] for x in (tmp_path / "p.ndjson").read_text().splitlines()] == ["1", "2"]
    assert [json.loads(x) for x in org_file.read_text().splitlines()] == [dict(org)]
    assert op.lineage_datasets()[1] == [("file", str(tmp_path / "p.ndjson")), ("file", str(org_file))]

    op = ModMedSearchResourcesOperator(task_id="s", resource_type="Patient", includes="drop",
                                       output_path=str(tmp_path / "d" / "p.ndjson"))
    wire(op, search=[[*patients(2), org, org]])
    out = op.execute({})
    assert out["included"] == {} and out["included_dropped"] == 2 and out["count"] == 2
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["p.ndjson"]


def test_still_importable_from_operators_resources() -> None:
    from airflow_provider_modmed.operators.resources import ModMedSearchResourcesOperator as Moved

    assert Moved is ModMedSearchResourcesOperator
