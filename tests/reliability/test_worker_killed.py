"""The worker is killed (SIGKILL: no cleanup, no on_kill) in the middle of a task, then the task is retried.

Each operator's ``execute`` runs in a process of its own (``tests/reliability/worker.py``), as on an Airflow
worker; the test kills it mid-way, checks the kill really happened mid-way, runs the task again and checks
the sandbox's ground truth: every id exactly once in the output, one document, nothing created twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client.documents import UPLOAD_KEY_SYSTEM
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.reliability._figures import Figures
from tests.reliability.conftest import live, ndjson_ids

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

ROOT = Path(__file__).resolve().parents[2]


def start_worker(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.worker", json.dumps(spec)], cwd=ROOT,
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    line = next(x for x in reversed(out.splitlines()) if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    result["log"] = out
    return result


def run_worker(spec: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    return finish(start_worker(spec), timeout)


def kill_when(proc: subprocess.Popen[str], condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the worker ended before the kill: {proc.communicate()[0][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill condition never came")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def test_worker_killed_mid_search_then_retried(sb: SandboxServer, modmed_connections: Any, tmp_path: Path,
                                               figures: Figures) -> None:
    out = tmp_path / "patients.ndjson"
    spec = {"operator": "search", "kwargs": {"resource_type": "Patient", "output_path": str(out), "count": 2}}
    truth = live(sb, "Patient")
    pages = len(truth) // 2 + 2
    with figures.measure(sb, prefix="killed_") as m:
        sb.faults(latency_ms=60)
        start = sb.stats().get("requests:proprietary", 0)
        proc = start_worker(spec)
        kill_when(proc, lambda: sb.stats().get("requests:proprietary", 0) - start >= pages // 2)
        sb.reset_faults()
    partial = ndjson_ids(out) if out.exists() else []
    assert len(partial) < len(truth), "the kill came too late to be mid-search"
    with figures.measure(sb, prefix="retry_"):
        result = run_worker(spec)
    ids = ndjson_ids(out)
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(truth)
    assert result["result"]["count"] == len(truth)
    figures.record(ids=len(truth), ids_in_file_at_kill=len(partial), pages_before_kill=m["requests"] - 1,
                   retry_task_seconds=result["seconds"])


def test_worker_killed_mid_upload_then_retried(sb: SandboxServer, modmed_connections: Any, tmp_path: Path,
                                               figures: Figures) -> None:
    scan = tmp_path / f"scan-{uuid.uuid4().hex[:6]}.pdf"
    scan.write_bytes(b"%PDF-1.4 " + uuid.uuid4().hex.encode())
    spec = {"operator": "upload", "kwargs": {"file_path": str(scan), "category": "LAB", "patient_id": "2"}}
    before = live(sb, "DocumentReference")
    with figures.measure(sb, prefix="killed_"):
        sb.faults(latency_ms=300)
        uploads = sb.stats().get("uploads", 0)
        proc = start_worker(spec)
        kill_when(proc, lambda: sb.stats().get("uploads", 0) > uploads)  # the bytes are up: step 3 is next
        sb.reset_faults()
    time.sleep(0.5)  # a DocumentReference POST already in flight lands (or not) while the worker is dead
    landed = set(live(sb, "DocumentReference")) - set(before)
    with figures.measure(sb, prefix="retry_"):
        result = run_worker(spec)
    new = set(live(sb, "DocumentReference")) - set(before)
    assert new == {result["result"]["id"]}
    assert result["xcom"]["document_reference_id"] == result["result"]["id"]
    assert result["result"]["created"] is (not landed)
    keys = [i["value"] for rid in new for i in sb.app_state.store.get("DocumentReference", rid).body["identifier"]
            if i["system"] == UPLOAD_KEY_SYSTEM]
    assert len(keys) == 1
    figures.record(documents=len(new), landed_before_retry=len(landed), retry_created=result["result"]["created"])


def test_worker_killed_mid_create_then_retried(sb: SandboxServer, modmed_connections: Any,
                                               figures: Figures) -> None:
    mrn = f"MRN-KILL-{uuid.uuid4().hex[:6]}"
    resource = {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": mrn}],
                "name": [{"family": "Killtest"}], "gender": "male", "birthDate": "1990-09-09"}
    spec = {"operator": "create", "kwargs": {"resource": resource, "if_none_exist": True}}
    before = live(sb, "Patient")
    sb.faults(latency_ms=400)
    creates = sb.stats().get("requests:proprietary", 0)
    proc = start_worker(spec)
    # the token call and the POST: the POST is in flight (in the server's latency) when the worker dies
    kill_when(proc, lambda: sb.stats().get("requests:proprietary", 0) - creates >= 1)
    sb.reset_faults()
    time.sleep(0.6)
    landed = set(live(sb, "Patient")) - set(before)
    result = run_worker(spec)
    new = set(live(sb, "Patient")) - set(before)
    assert new == {result["result"]["id"]}
    figures.record(created=len(new), landed_before_retry=len(landed))
