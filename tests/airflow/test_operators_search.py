"""ModMedSearchResourcesOperator inside real DAG runs (dag.test() on SQLite) against a sandbox of this module's
own: every match on both tracks reaches the NDJSON file, parameters and the default path, the incremental
window kept exactly, and bad input failing before any call. (The DAGs: dags/operators_resources.py.) Against a
fake FHIR server (the sandbox ignores ``_include``): included resources kept out of the file, separated or
dropped, and a wrong-type match failing the task (dags/operators_search_includes.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import connections_env, sandbox_connections, served
from tests.airflow.test_operators_resources import body, output, rendered, result, task_instances, truth

pytestmark = [pytest.mark.airflow, pytest.mark.integration]
Cap = pytest.CaptureFixture[str]
Log = pytest.LogCaptureFixture

DAGS = Path(__file__).parent / "dags" / "operators_resources.py"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(patients=12, seed=31, rate_limit_per_minute=100_000) as server:
        yield server


@pytest.fixture(scope="module")
def modmed_connections(sandbox: SandboxServer) -> Iterator[dict[str, dict[str, Any]]]:
    with sandbox_connections(sandbox) as conns:
        yield conns


# -- search ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("conn_id", "rt"), [("modmed_default", "Patient"), ("modmed_certified", "Patient"),
                                             ("modmed_certified", "Immunization"),
                                             ("modmed_proprietary_cc", "Condition")])
def test_search_streams_every_match_on_both_tracks(sb: SandboxServer, run_dag: Any, tmp_path: Path,
                                                   conn_id: str, rt: str) -> None:
    out_file = tmp_path / f"{rt}.ndjson"
    live = [served(conn_id, rid) for rid, (_, deleted) in truth(sb, rt).items() if not deleted]
    run = run_dag(DAGS, "modmed_op_search", run_conf={"conn_id": conn_id, "resource_type": rt,
                                                      "output_path": str(out_file)})
    assert run.state == "success", task_instances(run)
    out = result(run, "search")
    written = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert sorted(r["id"] for r in written) == sorted(live)
    assert out["count"] == len(live) and sorted(out["ids"]) == sorted(live) and not out["ids_truncated"]
    assert out["path"] == f"file://{out_file}"
    assert result(run, "count_lines") == len(live)  # the TaskFlow consumer read the file through the XCom


def test_search_with_parameters_and_the_default_path(sb: SandboxServer, run_dag: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__MODMED__OUTPUT_BASE", f"file://{tmp_path}")  # [modmed] output_base
    family = body(sb, "Patient", "5")["name"][0]["family"]
    expected = [r.id for r in sb.app_state.store.search("Patient", [], count=1000)[0]
                if r.body["name"][0]["family"] == family]
    run = run_dag(DAGS, "modmed_op_search", run_conf={"search_params": {"family": family}})
    out = result(run, "search")
    assert sorted(out["ids"]) == sorted(expected)
    assert out["path"].startswith(f"file://{tmp_path}/modmed_op_search/manual__")
    assert out["path"].endswith("/search/Patient.ndjson")
    assert len((tmp_path / out["path"][len(f"file://{tmp_path}/"):]).read_text().splitlines()) == len(expected)
    assert "family" in rendered(run)["search"]["search_params"]
    assert rendered(run)["search"]["search_params"]["family"] == "***"


def _window_day(sb: SandboxServer, rt: str) -> datetime:
    """A day on which some (but not all) resources of ``rt`` were last updated."""
    days: dict[str, int] = {}
    for r in sb.app_state.store.ground_truth(rt):
        days[r["lastUpdated"][:10]] = days.get(r["lastUpdated"][:10], 0) + 1
    day = max(days, key=lambda d: days[d])
    return datetime.fromisoformat(day).replace(tzinfo=timezone.utc)


@pytest.mark.parametrize(("conn_id", "rt", "mode"), [("modmed_default", "Patient", "widened"),
                                                     ("modmed_default", "Condition", "scan"),
                                                     ("modmed_certified", "Patient", "exact")])
def test_incremental_search_keeps_exactly_the_data_interval(sb: SandboxServer, run_dag: Any, conn_id: str,
                                                            rt: str, mode: str) -> None:
    day = _window_day(sb, rt)
    # a window that starts and ends mid-day: the proprietary track can only ask for whole days
    start, end = day + timedelta(hours=6), day + timedelta(days=1, hours=6)
    run = run_dag(DAGS, "modmed_op_search_incremental", logical_date=end,
                  run_conf={"conn_id": conn_id, "resource_type": rt})
    assert run.state == "success", task_instances(run)
    assert (run.data_interval_start, run.data_interval_end) == (start, end)
    out = result(run, "search")
    expected = sorted(served(conn_id, r["id"]) for r in sb.app_state.store.ground_truth(rt) if not r["deleted"]
                      and start <= datetime.fromisoformat(r["lastUpdated"].replace("Z", "+00:00")) < end)
    assert sorted(out["ids"]) == expected and out["count"] == len(expected)
    assert out["window"]["mode"] == mode


def test_bad_input_fails_before_any_network_call(sb: SandboxServer, run_dag: Any, capfd: Cap, caplog: Log) -> None:
    capfd.readouterr()
    before = sb.stats()["requests"]
    run = run_dag(DAGS, "modmed_op_search", run_conf={"resource_type": "Immunization"})
    assert run.state == "failed"
    assert task_instances(run)["search"]["try_number"] == 1  # failed at once: no retry spent
    assert sb.stats()["requests"] == before
    assert "use a connection with track='certified'" in output(capfd, caplog)


# -- included resources and wrong-type matches (issue 13): a fake FHIR server, as the sandbox ignores _include --

INCLUDE_DAGS = Path(__file__).parent / "dags" / "operators_search_includes.py"


@pytest.fixture(scope="module")
def fake_search() -> Iterator[Any]:
    from tests.integration.search_server import airflow_connection, search_server

    with search_server() as server, connections_env({"modmed_fake_search": airflow_connection(server)}):
        yield server


def test_included_resources_never_reach_the_patient_file(fake_search: Any, run_dag: Any, tmp_path: Path) -> None:
    from tests.integration.search_server import ORG

    run = run_dag(INCLUDE_DAGS, "modmed_op_search_includes", run_conf={
        "search_params": {"_include": "Patient:organization"}, "out": str(tmp_path)})
    assert run.state == "success", task_instances(run)
    separate, drop = result(run, "separate"), result(run, "drop")
    for out, folder in ((separate, "separate"), (drop, "drop")):
        rows = [json.loads(x) for x in (tmp_path / folder / "Patient.ndjson").read_text().splitlines()]
        assert [(r["resourceType"], r["id"]) for r in rows] == [("Patient", "p1"), ("Patient", "p2"), ("Patient", "p3")]
        assert out["count"] == 3 and out["ids"] == ["p1", "p2", "p3"]
    org_file = tmp_path / "separate" / "Patient.include.Organization.ndjson"
    assert separate["included"] == {
        "Organization": {"path": f"file://{org_file}", "count": 1},
        "Patient": {"path": f"file://{tmp_path}/separate/Patient.include.Patient.ndjson", "count": 1}}
    assert [json.loads(x) for x in org_file.read_text().splitlines()] == [ORG]
    assert separate["included_dropped"] == 0
    assert drop["included"] == {} and drop["included_dropped"] == 3
    assert sorted(p.name for p in (tmp_path / "drop").iterdir()) == ["Patient.ndjson"]


def test_a_wrong_type_match_fails_the_task_without_patient_data(fake_search: Any, run_dag: Any, tmp_path: Path,
                                                                capsys: Cap, caplog: Log) -> None:
    from tests.integration.search_server import SECRET_NAME

    run = run_dag(INCLUDE_DAGS, "modmed_op_search_includes", run_conf={
        "search_params": {"family": "wrong"}, "out": str(tmp_path)})
    assert run.state == "failed"
    assert {t: s["state"] for t, s in task_instances(run).items()} == {"separate": "failed", "drop": "failed"}
    captured = capsys.readouterr()
    logged = captured.out + captured.err + caplog.text
    assert "answered a match of type Observation: a Patient search must return Patient resources" in logged
    assert SECRET_NAME not in logged
    for folder in ("separate", "drop"):
        assert "Observation" not in (tmp_path / folder / "Patient.ndjson").read_text()
