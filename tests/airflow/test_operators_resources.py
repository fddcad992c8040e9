"""The resource operators inside real DAG runs (dag.test() on SQLite) against a sandbox of this module's own:
the sandbox's state afterwards shows exactly the intended change, retries leave one resource, stale
versions change nothing, bad input makes no call, and no patient data reaches logs, rendered templates
or XCom."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.profile import TRANSACTION_ID_SYSTEM
from airflow_provider_modmed.sandbox.seed import MRN_SYSTEM
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import sandbox_connections, served

pytestmark = [pytest.mark.airflow, pytest.mark.integration]
Cap = pytest.CaptureFixture[str]
Log = pytest.LogCaptureFixture

DAGS = Path(__file__).parent / "dags" / "operators_resources.py"


# -- this module's sandbox (it writes: the session sandbox stays as seeded for other modules) ---------

@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(patients=12, seed=31, rate_limit_per_minute=100_000) as server:
        yield server


@pytest.fixture(scope="module")
def modmed_connections(sandbox: SandboxServer) -> Iterator[dict[str, dict[str, Any]]]:
    with sandbox_connections(sandbox) as conns:
        yield conns


# -- helpers ---------------------------------------------------------------------------------------

def truth(sb: SandboxServer, rt: str) -> dict[str, tuple[str, bool]]:
    return {r["id"]: (r["versionId"], r["deleted"]) for r in sb.app_state.store.ground_truth(rt)}


def body(sb: SandboxServer, rt: str, rid: str) -> dict[str, Any]:
    row = sb.app_state.store.get(rt, rid)
    assert row is not None
    return row.body


def output(capfd: Cap, caplog: Log) -> str:
    """What the task logs printed (Airflow's structlog writes to stdout or stderr) and logged."""
    captured = capfd.readouterr()
    return captured.out + captured.err + caplog.text


def task_instances(run: Any) -> dict[str, Any]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter(TaskInstance.dag_id == run.dag_id,
                                                  TaskInstance.run_id == run.run_id).all()
        return {ti.task_id: {"state": ti.state, "try_number": ti.try_number} for ti in rows}


def xcoms(run: Any) -> dict[tuple[str, str], Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id).all()
        return {(x.task_id, x.key): XComModel.deserialize_value(x) for x in rows}


def rendered(run: Any) -> dict[str, Any]:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(RTIF).filter(RTIF.dag_id == run.dag_id, RTIF.run_id == run.run_id).all()
        return {r.task_id: r.rendered_fields for r in rows}


def result(run: Any, task_id: str) -> Any:
    return xcoms(run).get((task_id, "return_value"))


def patient(family: str, mrn: str, birth: str = "1971-02-03") -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
            "name": [{"use": "official", "family": family, "given": ["Opheliaphi"]}], "birthDate": birth,
            "gender": "female"}


def changed(before: dict[str, tuple[str, bool]], after: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    return {rid: (before.get(rid), after.get(rid)) for rid in set(before) | set(after)
            if before.get(rid) != after.get(rid)}


# -- CRUD ------------------------------------------------------------------------------------------

def test_crud_on_the_proprietary_track_changes_exactly_one_patient(sb: SandboxServer, run_dag: Any) -> None:
    before = truth(sb, "Patient")
    new = patient("Crudtestphi", "MRN-CRUD-1")
    run = run_dag(DAGS, "modmed_op_create", run_conf={"resource": new, "if_none_exist": True})
    assert run.state == "success", task_instances(run)
    created = result(run, "create")
    rid = created["id"]
    assert changed(before, truth(sb, "Patient")) == {rid: (None, ("1", False))}
    assert body(sb, "Patient", rid)["name"] == new["name"]
    assert "resource" not in created and created["version_id"] == "1"

    run = run_dag(DAGS, "modmed_op_read", run_conf={"resource_id": rid})
    assert result(run, "read") == {"resource_type": "Patient", "id": rid, "version_id": "1",
                                   "last_updated": body(sb, "Patient", rid)["meta"]["lastUpdated"]}

    before = truth(sb, "Patient")
    run = run_dag(DAGS, "modmed_op_update", run_conf={"resource_type": "Patient", "resource_id": rid,
                                                      "patch": {"gender": "male", "telecom": [
                                                          {"system": "phone", "value": "555-0100"}]}})
    assert run.state == "success", task_instances(run)
    assert changed(before, truth(sb, "Patient")) == {rid: (("1", False), ("2", False))}
    stored = body(sb, "Patient", rid)
    assert stored["gender"] == "male" and stored["telecom"][0]["value"] == "555-0100"
    assert stored["name"] == new["name"] and stored["birthDate"] == new["birthDate"]
    assert result(run, "update")["previous_version_id"] == "1"

    before = truth(sb, "Patient")
    run = run_dag(DAGS, "modmed_op_delete", run_conf={"resource_id": rid})
    assert run.state == "success", task_instances(run)
    assert changed(before, truth(sb, "Patient")) == {rid: (("2", False), ("3", True))}


@pytest.mark.parametrize(("conn_id", "rt", "rid"), [("modmed_default", "Organization", "pay|7225"),
                                                   ("modmed_proprietary_cc", "Patient", "2"),
                                                   ("modmed_certified", "Immunization", None),
                                                   ("modmed_certified_es384", "Patient", "1"),
                                                   ("modmed_certified_secret", "Condition", None)])
def test_read_on_both_tracks(sb: SandboxServer, run_dag: Any, conn_id: str, rt: str, rid: str | None) -> None:
    stored = rid or next(iter(truth(sb, rt)))
    rid = served(conn_id, stored)  # the certified track's Patient/1 is Patient/1.120182.2.1
    before = truth(sb, rt)
    run = run_dag(DAGS, "modmed_op_read", run_conf={"conn_id": conn_id, "resource_type": rt, "resource_id": rid})
    assert run.state == "success", task_instances(run)
    out = result(run, "read")
    assert (out["id"], out["version_id"]) == (rid, before[stored][0])
    assert truth(sb, rt) == before


def test_update_with_a_full_resource_and_its_read_version(sb: SandboxServer, run_dag: Any) -> None:
    current = body(sb, "Patient", "3")
    version = current["meta"]["versionId"]
    new = {**current, "gender": "other" if current.get("gender") != "other" else "unknown"}
    before = truth(sb, "Patient")
    run = run_dag(DAGS, "modmed_op_update", run_conf={"resource": new})
    assert run.state == "success", task_instances(run)
    assert changed(before, truth(sb, "Patient")) == {"3": ((version, False), (str(int(version) + 1), False))}
    assert body(sb, "Patient", "3")["gender"] == new["gender"]


def test_a_stale_if_match_fails_clearly_and_changes_nothing(sb: SandboxServer, run_dag: Any,
                                                            capfd: Cap, caplog: Log) -> None:
    current = body(sb, "Patient", "4")
    stale_version = current["meta"]["versionId"]
    run_dag(DAGS, "modmed_op_update", run_conf={"resource_type": "Patient", "resource_id": "4",
                                                "patch": {"active": not current.get("active", True)}})
    now = body(sb, "Patient", "4")
    assert now["meta"]["versionId"] != stale_version
    capfd.readouterr()
    run = run_dag(DAGS, "modmed_op_update", run_conf={"resource": {**current, "gender": "unknown"}})
    assert run.state == "failed"
    ti = task_instances(run)["update"]
    assert ti["try_number"] == 1  # retries=1, but a stale version cannot succeed: no retry spent
    assert body(sb, "Patient", "4") == now
    out = output(capfd, caplog)
    assert f"changed since version {stale_version} (now version {now['meta']['versionId']}); nothing was written" in out


def test_a_create_whose_answer_is_dropped_leaves_one_resource(sb: SandboxServer, run_dag: Any) -> None:
    before = truth(sb, "Patient")
    stats = sb.stats()
    sb.faults(drop_next=1)  # the server writes the Patient, then the connection drops mid-answer
    conf = {"resource": patient("Droptestphi", "MRN-DROP-1"),
            "if_none_exist": {"identifier": f"{MRN_SYSTEM}|MRN-DROP-1"}}
    run = run_dag(DAGS, "modmed_op_create", run_conf=conf)
    assert run.state == "success", task_instances(run)
    assert sb.stats()["dropped"] == stats.get("dropped", 0) + 1
    new = changed(before, truth(sb, "Patient"))
    assert len(new) == 1
    rid = next(iter(new))
    assert result(run, "create")["id"] == rid
    # the task itself run again (a retried or cleared task): still one
    run = run_dag(DAGS, "modmed_op_create", run_conf=conf)
    assert result(run, "create")["id"] == rid
    assert changed(before, truth(sb, "Patient")) == {rid: (None, ("1", False))}
    assert sb.stats()["conditional_create_matched"] >= stats.get("conditional_create_matched", 0) + 2


def test_charge_transaction_id_and_coverage_reconciliation(sb: SandboxServer, run_dag: Any) -> None:
    charge = {"resourceType": "ChargeItem", "status": "billable",
              "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]},
              "subject": {"reference": "Patient/2"}}
    before = truth(sb, "ChargeItem")
    sb.faults(drop_next=1)
    first = run_dag(DAGS, "modmed_op_create", run_conf={"resource": charge, "transaction_id": "TX-AIRFLOW-1"})
    again = run_dag(DAGS, "modmed_op_create", run_conf={"resource": charge, "transaction_id": "TX-AIRFLOW-1"})
    new = changed(before, truth(sb, "ChargeItem"))
    assert len(new) == 1
    cid = next(iter(new))
    assert cid.startswith("CHG|") and result(first, "create")["id"] == cid == result(again, "create")["id"]
    assert {"system": TRANSACTION_ID_SYSTEM, "value": "TX-AIRFLOW-1"} in body(sb, "ChargeItem", cid)["identifier"]

    coverage = {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "Patient/2"},
                "payor": [{"reference": "Organization/pay|7225"}]}
    run = run_dag(DAGS, "modmed_op_create", run_conf={"resource": coverage})
    out = result(run, "create")
    ext = [e["valueString"] for e in body(sb, "Coverage", out["id"])["extension"]
           if e["url"].endswith("reconciliation-id")]
    assert out["reconciliation_id"] == ext[0] and ext[0].startswith("REC-")


# -- bad input: no network call --------------------------------------------------------------------

@pytest.mark.parametrize(("dag_id", "conf", "needle"), [
    ("modmed_op_create", {"resource": {"resourceType": "Nope"}}, "'Nope' is not served by ModMed"),
    ("modmed_op_create", {"conn_id": "modmed_certified", "resource": patient("Refusedphi", "MRN-R")},
     "ModMed refuses create on Patient on the certified track: use a connection with track='proprietary'"),
    ("modmed_op_create", {"resource": {**patient("Invalidphi", "MRN-I"), "birthDate": "1971-13-45",
                                       "gender": 7}}, "2 problems"),
    ("modmed_op_read", {"resource_id": None}, "resource_id must be a non-empty string"),
    ("modmed_op_read", {"conn_id": "modmed_certified", "resource_type": "Appointment"},
     "ModMed refuses read on Appointment on the certified track: use a connection with track='proprietary'"),
    ("modmed_op_update", {"resource_type": "Coverage", "resource_id": "1", "patch": {"status": "cancelled"}},
     "ModMed allows only create on Coverage; no track supports update"),
    ("modmed_op_delete", {"resource_type": "Appointment", "resource_id": "1"}, "refuses delete on Appointment"),
])
def test_bad_input_fails_before_any_network_call(sb: SandboxServer, run_dag: Any,
                                                 capfd: Cap, caplog: Log, dag_id: str,
                                                 conf: dict[str, Any], needle: str) -> None:
    capfd.readouterr()
    before = sb.stats()["requests"]
    run = run_dag(DAGS, dag_id, run_conf=conf)
    assert run.state == "failed"
    (ti,) = task_instances(run).values()
    assert ti["try_number"] == 1  # failed at once: no retry spent on input that cannot work
    assert sb.stats()["requests"] == before
    out = output(capfd, caplog)
    assert needle in out
    for phi in ("Invalidphi", "1971-13-45", "MRN-I"):
        assert phi not in out


# -- PHI -------------------------------------------------------------------------------------------

def _phi(sb: SandboxServer) -> set[str]:
    values: set[str] = set()
    for row in sb.app_state.store.search("Patient", [], count=10_000)[0]:
        p = row.body
        for name in p.get("name") or ():
            values.add(" ".join([*name.get("given", []), name.get("family", "")]))
            values.add(name.get("family", "") + ", ")
        values.update(i["value"] for i in p.get("identifier") or ())
        values.update(t["value"] for t in p.get("telecom") or ())
        values.update(line for a in p.get("address") or () for line in a.get("line") or ())
        if p.get("birthDate") and p["birthDate"] != "1970-01-01":  # the epoch could be any timestamp
            values.add(p["birthDate"])
    return values


def test_no_patient_data_in_logs_rendered_templates_or_xcom(sb: SandboxServer, run_dag: Any, tmp_path: Path,
                                                            capfd: Cap, caplog: Log) -> None:
    capfd.readouterr()
    mine = patient("Privacyphi", "MRN-PRIV-9", "1966-06-16")
    runs = [run_dag(DAGS, "modmed_op_create", run_conf={"resource": mine,
                                                        "if_none_exist": {"identifier": f"{MRN_SYSTEM}|MRN-PRIV-9"}})]
    rid = result(runs[0], "create")["id"]
    runs.append(run_dag(DAGS, "modmed_op_read", run_conf={"resource_id": rid}))
    runs.append(run_dag(DAGS, "modmed_op_update", run_conf={"resource_type": "Patient", "resource_id": rid,
                                                            "patch": {"telecom": [{"system": "phone",
                                                                                   "value": "555-0199-77"}]}}))
    runs.append(run_dag(DAGS, "modmed_op_search", run_conf={"output_path": str(tmp_path / "all.ndjson"),
                                                            "search_params": {"family": "Privacyphi"}}))
    runs.append(run_dag(DAGS, "modmed_op_search", run_conf={"output_path": str(tmp_path / "all2.ndjson")}))
    assert [r.state for r in runs] == ["success"] * len(runs)
    logs = output(capfd, caplog)
    assert "Wrote 1 Patient resources" in logs and "Created Patient" in logs  # the capture works
    assert "Privacyphi" in (tmp_path / "all.ndjson").read_text()  # the data went to the file...
    stored_elsewhere = json.dumps([{"/".join(k): v for k, v in xcoms(r).items()} for r in runs], default=str) + \
        json.dumps([rendered(r) for r in runs], default=str)
    assert rid in stored_elsewhere  # ids are fine
    phi = _phi(sb) | {"Privacyphi", "MRN-PRIV-9", "1966-06-16", "Opheliaphi", "555-0199-77"}
    leaks = {value for value in phi if value in logs or value in stored_elsewhere}
    assert leaks == set()  # ...and nowhere else
