"""Shared operator helpers: masking of rendered values, JSON arguments, lineage datasets. (The
_lastUpdated window, instants and the NDJSON writer moved to the client: test_window.py,
test_instants.py, test_ndjson.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_modmed.errors import ConfigurationError
from airflow_provider_modmed.operators._common import (
    MASK,
    ModMedBaseOperator,
    masked_shape,
    parse_json_arg,
    storage_dataset,
)


@pytest.mark.parametrize(("value", "expected"), [
    ({"resourceType": "Patient", "id": "7", "name": [{"family": "X", "use": "official"}], "active": True},
     {"resourceType": "Patient", "id": "7", "name": [{"family": MASK, "use": "official"}], "active": True}),
    ([("family", "X"), ("_count", "5")], [["family", MASK], ["_count", "5"]]),
    ("family=X&_sort=-_lastUpdated", f"family={MASK}&_sort=-_lastUpdated"),
    ('{"resourceType": "Patient", "birthDate": "1970-01-01"}', {"resourceType": "Patient", "birthDate": MASK}),
    ("{broken json with Name", MASK),
    ("plain text with a name", MASK),
    ("x=1&{weird key}=2", f"x={MASK}&{MASK}={MASK}"),
    (None, None),
    (12345, MASK),
])
def test_masked_shape(value: Any, expected: Any) -> None:
    assert masked_shape(value, show_underscore_keys=True) == expected


def test_parse_json_arg() -> None:
    assert parse_json_arg('{"a": 1}', "x") == {"a": 1}
    assert parse_json_arg("identifier=a|b", "x") == "identifier=a|b"
    assert parse_json_arg({"a": 1}, "x") == {"a": 1}
    with pytest.raises(ConfigurationError, match=r"x is not valid JSON \(line 1 column 9\)") as info:
        parse_json_arg('{"name":Qwertyphi}', "x")
    assert "Qwertyphi" not in str(info.value)


def test_storage_dataset() -> None:
    assert storage_dataset("/tmp/a.ndjson") == ("file", "/tmp/a.ndjson")
    assert storage_dataset("file:///tmp/a.ndjson") == ("file", "/tmp/a.ndjson")
    assert storage_dataset("s3://conn@bucket/k/a.ndjson") == ("s3://bucket", "k/a.ndjson")
    assert storage_dataset("gs://bucket/a.ndjson") == ("gs://bucket", "a.ndjson")


# -- patient data stays out of the rendered template fields (public Airflow API only) -------------

class _PhiOperator(ModMedBaseOperator):
    template_fields = ("modmed_conn_id", "note", "resource")
    phi_template_fields = ("note", "resource")

    def __init__(self, *, note: Any = None, resource: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.note = note
        self.resource = resource


RESOURCE = {"resourceType": "Patient", "name": [{"family": "{{ params.f }}", "use": "official"}]}


def _stored(task: Any) -> str:
    """What the task runner stores as the task's rendered fields (the UI's Rendered Template view)."""
    import json

    from airflow.sdk.execution_time.task_runner import _serialize_rendered_fields

    return json.dumps(_serialize_rendered_fields(task))


def test_rendered_fields_are_masked_and_execute_reads_the_real_values() -> None:
    op = _PhiOperator(task_id="t", modmed_conn_id="{{ params.conn }}", note="Scan for {{ params.f }}",
                      resource=RESOURCE)
    op.render_template_fields({"params": {"f": "Qwertyphi", "conn": "modmed_default"}})  # type: ignore[arg-type]
    assert op.modmed_conn_id == "modmed_default"  # not patient data: rendered as usual
    assert op.note == MASK and op.resource == {"resourceType": "Patient", "name": [{"family": MASK,
                                                                                     "use": "official"}]}
    assert op.phi_value("note") == "Scan for Qwertyphi"
    assert op.phi_value("resource")["name"][0]["family"] == "Qwertyphi"
    assert "Qwertyphi" not in _stored(op)
    op.render_template_fields({"params": {"f": "Other"}})  # type: ignore[arg-type]  # the first values stay
    assert op.phi_value("note") == "Scan for Qwertyphi"


def test_a_callable_field_value_is_masked_too() -> None:
    op = _PhiOperator(task_id="t", note=lambda context, jinja_env: f"note on {context['params']['f']}")
    op.render_template_fields({"params": {"f": "Qwertyphi"}})  # type: ignore[arg-type]
    assert op.note == MASK and op.phi_value("note") == "note on Qwertyphi"


def test_a_mapped_task_is_masked_as_well() -> None:
    """Airflow renders an expanded task without calling its render_template_fields: the masking must
    still apply, to the expanded and the partial values alike."""
    from types import SimpleNamespace

    import pendulum
    from airflow.sdk import DAG

    with DAG("phi_mapped", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
             params={"f": "Qwertyphi"}) as dag:
        mapped = _PhiOperator.partial(task_id="t", resource=RESOURCE).expand(
            note=["Scan for {{ params.f }}", "second"])
    context: dict[str, Any] = {"ti": SimpleNamespace(map_index=0, task=mapped), "task": mapped, "dag": dag,
                               "dag_run": SimpleNamespace(conf={})}
    mapped.render_template_fields(context)  # type: ignore[arg-type]
    task = context["task"]
    assert isinstance(task, _PhiOperator) and task is not mapped
    assert task.note == MASK and task.phi_value("note") == "Scan for Qwertyphi"
    assert task.phi_value("resource")["name"][0]["family"] == "Qwertyphi"
    assert "Qwertyphi" not in _stored(task)


def test_task_folder_is_path_safe_and_names_the_map_index() -> None:
    from types import SimpleNamespace

    op = _PhiOperator(task_id="group.my-task")
    run_id = "manual__2026-01-01T00:00:00+00:00"
    assert op.task_folder({"run_id": run_id, "ti": SimpleNamespace(map_index=-1)}) == \
        "manual__2026-01-01T00_00_00_00_00/group.my-task"  # type: ignore[arg-type]
    assert op.task_folder({"run_id": run_id, "ti": SimpleNamespace(map_index=3)}) == \
        "manual__2026-01-01T00_00_00_00_00/group.my-task_3"  # type: ignore[arg-type]
