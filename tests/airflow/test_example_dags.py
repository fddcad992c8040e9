"""The example DAGs (``example_dags/``): every file parses with tags and docs and without a network call, and
the incremental sync, document upload, many-practices and write-back DAGs run for real (dag.test() on
SQLite) against a sandbox of this module's own, checked against the sandbox's state afterwards."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client.instants import instant_ms
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import sandbox_connections, served

pytestmark = [pytest.mark.airflow, pytest.mark.integration]
Cap = pytest.CaptureFixture[str]
Log = pytest.LogCaptureFixture

EXAMPLES = Path(__file__).resolve().parents[2] / "example_dags"
SYNC = EXAMPLES / "modmed_incremental_patient_sync.py"
UPLOAD = EXAMPLES / "modmed_document_upload.py"
PRACTICES = EXAMPLES / "modmed_many_practices.py"
WRITE_BACK = EXAMPLES / "modmed_write_back.py"
SAMPLE_INBOX = EXAMPLES / "data" / "inbox"
SAMPLE_CSV = EXAMPLES / "data" / "write_back.csv"
ROW_KEY_SYSTEM = "urn:airflow-provider-modmed:write-back"


# -- this module's sandbox (upload and write-back change data: the session sandbox stays as seeded) --

@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(patients=24, seed=53, rate_limit_per_minute=100_000) as server:
        yield server


@pytest.fixture(scope="module")
def modmed_connections(sandbox: SandboxServer) -> Iterator[dict[str, dict[str, Any]]]:
    with sandbox_connections(sandbox) as conns:
        yield conns


@pytest.fixture(scope="module")
def practice_b() -> Iterator[SandboxServer]:
    """A second practice: its own sandbox, firm data and API key."""
    with SandboxServer(patients=16, seed=71, rate_limit_per_minute=100_000) as server:
        yield server


@pytest.fixture
def prodlike(monkeypatch: pytest.MonkeyPatch, modmed_connections: dict[str, Any]) -> str:
    """A connection to a non-loopback host (nothing listens there: a call would fail the test loudly)."""
    conn = json.loads(json.dumps(modmed_connections["modmed_default"]))
    conn["host"] = "https://ema.invalid/ema-dev/firm"
    monkeypatch.setenv("AIRFLOW_CONN_MODMED_PRODLIKE", json.dumps(conn))
    return "modmed_prodlike"


# -- helpers ---------------------------------------------------------------------------------------

def xcoms(run: Any) -> dict[tuple[str, str, int], Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id).all()
        return {(x.task_id, x.key, x.map_index): XComModel.deserialize_value(x) for x in rows}


def result(run: Any, task_id: str, map_index: int = -1) -> Any:
    return xcoms(run).get((task_id, "return_value", map_index))


def task_instances(run: Any) -> dict[tuple[str, int], dict[str, Any]]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter(TaskInstance.dag_id == run.dag_id,
                                                  TaskInstance.run_id == run.run_id).all()
        return {(ti.task_id, ti.map_index): {"state": ti.state, "try_number": ti.try_number,
                                             "rendered_map_index": ti.rendered_map_index} for ti in rows}


def states(run: Any) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for (task_id, _), ti in task_instances(run).items():
        out.setdefault(task_id, set()).add(str(ti["state"]))
    return out


def output(capfd: Cap, caplog: Log) -> str:
    """What the task logs printed (Airflow's structlog writes to stdout or stderr) and logged."""
    captured = capfd.readouterr()
    return captured.out + captured.err + caplog.text


def live(sb: SandboxServer, rt: str) -> dict[str, str]:
    """id -> versionId of the resources of a type that are not deleted."""
    return {r["id"]: r["versionId"] for r in sb.app_state.store.ground_truth(rt) if not r["deleted"]}


def body(sb: SandboxServer, rt: str, rid: str) -> dict[str, Any]:
    row = sb.app_state.store.get(rt, rid)
    assert row is not None
    return row.body


def requests(sb: SandboxServer) -> int:
    return int(sb.stats().get("requests", 0))


def ndjson_ids(path: str) -> list[str]:
    assert path.startswith("file://"), path
    with open(path[len("file://"):], encoding="utf-8") as fh:
        return [json.loads(line)["id"] for line in fh if line.strip()]


def update_at(sb: SandboxServer, rt: str, rid: str, when: datetime) -> None:
    """A new version of a resource whose meta.lastUpdated is exactly ``when`` (the store's clock, pinned)."""
    store = sb.app_state.store
    clock = store._clock
    store._clock = lambda: int(when.timestamp() * 1000)
    try:
        store.update({**body(sb, rt, rid), "active": True})
    finally:
        store._clock = clock


# -- every file in example_dags/ -------------------------------------------------------------------

@pytest.fixture(scope="module")
def example_bag(sandbox: SandboxServer, modmed_connections: Any) -> dict[str, Any]:
    """Parse example_dags/ as Airflow does, recording every network connection attempt and sandbox call."""
    from airflow.dag_processing.dagbag import DagBag

    attempts: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX:
            attempts.append(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX:
            attempts.append(address)
        return real_connect_ex(self, address)

    before = requests(sandbox)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        bag = DagBag(dag_folder=str(EXAMPLES), safe_mode=False)
    return {"bag": bag, "attempts": attempts, "sandbox_calls": requests(sandbox) - before}


def test_every_example_file_parses_fast_without_a_network_call(example_bag: dict[str, Any]) -> None:
    bag = example_bag["bag"]
    assert bag.import_errors == {}
    assert example_bag["attempts"] == [], "parsing the example DAGs opened a network connection"
    assert example_bag["sandbox_calls"] == 0, "parsing the example DAGs called the sandbox"
    files = {p.name for p in EXAMPLES.glob("*.py")}
    assert {Path(d.fileloc).name for d in bag.dags.values()} == files  # every file holds a DAG
    assert {"modmed_incremental_patient_sync", "modmed_document_upload", "modmed_many_practices",
            "modmed_write_back"} <= set(bag.dags)
    for stat in bag.dagbag_stats:
        assert stat.duration.total_seconds() < 3, f"{stat.file} took {stat.duration} to parse"


EXAMPLE_FILES = [p.name for p in sorted(EXAMPLES.glob("*.py"))]


def dags_in(example_bag: dict[str, Any], name: str) -> list[Any]:
    dags = [d for d in example_bag["bag"].dags.values() if Path(d.fileloc).name == name]
    assert dags, f"no DAG in {name}"
    return dags


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_every_example_dag_is_tagged_and_does_not_catch_up(example_bag: dict[str, Any], name: str) -> None:
    for dag in dags_in(example_bag, name):
        assert {"modmed", "example"} <= set(dag.tags), dag.dag_id
        assert not dag.catchup, dag.dag_id


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_every_example_dag_explains_itself_in_doc_md(example_bag: dict[str, Any], name: str) -> None:
    for dag in dags_in(example_bag, name):
        doc = (dag.doc_md or "").strip()
        assert len(doc) > 200, f"{dag.dag_id}: no doc_md"
        assert "sandbox" in doc and "onnection" in doc, f"{dag.dag_id}: doc_md lacks how to run it"


# -- incremental patient sync ------------------------------------------------------------------------

@pytest.mark.parametrize("conn_id", ["modmed_default", "modmed_certified"])
def test_incremental_sync_writes_exactly_the_data_interval(sandbox: SandboxServer, run_dag: Any, tmp_path: Path,
                                                           conn_id: str, capfd: Cap, caplog: Log) -> None:
    start = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
    end = start + timedelta(days=1)
    ms = timedelta(milliseconds=1)  # changes at the edges, to the millisecond
    for rid, when in (("1", start - ms), ("2", start), ("3", end - ms), ("4", end)):
        update_at(sandbox, "Patient", rid, when)
    truth = sandbox.app_state.store.ground_truth("Patient")
    expected = {r["id"] for r in truth if not r["deleted"]
                and start <= datetime.fromtimestamp(instant_ms(r["lastUpdated"]) / 1000, timezone.utc) < end}
    assert {"2", "3"} <= expected and not {"1", "4"} & expected
    capfd.readouterr()

    run = run_dag(SYNC, "modmed_incremental_patient_sync", logical_date=end,  # the last full interval before it
                  run_conf={"conn_id": conn_id, "output_base": f"file://{tmp_path}"})
    assert run.state == "success", task_instances(run)
    assert (run.data_interval_start, run.data_interval_end) == (start, end)
    extracted = result(run, "extract_patients")
    assert extracted["path"] == f"file://{tmp_path}/modmed_incremental_patient_sync/2026-03-01/Patient.ndjson"
    ids = ndjson_ids(extracted["path"])  # each track's own ids: the certified one names Patient/2 1.120182.2.2
    assert sorted(ids) == sorted(served(conn_id, rid) for rid in expected) and len(ids) == len(set(ids))
    assert extracted["window"]["mode"] == ("widened" if conn_id == "modmed_default" else "exact")
    summary = result(run, "summarize")
    assert summary["count"] == len(expected)
    assert summary["new"] + summary["updated"] == len(expected) and summary["updated"] >= 2

    # counts and ids only: no patient's name or birth date in the logs or in XCom
    names = set()
    for rid in expected:
        patient = body(sandbox, "Patient", rid)
        names |= {n["family"] for n in patient.get("name", []) if n.get("family")}
        names.add(patient.get("birthDate", "-"))
    logged, stored = output(capfd, caplog), json.dumps(list(xcoms(run).values()), default=str)
    assert not {n for n in names if n in logged or n in stored}


def test_incremental_sync_output_base_comes_from_the_modmed_config(sandbox: SandboxServer, run_dag: Any,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__MODMED__OUTPUT_BASE", f"file://{tmp_path}/from-config/")
    end = datetime(2026, 3, 9, 2, 0, tzinfo=timezone.utc)
    run = run_dag(SYNC, "modmed_incremental_patient_sync", logical_date=end)
    assert run.state == "success", task_instances(run)
    path = tmp_path / "from-config" / "modmed_incremental_patient_sync" / "2026-03-08" / "Patient.ndjson"
    assert result(run, "extract_patients")["path"] == f"file://{path}"
    assert path.is_file()


# -- document upload ---------------------------------------------------------------------------------

def test_document_upload_files_each_pdf_on_its_patient_once(sandbox: SandboxServer, run_dag: Any,
                                                            tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    shutil.copytree(SAMPLE_INBOX, inbox)
    (inbox / "3_consent-form.pdf").write_bytes(b"%PDF-1.4 synthetic consent form " + os.urandom(8).hex().encode())
    (inbox / "scan-without-patient.pdf").write_bytes(b"%PDF-1.4 no patient id in the name")
    (inbox / "4_notes.txt").write_text("not a PDF")
    expected = {"1_referral-letter.pdf": "1", "2_lab-result.pdf": "2", "3_consent-form.pdf": "3"}
    before = live(sandbox, "DocumentReference")

    run = run_dag(UPLOAD, "modmed_document_upload", run_conf={"folder": str(inbox)})
    assert run.state == "success", task_instances(run)
    new = set(live(sandbox, "DocumentReference")) - set(before)
    assert len(new) == 3
    filed = {}
    for rid in new:
        doc = body(sandbox, "DocumentReference", rid)
        attachment = doc["content"][0]["attachment"]
        filed[attachment["title"]] = doc["subject"]["reference"].removeprefix("Patient/")
        key = attachment["url"][len(sandbox.storage_url):].split("?", 1)[0]
        assert sandbox.app_state.uploads[key] == (inbox / attachment["title"]).read_bytes()
        assert doc["category"][0]["coding"][0]["code"] == "CLINICAL"
    assert filed == expected
    report = result(run, "report")
    assert (report["uploaded"], report["already_there"]) == (3, 0)
    assert set(report["document_reference_ids"]) == new
    tis = task_instances(run)
    assert sorted(ti["rendered_map_index"] for (t, _), ti in tis.items() if t == "upload") == \
        ["Patient/1", "Patient/2", "Patient/3"]

    # the same folder again: every document is found, none is created
    run = run_dag(UPLOAD, "modmed_document_upload", run_conf={"folder": str(inbox)})
    assert run.state == "success", task_instances(run)
    assert set(live(sandbox, "DocumentReference")) == set(before) | new
    assert (result(run, "report")["uploaded"], result(run, "report")["already_there"]) == (0, 3)

    # unchanged DAG, default params: the bundled samples (the same files for patients 1 and 2)
    run = run_dag(UPLOAD, "modmed_document_upload")
    assert run.state == "success", task_instances(run)
    assert set(live(sandbox, "DocumentReference")) == set(before) | new
    assert (result(run, "report")["uploaded"], result(run, "report")["already_there"]) == (0, 2)


def test_document_upload_refuses_misnamed_pdfs_when_asked_and_an_empty_folder_uploads_nothing(
        sandbox: SandboxServer, run_dag: Any, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    before, calls = live(sandbox, "DocumentReference"), requests(sandbox)
    run = run_dag(UPLOAD, "modmed_document_upload", run_conf={"folder": f"file://{inbox}"})
    assert run.state == "success", task_instances(run)
    assert (result(run, "report")["uploaded"], result(run, "report")["already_there"]) == (0, 0)

    (inbox / "scan.pdf").write_bytes(b"%PDF-1.4 no patient id")
    run = run_dag(UPLOAD, "modmed_document_upload", run_conf={"folder": str(inbox), "on_unmatched": "fail"})
    assert run.state == "failed"
    assert states(run)["find_pdfs"] == {"failed"}
    assert live(sandbox, "DocumentReference") == before
    assert requests(sandbox) == calls  # listing the folder calls nobody

    run = run_dag(UPLOAD, "modmed_document_upload", run_conf={"folder": str(tmp_path / "missing")})
    assert run.state == "failed"
    assert task_instances(run)[("find_pdfs", -1)]["try_number"] == 1  # a missing folder is not retried


def test_bundled_samples_go_to_the_sandbox_only(sandbox: SandboxServer, run_dag: Any, prodlike: str) -> None:
    calls = requests(sandbox)
    run = run_dag(UPLOAD, "modmed_document_upload", run_conf={"conn_id": prodlike})
    assert run.state == "failed"
    assert states(run)["find_pdfs"] == {"failed"}
    run = run_dag(WRITE_BACK, "modmed_write_back", run_conf={"conn_id": prodlike})
    assert run.state == "failed"
    assert states(run)["check_file"] == {"failed"}
    assert requests(sandbox) == calls


# -- many practices ------------------------------------------------------------------------------------

def appointments_between(sb: SandboxServer, first: date, days: int) -> set[str]:
    low, high = first.isoformat(), (first + timedelta(days=days)).isoformat()
    return {rid for rid in live(sb, "Appointment") if low <= body(sb, "Appointment", rid)["start"][:10] < high}


def test_many_practices_one_mapped_search_and_one_file_per_practice(
        sandbox: SandboxServer, practice_b: SandboxServer, run_dag: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MODMED_PRACTICE_B",
                       json.dumps(practice_b.credentials["airflow_connections"]["modmed_default"]))
    logical = datetime.now(timezone.utc).replace(microsecond=0)
    day = logical.date()
    expected = {"modmed_default": appointments_between(sandbox, day, 90),
                "modmed_practice_b": appointments_between(practice_b, day, 90)}
    assert expected["modmed_default"] and expected["modmed_practice_b"]
    calls_a, calls_b = requests(sandbox), requests(practice_b)

    run = run_dag(PRACTICES, "modmed_many_practices", logical_date=logical,
                  run_conf={"practices": list(expected), "days_ahead": 90, "output_base": f"file://{tmp_path}"})
    assert run.state == "success", task_instances(run)
    summary = result(run, "summary")
    assert set(summary) == set(expected)
    for index, (conn_id, ids) in enumerate(expected.items()):
        path = f"file://{tmp_path}/modmed_many_practices/{day.isoformat()}/{conn_id}/Appointment.ndjson"
        assert result(run, "appointments", index)["path"] == path
        assert sorted(ndjson_ids(path)) == sorted(ids)
        assert summary[conn_id] == {"count": len(ids), "path": path}
        assert task_instances(run)[("appointments", index)]["rendered_map_index"] == conn_id
    assert requests(sandbox) > calls_a and requests(practice_b) > calls_b  # each practice asked its own server
    a_key = sandbox.credentials["proprietary"]["api_key"]
    b_key = practice_b.credentials["proprietary"]["api_key"]
    assert a_key != b_key  # two API keys: two rate budgets

    # no param: the Airflow Variable; no Variable: the two default connections
    monkeypatch.setenv("AIRFLOW_VAR_MODMED_PRACTICES", json.dumps(["modmed_practice_b"]))
    run = run_dag(PRACTICES, "modmed_many_practices", logical_date=logical + timedelta(seconds=1),
                  run_conf={"days_ahead": 90, "output_base": f"file://{tmp_path}/var"})
    assert run.state == "success", task_instances(run)
    assert list(result(run, "summary")) == ["modmed_practice_b"]
    monkeypatch.delenv("AIRFLOW_VAR_MODMED_PRACTICES")
    run = run_dag(PRACTICES, "modmed_many_practices", logical_date=logical + timedelta(seconds=2),
                  run_conf={"days_ahead": 90, "output_base": f"file://{tmp_path}/default"})
    assert run.state == "success", task_instances(run)
    summary = result(run, "summary")
    assert list(summary) == ["modmed_default", "modmed_proprietary_cc"]
    for conn_id in summary:
        assert sorted(ndjson_ids(summary[conn_id]["path"])) == sorted(expected["modmed_default"])


def test_many_practices_refuses_a_bad_practice_list_before_any_call(sandbox: SandboxServer, run_dag: Any,
                                                                    tmp_path: Path) -> None:
    calls = requests(sandbox)
    run = run_dag(PRACTICES, "modmed_many_practices",
                  run_conf={"practices": ["modmed_default", "modmed_default"], "output_base": f"file://{tmp_path}"})
    assert run.state == "failed"
    assert states(run)["practices"] == {"failed"}
    assert requests(sandbox) == calls


# -- write-back --------------------------------------------------------------------------------------

def test_write_back_creates_each_row_once_on_its_patient(sandbox: SandboxServer, run_dag: Any) -> None:
    with SAMPLE_CSV.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    kinds = {"allergy": "AllergyIntolerance", "condition": "Condition"}
    before = {rt: live(sandbox, rt) for rt in kinds.values()}

    run = run_dag(WRITE_BACK, "modmed_write_back")
    assert run.state == "success", task_instances(run)
    created = {rt: set(live(sandbox, rt)) - set(before[rt]) for rt in kinds.values()}
    written = set()
    for rt, ids in created.items():
        for rid in ids:
            res = body(sandbox, rt, rid)
            patient = (res.get("patient") or res.get("subject"))["reference"].removeprefix("Patient/")
            coding = res["code"]["coding"][0]
            assert [i["system"] for i in res["identifier"]] == [ROW_KEY_SYSTEM]
            written.add((rt, patient, coding["system"], coding["code"], res["clinicalStatus"]["coding"][0]["code"]))
    # a Condition's status goes out upper-case (ModMed's code convention), an allergy's as in the file
    assert written == {(kinds[r["kind"]], r["patient_id"], r["code_system"], r["code"],
                        r["clinical_status"].upper() if r["kind"] == "condition" else r["clinical_status"])
                       for r in rows}
    assert result(run, "report") == {rt: {"created": sum(1 for r in rows if kinds[r["kind"]] == rt), "existing": 0}
                                     for rt in kinds.values()}
    after_first = {rt: live(sandbox, rt) for rt in kinds.values()}
    stats = sandbox.stats()

    # the second run creates nothing and changes nothing
    run = run_dag(WRITE_BACK, "modmed_write_back")
    assert run.state == "success", task_instances(run)
    assert {rt: live(sandbox, rt) for rt in kinds.values()} == after_first
    for rt in kinds.values():
        assert sandbox.stats().get(f"created:{rt}", 0) == stats.get(f"created:{rt}", 0)
    assert result(run, "report") == {rt: {"created": 0, "existing": len(created[rt])} for rt in kinds.values()}


def test_write_back_refuses_a_bad_file_before_any_call_and_logs_no_values(sandbox: SandboxServer, run_dag: Any,
                                                                          tmp_path: Path, capfd: Cap,
                                                                          caplog: Log) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("kind,patient_id,code_system,code,display,clinical_status,category,onset_date\n"
                   "condition,5,http://hl7.org/fhir/sid/icd-10-cm,E11.9,Type 2 diabetes,active,,\n"
                   "allergy,5,http://snomed.info/sct,ZZRARE4711,Rare substance,maybe,food,\n")
    before = {rt: live(sandbox, rt) for rt in ("AllergyIntolerance", "Condition")}
    calls = requests(sandbox)
    capfd.readouterr()
    run = run_dag(WRITE_BACK, "modmed_write_back", run_conf={"file": str(bad)})
    assert run.state == "failed"
    assert states(run)["check_file"] == {"failed"}
    assert states(run)["write"] <= {"upstream_failed", "None"}
    assert requests(sandbox) == calls
    assert {rt: live(sandbox, rt) for rt in before} == before
    logged = output(capfd, caplog)
    assert "row 3: column 'clinical_status' must be one of" in logged
    assert "ZZRARE4711" not in logged and "Rare substance" not in logged


def test_write_back_reports_the_first_time_a_row_is_seen(sandbox: SandboxServer, run_dag: Any,
                                                         tmp_path: Path) -> None:
    """A file that grows: the old rows are found, only the new one is created."""
    grown = tmp_path / "grown.csv"
    grown.write_text(SAMPLE_CSV.read_text() + "condition,4,http://hl7.org/fhir/sid/icd-10-cm,I10,"
                     "Essential (primary) hypertension,active,,2020-01-01\n")
    run_dag(WRITE_BACK, "modmed_write_back")  # the sample rows exist (whatever ran before)
    before = live(sandbox, "Condition")
    run = run_dag(WRITE_BACK, "modmed_write_back", run_conf={"file": f"file://{grown}"})
    assert run.state == "success", task_instances(run)
    new = set(live(sandbox, "Condition")) - set(before)
    assert len(new) == 1
    res = body(sandbox, "Condition", new.pop())
    assert res["subject"]["reference"] == "Patient/4" and res["onsetDateTime"] == "2020-01-01"
    assert res["category"][0]["coding"][0]["code"] == "problem-list-item"
    assert result(run, "report")["Condition"] == {"created": 1, "existing": 3}
    assert result(run, "report")["AllergyIntolerance"] == {"created": 0, "existing": 3}



def test_write_back_stops_when_the_server_ignores_the_identifier_search(sandbox: SandboxServer, run_dag: Any,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capfd: Cap, caplog: Log) -> None:
    """Lenient FHIR search skips parameters it does not support and answers everything: the task must not
    take an unrelated resource for the row's, nor create anything it could not find again."""
    from airflow_provider_modmed.sandbox import fhir_api

    before = {rt: live(sandbox, rt) for rt in ("AllergyIntolerance", "Condition")}
    assert before["AllergyIntolerance"] and before["Condition"]  # something for the ignored search to answer
    monkeypatch.delitem(fhir_api.SEARCH_PARAMS, "identifier")
    capfd.readouterr()
    run = run_dag(WRITE_BACK, "modmed_write_back")
    assert run.state == "failed"
    assert states(run)["write"] == {"failed"}
    assert {ti["try_number"] for (t, _), ti in task_instances(run).items() if t == "write"} == {1}  # no retry
    assert {rt: live(sandbox, rt) for rt in before} == before
    assert "without the row key identifier" in output(capfd, caplog)
