"""The bulk client against the sandbox over real HTTP: every level, _type, _since + deleted entries, error
files, cancel, transient 5xx while polling, truncated downloads, a process killed mid-download and
resumed, token renewal, and no credential ever sent to the object-storage host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client.bulk import (
    AsyncBulkExportClient,
    BulkExportClient,
    DownloadPolicy,
    ExportErrorsReported,
    ExportGoneError,
    ExportRequest,
    ExportRun,
    PollPolicy,
    apply_error_policy,
)
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.errors import CapabilityError, ServerError, TransportError
from airflow_provider_modmed.sandbox.certified_ids import certified_id, proprietary_id
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.conftest import sandbox_fixtures

pytestmark = pytest.mark.integration

#: tests honour the sandbox's Retry-After, clamped so they stay fast
FAST = PollPolicy(min_wait=0.05, max_wait=0.1, initial_wait=0.05)


def _no_token_reached_storage(sandbox: SandboxServer) -> None:
    assert sandbox.stats().get("auth_headers_seen_by_storage", 0) == 0  # never a token to storage


#: a sandbox of this module's own: these tests update and delete resources
own_sandbox, sb = sandbox_fixtures(patients=40, seed=11, export_seconds=0.2, after_each=_no_token_reached_storage)


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


def cert_config(sb: SandboxServer, **over: Any) -> ClientConfig:
    c = sb.credentials["certified"]
    k = c["private_key_jwt"]
    values: dict[str, Any] = {"track": "certified", "fhir_base": c["fhir_base"], "firm": "apiportal",
                              "auth_method": "private_key_jwt", "client_id": k["client_id"],
                              "private_key": k["private_key"], "key_id": k["key_id"], "scope": "system/*.read",
                              "max_retries": 3, **over}
    return ClientConfig(**values)


@pytest.fixture
def client(sb: SandboxServer) -> Iterator[BulkExportClient]:
    with FhirClient(cert_config(sb)) as fhir:
        yield BulkExportClient(fhir, poll=FAST, download=DownloadPolicy(backoff=0.05))


def live_ids(sb: SandboxServer, rt: str) -> set[str]:
    """The certified ids of the live resources of ``rt`` (the store holds the proprietary ones)."""
    return {certified_id(r["id"]) for r in sb.app_state.store.ground_truth(rt) if not r["deleted"]}


def ids_in(folder: Path, result: dict[str, Any], rt: str) -> list[str]:
    """Every id in the stored files of ``rt`` (duplicates kept, so callers can check for them)."""
    out: list[str] = []
    for name in result["output"].get(rt, {}).get("files", []):
        for line in (folder / name).read_text().splitlines():
            resource = json.loads(line)
            assert resource["resourceType"] == rt
            out.append(resource["id"])
    return out


def members(sb: SandboxServer, group: str) -> set[str]:
    """The certified ids of a Group's member Patients."""
    row = sb.app_state.store.get("Group", group)
    assert row is not None
    return {certified_id(m["entity"]["reference"].split("/")[1]) for m in row.body["member"]}


def patient_of(sb: SandboxServer, immunization: str) -> str:
    """The certified id of the Patient of an Immunization, by the ground truth."""
    stored = proprietary_id(immunization)
    row = sb.app_state.store.get("Immunization", stored) if stored is not None else None
    assert row is not None, immunization
    return certified_id(row.body["patient"]["reference"].split("/")[1])


# -- levels and parameters -----------------------------------------------------------------------

@pytest.mark.parametrize("level", ["system", "Patient", "Group/cohort-a", "Group/all-patients"])
def test_each_level_matches_the_ground_truth(sb: SandboxServer, client: BulkExportClient, tmp_path: Path,
                                             level: str) -> None:
    result = client.export(ExportRequest(level=level, types=("Patient", "Immunization")), tmp_path)
    patients, immunizations = ids_in(tmp_path, result, "Patient"), ids_in(tmp_path, result, "Immunization")
    assert len(patients) == len(set(patients)) and len(immunizations) == len(set(immunizations))
    expected = members(sb, level.split("/")[1]) if level.startswith("Group/") else live_ids(sb, "Patient")
    assert set(patients) == expected
    owners = {patient_of(sb, i) for i in immunizations}
    assert owners <= expected
    if not level.startswith("Group/cohort"):
        assert set(immunizations) == live_ids(sb, "Immunization")
    assert result["output"]["Patient"]["count"] == len(expected) == result["resources"] - len(immunizations)
    assert set(result["output"]) == {"Patient", "Immunization"}  # _type honoured


def test_system_export_of_every_type(sb: SandboxServer, client: BulkExportClient, tmp_path: Path) -> None:
    result = client.export(ExportRequest(), tmp_path)
    assert len(result["output"]) >= 8
    for rt, entry in result["output"].items():
        stored = ids_in(tmp_path, result, rt)
        assert len(stored) == len(set(stored)) == entry["count"]
        assert set(stored) == live_ids(sb, rt)
    sums = dict(reversed(line.split("  ")) for line in (tmp_path / "SHA256SUMS").read_text().splitlines())
    import hashlib

    for name, digest in sums.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all("?" not in entry["url"] for entry in manifest["output"])  # no presigned signature stored
    assert not list(tmp_path.rglob("*.part"))


def test_incremental_chain_since_and_deleted_entries(sb: SandboxServer, client: BulkExportClient,
                                                     tmp_path: Path) -> None:
    first = client.export(ExportRequest(level="Patient", types=("Patient",)), tmp_path / "1")
    store = sb.app_state.store
    time.sleep(0.01)
    changed = store.get("Patient", "5")
    assert changed is not None
    store.update({**changed.body, "gender": "unknown"})
    store.delete("Patient", "6")
    second = client.export(ExportRequest(level="Patient", types=("Patient",), since=first["transaction_time"]),
                           tmp_path / "2")
    assert ids_in(tmp_path / "2", second, "Patient") == [certified_id("5")]
    assert second["deleted"]["count"] == 1
    (name,) = second["deleted"]["files"]
    bundles = [json.loads(line) for line in (tmp_path / "2" / name).read_text().splitlines()]
    assert [(e["request"]["method"], e["request"]["url"]) for b in bundles for e in b["entry"]] == [
        ("DELETE", f"Patient/{certified_id('6')}")]
    assert second["transaction_time"] > first["transaction_time"]


def test_error_files_are_kept_and_the_policy_applies(sb: SandboxServer, tmp_path: Path) -> None:
    # the token's scopes leave Observation out: the sandbox skips it and says so in an error file;
    # _typeFilter is not supported: a warning (lenient)
    scope = "system/Patient.read system/Immunization.read"
    request = ExportRequest(types=("Patient", "Immunization", "Observation"),
                            type_filters=("Immunization?status=completed",), lenient=True)
    with FhirClient(cert_config(sb, scope=scope)) as fhir:
        result = BulkExportClient(fhir, poll=FAST).export(request, tmp_path)
    assert set(result["output"]) == {"Patient", "Immunization"}
    errors = result["errors"]
    assert errors["by_code"] == {"forbidden": 1, "not-supported": 1}
    assert errors["by_severity"] == {"error": 1, "warning": 1} and errors["fatal"] == 1
    assert errors["files"] == ["error/OperationOutcome.0001.ndjson"]
    assert (tmp_path / errors["files"][0]).exists()
    with pytest.raises(ExportErrorsReported, match="forbidden=1"):
        apply_error_policy(result, "fail")
    apply_error_policy(result, "warn")


def test_a_type_not_readable_on_the_certified_track_fails_pre_flight(sb: SandboxServer, client: BulkExportClient,
                                                                    tmp_path: Path) -> None:
    started = sb.stats().get("exports_started", 0)
    with pytest.raises(CapabilityError, match="ChargeItem is not readable on the certified track"):
        client.export(ExportRequest(types=("Patient", "ChargeItem"), lenient=True), tmp_path)
    assert sb.stats().get("exports_started", 0) == started


def test_cancel_then_the_job_is_gone(sb: SandboxServer, client: BulkExportClient) -> None:
    status_url = client.kick_off(ExportRequest(types=("Patient",)))
    assert client.cancel(status_url) is True
    with pytest.raises(ExportGoneError):
        client.poll(status_url)
    assert client.cancel(status_url) is False


# -- faults --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bodiless", [False, True])
def test_transient_5xx_while_polling(sb: SandboxServer, tmp_path: Path, bodiless: bool) -> None:
    # max_retries=0: the poll flow itself must see the 503s and keep polling
    with FhirClient(cert_config(sb, max_retries=0)) as fhir:
        client = BulkExportClient(fhir, poll=FAST)
        status_url = client.kick_off(ExportRequest(types=("Patient",)))
        sb.faults(fail_next={"status": 503, "count": 3, "path": "$export-status", "bodiless": bodiless})
        manifest = client.poll(status_url)
    assert manifest.output and sb.app_state.faults.fail_count == 0


def test_truncated_download_is_retried(sb: SandboxServer, client: BulkExportClient, tmp_path: Path) -> None:
    before = sb.stats().get("truncated_downloads", 0)
    sb.faults(truncate_downloads=2)
    result = client.export(ExportRequest(types=("Patient", "Observation")), tmp_path)
    assert sb.stats()["truncated_downloads"] - before == 2
    for rt in ("Patient", "Observation"):
        stored = ids_in(tmp_path, result, rt)
        assert len(stored) == len(set(stored)) and set(stored) == live_ids(sb, rt)


def test_expired_file_links_get_a_fresh_manifest(sb: SandboxServer, client: BulkExportClient, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The presigned links expire between reading the manifest and downloading: every file answers 403
    (S3's "Request has expired"); one fresh manifest (new links) and the export completes."""
    original = ExportRun.got_manifest
    calls = {"n": 0}

    def expire_after_first_manifest(self: ExportRun, manifest: Any) -> None:
        original(self, manifest)
        calls["n"] += 1
        if calls["n"] == 1:
            sb.faults(expire_presigned=True)

    monkeypatch.setattr(ExportRun, "got_manifest", expire_after_first_manifest)
    result = client.export(ExportRequest(types=("Patient",)), tmp_path)
    assert calls["n"] == 2
    assert set(ids_in(tmp_path, result, "Patient")) == live_ids(sb, "Patient")


def test_token_renewed_during_a_long_export(sb: SandboxServer, client: BulkExportClient, tmp_path: Path) -> None:
    status_url = client.kick_off(ExportRequest(types=("Patient",)))
    sb.faults(expire_tokens=True)  # the next status poll answers 401: renew once, same URL
    manifest = client.poll(status_url)
    assert manifest.output


CHILD = """
import json, os, sys
from pathlib import Path
from airflow_provider_modmed.client.bulk import BulkExportClient, DownloadPolicy, ExportRequest, PollPolicy
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import FhirClient
config = ClientConfig(**json.loads(os.environ["BULK_CONFIG"]))
with FhirClient(config) as fhir:
    client = BulkExportClient(fhir, poll=PollPolicy(min_wait=0.05, max_wait=0.1),
                              download=DownloadPolicy(concurrency=1))
    client.export(ExportRequest(), Path(sys.argv[1]))
print("finished")
"""


def test_killed_mid_download_then_resumed_without_loss_or_duplicates(sb: SandboxServer, client: BulkExportClient,
                                                                     tmp_path: Path) -> None:
    config = cert_config(sb)
    fields = {k: getattr(config, k) for k in ("fhir_base", "firm", "client_id", "private_key", "key_id", "scope")}
    env = {**os.environ, "BULK_CONFIG": json.dumps({**fields, "track": "certified",
                                                     "auth_method": "private_key_jwt"})}
    started = sb.stats().get("exports_started", 0)
    sb.faults(slow_download_ms=250)  # every file takes a while: the kill lands mid-download
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    checkpoints = tmp_path / "_state" / "files"
    try:
        deadline = time.monotonic() + 60
        while not (checkpoints.exists() and len(list(checkpoints.glob("*.json"))) >= 2):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child stored no file in time"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)  # a worker dying mid-download: no cleanup runs
    finally:
        child.wait(10)
    sb.reset_faults()
    stored_before = {p.name for p in checkpoints.glob("*.json")}
    state = json.loads((tmp_path / "_state/export.json").read_text())
    assert state["stage"] == "ready"
    result = client.export(ExportRequest(), tmp_path)  # the retry
    assert sb.stats()["exports_started"] - started == 1  # resumed the saved job: no second kick-off
    assert len(stored_before) < result["files"]
    for rt, entry in result["output"].items():
        stored = ids_in(tmp_path, result, rt)
        assert len(stored) == len(set(stored)) == entry["count"], rt
        assert set(stored) == live_ids(sb, rt), rt
    assert not list(tmp_path.rglob("*.part"))


async def test_async_face_against_the_sandbox(sb: SandboxServer, tmp_path: Path) -> None:
    async with AsyncFhirClient(cert_config(sb)) as fhir:
        client = AsyncBulkExportClient(fhir, poll=FAST, download=DownloadPolicy(concurrency=3))
        result = await client.export(ExportRequest(level="Group/cohort-a", types=("Patient", "Condition")),
                                     tmp_path)
    assert set(ids_in(tmp_path, result, "Patient")) == members(sb, "cohort-a")


# -- issue 13 ------------------------------------------------------------------------------------

def test_error_entries_carrying_another_count_are_stored_once_and_the_policy_decides(
        sb: SandboxServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sb.faults(bulk_error_count=40)  # the count of the output file that failed; the error file holds 2 lines
    scope = "system/Patient.read system/Immunization.read"
    request = ExportRequest(types=("Patient", "Immunization", "Observation"),
                            type_filters=("Immunization?status=completed",), lenient=True)
    before = sb.stats()
    with FhirClient(cert_config(sb, scope=scope)) as fhir:
        result = BulkExportClient(fhir, poll=FAST, download=DownloadPolicy(backoff=0.05)).export(request, tmp_path)
    stats = sb.stats()
    assert stats["bulk_downloads:error.1.ndjson"] - before.get("bulk_downloads:error.1.ndjson", 0) == 1
    assert result["errors"]["count"] == 2 and result["errors"]["fatal"] == 1
    assert "its manifest entry says count 40" in caplog.text
    apply_error_policy(result, "ignore")
    apply_error_policy(result, "warn")
    with pytest.raises(ExportErrorsReported):
        apply_error_policy(result, "fail")


def status_polls(sb: SandboxServer) -> int:
    return sum("$export-status" in path for path in sb.app_state.recent_requests)


def ready_status_url(client: BulkExportClient) -> str:
    status_url = client.kick_off(ExportRequest(types=("Patient",)))
    client.poll(status_url)  # complete: from now on the status URL answers the manifest
    return status_url


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_failed_status_polls_are_counted_by_the_poll_loop_alone(sb: SandboxServer, fault: str) -> None:
    # max_retries=5: the generic retry layer would resend each failed poll up to 5 times on its own
    with FhirClient(cert_config(sb, max_retries=5)) as fhir:
        client = BulkExportClient(fhir, poll=PollPolicy(min_wait=0.01, max_wait=0.02, initial_wait=0.01, max_errors=2))
        status_url = ready_status_url(client)

        def inject(n: int) -> None:
            if fault == "drop":
                sb.faults(drop_next=n)  # the manifest answer is cut mid-body: no answer
            else:
                sb.faults(fail_next={"status": 500, "count": n, "path": "$export-status"})

        inject(2)
        seen = status_polls(sb)
        assert client.poll(status_url).output
        assert status_polls(sb) - seen == 3  # two failures, each one poll of the loop, then the manifest
        inject(3)
        seen = status_polls(sb)
        with pytest.raises(TransportError if fault == "drop" else ServerError, match="kept failing"):
            client.poll(status_url)
        assert status_polls(sb) - seen == 3  # max_poll_errors=2: the third failure ends the poll, unretried


def test_one_http_chunk_per_resource_stores_the_same_files(sb: SandboxServer, client: BulkExportClient,
                                                          tmp_path: Path) -> None:
    request = ExportRequest(types=("Patient", "Observation"))
    large = client.export(request, tmp_path / "large")
    sb.faults(bulk_chunk_lines=1)
    small = client.export(request, tmp_path / "small")
    sb.faults(bulk_gzip=True)
    gzipped = client.export(request, tmp_path / "gzip")
    for run in ("small", "gzip"):  # stored, counted and hashed as the NDJSON the files hold
        assert (tmp_path / run / "SHA256SUMS").read_bytes() == (tmp_path / "large/SHA256SUMS").read_bytes()
    assert small["resources"] == gzipped["resources"] == large["resources"] > 0
