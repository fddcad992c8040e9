"""The triggerer restarts while a change sensor and a bulk export are both deferred.

Both tasks defer for real (``execute`` raises ``TaskDeferred``); their triggers run side by side in one event
loop, as in a triggerer; the loop is stopped mid-poll (tasks cancelled, ``cleanup`` run, never ``on_kill``);
new triggers are rebuilt from ``serialize()`` through Airflow's serde, as a restarted triggerer rebuilds them
from the database; they resume, fire, and the tasks finish in ``execute_complete``. Ground truth: the change
made during the outage is reported exactly once, the export was kicked off once and holds every id once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.reliability._figures import Figures

pytestmark = [pytest.mark.integration, pytest.mark.airflow]


def rebuild(trigger: Any) -> Any:
    from airflow.sdk._shared.module_loading import import_string
    from airflow.sdk.serde import deserialize, serialize

    classpath, kwargs = trigger.serialize()
    stored = json.loads(json.dumps(serialize(kwargs)))  # what the triggerer table holds
    return import_string(classpath)(**deserialize(stored))


def deferred(op: Any, context: dict[str, Any]) -> Any:
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as err:
        op.execute(context)
    assert err.value.method_name == "execute_complete"
    return err.value.trigger


def context(task_id: str) -> dict[str, Any]:
    run_id = "manual__restart"
    return {"ti": SimpleNamespace(task_id=task_id, dag_id="restart", run_id=run_id, map_index=-1), "run_id": run_id}


async def run_until_stopped(triggers: list[Any], seconds: float) -> list[Any]:
    """Run the triggers for ``seconds``, then stop them as a triggerer shutdown does; answers early events."""
    gens = [t.run() for t in triggers]
    tasks = [asyncio.ensure_future(anext(g)) for g in gens]
    done, _ = await asyncio.wait(tasks, timeout=seconds)
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await task
    for gen, trigger in zip(gens, triggers, strict=True):
        await gen.aclose()
        await trigger.cleanup()
    return [t.result() for t in done if not t.cancelled() and t.exception() is None]


async def first_events(triggers: list[Any], timeout: float = 60) -> list[Any]:
    return list(await asyncio.wait_for(asyncio.gather(*(anext(t.run()) for t in triggers)), timeout))


def test_triggerer_restarted_while_a_sensor_and_a_bulk_export_are_deferred(
        sb: SandboxServer, modmed_connections: Any, tmp_path: Path, figures: Figures) -> None:
    from airflow_provider_modmed.client.instants import format_instant
    from airflow_provider_modmed.operators.bulk_export import ModMedBulkExportOperator
    from airflow_provider_modmed.sensors.changes import ModMedChangesSensor

    sensor = ModMedChangesSensor(task_id="changes", resource_type="Patient", modmed_conn_id="modmed_default",
                                 state_path=f"file://{tmp_path}/state", output_path=f"file://{tmp_path}/changes",
                                 since=format_instant(int(time.time() * 1000)), deferrable=True, poke_interval=0.2)
    export = ModMedBulkExportOperator(task_id="export", modmed_conn_id="modmed_certified",
                                      output_folder=f"file://{tmp_path}/bulk", types="Patient,Immunization",
                                      min_poll_seconds=0.05, max_poll_seconds=0.3)
    export_seconds = sb.app_state.config.export_seconds
    sb.app_state.config.export_seconds = 2.0  # the export is still running when the triggerer goes down
    started = time.monotonic()
    try:
        with figures.measure(sb) as m:
            kicked_off = sb.stats().get("exports_started", 0)
            triggers = [deferred(sensor, context("changes")), deferred(export, context("export"))]
            early = asyncio.run(run_until_stopped(triggers, 0.8))
            assert early == []  # nothing to report yet: the restart hits both mid-poll
            outage = sb.app_state.store.create({"resourceType": "Patient", "name": [{"family": "Outage"}],
                                                "gender": "female", "birthDate": "1977-07-07"})
            rebuilt = [rebuild(t) for t in triggers]
            sensor_event, export_event = asyncio.run(first_events(rebuilt))
    finally:
        sb.app_state.config.export_seconds = export_seconds
    assert sensor_event.payload["status"] == "changed" and sensor_event.payload["count"] >= 1
    assert export_event.payload["status"] == "complete"
    assert export_event.payload["status_url"] == triggers[1].status_url  # the same job, polled again
    assert sb.stats()["exports_started"] - kicked_off == 1  # no second kick-off

    reference = sensor.execute_complete(context("changes"), event=sensor_event.payload)
    changed = [c["id"] for c in reference["changes"]]
    assert changed.count(outage.id) == 1 and len(changed) == len(set(changed))
    written = [json.loads(line)["id"] for line in Path(reference["path"].removeprefix("file://")).read_text()
               .splitlines()]
    assert written.count(outage.id) == 1

    result = export.execute_complete(context("export"), event=export_event.payload)
    folder = Path(result["run_folder"].removeprefix("file://"))
    for rt in ("Patient", "Immunization"):
        ids = [json.loads(line)["id"] for name in result["output"][rt]["files"]
               for line in (folder / name).read_text().splitlines()]
        live = {certified_id(r["id"]) for r in sb.app_state.store.ground_truth(rt) if not r["deleted"]}
        assert len(ids) == len(set(ids)) and set(ids) == live, rt  # the export holds the certified ids
    figures.record(triggers=2, exports_kicked_off=1, changes_reported=len(changed), outage_change_reported_once=True,
                   exported_resources=result["resources"], wall_seconds=round(time.monotonic() - started, 2),
                   sensor_polls=sensor_event.payload.get("polls"), export_files=export_event.payload.get("files"))
    assert m["requests"] > 0
