"""ModMedChangesSensor in real DAG runs (dag.test(), SQLite, the sandbox): poke, reschedule and deferrable
modes on a closed window, and continuous polling with a state file, deferred until a change lands."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client.instants import format_instant, now_ms
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

DAGS = Path(__file__).parent / "dags" / "changes_sensor_dags.py"


def create_patient(sb: SandboxServer, name: str) -> str:
    return sb.app_state.store.create({"resourceType": "Patient", "name": [{"family": name}]}).id


def results(run: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(task states, the sensor's reference, what the downstream task read) of a DagRun."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = {ti.task_id: ti for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id,
                                                                          TaskInstance.dag_id == run.dag_id)}
        states = {t: ti.state for t, ti in tis.items()}
        reference = tis["changes"].xcom_pull(task_ids="changes", session=session)
        read = tis["read_change_set"].xcom_pull(task_ids="read_change_set", session=session)
        states["_changes_seconds"] = (tis["changes"].end_date - tis["changes"].start_date).total_seconds()
    return states, reference, read


def rendered_search_params(run: Any) -> Any:
    """What the "Rendered Template" view stores for the sensor's search_params."""
    from airflow.models import TaskInstance
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id, TaskInstance.dag_id == run.dag_id,
                                                TaskInstance.task_id == "changes").one()
        return (RenderedTaskInstanceFields.get_templated_fields(ti, session=session) or {}).get("search_params")


def reschedules(run: Any) -> int:
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(TaskReschedule).join(TaskReschedule.task_instance).filter(
            TaskReschedule.task_instance.has(run_id=run.run_id, dag_id=run.dag_id)).count()


@pytest.mark.parametrize("mode", ["poke", "reschedule", "deferrable"])
def test_sensor_waits_for_its_window_to_settle_then_hands_over_the_change_set(
        sb: SandboxServer, run_dag: Any, tmp_path: Path, mode: str) -> None:
    since = now_ms()
    ids = [create_patient(sb, f"Window{mode}{i}") for i in range(3)]
    row = sb.app_state.store.get("Patient", ids[0])
    assert row is not None
    sb.app_state.store.update({**row.body})  # the same resource twice: reported once, in version 2
    until = now_ms() + 4000  # the window is still open when the run starts, even on a loaded machine
    conf = {"since": format_instant(since), "until": format_instant(until), "output_path": f"file://{tmp_path}/out"}

    run = run_dag(DAGS, f"modmed_changes_window_{mode}", run_conf=conf)

    states, reference, read = results(run)
    assert run.state == "success", states
    assert states["changes"] == states["read_change_set"] == "success"
    assert reference["count"] == 3 and reference["strategy"] == "day" and reference["track"] == "proprietary"
    assert sorted((c["id"], c["versionId"]) for c in reference["changes"]) == sorted(
        [(ids[0], "2"), (ids[1], "1"), (ids[2], "1")])
    assert reference["window"] == {"start": conf["since"], "end": conf["until"]}
    assert reference["path"].startswith(f"file://{tmp_path}/out/Patient-") and reference["path"].endswith(".ndjson")
    assert sorted(read["ids"]) == sorted(ids)  # the resources are in the file, not in XCom
    assert "name" not in json.dumps(reference)
    if mode == "poke":
        assert states["_changes_seconds"] >= 1.0  # it poked until the window's end + lookback
    if mode == "reschedule":
        assert reschedules(run) >= 1  # the worker slot was released between pokes
    if mode == "deferrable":
        assert reference["trigger"]["polls"] == 1  # the trigger slept until the window settled, polled once


def test_an_empty_window_skips(sb: SandboxServer, run_dag: Any, tmp_path: Path) -> None:
    conf = {"since": "2001-01-01T00:00:00.000Z", "until": "2001-01-01T01:00:00.000Z",
            "output_path": f"file://{tmp_path}/out"}
    run = run_dag(DAGS, "modmed_changes_window_poke", run_conf=conf)
    states, reference, _ = results(run)
    assert states["changes"] == "skipped" and reference is None


def create_after_the_trigger_polled(sb: SandboxServer, name: str, out: list[str]) -> threading.Thread:
    """Create a patient once the sensor's first poke and its trigger's first poll have happened."""
    baseline = sb.stats().get("requests:proprietary", 0)

    def later() -> None:
        deadline = time.monotonic() + 60
        while sb.stats().get("requests:proprietary", 0) < baseline + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        out.append(create_patient(sb, name))

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def test_continuous_polling_defers_until_a_change_and_never_repeats_one(
        sb: SandboxServer, run_dag: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    family = f"Continuous{now_ms()}"  # only this test's patients match: one call per poll, whatever else changed
    conf = {"since": format_instant(now_ms()), "state_path": f"file://{state}", "output_path": f"file://{tmp_path}/out",
            "search_params": {"family": family}}
    created: list[str] = []
    thread = create_after_the_trigger_polled(sb, family, created)

    first = run_dag(DAGS, "modmed_changes_state_deferrable", run_conf=conf)

    thread.join(5)
    states, reference, read = results(first)
    assert first.state == "success", states
    assert [c["id"] for c in reference["changes"]] == created and read["ids"] == created
    assert reference["trigger"]["polls"] >= 2 and reference["generation"] == 1  # it deferred, then waited
    assert rendered_search_params(first) == {"family": "***"}  # a search value may be patient data
    (state_file,) = state.rglob("*.json")
    saved = json.loads(state_file.read_text())
    assert saved["generation"] == 1 and created[0] in saved["cursor"]["seen"]
    assert saved["last_change_set"] == reference["path"]

    # between runs: the watched patient changes again and another one is created; the next run (poke mode,
    # same state file) reports exactly those two, not the first change again
    row = sb.app_state.store.get("Patient", created[0])
    assert row is not None
    sb.app_state.store.update({**row.body})
    other = create_patient(sb, family)
    create_patient(sb, "SomeoneElse")  # not matched by the search parameters
    second = run_dag(DAGS, "modmed_changes_state_poke", run_conf=conf)
    states, reference2, read2 = results(second)
    assert second.state == "success", states
    assert sorted((c["id"], c["versionId"]) for c in reference2["changes"]) == sorted(
        [(created[0], "2"), (other, "1")])
    assert reference2["generation"] == 2 and reference2["path"] != reference["path"]
    assert sorted(zip(read2["ids"], read2["versions"], strict=True)) == sorted([(created[0], "2"), (other, "1")])
    assert json.loads(state_file.read_text())["generation"] == 2


def test_state_commit_refuses_a_concurrent_writer(sb: SandboxServer, modmed_connections: Any,
                                                  tmp_path: Path) -> None:
    from airflow_provider_modmed.errors import ConfigurationError
    from airflow_provider_modmed.sensors.changes import ModMedChangesSensor, StateConflictError

    sensor = ModMedChangesSensor(task_id="changes", resource_type="Patient", state_path=f"file://{tmp_path}/state",
                                 output_path=f"file://{tmp_path}/out/", since=format_instant(now_ms()), lookback=1)
    assert sensor.deferrable is False  # [operators] default_deferrable is not set here
    context: dict[str, Any] = {"run_id": "manual"}
    new_id = create_patient(sb, "Concurrent")
    mine, theirs = sensor._plan(context), sensor._plan(context)  # two runs read the same state
    first = sensor._collect(context, mine)
    assert first is not None and first["generation"] == 1 and [c["id"] for c in first["changes"]] == [new_id]
    with pytest.raises(StateConflictError, match="max_active_runs=1"):
        sensor._collect(context, theirs)
    assert sensor._collect(context, sensor._plan(context)) is None  # from the saved state: nothing new

    window = ModMedChangesSensor(task_id="w", resource_type="Patient")
    with pytest.raises(ConfigurationError, match="schedule=None"):
        window._plan({"data_interval_start": "2026-01-01T00:00:00Z", "data_interval_end": "2026-01-01T00:00:00Z"})
    with pytest.raises(ConfigurationError, match="until"):
        ModMedChangesSensor(task_id="x", resource_type="Patient", state_path="file:///tmp/s", until="2026-01-01")


def test_errors_no_retry_can_fix_fail_the_task_at_once(sb: SandboxServer, modmed_connections: Any,
                                                       tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_provider_modmed.sensors.changes import ModMedChangesSensor

    sensor = ModMedChangesSensor(task_id="changes", resource_type="Immunization", since="2026-01-01T00:00:00Z",
                                 output_path=f"file://{tmp_path}/out/")
    with pytest.raises(AirflowFailException, match=r"CapabilityError.*certified"):
        sensor.poke({"run_id": "manual"})
    lineage = ModMedChangesSensor(task_id="l", resource_type="Patient", output_path=f"file://{tmp_path}/out/")
    inputs, outputs = lineage.lineage_datasets()
    assert inputs[0][1] == "Patient" and inputs[0][0].startswith("modmed://127.0.0.1:")
    assert outputs == [("file", f"{tmp_path}/out/")]
