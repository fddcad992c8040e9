"""Bulk export under faults, through ModMedBulkExportOperator, checked against the sandbox's ground truth: every
exported type holds every live id exactly once, the job is kicked off once, no credential reaches storage."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client.bulk import DownloadError
from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.reliability._figures import Figures
from tests.reliability.test_worker_killed import kill_when, run_worker, start_worker
from tests.reliability.worker import main as run_in_process

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

FAST = {"min_poll_seconds": 0.05, "max_poll_seconds": 0.3, "deferrable": False}
TYPES = "Patient,Condition,Observation,Immunization,Encounter"


def spec(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    return {"operator": "bulk", "run_id": "manual__reliability",
            "kwargs": {"modmed_conn_id": "modmed_certified", "output_folder": f"file://{tmp_path}", "types": TYPES,
                       **FAST, **kwargs}}


def check_exactly_once(sb: SandboxServer, result: dict[str, Any]) -> int:
    folder = Path(result["run_folder"].removeprefix("file://"))
    total = 0
    for rt in TYPES.split(","):
        ids = [json.loads(line)["id"] for name in result["output"].get(rt, {}).get("files", [])
               for line in (folder / name).read_text().splitlines()]
        live = {certified_id(r["id"]) for r in sb.app_state.store.ground_truth(rt) if not r["deleted"]}
        assert len(ids) == len(set(ids)), f"{rt}: an id stored twice"
        assert set(ids) == live, f"{rt}: ids lost or invented"
        total += len(ids)
    assert not list(folder.rglob("*.part"))
    return total


def test_bulk_export_through_a_storm_of_faults(sb: SandboxServer, modmed_connections: Any, tmp_path: Path,
                                               figures: Figures) -> None:
    ttl = sb.app_state.config.certified_token_ttl
    sb.app_state.config.certified_token_ttl = 1.0  # tokens run out during the export
    try:
        with figures.measure(sb) as m:
            sb.faults(truncate_downloads=2, slow_download_ms=20,
                      fail_next={"status": 503, "count": 2, "path": "$export-status", "bodiless": True})
            out = run_in_process(spec(tmp_path, max_concurrent_downloads=2))
    finally:
        sb.app_state.config.certified_token_ttl = ttl
    resources = check_exactly_once(sb, out["result"])
    assert m["exports_started"] == 1 and m["injected_failures"] == 2 and m["token_requests"] >= 2
    assert sb.stats().get("auth_headers_seen_by_storage", 0) == 0
    figures.record(resources=resources, files=out["result"]["files"], truncated_downloads=2,
                   task_seconds=out["seconds"])


def test_worker_killed_mid_download_then_task_retried(sb: SandboxServer, modmed_connections: Any, tmp_path: Path,
                                                      figures: Figures) -> None:
    job = spec(tmp_path, max_concurrent_downloads=1)
    folder = tmp_path / "manual__reliability" / "bulk"
    checkpoints = folder / "_state" / "files"
    with figures.measure(sb, prefix="killed_"):
        sb.faults(slow_download_ms=150)
        proc = start_worker(job)
        kill_when(proc, lambda: checkpoints.exists() and len(list(checkpoints.glob("*.json"))) >= 2, timeout=90)
        sb.reset_faults()
    stored_at_kill = len(list(checkpoints.glob("*.json")))
    state = json.loads((folder / "_state" / "export.json").read_text())
    assert state["stage"] == "ready"
    storage_before = sb.stats().get("storage_requests", 0)
    with figures.measure(sb, prefix="retry_") as m:
        out = run_worker(job)
    resources = check_exactly_once(sb, out["result"])
    refetched = sb.stats().get("storage_requests", 0) - storage_before
    assert m.get("exports_started", 0) == 0  # the saved job was resumed, not kicked off again
    assert refetched == out["result"]["files"] - stored_at_kill  # stored files were not fetched again
    figures.record(resources=resources, files=out["result"]["files"], files_stored_at_kill=stored_at_kill,
                   files_fetched_by_retry=refetched)


def test_truncation_beyond_the_retries_fails_clearly_then_the_retry_resumes(
        sb: SandboxServer, modmed_connections: Any, tmp_path: Path, figures: Figures) -> None:
    job = spec(tmp_path, max_concurrent_downloads=1, download_retries=1)
    started = sb.stats().get("exports_started", 0)
    sb.faults(truncate_downloads=2)
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        run_in_process(job)
    failed_after = time.monotonic() - t0
    assert str(err.value).startswith("bulk file output/")
    assert str(err.value).endswith("(transfer broken) after 2 attempt(s)")
    sb.reset_faults()
    out = run_in_process(job)
    resources = check_exactly_once(sb, out["result"])
    assert sb.stats()["exports_started"] - started == 1
    figures.record(first_try=str(err.value), seconds_to_fail=round(failed_after, 2), retry_resources=resources)
